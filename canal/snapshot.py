"""An immutable view of every object translation reads, built from Kubernetes-style dicts.

Objects are parsed once, at the edge. An object of a known kind that does not parse is kept out of the view
and remembered as a rejection; unknown kinds are ignored. Updates copy only the touched namespace's table,
so a change costs the same with ten objects or a hundred thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from canal.heap import paused_gc
from canal.model.base import Caveat, FieldError, Issues, ObjectRef, Rejection
from canal.model.internal_gateway import GROUP as CANAL_GROUP
from canal.model.internal_gateway import parse_internal_gateway
from canal.model.istio import parse_destination_rule, parse_gateway, parse_virtual_service
from canal.model.kube import parse_endpoint_slice, parse_namespace, parse_pod, parse_service

log = logging.getLogger(__name__)

ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSIONS = ("v1", "v1beta1", "v1alpha3")


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    group: str
    versions: tuple[str, ...]
    parse: Callable[[Mapping[str, Any], Issues], Any]
    namespaced: bool = True


KINDS: tuple[Kind, ...] = (
    Kind("InternalGateway", CANAL_GROUP, ("v1alpha1",), parse_internal_gateway),
    Kind("Gateway", ISTIO_GROUP, ISTIO_VERSIONS, parse_gateway),
    Kind("VirtualService", ISTIO_GROUP, ISTIO_VERSIONS, parse_virtual_service),
    Kind("DestinationRule", ISTIO_GROUP, ISTIO_VERSIONS, parse_destination_rule),
    Kind("Service", "", ("v1",), parse_service),
    Kind("EndpointSlice", "discovery.k8s.io", ("v1", "v1beta1"), parse_endpoint_slice),
    Kind("Pod", "", ("v1",), parse_pod),
    Kind("Namespace", "", ("v1",), parse_namespace, namespaced=False),
)
_BY_GROUP_KIND = {(k.group, k.name): k for k in KINDS}
KIND_NAMES = tuple(k.name for k in KINDS)


@dataclass(frozen=True, slots=True)
class Problems:
    """What went wrong parsing one object; `gateways` keeps a rejected VirtualService findable by its gateway."""

    generation: int
    rejections: tuple[Rejection, ...] = ()
    caveats: tuple[Caveat, ...] = ()
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Parsed:
    ref: ObjectRef
    obj: Any | None  # the model object, or None when rejected
    problems: Problems | None


def _kind_of(raw: Mapping[str, Any]) -> Kind | None:
    api_version, kind = raw.get("apiVersion"), raw.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    group, _, version = api_version.rpartition("/")
    spec = _BY_GROUP_KIND.get((group, kind))
    if spec is None:
        log.debug("ignoring %s %s: not a kind Canal reads", api_version, kind)
        return None
    if version not in spec.versions:
        log.debug("ignoring %s %s: version not supported", api_version, kind)
        return None
    return spec


def _ref_of(kind: Kind, raw: Mapping[str, Any]) -> ObjectRef:
    meta = raw.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    namespace = meta.get("namespace") or "default"
    return ObjectRef(
        kind.name,
        str(namespace) if kind.namespaced else "",
        name if isinstance(name, str) and name else "<unnamed>",
    )


def ref_of(raw: Any) -> ObjectRef | None:
    """Which object a document is, without parsing it; None for kinds Canal does not read."""
    if not isinstance(raw, Mapping):
        return None
    kind = _kind_of(raw)
    return _ref_of(kind, raw) if kind is not None else None


def parse_object(raw: Any) -> Parsed | None:
    """Parse one dict; None for kinds Canal does not read."""
    if not isinstance(raw, Mapping):
        return None
    kind = _kind_of(raw)
    if kind is None:
        return None
    ref = _ref_of(kind, raw)
    issues = Issues()
    obj = None
    try:
        obj = kind.parse(raw, issues)
    except FieldError as err:
        issues.errors.append(err)
    except (
        TypeError,
        ValueError,
        AttributeError,
    ) as err:  # defence in depth: never a traceback for bad input
        issues.errors.append(FieldError("<object>", f"cannot be parsed: {err}"))
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), Mapping) else {}
    generation = meta.get("generation") if isinstance(meta.get("generation"), int) else 0
    if issues.errors:
        spec = raw.get("spec") if isinstance(raw.get("spec"), Mapping) else {}
        gateways = spec.get("gateways") if kind.name == "VirtualService" else None
        gateways = tuple(g for g in gateways if isinstance(g, str)) if isinstance(gateways, list) else ()
        problems = Problems(generation, issues.rejections(ref), issues.caveat_values(ref), gateways)
        return Parsed(ref, None, problems)
    problems = Problems(generation, (), issues.caveat_values(ref)) if issues.caveats else None
    return Parsed(ref, obj, problems)


@dataclass(frozen=True, slots=True)
class Change:
    """One object before and after an update (None when absent)."""

    ref: ObjectRef
    old: Any | None
    new: Any | None


Table = Mapping[str, Mapping[str, Mapping[str, Any]]]  # kind -> namespace -> name -> object


@dataclass(frozen=True)
class Snapshot:
    objects: Table = field(default_factory=dict)
    problems: Mapping[ObjectRef, Problems] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------- reads

    def get(self, kind: str, namespace: str, name: str) -> Any | None:
        try:  # the hottest read in translation; most lookups hit
            return self.objects[kind][namespace][name]
        except KeyError:
            return None

    def in_namespace(self, kind: str, namespace: str) -> Mapping[str, Any]:
        return self.objects.get(kind, {}).get(namespace, {})

    def all(self, kind: str) -> Iterator[Any]:
        for names in self.objects.get(kind, {}).values():
            yield from names.values()

    def count(self, kind: str | None = None) -> int:
        kinds = [kind] if kind else list(self.objects)
        return sum(len(names) for k in kinds for names in self.objects.get(k, {}).values())

    # ----------------------------------------------------------------------------------------- updates

    @classmethod
    def from_dicts(cls, raws: Iterable[Any]) -> Snapshot:
        """Build from documents (e.g. YAML files); a second definition of the same object is a rejection."""
        with paused_gc():
            return cls._from_dicts(raws)

    @classmethod
    def _from_dicts(cls, raws: Iterable[Any]) -> Snapshot:
        parsed: list[Parsed] = []
        seen: set[ObjectRef] = set()
        duplicates: dict[ObjectRef, Problems] = {}
        for raw in _flatten(raws):
            item = parse_object(raw)
            if item is None:
                continue
            if item.ref in seen:
                duplicates[item.ref] = Problems(
                    0,
                    (Rejection(item.ref, "metadata.name", "defined more than once; the first definition is used"),),
                )
                continue
            seen.add(item.ref)
            parsed.append(item)
        snapshot, _ = cls().apply(parsed)
        if duplicates:
            problems = dict(snapshot.problems)
            for ref, dup in duplicates.items():
                old = problems.get(ref)
                problems[ref] = (
                    Problems(old.generation, old.rejections + dup.rejections, old.caveats, old.gateways) if old else dup
                )
            snapshot = Snapshot(snapshot.objects, problems)
        return snapshot

    def apply(self, items: Iterable[Parsed | ObjectRef]) -> tuple[Snapshot, list[Change]]:
        """Upsert parsed objects and delete refs; returns the new snapshot and what changed."""
        objects: dict[str, dict[str, dict[str, Any]]] = dict(self.objects)  # type: ignore[arg-type]
        problems = dict(self.problems)
        copied_kinds: set[str] = set()
        copied_namespaces: set[tuple[str, str]] = set()
        changes: dict[ObjectRef, Change] = {}
        for item in items:
            ref = item if isinstance(item, ObjectRef) else item.ref
            new = None if isinstance(item, ObjectRef) else item.obj
            new_problems = None if isinstance(item, ObjectRef) else item.problems
            if ref not in changes and self.problems.get(ref) == new_problems and self.get(*ref) == new:
                # Nothing the translator reads changed (a status write, a resync's re-delivery, a Pod's probe
                # time): no change, so nothing is recomputed and an isolated edit that follows is not held back.
                continue
            if ref.kind not in copied_kinds:
                objects[ref.kind] = dict(objects.get(ref.kind, {}))
                copied_kinds.add(ref.kind)
            kind_table = objects[ref.kind]
            if (ref.kind, ref.namespace) not in copied_namespaces:
                kind_table[ref.namespace] = dict(kind_table.get(ref.namespace, {}))
                copied_namespaces.add((ref.kind, ref.namespace))
            names = kind_table.setdefault(ref.namespace, {})
            old = names.get(ref.name)
            if new is None:
                names.pop(ref.name, None)
            else:
                names[ref.name] = new
            if not names:
                del kind_table[ref.namespace]
            if new_problems is None:
                problems.pop(ref, None)
            else:
                problems[ref] = new_problems
            first = changes.get(ref)
            changes[ref] = Change(ref, first.old if first else old, new)
        # Problems-only changes (an object rejected again) are reported too: status must follow them.
        return Snapshot(objects, problems), list(changes.values())


def _flatten(raws: Iterable[Any]) -> Iterator[Any]:
    """Expand `kind: List` documents (kubectl get -o yaml) into their items."""
    for raw in raws:
        if isinstance(raw, Mapping) and raw.get("kind") == "List" and isinstance(raw.get("items"), list):
            yield from _flatten(raw["items"])
        elif raw is not None:
            yield raw
