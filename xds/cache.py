"""The snapshot cache: per node group, every resource serialized once and shared by all streams.

A resource's version is a hash of its serialized bytes, so equal content has equal versions in any process. The
desired state's tables are persistent maps whose unchanged entries are the very same objects from one state to
the next, so rebuilding a group after a change re-serializes only what changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from canal.xds import resources
from canal.xds.canal_redirect_pb2 import Backend
from canal.xds.canal_redirect_pb2 import RedirectRule as RedirectRuleProto
from canal.xds.types import CLUSTER, ENDPOINT, LISTENER, REDIRECT, ROUTE
from google.protobuf import any_pb2
from google.protobuf.message import Message

from canal.desired import (
    Cluster,
    ClusterLoadAssignment,
    EnvoyConfig,
    Listener,
    RedirectRule,
    RouteConfig,
    VirtualHost,
)
from canal.serialize import key_text


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    version: str
    body: any_pb2.Any
    references: frozenset[str] = frozenset()  # clusters a listener or route config sends traffic to
    size: int = 0


def type_version(items: Mapping[str, Resource] | list[Resource]) -> str:
    """The version of a set of resources: a hash of their names and versions (order-independent)."""
    values = items.values() if isinstance(items, Mapping) else items
    digest = hashlib.blake2b(digest_size=8)
    for resource in sorted(values, key=lambda r: r.name):
        digest.update(resource.name.encode())
        digest.update(resource.version.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """Everything one node group is told, at one point in time."""

    group: str
    serial: int
    changed_at: float  # monotonic time of the earliest desired-state change it contains (convergence metric)
    resources: Mapping[str, Mapping[str, Resource]] = field(default_factory=dict)
    _versions: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def of(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, {})

    def version(self, type_url: str) -> str:
        """The version of the full set of one type, computed once per snapshot."""
        found = self._versions.get(type_url)
        if found is None:
            found = self._versions[type_url] = type_version(self.of(type_url))
        return found


def _pack(type_url: str, message: Message, name: str, references: frozenset[str] = frozenset()) -> Resource:
    value = message.SerializeToString(deterministic=True)
    version = hashlib.blake2b(value, digest_size=10).hexdigest()
    return Resource(name, version, any_pb2.Any(type_url=type_url, value=value), references, len(value))


def _listener(value: Listener) -> Resource:
    refs = frozenset(c.cluster for c in value.tcp.clusters) if value.tcp is not None else frozenset()
    return _pack(LISTENER, resources.listener(value), value.name, refs)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class _BuiltVirtualHost:
    source: VirtualHost
    field: bytes  # the encoded `virtual_hosts` field: tag, length, serialized VirtualHost
    digest: bytes
    references: frozenset[str]


class _RouteConfigs:
    """RDS resources assembled from per-virtual-host bytes, so a change re-serializes only the hosts it touched.

    One route configuration holds the virtual hosts of every Service on a port (4,000+ hosts, 6 MB at 5,000
    Services): building and hashing it whole costs about 0.5 s per change. A serialized message is the concatenation
    of its encoded fields in field-number order, so the name (field 1), the virtual hosts (field 2, in name order)
    and the remaining settings (fields > 2) concatenated are byte for byte what SerializeToString(deterministic=True)
    gives. The version hashes the per-host digests instead of the whole 6 MB: still a pure function of the content.
    """

    _SETTINGS = resources.route_configuration_settings().SerializeToString(deterministic=True)

    def __init__(self) -> None:
        self._hosts: dict[str, dict[str, _BuiltVirtualHost]] = {}  # route config -> virtual host name -> built

    def build(self, value: RouteConfig) -> Resource:
        previous = self._hosts.get(value.name, {})
        hosts: dict[str, _BuiltVirtualHost] = {}
        for name, source in value.virtual_hosts.items():
            built = previous.get(name)
            if built is None or built.source is not source:
                body = resources.virtual_host(source).SerializeToString(deterministic=True)
                references = frozenset(c for route in source.routes for c in route.clusters)
                built = _BuiltVirtualHost(
                    source, _length_delimited(2, body), hashlib.blake2b(body, digest_size=16).digest(), references
                )
            hosts[name] = built
        self._hosts[value.name] = hosts
        ordered = [hosts[name] for name in sorted(hosts)]
        payload = b"".join([_length_delimited(1, value.name.encode()), *(h.field for h in ordered), self._SETTINGS])
        digest = hashlib.blake2b(self._SETTINGS, digest_size=10)
        digest.update(value.name.encode())
        for host in ordered:
            digest.update(host.digest)
        references = frozenset().union(*(h.references for h in ordered))
        return Resource(
            value.name, digest.hexdigest(), any_pb2.Any(type_url=ROUTE, value=payload), references, len(payload)
        )

    def forget(self, names: set[str]) -> None:
        """Drop the virtual hosts of route configurations that are gone."""
        for name in set(self._hosts) - names:
            del self._hosts[name]


def _cluster(value: Cluster) -> Resource:
    return _pack(CLUSTER, resources.cluster(value), value.name)


def _endpoints(value: ClusterLoadAssignment) -> Resource:
    return _pack(ENDPOINT, resources.load_assignment(value), value.cluster)


def redirect_rule(value: RedirectRule) -> RedirectRuleProto:
    return RedirectRuleProto(
        cluster_ip=value.key.cluster_ip,
        protocol=value.key.protocol,
        port=value.key.port,
        backends=[Backend(address=b.address, port=b.port) for b in value.backends],
        service=value.service,
        gateway=value.gateway,
        mode=value.mode,
    )


def _redirect(value: RedirectRule) -> Resource:
    return _pack(REDIRECT, redirect_rule(value), key_text(value.key))


class _Table:
    """Resources of one type for one group, rebuilt by identity: an unchanged source object keeps its Resource."""

    def __init__(self, build: Callable[[Any], Resource]) -> None:
        self.build = build
        self.sources: Mapping[Any, Any] = {}
        self.built: dict[str, tuple[Any, Resource]] = {}
        self.resources: dict[str, Resource] = {}

    def update(self, sources: Mapping[Any, Any], key: Callable[[Any], str] = str) -> bool:
        """Rebuild from `sources`; True when any resource was added, changed or removed."""
        if sources is self.sources:
            return False
        built: dict[str, tuple[Any, Resource]] = {}
        changed = len(sources) != len(self.built)
        for source_key, source in sources.items():
            name = key(source_key)
            previous = self.built.get(name)
            if previous is not None and previous[0] is source:
                built[name] = previous
                continue
            resource = self.build(source)
            changed = changed or previous is None or previous[1].version != resource.version
            built[name] = (source, resource)
        self.sources, self.built = sources, built
        if changed:
            self.resources = {name: resource for name, (_, resource) in built.items()}
        return changed


class SnapshotCache:
    """Node group -> current Snapshot; streams wait on `changed(group)` for the next one."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._tables: dict[str, dict[str, _Table]] = {}
        self._route_configs: dict[str, _RouteConfigs] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._serial = 0

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def changed(self, group: str) -> asyncio.Event:
        """An event set when the group's snapshot is replaced (a fresh event per snapshot)."""
        event = self._events.get(group)
        if event is None:
            event = self._events[group] = asyncio.Event()
        return event

    def set_envoy(self, group: str, config: EnvoyConfig, changed_at: float | None = None) -> Snapshot:
        tables = self._tables.get(group)
        if tables is None:
            route_configs = _RouteConfigs()
            tables = self._tables[group] = {
                LISTENER: _Table(_listener),
                ROUTE: _Table(route_configs.build),
                CLUSTER: _Table(_cluster),
                ENDPOINT: _Table(_endpoints),
            }
            self._route_configs[group] = route_configs
        changed = [
            tables[LISTENER].update(config.listeners),
            tables[ROUTE].update(config.route_configs),
            tables[CLUSTER].update(config.clusters),
            tables[ENDPOINT].update(config.endpoints),
        ]
        self._route_configs[group].forget(set(tables[ROUTE].resources))
        return self._store(group, tables, any(changed), changed_at)

    def set_redirects(self, group: str, rules: Mapping[Any, RedirectRule], changed_at: float | None = None) -> Snapshot:
        tables = self._tables.setdefault(group, {REDIRECT: _Table(_redirect)})
        return self._store(group, tables, tables[REDIRECT].update(rules, key_text), changed_at)

    def remove(self, group: str) -> None:
        """A group that no longer exists gets an empty snapshot (its Envoys are told to drop everything)."""
        if group in self._snapshots:
            self._tables.pop(group, None)
            self._route_configs.pop(group, None)
            self._store(group, {}, True, None)

    def _store(self, group: str, tables: Mapping[str, _Table], changed: bool, changed_at: float | None) -> Snapshot:
        previous = self._snapshots.get(group)
        if previous is not None and not changed:
            return previous  # nothing an Envoy can see changed
        self._serial += 1
        found = {type_url: table.resources for type_url, table in tables.items()}
        snapshot = Snapshot(group, self._serial, changed_at if changed_at is not None else time.monotonic(), found)
        self._snapshots[group] = snapshot
        event = self._events.pop(group, None)
        if event is not None:
            event.set()
        return snapshot
