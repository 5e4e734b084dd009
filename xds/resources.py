"""Envoy v3 resources from the desired state: pure, deterministic functions, one small builder per concept.

The desired state (canal.desired) already carries Envoy's semantics; this module only spells them as protos.
Where the model follows Istio, the protos are what an Istio gateway would be sent (retry host predicates,
outlier-detection enforcement, dropped zero weights, ...). Two things are deliberately not 1:1:

- Percentages become FractionalPercent over a MILLION (like Istio), rounded to the nearest millionth (Istio
  truncates, which turns 0.29% into 2899 instead of 2900).
- Redirect derivePort: Envoy has no dynamic "port of the request" or "default port of the scheme" setting; it
  only has a fixed ``port_redirect``, and without one it keeps the port of the request's Host header (dropping
  it when ``host_redirect`` is set, or when the scheme changes and the port was the old scheme's default).
  FROM_PROTOCOL_DEFAULT is therefore sent as the scheme's default port (443 for https, else 80: the gateway's
  listeners are plain HTTP), which yields exactly the protocol-default URL even when the client used another
  port; Istio sends nothing there and so keeps such a port. FROM_REQUEST_PORT is sent as no port: Envoy keeps
  the Host header's port, which is the port the client addressed, except in the two cases above. Istio sends
  the listener port instead, which only the translator knows (a RouteConfig does not carry it), so it is the
  translator's to resolve into ``Redirect.port``.

Everything whose order carries no meaning is sorted, and ``typed_config`` payloads are packed with
deterministic serialization, so equal inputs give byte-identical ``SerializeToString(deterministic=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from canal.desired import (
    CircuitBreakers,
    Cluster,
    ClusterLoadAssignment,
    ClusterWeight,
    Forward,
    HashPolicy,
    HeaderMatcher,
    Listener,
    MirrorPolicy,
    PathMatch,
    QueryMatcher,
    RetryPolicy,
    Route,
    RouteConfig,
    RouteMatch,
    TcpProxy,
    VirtualHost,
)
from canal.model.istio import (
    CorsPolicy,
    DirectResponse,
    Fault,
    HeaderOps,
    OutlierDetection,
    Redirect,
    TcpKeepalive,
)

# Filter and extension names, as Envoy registers them.
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
CORS_FILTER = "envoy.filters.http.cors"
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"

# Istio's values: how often a retry may pick another host before giving up avoiding the previous ones, and the
# direct-response body limit (Envoy's default is 4 KiB; VirtualServices may carry up to 1 MiB).
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5
MAX_DIRECT_RESPONSE_BODY_BYTES = 1024 * 1024

_HTTP_FILTERS: dict[str, tuple[str, type[Message]]] = {
    "cors": (CORS_FILTER, cors_pb2.Cors),
    "fault": (FAULT_FILTER, fault_pb2.HTTPFault),
}
_REDIRECT_CODES = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SET = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_ADD = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


# --------------------------------------------------------------------------------------------- shared helpers


def _any(message: Message) -> any_pb2.Any:
    """typed_config: packed deterministically, since the packed bytes are part of the parent's bytes."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _duration(ms: int) -> duration_pb2.Duration:
    seconds, millis = divmod(ms, 1000)
    return duration_pb2.Duration(seconds=seconds, nanos=millis * 1_000_000)


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A 0-100 percentage as millionths (Istio's precision), rounded rather than truncated."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _ads() -> config_source_pb2.ConfigSource:
    """Everything is delivered over the one ADS stream the bootstrap opens."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def _regex(pattern: str) -> regex_pb2.RegexMatcher:
    """RE2 is Envoy's only engine; the program-size limit is a runtime key, not a per-regex setting."""
    return regex_pb2.RegexMatcher(regex=pattern)


def _string_matcher(kind: str, value: str) -> string_pb2.StringMatcher:
    if kind == "exact":
        return string_pb2.StringMatcher(exact=value)
    if kind == "prefix":
        return string_pb2.StringMatcher(prefix=value)
    if kind == "regex":
        return string_pb2.StringMatcher(safe_regex=_regex(value))
    raise ValueError(f"unknown string match kind {kind!r}")


def _header_options(ops: HeaderOps) -> list[base_pb2.HeaderValueOption]:
    """Istio's order: every `set` (overwrite), then every `add` (append)."""
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=action)
        for pairs, action in ((ops.set, _SET), (ops.add, _ADD))
        for name, value in pairs
    ]


def _positive_weights(weights: Iterable[ClusterWeight]) -> list[ClusterWeight]:
    """Like Istio, a zero-weight destination is left out: it gets no traffic either way, and Envoy's TCP proxy
    refuses weight 0."""
    return [w for w in weights if w.weight > 0]


def _single_cluster(weights: list[ClusterWeight]) -> str | None:
    """The cluster that takes all traffic with nothing cluster-specific to do, else None (use weights)."""
    if len(weights) == 1 and weights[0].weight == 100:
        only = weights[0]
        if not (only.request_headers or only.response_headers):
            return only.cluster
    return None


# ------------------------------------------------------------------------------------------------- listeners


def listener(value: Listener) -> listener_pb2.Listener:
    """One listener per gateway port on all addresses: an HTTP connection manager or a TCP proxy."""
    if value.protocol == "HTTP":
        network_filter = _http_connection_manager_filter(value)
    elif value.protocol == "TCP":
        network_filter = _tcp_proxy_filter(value)
    else:
        raise ValueError(f"listener {value.name}: unknown protocol {value.protocol!r}")
    return listener_pb2.Listener(
        name=value.name,
        address=_socket_address("0.0.0.0", value.port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
    )


def _http_connection_manager_filter(value: Listener) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=value.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(route_config_name=value.route_config, config_source=_ads()),
        http_filters=[*(_http_filter(name) for name in value.http_filters), _router_filter()],
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
        # The gateway is the first proxy clients reach: it is the one to append their address to XFF.
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        normalize_path=wrappers_pb2.BoolValue(value=True),
    )
    return listener_components_pb2.Filter(name=HTTP_CONNECTION_MANAGER, typed_config=_any(manager))


def _http_filter(name: str) -> hcm_pb2.HttpFilter:
    """An empty filter; routes that need it configure it per route (typed_per_filter_config)."""
    filter_name, config = _HTTP_FILTERS[name]
    return hcm_pb2.HttpFilter(name=filter_name, typed_config=_any(config()))


def _router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_any(router_pb2.Router()))


def _tcp_proxy_filter(value: Listener) -> listener_components_pb2.Filter:
    if value.tcp is None:
        raise ValueError(f"TCP listener {value.name} has no TCP proxy")
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=value.name)
    _set_tcp_destination(proxy, value.tcp)
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=_any(proxy))


def _set_tcp_destination(proxy: tcp_proxy_pb2.TcpProxy, tcp: TcpProxy) -> None:
    weights = _positive_weights(tcp.clusters)
    single = _single_cluster(weights)
    if single is not None:
        proxy.cluster = single
        return
    proxy.weighted_clusters.clusters.extend(
        tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=w.cluster, weight=w.weight) for w in weights
    )


# -------------------------------------------------------------------------------------------------- routes


def route_configuration(value: RouteConfig) -> route_pb2.RouteConfiguration:
    """Virtual hosts sorted by name (their order carries no meaning: domains are unique across them)."""
    out = route_configuration_settings()
    out.name = value.name
    out.virtual_hosts.extend(virtual_host(value.virtual_hosts[name]) for name in sorted(value.virtual_hosts))
    return out


def route_configuration_settings() -> route_pb2.RouteConfiguration:
    """Every field of a RouteConfiguration but its name and virtual hosts: the same for all of them."""
    return route_pb2.RouteConfiguration(max_direct_response_body_size_bytes=_u32(MAX_DIRECT_RESPONSE_BODY_BYTES))


def virtual_host(value: VirtualHost) -> route_components_pb2.VirtualHost:
    """Domains and routes in the given order: routes are matched first to last."""
    return route_components_pb2.VirtualHost(
        name=value.name, domains=value.domains, routes=[_route(r) for r in value.routes]
    )


def _route(value: Route) -> route_components_pb2.Route:
    out = route_components_pb2.Route(
        name=value.name,
        match=_route_match(value.match),
        request_headers_to_add=_header_options(value.request_headers),
        request_headers_to_remove=value.request_headers.remove,
        response_headers_to_add=_header_options(value.response_headers),
        response_headers_to_remove=value.response_headers.remove,
    )
    action = value.action
    if isinstance(action, Forward):
        out.route.CopyFrom(_route_action(action))
    elif isinstance(action, Redirect):
        out.redirect.CopyFrom(_redirect(action))
    elif isinstance(action, DirectResponse):
        out.direct_response.CopyFrom(_direct_response(action))
    else:
        raise TypeError(f"route {value.name}: unknown action {type(action).__name__}")
    if value.fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(_any(_fault(value.fault)))
    if value.cors is not None:
        out.typed_per_filter_config[CORS_FILTER].CopyFrom(_any(_cors(value.cors)))
    return out


def _route_match(value: RouteMatch) -> route_components_pb2.RouteMatch:
    out = route_components_pb2.RouteMatch(
        headers=[_header_matcher(h) for h in value.headers],
        query_parameters=[_query_matcher(q) for q in value.query],
    )
    _set_path(out, value.path)
    return out


def _set_path(out: route_components_pb2.RouteMatch, path: PathMatch) -> None:
    if path.kind == "exact":
        out.path = path.value
    elif path.kind == "prefix":
        out.prefix = path.value
    elif path.kind == "regex":
        out.safe_regex.CopyFrom(_regex(path.value))
    else:
        raise ValueError(f"unknown path match kind {path.kind!r}")
    if path.ignore_case:
        out.case_sensitive.value = False


def _header_matcher(value: HeaderMatcher) -> route_components_pb2.HeaderMatcher:
    out = route_components_pb2.HeaderMatcher(name=value.name, invert_match=value.invert)
    if value.kind == "present":
        out.present_match = True
    else:
        out.string_match.CopyFrom(_string_matcher(value.kind, value.value))
    return out


def _query_matcher(value: QueryMatcher) -> route_components_pb2.QueryParameterMatcher:
    out = route_components_pb2.QueryParameterMatcher(name=value.name)
    if value.kind == "present":
        out.present_match = True
    else:
        out.string_match.CopyFrom(_string_matcher(value.kind, value.value))
    return out


def _route_action(value: Forward) -> route_components_pb2.RouteAction:
    out = route_components_pb2.RouteAction(
        timeout=_duration(value.timeout_ms),  # always sent: 0 disables it, unset would mean Envoy's 15 s
        request_mirror_policies=[_mirror(m) for m in value.mirrors],
        hash_policy=[_hash_policy(h) for h in value.hash_policies],
    )
    weights = _positive_weights(value.clusters)
    single = _single_cluster(weights)
    if single is not None:
        out.cluster = single
    else:
        out.weighted_clusters.clusters.extend(_cluster_weight(w) for w in weights)
    if value.retry is not None:
        out.retry_policy.CopyFrom(_retry_policy(value.retry))
    if value.prefix_rewrite:
        out.prefix_rewrite = value.prefix_rewrite
    if value.regex_rewrite is not None:
        pattern, substitution = value.regex_rewrite
        out.regex_rewrite.CopyFrom(
            regex_pb2.RegexMatchAndSubstitute(pattern=_regex(pattern), substitution=substitution)
        )
    if value.host_rewrite:
        out.host_rewrite_literal = value.host_rewrite
    return out


def _cluster_weight(value: ClusterWeight) -> route_components_pb2.WeightedCluster.ClusterWeight:
    return route_components_pb2.WeightedCluster.ClusterWeight(
        name=value.cluster,
        weight=_u32(value.weight),
        request_headers_to_add=_header_options(value.request_headers),
        request_headers_to_remove=value.request_headers.remove,
        response_headers_to_add=_header_options(value.response_headers),
        response_headers_to_remove=value.response_headers.remove,
    )


def _retry_policy(value: RetryPolicy) -> route_components_pb2.RetryPolicy:
    """Like Istio: a retry avoids the hosts already tried (up to 5 picks), and `retryRemoteLocalities` moves
    retries to other priorities."""
    out = route_components_pb2.RetryPolicy(
        retry_on=",".join(value.retry_on),
        num_retries=_u32(value.attempts),
        retriable_status_codes=value.retriable_status_codes,
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name=PREVIOUS_HOSTS, typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=HOST_SELECTION_RETRY_MAX_ATTEMPTS,
    )
    if value.per_try_timeout_ms is not None:
        out.per_try_timeout.CopyFrom(_duration(value.per_try_timeout_ms))
    if value.backoff_ms is not None:
        out.retry_back_off.base_interval.CopyFrom(_duration(value.backoff_ms))
    if value.retry_remote_localities:
        priorities = previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=value.attempts + 1)
        out.retry_priority.name = PREVIOUS_PRIORITIES
        out.retry_priority.typed_config.CopyFrom(_any(priorities))
    return out


def _mirror(value: MirrorPolicy) -> route_components_pb2.RouteAction.RequestMirrorPolicy:
    return route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=value.cluster,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=_fraction(value.percent)),
    )


def _hash_policy(value: HashPolicy) -> route_components_pb2.RouteAction.HashPolicy:
    policy = route_components_pb2.RouteAction.HashPolicy
    if value.key == "header":
        return policy(header=policy.Header(header_name=value.name))
    if value.key == "cookie":
        cookie = policy.Cookie(name=value.name, path=value.cookie_path)
        if value.cookie_ttl_ms is not None:  # 0 is meaningful: Envoy then generates a session cookie
            cookie.ttl.CopyFrom(_duration(value.cookie_ttl_ms))
        return policy(cookie=cookie)
    if value.key == "source_ip":
        return policy(connection_properties=policy.ConnectionProperties(source_ip=True))
    if value.key == "query":
        return policy(query_parameter=policy.QueryParameter(name=value.name))
    raise ValueError(f"unknown hash key {value.key!r}")


def _redirect(value: Redirect) -> route_components_pb2.RedirectAction:
    """Only what is set: path_redirect and scheme_redirect sit in oneofs, where an empty string still counts as
    chosen. See the module docstring for how derivePort maps onto Envoy's fixed port_redirect."""
    out = route_components_pb2.RedirectAction(response_code=_REDIRECT_CODES[value.code])
    if value.uri:
        out.path_redirect = value.uri
    if value.authority:
        out.host_redirect = value.authority
    if value.scheme:
        out.scheme_redirect = value.scheme
    if value.port is not None:
        out.port_redirect = value.port
    elif value.derive_port == "FROM_PROTOCOL_DEFAULT":
        out.port_redirect = _DEFAULT_PORTS.get(value.scheme or "http", 80)
    return out


def _direct_response(value: DirectResponse) -> route_components_pb2.DirectResponseAction:
    out = route_components_pb2.DirectResponseAction(status=value.status)
    if value.body is not None:
        out.body.inline_bytes = value.body
    return out


def _fault(value: Fault) -> fault_pb2.HTTPFault:
    """Per-route configuration of the listener's fault filter."""
    out = fault_pb2.HTTPFault()
    if value.delay_ms is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=_duration(value.delay_ms), percentage=_fraction(value.delay_percent)
            )
        )
    if value.abort_http_status is not None:
        out.abort.http_status = value.abort_http_status
    elif value.abort_grpc_status is not None:
        out.abort.grpc_status = value.abort_grpc_status
    if out.HasField("abort"):
        out.abort.percentage.CopyFrom(_fraction(value.abort_percent))
    return out


def _cors(value: CorsPolicy) -> cors_pb2.CorsPolicy:
    """Per-route configuration of the listener's CORS filter; lists are comma-joined as Envoy expects."""
    out = cors_pb2.CorsPolicy(
        allow_origin_string_match=[_string_matcher(o.kind, o.value) for o in value.allow_origins],
        allow_methods=",".join(value.allow_methods),
        allow_headers=",".join(value.allow_headers),
        expose_headers=",".join(value.expose_headers),
    )
    if value.max_age_s is not None:
        out.max_age = str(value.max_age_s)
    if value.allow_credentials is not None:
        out.allow_credentials.value = value.allow_credentials
    if value.unmatched_preflights == "IGNORE":  # Envoy forwards them by default
        out.forward_not_matching_preflights.value = False
    return out


# ------------------------------------------------------------------------------------------------- clusters


def cluster(value: Cluster) -> cluster_pb2.Cluster:
    """An EDS cluster (endpoints over ADS) with the DestinationRule's load balancing and connection policy."""
    out = cluster_pb2.Cluster(
        name=value.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(value.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LbPolicy.Value(value.lb_policy),
        circuit_breakers=_circuit_breakers(value.circuit_breakers),
    )
    _set_lb_config(out, value)
    if value.outlier_detection is not None:
        _set_outlier_detection(out, value.outlier_detection)
    options = _http_protocol_options(value)
    if options is not None:
        out.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(options))
    if value.tcp_keepalive is not None:
        out.upstream_connection_options.tcp_keepalive.CopyFrom(_tcp_keepalive(value.tcp_keepalive))
    return out


def _circuit_breakers(value: CircuitBreakers) -> circuit_breaker_pb2.CircuitBreakers:
    threshold = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=_u32(value.max_connections),
        max_pending_requests=_u32(value.max_pending_requests),
        max_requests=_u32(value.max_requests),
        max_retries=_u32(value.max_retries),
    )  # priority DEFAULT is the proto default
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[threshold])


def _set_lb_config(out: cluster_pb2.Cluster, value: Cluster) -> None:
    """Consistent-hash table size, and warmup as slow start (only round robin and least request have one)."""
    size = value.consistent_hash.size if value.consistent_hash is not None else None
    if value.lb_policy == "RING_HASH" and size:
        out.ring_hash_lb_config.minimum_ring_size.value = size
    elif value.lb_policy == "MAGLEV" and size:
        out.maglev_lb_config.table_size.value = size
    if value.warmup_ms is not None:
        slow_start = cluster_pb2.Cluster.SlowStartConfig(slow_start_window=_duration(value.warmup_ms))
        if value.lb_policy == "ROUND_ROBIN":
            out.round_robin_lb_config.slow_start_config.CopyFrom(slow_start)
        elif value.lb_policy == "LEAST_REQUEST":
            out.least_request_lb_config.slow_start_config.CopyFrom(slow_start)


def _set_outlier_detection(out: cluster_pb2.Cluster, value: OutlierDetection) -> None:
    """Istio's mapping: a count that is set is enforced (100%, or 0% for a count of 0), success-rate ejection is
    off, and the panic threshold is minHealthPercent (0 when unset: few pods per Service make Envoy's 50% panic
    mode send traffic to ejected hosts)."""
    detection = outlier_detection_pb2.OutlierDetection(enforcing_success_rate=_u32(0))
    if value.consecutive_5xx is not None:
        detection.consecutive_5xx.value = value.consecutive_5xx
        detection.enforcing_consecutive_5xx.value = 100 if value.consecutive_5xx else 0
    if value.consecutive_gateway_errors is not None:
        detection.consecutive_gateway_failure.value = value.consecutive_gateway_errors
        detection.enforcing_consecutive_gateway_failure.value = 100 if value.consecutive_gateway_errors else 0
    if value.interval_ms is not None:
        detection.interval.CopyFrom(_duration(value.interval_ms))
    if value.base_ejection_ms is not None:
        detection.base_ejection_time.CopyFrom(_duration(value.base_ejection_ms))
    if value.max_ejection_percent:
        detection.max_ejection_percent.value = value.max_ejection_percent
    if value.split_external_local_origin_errors:
        detection.split_external_local_origin_errors = True
        detection.enforcing_local_origin_success_rate.value = 0
        if value.consecutive_local_origin_failures:
            detection.consecutive_local_origin_failure.value = value.consecutive_local_origin_failures
            detection.enforcing_consecutive_local_origin_failure.value = 100
    out.outlier_detection.CopyFrom(detection)
    out.common_lb_config.healthy_panic_threshold.value = float(value.min_health_percent or 0)


def _http_protocol_options(value: Cluster) -> http_protocol_options_pb2.HttpProtocolOptions | None:
    """The upstream protocol and connection reuse limits; None when all are Envoy's defaults (HTTP/1.1)."""
    common = protocol_pb2.HttpProtocolOptions()
    if value.idle_timeout_ms is not None:
        common.idle_timeout.CopyFrom(_duration(value.idle_timeout_ms))
    if value.max_requests_per_connection is not None:
        common.max_requests_per_connection.value = value.max_requests_per_connection
    if value.max_connection_duration_ms is not None:
        common.max_connection_duration.CopyFrom(_duration(value.max_connection_duration_ms))
    if not value.http2 and common.ByteSize() == 0:
        return None
    out = http_protocol_options_pb2.HttpProtocolOptions()
    if common.ByteSize():
        out.common_http_protocol_options.CopyFrom(common)
    explicit = out.explicit_http_config
    if value.http2:
        explicit.http2_protocol_options.SetInParent()
        if value.max_concurrent_streams is not None:
            explicit.http2_protocol_options.max_concurrent_streams.value = value.max_concurrent_streams
    else:
        explicit.http_protocol_options.SetInParent()
    return out


def _tcp_keepalive(value: TcpKeepalive) -> address_pb2.TcpKeepalive:
    out = address_pb2.TcpKeepalive()
    if value.probes is not None:
        out.keepalive_probes.value = value.probes
    if value.time_s is not None:
        out.keepalive_time.value = value.time_s
    if value.interval_s is not None:
        out.keepalive_interval.value = value.interval_s
    return out


# ------------------------------------------------------------------------------------------------ endpoints


def load_assignment(value: ClusterLoadAssignment) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality group with the endpoints in the given (already sorted) order."""
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=value.cluster)
    if value.endpoints:
        out.endpoints.add().lb_endpoints.extend(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(e.address, e.port))
            )
            for e in value.endpoints
        )
    return out


__all__ = ["cluster", "listener", "load_assignment", "route_configuration"]
