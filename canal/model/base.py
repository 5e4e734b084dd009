"""Object identity, errors as values, and the path-tracking reader every parser uses.

Parsers never raise past the object boundary: a broken field becomes a `Rejection` naming the object and the
field path (`spec.http[0].match[1].uri.regex`), so one bad object never hides the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"[-+]?\d+")
API_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
UINT32_MAX = 2**32 - 1


class ObjectRef(NamedTuple):
    """Kind plus namespace/name: how every message and status entry names an object.

    A NamedTuple rather than a dataclass: it is the most used key in the translator, and tuple hashing and
    comparison run in C.
    """

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True, order=True)
class Rejection:
    """A problem that keeps (part of) an object out of the desired state."""

    ref: ObjectRef
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.field or '<object>'}: {self.reason}"


@dataclass(frozen=True, slots=True, order=True)
class Caveat:
    """A problem worth telling the user that changes nothing they asked for (or only ignores a no-op)."""

    ref: ObjectRef
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.field or '<object>'}: {self.message}"


@dataclass(frozen=True, slots=True)
class Meta:
    """The metadata translation needs; `order` makes "the oldest wins" deterministic without a clock."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict, compare=True)
    generation: int = 0
    creation: str = ""  # RFC 3339 timestamp as written by the API server; "" sorts first (file objects)
    uid: str = ""
    # Every write bumps it, status writes included; equality ignores it so those are not changes.
    resource_version: str = field(default="", compare=False)

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.creation, self.namespace, self.name)


class FieldError(Exception):
    """Raised inside a parser; caught at the object (or list item) boundary and turned into a Rejection."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def describe(value: object) -> str:
    """The YAML-ish type name of a value, for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__


class Issues:
    """Collects the errors and caveats of one object while it is parsed."""

    __slots__ = ("caveats", "errors")

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.caveats: list[tuple[str, str]] = []

    def each(self, items: list[tuple[str, Any]], parse: Callable[[str, Any], T]) -> list[T]:
        """Parse every item, recording each failure, so one object reports all of its broken list entries."""
        out: list[T] = []
        for path, raw in items:
            try:
                out.append(parse(path, raw))
            except FieldError as err:
                self.errors.append(err)
        return out

    def rejections(self, ref: ObjectRef) -> tuple[Rejection, ...]:
        return tuple(Rejection(ref, e.path, e.reason) for e in self.errors)

    def caveat_values(self, ref: ObjectRef) -> tuple[Caveat, ...]:
        return tuple(Caveat(ref, path, message) for path, message in self.caveats)


class Node:
    """A mapping being read at a known path; remembers which keys were read so unknown ones can be reported."""

    __slots__ = ("data", "issues", "path", "seen")

    def __init__(self, data: Any, path: str, issues: Issues) -> None:
        if not isinstance(data, Mapping):
            raise FieldError(path or "<object>", f"must be a mapping, not {describe(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.issues = issues
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def fail(self, key: str, reason: str) -> FieldError:
        return FieldError(self.at(key), reason)

    def str(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self.raw(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {describe(value)}")
        if required and not value:
            raise self.fail(key, "must not be empty")
        return value

    def int(self, key: str, *, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        # Protobuf JSON (and so Istio) accepts 64-bit integers as strings too.
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {describe(value)}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be at most {hi}, got {value}")
        return value

    def number(self, key: str, *, lo: float, hi: float) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.fail(key, f"must be a number, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {describe(value)}")
        if math.isnan(value) or not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo:g} and {hi:g}, got {value:g}")
        return float(value)

    def bool(self, key: str, *, default: bool = False) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {describe(value)}")
        return value

    def enum(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        """Istio enums are upper-case in the API; accept any case as the Istio validator does."""
        value = self.str(key, default=default)
        upper = value.upper()
        if upper not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return upper

    def node(self, key: str) -> Node | None:
        value = self.raw(key)
        if value is None:
            return None
        return Node(value, self.at(key), self.issues)

    def node_or_empty(self, key: str) -> Node:
        return self.node(key) or Node({}, self.at(key), self.issues)

    def items(self, key: str) -> list[tuple[str, Any]]:
        """List entries with their paths; a missing list is empty."""
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self.fail(key, f"must be a list, not {describe(value)}")
        base = self.at(key)
        return [(f"{base}[{i}]", v) for i, v in enumerate(value)]

    def nodes(self, key: str) -> Iterator[Node]:
        for path, raw in self.items(key):
            yield Node(raw, path, self.issues)

    def str_list(self, key: str) -> tuple[str, ...]:
        out = []
        for path, value in self.items(key):
            if not isinstance(value, str):
                raise FieldError(path, f"must be a string, not {describe(value)}")
            out.append(value)
        return tuple(out)

    def str_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping, not {describe(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, not {describe(k)}")
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise FieldError(f"{self.at(key)}.{k}", f"must be a string, not {describe(v)}")
            out[k] = v if isinstance(v, str) else str(v)  # YAML numbers, as kubectl users write them
        return out

    def done(self, *, ignored: tuple[str, ...] = ()) -> None:
        """Report keys nobody read: a typo such as `rewite` must not vanish silently."""
        for key in self.data:
            if key not in self.seen and key not in ignored:
                self.issues.caveats.append((self.at(str(key)), "unknown field, ignored"))

    def unsupported(self, key: str, why: str) -> None:
        """A known field Canal does not act on: say so instead of pretending."""
        if self.raw(key) is not None:
            self.issues.caveats.append((self.at(key), f"not supported by Canal and ignored: {why}"))


def parse_meta(obj: Mapping[str, Any], issues: Issues, *, namespaced: bool = True) -> Meta:
    node = Node(obj.get("metadata") or {}, "metadata", issues)
    name = node.str("name", required=True)
    namespace = node.str("namespace", default="default") if namespaced else ""
    labels = node.str_map("labels")
    generation = node.int("generation", default=0, lo=0) or 0
    creation = _timestamp(node, "creationTimestamp")
    return Meta(
        name=name,
        namespace=namespace,
        labels=labels,
        generation=generation,
        creation=creation,
        uid=node.str("uid"),
        resource_version=str(node.raw("resourceVersion") or ""),
    )


def _timestamp(node: Node, key: str) -> str:
    """RFC 3339 in UTC with microseconds, so that comparing the text compares the instants ("" sorts first)."""
    value = node.raw(key)
    if value is None:
        return ""
    if isinstance(value, str) and API_TIMESTAMP.fullmatch(value):
        return value[:-1] + ".000000Z"  # the API server's own format: already UTC, whole seconds
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise node.fail(key, f"is not an RFC 3339 timestamp: {value!r}") from None
    if not isinstance(value, datetime):  # a YAML 1.1 loader may already have made it a datetime
        raise node.fail(key, f"must be an RFC 3339 timestamp, not {describe(value)}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
