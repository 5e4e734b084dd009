"""Clusters (load balancing and connection policy from DestinationRules) and their endpoints (EndpointSlices)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from canal.desired import CircuitBreakers, Cluster, Endpoint
from canal.model.base import UINT32_MAX
from canal.model.istio import DestinationRule, TrafficPolicy
from canal.model.kube import HTTP2_APP_PROTOCOLS, EndpointSlice, Pod, Service
from canal.translate.names import cluster_name

# Istio's defaults for a gateway cluster: Envoy's own (1024 connections/requests) would throttle a router
# that carries many clients' traffic to one Service.
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
_UNLIMITED = UINT32_MAX
DEFAULT_LB = "LEAST_REQUEST"


def build_cluster(service: Service, fqdn: str, port: int, subset: str, rule: DestinationRule | None) -> Cluster:
    policy = rule.effective_policy(subset, port) if rule is not None else TrafficPolicy()
    lb, pool = policy.load_balancer, policy.connection_pool
    lb_policy, consistent = DEFAULT_LB, None
    if lb is not None:
        if lb.consistent_hash is not None:
            consistent = lb.consistent_hash
            lb_policy = "MAGLEV" if consistent.table == "maglev" else "RING_HASH"
        elif lb.simple:
            lb_policy = lb.simple
    service_port = service.port(port)
    http2 = service_port is not None and service_port.app_protocol in HTTP2_APP_PROTOCOLS
    if pool is not None and pool.h2_upgrade_policy == "UPGRADE":
        http2 = True
    breakers = CircuitBreakers(
        max_connections=(pool and pool.max_connections) or _UNLIMITED,
        max_pending_requests=(pool and pool.http1_max_pending_requests) or _UNLIMITED,
        max_requests=(pool and pool.http2_max_requests) or _UNLIMITED,
        max_retries=(pool and pool.max_retries) or _UNLIMITED,
    )
    return Cluster(
        name=cluster_name(port, subset, fqdn),
        service=f"{service.meta.namespace}/{service.meta.name}",
        fqdn=fqdn,
        port=port,
        subset=subset,
        lb_policy=lb_policy,
        connect_timeout_ms=(pool and pool.connect_timeout_ms) or DEFAULT_CONNECT_TIMEOUT_MS,
        circuit_breakers=breakers,
        http2=http2,
        consistent_hash=consistent,
        outlier_detection=policy.outlier_detection,
        idle_timeout_ms=pool.idle_timeout_ms if pool else None,
        max_requests_per_connection=pool.max_requests_per_connection if pool else None,
        max_connection_duration_ms=pool.max_connection_duration_ms if pool else None,
        max_concurrent_streams=pool.max_concurrent_streams if pool else None,
        tcp_keepalive=pool.tcp_keepalive if pool else None,
        warmup_ms=lb.warmup_ms if lb else None,
    )


def select_endpoints(
    service: Service,
    port: int,
    labels: tuple[tuple[str, str], ...] | None,
    slices: Iterable[EndpointSlice],
    pod: Callable[[str, str], Pod | None],
) -> tuple[Endpoint, ...]:
    """Pod addresses for one Service port (and subset), ready ones only.

    Like kube-proxy (KEP-1669), when no endpoint is ready the serving-but-terminating ones are used, so a
    rolling restart of the last pods drains instead of failing. Subset membership is read from the Pod's
    labels; an endpoint whose Pod is unknown is left out of subsets rather than guessed into one.
    """
    service_port = service.port(port)
    if service_port is None:
        return ()
    ready: dict[tuple[str, int], Endpoint] = {}
    draining: dict[tuple[str, int], Endpoint] = {}
    for slc in slices:
        if slc.address_type == "FQDN":
            continue
        target = next(
            (p.port for p in slc.ports if p.name == service_port.name and p.protocol == service_port.protocol),
            None,
        )
        if target is None:
            continue
        for ep in slc.endpoints:
            if not ep.addresses:
                continue
            if labels is not None:
                owner = pod(slc.meta.namespace, ep.pod) if ep.pod else None
                if owner is None or any(owner.meta.labels.get(k) != v for k, v in labels):
                    continue
            if ep.ready:
                ready[(ep.addresses[0], target)] = Endpoint(ep.addresses[0], target, ep.node_name, ep.zone)
            elif ep.serving and ep.terminating:
                draining[(ep.addresses[0], target)] = Endpoint(ep.addresses[0], target, ep.node_name, ep.zone)
    chosen = ready or draining
    return tuple(chosen[k] for k in sorted(chosen))
