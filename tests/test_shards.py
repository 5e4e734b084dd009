"""Gateway shards: Services spread over several listeners of one gateway, each reached through its own Service.

Expected values come from the rules: the shard of Service ns/name is rendezvous hashing of ("ns/name", k) with
blake2b (computed here independently of canal.translate.shards), and shard k's listener for Gateway port P is the
targetPort Service canal-gateway-<k> maps P to (20000 + k for port 80, 20100 + k for 8080, 20200 + k for 3306).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import pytest

from canal.model.base import ObjectRef
from canal.serialize import canonical_json, render_state
from canal.snapshot import Snapshot, parse_object
from canal.translate import Translator, translate
from canal.translate.shards import shard_of
from tests.builders import (
    app,
    endpoint_slice,
    gateway,
    internal_gateway,
    namespace,
    pod,
    route,
    service,
    shard_service,
    virtual_service,
)

IG = "istio-system/canal"
IG_REF = ObjectRef("InternalGateway", "istio-system", "canal")
BASE_PORT = {80: 20000, 8080: 20100, 3306: 20200}  # + k: the listener port of shard k
GATEWAY_POD = "10.244.9.1"


def by_hand(key: str, shards: int) -> int:
    """Rendezvous hashing, written out: the shard whose blake2b-64 of "<namespace>/<name>/<k>" is largest."""
    weights = [
        int.from_bytes(hashlib.blake2b(f"{key}/{k}".encode(), digest_size=8).digest(), "big") for k in range(shards)
    ]
    return weights.index(max(weights))


def namespace_where(check: Callable[[str], bool], skip: tuple[str, ...] = ()) -> str:
    """The first namespace ns-<i> (not in `skip`) for which `check` holds."""
    return next(f"ns-{i}" for i in range(1000) if f"ns-{i}" not in skip and check(f"ns-{i}"))


def namespace_on(shard: int, name: str, shards: int = 2, skip: tuple[str, ...] = ()) -> str:
    """A namespace whose Service `name` by_hand() puts on `shard`."""
    return namespace_where(lambda ns: by_hand(f"{ns}/{name}", shards) == shard, skip)


def sharded(
    shards: int = 2, servers: list | None = None, targets: dict[int, dict[int, int | str]] | None = None, **ig
) -> list[dict]:
    """A Gateway, an InternalGateway with `shards` shards, its gateway pod and shard Services 10.96.0.6<k>."""
    servers = servers or [(80, "HTTP"), (8080, "HTTP")]
    objs = [
        gateway(servers=servers),
        internal_gateway(service_ref="canal-gateway", shards=shards, **ig),
        pod("gw-1", "istio-system", GATEWAY_POD, app="canal-gateway"),
    ]
    for k in range(shards):
        ports = (targets or {}).get(k) or {s[0]: BASE_PORT[s[0]] + k for s in servers}
        objs.append(shard_service(k, ports, ip=f"10.96.0.{60 + k}"))
    return objs


def routed(name: str, ns: str, ip: str, created: str = "", ports: list[int] | None = None) -> list[dict]:
    """A Service (with endpoints) and the VirtualService that moves it behind the gateway."""
    objs = [
        service(name, ns, ports or [80], ip=ip, created=created),
        endpoint_slice(name, ns, [("10.244.5.5", f"{name}-0")]),
        pod(f"{name}-0", ns, "10.244.5.5", app=name),
    ]
    objs.append(virtual_service(name, ns, http=[{"route": [route(name)]}], created=created))
    return objs


def run(objs):
    return translate(Snapshot.from_dicts(objs))


def vhosts(state, listener: int):
    return set(state.envoy[IG].route_configs[f"http.{listener}"].virtual_hosts)


def rejections_of(state, ref: ObjectRef) -> list[tuple[str, str]]:
    status = state.status.get(ref)
    return [(r.field, r.reason) for r in status.rejections] if status else []


def conditions(state) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in state.status[IG_REF].conditions}


# ------------------------------------------------------------------------------------------ assignment

NAMES = [f"team-{i:04d}" for i in range(4000)]


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 32, 256])
def test_shard_of_is_rendezvous_hashing_with_blake2b(shards):
    assert [shard_of(ns, shards) for ns in NAMES[:500]] == [by_hand(ns, shards) for ns in NAMES[:500]]


def test_shard_of_spreads_services_evenly():
    counts = [0] * 8
    for ns in NAMES:
        counts[shard_of(ns, 8)] += 1
    sd = math.sqrt(len(NAMES) * (1 / 8) * (7 / 8))  # binomial: 500 +- 21 per shard
    assert all(abs(c - len(NAMES) / 8) < 5 * sd for c in counts), counts


@pytest.mark.parametrize("shards", [1, 4, 8, 31])
def test_adding_a_shard_moves_about_one_service_in_n_and_only_to_the_new_shard(shards):
    moved = [ns for ns in NAMES if shard_of(ns, shards) != shard_of(ns, shards + 1)]
    assert {shard_of(ns, shards + 1) for ns in moved} <= {shards}  # nobody moves between old shards
    p = 1 / (shards + 1)
    sd = math.sqrt(len(NAMES) * p * (1 - p))
    assert abs(len(moved) - len(NAMES) * p) < 5 * sd, (len(moved), len(NAMES) * p)


# ------------------------------------------------------------------------------------------ listeners


def test_each_port_and_shard_gets_its_listener_and_route_configuration():
    state = run(sharded(2))
    envoy = state.envoy[IG]
    # shard k's listener for port P binds the targetPort of canal-gateway-<k>'s port P; nothing binds P itself
    assert set(envoy.listeners) == {"0.0.0.0_20000", "0.0.0.0_20001", "0.0.0.0_20100", "0.0.0.0_20101"}
    for port in (20000, 20001, 20100, 20101):
        listener = envoy.listeners[f"0.0.0.0_{port}"]
        assert (listener.port, listener.protocol, listener.route_config) == (port, "HTTP", f"http.{port}")
    assert set(envoy.route_configs) == {"http.20000", "http.20001", "http.20100", "http.20101"}


def test_virtual_hosts_go_to_their_shard_and_shared_hosts_to_every_shard():
    ns0, ns1 = namespace_on(0, "alpha"), namespace_on(1, "beta")
    objs = sharded(2) + routed("alpha", ns0, "10.96.1.1") + routed("beta", ns1, "10.96.1.2")
    objs += [*app("gamma", ns1, ips=("10.244.6.6",), ip="10.96.1.3")]
    objs.append(virtual_service("shop", ns0, hosts=["shop.example.com"], http=[{"route": [route("alpha")]}]))
    objs.append(
        virtual_service(
            "star",
            "istio-system",
            hosts=["*"],
            gateways=["canal"],
            http=[{"route": [route(f"gamma.{ns1}.svc.cluster.local", port=80)]}],
        )
    )
    state = run(objs)
    alpha, beta = f"alpha.{ns0}.svc.cluster.local", f"beta.{ns1}.svc.cluster.local"
    assert vhosts(state, 20000) == {alpha, "shop.example.com", "*"}
    assert vhosts(state, 20001) == {beta, "shop.example.com", "*"}
    # the Services have port 80 only; the literal host and `*` are admitted on 8080 too, in both shards
    assert vhosts(state, 20100) == vhosts(state, 20101) == {"shop.example.com", "*"}
    shop = state.envoy[IG].route_configs["http.20101"].virtual_hosts["shop.example.com"]
    assert shop.domains == ("shop.example.com", "shop.example.com:8080")  # the port clients send, not 20101
    beta_vh = state.envoy[IG].route_configs["http.20001"].virtual_hosts[beta]
    assert beta_vh.name == f"{beta}:80" and "beta:80" in beta_vh.domains
    # gamma moves through `*` only, and its name points at its own shard
    gamma_shard = by_hand(f"{ns1}/gamma", 2)
    assert (
        state.dns[f"gamma.{ns1}.svc.cluster.local"].target
        == f"canal-gateway-{gamma_shard}.istio-system.svc.cluster.local"
    )


def test_dns_and_redirects_point_at_the_shard_of_the_service():
    ns0, ns1 = namespace_on(0, "alpha"), namespace_on(1, "beta")
    objs = sharded(2) + routed("alpha", ns0, "10.96.1.1", ports=[80, 8080]) + routed("beta", ns1, "10.96.1.2")
    state = run(objs)
    alpha, beta = state.dns[f"alpha.{ns0}.svc.cluster.local"], state.dns[f"beta.{ns1}.svc.cluster.local"]
    assert (alpha.addresses, alpha.target) == (("10.96.0.60",), "canal-gateway-0.istio-system.svc.cluster.local")
    assert (beta.addresses, beta.target) == (("10.96.0.61",), "canal-gateway-1.istio-system.svc.cluster.local")
    rules = {(k.cluster_ip, k.port): [(b.address, b.port) for b in r.backends] for k, r in state.redirects.items()}
    assert rules == {
        ("10.96.1.1", 80): [(GATEWAY_POD, 20000)],
        ("10.96.1.1", 8080): [(GATEWAY_POD, 20100)],
        ("10.96.1.2", 80): [(GATEWAY_POD, 20001)],
    }


def test_same_short_name_in_namespaces_on_different_shards_both_migrate():
    ns0, ns1 = namespace_on(0, "web"), namespace_on(1, "web")
    objs = sharded(2) + routed("web", ns0, "10.96.1.1", "2024-01-01T00:00:00Z")
    objs += routed("web", ns1, "10.96.1.2", "2024-02-01T00:00:00Z")
    state = run(objs)
    for ns, listener in ((ns0, 20000), (ns1, 20001)):
        vh = state.envoy[IG].route_configs[f"http.{listener}"].virtual_hosts[f"web.{ns}.svc.cluster.local"]
        assert {"web", "web:80"} <= set(vh.domains)
        assert f"web.{ns}.svc.cluster.local" in state.dns
    assert state.rejections() == []


def test_same_short_name_within_one_shard_goes_to_the_older_service():
    ns0 = namespace_on(0, "web")
    other = namespace_on(0, "web", skip=(ns0,))
    objs = sharded(2) + routed("web", ns0, "10.96.1.1", "2024-01-01T00:00:00Z")
    objs += routed("web", other, "10.96.1.2", "2024-02-01T00:00:00Z")
    state = run(objs)
    assert f"web.{ns0}.svc.cluster.local" in state.dns
    assert f"web.{other}.svc.cluster.local" not in state.dns
    ((field, reason),) = rejections_of(state, ObjectRef("VirtualService", other, "web"))
    assert field == "spec.hosts"
    assert (
        f"on port 80 (shard 0, listener port 20000) its name(s) web, web:80 belong to web.{ns0}.svc.cluster.local"
        in reason
    )


def test_tcp_services_on_one_port_conflict_only_within_a_shard():
    ns0, ns1 = namespace_on(0, "db"), namespace_on(1, "db")
    other = namespace_on(0, "db", skip=(ns0,))
    objs = sharded(2, servers=[(80, "HTTP"), (3306, "TCP")])
    for name, ns, ip, created in (
        ("db", ns0, "10.96.2.1", "2024-01-01T00:00:00Z"),
        ("db", ns1, "10.96.2.2", "2024-02-01T00:00:00Z"),
        ("db", other, "10.96.2.3", "2024-03-01T00:00:00Z"),
    ):
        objs.append(service(name, ns, [(3306, "tcp-mysql")], ip=ip))
        objs.append(virtual_service(name, ns, tcp=[{"route": [route(name, port=3306)]}], created=created))
    state = run(objs)
    envoy = state.envoy[IG]
    shard0, shard1 = envoy.listeners["0.0.0.0_20200"], envoy.listeners["0.0.0.0_20201"]
    assert shard0.protocol == shard1.protocol == "TCP"
    assert [c.cluster for c in shard0.tcp.clusters] == [f"outbound|3306||db.{ns0}.svc.cluster.local"]
    assert [c.cluster for c in shard1.tcp.clusters] == [f"outbound|3306||db.{ns1}.svc.cluster.local"]
    assert {f"db.{ns0}.svc.cluster.local", f"db.{ns1}.svc.cluster.local"} <= set(state.dns)
    assert f"db.{other}.svc.cluster.local" not in state.dns
    reasons = [r for _, r in rejections_of(state, ObjectRef("VirtualService", other, "db"))]
    assert any(
        r.startswith("TCP port 3306 (shard 0, listener port 20200) of Gateway istio-system/canal already carries")
        for r in reasons
    )
    assert rejections_of(state, ObjectRef("VirtualService", ns1, "db")) == []


def test_namespace_defaults_follow_the_shard_of_their_service():
    ns0, ns1 = namespace_on(0, "cart"), namespace_on(1, "pay")
    objs = sharded(2, namespaceSelector={"matchLabels": {"canal.io/migrate": "true"}})
    objs += [namespace(ns, **{"canal.io/migrate": "true"}) for ns in (ns0, ns1)]
    objs += app("cart", ns0, ips=("10.244.7.1",), ip="10.96.3.1") + app("pay", ns1, ips=("10.244.7.2",), ip="10.96.3.2")
    state = run(objs)
    assert vhosts(state, 20000) == {f"cart.{ns0}.svc.cluster.local"}
    assert vhosts(state, 20001) == {f"pay.{ns1}.svc.cluster.local"}
    assert state.dns[f"pay.{ns1}.svc.cluster.local"].addresses == ("10.96.0.61",)


def test_shard_services_are_never_routed_through_the_gateway():
    objs = sharded(2)
    objs.append(
        virtual_service("self", "istio-system", hosts=["canal-gateway-1"], http=[{"route": [route("canal-gateway-1")]}])
    )
    reasons = [r for _, r in rejections_of(run(objs), ObjectRef("VirtualService", "istio-system", "self"))]
    assert any("gateway's own Service" in r for r in reasons)


def test_status_reports_the_shards():
    got = conditions(run(sharded(2)))
    assert got["AddressResolved"] == ("True", "Sharded", "canal-gateway-0: 10.96.0.60; canal-gateway-1: 10.96.0.61")
    assert got["ShardsReady"] == (
        "True",
        "ShardServicesReady",
        "2 shards; listener ports: port 80: 20000-20001; port 8080: 20100-20101",
    )
    assert got["Accepted"][0] == "True"


def test_one_shard_is_the_unsharded_gateway_byte_for_byte():
    """shards: 1 (or absent) is exactly today's gateway: listeners on the server ports, the one gateway Service."""
    apps = routed("alpha", "ns-a", "10.96.1.1") + routed("beta", "ns-b", "10.96.1.2")
    gw = [gateway(), pod("gw-1", "istio-system", GATEWAY_POD, app="canal-gateway")]
    gw.append(service("canal-gateway", "istio-system", [80], ip="10.96.0.50"))
    plain = run([*gw, internal_gateway(service_ref="canal-gateway"), *apps])
    one = run([*gw, internal_gateway(service_ref="canal-gateway", shards=1), *apps])
    assert canonical_json(render_state(one)) == canonical_json(render_state(plain))
    assert set(plain.envoy[IG].listeners) == {"0.0.0.0_80"}
    assert plain.dns["alpha.ns-a.svc.cluster.local"].target == "canal-gateway.istio-system.svc.cluster.local"


# ------------------------------------------------------------------------------------------ broken setups

BROKEN = {
    "missing": (
        {"drop": 1},
        "shard Service(s) canal-gateway-1 not found in namespace istio-system",
    ),
    "headless": ({"headless": 1}, "shard Service(s) canal-gateway-1 have no cluster IP"),
    "port missing": (
        {"targets": {1: {80: 20001}}},
        "shard Service(s) lack TCP port(s) of Gateway istio-system/canal: canal-gateway-1 (8080)",
    ),
    "named target port": (
        {"targets": {0: {80: "http", 8080: 20100}}},
        "shard Service port(s) canal-gateway-0 port 80 ('http') need a numeric targetPort",
    ),
    "clash": (
        {"targets": {1: {80: 20000, 8080: 20101}}},
        "listener port(s) 20000 (canal-gateway-0 port 80 and canal-gateway-1 port 80) are the targetPort of more "
        "than one (port, shard)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_shard_setup_leaves_every_service_direct_and_says_why(case):
    how, reason = BROKEN[case]
    objs = sharded(2, targets=how.get("targets"))
    gateway_services = [o for o in objs if o["metadata"]["name"].startswith("canal-gateway-")]
    if "drop" in how:
        objs.remove(gateway_services[how["drop"]])
    if "headless" in how:
        gateway_services[how["headless"]]["spec"]["clusterIP"] = "None"
    objs += routed("alpha", namespace_on(0, "alpha"), "10.96.1.1")
    state = run(objs)
    own = rejections_of(state, IG_REF)
    assert len(own) == 1 and own[0][0] == "spec.address.shards" and reason in own[0][1], own
    got = conditions(state)
    assert got["AddressResolved"][:2] == ("False", "ShardsNotReady")
    assert got["ShardsReady"][:2] == ("False", "InvalidShardServices") and reason in got["ShardsReady"][2]
    assert got["RedirectReady"][:2] == ("False", "ShardsNotReady")
    assert got["Accepted"][:2] == ("False", "PartiallyInvalid")
    # nothing is rewritten or redirected: the Service stays direct, and its VirtualService says why
    assert not state.dns and not state.redirects
    ((field, why),) = rejections_of(state, ObjectRef("VirtualService", namespace_on(0, "alpha"), "alpha"))
    assert field == "spec.hosts" and "the gateway's shard Services are not usable: " + reason in why
    # the routes are still served, on the unsharded listeners (for clients that call the gateway explicitly)
    assert set(state.envoy[IG].listeners) == {"0.0.0.0_80", "0.0.0.0_8080"}


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ({"serviceRef": {"name": "canal-gateway"}, "shards": 0}, "must be at least 1, got 0"),
        ({"serviceRef": {"name": "canal-gateway"}, "shards": 257}, "must be at most 256, got 257"),
        ({"serviceRef": {"name": "canal-gateway"}, "shards": "many"}, "must be an integer"),
        ({"ips": ["10.96.0.50"], "shards": 2}, "needs serviceRef"),
        ({"serviceRef": {"name": "g" * 62}, "shards": 11}, f"shard Service name '{'g' * 62}-10' is not a valid"),
    ],
)
def test_shards_are_validated_when_parsed(address, reason):
    ig = internal_gateway()
    ig["spec"]["address"] = address
    state = run([gateway(), ig])
    ((field, why),) = rejections_of(state, IG_REF)
    assert field == "spec.address.shards" and reason in why
    assert IG not in state.envoy  # a rejected InternalGateway programs nothing


# ------------------------------------------------------------------------------------------ incremental


def test_incremental_changes_to_the_shards_equal_a_full_translation():
    # alpha is on shard 0 of 2 and is one of the Services a third shard takes over
    ns0 = namespace_where(lambda ns: by_hand(f"{ns}/alpha", 2) == 0 and by_hand(f"{ns}/alpha", 3) == 2)
    ns1 = namespace_on(1, "beta")
    objs = sharded(2) + routed("alpha", ns0, "10.96.1.1") + routed("beta", ns1, "10.96.1.2")
    translator = Translator()
    translator.apply([parse_object(o) for o in objs])

    def step(*objects: dict) -> None:
        state = translator.apply([parse_object(o) for o in objects])
        assert state == translate(translator.snapshot)

    step(shard_service(1, {80: 20051, 8080: 20101}, ip="10.96.0.61"))  # shard 1 moves its port-80 listener
    assert "0.0.0.0_20051" in translator.desired.envoy[IG].listeners
    assert f"beta.{ns1}.svc.cluster.local" in vhosts(translator.desired, 20051)
    step(shard_service(0, {80: 20000, 8080: 20100}, ip="10.96.0.99"))  # a new ClusterIP for shard 0
    assert translator.desired.dns[f"alpha.{ns0}.svc.cluster.local"].addresses == ("10.96.0.99",)
    step(internal_gateway(service_ref="canal-gateway", shards=3))  # canal-gateway-2 does not exist yet
    assert not translator.desired.dns
    step(shard_service(2, {80: 20002, 8080: 20102}, ip="10.96.0.62"))
    record = translator.desired.dns[f"alpha.{ns0}.svc.cluster.local"]
    assert record.target == "canal-gateway-2.istio-system.svc.cluster.local"
    step(namespace("ns-new"), *routed("gamma", "ns-new", "10.96.1.9"))  # a new namespace and its Service
    gamma = translator.desired.dns["gamma.ns-new.svc.cluster.local"]
    assert gamma.target == f"canal-gateway-{by_hand('ns-new/gamma', 3)}.istio-system.svc.cluster.local"
    step(internal_gateway(service_ref="canal-gateway"))  # back to one shard: the listeners are the ports again
    assert set(translator.desired.envoy[IG].listeners) == {"0.0.0.0_80", "0.0.0.0_8080"}
