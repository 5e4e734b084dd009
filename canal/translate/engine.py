"""translate(snapshot) -> DesiredState, and the incremental Translator behind it.

The work is split into pure steps with explicit dependencies, each cached and re-run only when an input
changed:

  InternalGateway + Gateway          -> scope (servers, domain), shard layout (the listener port of each
    + gateway and shard Services        (port, shard)) and addressing (DNS answers and targets, redirects)
  VirtualService x scope + Services  -> Contribution (routes per (port, host), TCP routes, migrated Services)
  Contributions sharing a (port, host) -> one candidate        (routes merged oldest first)
  candidates on one listener         -> virtual hosts          (a name two hosts claim goes to the oldest)
  TCP routes on one listener         -> one TCP proxy          (the oldest wins; the others are rejected)
  per Service                        -> migrated or not        (every port must be served, or nothing moves)
  referenced clusters                -> Cluster (DestinationRule) and ClusterLoadAssignment (EndpointSlices, Pods)
  migrated Services x gateways       -> DNS records and redirect rules (the oldest InternalGateway owns a name)

Listeners. Compilation knows only Gateway server ports. Assembly maps each port P to listener ports: P itself
on an unsharded gateway (the layout before shards existed, byte for byte), and with `address.shards: N` one per
shard k, the targetPort Service <serviceRef.name>-<k> gives P (validated distinct, so a listener port names its
(P, k)). A Service's virtual host and TCP route go to the listener of its own shard (shards.shard_of);
literal hosts, `*` and TCP routes serving no Service go to every shard of the port. Everything Envoy sees, and
everything contested, is keyed by listener port: virtual hosts, the owners and winner of each name, HTTP filter
flags, TCP winners and conflicts, listeners `0.0.0.0_<listener>` and route configurations `http.<listener>`. DNS
records and redirect rules of a Service use its shard's Service (addresses, target) and listener ports. The
layout is part of a gateway's view: a change to it (shards, a shard Service's ports) rebuilds that gateway's
state from scratch, as a change of its Gateway does; a shard Service's ClusterIP only changes addressing.

A full translation is the same machinery fed every object at once, so "incremental equals full" is a
property of the dependency tracking alone (tested with hypothesis).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, reduce
from itertools import chain
from typing import Any

from canal.desired import (
    Backend,
    ClusterLoadAssignment,
    Condition,
    DesiredState,
    DnsRecord,
    EnvoyConfig,
    Listener,
    ObjectStatus,
    RedirectKey,
    RedirectRule,
    Route,
    RouteConfig,
    Table,
    TcpProxy,
    VirtualHost,
    frozen_map,
)
from canal.heap import paused_gc
from canal.model.base import Caveat, ObjectRef, Rejection
from canal.model.internal_gateway import InternalGateway
from canal.model.istio import DestinationRule, Gateway, VirtualService, listener_kind
from canal.model.kube import Pod, Service
from canal.model.values import is_ipv6
from canal.snapshot import Change, Parsed, Snapshot
from canal.translate.clusters import build_cluster, select_endpoints
from canal.translate.compile import binds, compile_default, compile_virtual_service, gateway_names
from canal.translate.context import Contribution, GatewayScope, RoutesSummary, TcpPart
from canal.translate.names import contestable, literal_domains, service_domains, split_service_fqdn
from canal.translate.shards import ShardLayout, service_key, shard_of

SvcKey = tuple[str, str]  # (namespace, name)
ContribKey = tuple[str, ObjectRef]  # (InternalGateway key, source)
GroupId = tuple[Any, ...]  # ("vh", listener port, vkey) or ("tcp", listener port)


def translate(snapshot: Snapshot) -> DesiredState:
    """The desired state of a snapshot: pure and deterministic."""
    return Translator().load(snapshot)


_STATUS_KINDS = frozenset({"VirtualService", "InternalGateway"})


def snapshot_items(snapshot: Snapshot) -> list[Parsed]:
    items = [
        Parsed(ObjectRef(kind, ns, name), obj, snapshot.problems.get(ObjectRef(kind, ns, name)))
        for kind, namespaces in snapshot.objects.items()
        for ns, names in namespaces.items()
        for name, obj in names.items()
    ]
    present = {p.ref for p in items}
    items += [Parsed(ref, None, problems) for ref, problems in snapshot.problems.items() if ref not in present]
    return items


# ------------------------------------------------------------------------------------------ per gateway


@dataclass(frozen=True, slots=True)
class Addressing:
    """Where rewritten names and redirected ClusterIPs go, and the conditions that say whether that works."""

    order: tuple[str, str, str]
    dns_mode: str
    ttl: int
    redirect_mode: str
    addresses: tuple[str, ...]
    backends: tuple[str, ...]
    conditions: tuple[Condition, ...]
    caveats: tuple[Caveat, ...]
    target: str = ""  # the gateway Service's FQDN, what CoreDNS renames rewritten questions to
    # Sharded: per shard k, the ClusterIPs of Service <serviceRef.name>-<k> and its FQDN (the shard's target).
    shards: tuple[tuple[tuple[str, ...], str], ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayView:
    """Everything derived from one InternalGateway and its Gateway alone (recomputed on any change to them)."""

    ig: InternalGateway
    scope: GatewayScope | None  # None when the InternalGateway is rejected
    addressing: Addressing | None
    namespaces: frozenset[str]  # selected by namespaceSelector
    rejections: tuple[Rejection, ...]
    caveats: tuple[Caveat, ...]
    layout: ShardLayout = field(default_factory=ShardLayout)  # the listener of every (server port, shard)
    watched: frozenset[SvcKey] = frozenset()  # the Services the addressing reads (gateway and shard Services)


@dataclass(slots=True)
class _Candidate:
    routes: tuple[Route, ...]
    domains: tuple[str, ...]
    rank: tuple[Any, ...]  # who keeps a domain two hosts claim: the oldest source, then the host name
    service: bool  # the host is a Service (losing a name then stops its migration)
    summary: RoutesSummary
    contested: tuple[str, ...]  # the domains whose ownership is tracked (see names.contestable)
    listeners: tuple[int, ...]  # the listener ports serving it: a Service's shard, any other host every shard


@dataclass(slots=True)
class _TcpWinner:
    ref: ObjectRef
    part: TcpPart


@dataclass(slots=True)
class _Outcome:
    """A VirtualService's result on one gateway, as status reports it."""

    accepted: bool
    rejections: tuple[Rejection, ...]
    caveats: tuple[Caveat, ...]


@dataclass(slots=True)
class _GatewayState:
    """One gateway's assembly. Contributions and candidates are keyed by Gateway server port ("port"); what Envoy
    gets, and who owns a name, by listener port ("listener"): the port itself unless the gateway is sharded."""

    view: GatewayView
    contribs: dict[ObjectRef, Contribution] = field(default_factory=dict)
    vhost_members: dict[tuple[int, str], set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))
    tcp_members: dict[int, set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))  # by port
    migrate_members: dict[str, set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))
    explicit_members: dict[str, set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))
    wildcard_members: dict[str, set[ObjectRef]] = field(default_factory=lambda: defaultdict(set))
    candidates: dict[tuple[int, str], _Candidate] = field(default_factory=dict)  # (port, vkey)
    domain_owners: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set))  # (listener, d)
    domain_winner: dict[tuple[int, str], str] = field(default_factory=dict)  # the oldest claimant keeps it
    vhosts: dict[int, Table] = field(default_factory=lambda: defaultdict(Table))  # listener -> vkey -> VirtualHost
    filters: dict[int, dict[str, tuple[bool, bool]]] = field(default_factory=lambda: defaultdict(dict))  # listener
    domain_caveats: dict[tuple[int, str], Caveat] = field(default_factory=dict)  # (listener, vkey)
    lost_domains: dict[tuple[int, str], tuple[str, str]] = field(default_factory=dict)  # (listener, vkey) -> names
    tcp_winners: dict[int, _TcpWinner] = field(default_factory=dict)  # listener
    conflicts: dict[GroupId, dict[ObjectRef, Rejection]] = field(default_factory=dict)
    default_conflicts: dict[GroupId, dict[ObjectRef, Caveat]] = field(default_factory=dict)
    migrated: dict[str, Service] = field(default_factory=dict)
    unmigrated: dict[str, str] = field(default_factory=dict)  # FQDN -> why
    group_clusters: dict[GroupId, frozenset[str]] = field(default_factory=dict)
    cluster_refs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    clusters: Table = field(default_factory=Table)  # name -> Cluster
    endpoints: Table = field(default_factory=Table)  # name -> ClusterLoadAssignment
    clusters_by_service: dict[SvcKey, set[str]] = field(default_factory=lambda: defaultdict(set))
    listeners: Table = field(default_factory=Table)  # name -> Listener
    route_configs: Table = field(default_factory=Table)  # name -> RouteConfig
    outcomes: dict[ObjectRef, _Outcome] = field(default_factory=dict)
    vkey_ports: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # vkey -> ports
    # Aggregates kept up to date so a status rebuild costs O(problems), not O(VirtualServices).
    bound: set[str] = field(default_factory=set)
    bound_frozen: frozenset[str] | None = None
    ref_rejections: dict[ObjectRef, tuple[Rejection, ...]] = field(default_factory=dict)
    default_caveats: dict[ObjectRef, tuple[Caveat, ...]] = field(default_factory=dict)
    unmigrated_defaults: dict[str, Caveat] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)  # migrated here, but DNS belongs to an older gateway
    rejected: set[str] = field(default_factory=set)  # VirtualServices with problems on this gateway
    rejected_frozen: frozenset[str] | None = None
    caveats_sorted: tuple[Caveat, ...] | None = None  # reset wherever a caveat source changes


class _Dirty:
    """Work found while applying one batch; every set is drained exactly once, in dependency order."""

    def __init__(self) -> None:
        self.contribs: set[ContribKey] = set()
        self.vhosts: dict[str, set[tuple[int, str]]] = defaultdict(set)  # (port, vkey): candidates
        self.finalize: dict[str, set[tuple[int, str]]] = defaultdict(set)  # (listener, vkey): virtual hosts
        self.tcp: dict[str, set[int]] = defaultdict(set)  # listeners
        self.migration: dict[str, set[str]] = defaultdict(set)
        self.ports: dict[str, set[int]] = defaultdict(set)  # listeners
        self.clusters: dict[str, set[str]] = defaultdict(set)  # rebuild cluster + endpoints
        self.services_clusters: set[SvcKey] = set()  # every cluster of these Services, in every gateway
        self.services_endpoints: set[SvcKey] = set()
        self.names: set[str] = set()  # FQDNs whose DNS / redirect ownership may change
        self.outcomes: dict[str, set[ObjectRef]] = defaultdict(set)
        self.status: set[ObjectRef] = set()
        self.gateways: set[str] = set()  # InternalGateways whose status must be rebuilt


class _Reads:
    """The Lookup handed to compilation; remembers every Service it was asked about."""

    __slots__ = ("engine", "keys")

    def __init__(self, engine: Translator) -> None:
        self.engine = engine
        self.keys: set[SvcKey] = set()

    def service(self, namespace: str, name: str) -> Service | None:
        self.keys.add((namespace, name))
        return self.engine.snapshot.get("Service", namespace, name)

    def destination_rule(self, service: Service, scope: GatewayScope) -> DestinationRule | None:
        self.keys.add((service.meta.namespace, service.meta.name))
        return self.engine.destination_rule(service, scope)


def _dr_target(rule: DestinationRule) -> tuple[SvcKey, str | None] | None:
    """The Service a DestinationRule's host names, and the cluster domain it spells out (if any)."""
    parts = rule.host.split(".")
    if len(parts) == 1:
        return (rule.meta.namespace, parts[0]), None
    if len(parts) == 2:
        return (parts[1], parts[0]), None
    if parts[2] == "svc":
        return (parts[1], parts[0]), (".".join(parts[3:]) or None)
    return None


def pod_namespace_bound(objects: Iterable[Any]) -> frozenset[str]:
    """A superset of `Translator.pod_namespaces` for a state holding these objects, known before translating them:
    every InternalGateway's namespace and the namespace of every Service a DestinationRule with subsets names. A
    source can start listing those Pods while the rest is still being listed."""
    found: set[str] = set()
    for obj in objects:
        if isinstance(obj, InternalGateway):
            found.add(obj.meta.namespace)
        elif isinstance(obj, DestinationRule) and obj.subsets and not obj.has_workload_selector:
            target = _dr_target(obj)
            if target is not None:
                found.add(target[0][0])
    return frozenset(found)


class Translator:
    """Incremental translation. `apply` takes parsed objects (upserts) and refs (deletes), returns the state."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.desired = DesiredState()
        self._views: dict[str, GatewayView] = {}
        self._states: dict[str, _GatewayState] = {}
        self._vs_by_gateway: dict[SvcKey, set[ObjectRef]] = defaultdict(set)
        self._rejected_vs_by_gateway: dict[SvcKey, set[ObjectRef]] = defaultdict(set)
        self._readers: dict[SvcKey, set[ContribKey]] = defaultdict(set)
        self._reads_of: dict[ContribKey, frozenset[SvcKey]] = {}
        self._dr_targets: dict[SvcKey, set[ObjectRef]] = defaultdict(set)
        self._slices_by_service: dict[SvcKey, set[str]] = defaultdict(set)
        self._pod_services: dict[SvcKey, dict[SvcKey, int]] = defaultdict(lambda: defaultdict(int))
        # Built subset clusters (over every gateway) per Service and per namespace: only their endpoints read Pods.
        self._subset_services: dict[SvcKey, int] = {}
        self._subset_namespaces: dict[str, int] = {}
        self._name_owner: dict[str, str] = {}  # FQDN -> InternalGateway owning DNS and redirects
        self._redirects_of: dict[str, tuple[RedirectKey, ...]] = {}
        self._envoy = Table()  # InternalGateway key -> EnvoyConfig
        self._dns = Table()  # FQDN -> DnsRecord
        self._redirects = Table()  # RedirectKey -> RedirectRule
        self._status = Table()  # ObjectRef -> ObjectStatus

    # ======================================================================================= public

    def apply(self, items: Iterable[Parsed | ObjectRef]) -> DesiredState:
        """Upsert parsed objects, delete refs; returns the new desired state."""
        with paused_gc():
            self.snapshot, changes = self.snapshot.apply(items)
            if not changes:  # the same state object: callers can tell that there is nothing to publish
                return self.desired
            return self._process(changes)

    def load(self, snapshot: Snapshot) -> DesiredState:
        """Translate a whole snapshot into an empty Translator (a full build, without copying the snapshot)."""
        if self.snapshot.objects or self.snapshot.problems:
            raise ValueError("load() needs an empty Translator; use apply() for changes")
        with paused_gc():
            self.snapshot = snapshot
            # Pods are read directly (gateway views, subset endpoints); with no earlier state, a Pod change has
            # nothing to invalidate, so a full build skips indexing tens of thousands of them.
            changes = [
                Change(ObjectRef(kind, ns, name), None, obj)
                for kind, namespaces in snapshot.objects.items()
                if kind != "Pod"
                for ns, names in namespaces.items()
                for name, obj in names.items()
            ]
            changes += [Change(ref, None, None) for ref in snapshot.problems if snapshot.get(*ref) is None]
            return self._process(changes)

    def _process(self, changes: list[Change]) -> DesiredState:
        dirty = _Dirty()
        gateway_inputs_changed = False
        problems = self.snapshot.problems
        for change in changes:
            ref = change.ref
            # Only these kinds have a status of their own; the others only when they failed to parse.
            if ref.kind in _STATUS_KINDS or ref in problems or ref in self._status:
                dirty.status.add(ref)
            gateway_inputs_changed |= self._index(change, dirty)
        if gateway_inputs_changed:
            self._refresh_gateways(dirty)
        self._recompile(dirty)
        for key, state in self._states.items():
            self._assemble(key, state, dirty)
        self._refresh_clusters(dirty)
        self._refresh_names(dirty)
        self._refresh_status(dirty)
        self.desired = self._publish()
        return self.desired

    def pod_namespaces(self) -> frozenset[str]:
        """The namespaces whose Pods this state reads; a Pod anywhere else changes nothing, so a source need not
        watch it. Every InternalGateway's namespace (its gateway pods are the redirect backends) and every
        namespace of a Service with a subset cluster (subset membership is a Pod label; other clusters take their
        addresses from EndpointSlices alone). O(gateways + those namespaces): it is asked after every batch."""
        return frozenset(view.ig.meta.namespace for view in self._views.values()).union(self._subset_namespaces)

    def destination_rule(self, service: Service, scope: GatewayScope) -> DestinationRule | None:
        """Istio's lookup order for a gateway: its own namespace, then the Service's, then any; oldest first."""
        best, best_key = None, None
        for ref in self._dr_targets.get((service.meta.namespace, service.meta.name), ()):
            rule = self.snapshot.get("DestinationRule", ref.namespace, ref.name)
            target = _dr_target(rule) if rule is not None else None
            if rule is None or target is None or target[1] not in (None, scope.domain):
                continue
            ns = rule.meta.namespace
            rank = 0 if ns == scope.namespace else 1 if ns == service.meta.namespace else 2
            key = (rank, rule.meta.order)
            if best_key is None or key < best_key:
                best, best_key = rule, key
        return best

    # ====================================================================================== indexing

    def _index(self, change: Change, dirty: _Dirty) -> bool:
        """Update reverse indexes; mark direct dependants. True when gateway-level inputs changed."""
        ref, old, new = change.ref, change.old, change.new
        kind = ref.kind
        key = (ref.namespace, ref.name)
        if kind == "VirtualService":
            for vs in (old, new):
                if vs is not None:
                    for ig_key, state in self._states.items():
                        if state.view.scope is not None and binds(vs, state.view.scope):
                            dirty.contribs.add((ig_key, ref))
            for gw in self._reindex_gateways(ref, old, new):
                for ig_key, state in self._states.items():
                    scope = state.view.scope
                    if scope is not None and (scope.gateway.namespace, scope.gateway.name) == gw:
                        dirty.gateways.add(ig_key)
            return False
        if kind == "Service":
            dirty.contribs.update(self._readers.get(key, ()))
            for ig_key, state in self._states.items():
                if ref.namespace in state.view.namespaces:
                    dirty.contribs.add((ig_key, ref))
            dirty.services_clusters.add(key)
            dirty.services_endpoints.add(key)
            return any(key in v.watched for v in self._views.values())
        if kind == "DestinationRule":
            for rule in (old, new):
                target = _dr_target(rule) if rule is not None and not rule.has_workload_selector else None
                if target is None:
                    continue
                dirty.contribs.update(self._readers.get(target[0], ()))
                dirty.services_clusters.add(target[0])
                dirty.services_endpoints.add(target[0])
            for rule, add in ((old, False), (new, True)):
                target = _dr_target(rule) if rule is not None and not rule.has_workload_selector else None
                if target is not None:
                    (self._dr_targets[target[0]].add if add else self._dr_targets[target[0]].discard)(ref)
            return False
        if kind == "EndpointSlice":
            for slc, add in ((old, False), (new, True)):
                if slc is None or not slc.service_name:
                    continue
                svc = (slc.meta.namespace, slc.service_name)
                dirty.services_endpoints.add(svc)
                (self._slices_by_service[svc].add if add else self._slices_by_service[svc].discard)(ref.name)
                for ep in slc.endpoints:
                    if ep.pod:
                        counts = self._pod_services[(slc.meta.namespace, ep.pod)]
                        counts[svc] += 1 if add else -1
                        if counts[svc] <= 0:
                            del counts[svc]
            return False
        if kind == "Pod":
            # Only subset endpoints read a Pod (its labels): a Service without a subset cluster has nothing to redo.
            subsets = self._subset_services
            dirty.services_endpoints.update(s for s in self._pod_services.get(key, ()) if s in subsets)
            return any(v.ig.meta.namespace == ref.namespace for v in self._views.values())
        # InternalGateway, Gateway, Namespace: few objects, handled wholesale.
        return kind in ("InternalGateway", "Gateway", "Namespace")

    def _reindex_gateways(self, ref: ObjectRef, old: VirtualService | None, new: VirtualService | None) -> set[SvcKey]:
        """Keep the gateway -> VirtualService indexes; returns gateways whose rejected list changed."""
        if old is not None:
            for gw in gateway_names(old.gateways, old.meta.namespace):
                self._vs_by_gateway[gw].discard(ref)
        touched = {gw for gw, refs in self._rejected_vs_by_gateway.items() if ref in refs}
        for gw in touched:
            self._rejected_vs_by_gateway[gw].discard(ref)
        if new is not None:
            for gw in gateway_names(new.gateways, new.meta.namespace):
                self._vs_by_gateway[gw].add(ref)
        problems = self.snapshot.problems.get(ref)
        if new is None and problems is not None and problems.rejections:
            for gw in gateway_names(problems.gateways, ref.namespace):
                self._rejected_vs_by_gateway[gw].add(ref)
                touched.add(gw)
        return touched

    # ============================================================================= gateway views

    def _refresh_gateways(self, dirty: _Dirty) -> None:
        views = self._compute_views()
        for key in set(self._views) | set(views):
            old, new = self._views.get(key), views.get(key)
            if old == new:
                continue
            dirty.gateways.add(key)
            if old is not None:
                dirty.status.add(old.ig.ref)
            state = self._states.get(key)
            # Listeners (and so every key of the assembly) follow the shard layout: a new layout is a new state.
            reshaped = new is None or old is None or old.scope != new.scope or old.layout != new.layout
            if state is not None and reshaped:
                self._drop_state(key, state, dirty)
            if new is None:
                continue
            if reshaped:
                state = _GatewayState(new)
                self._states[key] = state
                if new.scope is not None:
                    dirty.ports[key].update(new.layout.server_ports)
                    for ref in self._vs_by_gateway.get((new.scope.gateway.namespace, new.scope.gateway.name), ()):
                        dirty.contribs.add((key, ref))
                    for ns in new.namespaces:
                        for name in self.snapshot.in_namespace("Service", ns):
                            dirty.contribs.add((key, ObjectRef("Service", ns, name)))
                continue
            assert state is not None and old is not None
            state.view = new
            state.caveats_sorted = None
            if old.addressing != new.addressing:
                dirty.names.update(state.migrated)
            for ns in old.namespaces ^ new.namespaces:
                for name in self.snapshot.in_namespace("Service", ns):
                    dirty.contribs.add((key, ObjectRef("Service", ns, name)))
        self._views = views

    def _drop_state(self, key: str, state: _GatewayState, dirty: _Dirty) -> None:
        """Forget everything built for a gateway; whatever it owned is re-decided."""
        dirty.names.update(state.migrated)
        dirty.status.update(state.outcomes)
        for ref in state.contribs:
            self._forget_reads((key, ref))
        scope = state.view.scope
        if scope is not None:
            for name in state.clusters.data:
                self._count_subset(name, scope.domain, -1)
        del self._states[key]
        self._envoy.pop(key)  # republished from the new state (or removed) at the end of the batch

    def _compute_views(self) -> dict[str, GatewayView]:
        igs = sorted(self.snapshot.all("InternalGateway"), key=lambda ig: ig.meta.order)
        owner: dict[tuple[str, str], InternalGateway] = {}
        for ig in igs:
            owner.setdefault((ig.gateway.namespace, ig.gateway.name), ig)
        views = {}
        for ig in igs:
            views[ig.key] = self._view(ig, owner[(ig.gateway.namespace, ig.gateway.name)])
        return views

    def _view(self, ig: InternalGateway, owner: InternalGateway) -> GatewayView:
        gateway: Gateway | None = self.snapshot.get("Gateway", ig.gateway.namespace, ig.gateway.name)
        if gateway is None:
            reason = f"Gateway {ig.gateway} not found"
            return GatewayView(ig, None, None, frozenset(), (Rejection(ig.ref, "spec.gatewayRef", reason),), ())
        if owner is not ig:
            reason = f"Gateway {ig.gateway} is already adopted by {owner.ref}; a Gateway belongs to one InternalGateway"
            return GatewayView(ig, None, None, frozenset(), (Rejection(ig.ref, "spec.gatewayRef", reason),), ())
        caveats = []
        servers, kinds = [], {}
        for server in gateway.servers:
            kind = listener_kind(server.protocol)
            if kind not in ("http", "tcp"):
                caveats.append(
                    Caveat(
                        gateway.ref,
                        server.path,
                        f"{server.protocol} servers are not served by Canal (plain-text only); "
                        f"port {server.port} skipped",
                    )
                )
                continue
            if server.tls:
                caveats.append(
                    Caveat(gateway.ref, f"{server.path}.tls", "TLS settings on a plain-text server are ignored")
                )
            servers.append(server)
            kinds[server.port] = kind
        watched = frozenset((s.namespace, s.name) for s in (ig.address_service, *ig.shard_services) if s is not None)
        exclude = frozenset(f"{ns}/{name}" for ns, name in watched)  # never routed through themselves
        scope = GatewayScope(
            key=ig.key,
            namespace=ig.meta.namespace,
            gateway=ig.gateway,
            domain=ig.cluster_domain,
            servers=tuple(servers),
            port_kinds=frozen_map(dict(sorted(kinds.items()))),
            exclude=exclude,
        )
        namespaces = frozenset()
        if ig.namespace_selector is not None:
            namespaces = frozenset(
                ns.meta.name for ns in self.snapshot.all("Namespace") if ig.namespace_selector.matches(ns.meta.labels)
            )
        layout, shards, problems = self._shards(ig, kinds)
        rejections = tuple(Rejection(ig.ref, "spec.address.shards", problem) for problem in problems)
        addressing = self._addressing(ig, gateway, kinds, layout, shards)
        return GatewayView(ig, scope, addressing, namespaces, rejections, tuple(caveats), layout, watched)

    def _shards(
        self, ig: InternalGateway, kinds: Mapping[int, str]
    ) -> tuple[ShardLayout, tuple[tuple[tuple[str, ...], str], ...], list[str]]:
        """The listener layout, each shard's addresses, and what is wrong with the shard Services.

        Shard k's listener for server port P binds the numeric targetPort that Service <name>-<k> maps P to, so
        the Service (which the Helm chart creates) is the one place the port is written down. Anything unusable
        falls back to the unsharded layout with a problem, which keeps every Service direct.
        """
        ports = sorted(kinds)
        if ig.shards <= 1:
            return ShardLayout.unsharded(ports), (), []
        missing, no_ip, no_port, named = [], [], [], []
        listeners: dict[int, list[int]] = {p: [] for p in ports}
        owners: dict[int, list[str]] = defaultdict(list)  # listener port -> "<Service> port P"
        shards = []
        for ref in ig.shard_services:
            svc: Service | None = self.snapshot.get("Service", ref.namespace, ref.name)
            if svc is None:
                missing.append(ref.name)
                continue
            if not svc.cluster_ips:
                no_ip.append(ref.name)
            lacking = []
            for port in ports:
                sp = next((x for x in svc.ports if x.port == port and x.protocol == "TCP"), None)
                if sp is None:
                    lacking.append(str(port))
                elif isinstance(sp.target_port, str) or not 1 <= sp.target_port <= 65535:
                    named.append(f"{ref.name} port {port} ({sp.target_port!r})")
                else:
                    listeners[port].append(sp.target_port)
                    owners[sp.target_port].append(f"{ref.name} port {port}")
            if lacking:
                no_port.append(f"{ref.name} ({', '.join(lacking)})")
            shards.append((tuple(sorted(svc.cluster_ips)), f"{ref.name}.{ref.namespace}.svc.{ig.cluster_domain}"))
        problems = []
        if missing:
            ns = ig.shard_services[0].namespace
            problems.append(f"shard Service(s) {_listed(missing)} not found in namespace {ns}")
        if no_ip:
            problems.append(f"shard Service(s) {_listed(no_ip)} have no cluster IP")
        if no_port:
            problems.append(
                f"shard Service(s) lack TCP port(s) of Gateway {ig.gateway}: {_listed(no_port)}; "
                "every shard needs every HTTP and TCP server port"
            )
        if named:
            problems.append(
                f"shard Service port(s) {_listed(named)} need a numeric targetPort: it is the shard's listener port"
            )
        shared = sorted(lp for lp, users in owners.items() if len(users) > 1)
        if shared:
            clashes = [f"{lp} ({' and '.join(owners[lp])})" for lp in shared]
            problems.append(
                f"listener port(s) {_listed(clashes)} are the targetPort of more than one (port, shard); "
                "each needs its own"
            )
        if problems:
            return ShardLayout.unsharded(ports, "; ".join(problems)), (), problems
        return ShardLayout.sharded(ig.shards, {p: tuple(lps) for p, lps in listeners.items()}), tuple(shards), []

    def _addressing(
        self,
        ig: InternalGateway,
        gateway: Gateway,
        ports: Mapping[int, str],
        layout: ShardLayout,
        shards: tuple[tuple[tuple[str, ...], str], ...],
    ) -> Addressing:
        conditions, caveats = [], []
        addresses: tuple[str, ...] = tuple(sorted(ig.address_ips))
        if ig.shards > 1:
            addresses = ()
            if layout.problem:
                conditions.append(
                    Condition(
                        "AddressResolved",
                        "False",
                        "ShardsNotReady",
                        "the shard Services are not usable (see ShardsReady); no names are rewritten",
                    )
                )
                conditions.append(Condition("ShardsReady", "False", "InvalidShardServices", layout.problem))
            else:
                conditions.append(
                    Condition(
                        "AddressResolved",
                        "True",
                        "Sharded",
                        "; ".join(f"{target.split('.', 1)[0]}: {', '.join(ips)}" for ips, target in shards),
                    )
                )
                conditions.append(
                    Condition(
                        "ShardsReady",
                        "True",
                        "ShardServicesReady",
                        f"{ig.shards} shards; listener ports: "
                        + "; ".join(f"port {p}: {_runs(lps)}" for p, lps in sorted(layout.listeners.items())),
                    )
                )
        elif ig.address_service is not None:
            addresses = ()
            svc: Service | None = self.snapshot.get("Service", ig.address_service.namespace, ig.address_service.name)
            if svc is None:
                conditions.append(
                    Condition(
                        "AddressResolved",
                        "False",
                        "ServiceNotFound",
                        f"Service {ig.address_service} not found; no names are rewritten",
                    )
                )
            elif not svc.cluster_ips:
                conditions.append(
                    Condition(
                        "AddressResolved",
                        "False",
                        "NoClusterIP",
                        f"Service {ig.address_service} has no cluster IP; no names are rewritten",
                    )
                )
            else:
                addresses = tuple(sorted(svc.cluster_ips))
                conditions.append(Condition("AddressResolved", "True", "Resolved", ", ".join(addresses)))
                missing = sorted(p for p in ports if svc.port(p) is None)
                if missing:
                    caveats.append(
                        Caveat(
                            ig.ref,
                            "spec.address.serviceRef",
                            f"Service {ig.address_service} does not expose Gateway port(s) "
                            f"{', '.join(map(str, missing))}; clients of those ports cannot reach the gateway",
                        )
                    )
        elif ig.address_ips:
            conditions.append(Condition("AddressResolved", "True", "Static", ", ".join(ig.address_ips)))
        selector = ig.workload_selector or tuple(sorted(gateway.selector.items()))
        backends: list[str] = []
        if selector:
            for pod in self.snapshot.in_namespace("Pod", ig.meta.namespace).values():
                if pod.ready and all(pod.meta.labels.get(k) == v for k, v in selector):
                    backends.extend(pod.ips)
        if layout.problem:
            backends = []  # the listener ports are unknown: nothing is redirected
        if ig.redirect_mode != "none":
            if layout.problem:
                conditions.append(
                    Condition("RedirectReady", "False", "ShardsNotReady", "ClusterIPs are not redirected")
                )
            elif backends:
                conditions.append(
                    Condition(
                        "RedirectReady",
                        "True",
                        "GatewayPodsReady",
                        f"{len(backends)} gateway pod address(es)",
                    )
                )
            elif ig.address_ips:
                backends = list(ig.address_ips)
                conditions.append(
                    Condition(
                        "RedirectReady",
                        "True",
                        "StaticAddresses",
                        "no ready gateway pods; redirecting to address.ips",
                    )
                )
            else:
                conditions.append(
                    Condition(
                        "RedirectReady",
                        "False",
                        "NoReadyGatewayPods",
                        "no ready gateway pods match the workload selector; ClusterIPs are not redirected",
                    )
                )
        return Addressing(
            order=ig.meta.order,
            dns_mode=ig.dns_mode,
            ttl=ig.dns_ttl,
            redirect_mode=ig.redirect_mode,
            addresses=addresses,
            backends=tuple(sorted(set(backends))),
            conditions=tuple(conditions),
            caveats=tuple(caveats),
            target=(
                f"{ig.address_service.name}.{ig.address_service.namespace}.svc.{ig.cluster_domain}"
                if ig.address_service is not None and addresses
                else ""
            ),
            shards=shards,
        )

    # ============================================================================= contributions

    def _forget_reads(self, ckey: ContribKey) -> None:
        for svc in self._reads_of.pop(ckey, ()):
            readers = self._readers.get(svc)
            if readers is not None:
                readers.discard(ckey)
                if not readers:
                    del self._readers[svc]

    def _recompile(self, dirty: _Dirty) -> None:
        for ckey in dirty.contribs:  # order-independent: groups are rebuilt after all contributions
            ig_key, ref = ckey
            state = self._states.get(ig_key)
            if state is None:
                self._forget_reads(ckey)
                continue
            new = self._compile(ckey, state)
            old = state.contribs.get(ref)
            if new == old:
                continue
            self._swap(ig_key, state, ref, old, new, dirty)

    def _compile(self, ckey: ContribKey, state: _GatewayState) -> Contribution | None:
        ref = ckey[1]
        scope = state.view.scope
        self._forget_reads(ckey)
        if scope is None:
            return None
        reads = _Reads(self)
        if ref.kind == "VirtualService":
            vs = self.snapshot.get("VirtualService", ref.namespace, ref.name)
            result = compile_virtual_service(vs, scope, reads) if vs is not None and binds(vs, scope) else None
        else:
            service = reads.service(ref.namespace, ref.name)
            selected = ref.namespace in state.view.namespaces
            result = compile_default(service, scope) if service is not None and selected else None
        if reads.keys:
            self._reads_of[ckey] = frozenset(reads.keys)
            for svc in reads.keys:
                self._readers[svc].add(ckey)
        return result

    def _swap(
        self,
        ig_key: str,
        state: _GatewayState,
        ref: ObjectRef,
        old: Contribution | None,
        new: Contribution | None,
        dirty: _Dirty,
    ) -> None:
        """Replace a contribution and mark every group whose membership or content it touches."""
        for contrib, add in ((old, False), (new, True)):
            if contrib is None:
                continue
            for group_key in contrib.vhosts:
                self._member(state.vhost_members, group_key, ref, add)
                if add:
                    state.vkey_ports[group_key[1]].add(group_key[0])
                dirty.vhosts[ig_key].add(group_key)
            for port in contrib.tcp:
                self._member(state.tcp_members, port, ref, add)
                if state.view.layout.shards == 1:
                    dirty.tcp[ig_key].add(port)
                else:
                    dirty.tcp[ig_key].update(self._tcp_listeners(state, port, contrib.tcp[port]))
            for fqdn in contrib.migrates:
                self._member(state.migrate_members, fqdn, ref, add)
                dirty.migration[ig_key].add(fqdn)
                if contrib.explicit and contrib.accepted:
                    before = bool(state.explicit_members.get(fqdn))
                    self._member(state.explicit_members, fqdn, ref, add)
                    if before != bool(state.explicit_members.get(fqdn)):
                        # A VirtualService appearing for (or leaving) a host switches its namespace default, whose
                        # TCP parts serve that host alone, on the listeners of its shard.
                        dirty.vhosts[ig_key].update((port, fqdn) for port in state.vkey_ports.get(fqdn, ()))
                        layout = state.view.layout
                        if layout.shards == 1:
                            dirty.tcp[ig_key].update(state.tcp_members)
                        elif state.tcp_members:
                            meta = contrib.migrates[fqdn].meta
                            shard_key = service_key(meta.namespace, meta.name)
                            dirty.tcp[ig_key].update(layout.listener(port, shard_key) for port in state.tcp_members)
            for fqdn in contrib.wildcard_migrates:
                self._member(state.wildcard_members, fqdn, ref, add)
        if new is None:
            state.contribs.pop(ref, None)
        else:
            state.contribs[ref] = new
        if ref.kind == "VirtualService":
            dirty.outcomes[ig_key].add(ref)
        elif (new.caveats if new is not None else ()) != state.default_caveats.get(ref, ()):
            state.caveats_sorted = None
            if new is not None and new.caveats:
                state.default_caveats[ref] = new.caveats
            else:
                state.default_caveats.pop(ref, None)
            dirty.gateways.add(ig_key)

    @staticmethod
    def _tcp_listeners(state: _GatewayState, port: int, part: TcpPart) -> tuple[int, ...]:
        """The listeners a TCP route of a port is on: its Services' shards, or every shard if it serves none."""
        listeners = state.view.layout.listeners.get(port, ())
        if len(listeners) <= 1:
            return listeners
        scope = state.view.scope
        assert scope is not None
        shards = set()
        for fqdn in part.services:
            parts = split_service_fqdn(fqdn, scope.domain)
            if parts is not None:
                shards.add(shard_of(service_key(*parts), len(listeners)))
        return tuple(listeners[k] for k in sorted(shards)) if shards else listeners

    @staticmethod
    def _member(index: dict[Any, set[ObjectRef]], key: Any, ref: ObjectRef, add: bool) -> None:
        if add:
            index[key].add(ref)
        else:
            members = index.get(key)
            if members is not None:
                members.discard(ref)
                if not members:
                    del index[key]

    # ================================================================================== assembly

    def _assemble(self, key: str, state: _GatewayState, dirty: _Dirty) -> None:
        for group_key in sorted(dirty.vhosts.pop(key, ())):
            self._candidate(key, state, group_key, dirty)
        for group_key in sorted(dirty.finalize.pop(key, ())):
            self._finalize_vhost(key, state, group_key, dirty)
        for port in sorted(dirty.tcp.pop(key, ())):
            self._tcp_group(key, state, port, dirty)
        for fqdn in sorted(dirty.migration.pop(key, ())):
            self._migration(key, state, fqdn, dirty)
        for port in sorted(dirty.ports.pop(key, ())):
            self._listener(state, port)

    def _candidate(self, key: str, state: _GatewayState, group_key: tuple[int, str], dirty: _Dirty) -> None:
        port, vkey = group_key
        members = state.vhost_members.get(group_key, ())
        if len(members) == 1:
            contribs = [state.contribs[next(iter(members))]]
        else:
            contribs = sorted((state.contribs[r] for r in members), key=lambda c: c.order)
        if state.explicit_members.get(vkey):
            contribs = [c for c in contribs if c.explicit]
        candidate = None
        if contribs:
            parts = [c.vhosts[group_key] for c in contribs]
            service = next((p.service for p in parts if p.service is not None), None)
            scope = state.view.scope
            assert scope is not None
            domains = (
                service_domains(service, scope.domain, port) if service is not None else literal_domains(vkey, port)
            )
            if len(parts) == 1:
                routes, summary = parts[0].routes, parts[0].summary
            else:
                routes = tuple(chain.from_iterable(p.routes for p in parts))
                summary = reduce(operator.or_, (p.summary for p in parts))
            is_service = service is not None
            # A Service is served by the listener of its shard; any other host (a literal name, `*`) may be asked
            # for on any of them.
            listeners = state.view.layout.listeners[port]
            if service is not None and len(listeners) > 1:
                shard_key = service_key(service.meta.namespace, service.meta.name)
                listeners = (listeners[shard_of(shard_key, len(listeners))],)
            candidate = _Candidate(
                routes,
                domains,
                (contribs[0].order, vkey),
                is_service,
                summary,
                contestable(domains, is_service),
                listeners,
            )
        old = state.candidates.get(group_key)
        if candidate == old:
            return
        if (candidate is None) != (old is None):
            dirty.migration[key].add(vkey)
            if vkey == "*":
                dirty.migration[key].update(state.wildcard_members)
        # Names are claimed per listener: two hosts only contest a name if one listener serves both. Usually the
        # old and the new candidate are on the same (single) listener, and this loops once.
        old_listeners = old.listeners if old is not None else ()
        new_listeners = candidate.listeners if candidate is not None else ()
        if not old_listeners or old_listeners == new_listeners:
            listeners = new_listeners
        elif not new_listeners:
            listeners = old_listeners
        else:
            listeners = tuple(sorted({*old_listeners, *new_listeners}))
        old_all = set(old.contested) if old else set()
        new_all = set(candidate.contested) if candidate else set()
        claims = []  # per listener: the names claimed before and now
        for lp in listeners:
            old_domains = old_all if lp in old_listeners else set()
            new_domains = new_all if lp in new_listeners else set()
            claims.append((lp, old_domains, new_domains))
            for domain in old_domains - new_domains:
                owners = state.domain_owners[(lp, domain)]
                owners.discard(vkey)
                if not owners:
                    del state.domain_owners[(lp, domain)]
            for domain in new_domains - old_domains:
                state.domain_owners[(lp, domain)].add(vkey)
        if candidate is None:
            del state.candidates[group_key]
        else:
            state.candidates[group_key] = candidate
        # Who keeps each shared name: recomputed once per name whose claimants (or their ages) changed.
        rank_changed = old is not None and candidate is not None and old.rank != candidate.rank
        for lp, old_domains, new_domains in claims:
            touched = (old_domains | new_domains) if rank_changed else (old_domains ^ new_domains)
            affected = {vkey}
            for domain in touched:
                owners = state.domain_owners.get((lp, domain))
                before = state.domain_winner.get((lp, domain))
                if not owners:
                    state.domain_winner.pop((lp, domain), None)
                    continue
                if len(owners) == 1:
                    (winner,) = owners
                else:
                    winner = min(owners, key=lambda v: state.candidates[(port, v)].rank)
                if winner != before:
                    state.domain_winner[(lp, domain)] = winner
                    affected |= owners  # every claimant's share (and the owner its losers name) changes
            dirty.finalize[key].update((lp, v) for v in affected)
        if group_key not in state.vhost_members:
            ports = state.vkey_ports.get(vkey)
            if ports is not None:
                ports.discard(port)
                if not ports:
                    del state.vkey_ports[vkey]

    def _finalize_vhost(self, key: str, state: _GatewayState, group_key: tuple[int, str], dirty: _Dirty) -> None:
        """Turn a candidate into the virtual host Envoy gets; a domain two hosts claim goes to the older one.

        The Host header is all a listener sees: two Services both answering to `web` (from two namespaces)
        cannot both be served on one port (or, sharded, by one shard's listener). The younger one keeps its
        qualified names and is not migrated, so its clients keep reaching it directly.
        """
        listener, vkey = group_key
        layout = state.view.layout
        if layout.shards == 1:  # listener port == server port
            port, candidate = listener, state.candidates.get(group_key)
        else:
            port = layout.server_ports[listener]
            candidate = state.candidates.get((port, vkey))
            if candidate is not None and listener not in candidate.listeners:
                candidate = None
        vhost = None
        had_caveat = state.domain_caveats.pop(group_key, None)
        lost: tuple[str, ...] = ()
        if candidate is not None:
            taken, winners = set(), set()
            winner_of = state.domain_winner
            for d in candidate.contested:
                winner = winner_of[(listener, d)]
                if winner != vkey:
                    taken.add(d)
                    winners.add(winner)
            domains = candidate.domains
            shared = []
            if taken:
                domains = tuple(d for d in candidate.domains if d not in taken)
                shared = [d for d in candidate.domains if d in taken]
            if shared:
                lost = (", ".join(shared), ", ".join(sorted(winners)))
                if not candidate.service:
                    state.domain_caveats[group_key] = Caveat(
                        state.view.ig.ref,
                        _where(layout, listener),
                        f"host(s) {lost[0]} of {vkey} belong to the older {lost[1]} and are not routed here",
                    )
            if domains:
                vhost = VirtualHost(f"{vkey}:{port}", domains, candidate.routes)
        if had_caveat != state.domain_caveats.get(group_key):
            state.caveats_sorted = None
            dirty.gateways.add(key)
        if lost != state.lost_domains.get(group_key, ()):
            if lost:
                state.lost_domains[group_key] = lost
            else:
                state.lost_domains.pop(group_key, None)
            dirty.migration[key].add(vkey)
        listener_vhosts = state.vhosts[listener]
        if listener_vhosts.get(vkey) == vhost:
            return
        if vhost is None:
            listener_vhosts.pop(vkey, None)
            state.filters[listener].pop(vkey, None)
            clusters: frozenset[str] = frozenset()
        else:
            listener_vhosts[vkey] = vhost
            summary = candidate.summary
            state.filters[listener][vkey] = (summary.fault, summary.cors)
            clusters = summary.clusters
        self._set_group_clusters(key, state, ("vh", listener, vkey), clusters, dirty)
        dirty.ports[key].add(listener)

    def _tcp_group(self, key: str, state: _GatewayState, listener: int, dirty: _Dirty) -> None:
        layout = state.view.layout
        port = layout.server_ports[listener]
        sharded = len(layout.listeners[port]) > 1
        entries = []
        for ref in state.tcp_members.get(port, ()):
            contrib = state.contribs[ref]
            part = contrib.tcp[port]
            if not contrib.explicit and any(state.explicit_members.get(f) for f in part.services):
                continue
            if sharded and listener not in self._tcp_listeners(state, port, part):
                continue
            entries.append((contrib.order, part.index, ref, part))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        old = state.tcp_winners.get(listener)
        touched = set(old.part.services) if old else set()
        group: GroupId = ("tcp", listener)
        conflicts: dict[ObjectRef, Rejection] = {}
        default_conflicts: dict[ObjectRef, Caveat] = {}
        if entries:
            _, _, ref, part = entries[0]
            state.tcp_winners[listener] = _TcpWinner(ref, part)
            touched |= part.services
            gateway = state.view.ig.gateway
            shard = f" ({_shard(layout, listener)})" if sharded else ""
            for _, _, loser, lost in entries[1:]:
                touched |= lost.services
                message = (
                    f"TCP port {port}{shard} of Gateway {gateway} already carries {part.proxy.source} ({ref}); "
                    "a TCP port has one destination"
                )
                if loser.kind == "VirtualService":
                    conflicts[loser] = Rejection(loser, lost.path or "spec.tcp", message)
                else:
                    default_conflicts[loser] = Caveat(loser, "", f"not migrated by namespaceSelector: {message}")
            clusters = frozenset(c.cluster for c in part.proxy.clusters)
        else:
            state.tcp_winners.pop(listener, None)
            clusters = frozenset()
        for ref in set(state.conflicts.get(group, {})) | set(conflicts):
            dirty.outcomes[key].add(ref)
        _store(state.conflicts, group, conflicts)
        if default_conflicts != state.default_conflicts.get(group, {}):
            state.caveats_sorted = None
            dirty.gateways.add(key)
        _store(state.default_conflicts, group, default_conflicts)
        dirty.migration[key].update(touched)
        self._set_group_clusters(key, state, group, clusters, dirty)
        dirty.ports[key].add(listener)

    def _migration(self, key: str, state: _GatewayState, fqdn: str, dirty: _Dirty) -> None:
        """A Service moves only if every one of its ports is served by its own routes on this gateway."""
        explicit = state.explicit_members.get(fqdn)
        sources = sorted(
            (state.contribs[r] for r in (explicit or state.migrate_members.get(fqdn, ()))),
            key=lambda c: c.order,
        )
        sources = [c for c in sources if c.accepted]
        problem, service = "", None
        layout = state.view.layout
        if sources and layout.problem:
            service = sources[0].migrates[fqdn]
            problem = f"the gateway's shard Services are not usable: {layout.problem}"
        elif sources:
            service = sources[0].migrates[fqdn]
            scope = state.view.scope
            assert scope is not None
            wildcard = any(fqdn in c.wildcard_migrates for c in sources)
            shard_key = service_key(service.meta.namespace, service.meta.name)
            sharded = layout.shards > 1
            for sp in service.ports:
                listener = layout.listener(sp.port, shard_key) if sharded else sp.port
                if scope.port_kinds.get(sp.port) == "http":
                    lost = state.lost_domains.get((listener, fqdn))
                    if lost:
                        problem = (
                            f"on {_where(layout, listener)} its name(s) {lost[0]} belong to {lost[1]} (older); the "
                            "gateway cannot tell their clients apart, so it stays direct"
                        )
                    elif (sp.port, fqdn) in state.candidates or (wildcard and (sp.port, "*") in state.candidates):
                        continue
                    else:
                        problem = f"port {sp.port} has no HTTP route for {fqdn} on Gateway {scope.gateway}"
                else:
                    winner = state.tcp_winners.get(listener)
                    if winner is not None and fqdn in winner.part.services:
                        continue
                    holder = f" (it carries {winner.part.proxy.source})" if winner is not None else ""
                    shard = f" ({_shard(layout, listener)})" if sharded else ""
                    problem = f"TCP port {sp.port}{shard} of Gateway {scope.gateway} does not route to {fqdn}{holder}"
                break
        was = state.migrated.get(fqdn)
        old_problem = state.unmigrated.get(fqdn)
        if service is not None and not problem:
            state.migrated[fqdn] = service
            state.unmigrated.pop(fqdn, None)
        else:
            state.migrated.pop(fqdn, None)
            if problem:
                state.unmigrated[fqdn] = problem
            else:
                state.unmigrated.pop(fqdn, None)
        before = state.unmigrated_defaults.get(fqdn)
        if problem and sources and not sources[0].explicit:
            state.unmigrated_defaults[fqdn] = Caveat(
                sources[0].ref, "", f"not migrated by namespaceSelector: {problem}"
            )
        else:
            state.unmigrated_defaults.pop(fqdn, None)
        if before != state.unmigrated_defaults.get(fqdn):
            state.caveats_sorted = None
            dirty.gateways.add(key)
        if was is not state.migrated.get(fqdn) or old_problem != state.unmigrated.get(fqdn):
            dirty.names.add(fqdn)
            dirty.outcomes[key].update(r for r in state.migrate_members.get(fqdn, ()) if r.kind == "VirtualService")
            dirty.gateways.add(key)

    # ================================================================================== clusters

    def _set_group_clusters(
        self, key: str, state: _GatewayState, group: GroupId, clusters: frozenset[str], dirty: _Dirty
    ) -> None:
        old = state.group_clusters.get(group, frozenset())
        if old == clusters:
            return
        if clusters:
            state.group_clusters[group] = clusters
        else:
            state.group_clusters.pop(group, None)
        for name in clusters - old:
            state.cluster_refs[name] += 1
            if state.cluster_refs[name] == 1:
                dirty.clusters[key].add(name)
        for name in old - clusters:
            state.cluster_refs[name] -= 1
            if state.cluster_refs[name] == 0:
                del state.cluster_refs[name]
                dirty.clusters[key].add(name)

    def _refresh_clusters(self, dirty: _Dirty) -> None:
        touched_services = dirty.services_clusters | dirty.services_endpoints
        for key, state in self._states.items():
            referenced = dirty.clusters.pop(key, set())
            names = set(referenced)
            for svc in touched_services:
                names |= state.clusters_by_service.get(svc, set())
            for name in names:
                self._build_cluster(state, name, name in referenced, dirty)

    def _build_cluster(self, state: _GatewayState, name: str, referenced_changed: bool, dirty: _Dirty) -> None:
        """(Re)build a cluster and its endpoints, or drop both once no route references the cluster."""
        _, port_text, subset, fqdn = name.split("|", 3)
        scope = state.view.scope
        parts = split_service_fqdn(fqdn, scope.domain) if scope is not None else None
        service = self.snapshot.get("Service", *parts) if parts is not None else None
        if name not in state.cluster_refs or service is None or scope is None or parts is None:
            if subset and scope is not None and name in state.clusters:
                self._count_subset(name, scope.domain, -1)
            state.clusters.pop(name, None)
            state.endpoints.pop(name, None)
            if parts is not None and parts in state.clusters_by_service:
                state.clusters_by_service[parts].discard(name)
                if not state.clusters_by_service[parts]:
                    del state.clusters_by_service[parts]
            return
        port = int(port_text)
        rule = self.destination_rule(service, scope)
        if referenced_changed or parts in dirty.services_clusters or name not in state.clusters:
            if subset and name not in state.clusters:
                self._count_subset(name, scope.domain, 1)
            state.clusters[name] = build_cluster(service, fqdn, port, subset, rule)
        labels = None
        if subset:
            chosen = rule.subset(subset) if rule is not None else None
            # A subset that vanished selects nothing rather than everything.
            labels = chosen.labels if chosen is not None else (("canal.io/no-such-subset", "true"),)
        slices = [
            s
            for s in (self.snapshot.get("EndpointSlice", parts[0], n) for n in self._slices_by_service.get(parts, ()))
            if s
        ]
        state.endpoints[name] = ClusterLoadAssignment(name, select_endpoints(service, port, labels, slices, self._pod))
        state.clusters_by_service[parts].add(name)

    def _pod(self, namespace: str, name: str) -> Pod | None:
        return self.snapshot.get("Pod", namespace, name)

    def _count_subset(self, name: str, domain: str, delta: int) -> None:
        """Count a subset cluster in (or out of) `_subset_services` and `_subset_namespaces`: called exactly when
        one is built for a gateway, or dropped; a cluster without a subset is not counted."""
        _, _, subset, fqdn = name.split("|", 3)
        parts = split_service_fqdn(fqdn, domain) if subset else None
        if parts is None:
            return
        for counts, key in ((self._subset_services, parts), (self._subset_namespaces, parts[0])):
            left = counts.get(key, 0) + delta
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    # ================================================================================ listeners

    def _listener(self, state: _GatewayState, listener: int) -> None:
        """The Envoy listener bound to a listener port (the server port itself unless sharded)."""
        name = f"0.0.0.0_{listener}"
        scope = state.view.scope
        port = state.view.layout.server_ports.get(listener)
        kind = scope.port_kinds.get(port) if scope is not None and port is not None else None
        if kind == "http":
            route_name = f"http.{listener}"
            state.route_configs[route_name] = RouteConfig(route_name, state.vhosts[listener].publish())
            flags = state.filters.get(listener, {}).values()
            filters = tuple(
                f for f, used in (("cors", any(c for _, c in flags)), ("fault", any(f for f, _ in flags))) if used
            )
            state.listeners[name] = Listener(name, listener, "HTTP", route_config=route_name, http_filters=filters)
            return
        winner = state.tcp_winners.get(listener) if kind == "tcp" else None
        if winner is None:
            state.listeners.pop(name, None)
            return
        state.listeners[name] = Listener(
            name, listener, "TCP", tcp=TcpProxy(winner.part.proxy.clusters, winner.part.proxy.source)
        )

    # ============================================================================= names (DNS + redirects)

    def _refresh_names(self, dirty: _Dirty) -> None:
        for fqdn in sorted(dirty.names):
            owners = [
                (state.view.addressing.order, key, state.migrated[fqdn])
                for key, state in self._states.items()
                if fqdn in state.migrated and state.view.addressing is not None
            ]
            owner = min(owners, key=lambda o: (o[0], o[1])) if owners else None
            old_owner = self._name_owner.get(fqdn)
            if owner is None:
                self._name_owner.pop(fqdn, None)
            else:
                self._name_owner[fqdn] = owner[1]
            for key, state in self._states.items():
                lost = fqdn in state.migrated and owner is not None and owner[1] != key
                if lost != (fqdn in state.lost) or (lost and old_owner != owner[1]):
                    (state.lost.add if lost else state.lost.discard)(fqdn)
                    state.caveats_sorted = None
                    dirty.gateways.add(key)
            if old_owner != (owner[1] if owner else None):
                dirty.gateways.update(k for k in (old_owner, owner[1] if owner else None) if k in self._states)
            self._dns.pop(fqdn, None)
            for rkey in self._redirects_of.pop(fqdn, ()):
                self._redirects.pop(rkey, None)
            if owner is None:
                continue
            view = self._states[owner[1]].view
            addressing, layout = view.addressing, view.layout
            assert addressing is not None
            service: Service = owner[2]
            shard_key = service_key(service.meta.namespace, service.meta.name)
            addresses, target = addressing.addresses, addressing.target
            if addressing.shards:  # the shard Service of this Service's shard
                addresses, target = addressing.shards[shard_of(shard_key, len(addressing.shards))]
            if addressing.dns_mode != "none" and addresses:
                self._dns[fqdn] = DnsRecord(fqdn, addresses, addressing.ttl, owner[1], addressing.dns_mode, target)
            if addressing.redirect_mode != "none" and addressing.backends:
                keys = []
                for ip in service.cluster_ips:
                    v6 = is_ipv6(ip)
                    for sp in service.ports:
                        # the port itself, or sharded, the listener port of (port, shard)
                        listener = layout.listener(sp.port, shard_key) if addressing.shards else sp.port
                        backends = _backends(addressing.backends, v6, listener)
                        if not backends:
                            break
                        rkey = RedirectKey(ip, "tcp", sp.port)
                        self._redirects[rkey] = RedirectRule(
                            rkey,
                            backends,
                            f"{service.meta.namespace}/{service.meta.name}",
                            owner[1],
                            addressing.redirect_mode,
                        )
                        keys.append(rkey)
                if keys:
                    self._redirects_of[fqdn] = tuple(keys)

    # ==================================================================================== status

    def _refresh_status(self, dirty: _Dirty) -> None:
        for key, refs in dirty.outcomes.items():
            state = self._states.get(key)
            if state is None:
                continue
            for ref in refs:
                if self._outcome(state, ref):
                    dirty.gateways.add(key)
            dirty.status.update(refs)
        for key in dirty.gateways:
            view = self._views.get(key)
            if view is not None:
                dirty.status.add(view.ig.ref)
        for ref in dirty.status:
            status = self._object_status(ref)
            if status is None:
                self._status.pop(ref, None)
            else:
                self._status[ref] = status

    def _outcome(self, state: _GatewayState, ref: ObjectRef) -> bool:
        """Recompute a VirtualService's result on one gateway; True when the gateway's status must follow."""
        contrib = state.contribs.get(ref)
        name = f"{ref.namespace}/{ref.name}"
        if contrib is None:
            state.outcomes.pop(ref, None)
            outcome = None
        else:
            rejections = list(contrib.rejections)
            for group in state.conflicts.values():
                if ref in group:
                    rejections.append(group[ref])
            if contrib.accepted:
                for fqdn in contrib.migrates:
                    problem = state.unmigrated.get(fqdn)
                    if problem:
                        rejections.append(
                            Rejection(ref, "spec.hosts", f"{fqdn} is not moved to the gateway: {problem}")
                        )
            outcome = _Outcome(contrib.accepted, _sorted(rejections), contrib.caveats)
            state.outcomes[ref] = outcome
        changed = False
        accepted = outcome is not None and outcome.accepted
        if accepted != (name in state.bound):
            (state.bound.add if accepted else state.bound.discard)(name)
            state.bound_frozen = None
            changed = True
        found = outcome.rejections if outcome is not None else ()
        if found != state.ref_rejections.get(ref, ()):
            if bool(found) != (ref in state.ref_rejections):
                (state.rejected.add if found else state.rejected.discard)(name)
                state.rejected_frozen = None
            if found:
                state.ref_rejections[ref] = found
            else:
                state.ref_rejections.pop(ref, None)
            changed = True
        return changed

    def _object_status(self, ref: ObjectRef) -> ObjectStatus | None:
        problems = self.snapshot.problems.get(ref)
        obj = self.snapshot.get(ref.kind, ref.namespace, ref.name)
        if obj is None and problems is None:
            return None
        generation = problems.generation if problems else (getattr(getattr(obj, "meta", None), "generation", 0) or 0)
        rejections = list(problems.rejections) if problems else []
        caveats = list(problems.caveats) if problems else []
        if ref.kind == "VirtualService":
            bound = set()
            for key, state in self._states.items():
                outcome = state.outcomes.get(ref)
                if outcome is None:
                    continue
                rejections.extend(outcome.rejections)
                caveats.extend(outcome.caveats)
                if outcome.accepted:
                    bound.add(key)
            if not bound and not rejections and not caveats:
                return None
            return ObjectStatus(
                ref,
                generation,
                (_accepted(rejections, bool(bound)),) if rejections else _ACCEPTED,
                _sorted(rejections),
                _sorted(caveats),
                _interned_set(bound),
            )
        if ref.kind == "InternalGateway":
            return self._gateway_status(ref, generation, rejections, caveats)
        if not rejections and not caveats:
            return None
        return ObjectStatus(
            ref, generation, (_accepted(rejections, not rejections),), _sorted(rejections), _sorted(caveats)
        )

    def _gateway_status(
        self, ref: ObjectRef, generation: int, rejections: list[Rejection], caveats: list[Caveat]
    ) -> ObjectStatus:
        key = f"{ref.namespace}/{ref.name}"
        view, state = self._views.get(key), self._states.get(key)
        if view is None or state is None:
            return ObjectStatus(ref, generation, (_accepted(rejections, False),), _sorted(rejections), _sorted(caveats))
        own = list(view.rejections)
        conditions = [_accepted(own + rejections, view.scope is not None)]
        if view.addressing is not None:
            conditions.extend(view.addressing.conditions)
        if state.bound_frozen is None:
            state.bound_frozen = frozenset(state.bound)
        if state.rejected_frozen is None:
            state.rejected_frozen = frozenset(state.rejected)
        rejected = state.rejected_frozen
        if view.scope is not None:
            gw = (view.scope.gateway.namespace, view.scope.gateway.name)
            unparsed = {f"{r.namespace}/{r.name}" for r in self._rejected_vs_by_gateway.get(gw, ())}
            if unparsed:
                rejected = rejected | unparsed
        if state.caveats_sorted is None:
            state.caveats_sorted = self._gateway_caveats(ref, view, state)
        migrated = len(state.migrated) - len(state.lost)
        conditions.append(
            Condition(
                "Migrated",
                "True" if migrated else "False",
                "Services",
                f"{migrated} Service(s) moved behind the gateway",
            )
        )
        return ObjectStatus(
            ref,
            generation,
            tuple(conditions),
            _sorted(own + rejections),
            _sorted([*caveats, *state.caveats_sorted]),
            state.bound_frozen,
            rejected,
        )

    def _gateway_caveats(self, ref: ObjectRef, view: GatewayView, state: _GatewayState) -> tuple[Caveat, ...]:
        """Everything worth telling about a gateway that changes nothing; sorted once per change, not per status."""
        caveats = list(view.caveats)
        if view.addressing is not None:
            caveats.extend(view.addressing.caveats)
        caveats.extend(state.domain_caveats.values())
        for group in state.default_conflicts.values():
            caveats.extend(group.values())
        for found in state.default_caveats.values():
            caveats.extend(found)
        caveats.extend(state.unmigrated_defaults.values())
        for fqdn in state.lost:
            caveats.append(
                Caveat(
                    ref,
                    "",
                    f"{fqdn} is routed here, but DNS and redirects belong to the older InternalGateway "
                    f"{self._name_owner.get(fqdn)}",
                )
            )
        return _sorted(caveats)

    # =================================================================================== publish

    def _publish(self) -> DesiredState:
        """Apply this batch's deltas to the published maps; untouched parts are shared with the last state."""
        for key in set(self._envoy.data) - set(self._states):
            self._envoy.pop(key)
        for key, state in self._states.items():
            tables = (state.listeners, state.route_configs, state.clusters, state.endpoints)
            if key not in self._envoy or any(t.changed for t in tables):
                self._envoy[key] = EnvoyConfig(*(t.publish() for t in tables))
        return DesiredState(
            envoy=self._envoy.publish(),
            dns=self._dns.publish(),
            redirects=self._redirects.publish(),
            status=self._status.publish(),
        )


@lru_cache(maxsize=1024)
def _backends(addresses: tuple[str, ...], v6: bool, port: int) -> tuple[Backend, ...]:
    """The gateway pods of one address family on one port; shared by every rule that redirects there."""
    return tuple(Backend(a, port) for a in addresses if is_ipv6(a) == v6)


def _shard(layout: ShardLayout, listener: int) -> str:
    return f"shard {layout.shard_index[listener]}, listener port {listener}"


def _where(layout: ShardLayout, listener: int) -> str:
    """A listener as status names it: its server port, and its shard when the gateway is sharded."""
    port = layout.server_ports[listener]
    return f"port {port}" if layout.shards <= 1 else f"port {port} ({_shard(layout, listener)})"


def _listed(items: list[str], limit: int = 8) -> str:
    """A list for a status message, bounded: 256 broken shards should not make a 256-item sentence."""
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def _runs(numbers: tuple[int, ...]) -> str:
    """Ports as runs: 20000-20031 rather than 32 numbers."""
    out: list[str] = []
    start = prev = None
    for n in (*numbers, None):
        if start is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(out)


def _store(target: dict[Any, dict], group: Any, entries: dict) -> None:
    if entries:
        target[group] = entries
    else:
        target.pop(group, None)


def _problem_key(item: Rejection | Caveat) -> tuple[Any, ...]:
    return (item.ref, item.field, item.reason if isinstance(item, Rejection) else item.message)


def _sorted(items: Iterable[Any]) -> tuple[Any, ...]:
    """Sorted by a tuple key: comparing tuples runs in C, comparing dataclasses does not."""
    return tuple(sorted(set(items), key=_problem_key))


@lru_cache(maxsize=256)
def _frozen(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


def _interned_set(names: set[str]) -> frozenset[str]:
    """Most VirtualServices are bound to the same one or two gateways: share those sets."""
    return _frozen(tuple(sorted(names))) if len(names) <= 2 else frozenset(names)


_ACCEPTED = (Condition("Accepted", "True", "Accepted"),)


def _accepted(rejections: list[Rejection], bound: bool) -> Condition:
    if not rejections:
        return _ACCEPTED[0]
    message = "; ".join(f"{r.field}: {r.reason}" for r in _sorted(rejections)[:5])
    return Condition("Accepted", "False", "PartiallyInvalid" if bound else "Invalid", message)


__all__ = ["Translator", "pod_namespace_bound", "snapshot_items", "translate"]
