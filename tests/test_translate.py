"""Translation semantics: what the gateway Envoys, DNS and node agents are told for a given set of objects."""

from __future__ import annotations

from canal.desired import Forward
from canal.model.base import ObjectRef
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import (
    app,
    base,
    destination_rule,
    endpoint_slice,
    gateway,
    internal_gateway,
    namespace,
    pod,
    route,
    service,
    virtual_service,
)

IG = "istio-system/canal"


def run(objs):
    return translate(Snapshot.from_dicts(objs))


def vs_ref(name: str, ns: str = "default") -> ObjectRef:
    return ObjectRef("VirtualService", ns, name)


def rejections_of(state, ref: ObjectRef) -> list[str]:
    status = state.status.get(ref)
    return [f"{r.field}: {r.reason}" for r in status.rejections] if status else []


def vhosts(state, port: int = 80, group: str = IG):
    return state.envoy[group].route_configs[f"http.{port}"].virtual_hosts


# ------------------------------------------------------------------------------------------ routing


def test_two_services_can_both_own_the_same_path():
    objs = base() + app("alpha", ips=("10.244.1.1",)) + app("beta", ips=("10.244.2.1",))
    for name in ("alpha", "beta"):
        objs.append(virtual_service(name, http=[{"match": [{"uri": {"exact": "/hello"}}], "route": [route(name)]}]))
    state = run(objs)
    vh = vhosts(state)
    alpha, beta = vh["alpha.default.svc.cluster.local"], vh["beta.default.svc.cluster.local"]
    assert {"alpha", "alpha:80", "alpha.default", "alpha.default.svc.cluster.local:80"} <= set(alpha.domains)
    assert not set(alpha.domains) & set(beta.domains)
    for vhost, name in ((alpha, "alpha"), (beta, "beta")):
        (r,) = vhost.routes
        assert r.match.path.kind == "exact" and r.match.path.value == "/hello"
        assert [c.cluster for c in r.action.clusters] == [f"outbound|80||{name}.default.svc.cluster.local"]
    assert set(state.dns) == {"alpha.default.svc.cluster.local", "beta.default.svc.cluster.local"}


def test_cluster_ips_are_domains_so_hard_coded_ip_clients_are_routed():
    objs = [*base(), *app("web", ip="10.96.7.7"), virtual_service("web", http=[{"route": [route("web")]}])]
    domains = vhosts(run(objs))["web.default.svc.cluster.local"].domains
    assert "10.96.7.7" in domains and "10.96.7.7:80" in domains


def test_wildcard_host_keeps_original_canal_semantics_with_a_warning():
    objs = base() + app("helloworld", port=80)
    objs.append(
        virtual_service(
            "hw",
            ns="istio-system",
            hosts=["*"],
            gateways=["canal"],
            http=[{"match": [{"uri": {"exact": "/hello"}}], "route": [route("helloworld.default.svc.cluster.local")]}],
        )
    )
    state = run(objs)
    vh = vhosts(state)
    assert list(vh) == ["*"] and vh["*"].domains == ("*",)
    # the destination is what moves behind the gateway
    assert "helloworld.default.svc.cluster.local" in state.dns
    status = state.status[vs_ref("hw", "istio-system")]
    assert status.bound == {IG}
    assert any("catch-all" in c.message for c in status.caveats)


def test_route_features_map_to_envoy_semantics():
    http = [
        {
            "name": "api",
            "match": [
                {
                    "uri": {"prefix": "/api"},
                    "method": {"exact": "POST"},
                    "headers": {"X-User": {"regex": "u[0-9]+"}},
                    "queryParams": {"debug": {"exact": "1"}},
                },
                {"uri": {"regex": "/v[0-9]+/.*"}, "ignoreUriCase": True},
            ],
            "rewrite": {"uri": "/", "authority": "api.internal"},
            "timeout": "2.5s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,reset,429"},
            "fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 1.5}}},
            "corsPolicy": {"allowOrigins": [{"exact": "https://a.example"}], "allowMethods": ["GET"], "maxAge": "24h"},
            "headers": {"request": {"set": {"x-canal": "1"}, "remove": ["x-debug"]}},
            "mirror": {"host": "shadow"},
            "mirrorPercentage": {"value": 10},
            "route": [route("web")],
        },
        {"route": [route("web")], "retries": {"attempts": 0}},
    ]
    objs = [*base(), *app("web"), *app("shadow", ips=("10.244.3.3",)), virtual_service("web", http=http)]
    state = run(objs)
    routes = vhosts(state)["web.default.svc.cluster.local"].routes
    assert [r.name for r in routes] == ["default/web/api/0", "default/web/api/1", "default/web/1/0"]
    first, second, last = routes
    assert first.match.path.kind == "prefix" and first.match.path.value == "/api"
    headers = {(h.name, h.kind, h.value) for h in first.match.headers}
    assert headers == {(":method", "exact", "POST"), ("x-user", "regex", "u[0-9]+")}
    assert [(q.name, q.kind, q.value) for q in first.match.query] == [("debug", "exact", "1")]
    # Envoy ignores case_sensitive on regex matches: the flag becomes RE2's (?i)
    assert second.match.path.kind == "regex" and second.match.path.value == "(?i)/v[0-9]+/.*"
    action = first.action
    assert isinstance(action, Forward)
    assert action.prefix_rewrite == "/" and action.host_rewrite == "api.internal"
    assert action.timeout_ms == 2500
    assert action.retry.attempts == 3 and action.retry.per_try_timeout_ms == 500
    assert action.retry.retry_on == ("5xx", "reset", "retriable-status-codes")
    assert action.retry.retriable_status_codes == (429,)
    assert [(m.cluster, m.percent) for m in action.mirrors] == [("outbound|80||shadow.default.svc.cluster.local", 10.0)]
    assert first.fault.delay_ms == 10 and first.fault.delay_percent == 1.5
    assert first.cors.max_age_s == 86400
    assert first.request_headers.set == (("x-canal", "1"),) and first.request_headers.remove == ("x-debug",)
    assert last.action.retry is None  # attempts: 0 disables retries
    # the mirror target is a real cluster with endpoints, and it is not migrated (only hosts move)
    gw = state.envoy[IG]
    assert "outbound|80||shadow.default.svc.cluster.local" in gw.clusters
    assert [e.address for e in gw.endpoints["outbound|80||shadow.default.svc.cluster.local"].endpoints] == [
        "10.244.3.3"
    ]
    assert "shadow.default.svc.cluster.local" not in state.dns
    # only the filters a route needs are on the listener
    assert gw.listeners["0.0.0.0_80"].http_filters == ("cors", "fault")


def test_istio_defaults_apply_when_fields_are_omitted():
    objs = [*base(), *app("web"), virtual_service("web", http=[{"route": [route("web")]}])]
    state = run(objs)
    (r,) = vhosts(state)["web.default.svc.cluster.local"].routes
    assert r.action.timeout_ms == 0  # Istio disables the route timeout (Envoy's default would be 15 s)
    assert r.action.retry.attempts == 2
    assert r.action.retry.retriable_status_codes == (503,)
    assert "connect-failure" in r.action.retry.retry_on
    assert state.envoy[IG].listeners["0.0.0.0_80"].http_filters == ()
    cluster = state.envoy[IG].clusters["outbound|80||web.default.svc.cluster.local"]
    assert cluster.lb_policy == "LEAST_REQUEST"
    assert cluster.connect_timeout_ms == 10_000
    assert cluster.circuit_breakers.max_requests == 2**32 - 1


def test_redirect_and_direct_response_routes_need_no_cluster():
    http = [
        {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 308}},
        {"match": [{"uri": {"exact": "/ping"}}], "directResponse": {"status": 200, "body": {"string": "pong"}}},
        {"route": [route("web")]},
    ]
    state = run([*base(), *app("web"), virtual_service("web", http=http)])
    old, ping, _ = vhosts(state)["web.default.svc.cluster.local"].routes
    assert old.action.uri == "/new" and old.action.code == 308
    assert ping.action.status == 200 and ping.action.body == b"pong"
    assert set(state.envoy[IG].clusters) == {"outbound|80||web.default.svc.cluster.local"}


def test_destination_port_defaults_to_the_listener_port_on_multi_port_services():
    svc = service("multi", ports=[80, 8080])
    slc = endpoint_slice("multi", endpoints=[("10.244.1.1", "multi-0")], ports=[("http-80", 80), ("http-8080", 8080)])
    objs = [*base(servers=[(80, "HTTP"), (8080, "HTTP")]), svc, slc, pod("multi-0", ip="10.244.1.1", app="multi")]
    objs.append(virtual_service("multi", http=[{"route": [route("multi")]}]))
    state = run(objs)
    for port in (80, 8080):
        (r,) = vhosts(state, port)["multi.default.svc.cluster.local"].routes
        assert [c.cluster for c in r.action.clusters] == [f"outbound|{port}||multi.default.svc.cluster.local"]
    # both ports are served, so the Service moves and both ClusterIP ports are redirected
    assert {(k.port) for k in state.redirects} == {80, 8080}


# ------------------------------------------------------------------------------- DestinationRules


def test_weighted_subsets_select_endpoints_by_pod_labels():
    objs = [*base(), *app("reviews", ips=("10.244.1.1", "10.244.1.2"))]
    objs.append(
        destination_rule(
            "reviews",
            "reviews",
            subsets=[{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        )
    )
    objs.append(
        virtual_service(
            "reviews",
            http=[{"route": [route("reviews", subset="v1", weight=90), route("reviews", subset="v2", weight=10)]}],
        )
    )
    state = run(objs)
    (r,) = vhosts(state)["reviews.default.svc.cluster.local"].routes
    assert [(c.cluster, c.weight) for c in r.action.clusters] == [
        ("outbound|80|v1|reviews.default.svc.cluster.local", 90),
        ("outbound|80|v2|reviews.default.svc.cluster.local", 10),
    ]
    endpoints = state.envoy[IG].endpoints
    assert [e.address for e in endpoints["outbound|80|v1|reviews.default.svc.cluster.local"].endpoints] == [
        "10.244.1.1"
    ]
    assert [e.address for e in endpoints["outbound|80|v2|reviews.default.svc.cluster.local"].endpoints] == [
        "10.244.1.2"
    ]


def test_traffic_policy_merges_top_level_port_level_and_subset():
    policy = {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {
            "tcp": {"maxConnections": 100, "connectTimeout": "250ms"},
            "http": {"http2MaxRequests": 500},
        },
        "outlierDetection": {"consecutive5xxErrors": 7, "interval": "5s", "baseEjectionTime": "30s"},
        "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}],
    }
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}},
        {
            "name": "v2",
            "labels": {"version": "v2"},
            "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}}
            },
        },
    ]
    objs = [
        *base(),
        *app("reviews", ips=("10.244.1.1", "10.244.1.2")),
        destination_rule("r", "reviews", subsets=subsets, policy=policy),
    ]
    objs.append(
        virtual_service(
            "reviews",
            http=[{"route": [route("reviews", subset="v1", weight=50), route("reviews", subset="v2", weight=50)]}],
        )
    )
    state = run(objs)
    clusters = state.envoy[IG].clusters
    v1 = clusters["outbound|80|v1|reviews.default.svc.cluster.local"]
    v2 = clusters["outbound|80|v2|reviews.default.svc.cluster.local"]
    assert v1.lb_policy == "RANDOM"  # port level beats top level
    assert v2.lb_policy == "MAGLEV" and v2.consistent_hash.size == 65537  # subset beats port level
    for c in (v1, v2):
        assert c.circuit_breakers.max_connections == 100 and c.circuit_breakers.max_requests == 500
        assert c.connect_timeout_ms == 250
        assert c.outlier_detection.consecutive_5xx == 7 and c.outlier_detection.base_ejection_ms == 30_000
    (r,) = vhosts(state)["reviews.default.svc.cluster.local"].routes
    # the route carries the hash key of the subset that hashes
    assert [(h.key, h.name) for h in r.action.hash_policies] == [("header", "x-user")]


def test_destination_rule_in_the_gateway_namespace_wins():
    objs = [*base(), *app("web")]
    objs.append(
        destination_rule("svc-ns", "web.default.svc.cluster.local", policy={"loadBalancer": {"simple": "RANDOM"}})
    )
    objs.append(
        destination_rule(
            "gw-ns",
            "web.default.svc.cluster.local",
            ns="istio-system",
            policy={"loadBalancer": {"simple": "ROUND_ROBIN"}},
        )
    )
    objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    cluster = run(objs).envoy[IG].clusters["outbound|80||web.default.svc.cluster.local"]
    assert cluster.lb_policy == "ROUND_ROBIN"


def test_grpc_ports_get_http2_clusters():
    svc = service("grpc", ports=[(9090, "grpc-api")])
    objs = [*base(servers=[(9090, "GRPC")]), svc, virtual_service("grpc", http=[{"route": [route("grpc")]}])]
    assert run(objs).envoy[IG].clusters["outbound|9090||grpc.default.svc.cluster.local"].http2


# -------------------------------------------------------------------------------------- endpoints


def test_only_ready_endpoints_and_terminating_fallback():
    ready = {"ready": True, "serving": True, "terminating": False}
    draining = {"ready": False, "serving": True, "terminating": True}
    dead = {"ready": False, "serving": False, "terminating": True}
    slc = endpoint_slice(
        "web", endpoints=[("10.244.1.1", "a", ready), ("10.244.1.2", "b", draining), ("10.244.1.3", "c", dead)]
    )
    objs = [*base(), service("web"), slc, virtual_service("web", http=[{"route": [route("web")]}])]
    name = "outbound|80||web.default.svc.cluster.local"
    assert [e.address for e in run(objs).envoy[IG].endpoints[name].endpoints] == ["10.244.1.1"]
    # no ready endpoint left: serving-but-terminating ones drain the remaining traffic, like kube-proxy
    slc = endpoint_slice("web", endpoints=[("10.244.1.2", "b", draining), ("10.244.1.3", "c", dead)])
    objs = [*base(), service("web"), slc, virtual_service("web", http=[{"route": [route("web")]}])]
    assert [e.address for e in run(objs).envoy[IG].endpoints[name].endpoints] == ["10.244.1.2"]


def test_endpoints_come_from_all_slices_matched_by_port_name():
    svc = service("web", ports=[(80, "web")])
    one = endpoint_slice("web", endpoints=[("10.244.1.1", "a")], ports=[("web", 8080)], name="web-1")
    two = endpoint_slice(
        "web", endpoints=[("10.244.1.2", "b"), ("10.244.1.1", "a")], ports=[("web", 8080)], name="web-2"
    )
    other = endpoint_slice("web", endpoints=[("10.244.1.9", "z")], ports=[("metrics", 9100)], name="web-3")
    objs = [*base(), svc, one, two, other, virtual_service("web", http=[{"route": [route("web")]}])]
    cla = run(objs).envoy[IG].endpoints["outbound|80||web.default.svc.cluster.local"]
    # targetPort comes from the slice's port of the same name; duplicates across slices are merged
    assert [(e.address, e.port) for e in cla.endpoints] == [("10.244.1.1", 8080), ("10.244.1.2", 8080)]


# ------------------------------------------------------------------------------------- migration


def test_a_service_moves_only_when_every_port_is_served():
    svc = service("web", ports=[80, 8080])
    objs = [*base(servers=[(80, "HTTP"), (8080, "HTTP")]), svc]
    objs.append(virtual_service("web", http=[{"match": [{"port": 80}], "route": [route("web", port=80)]}]))
    state = run(objs)
    assert "web.default.svc.cluster.local" not in state.dns
    assert not state.redirects
    assert any("port 8080 has no HTTP route" in r for r in rejections_of(state, vs_ref("web")))
    # the routes themselves are still served for clients that use the gateway explicitly
    assert "web.default.svc.cluster.local" in vhosts(state, 80)


def test_port_without_gateway_server_rejects_the_virtual_service():
    objs = [
        *base(),
        service("web", ports=[80, 9090]),
        virtual_service("web", http=[{"route": [route("web", port=80)]}]),
    ]
    state = run(objs)
    assert any("port 9090" in r and "no matching server" in r for r in rejections_of(state, vs_ref("web")))
    assert not state.envoy[IG].route_configs["http.80"].virtual_hosts  # a rejected VirtualService drops out
    assert not state.dns


def test_tcp_route_and_port_conflict_between_services():
    objs = [*base(servers=[(80, "HTTP"), (3306, "TCP")])]
    for name, created in (("mysql-a", "2024-01-01T00:00:00Z"), ("mysql-b", "2024-02-01T00:00:00Z")):
        objs.append(service(name, ports=[(3306, "tcp-mysql")]))
        objs.append(endpoint_slice(name, endpoints=[("10.244.5.1", f"{name}-0")], ports=[("tcp-mysql", 3306)]))
        objs.append(
            virtual_service(name, tcp=[{"match": [{"port": 3306}], "route": [route(name, port=3306)]}], created=created)
        )
    state = run(objs)
    listener = state.envoy[IG].listeners["0.0.0.0_3306"]
    assert listener.protocol == "TCP"
    assert [c.cluster for c in listener.tcp.clusters] == ["outbound|3306||mysql-a.default.svc.cluster.local"]
    assert "mysql-a.default.svc.cluster.local" in state.dns
    # the younger one loses the port and, so nobody's data lands in the wrong database, is not migrated
    assert "mysql-b.default.svc.cluster.local" not in state.dns
    assert any("already carries" in r for r in rejections_of(state, vs_ref("mysql-b")))
    assert rejections_of(state, vs_ref("mysql-a")) == []


def test_a_short_name_claimed_twice_on_one_port_goes_to_the_older_service_only():
    """Clients in a and in b both send `Host: web`; the gateway cannot tell them apart."""
    objs = [*base(), *app("web", "a", ips=("10.244.1.1",)), *app("web", "b", ips=("10.244.2.1",))]
    objs.append(virtual_service("web", "a", http=[{"route": [route("web")]}], created="2024-01-01T00:00:00Z"))
    objs.append(virtual_service("web", "b", http=[{"route": [route("web")]}], created="2024-02-01T00:00:00Z"))
    state = run(objs)
    vh = vhosts(state)
    older, younger = vh["web.a.svc.cluster.local"].domains, vh["web.b.svc.cluster.local"].domains
    assert "web" in older and "web:80" in older
    assert "web" not in younger and "web:80" not in younger and "web.b" in younger
    # the older one moves; the younger stays direct (its clients' short name would otherwise reach a's routes)
    assert "web.a.svc.cluster.local" in state.dns
    assert "web.b.svc.cluster.local" not in state.dns
    (reason,) = rejections_of(state, vs_ref("web", "b"))
    assert "name(s) web, web:80 belong to web.a.svc.cluster.local (older)" in reason
    assert rejections_of(state, vs_ref("web", "a")) == []


def test_namespace_selector_default_routes_and_explicit_virtual_service_wins():
    objs = [
        *base(namespaceSelector={"matchLabels": {"canal.io/migrate": "true"}}),
        namespace("shop", **{"canal.io/migrate": "true"}),
        namespace("other"),
        *app("cart", "shop", ips=("10.244.1.1",)),
        *app("pay", "shop", ips=("10.244.1.2",)),
        *app("dns", "shop", ip="10.96.9.9"),
        *app("skip", "other"),
    ]
    objs[-4 - 2]["spec"]["ports"][0]["protocol"] = "UDP"  # shop/dns: UDP cannot be carried
    objs.append(virtual_service("pay", "shop", http=[{"match": [{"uri": {"prefix": "/v2"}}], "route": [route("pay")]}]))
    state = run(objs)
    vh = vhosts(state)
    assert set(vh) == {"cart.shop.svc.cluster.local", "pay.shop.svc.cluster.local"}
    (default_route,) = vh["cart.shop.svc.cluster.local"].routes
    assert default_route.match.path.kind == "prefix" and default_route.match.path.value == "/"
    (explicit,) = vh["pay.shop.svc.cluster.local"].routes
    assert explicit.match.path.value == "/v2"
    assert set(state.dns) == {"cart.shop.svc.cluster.local", "pay.shop.svc.cluster.local"}
    caveats = [c.message for c in state.status[ObjectRef("InternalGateway", "istio-system", "canal")].caveats]
    assert any("UDP" in c and "namespaceSelector" in c for c in caveats)


def test_headless_service_is_renamed_but_has_no_redirect():
    objs = [*base(), *app("db", ip="None"), virtual_service("db", http=[{"route": [route("db")]}])]
    state = run(objs)
    assert "db.default.svc.cluster.local" in state.dns
    assert not state.redirects


def test_dual_stack_redirects_per_family():
    gw_pod = pod("gw-1", "istio-system", ["10.244.9.1", "fd00::9:1"], app="canal-gateway")
    objs = [gateway(), internal_gateway(), gw_pod, *app("web", ip=["10.96.1.1", "fd00:96::1"])]
    objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    state = run(objs)
    rules = {(k.cluster_ip, k.port): [(b.address, b.port) for b in r.backends] for k, r in state.redirects.items()}
    assert rules == {("10.96.1.1", 80): [("10.244.9.1", 80)], ("fd00:96::1", 80): [("fd00::9:1", 80)]}


# ----------------------------------------------------------------------------- gateways and names


def test_dns_records_name_the_gateway_service_as_the_coredns_target():
    """CoreDNS renames a rewritten question to the gateway's own name: its Service FQDN in the InternalGateway's
    cluster domain. With address.ips there is no such Service, and the target is empty."""
    routed = [*app("web"), virtual_service("web", http=[{"route": [route("web")]}])]
    by_service = run(
        [
            gateway(),
            internal_gateway(service_ref="canal-gateway", clusterDomain="corp.internal"),
            service("canal-gateway", "istio-system", ip="10.96.0.50"),
            *routed,
        ]
    )
    (record,) = by_service.dns.values()
    assert record.fqdn == "web.default.svc.corp.internal"
    assert record.target == "canal-gateway.istio-system.svc.corp.internal"
    by_ips = run([gateway(), internal_gateway(ips=["10.96.0.60"]), *routed])
    assert by_ips.dns["web.default.svc.cluster.local"].target == ""
    assert by_ips.dns["web.default.svc.cluster.local"].addresses == ("10.96.0.60",)


def test_redirect_needs_ready_gateway_pods_or_static_addresses():
    objs = [
        gateway(),
        internal_gateway(service_ref="canal-gateway"),
        service("canal-gateway", "istio-system", ip="10.96.0.50"),
    ]
    objs += [*app("web"), virtual_service("web", http=[{"route": [route("web")]}])]
    objs.append(pod("gw-1", "istio-system", "10.244.9.1", ready=False, app="canal-gateway"))
    state = run(objs)
    assert state.dns["web.default.svc.cluster.local"].addresses == ("10.96.0.50",)
    assert not state.redirects  # never redirect to nothing
    conditions = {c.type: c for c in state.status[ObjectRef("InternalGateway", "istio-system", "canal")].conditions}
    assert conditions["RedirectReady"].status == "False"
    assert conditions["AddressResolved"].status == "True"


def test_gateway_service_is_never_migrated_through_itself():
    objs = [
        gateway(),
        internal_gateway(service_ref="canal-gateway"),
        service("canal-gateway", "istio-system", ip="10.96.0.50"),
    ]
    objs.append(
        virtual_service("self", "istio-system", hosts=["canal-gateway"], http=[{"route": [route("canal-gateway")]}])
    )
    state = run(objs)
    assert any("gateway's own Service" in r for r in rejections_of(state, vs_ref("self", "istio-system")))


def test_modes_none_produce_no_dns_or_redirects_but_keep_routes():
    objs = [*base(dns={"mode": "none"}, redirect={"mode": "none"}), *app("web")]
    objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    state = run(objs)
    assert not state.dns and not state.redirects
    assert "web.default.svc.cluster.local" in vhosts(state)


def test_gateway_adopted_twice_and_missing_gateway():
    objs = [
        gateway(),
        internal_gateway("first", created="2024-01-01T00:00:00Z"),
        internal_gateway("second", created="2024-03-01T00:00:00Z"),
        internal_gateway("lost", gateway_name="nope"),
        *app("web"),
        virtual_service("web", http=[{"route": [route("web")]}]),
    ]
    state = run(objs)
    assert state.status[vs_ref("web")].bound == {"istio-system/first"}
    second = state.status[ObjectRef("InternalGateway", "istio-system", "second")]
    assert any("already adopted by InternalGateway istio-system/first" in r.reason for r in second.rejections)
    lost = state.status[ObjectRef("InternalGateway", "istio-system", "lost")]
    assert [(r.field, r.reason) for r in lost.rejections] == [
        ("spec.gatewayRef", "Gateway istio-system/nope not found")
    ]
    # rejected gateways still get an (empty) config, so their Envoys are told something definite
    assert not state.envoy["istio-system/second"].listeners and not state.envoy["istio-system/lost"].clusters


def test_older_internal_gateway_owns_dns_for_a_service_both_route():
    objs = [
        gateway("a"),
        gateway("b"),
        internal_gateway("a", gateway_name="a", ips=["10.96.0.10"], created="2024-01-01T00:00:00Z"),
        internal_gateway("b", gateway_name="b", ips=["10.96.0.20"], created="2024-06-01T00:00:00Z"),
        *app("web"),
        virtual_service("web", gateways=["istio-system/a", "istio-system/b"], http=[{"route": [route("web")]}]),
    ]
    state = run(objs)
    assert state.dns["web.default.svc.cluster.local"].gateway == "istio-system/a"
    assert state.dns["web.default.svc.cluster.local"].addresses == ("10.96.0.10",)
    assert state.status[vs_ref("web")].bound == {"istio-system/a", "istio-system/b"}
    b_status = state.status[ObjectRef("InternalGateway", "istio-system", "b")]
    assert any("belong to the older InternalGateway istio-system/a" in c.message for c in b_status.caveats)


def test_gateway_server_host_namespaces_limit_who_can_bind():
    objs = [gateway(servers=[(80, "HTTP", ["prod/*"])]), internal_gateway(), *app("web")]
    objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    state = run(objs)
    assert any("no server of Gateway istio-system/canal accepts" in r for r in rejections_of(state, vs_ref("web")))


def test_match_gateways_limits_a_match_to_some_gateways():
    http = [
        {"match": [{"uri": {"prefix": "/only-mesh"}, "gateways": ["mesh"]}], "route": [route("web")]},
        {"route": [route("web")]},
    ]
    objs = [*base(), *app("web"), virtual_service("web", gateways=["mesh", "istio-system/canal"], http=http)]
    routes = vhosts(run(objs))["web.default.svc.cluster.local"].routes
    assert [r.name for r in routes] == ["default/web/1/0"]


def test_all_istio_api_versions_are_read():
    objs = [*base(), *app("web")]
    for version in ("v1alpha3", "v1beta1"):
        objs.append(
            virtual_service(
                f"web-{version}",
                hosts=["web"],
                http=[{"match": [{"uri": {"prefix": f"/{version}"}}], "route": [route("web")]}],
            )
        )
        objs[-1]["apiVersion"] = f"networking.istio.io/{version}"
    state = run(objs)
    assert len(vhosts(state)["web.default.svc.cluster.local"].routes) == 2


def test_virtual_services_for_one_host_merge_oldest_first():
    objs = [*base(), *app("web")]
    objs.append(
        virtual_service(
            "young",
            hosts=["web"],
            http=[{"match": [{"uri": {"prefix": "/b"}}], "route": [route("web")]}],
            created="2024-05-01T00:00:00Z",
        )
    )
    objs.append(
        virtual_service(
            "old",
            hosts=["web"],
            http=[{"match": [{"uri": {"prefix": "/a"}}], "route": [route("web")]}],
            created="2024-01-01T00:00:00Z",
        )
    )
    routes = vhosts(run(objs))["web.default.svc.cluster.local"].routes
    assert [r.match.path.value for r in routes] == ["/a", "/b"]


def test_a_broken_virtual_service_does_not_affect_the_others():
    objs = [*base(), *app("web"), *app("api", ips=("10.244.4.4",))]
    objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    objs.append(virtual_service("api", http=[{"match": [{"uri": {"regex": "(?!x)"}}], "route": [route("api")]}]))
    unparsable = virtual_service("typo", http=[{"route": [route("web")]}])
    unparsable["spec"]["hosts"] = "web"  # not a list: rejected while parsing, before any binding
    objs.append(unparsable)
    state = run(objs)
    assert list(vhosts(state)) == ["web.default.svc.cluster.local"]
    assert state.status[vs_ref("web")].bound == {IG}
    api = state.status[vs_ref("api")]
    assert not api.bound and api.conditions[0].status == "False"
    ig_status = state.status[ObjectRef("InternalGateway", "istio-system", "canal")]
    assert ig_status.bound == {"default/web"}
    # the gateway names which of its VirtualServices are rejected; the reasons live in their own status
    assert ig_status.rejected == {"default/api", "default/typo"} and ig_status.rejections == ()
