"""The desired state: what every publisher (xDS, DNS, node agents, status writer) is told to make true.

Plain, immutable data with Envoy's semantics but not Envoy's protos, so translation stays pure and cheap; the xDS
builders turn it into protos. Mappings are persistent maps (immutables.Map, a HAMT): an incremental update shares
everything it did not change, so publishing a new state costs O(changes), not O(size). Their order carries no
meaning (renderers sort).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import immutables

from canal.model.base import Caveat, ObjectRef, Rejection
from canal.model.istio import (
    ConsistentHash,
    CorsPolicy,
    DirectResponse,
    Fault,
    HeaderOps,
    OutlierDetection,
    Redirect,
    TcpKeepalive,
)

EMPTY: Mapping[Any, Any] = immutables.Map()
_MISSING = object()


def frozen_map(data: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return immutables.Map(data) if data else EMPTY


class Table:
    """A dict for the translator to work in, plus its published persistent map, updated by delta."""

    __slots__ = ("changed", "data", "published")

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}
        self.published: immutables.Map = EMPTY
        self.changed: set[Any] = set()

    def __contains__(self, key: Any) -> bool:
        return key in self.data

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[key] = value
        self.changed.add(key)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: Any, default: Any = None) -> Any:
        return self.data.get(key, default)

    def pop(self, key: Any, default: Any = None) -> Any:
        if key in self.data:
            self.changed.add(key)
        return self.data.pop(key, default)

    def publish(self) -> immutables.Map:
        if self.changed:
            mutation = self.published.mutate()
            for key in self.changed:
                value = self.data.get(key, _MISSING)
                if value is _MISSING:
                    mutation.pop(key, None)
                else:
                    mutation[key] = value
            self.published = mutation.finish()
            self.changed.clear()
        return self.published


# ------------------------------------------------------------------------------------------------- Envoy


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str  # exact, prefix, regex
    value: str
    ignore_case: bool = False


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    name: str  # lower case; pseudo-headers (:method, :authority, :scheme) included
    kind: str  # exact, prefix, regex, present
    value: str = ""
    invert: bool = False


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    name: str
    kind: str  # exact, prefix, regex, present
    value: str = ""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch
    headers: tuple[HeaderMatcher, ...] = ()
    query: tuple[QueryMatcher, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterWeight:
    cluster: str
    weight: int
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    retry_on: tuple[str, ...]
    per_try_timeout_ms: int | None = None
    retriable_status_codes: tuple[int, ...] = ()
    backoff_ms: int | None = None
    retry_remote_localities: bool = False


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    percent: float


@dataclass(frozen=True, slots=True)
class HashPolicy:
    key: str  # header, cookie, source_ip, query
    name: str = ""
    cookie_path: str = ""
    cookie_ttl_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    clusters: tuple[ClusterWeight, ...]
    timeout_ms: int = 0  # 0 disables the route timeout, as Istio does by default
    retry: RetryPolicy | None = None
    prefix_rewrite: str | None = None  # replaces the matched prefix (the whole path for exact/regex matches)
    regex_rewrite: tuple[str, str] | None = None  # (RE2 pattern, substitution)
    host_rewrite: str = ""
    mirrors: tuple[MirrorPolicy, ...] = ()
    hash_policies: tuple[HashPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # <namespace>/<VirtualService>/<http index>/<match index>: where a route came from
    match: RouteMatch
    action: Forward | Redirect | DirectResponse
    fault: Fault | None = None
    cors: CorsPolicy | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()

    @property
    def clusters(self) -> tuple[str, ...]:
        if not isinstance(self.action, Forward):
            return ()
        return tuple(c.cluster for c in self.action.clusters) + tuple(m.cluster for m in self.action.mirrors)


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: Mapping[str, VirtualHost] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True, slots=True)
class TcpProxy:
    clusters: tuple[ClusterWeight, ...]
    source: str  # the VirtualService tcp route it came from


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str  # HTTP or TCP
    route_config: str = ""
    http_filters: tuple[str, ...] = ()  # only what some route needs ("fault", "cors"); the router is implied
    tcp: TcpProxy | None = None


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    service: str  # namespace/name
    fqdn: str
    port: int
    subset: str
    lb_policy: str  # ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV
    connect_timeout_ms: int
    circuit_breakers: CircuitBreakers
    http2: bool = False
    consistent_hash: ConsistentHash | None = None
    outlier_detection: OutlierDetection | None = None
    idle_timeout_ms: int | None = None
    max_requests_per_connection: int | None = None
    max_connection_duration_ms: int | None = None
    max_concurrent_streams: int | None = None
    tcp_keepalive: TcpKeepalive | None = None
    warmup_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    node_name: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class ClusterLoadAssignment:
    cluster: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class EnvoyConfig:
    """Everything one group of gateway Envoys (one InternalGateway) is told over xDS."""

    listeners: Mapping[str, Listener] = field(default_factory=lambda: EMPTY)
    route_configs: Mapping[str, RouteConfig] = field(default_factory=lambda: EMPTY)
    clusters: Mapping[str, Cluster] = field(default_factory=lambda: EMPTY)
    endpoints: Mapping[str, ClusterLoadAssignment] = field(default_factory=lambda: EMPTY)


# ---------------------------------------------------------------------------------------- DNS, redirects


@dataclass(frozen=True, slots=True)
class DnsRecord:
    fqdn: str  # lower case, no trailing dot
    addresses: tuple[str, ...]  # IPv4 and IPv6 gateway addresses, sorted
    ttl: int
    gateway: str  # the InternalGateway (namespace/name) that owns the name
    mode: str  # coredns or server
    # the gateway Service's FQDN (address.serviceRef; sharded, the Service of the record's shard); "" with address.ips
    target: str = ""


@dataclass(frozen=True, slots=True, order=True)
class RedirectKey:
    cluster_ip: str
    protocol: str  # tcp
    port: int


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class RedirectRule:
    key: RedirectKey
    backends: tuple[Backend, ...]  # gateway pods, sorted: on the same port, or sharded, the shard listener port
    service: str  # namespace/name of the migrated Service
    gateway: str
    mode: str  # nftables or ipvs


# --------------------------------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" or "False"
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    ref: ObjectRef
    generation: int
    conditions: tuple[Condition, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    caveats: tuple[Caveat, ...] = ()
    bound: frozenset[str] = frozenset()  # VirtualService: InternalGateways; InternalGateway: VirtualServices
    # InternalGateway: the VirtualServices naming its Gateway that have problems (details in their own status)
    rejected: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DesiredState:
    envoy: Mapping[str, EnvoyConfig] = field(default_factory=lambda: EMPTY)  # by InternalGateway (xDS node group)
    dns: Mapping[str, DnsRecord] = field(default_factory=lambda: EMPTY)  # by FQDN
    redirects: Mapping[RedirectKey, RedirectRule] = field(default_factory=lambda: EMPTY)
    status: Mapping[ObjectRef, ObjectStatus] = field(default_factory=lambda: EMPTY)

    def rejections(self) -> list[Rejection]:
        return sorted({r for s in self.status.values() for r in s.rejections})
