"""Compile one VirtualService (or a namespace default route) against one InternalGateway: a pure function."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from canal.desired import (
    ClusterWeight,
    Forward,
    HashPolicy,
    HeaderMatcher,
    MirrorPolicy,
    PathMatch,
    QueryMatcher,
    RetryPolicy,
    Route,
    RouteMatch,
    TcpProxy,
)
from canal.model.base import Caveat, FieldError, Rejection
from canal.model.istio import (
    MESH_GATEWAY,
    Destination,
    DestinationRule,
    DirectResponse,
    HttpMatch,
    HttpRoute,
    Redirect,
    Retries,
    StringMatch,
    TcpRoute,
    VirtualService,
)
from canal.model.kube import OPAQUE_APP_PROTOCOLS, Service
from canal.model.values import check_regex
from canal.translate.context import Contribution, GatewayScope, Lookup, RoutesSummary, TcpPart, VhostPart
from canal.translate.names import cluster_name, host_candidates, server_admits, split_service_fqdn

# Istio's default retry policy for every HTTP route without `retries`: migrating off sidecars must not change
# how failures are retried.
DEFAULT_RETRY = RetryPolicy(
    attempts=2,
    retry_on=("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"),
    retriable_status_codes=(503,),
)
_DEFAULT_RETRY_ON = DEFAULT_RETRY.retry_on


def gateway_names(entries: tuple[str, ...], namespace: str) -> list[tuple[str, str]]:
    """spec.gateways entries as (namespace, name): `ns/name`, legacy `name.ns.svc...`, or `name` in the VS's ns."""
    out = []
    for entry in entries:
        if entry == MESH_GATEWAY:
            continue
        ns, sep, name = entry.partition("/")
        if sep:
            out.append((ns, name))
        elif "." in entry:
            parts = entry.split(".")
            out.append((parts[1], parts[0]))
        else:
            out.append((namespace, entry))
    return out


def binds(vs: VirtualService, scope: GatewayScope) -> bool:
    target = (scope.gateway.namespace, scope.gateway.name)
    return target in gateway_names(vs.gateways, vs.meta.namespace)


@dataclass(slots=True)
class _Resolved:
    service: Service
    fqdn: str


class _Compiler:
    """State for compiling one VirtualService; collects every problem instead of stopping at the first."""

    def __init__(self, vs: VirtualService, scope: GatewayScope, lookup: Lookup) -> None:
        self.vs = vs
        self.scope = scope
        self.lookup = lookup
        self.ref = vs.ref
        self.errors: list[FieldError] = []
        self.caveats: list[Caveat] = []
        self.resolved: dict[str, _Resolved | None] = {}
        self.rules: dict[tuple[str, str], DestinationRule | None] = {}

    # ------------------------------------------------------------------------------------- resolution

    def resolve(self, host: str) -> _Resolved | None:
        """The Service a host names; memoised per compilation (routes repeat the same few hosts)."""
        try:
            return self.resolved[host]
        except KeyError:
            found = self.resolved[host] = self._resolve(host)
            return found

    def rule_for(self, service: Service) -> DestinationRule | None:
        key = (service.meta.namespace, service.meta.name)
        try:
            return self.rules[key]
        except KeyError:
            found = self.rules[key] = self.lookup.destination_rule(service, self.scope)
            return found

    def _resolve(self, host: str) -> _Resolved | None:
        for candidate in host_candidates(host, self.vs.meta.namespace, self.scope.domain):
            parts = split_service_fqdn(candidate, self.scope.domain)
            if parts is None:
                continue
            service = self.lookup.service(*parts)
            if service is not None:
                return _Resolved(service, candidate)
        return None

    def destination_port(self, dest: Destination, service: Service, listener_port: int) -> int:
        """Explicit port, else the listener's port when the Service has it, else the Service's only port."""
        if dest.port is not None:
            if service.port(dest.port) is None:
                ports = ", ".join(str(p.port) for p in service.ports) or "none"
                raise FieldError(f"{dest.path}.port.number", f"{service.ref} has no port {dest.port} (ports: {ports})")
            return dest.port
        if service.port(listener_port) is not None:
            return listener_port
        if len(service.ports) == 1:
            return service.ports[0].port
        ports = ", ".join(str(p.port) for p in service.ports) or "none"
        raise FieldError(
            f"{dest.path}.port",
            f"is required: {service.ref} has ports {ports} and none is the listener port {listener_port}",
        )

    def destination(self, dest: Destination, listener_port: int) -> tuple[str, _Resolved, int]:
        resolved = self.resolve(dest.host)
        if resolved is None:
            raise FieldError(
                f"{dest.path}.host",
                f"no Service {dest.host!r} (looked up from namespace {self.vs.meta.namespace})",
            )
        service = resolved.service
        if service.type == "ExternalName":
            raise FieldError(
                f"{dest.path}.host",
                f"{service.ref} is an ExternalName Service; it has no endpoints to route to",
            )
        port = self.destination_port(dest, service, listener_port)
        if dest.subset:
            rule = self.rule_for(service)
            if rule is None:
                raise FieldError(f"{dest.path}.subset", f"no DestinationRule defines subsets for {resolved.fqdn}")
            if rule.subset(dest.subset) is None:
                known = ", ".join(s.name for s in rule.subsets) or "none"
                raise FieldError(
                    f"{dest.path}.subset", f"{rule.ref} defines no subset {dest.subset!r} (subsets: {known})"
                )
        return cluster_name(port, dest.subset, resolved.fqdn), resolved, port

    # ---------------------------------------------------------------------------------------- routes

    def match_applies(self, match: HttpMatch | None, port: int) -> bool:
        if match is None:
            return True
        if match.port is not None and match.port != port:
            return False
        if match.gateways:
            names = gateway_names(match.gateways, self.vs.meta.namespace)
            return (self.scope.gateway.namespace, self.scope.gateway.name) in names
        return True

    def route_match(self, match: HttpMatch | None) -> RouteMatch:
        if match is None:
            return _interned_match("prefix", "/", False)
        if match.uri is None:
            kind, value, ignore_case = "prefix", "/", False
        elif match.uri.kind == "regex" and match.ignore_uri_case:
            # Envoy ignores case_sensitive for regex matches; RE2's (?i) flag is the equivalent.
            kind, value, ignore_case = "regex", check_regex("(?i)" + match.uri.value, f"{match.path}.uri.regex"), False
        else:
            kind, value, ignore_case = match.uri.kind, match.uri.value, match.ignore_uri_case
        if not (match.method or match.authority or match.scheme or match.headers or match.query_params):
            return _interned_match(kind, value, ignore_case)
        path = _interned_match(kind, value, ignore_case).path
        headers = []
        for name, sm in (
            (":method", match.method),
            (":authority", match.authority),
            (":scheme", match.scheme),
        ):
            if sm is not None:
                headers.append(HeaderMatcher(name, sm.kind, sm.value))
        for cond in match.headers:
            headers.append(_header_matcher(cond.name, cond.match, cond.invert))
        query = tuple(
            QueryMatcher(name, sm.kind, sm.value) if sm is not None else QueryMatcher(name, "present")
            for name, sm in match.query_params
        )
        return RouteMatch(path, tuple(headers), query)

    def hash_policies(self, resolved: list[tuple[_Resolved, Destination, int]]) -> tuple[HashPolicy, ...]:
        for target, dest, port in resolved:
            rule = self.rule_for(target.service)
            if rule is None:
                continue
            lb = rule.effective_policy(dest.subset, port).load_balancer
            if lb is not None and lb.consistent_hash is not None:
                h = lb.consistent_hash
                return (HashPolicy(h.key, h.name, h.cookie_path, h.cookie_ttl_ms),)
        return ()

    def build_routes(self, index: int, route: HttpRoute, port: int) -> list[Route]:
        """The Envoy routes of one HTTP route on one listener port."""
        matches: list[HttpMatch | None] = list(route.matches) or [None]
        applicable = [(j, m) for j, m in enumerate(matches) if self.match_applies(m, port)]
        if not applicable:
            return []
        return self._build_routes(index, route, port, applicable)

    def _build_routes(
        self, index: int, route: HttpRoute, port: int, applicable: list[tuple[int, HttpMatch | None]]
    ) -> list[Route]:
        label = route.name or str(index)
        request_headers, response_headers = route.headers.request, route.headers.response
        action: Forward | Redirect | DirectResponse
        if route.redirect is not None:
            action = route.redirect
        elif route.direct_response is not None:
            action = route.direct_response
        else:
            weights: list[ClusterWeight] = []
            resolved: list[tuple[_Resolved, Destination, int]] = []
            for wd in route.destinations:
                name, target, dest_port = self.destination(wd.destination, port)
                if wd.headers.request or wd.headers.response:
                    weights.append(ClusterWeight(name, wd.weight, wd.headers.request, wd.headers.response))
                else:
                    weights.append(_interned_weight(name, wd.weight))
                resolved.append((target, wd.destination, dest_port))
            mirrors = []
            for mirror in route.mirrors:
                name, _, _ = self.destination(mirror.destination, port)
                mirrors.append(MirrorPolicy(name, mirror.percent))
            rewrite = route.rewrite
            action = Forward(
                clusters=tuple(weights),
                timeout_ms=route.timeout_ms or 0,
                retry=_retry_policy(route.retries),
                prefix_rewrite=rewrite.uri if rewrite is not None else None,
                regex_rewrite=(rewrite.regex_match, rewrite.regex_substitution)
                if rewrite is not None and rewrite.regex_match
                else None,
                host_rewrite=(
                    rewrite.authority if rewrite is not None and rewrite.authority else route.headers.authority
                ),
                mirrors=tuple(mirrors),
                hash_policies=self.hash_policies(resolved),
            )
        out = []
        for j, match in applicable:
            match_label = match.name if match is not None and match.name else str(j)
            out.append(
                Route(
                    name=f"{self.vs.meta.namespace}/{self.vs.meta.name}/{label}/{match_label}",
                    match=self.route_match(match),
                    action=action,
                    fault=route.fault,
                    cors=route.cors,
                    request_headers=request_headers,
                    response_headers=response_headers,
                )
            )
        return out

    def tcp_proxy(self, index: int, route: TcpRoute, port: int) -> tuple[TcpProxy, list[_Resolved]]:
        weights, targets = [], []
        for wd in route.destinations:
            name, target, _ = self.destination(wd.destination, port)
            weights.append(_interned_weight(name, wd.weight))
            targets.append(target)
        return TcpProxy(tuple(weights), f"{self.vs.meta.namespace}/{self.vs.meta.name}/tcp/{index}"), targets

    # ------------------------------------------------------------------------------------- the whole

    def admitted_ports(self, host: str) -> list[int]:
        ns, gw_ns = self.vs.meta.namespace, self.scope.gateway.namespace
        return sorted({s.port for s in self.scope.servers if any(server_admits(h, gw_ns, ns, host) for h in s.hosts)})

    def attempt(self, fn, *args):  # noqa: ANN001 - small internal helper
        try:
            return fn(*args)
        except FieldError as err:
            self.errors.append(err)
            return None

    def compile(self) -> Contribution:
        vs, scope = self.vs, self.scope
        hosts: list[tuple[int, str, _Resolved | None, list[int]]] = []
        for i, host in enumerate(vs.hosts):
            resolved = self.resolve(host) if "*" not in host else None
            if resolved is not None:
                name = resolved.fqdn
            elif "*" in host:
                name = host
            else:  # not a Service: served under its (expanded) literal name, never DNS-rewritten
                name = host_candidates(host, vs.meta.namespace, scope.domain)[0]
            ports = self.admitted_ports(name)
            if not ports:
                self.caveats.append(
                    Caveat(
                        self.ref,
                        f"spec.hosts[{i}]",
                        f"no server of Gateway {scope.gateway} accepts host {name!r}; not served",
                    )
                )
            hosts.append((i, name, resolved, ports))
            if host == "*" and ports:
                self.caveats.append(
                    Caveat(
                        self.ref,
                        f"spec.hosts[{i}]",
                        "'*' shares one catch-all virtual host with every other such VirtualService (original "
                        "Canal behaviour); name the Service as the host to give it its own virtual host",
                    )
                )
        if not any(ports for *_, ports in hosts):
            self.errors.append(
                FieldError(
                    "spec.hosts",
                    f"no server of Gateway {scope.gateway} accepts any of these hosts "
                    f"from namespace {vs.meta.namespace}",
                )
            )
        # A Service host is served on the ports it has (clients only ever call those); other hosts on every
        # port their servers admit.
        admitted = {i: ports for i, _, _, ports in hosts}
        hosts = [(i, name, resolved, _own_ports(resolved, ports)) for i, name, resolved, ports in hosts]
        all_ports = sorted({p for *_, ports in hosts for p in ports})
        http_ports = [p for p in all_ports if scope.port_kinds.get(p) == "http"]
        tcp_ports = [p for p in all_ports if scope.port_kinds.get(p) == "tcp"]

        # HTTP: one route list per listener port, shared by every host the port's servers accept.
        routes_by_port: dict[int, tuple[Route, ...]] = {}
        wildcard_targets: dict[str, Service] = {}
        for port in http_ports:
            built: list[Route] = []
            for i, route in enumerate(vs.http):
                result = self.attempt(self.build_routes, i, route, port)
                if result:
                    built.extend(result)
            if built:
                routes_by_port[port] = tuple(built)
        wildcard = any(name == "*" for _, name, _, _ in hosts)
        if wildcard:
            for port in http_ports:
                for route in vs.http:
                    for wd in route.destinations:
                        target = self.attempt(self.destination, wd.destination, port)
                        if target is not None:
                            wildcard_targets[target[1].fqdn] = target[1].service

        tcp_parts: dict[int, TcpPart] = {}
        tcp_targets: dict[int, list[_Resolved]] = {}
        for port in tcp_ports:
            for i, route in enumerate(vs.tcp):
                if route.matches and not any(
                    (m.port is None or m.port == port)
                    and (
                        not m.gateways
                        or (scope.gateway.namespace, scope.gateway.name) in gateway_names(m.gateways, vs.meta.namespace)
                    )
                    for m in route.matches
                ):
                    continue
                result = self.attempt(self.tcp_proxy, i, route, port)
                if result is not None and port not in tcp_parts:
                    tcp_parts[port] = TcpPart(i, result[0], frozenset(), route.path)
                    tcp_targets[port] = result[1]

        # Which Services move behind the gateway: the hosts that are Services, or the destinations of `*`.
        migrates: dict[str, Service] = {}
        for i, _name, resolved, _ports in hosts:
            if resolved is not None and admitted[i]:
                self.check_migratable(resolved, f"spec.hosts[{i}]", admitted[i])
                migrates[resolved.fqdn] = resolved.service
        wildcard_migrates: set[str] = set()
        if wildcard:
            wildcard_ports = next(ports for _, name, _, ports in hosts if name == "*")
            for fqdn, service in sorted(wildcard_targets.items()):
                self.check_migratable(_Resolved(service, fqdn), "spec.http", wildcard_ports)
                migrates[fqdn] = service
                wildcard_migrates.add(fqdn)
            for targets in tcp_targets.values():
                for target in targets:
                    self.check_migratable(target, "spec.tcp", wildcard_ports)
                    migrates[target.fqdn] = target.service
        for port, part in list(tcp_parts.items()):
            served = frozenset(f for f, s in migrates.items() if s.port(port) is not None)
            tcp_parts[port] = TcpPart(part.index, part.proxy, served, part.path)

        if self.errors:
            return Contribution(
                self.ref,
                (0, *vs.meta.order),
                rejections=_dedupe(Rejection(self.ref, e.path, e.reason) for e in self.errors),
                caveats=tuple(self.caveats),
            )
        vhosts: dict[tuple[int, str], VhostPart] = {}
        summaries = {port: RoutesSummary.of(routes) for port, routes in routes_by_port.items()}
        for _, name, resolved, ports in hosts:
            for port in ports:
                routes = routes_by_port.get(port)
                if routes is None or scope.port_kinds.get(port) != "http":
                    continue
                vkey = resolved.fqdn if resolved else name
                vhosts[(port, vkey)] = VhostPart(vkey, resolved.service if resolved else None, routes, summaries[port])
        return Contribution(
            self.ref,
            (0, *vs.meta.order),
            vhosts=vhosts,
            tcp=tcp_parts,
            migrates=migrates,
            wildcard_migrates=frozenset(wildcard_migrates),
            caveats=tuple(self.caveats),
        )

    def check_migratable(self, target: _Resolved, path: str, admitted_ports: list[int]) -> None:
        """Rewriting a name moves every port of the Service: each one must be served by the gateway."""
        problem = migration_problem(target.service, self.scope, admitted_ports)
        if problem:
            self.errors.append(FieldError(path, problem))


def _own_ports(resolved: _Resolved | None, ports: list[int]) -> list[int]:
    if resolved is None:
        return ports
    return [p for p in ports if resolved.service.port(p) is not None]


def migration_problem(service: Service, scope: GatewayScope, admitted_ports: list[int] | None = None) -> str:
    """Why a Service cannot be moved behind this gateway, or "" when it can."""
    if service.type == "ExternalName":
        return f"{service.ref} is an ExternalName Service and cannot be migrated"
    if f"{service.meta.namespace}/{service.meta.name}" in scope.exclude:
        return f"{service.ref} is the gateway's own Service and cannot be routed through itself"
    if not service.ports:
        return f"{service.ref} has no ports"
    for sp in service.ports:
        if sp.protocol != "TCP":
            return f"port {sp.port}/{sp.protocol} of {service.ref} cannot be carried by the gateway (TCP only)"
        kind = scope.port_kinds.get(sp.port)
        if kind is None or (admitted_ports is not None and sp.port not in admitted_ports):
            return (
                f"port {sp.port} of {service.ref} has no matching server on Gateway {scope.gateway}; "
                "rewriting the name would break that port"
            )
        if kind == "http" and sp.app_protocol in OPAQUE_APP_PROTOCOLS:
            return (
                f"port {sp.port} of {service.ref} is declared {sp.app_protocol}, but the Gateway server on that "
                "port is HTTP"
            )
    return ""


# Equal values are shared: tens of thousands of routes repeat the same few paths and cluster weights, and
# building a frozen dataclass costs a microsecond. Bounded so a long-running controller cannot grow them forever.
_INTERN_LIMIT = 200_000
_MATCHES: dict[tuple[str, str, bool], RouteMatch] = {}
_WEIGHTS: dict[tuple[str, int], ClusterWeight] = {}


def _interned_match(kind: str, value: str, ignore_case: bool) -> RouteMatch:
    key = (kind, value, ignore_case)
    found = _MATCHES.get(key)
    if found is None:
        if len(_MATCHES) > _INTERN_LIMIT:
            _MATCHES.clear()
        found = _MATCHES[key] = RouteMatch(PathMatch(kind, value, ignore_case))
    return found


def _interned_weight(cluster: str, weight: int) -> ClusterWeight:
    key = (cluster, weight)
    found = _WEIGHTS.get(key)
    if found is None:
        if len(_WEIGHTS) > _INTERN_LIMIT:
            _WEIGHTS.clear()
        found = _WEIGHTS[key] = ClusterWeight(cluster, weight)
    return found


def _header_matcher(name: str, sm: StringMatch | None, invert: bool) -> HeaderMatcher:
    if sm is None:
        return HeaderMatcher(name, "present", "", invert)
    return HeaderMatcher(name, sm.kind, sm.value, invert)


@lru_cache(maxsize=4096)
def _retry_policy(retries: Retries | None) -> RetryPolicy | None:
    if retries is None:
        return DEFAULT_RETRY
    if retries.attempts == 0:
        return None
    retry_on = retries.retry_on or _DEFAULT_RETRY_ON
    codes = retries.retriable_status_codes or ((503,) if not retries.retry_on else ())
    return RetryPolicy(
        attempts=retries.attempts,
        retry_on=retry_on,
        per_try_timeout_ms=retries.per_try_timeout_ms,
        retriable_status_codes=codes,
        backoff_ms=retries.backoff_ms,
        retry_remote_localities=retries.retry_remote_localities,
    )


def _dedupe(rejections) -> tuple[Rejection, ...]:  # noqa: ANN001
    return tuple(sorted(set(rejections)))


def compile_virtual_service(vs: VirtualService, scope: GatewayScope, lookup: Lookup) -> Contribution:
    return _Compiler(vs, scope, lookup).compile()


def compile_default(service: Service, scope: GatewayScope) -> Contribution:
    """namespaceSelector: all paths of every port to the Service itself, unless a VirtualService claims it."""
    fqdn = service.fqdn(scope.domain)
    order = (1, *service.meta.order)
    problem = migration_problem(service, scope)
    if problem:
        return Contribution(
            service.ref,
            order,
            caveats=(Caveat(service.ref, "", f"not migrated by namespaceSelector: {problem}"),),
        )
    vhosts: dict[tuple[int, str], VhostPart] = {}
    tcp: dict[int, TcpPart] = {}
    for sp in service.ports:
        cluster = (ClusterWeight(cluster_name(sp.port, "", fqdn), 100),)
        if scope.port_kinds.get(sp.port) == "http":
            route = Route(
                name=f"namespace-default/{service.meta.namespace}/{service.meta.name}",
                match=RouteMatch(PathMatch("prefix", "/")),
                action=Forward(clusters=cluster, retry=DEFAULT_RETRY),
            )
            vhosts[(sp.port, fqdn)] = VhostPart(fqdn, service, (route,), RoutesSummary.of((route,)))
        else:
            source = f"namespace-default/{service.meta.namespace}/{service.meta.name}"
            tcp[sp.port] = TcpPart(0, TcpProxy(cluster, source), frozenset({fqdn}), "")
    return Contribution(service.ref, order, vhosts=vhosts, tcp=tcp, migrates={fqdn: service})


__all__ = [
    "DEFAULT_RETRY",
    "binds",
    "compile_default",
    "compile_virtual_service",
    "gateway_names",
    "migration_problem",
]
