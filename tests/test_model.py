"""Parsing at the edge: defaults, API versions, unknown fields, duplicates, List documents, and the syntax of
names, addresses and labels (checked as Kubernetes checks them, so a file cannot hold what a cluster refuses)."""

from __future__ import annotations

import pytest

from canal.model.base import ObjectRef
from canal.snapshot import Snapshot, parse_object
from tests.builders import endpoint_slice, internal_gateway, pod, service, virtual_service


def test_internal_gateway_defaults_follow_the_design():
    raw = {
        "apiVersion": "canal.io/v1alpha1",
        "kind": "InternalGateway",
        "metadata": {"name": "canal", "namespace": "mesh"},
        "spec": {"gatewayRef": {"name": "gw"}, "address": {"ips": ["10.96.0.50"]}},
    }
    ig = parse_object(raw).obj
    assert (ig.gateway.namespace, ig.gateway.name) == ("mesh", "gw")  # gateway namespace defaults to its own
    assert ig.cluster_domain == "cluster.local"
    assert (ig.dns_mode, ig.dns_ttl, ig.redirect_mode) == ("coredns", 5, "nftables")
    assert ig.namespace_selector is None  # absent selects nothing; {} would select everything
    assert ig.key == "mesh/canal"


def test_address_is_required_unless_dns_is_off():
    no_address = internal_gateway()
    del no_address["spec"]["address"]
    parsed = parse_object(no_address)
    assert parsed.obj is None
    assert [(r.field, r.reason.split(":")[0]) for r in parsed.problems.rejections] == [
        ("spec.address", "is required when dns.mode is coredns")
    ]
    no_address["spec"]["dns"] = {"mode": "none"}
    assert parse_object(no_address).obj is not None


def test_unknown_fields_are_caveats_not_silence():
    vs = virtual_service("web", http=[{"route": [{"destination": {"host": "web"}}], "rewite": {"uri": "/"}}])
    parsed = parse_object(vs)
    assert parsed.obj is not None
    assert [(c.field, c.message) for c in parsed.problems.caveats] == [
        ("spec.http[0].rewite", "unknown field, ignored")
    ]


def test_one_object_reports_all_of_its_broken_routes():
    vs = virtual_service(
        "web",
        http=[
            {"route": [{"destination": {"host": "web"}}], "timeout": "soon"},
            {"route": [{"destination": {"host": "web"}}]},
            {"match": [{"uri": {"exact": "/a", "prefix": "/a"}}], "route": [{"destination": {"host": "web"}}]},
        ],
    )
    fields = [r.field for r in parse_object(vs).problems.rejections]
    assert fields == ["spec.http[0].timeout", "spec.http[2].match[0].uri"]


def test_unknown_kinds_are_ignored_and_lists_are_flattened():
    docs = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
        {"apiVersion": "v1", "kind": "List", "items": [service("a"), service("b")]},
        {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "s"}},
    ]
    snapshot = Snapshot.from_dicts(docs)
    assert snapshot.count() == 2 and snapshot.get("Service", "default", "b") is not None


def test_second_definition_of_an_object_is_rejected():
    snapshot = Snapshot.from_dicts([service("a", ip="10.96.0.1"), service("a", ip="10.96.0.2")])
    assert snapshot.get("Service", "default", "a").cluster_ips == ("10.96.0.1",)
    (rejection,) = snapshot.problems[ObjectRef("Service", "default", "a")].rejections
    assert rejection.reason.startswith("defined more than once")


def test_timestamps_stay_strings_when_read_from_yaml(tmp_path):
    from canal.files import load_documents

    path = tmp_path / "svc.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a, creationTimestamp: 2024-01-01T00:00:00Z}\n")
    (doc,) = load_documents([str(path)])
    assert doc.data["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"


# ------------------------------------------------------------------------------------ names, addresses, labels


def _rejections(obj: dict) -> list[tuple[str, str]]:
    parsed = parse_object(obj)
    return [(r.field, r.reason) for r in parsed.problems.rejections] if parsed.problems else []


def _slice(address_type: str, *addresses: str) -> dict:
    obj = endpoint_slice("web", endpoints=[(a, "web-0") for a in addresses])
    obj["addressType"] = address_type
    return obj


_ZONE = "must not have an IPv6 zone ('%eth0')"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (internal_gateway(ips=["fd00::50", "fe80::1%eth0"]), "spec.address.ips[1]"),
        (service("web", ip="fe80::1%eth0"), "spec.clusterIP"),
        (service("web", ip=["10.96.0.1", "fd00::1%eth0"]), "spec.clusterIPs[1]"),
        (_slice("IPv6", "fd00::2", "fe80::2%eth0"), "endpoints[1].addresses[0]"),
        (pod("web-0", ip=["10.244.0.1", "fe80::3%eth0"]), "status.podIPs"),
    ],
    ids=["internal-gateway", "service-cluster-ip", "service-cluster-ips", "endpoint-slice", "pod"],
)
def test_ipv6_zones_are_rejected_wherever_addresses_are_parsed(obj, field):
    """Python's ipaddress accepts "fe80::1%eth0"; Kubernetes does not, and a zone means nothing cluster-wide."""
    ((path, reason),) = _rejections(obj)
    assert path == field
    assert reason.startswith(_ZONE) and reason.endswith("%eth0'")


def test_an_endpoint_slice_holds_addresses_of_its_own_family():
    assert _rejections(_slice("IPv4", "10.244.0.1", "fd00::1")) == [
        ("endpoints[1].addresses[0]", "is not an IPv4 address, as the slice's addressType requires: 'fd00::1'")
    ]
    assert _rejections(_slice("IPv6", "10.244.0.1")) == [
        ("endpoints[0].addresses[0]", "is not an IPv6 address, as the slice's addressType requires: '10.244.0.1'")
    ]
    parsed = parse_object(_slice("IPv6", "fd00:0::1"))
    assert parsed.problems is None and parsed.obj.endpoints[0].addresses == ("fd00::1",)
    assert parse_object(_slice("FQDN", "web.example.com")).problems is None  # FQDN slices are not IPs


def _ig_with(**spec: object) -> dict:
    obj = internal_gateway()
    obj["spec"].update(spec)
    return obj


@pytest.mark.parametrize(
    ("spec", "field", "rule"),
    [
        ({"address": {"serviceRef": {"name": "canal.gateway"}}}, "spec.address.serviceRef.name", "Service"),
        ({"address": {"serviceRef": {"name": "1-gateway"}}}, "spec.address.serviceRef.name", "Service"),
        ({"address": {"serviceRef": {"name": "g" * 64}}}, "spec.address.serviceRef.name", "Service"),
        (
            {"address": {"serviceRef": {"name": "gw", "namespace": "a.b"}}},
            "spec.address.serviceRef.namespace",
            "namespace",
        ),
        ({"gatewayRef": {"name": "Canal"}}, "spec.gatewayRef.name", "Gateway"),
        ({"gatewayRef": {"name": "canal", "namespace": "a.b"}}, "spec.gatewayRef.namespace", "namespace"),
    ],
    ids=[
        "service-dotted",
        "service-digit-first",
        "service-64",
        "service-namespace",
        "gateway-upper",
        "gateway-namespace",
    ],
)
def test_references_follow_the_name_rule_of_the_kind_they_name(spec, field, rule):
    assert [(path, reason.split(" (")[0]) for path, reason in _rejections(_ig_with(**spec))] == [
        (field, f"is not a valid {rule} name")
    ]


def test_names_each_kind_allows():
    """Gateways are custom resources (DNS subdomains); namespaces are RFC 1123 labels, so may start with a digit."""
    obj = _ig_with(gatewayRef={"name": "canal.v2", "namespace": "0-mesh"}, address={"serviceRef": {"name": "g" * 63}})
    ig = parse_object(obj).obj
    assert (ig.gateway.namespace, ig.gateway.name, ig.address_service.name) == ("0-mesh", "canal.v2", "g" * 63)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("/app", "the prefix before '/' must not be empty"),
        ("example.com/", "the name after the prefix must not be empty"),
        ("a/b/c", "has more than one '/'"),
        ("Example.com/app", "the prefix before '/' must be a lower-case DNS subdomain"),
        (("p" * 50 + ".") * 5 + "pppp/app", "of at most 253 characters"),
        ("a" * 64, "the name must be at most 63 characters"),
        ("-app", "the name must be"),
        ("app_", "the name must be"),
    ],
)
def test_label_keys_follow_kubernetes_qualified_names(key, problem):
    ((path, reason),) = _rejections(_ig_with(workloadSelector={key: "x"}))
    assert path == "spec.workloadSelector"  # a map's key is not a field of its own
    assert reason.startswith(f"is not a valid label key: {key!r}: ") and problem in reason


def test_label_keys_and_values_at_their_limits_are_accepted():
    prefix = ("p" * 50 + ".") * 4 + "p" * 49  # 253 characters
    labels = {f"{prefix}/{'n' * 63}": "v" * 63, "A.b-c_D": "", "x": "V.1_a-Z"}
    assert _rejections(_ig_with(workloadSelector=labels)) == []


def _expression(**expression: object) -> dict:
    return _ig_with(namespaceSelector={"matchExpressions": [{"key": "env", **expression}]})


@pytest.mark.parametrize(
    ("expression", "field", "reason"),
    [
        ({"operator": "In"}, "values", "must not be empty for operator In"),
        ({"operator": "NotIn", "values": []}, "values", "must not be empty for operator NotIn"),
        ({"operator": "Exists", "values": ["a"]}, "values", "must be empty for operator Exists"),
        ({"operator": "DoesNotExist", "values": ["a"]}, "values", "must be empty for operator DoesNotExist"),
        ({"operator": "Gt", "values": ["1"]}, "operator", "must be In, NotIn, Exists or DoesNotExist, got 'Gt'"),
        ({"operator": "in", "values": ["a"]}, "operator", "must be In, NotIn, Exists or DoesNotExist, got 'in'"),
        ({"operator": "In", "values": ["ok", "not ok"]}, "values[1]", "is not a valid label value: 'not ok'"),
        ({"operator": "NotIn", "values": ["v" * 64]}, "values[0]", "is not a valid label value"),
        ({"operator": "In", "values": ["a", 5]}, "values[1]", "must be a string, not a number"),
        ({"key": "/env", "operator": "Exists"}, "key", "the prefix before '/' must not be empty"),
    ],
)
def test_match_expressions_are_checked_like_kubernetes_label_selectors(expression, field, reason):
    ((path, got),) = _rejections(_expression(**expression))
    assert path == f"spec.namespaceSelector.matchExpressions[0].{field}"
    assert reason in got


def test_match_expression_values_may_be_empty_strings():
    ig = parse_object(_expression(operator="In", values=["prod", ""])).obj
    assert ig.namespace_selector.matches({"env": ""}) and ig.namespace_selector.matches({"env": "prod"})


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("cluster.local..", "may end with one dot, not more: 'cluster.local..'"),
        ("c" * 64 + ".local", "label '" + "c" * 64 + "' is longer than 63 characters"),
    ],
)
def test_cluster_domain_is_a_dns_name(domain, reason):
    ((path, got),) = _rejections(_ig_with(clusterDomain=domain))
    assert path == "spec.clusterDomain" and reason in got
    assert parse_object(_ig_with(clusterDomain="c" * 63 + ".local.")).obj.cluster_domain == "c" * 63 + ".local"


def test_service_names_are_dns_labels():
    """A dotted Service name would make <name>.<namespace> look like another Service's qualified name."""
    ((path, reason),) = _rejections(service("hello.world"))
    assert path == "metadata.name" and reason.startswith("is not a valid Service name (an RFC 1035 DNS label")
    ((path, reason),) = _rejections(service("web", ns="Team"))
    assert path == "metadata.namespace" and reason.startswith("is not a valid namespace name")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.2", "10.96.0.1"]}, "must start with spec.clusterIP"),
        ({"clusterIPs": ["10.96.0.1", "10.96.0.2"]}, "may hold one address per IP family"),
        ({"clusterIPs": ["10.96.0.1", "fd00::1", "fd00::2"]}, "may hold one address per IP family"),
        ({"clusterIPs": ["None", "10.96.0.1"]}, "'None' (headless) must be the first and only value"),
        ({"clusterIP": "None", "clusterIPs": ["10.96.0.1"]}, "disagrees with spec.clusterIP 'None'"),
    ],
)
def test_cluster_ips_are_checked_as_the_api_server_does(spec, reason):
    obj = service("web", ip=None)
    obj["spec"].update(spec)
    ((path, got),) = _rejections(obj)
    assert path == "spec.clusterIPs" and reason in got


@pytest.mark.parametrize(
    ("spec", "ips"),
    [
        ({"clusterIP": "10.96.0.1"}, ("10.96.0.1",)),
        ({"clusterIPs": ["fd00:0::1", "10.96.0.1"]}, ("fd00::1", "10.96.0.1")),
        ({"clusterIP": "fd00::1", "clusterIPs": ["fd00:0::1", "10.96.0.1"]}, ("fd00::1", "10.96.0.1")),
        ({"clusterIP": "None"}, ()),
        ({"clusterIPs": ["None"]}, ()),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, ()),
    ],
)
def test_cluster_ips_either_field_may_be_left_out(spec, ips):
    obj = service("web", ip=None)
    obj["spec"].update(spec)
    assert parse_object(obj).obj.cluster_ips == ips
