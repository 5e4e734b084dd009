"""A sharded gateway on a real Envoy: `canal run` programs one listener per shard, and each serves its own Services.

Two namespaces on different shards both have a Service `web`; on one listener only one of them could own the
short name, on two shard listeners both do. Clients reach shard k through the listener port its Service
canal-gateway-<k> names as targetPort, which here are free loopback ports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import (
    endpoint_slice,
    gateway,
    internal_gateway,
    pod,
    route,
    service,
    shard_service,
    virtual_service,
)
from tests.envoy_harness import ControlPlane, Envoy, backends, free_port, request, wait_for
from tests.test_shards import namespace_on


class ShardedWorld:
    def __init__(self, tmp: Path, delta: bool) -> None:
        self.port = free_port()  # the Gateway server port and every Service's port; nothing binds it
        self.listeners = [free_port(), free_port()]  # shard 0's and shard 1's listener for that port
        self.backend_port = free_port()
        self.namespaces = [namespace_on(0, "web"), namespace_on(1, "web")]
        self.addresses = ["127.0.0.2", "127.0.0.3"]
        self._backends = backends(
            *((ns, ip, self.backend_port) for ns, ip in zip(self.namespaces, self.addresses, strict=True))
        )
        self.backends = self._backends.__enter__()
        self.plane = ControlPlane(tmp)
        self.plane.write("base", self.objects())
        self.envoy = Envoy(tmp, self.plane.xds_port, delta=delta)

    def objects(self, redirect_old_in: str = "") -> list[dict]:
        """`redirect_old_in`: that namespace's web also redirects /old to /new (a change to one shard only)."""
        objs = [
            gateway(servers=[(self.port, "HTTP")]),
            internal_gateway(service_ref="canal-gateway", shards=2, redirect={"mode": "none"}),
        ]
        for k, listener in enumerate(self.listeners):
            objs.append(shard_service(k, {self.port: listener}, ip=f"10.96.0.{60 + k}"))
        for i, (ns, ip) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            objs.append(service("web", ns, ports=[(self.port, "http")], ip=f"10.96.1.{i + 1}"))
            objs.append(endpoint_slice("web", ns, endpoints=[(ip, "web-0")], ports=[("http", self.backend_port)]))
            objs.append(pod("web-0", ns, ip, app="web"))
            http = [{"route": [route("web")]}]
            if ns == redirect_old_in:
                http.insert(0, {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new"}})
            objs.append(virtual_service("web", ns, http=http, created=f"2024-0{i + 1}-01T00:00:00Z"))
        return objs

    def close(self) -> None:
        self.envoy.stop()
        self.plane.stop()
        self._backends.__exit__(None, None, None)


@pytest.fixture(scope="module", params=["sotw", "delta"])
def world(request, tmp_path_factory):
    w = ShardedWorld(tmp_path_factory.mktemp(f"shards-{request.param}"), delta=request.param == "delta")
    yield w
    w.close()


def test_each_shard_listener_serves_the_services_of_its_namespaces(world):
    for listener in world.listeners:
        wait_for(lambda listener=listener: request(listener, "/", "web").status == 200, what=f"listener {listener}")
    wait_for(world.plane.converged, what="convergence")
    for listener, ns in zip(world.listeners, world.namespaces, strict=True):
        # the short name (what a client in ns sends) and the qualified names reach ns's own web
        for host in ("web", f"web:{world.port}", f"web.{ns}", f"web.{ns}.svc.cluster.local"):
            reply = request(listener, "/who", host)
            assert reply.status == 200 and reply.json["backend"] == ns, (listener, host, reply.status)
    # a shard's route table holds only its own Services: the other namespace's web is not there
    assert request(world.listeners[0], "/", f"web.{world.namespaces[1]}").status == 404
    assert request(world.listeners[1], "/", f"web.{world.namespaces[0]}").status == 404
    assert not world.envoy.listening(world.port)


def test_envoy_has_one_listener_and_route_configuration_per_shard(world):
    wait_for(world.plane.converged, what="convergence")
    listeners = world.envoy.admin("/listeners")
    for listener in world.listeners:
        assert f"0.0.0.0_{listener}" in listeners
    dump = json.loads(world.envoy.admin("/config_dump?resource=dynamic_route_configs"))
    names = {c["route_config"]["name"] for c in dump["configs"]}
    assert names == {f"http.{listener}" for listener in world.listeners}


def test_a_change_to_one_shard_reaches_envoy_and_leaves_the_other_alone(world):
    """An edit of one namespace's VirtualService changes its shard's route configuration only (in SotW too, where
    the response carries just that one); the other shard keeps serving unchanged."""
    wait_for(world.plane.converged, what="convergence")
    stat = f"http.0.0.0.0_{world.listeners[0]}.rds.http.{world.listeners[0]}.update_success"
    before = world.envoy.admin(f"/stats?filter={stat}")
    assert "update_success: " in before, before
    world.plane.write("base", world.objects(redirect_old_in=world.namespaces[1]))
    wait_for(lambda: request(world.listeners[1], "/old", "web").status == 301, what="the redirect on shard 1")
    assert request(world.listeners[1], "/old", "web").headers["location"].endswith("/new")
    assert request(world.listeners[0], "/old", "web").status == 200  # shard 0 has no such route
    wait_for(world.plane.converged, what="convergence")
    assert world.envoy.admin(f"/stats?filter={stat}") == before  # shard 0's route configuration was not updated
    world.plane.write("base", world.objects())
    wait_for(lambda: request(world.listeners[1], "/old", "web").status == 200, what="the redirect to go")
