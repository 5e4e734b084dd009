"""The real thing: `canal run` programs a real Envoy over ADS (SotW and Delta) and traffic behaves as configured.

Every routing feature is checked by what Envoy does with requests, not by what Canal says it sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.builders import (
    destination_rule,
    endpoint_slice,
    gateway,
    internal_gateway,
    pod,
    route,
    service,
    virtual_service,
)
from tests.envoy_harness import Backend, ControlPlane, Envoy, backends, free_port, request, wait_for

HOST = "helloworld.default.svc.cluster.local"


class World:
    """A gateway with one HTTP server, helloworld (v1 and v2 pods), and helper Services for the features."""

    def __init__(self, tmp: Path, delta: bool) -> None:
        self.tmp = tmp
        self.port = free_port()  # the gateway server port, which is also every Service's port
        self.backend_port = free_port()
        self.addresses = {"v1": "127.0.0.2", "v2": "127.0.0.3", "shadow": "127.0.0.4", "flaky": "127.0.0.5"}
        self._backends = backends(*((name, ip, self.backend_port) for name, ip in self.addresses.items()))
        self.backends: dict[str, Backend] = self._backends.__enter__()
        self.plane = ControlPlane(tmp)
        self.plane.write("base", self.base_objects())
        self.plane.write("routes", [self.helloworld_vs()])
        self.envoy = Envoy(tmp, self.plane.xds_port, delta=delta)
        wait_for(lambda: self.get("/hello").status == 200, what="Envoy serving /hello")

    def app(self, name: str, version: str | None = None) -> list[dict]:
        ip = self.addresses[version or name]
        return [pod(f"{name}-{version or 'x'}", ip=ip, app=name, version=version or "x")]

    def base_objects(self) -> list[dict]:
        objs = [gateway(servers=[(self.port, "HTTP")]), internal_gateway(ips=["127.0.0.1"], redirect={"mode": "none"})]
        objs.append(service("helloworld", ports=[(self.port, "http")], ip="10.96.0.10"))
        objs.append(
            endpoint_slice(
                "helloworld",
                endpoints=[("127.0.0.2", "helloworld-v1"), ("127.0.0.3", "helloworld-v2")],
                ports=[("http", self.backend_port)],
            )
        )
        objs += self.app("helloworld", "v1") + self.app("helloworld", "v2")
        for name in ("shadow", "flaky"):
            objs.append(service(name, ports=[(self.port, "http")], ip=None))
            objs.append(
                endpoint_slice(
                    name, endpoints=[(self.addresses[name], f"{name}-x")], ports=[("http", self.backend_port)]
                )
            )
            objs += self.app(name)
        subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
        objs.append(destination_rule("helloworld", "helloworld", subsets=subsets))
        return objs

    def helloworld_vs(self, extra: list[dict] | None = None) -> dict:
        http = [*(extra or []), {"match": [{"uri": {"exact": "/hello"}}], "route": [route("helloworld")]}]
        return virtual_service("helloworld", hosts=[HOST], http=http)

    def get(self, path: str, host: str = HOST, **kw):
        return request(self.port, path, host, **kw)

    def close(self) -> None:
        self.envoy.stop()
        self.plane.stop()
        self._backends.__exit__(None, None, None)


@pytest.fixture(scope="module", params=["sotw", "delta"])
def world(request, tmp_path_factory):
    w = World(tmp_path_factory.mktemp(request.param), delta=request.param == "delta")
    yield w
    w.close()


def set_routes(world: World, http: list[dict]) -> None:
    """Install extra HTTP routes ahead of /hello and wait until Envoy has them (every proxy ACKed)."""
    world.plane.write("routes", [world.helloworld_vs(http)])
    time.sleep(0.1)
    try:
        wait_for(world.plane.converged, what="convergence")
    except AssertionError:
        raise AssertionError(
            f"not converged; status: {world.plane.status()}\ncanal log:\n{world.plane.log()[-3000:]}"
        ) from None


def test_hello_reaches_helloworld(world):
    reply = world.get("/hello")
    assert reply.status == 200 and reply.json["backend"] in ("v1", "v2")
    assert reply.json["path"] == "/hello"
    # name variants and the ClusterIP answer too; an unknown host does not
    assert world.get("/hello", host=f"helloworld:{world.port}").status == 200
    assert world.get("/hello", host=f"10.96.0.10:{world.port}").status == 200
    assert world.get("/hello", host="nobody.example").status == 404


def test_weights_split_traffic(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"exact": "/split"}}],
                "route": [route("helloworld", subset="v1", weight=80), route("helloworld", subset="v2", weight=20)],
            }
        ],
    )
    seen = Counter(world.get("/split").json["backend"] for _ in range(400))
    assert set(seen) == {"v1", "v2"}
    assert 0.72 <= seen["v1"] / 400 <= 0.88, seen  # 80% +- 8 points (binomial sd at n=400 is 2 points)


def test_header_match_selects_the_subset(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"prefix": "/canary"}, "headers": {"x-canary": {"exact": "yes"}}}],
                "route": [route("helloworld", subset="v2")],
            },
            {"match": [{"uri": {"prefix": "/canary"}}], "route": [route("helloworld", subset="v1")]},
        ],
    )
    assert {world.get("/canary", headers={"x-canary": "yes"}).json["backend"] for _ in range(20)} == {"v2"}
    assert {world.get("/canary").json["backend"] for _ in range(20)} == {"v1"}


def test_rewrite_reaches_the_backend_with_the_new_path_and_host(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"prefix": "/old"}}],
                "rewrite": {"uri": "/new", "authority": "api.internal"},
                "route": [route("helloworld")],
            }
        ],
    )
    seen = world.get("/old/thing").json
    assert seen["path"] == "/new/thing" and seen["headers"]["host"] == "api.internal"


def test_fault_abort_returns_its_code(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"exact": "/teapot"}}],
                "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                "route": [route("helloworld")],
            }
        ],
    )
    assert world.get("/teapot").status == 418
    assert world.get("/hello").status == 200  # the fault filter changes nothing elsewhere


def test_retries_retry(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"exact": "/flaky"}}],
                "retries": {"attempts": 3, "retryOn": "5xx"},
                "route": [route("flaky")],
            }
        ],
    )
    flaky = world.backends["flaky"]
    flaky.requests.clear()
    flaky.fail_first = 2
    reply = world.get("/flaky")
    assert reply.status == 200
    assert len(flaky.requests) == 3  # two 503s retried, the third answered


def test_mirror_duplicates_requests(world):
    set_routes(
        world,
        [
            {
                "match": [{"uri": {"exact": "/mirrored"}}],
                "mirror": {"host": "shadow"},
                "mirrorPercentage": {"value": 100},
                "route": [route("helloworld")],
            }
        ],
    )
    shadow = world.backends["shadow"]
    shadow.requests.clear()
    assert world.get("/mirrored").json["backend"] in ("v1", "v2")
    wait_for(lambda: any(r["path"] == "/mirrored" for r in shadow.requests), timeout=5, what="mirrored request")


def test_redirect_redirects(world):
    set_routes(world, [{"match": [{"uri": {"exact": "/moved"}}], "redirect": {"uri": "/hello", "redirectCode": 308}}])
    reply = world.get("/moved")
    assert reply.status == 308 and reply.headers["location"].endswith("/hello")


def test_edits_apply_without_restart_or_failed_requests_and_removal_removes(world):
    failures: list[str] = []
    stop = threading.Event()
    count = 0

    def load() -> None:
        nonlocal count
        while not stop.is_set():
            try:
                reply = world.get("/hello")
                if reply.status != 200:
                    failures.append(f"status {reply.status}")
            except OSError as err:
                failures.append(repr(err))
            count += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        pid = world.envoy.proc.pid
        for i in range(6):  # new routes, new clusters (subsets), weight changes, removals
            extra = [
                {
                    "match": [{"uri": {"prefix": f"/edit-{i}"}}],
                    "route": [route("helloworld", subset="v1" if i % 2 else "v2", weight=100)],
                }
            ]
            set_routes(world, extra)
            assert world.get(f"/edit-{i}").status == 200
        set_routes(world, [])
        assert world.get("/edit-5").status == 404  # a removed route is gone
        assert world.envoy.proc.pid == pid and world.envoy.alive()
    finally:
        stop.set()
        worker.join(timeout=10)
    assert count > 50
    assert failures == []


def test_server_restart_keeps_envoy_serving_and_reconverges(world):
    port = world.plane.xds_port
    world.plane.stop()
    for _ in range(20):  # Envoy keeps its config while the control plane is away
        assert world.get("/hello").status == 200
    world.plane = ControlPlane(world.tmp, xds_port=port)
    wait_for(world.plane.converged, timeout=30, what="Envoy reconnecting and converging")
    assert world.get("/hello").status == 200


def _pushes(world: World, kind: str) -> float:
    for line in world.plane.metrics().splitlines():
        if line.startswith("canal_xds_pushes_total{") and f'type="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rejected_update_keeps_the_old_config_and_the_next_change_is_accepted(world):
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", 0))  # the gateway host already uses this port: Envoy cannot bind it and NACKs
    blocker.listen()
    busy = blocker.getsockname()[1]
    try:
        objs = world.base_objects()
        objs[0] = gateway(servers=[(world.port, "HTTP"), (busy, "HTTP")])
        world.plane.write("base", objs)

        def rejected() -> str:
            proxies = world.plane.status()["xds"]["istio-system/canal"]["proxies"]
            return proxies[0]["errors"].get("lds", "")

        assert "Address already in use" in wait_for(rejected, what="the NACK to show in /status")
        assert "canal_xds_nacks_total" in world.plane.metrics()
        for _ in range(10):  # Envoy keeps serving what it had
            assert world.get("/hello").status == 200
        before = _pushes(world, "lds")
        time.sleep(1.0)
        assert _pushes(world, "lds") == before  # the rejected version is not sent again and again
        world.plane.write("base", world.base_objects())  # the next valid change
        wait_for(world.plane.converged, what="convergence after the fix")
        assert rejected() == ""
        assert world.get("/hello").status == 200
    finally:
        blocker.close()


def test_two_gateway_groups_get_only_their_own_config(world):
    other_port = free_port()
    objs = [
        *world.base_objects(),
        gateway("other", servers=[(other_port, "HTTP")]),
        internal_gateway("other", gateway_name="other", ips=["127.0.0.1"], redirect={"mode": "none"}),
        service("greeter", ports=[(other_port, "http")], ip=None),
        endpoint_slice("greeter", endpoints=[("127.0.0.2", "helloworld-v1")], ports=[("http", world.backend_port)]),
        virtual_service("greeter", gateways=["istio-system/other"], http=[{"route": [route("greeter")]}]),
    ]
    world.plane.write("base", objs)
    other = Envoy(world.tmp, world.plane.xds_port, group="istio-system/other", node_id="other-gw")
    try:
        wait_for(
            lambda: request(other_port, "/x", "greeter.default.svc.cluster.local").status == 200,
            what="the other group serving greeter",
        )
        wait_for(lambda: world.plane.converged("istio-system/other"), what="the other group converging")
        mine, theirs = world.envoy.admin("/listeners"), other.admin("/listeners")
        assert f"0.0.0.0_{world.port}" in mine and f"0.0.0.0_{other_port}" not in mine
        assert f"0.0.0.0_{other_port}" in theirs and f"0.0.0.0_{world.port}" not in theirs
        assert "greeter" not in world.envoy.admin("/clusters") and "helloworld" not in other.admin("/clusters")
    finally:
        other.stop()
        world.plane.write("base", world.base_objects())
        wait_for(world.plane.converged, what="convergence")
