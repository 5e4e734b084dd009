"""The inputs a VirtualService is compiled against, and the piece of configuration it contributes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from canal.desired import EMPTY, Forward, Route, TcpProxy
from canal.model.base import Caveat, ObjectRef, Rejection
from canal.model.internal_gateway import NamespacedName
from canal.model.istio import DestinationRule, Server
from canal.model.kube import Service


@dataclass(frozen=True, slots=True)
class GatewayScope:
    """What a VirtualService needs to know about the InternalGateway it binds to."""

    key: str  # InternalGateway namespace/name: the xDS node group
    namespace: str  # the InternalGateway's namespace: first place to look for DestinationRules
    gateway: NamespacedName
    domain: str
    servers: tuple[Server, ...]  # only the servers Canal serves (HTTP family and TCP)
    port_kinds: Mapping[int, str] = field(default_factory=lambda: EMPTY)  # port -> "http" or "tcp"
    exclude: frozenset[str] = frozenset()  # Service keys never migrated (the gateway's own Service)


class Lookup(Protocol):
    """Reads of other objects; the engine records each read so a change re-runs only its readers."""

    def service(self, namespace: str, name: str) -> Service | None: ...

    def destination_rule(self, service: Service, scope: GatewayScope) -> DestinationRule | None: ...


@dataclass(frozen=True, slots=True)
class VhostPart:
    vkey: str  # the Service FQDN, a literal host, or "*"
    service: Service | None  # set when the host is a Service: its domains come from it
    routes: tuple[Route, ...]
    summary: RoutesSummary


@dataclass(frozen=True, slots=True)
class RoutesSummary:
    """What assembly needs to know about a list of routes, computed once where the list is built."""

    clusters: frozenset[str]
    fault: bool
    cors: bool

    @classmethod
    def of(cls, routes: tuple[Route, ...]) -> RoutesSummary:
        clusters: set[str] = set()
        fault = cors = False
        seen: set[int] = set()  # the routes of one match list share their action
        for route in routes:
            fault = fault or route.fault is not None
            cors = cors or route.cors is not None
            action = route.action
            if id(action) in seen or not isinstance(action, Forward):
                continue
            seen.add(id(action))
            clusters.update(c.cluster for c in action.clusters)
            clusters.update(m.cluster for m in action.mirrors)
        return cls(frozenset(clusters), fault, cors)

    def __or__(self, other: RoutesSummary) -> RoutesSummary:
        return RoutesSummary(self.clusters | other.clusters, self.fault or other.fault, self.cors or other.cors)


@dataclass(frozen=True, slots=True)
class TcpPart:
    index: int  # position among this source's tcp routes: the first matching one wins
    proxy: TcpProxy
    services: frozenset[str]  # FQDNs of migrated Services this listener port serves
    path: str  # field path for conflict reports


@dataclass(frozen=True, slots=True)
class Contribution:
    """One source's share of one InternalGateway's config: an explicit VirtualService or a default route."""

    ref: ObjectRef
    order: tuple[int, str, str, str]  # explicit sources first (0), then namespace defaults (1); oldest first
    vhosts: Mapping[tuple[int, str], VhostPart] = field(default_factory=lambda: EMPTY)
    tcp: Mapping[int, TcpPart] = field(default_factory=lambda: EMPTY)
    migrates: Mapping[str, Service] = field(default_factory=lambda: EMPTY)  # FQDN -> Service moved behind the gateway
    wildcard_migrates: frozenset[str] = frozenset()  # migrated via hosts ["*"]: served by the * vhost
    rejections: tuple[Rejection, ...] = ()
    caveats: tuple[Caveat, ...] = ()

    @property
    def explicit(self) -> bool:
        return self.order[0] == 0

    @property
    def accepted(self) -> bool:
        return not self.rejections
