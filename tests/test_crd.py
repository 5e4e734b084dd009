"""The InternalGateway CRD: a valid structural schema that accepts and rejects what the model does.

The schema is checked with a small validator written here for the subset of OpenAPI v3 that Kubernetes CRDs use
(no dependency: `jsonschema` knows neither Kubernetes' defaulting and pruning nor `x-kubernetes-list-type`). It
behaves like the API server on a create: drop unknown fields and non-nullable nulls, apply defaults, then
validate; patterns run on RE2, the engine of Go's regexp. It fails on any schema keyword it does not implement,
so nothing in the CRD is silently skipped. The one thing it cannot evaluate, CEL (`x-kubernetes-validations`),
is pinned to the exact list CEL_RULES, each rule with a Python transliteration checked against the model; the
inputs only CEL rejects are listed in MODEL_ONLY.

What is compared with the model (canal/model/internal_gateway.py):
- BAD: inputs both reject, the schema at (or next to) the field the model names;
- MODEL_ONLY: inputs only the model rejects, each with the reason a structural schema cannot say it;
- SCHEMA_STRICTER: inputs only the schema rejects, each with the reason (typed fields);
- every InternalGateway of examples/, the README and tests/corpus: the model's verdict at parse time holds for the
  schema too, and what the API server stores (defaults applied) parses to the same InternalGateway;
- the field lists: the fields the model reads, recorded by running it on mappings that log every key looked up,
  equal the schema's properties (robust against parser refactors, unlike reading the parser's source).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import re2

from canal import crd
from canal.desired import Condition, ObjectStatus
from canal.files import parse_text
from canal.kube.status import DnsView, FleetView, Nack, gateway_status
from canal.model.base import Issues, ObjectRef, Rejection
from canal.model.internal_gateway import (
    DEFAULT_TTL,
    DNS_MODES,
    MAX_SHARDS,
    MAX_TTL,
    REDIRECT_MODES,
    InternalGateway,
    parse_internal_gateway,
)
from canal.snapshot import Snapshot, parse_object
from canal.translate import translate
from tests.conftest import EXAMPLES, ROOT

CHART_COPY = ROOT / "charts" / "canal" / "crds" / crd.FILENAME
CANONICAL = ROOT / "canal" / crd.FILENAME
CORPUS = ROOT / "tests" / "corpus"

# ------------------------------------------------------------------------------------------------- the validator

Errors = list[tuple[str, str]]  # (field path, message)

_VALUE_KEYWORDS = {"enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "format"}
_JUNCTORS = ("oneOf", "anyOf", "allOf", "not")
_KNOWN_KEYWORDS = {
    "type",
    "description",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "default",
    "nullable",
    *_VALUE_KEYWORDS,
    *_JUNCTORS,
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",  # CEL: not evaluated here (see CEL_RULES)
}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _is_go_ip(text: str) -> bool:
    """Go's net.ParseIP: like Python's ipaddress, except that it has no IPv6 zones ("fe80::1%eth0")."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _format_ok(fmt: str, value: str) -> bool:
    # kube-openapi (strfmt): ipv4 is "net.ParseIP accepts it and it has a dot", ipv6 "... and it has a colon".
    if fmt == "ipv4":
        return _is_go_ip(value) and "." in value
    if fmt == "ipv6":
        return _is_go_ip(value) and ":" in value
    if fmt == "date-time":
        try:
            return bool(_DATE_TIME.fullmatch(value)) and bool(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return False
    raise AssertionError(f"the test validator does not implement format {fmt!r}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prune(value: Any, schema: dict, *, root: bool = False) -> None:
    """Drop what the API server drops: unknown fields, and nulls of fields that are not nullable."""
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key in list(value):
            if root and key == "metadata":
                continue  # ObjectMeta is handled by the API server itself, not pruned by the CRD schema
            sub = props.get(key, extra)
            if sub is None:
                del value[key]
            elif value[key] is None and not sub.get("nullable"):
                del value[key]  # a default, if any, fills it in again
            else:
                _prune(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _prune(item, schema["items"])


def _default(value: Any, schema: dict) -> None:
    """The API server's defaulting: a missing field gets its default, then defaulting continues inside it."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if sub is not None:
                _default(item, sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(item, schema["items"])


def _check(value: Any, schema: dict, path: str) -> Errors:
    unknown = set(schema) - _KNOWN_KEYWORDS
    assert not unknown, f"{path or '<root>'}: the test validator does not implement {sorted(unknown)}"
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](value):
        return [(path, f"must be of type {kind}")]
    errors: Errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append((path, f"must be one of {schema['enum']}"))
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append((path, f"must be at least {schema['minLength']} characters"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append((path, f"must be at most {schema['maxLength']} characters"))
        if "pattern" in schema and not re2.search(schema["pattern"], value):
            errors.append((path, f"must match {schema['pattern']}"))
        if "format" in schema and not _format_ok(schema["format"], value):
            errors.append((path, f"must be a valid {schema['format']}"))
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append((path, f"must be at least {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append((path, f"must be at most {schema['maximum']}"))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append((path, f"must have at least {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append((path, f"must have at most {schema['maxItems']} items"))
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set" and len({repr(v) for v in value}) != len(value):
            errors.append((path, "duplicate entries in a set"))
        if list_type == "map":
            keys = [tuple(v.get(k) for k in schema["x-kubernetes-list-map-keys"]) for v in value if isinstance(v, dict)]
            if len(set(keys)) != len(keys):
                errors.append((path, "duplicate keys in a map list"))
        if "items" in schema:
            for i, item in enumerate(value):
                errors.extend(_check(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        errors.extend((_at(path, key), "is required") for key in schema.get("required", ()) if key not in value)
        props = schema.get("properties", {})
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if sub is not None:
                errors.extend(_check(item, sub, _at(path, key)))
    passing = {name: [not _check(value, sub, path) for sub in schema.get(name, ())] for name in _JUNCTORS[:3]}
    if "oneOf" in schema and sum(passing["oneOf"]) != 1:
        errors.append((path, f"must match exactly one of oneOf, matches {sum(passing['oneOf'])}"))
    if "anyOf" in schema and not any(passing["anyOf"]):
        errors.append((path, "must match at least one of anyOf"))
    if "allOf" in schema and not all(passing["allOf"]):
        errors.append((path, "must match every allOf"))
    if "not" in schema and not _check(value, schema["not"], path):
        errors.append((path, "must not match `not`"))
    return errors


def admit(obj: dict) -> tuple[dict, Errors]:
    """What the API server does with a create: the stored object (pruned, defaulted) and the validation errors."""
    root = crd.schema()
    stored = copy.deepcopy(obj)
    _prune(stored, root, root=True)
    _default(stored, root)
    return stored, _check(stored, root, "")


# ----------------------------------------------------------------------------------------------------- helpers

BASE_SPEC: dict[str, Any] = {"gatewayRef": {"name": "canal"}, "address": {"serviceRef": {"name": "canal-gateway"}}}
FULL_SPEC: dict[str, Any] = {
    "gatewayRef": {"name": "canal", "namespace": "istio-system"},
    "workloadSelector": {"app": "canal-gateway", "example.com/tier": ""},
    "address": {"serviceRef": {"name": "canal-gateway", "namespace": "istio-system"}, "ips": [], "shards": 4},
    "clusterDomain": "cluster.local.",
    "dns": {"mode": "server", "ttl": 30},
    "redirect": {"mode": "ipvs"},
    "namespaceSelector": {
        "matchLabels": {"canal.io/migrate": "true"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "staging"]},
            {"key": "legacy", "operator": "DoesNotExist"},
            {"key": "team", "operator": "Exists", "values": []},
        ],
    },
}


def ig(spec: Any = None, **fields: Any) -> dict:
    """An InternalGateway; `spec` replaces BASE_SPEC, keyword fields are set on top of it (None removes one)."""
    body = copy.deepcopy(BASE_SPEC if spec is None else spec)
    for key, value in fields.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {
        "apiVersion": "canal.io/v1alpha1",
        "kind": "InternalGateway",
        "metadata": {"name": "gw", "namespace": "istio-system"},
        "spec": body,
    }


def model(obj: dict) -> tuple[InternalGateway | None, list[str], list[tuple[str, str]]]:
    """Parse as the snapshot does: the InternalGateway (None when rejected), rejected fields, caveats."""
    parsed = parse_object(copy.deepcopy(obj))
    problems = parsed.problems
    if problems is None:
        return parsed.obj, [], []
    return parsed.obj, [r.field for r in problems.rejections], [(c.field, c.message) for c in problems.caveats]


def rejection_paths(obj: dict) -> list[str]:
    return model(obj)[1]


def _related(a: str, b: str) -> bool:
    """One path is the other or contains it (an anyOf on spec reports spec; the model names spec.address)."""
    a, b = re.sub(r"\[\d+\]", "", a), re.sub(r"\[\d+\]", "", b)
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _nodes(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every schema node reachable through properties, items and additionalProperties, with its path."""
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _nodes(sub, _at(path, key))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def _fields(schema: dict, path: str) -> set[str]:
    """Field paths declared by properties (not map entries), e.g. spec.namespaceSelector.matchExpressions[].key."""
    out: set[str] = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(_at(path, key))
        out |= _fields(sub, _at(path, key))
    if "items" in schema:
        out |= _fields(schema["items"], f"{path}[]")
    return out


def _documents(path: Path) -> list[dict]:
    return [d.data for d in parse_text(path.read_text(), str(path)) if d.data.get("kind") == "InternalGateway"]


def _readme_example() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The InternalGateway", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (doc,) = [d.data for d in parse_text(block, "README.md")]
    return doc


# ------------------------------------------------------------------------------------------ the file and its copy


def test_chart_copy_is_byte_identical_to_the_packaged_manifest():
    assert CHART_COPY.read_bytes() == CANONICAL.read_bytes(), (
        f"{CHART_COPY.relative_to(ROOT)} differs from the canonical {CANONICAL.relative_to(ROOT)}: edit the latter, "
        f"then cp {CANONICAL.relative_to(ROOT)} {CHART_COPY.parent.relative_to(ROOT)}/"
    )
    assert crd.manifest_text() == CANONICAL.read_text()


def test_manifest_is_package_data():
    """Installed Canal (wheel, container image) must ship the file canal.crd reads."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert crd.FILENAME in config["tool"]["setuptools"]["package-data"]["canal"]


def test_callers_get_copies():
    crd.crd_manifest()["spec"]["group"] = "changed"
    crd.schema()["properties"].clear()
    assert crd.crd_manifest()["spec"]["group"] == "canal.io"
    assert "spec" in crd.schema()["properties"]
    with pytest.raises(KeyError):
        crd.schema("v9")


# --------------------------------------------------------------------------------------- the CRD and its schema


def test_names_version_scope_and_subresources():
    manifest = crd.crd_manifest()
    assert manifest["apiVersion"] == "apiextensions.k8s.io/v1"
    assert manifest["kind"] == "CustomResourceDefinition"
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == crd.NAME
    assert spec["group"] == "canal.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "InternalGateway",
        "listKind": "InternalGatewayList",
        "plural": "internalgateways",
        "singular": "internalgateway",
        "shortNames": ["igw"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns():
    (version,) = crd.crd_manifest()["spec"]["versions"]
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Gateway", "string", ".spec.gatewayRef.name"),
        ("Bound", "integer", ".status.boundCount"),
        ("Programmed", "string", '.status.conditions[?(@.type=="Programmed")].status'),
        ("DNS", "string", '.status.conditions[?(@.type=="DNSProgrammed")].status'),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    fields = _fields(crd.schema(), "")
    for _, _, path in columns[:4]:
        plain = re.sub(r"\[\?\(.*?\)\]", "[]", path).lstrip(".")
        assert plain in fields, path
    # The condition types the columns read are ones the controller writes.
    translated = ObjectStatus(ObjectRef("InternalGateway", "a", "b"), 1)
    status = gateway_status(translated, *_fleet(), "nftables", [], None, _AT)
    written = {c["type"] for c in status["conditions"]}
    assert {"Programmed", "DNSProgrammed"} <= written


def test_schema_is_structural():
    """The rules the API server applies to a v1 CRD schema (structural schemas, defaults, list types)."""
    root = crd.schema()
    assert root["type"] == "object"
    problems: list[str] = []
    for path, node in _nodes(root):
        where = path or "<root>"
        if set(node) - _KNOWN_KEYWORDS:
            problems.append(f"{where}: keywords outside the implemented subset: {sorted(set(node) - _KNOWN_KEYWORDS)}")
        if not node.get("type"):
            problems.append(f"{where}: no type (and neither int-or-string nor preserve-unknown-fields)")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties together")
        if node.get("additionalProperties") is False or "uniqueItems" in node:
            problems.append(f"{where}: additionalProperties: false / uniqueItems are forbidden")
        if "default" in node:
            if path.startswith("metadata") or ".*" in path:
                problems.append(f"{where}: defaults are not allowed under metadata or additionalProperties")
            pruned = copy.deepcopy(node["default"])
            _prune(pruned, node)
            if pruned != node["default"]:
                problems.append(f"{where}: the default has fields the schema prunes")
            if errors := _check(node["default"], node, path):
                problems.append(f"{where}: the default does not validate: {errors}")
        if "pattern" in node:
            re2.compile(node["pattern"])  # Go's regexp is RE2
        for value in node.get("enum", ()):
            if not _TYPES[node["type"]](value):
                problems.append(f"{where}: enum value {value!r} is not a {node['type']}")
        if node.get("x-kubernetes-list-type") == "set" and node["items"]["type"] in ("object", "array"):
            problems.append(f"{where}: a set must hold scalars")
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                if key not in item.get("required", ()) and "default" not in item["properties"][key]:
                    problems.append(f"{where}: list map key {key} must be required or defaulted")
        for junctor, sub in _junctions(node):
            problems.extend(_junctor_problems(sub, node, f"{where}.{junctor}"))
    assert root["properties"]["metadata"] == {"type": "object"}, "only name/namespace may be restricted; none are"
    assert not problems, "\n".join(problems)


def _junctor_problems(sub: dict, outer: dict, where: str) -> list[str]:
    """Inside oneOf/anyOf/allOf/not: value validations only, on fields the outer schema declares."""
    problems = [f"{where}: {k} is not allowed in a junctor" for k in sub if k in ("type", "description", "default")]
    problems += [f"{where}: {k} is not allowed in a junctor" for k in sub if k in ("additionalProperties", "nullable")]
    for key in sub.get("required", ()):
        if key not in outer.get("properties", {}):
            problems.append(f"{where}: requires {key}, which the schema does not declare")
    for key, inner in sub.get("properties", {}).items():
        if key not in outer.get("properties", {}):
            problems.append(f"{where}: constrains {key}, which the schema does not declare")
        else:
            problems += _junctor_problems(inner, outer["properties"][key], f"{where}.{key}")
    if "items" in sub:
        problems += _junctor_problems(sub["items"], outer.get("items", {}), f"{where}[]")
    for junctor, inner in _junctions(sub):
        problems += _junctor_problems(inner, outer, f"{where}.{junctor}")
    return problems


def _junctions(node: dict) -> Iterator[tuple[str, dict]]:
    for junctor in _JUNCTORS:
        if junctor in node:
            yield from ((junctor, sub) for sub in ([node[junctor]] if junctor == "not" else node[junctor]))


def _shard_names_rule(address: dict) -> bool:
    """The CEL rule on spec.address, in Python: the last shard Service name <name>-<shards-1> fits a DNS label.

    serviceRef.name is already an RFC 1035 label (its pattern), so the suffix can only make it too long.
    """
    if "serviceRef" not in address or address.get("shards", 1) <= 1:
        return True
    name, shards = address["serviceRef"]["name"], address["shards"]
    return len(name) + (2 if shards <= 10 else 3 if shards <= 100 else 4) <= 63


# CEL rules, which this test cannot evaluate: the exact list, each with its Python transliteration (checked against
# the model below). A change to a rule must change this table, and be tried on a real API server
# (`kubectl apply --dry-run=server -f canal/internalgateways.canal.io.yaml`): the API server also refuses a CRD
# whose rules' estimated cost is too high, which nothing here can compute.
CEL_RULES = {
    "spec.address": (
        "!has(self.serviceRef) || !has(self.shards) || self.shards <= 1 || "
        "size(self.serviceRef.name) + (self.shards <= 10 ? 2 : (self.shards <= 100 ? 3 : 4)) <= 63",
        _shard_names_rule,
    ),
}


def test_cel_rules_are_exactly_the_listed_ones():
    found = {}
    for path, node in _nodes(crd.schema()):
        for rule in node.get("x-kubernetes-validations", ()):
            assert set(rule) <= {"rule", "message", "fieldPath"}, rule
            assert rule["message"], f"{path}: a CEL rule needs a message people can act on"
            assert path not in found, f"{path}: one rule per node is listed"
            found[path] = rule["rule"]
            assert "string(" not in rule["rule"], "string(int) has no size bound in the API server's cost estimate"
            for regex in re.findall(r"matches\('([^']*)'\)", rule["rule"]):
                re2.compile(regex)
    assert found == {path: rule for path, (rule, _) in CEL_RULES.items()}


# Valid Service names only: a dotted or otherwise invalid serviceRef.name fails its own pattern before the rule.
_SHARD_SERVICE_NAMES = ["g", "gw-1", "a" * 50, "a" * 59, "a" * 60, "a" * 61, "a" * 62, "a" * 63, "a-b0", "x" * 62 + "9"]


@pytest.mark.parametrize("name", _SHARD_SERVICE_NAMES)
def test_the_shard_name_rule_agrees_with_the_model(name):
    """The CEL rule's transliteration rejects exactly the shard counts the model rejects, for 1..MAX_SHARDS."""
    assert rejection_paths(ig(address={"serviceRef": {"name": name}})) == []
    _, mirror = CEL_RULES["spec.address"]
    disagree = []
    for shards in range(1, MAX_SHARDS + 1):
        address = {"serviceRef": {"name": name}, "shards": shards}
        by_model = "spec.address.shards" not in rejection_paths(ig(address=address))
        if mirror(address) != by_model:
            disagree.append(shards)
    assert not disagree, f"{name!r}: the rule and the model disagree for shards {disagree}"


# --------------------------------------------------------------------------------- verdicts: schema and model

# (id, object, the field the model rejects). The schema must reject too, at that field or next to it.
BAD: list[tuple[str, dict, str]] = [
    ("no-spec", {**ig(), "spec": None}, "spec.gatewayRef"),
    ("gatewayRef-missing", ig(gatewayRef=None), "spec.gatewayRef"),
    ("gatewayRef-not-a-mapping", ig(gatewayRef="canal"), "spec.gatewayRef"),
    ("gatewayRef-name-missing", ig(gatewayRef={"namespace": "istio-system"}), "spec.gatewayRef.name"),
    ("gatewayRef-name-empty", ig(gatewayRef={"name": ""}), "spec.gatewayRef.name"),
    ("gatewayRef-name-upper-case", ig(gatewayRef={"name": "Canal"}), "spec.gatewayRef.name"),
    ("gatewayRef-name-not-a-string", ig(gatewayRef={"name": 5}), "spec.gatewayRef.name"),
    ("gatewayRef-name-254-chars", ig(gatewayRef={"name": ("a" * 50 + ".") * 4 + "a" * 50}), "spec.gatewayRef.name"),
    ("gatewayRef-name-trailing-dot", ig(gatewayRef={"name": "canal."}), "spec.gatewayRef.name"),
    ("gatewayRef-namespace-dotted", ig(gatewayRef={"name": "canal", "namespace": "a.b"}), "spec.gatewayRef.namespace"),
    ("gatewayRef-namespace-64-chars", ig(gatewayRef={"name": "c", "namespace": "n" * 64}), "spec.gatewayRef.namespace"),
    ("gatewayRef-namespace-empty", ig(gatewayRef={"name": "c", "namespace": ""}), "spec.gatewayRef.namespace"),
    ("gatewayRef-name-underscore", ig(gatewayRef={"name": "canal_gw"}), "spec.gatewayRef.name"),
    ("workloadSelector-list", ig(workloadSelector=["app"]), "spec.workloadSelector"),
    ("workloadSelector-bad-value", ig(workloadSelector={"app": "not valid!"}), "spec.workloadSelector.app"),
    ("workloadSelector-value-64", ig(workloadSelector={"app": "v" * 64}), "spec.workloadSelector.app"),
    ("workloadSelector-value-dash-end", ig(workloadSelector={"app": "gw-"}), "spec.workloadSelector.app"),
    ("workloadSelector-value-bool", ig(workloadSelector={"app": True}), "spec.workloadSelector.app"),
    ("address-missing", ig(address=None), "spec.address"),
    ("address-missing-dns-server", ig(address=None, dns={"mode": "server"}), "spec.address"),
    ("address-missing-dns-null", ig(address=None, dns={"mode": None}), "spec.address"),
    ("address-empty", ig(address={}), "spec.address"),
    ("address-not-a-mapping", ig(address=["10.0.0.1"]), "spec.address"),
    ("address-serviceRef-and-ips", ig(address={"serviceRef": {"name": "gw"}, "ips": ["10.0.0.1"]}), "spec.address"),
    ("address-ips-empty", ig(address={"ips": []}), "spec.address"),
    ("address-ips-bad-octet", ig(address={"ips": ["10.0.0.1", "10.0.0.300"]}), "spec.address.ips[1]"),
    ("address-ips-hostname", ig(address={"ips": ["gateway.local"]}), "spec.address.ips[0]"),
    ("address-ips-leading-zero", ig(address={"ips": ["010.0.0.1"]}), "spec.address.ips[0]"),
    ("address-ips-cidr", ig(address={"ips": ["10.0.0.0/24"]}), "spec.address.ips[0]"),
    ("address-ips-not-a-string", ig(address={"ips": [167772161]}), "spec.address.ips[0]"),
    ("address-ips-a-string", ig(address={"ips": "10.0.0.1"}), "spec.address.ips"),
    ("address-ips-duplicate", ig(address={"ips": ["10.0.0.1", "10.0.0.1"]}), "spec.address.ips"),
    ("address-ips-ipv6-zone", ig(address={"ips": ["fd00::50", "fe80::1%eth0"]}), "spec.address.ips[1]"),
    ("address-ips-ipv6-numeric-zone", ig(address={"ips": ["fe80::1%2"]}), "spec.address.ips[0]"),
    ("address-ips-ipv4-mapped-zone", ig(address={"ips": ["::ffff:10.0.0.1%eth0"]}), "spec.address.ips[0]"),
    ("serviceRef-not-a-mapping", ig(address={"serviceRef": "gw"}), "spec.address.serviceRef"),
    ("serviceRef-name-missing", ig(address={"serviceRef": {"namespace": "x"}}), "spec.address.serviceRef.name"),
    ("serviceRef-name-bad", ig(address={"serviceRef": {"name": "gw_1"}}), "spec.address.serviceRef.name"),
    # Service names are RFC 1035 labels: no dots, a letter first, at most 63 characters.
    ("serviceRef-name-dotted", ig(address={"serviceRef": {"name": "canal.gateway"}}), "spec.address.serviceRef.name"),
    ("serviceRef-name-digit-first", ig(address={"serviceRef": {"name": "1-gw"}}), "spec.address.serviceRef.name"),
    ("serviceRef-name-64-chars", ig(address={"serviceRef": {"name": "g" * 64}}), "spec.address.serviceRef.name"),
    ("serviceRef-name-dash-end", ig(address={"serviceRef": {"name": "gw-"}}), "spec.address.serviceRef.name"),
    (
        "serviceRef-name-dotted-and-sharded",
        ig(address={"serviceRef": {"name": "canal.gateway"}, "shards": 2}),
        "spec.address.serviceRef.name",
    ),
    (
        "serviceRef-namespace-bad",
        ig(address={"serviceRef": {"name": "gw", "namespace": "Istio"}}),
        "spec.address.serviceRef.namespace",
    ),
    ("shards-zero", ig(address={"serviceRef": {"name": "gw"}, "shards": 0}), "spec.address.shards"),
    ("shards-257", ig(address={"serviceRef": {"name": "gw"}, "shards": MAX_SHARDS + 1}), "spec.address.shards"),
    ("shards-without-serviceRef", ig(address={"ips": ["10.0.0.1"], "shards": 2}), "spec.address.shards"),
    ("shards-a-word", ig(address={"serviceRef": {"name": "gw"}, "shards": "four"}), "spec.address.shards"),
    ("shards-fraction", ig(address={"serviceRef": {"name": "gw"}, "shards": 2.5}), "spec.address.shards"),
    ("shards-bool", ig(address={"serviceRef": {"name": "gw"}, "shards": True}), "spec.address.shards"),
    ("clusterDomain-empty", ig(clusterDomain=""), "spec.clusterDomain"),
    ("clusterDomain-dot", ig(clusterDomain="."), "spec.clusterDomain"),
    ("clusterDomain-upper-case", ig(clusterDomain="Cluster.Local"), "spec.clusterDomain"),
    ("clusterDomain-underscore", ig(clusterDomain="cluster_local"), "spec.clusterDomain"),
    ("clusterDomain-leading-dot", ig(clusterDomain=".cluster.local"), "spec.clusterDomain"),
    ("clusterDomain-254-chars", ig(clusterDomain=("a" * 50 + ".") * 4 + "a" * 50), "spec.clusterDomain"),
    ("clusterDomain-255-with-dot", ig(clusterDomain=("a" * 50 + ".") * 4 + "a" * 50 + "."), "spec.clusterDomain"),
    ("clusterDomain-number", ig(clusterDomain=5), "spec.clusterDomain"),
    ("clusterDomain-two-trailing-dots", ig(clusterDomain="cluster.local.."), "spec.clusterDomain"),
    ("clusterDomain-label-64-chars", ig(clusterDomain="c" * 64 + ".local"), "spec.clusterDomain"),
    ("clusterDomain-label-64-chars-and-dot", ig(clusterDomain="cluster." + "l" * 64 + "."), "spec.clusterDomain"),
    ("dns-a-string", ig(dns="coredns"), "spec.dns"),
    ("dns-mode-unknown", ig(dns={"mode": "bind"}), "spec.dns.mode"),
    ("dns-mode-case", ig(dns={"mode": "CoreDNS"}), "spec.dns.mode"),
    ("dns-mode-empty", ig(dns={"mode": ""}), "spec.dns.mode"),
    ("dns-ttl-negative", ig(dns={"ttl": -1}), "spec.dns.ttl"),
    ("dns-ttl-over-a-day", ig(dns={"ttl": MAX_TTL + 1}), "spec.dns.ttl"),
    ("dns-ttl-a-word", ig(dns={"ttl": "five"}), "spec.dns.ttl"),
    ("dns-ttl-bool", ig(dns={"ttl": False}), "spec.dns.ttl"),
    ("redirect-a-string", ig(redirect="nftables"), "spec.redirect"),
    ("redirect-mode-unknown", ig(redirect={"mode": "iptables"}), "spec.redirect.mode"),
    ("redirect-mode-number", ig(redirect={"mode": 1}), "spec.redirect.mode"),
    ("namespaceSelector-list", ig(namespaceSelector=[]), "spec.namespaceSelector"),
    (
        "matchLabels-bad-value",
        ig(namespaceSelector={"matchLabels": {"team": "a b"}}),
        "spec.namespaceSelector.matchLabels.team",
    ),
    (
        "matchExpressions-a-mapping",
        ig(namespaceSelector={"matchExpressions": {}}),
        "spec.namespaceSelector.matchExpressions",
    ),
    (
        "matchExpressions-item-a-string",
        ig(namespaceSelector={"matchExpressions": ["env"]}),
        "spec.namespaceSelector.matchExpressions[0]",
    ),
    (
        "matchExpressions-operator-unknown",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "Equals", "values": ["a"]}]}),
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
    (
        "matchExpressions-in-without-values",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In"}]}),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "matchExpressions-notin-empty-values",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "NotIn", "values": []}]}),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "matchExpressions-exists-with-values",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "Exists", "values": ["a"]}]}),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "matchExpressions-key-missing",
        ig(namespaceSelector={"matchExpressions": [{"operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-bad",
        ig(namespaceSelector={"matchExpressions": [{"key": "bad key!", "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-bad-prefix",
        ig(namespaceSelector={"matchExpressions": [{"key": "Example.com/env", "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-empty-prefix",
        ig(namespaceSelector={"matchExpressions": [{"key": "/env", "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-two-slashes",
        ig(namespaceSelector={"matchExpressions": [{"key": "example.com/a/env", "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-empty-name",
        ig(namespaceSelector={"matchExpressions": [{"key": "example.com/", "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-key-name-64-chars",
        ig(namespaceSelector={"matchExpressions": [{"key": "example.com/" + "e" * 64, "operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key",
    ),
    (
        "matchExpressions-operator-missing",
        ig(namespaceSelector={"matchExpressions": [{"key": "env"}]}),
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
    (
        "matchExpressions-operator-lower-case",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "in", "values": ["a"]}]}),
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
    (
        "matchExpressions-doesnotexist-with-values",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "DoesNotExist", "values": ["a"]}]}),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "matchExpressions-value-bad",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "not ok"]}]}),
        "spec.namespaceSelector.matchExpressions[0].values[1]",
    ),
    (
        "matchExpressions-value-64-chars",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["v" * 64]}]}),
        "spec.namespaceSelector.matchExpressions[0].values[0]",
    ),
    (
        "matchExpressions-value-dash-end",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod-"]}]}),
        "spec.namespaceSelector.matchExpressions[0].values[0]",
    ),
    (
        "matchExpressions-values-a-string",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In", "values": "a"}]}),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "matchExpressions-value-a-number",
        ig(namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In", "values": [1]}]}),
        "spec.namespaceSelector.matchExpressions[0].values[0]",
    ),
]

# Rejected by the model only: (id, object, the field the model rejects, why the schema cannot say it).
_LABEL_KEYS = (
    "a map's keys: structural schemas have no propertyNames, and a CEL regex over map keys (which have no "
    "maxLength) is costed by the API server as if each key were as long as a whole request: over its budget"
)
MODEL_ONLY: list[tuple[str, dict, str, str]] = [
    ("workloadSelector-bad-key", ig(workloadSelector={"bad key": "x"}), "spec.workloadSelector", _LABEL_KEYS),
    (
        "matchLabels-bad-key",
        ig(namespaceSelector={"matchLabels": {"-team": "a"}}),
        "spec.namespaceSelector.matchLabels",
        _LABEL_KEYS,
    ),
    (
        "address-ips-same-address-twice",
        ig(address={"ips": ["fd00::1", "fd00:0::1"]}),
        "spec.address.ips",
        "x-kubernetes-list-type: set compares the text; the model compares the canonical address",
    ),
    (
        "shard-service-name-too-long",
        ig(address={"serviceRef": {"name": "g" * 62}, "shards": 10}),
        "spec.address.shards",
        "CEL rule on spec.address (CEL_RULES): enforced by the API server, not evaluated by this test",
    ),
    ("workloadSelector-key-empty-prefix", ig(workloadSelector={"/app": "x"}), "spec.workloadSelector", _LABEL_KEYS),
    (
        "matchLabels-key-prefix-254-chars",
        ig(namespaceSelector={"matchLabels": {("p" * 50 + ".") * 4 + "p" * 50 + "/team": "a"}}),
        "spec.namespaceSelector.matchLabels",
        _LABEL_KEYS,
    ),
    (
        "matchExpressions-key-prefix-254-chars",
        ig(
            namespaceSelector={
                "matchExpressions": [{"key": ("p" * 50 + ".") * 4 + "p" * 50 + "/env", "operator": "Exists"}]
            }
        ),
        "spec.namespaceSelector.matchExpressions[0].key",
        "a pattern cannot bound the prefix apart from the name (the key's maxLength is 253 + 1 + 63), and a CEL rule "
        "on the items of matchExpressions, a list without maxItems, is over the API server's cost budget",
    ),
]

# Accepted by the model, rejected by the schema: (id, object, why the schema is right to be stricter).
SCHEMA_STRICTER: list[tuple[str, dict, str]] = [
    (
        "dns-ttl-a-numeric-string",
        ig(dns={"ttl": "5"}),
        "typed field: the model reads integers in strings (protobuf JSON, as for Istio); the CRD field is an integer",
    ),
    (
        "shards-a-numeric-string",
        ig(address={"serviceRef": {"name": "gw"}, "shards": "2"}),
        "typed field: the model reads integers in strings; the CRD field is an integer",
    ),
    (
        "workloadSelector-value-a-number",
        ig(workloadSelector={"version": 2}),
        "typed field: the model turns YAML numbers into label strings; label values are strings in the API",
    ),
    (
        "matchLabels-value-a-number",
        ig(namespaceSelector={"matchLabels": {"tier": 1}}),
        "typed field: as workloadSelector",
    ),
]


def _ids(cases: list) -> list[str]:
    return [c[0] for c in cases]


def test_case_ids_are_unique():
    ids = _ids(BAD) + _ids(MODEL_ONLY) + _ids(SCHEMA_STRICTER)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("obj", "field"), [c[1:] for c in BAD], ids=_ids(BAD))
def test_bad_input_is_rejected_by_schema_and_model(obj, field):
    assert rejection_paths(obj) == [field]
    _, errors = admit(obj)
    assert errors, "the schema accepts it"
    assert any(_related(path, field) for path, _ in errors), f"schema errors elsewhere: {errors}"


@pytest.mark.parametrize(("obj", "field", "why"), [c[1:] for c in MODEL_ONLY], ids=_ids(MODEL_ONLY))
def test_model_only_checks(obj, field, why):
    assert why
    assert rejection_paths(obj) == [field]
    _, errors = admit(obj)
    assert not errors, f"the schema rejects it now: move the case to BAD ({errors})"


@pytest.mark.parametrize(("obj", "why"), [c[1:] for c in SCHEMA_STRICTER], ids=_ids(SCHEMA_STRICTER))
def test_schema_stricter_than_model(obj, why):
    assert why
    assert rejection_paths(obj) == []
    _, errors = admit(obj)
    assert errors, "the schema accepts it now: drop the case"


# The corpus's InternalGateways rejected when parsed alone whose check the schema cannot express.
CORPUS_MODEL_ONLY = {
    "079-internal-gateway-shard-service-name-too-long": "CEL rule on spec.address (CEL_RULES)",
    "087-internal-gateway-workload-selector-key-empty-prefix": "a map's keys (see _LABEL_KEYS)",
}


def _corpus_gateways() -> list:
    out = []
    for path in [*sorted((CORPUS / "bad").glob("*.yaml")), CORPUS / "base.yaml"]:
        for i, doc in enumerate(_documents(path)):
            out.append(pytest.param(path.stem, doc, id=f"{path.stem}[{i}]"))
    return out


@pytest.mark.parametrize(("case", "obj"), _corpus_gateways())
def test_corpus_gateways_get_the_same_verdict(case, obj):
    """Rejected when parsed alone: the schema rejects too (or the case is listed). Rejected only in translation
    (a missing Gateway, a Gateway adopted twice, shard Services): the schema must accept, it sees one object."""
    rejected = rejection_paths(obj)
    _, errors = admit(obj)
    if not rejected or case in CORPUS_MODEL_ONLY:
        assert not errors, f"the schema rejects what the model accepts: {errors}"
    else:
        assert errors, f"the schema accepts what the model rejects at {rejected}"
        assert any(_related(p, f) for p, _ in errors for f in rejected), errors


def test_corpus_has_internal_gateway_cases_and_the_listed_ones_exist():
    params = _corpus_gateways()
    rejected = [p.values[0] for p in params if rejection_paths(p.values[1])]
    assert len(rejected) >= 8
    assert set(CORPUS_MODEL_ONLY) <= set(rejected)


# --------------------------------------------------------------------------- valid objects and the defaults


def _valid_objects() -> list:
    examples = sorted(EXAMPLES.rglob("*.yaml"))
    out = [pytest.param(d, id=str(p.relative_to(ROOT))) for p in examples for d in _documents(p)]
    assert out, "examples/ has no InternalGateway"
    out.append(pytest.param(_readme_example(), id="README"))
    out += [
        pytest.param(ig(FULL_SPEC), id="every-field"),
        pytest.param(ig(address={"ips": ["10.96.0.50", "fd00::50", "::ffff:10.0.0.1"]}), id="ips"),
        pytest.param(ig(address={"serviceRef": {"name": "gw"}, "ips": []}), id="serviceRef-and-empty-ips"),
        pytest.param(ig(address={"serviceRef": {"name": "g" * 61}, "shards": 10}), id="shard-name-63-chars"),
        pytest.param(ig(address={"serviceRef": {"name": "gw"}, "shards": MAX_SHARDS}), id="max-shards"),
        pytest.param(ig(address={"ips": ["10.0.0.1"], "shards": 1}), id="ips-one-shard"),
        pytest.param(ig(address=None, dns={"mode": "none"}), id="no-address-dns-none"),
        pytest.param(ig(dns={"mode": "coredns", "ttl": 0}), id="ttl-zero"),
        pytest.param(ig(dns={"ttl": MAX_TTL}), id="ttl-max"),
        pytest.param(ig(gatewayRef={"name": "a.b-c.d"}), id="gateway-name-subdomain"),
        pytest.param(ig(gatewayRef={"name": "1-canal", "namespace": "0-mesh"}), id="gateway-names-digit-first"),
        pytest.param(ig(address={"serviceRef": {"name": "g" * 62 + "0"}}), id="service-name-63-chars"),
        pytest.param(ig(address={"ips": ["fe80::1"]}), id="ips-link-local-without-zone"),
        pytest.param(ig(clusterDomain="c" * 63 + ".local."), id="cluster-domain-63-char-label"),
        pytest.param(
            ig(
                workloadSelector={("p" * 50 + ".") * 4 + "p" * 49 + "/" + "n" * 63: "v" * 63, "a": ""},
                namespaceSelector={
                    "matchLabels": {"example.com/Team_1.x": "A-b_c.9"},
                    "matchExpressions": [
                        {"key": ("p" * 50 + ".") * 4 + "p" * 49 + "/env", "operator": "In", "values": ["", "prod"]},
                        {"key": "n" * 63, "operator": "NotIn", "values": ["v" * 63]},
                    ],
                },
            ),
            id="label-keys-and-values-at-their-limits",
        ),
        pytest.param(ig(clusterDomain=("a" * 50 + ".") * 4 + "a" * 49 + "."), id="cluster-domain-253-and-dot"),
        pytest.param(ig(namespaceSelector={}), id="namespace-selector-empty"),
        pytest.param(ig(workloadSelector={}), id="workload-selector-empty"),
        pytest.param(ig(dns=None, redirect=None, clusterDomain=None), id="defaults"),
        pytest.param(ig(dns={}, redirect={}), id="empty-dns-and-redirect"),
        pytest.param(ig(dns={"mode": None, "ttl": None}, redirect={"mode": None}), id="nulls"),
    ]
    return out


def _covers(stored: Any, original: Any) -> bool:
    """Everything in `original` survived into `stored` (defaults may have added more)."""
    if isinstance(original, dict):
        return isinstance(stored, dict) and all(
            v is None or (k in stored and _covers(stored[k], v)) for k, v in original.items()
        )
    return stored == original


@pytest.mark.parametrize("obj", _valid_objects())
def test_valid_objects_pass_both_and_what_is_stored_parses_the_same(obj):
    stored, errors = admit(obj)
    assert not errors
    assert _covers(stored, obj), "the API server would prune a field the model reads"
    raw, raw_rejected, raw_caveats = model(obj)
    kept, kept_rejected, kept_caveats = model(stored)
    assert raw is not None and not raw_rejected and not raw_caveats
    assert kept is not None and not kept_rejected and not kept_caveats
    assert raw == kept  # the schema's defaults are the model's


def test_defaults_are_the_models():
    stored, errors = admit(ig())
    assert not errors
    spec = stored["spec"]
    assert spec["clusterDomain"] == "cluster.local"
    assert spec["dns"] == {"mode": "coredns", "ttl": DEFAULT_TTL}
    assert spec["redirect"] == {"mode": "nftables"}
    assert spec["address"]["shards"] == 1
    assert "workloadSelector" not in spec and "namespaceSelector" not in spec  # no default: "absent" means something
    parsed = model(ig())[0]
    defaults = {f.name: f.default for f in dataclasses.fields(InternalGateway) if f.default is not dataclasses.MISSING}
    assert defaults == {
        "cluster_domain": spec["clusterDomain"],
        "dns_mode": spec["dns"]["mode"],
        "dns_ttl": spec["dns"]["ttl"],
        "redirect_mode": spec["redirect"]["mode"],
        "namespace_selector": None,
        "shards": spec["address"]["shards"],
    }
    assert (parsed.cluster_domain, parsed.dns_mode, parsed.dns_ttl, parsed.redirect_mode, parsed.shards) == (
        "cluster.local",
        "coredns",
        DEFAULT_TTL,
        "nftables",
        1,
    )


def test_enums_and_bounds_are_the_models():
    spec = crd.schema()["properties"]["spec"]["properties"]
    assert tuple(spec["dns"]["properties"]["mode"]["enum"]) == DNS_MODES
    assert tuple(spec["redirect"]["properties"]["mode"]["enum"]) == REDIRECT_MODES
    ttl, shards = spec["dns"]["properties"]["ttl"], spec["address"]["properties"]["shards"]
    assert (ttl["minimum"], ttl["maximum"]) == (0, MAX_TTL)
    assert (shards["minimum"], shards["maximum"]) == (1, MAX_SHARDS)


# ----------------------------------------------------------------------------------------------- field lists


class _Recording(dict):
    """A mapping that logs every key the parser looks up (Node reads through .get), with its field path."""

    def __init__(self, data: dict, path: str, log: set[str]) -> None:
        super().__init__({k: _record(v, _at(path, k), log) for k, v in data.items()})
        self._path, self._log = path, log

    def get(self, key: Any, default: Any = None) -> Any:
        self._log.add(_at(self._path, key))
        return super().get(key, default)


def _record(value: Any, path: str, log: set[str]) -> Any:
    if isinstance(value, dict):
        return _Recording(value, path, log)
    if isinstance(value, list):
        return [_record(v, f"{path}[]", log) for v in value]
    return value


def _fields_the_model_reads(*specs: dict) -> set[str]:
    log: set[str] = set()
    for spec in specs:
        issues = Issues()
        parse_internal_gateway(_record(ig(spec), "", log), issues)
        assert not issues.errors and not issues.caveats
    # Map entries (label keys) are iterated, not looked up; metadata is the object's, not the CRD's.
    return {p for p in log if p.startswith("spec")}


def test_the_model_reads_exactly_the_schemas_fields():
    ips_variant = {**FULL_SPEC, "address": {"ips": ["10.0.0.1"]}}
    read = _fields_the_model_reads(FULL_SPEC, ips_variant, BASE_SPEC)
    declared = _fields(crd.schema()["properties"]["spec"], "spec") | {"spec"}
    assert read == declared, f"model only: {sorted(read - declared)}; schema only: {sorted(declared - read)}"


_OBJECT_FIELDS = sorted(
    path
    for path, node in _nodes(crd.schema()["properties"]["spec"], "spec")
    if node.get("type") == "object" and "properties" in node
)


@pytest.mark.parametrize("path", _OBJECT_FIELDS)
def test_unknown_fields_are_reported_by_the_model_and_pruned_by_the_api_server(path):
    obj = ig(FULL_SPEC)
    target = obj
    for part in path.split("."):
        target = target[part[:-2]][0] if part.endswith("[]") else target[part]
    target["bogus"] = 1
    where = path.replace("[]", "[0]")
    parsed, _, caveats = model(obj)
    assert parsed is not None
    assert (f"{where}.bogus", "unknown field, ignored") in caveats
    stored, errors = admit(obj)
    assert not errors
    assert stored == admit(ig(FULL_SPEC))[0], "the unknown field was not pruned"


# ------------------------------------------------------------------------------------------------------ status

_AT = "2024-05-01T12:00:00Z"


def _fleet() -> tuple[FleetView, FleetView, DnsView]:
    return FleetView(), FleetView(), DnsView("coredns")


def _assert_status_fits(status: dict) -> None:
    obj = ig()
    obj["status"] = status
    stored, errors = admit(obj)
    assert not errors
    assert stored["status"] == status, "the API server would prune part of the status the controller writes"


def test_status_of_the_examples_fits_the_schema():
    docs = [d.data for p in sorted(EXAMPLES.rglob("*.yaml")) for d in parse_text(p.read_text(), str(p))]
    state = translate(Snapshot.from_dicts(docs))
    refs = [r for r in state.status if r.kind == "InternalGateway"]
    assert refs
    for ref in refs:
        proxies = FleetView(connected=2, programmed=1)
        nodes = FleetView(connected=3, programmed=3)
        status = gateway_status(state.status[ref], proxies, nodes, DnsView("coredns", True), "nftables", [], None, _AT)
        _assert_status_fits(status)
        assert status["boundCount"] >= 1


def test_status_with_every_field_fits_the_schema():
    ref = ObjectRef("InternalGateway", "istio-system", "canal")
    rejected = ObjectRef("VirtualService", "default", "broken")
    translated = ObjectStatus(
        ref,
        7,
        conditions=(
            Condition("Accepted", "False", "PartiallyInvalid", "1 VirtualService rejected"),
            Condition("AddressResolved", "True", "Resolved", "10.96.0.50"),
            Condition("ShardsReady", "False", "InvalidShardServices", "shard Service(s) gw-2 not found"),
            Condition("RedirectReady", "True", "GatewayPodsReady", "2 gateway pod address(es)"),
        ),
        bound=frozenset({"default/helloworld", "default/other"}),
    )
    nack = Nack("gateway-1", "rds", "route config rejected: " + "x" * 3000)
    proxies = FleetView(connected=2, programmed=1, nacks=(nack,))
    previous = {"conditions": [{"type": "Accepted", "status": "False", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
    rejections = [Rejection(rejected, "spec.http[0].match[0].uri.regex", "invalid RE2 regex")]
    status = gateway_status(
        translated, proxies, FleetView(), DnsView("coredns", None), "ipvs", rejections, previous, _AT
    )
    assert {"observedGeneration", "conditions", "boundVirtualServices", "boundCount", "rejected", "proxies"} <= set(
        status
    )
    assert {"nodes", "lastNack"} <= set(status)
    types = {c["type"] for c in status["conditions"]}
    assert types == {
        "Accepted",
        "AddressResolved",
        "ShardsReady",
        "RedirectReady",
        "Programmed",
        "DNSProgrammed",
        "NodesProgrammed",
    }
    _assert_status_fits(status)
    # Kept from an earlier status: an unknown condition status or a second entry of one type would not be.
    for broken in ({"status": "Maybe"}, {"type": status["conditions"][1]["type"]}):
        bad = copy.deepcopy(status)
        bad["conditions"][0].update(broken)
        obj = ig()
        obj["status"] = bad
        assert admit(obj)[1]


# ------------------------------------------------------------------------------------- the validator itself


def test_the_validator_fails_loudly_on_what_it_does_not_implement():
    with pytest.raises(AssertionError, match="does not implement"):
        _check("x", {"type": "string", "x-kubernetes-int-or-string": True}, "f")
    with pytest.raises(AssertionError, match="does not implement format"):
        _check("x", {"type": "string", "format": "hostname"}, "f")


def test_the_validator_follows_kubernetes():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "default": {}, "properties": {"b": {"type": "integer", "default": 3}}},
            "s": {"type": "string", "pattern": "^x$"},
        },
    }
    value = {"a": None, "gone": 1}
    _prune(value, schema)
    _default(value, schema)
    assert value == {"a": {"b": 3}}  # null replaced by the default, nested defaults applied, unknown field pruned
    assert _check({"s": "x\n"}, schema, "") == [("s", "must match ^x$")]  # RE2's $, unlike Python's re
    assert _check({"s": 1}, schema, "") == [("s", "must be of type string")]
    assert _check(True, {"type": "integer"}, "") == [("", "must be of type integer")]
    one_of = {"type": "object", "properties": {"a": {"type": "string"}}, "oneOf": [{"required": ["a"]}, {}]}
    assert _check({"a": "x"}, one_of, "")  # both branches match
    assert not _check({}, one_of, "")
