"""`canal controller` end to end: examples/helloworld applied to the test Kubernetes API server, the controller's
informers bind the VirtualService, a real Envoy (bootstrap from `canal bootstrap`) routes /hello to a loopback
backend, Canal's DNS server answers the gateway address, and the InternalGateway's status says so; deleting the
VirtualService takes the route, the name and the redirect away, and status follows.

The example is applied as shipped except for what a loopback test must change: ports (free ones instead of 5000),
the backend pods' addresses (127.0.0.x, where the test's backends listen) and dns.mode server (Canal's own DNS
server instead of CoreDNS). Expected values come from the example (its ClusterIPs, names) and from what the test
changed, never from the controller's output.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, RCODE, DNSRecord

from canal.controller import Controller, ControllerOptions
from canal.desired import RedirectKey
from canal.model.base import ObjectRef
from canal.serialize import canonical_json, render_state
from tests.conftest import run_canal
from tests.envoy_harness import Envoy, backends, free_port, request, wait_for
from tests.kube_api import KubeApiServer, ResourceType, custom_resource

ROOT = Path(__file__).resolve().parent.parent
HOST = "helloworld.default.svc.cluster.local"
GATEWAY_IP = "10.96.0.50"  # the canal-gateway Service's ClusterIP in the example
HELLO_CLUSTER_IP = "10.96.120.15"
IG = ("istio-system", "canal")

RESOURCES = (
    custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways"),
    custom_resource("networking.istio.io/v1", "Gateway", "gateways"),
    custom_resource("networking.istio.io/v1", "VirtualService", "virtualservices"),
    custom_resource("networking.istio.io/v1", "DestinationRule", "destinationrules"),
    ResourceType("", "v1", "events", "Event"),
)


def example(port: int, backend_port: int) -> list[dict[str, Any]]:
    """examples/helloworld with the loopback changes (see the module docstring)."""
    out = []
    for path in sorted((ROOT / "examples/helloworld").glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    pods = {"helloworld-v1-6f7d8c9b5-abcde": "127.0.0.2", "helloworld-v2-5c4b3a2d1-fghij": "127.0.0.3"}
    for obj in out:
        kind, spec = obj["kind"], obj.get("spec") or {}
        if kind == "Gateway":
            for server in spec["servers"]:
                server["port"]["number"] = port
        elif kind == "Service":
            for p in spec["ports"]:
                p["port"] = p["targetPort"] = port
        elif kind == "EndpointSlice":
            obj["ports"][0]["port"] = backend_port
            for endpoint, ip in zip(obj["endpoints"], pods.values(), strict=True):
                endpoint["addresses"] = [ip]
        elif kind == "Pod" and obj["metadata"]["name"] in pods:
            ip = pods[obj["metadata"]["name"]]
            obj["status"]["podIP"], obj["status"]["podIPs"] = ip, [{"ip": ip}]
        elif kind == "InternalGateway":
            spec["dns"]["mode"] = "server"
        elif kind == "VirtualService":
            for rule in spec.get("http", []):
                for dest in rule.get("route", []):
                    if "port" in dest["destination"]:
                        dest["destination"]["port"]["number"] = port
    return out


class Running:
    """The controller on its own event loop in a thread, as `canal controller` runs it."""

    def __init__(self, api: Any, options: ControllerOptions) -> None:
        self.controller = Controller(api, options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="controller", daemon=True)
        self.error: BaseException | None = None
        self.thread.start()

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.controller.run())
        except BaseException as error:
            self.error = error

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.controller.stop)
        self.thread.join(15)
        assert not self.thread.is_alive(), "the controller did not stop"
        self.loop.close()
        assert self.error is None, self.error


def ask(port: int, name: str) -> DNSRecord:
    return DNSRecord.parse(DNSRecord.question(name, "A").send("127.0.0.1", port, timeout=2))


def conditions(server: KubeApiServer) -> dict[str, tuple[str, str]]:
    obj = server.get("canal.io/v1alpha1", "InternalGateway", IG[1], IG[0]) or {}
    return {c["type"]: (c["status"], c["reason"]) for c in (obj.get("status") or {}).get("conditions", [])}


def status_of(server: KubeApiServer) -> dict[str, Any]:
    obj = server.get("canal.io/v1alpha1", "InternalGateway", IG[1], IG[0]) or {}
    return obj.get("status") or {}


def controller_options(**overrides: Any) -> ControllerOptions:
    defaults: dict[str, Any] = {
        "xds_address": f"127.0.0.1:{free_port()}",
        "metrics_address": f"127.0.0.1:{free_port()}",
        "quiet": 0.05,
        "status_interval": 0.2,
        "dns_forward": False,
        "coredns": None,
        "lease": None,
        "identity": "test-controller",
    }
    defaults.update(overrides)
    return ControllerOptions(**defaults)


def xds_port(running: Running) -> int:
    return int(running.controller.options.xds_address.rsplit(":", 1)[1])


@pytest.fixture
def cluster(tmp_path: Path):
    """The API server with the example applied, and the backends its pods stand for (no controller yet)."""
    port, backend_port = free_port(), free_port()
    with (
        KubeApiServer(RESOURCES) as server,
        backends(("v1", "127.0.0.2", backend_port), ("v2", "127.0.0.3", backend_port)) as started,
    ):
        objects = example(port, backend_port)
        for obj in objects:
            server.create(copy.deepcopy(obj))
        yield {"server": server, "port": port, "objects": objects, "backends": started, "tmp": tmp_path}


@pytest.fixture
def world(cluster: dict[str, Any]):
    """The cluster, one controller (no leader election) with Canal's DNS server, and a real Envoy."""
    dns_port = free_port()
    running = Running(cluster["server"].client(), controller_options(dns_address=f"127.0.0.1:{dns_port}"))
    envoy = None
    try:
        envoy = Envoy(cluster["tmp"], xds_port(running))
        yield {**cluster, "running": running, "dns_port": dns_port, "envoy": envoy}
    finally:
        if envoy is not None:
            envoy.stop()
        running.stop()


@pytest.mark.timeout(120)
def test_helloworld_through_the_api_server(world: dict[str, Any]) -> None:
    server, port, dns_port = world["server"], world["port"], world["dns_port"]
    controller: Controller = world["running"].controller
    reply = wait_for(lambda: (r := request(port, "/hello", HOST)).status == 200 and r, what="Envoy routes /hello")
    assert reply.json["backend"] in ("v1", "v2")  # answered by one of the example's two pods
    answer = ask(dns_port, HOST)
    assert [str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A] == [GATEWAY_IP]
    assert RedirectKey(HELLO_CLUSTER_IP, "tcp", port) in controller.serving.state.redirects
    wait_for(
        lambda: conditions(server).get("Programmed") == ("True", "Programmed"),
        what="status Programmed=True once the Envoy ACKed",
    )
    found = conditions(server)
    assert found["Accepted"] == ("True", "Accepted")
    assert found["DNSProgrammed"] == ("True", "Serving")
    assert found["NodesProgrammed"] == ("False", "NoNodeAgents")  # redirect.mode nftables, no agent here
    status = status_of(server)
    assert status["boundVirtualServices"] == ["default/helloworld"] and status["proxies"] == {
        "connected": 1,
        "programmed": 1,
    }
    generation = server.get("canal.io/v1alpha1", "InternalGateway", IG[1], IG[0])["metadata"]["generation"]
    assert status["observedGeneration"] == generation

    # what `canal status` prints of it, as a user runs it
    kubeconfig = str(server.write_kubeconfig(world["tmp"] / "kubeconfig"))
    listed = run_canal("status", "--kubeconfig", kubeconfig)
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1].split()
    assert row[:9] == ["istio-system", "canal", "canal", "1", "0", "True", "1/1", "True", "0/0"]
    detail = run_canal("status", "--kubeconfig", kubeconfig, "-n", "istio-system", "canal")
    assert "Programmed=True Programmed: 1/1 proxies ACKed the current config" in detail.stdout
    assert "Bound VirtualServices (1):\n  default/helloworld" in detail.stdout

    # the VirtualService goes: the route, the name and the redirect follow, and so does status
    server.delete("networking.istio.io/v1", "VirtualService", "helloworld", "default")
    wait_for(lambda: request(port, "/hello", HOST).status == 404, what="the route removed from Envoy")
    wait_for(lambda: ask(dns_port, HOST).header.rcode == RCODE.REFUSED, what="the name no longer Canal's")
    assert not controller.serving.state.redirects
    wait_for(lambda: status_of(server).get("boundCount") == 0, what="status: nothing bound")
    assert status_of(server)["boundVirtualServices"] == []


@pytest.mark.timeout(120)
def test_a_broken_virtualservice_is_reported_and_the_good_ones_keep_serving(world: dict[str, Any]) -> None:
    server, port = world["server"], world["port"]
    wait_for(lambda: request(port, "/hello", HOST).status == 200, what="Envoy routes /hello")
    broken = copy.deepcopy(next(o for o in world["objects"] if o["kind"] == "VirtualService"))
    broken["metadata"]["name"] = "broken"
    broken["spec"]["hosts"] = ["broken.default.svc.cluster.local"]
    broken["spec"]["http"] = [{"route": [{"destination": {"host": "nope.default.svc.cluster.local"}}]}]
    server.create(broken)

    def rejected() -> list[dict[str, Any]]:
        return [r for r in status_of(server).get("rejected", []) if r["name"] == "broken"]

    wait_for(rejected, what="the broken VirtualService in the gateway's status")
    (entry,) = rejected()
    assert entry["kind"] == "VirtualService" and entry["namespace"] == "default" and "nope" in entry["reason"]
    assert request(port, "/hello", HOST).status == 200  # the good VirtualService is still served

    def events() -> list[dict[str, Any]]:
        items, _ = server.store.list(server.store.kind("v1", "Event"), "default")
        return [e for e in items if e["involvedObject"]["name"] == "broken"]

    wait_for(events, what="an Event on the broken VirtualService")
    (event,) = events()
    assert event["reason"] == "Rejected" and event["type"] == "Warning" and "nope" in event["message"]
    assert event["involvedObject"]["kind"] == "VirtualService"


# ------------------------------------------------------------------------------------------------ faults


class Traffic:
    """Requests to /hello every 20 ms in a thread: every answer that is not a 200 is a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                reply = request(self.port, "/hello", HOST, timeout=2)
            except OSError as error:
                self.failures.append(repr(error))
                continue
            if reply.status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{reply.status} {reply.body[:80]!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def with_header(server: KubeApiServer, value: str, *, silent: bool = False) -> None:
    """Make the helloworld route add a response header: a change Envoy must apply, visible in every answer."""

    def mutate(obj: dict[str, Any]) -> None:
        for rule in obj["spec"]["http"]:
            rule["headers"] = {"response": {"set": {"x-canal-test": value}}}

    server.modify("networking.istio.io/v1", "VirtualService", "helloworld", "default", mutate, silent=silent)


def header_is(port: int, value: str) -> bool:
    reply = request(port, "/hello", HOST)
    return reply.status == 200 and reply.headers.get("x-canal-test") == value


def served_header(controller: Controller) -> str | None:
    """The x-canal-test value in the translated routes (what the publisher pushes), or None."""
    text = canonical_json(render_state(controller.serving.state))
    values = set(re.findall(r'\["x-canal-test",\s*"([^"]*)"\]', text))
    assert len(values) <= 1, values
    return values.pop() if values else None


@pytest.mark.timeout(60)
def test_an_isolated_change_goes_at_once_and_a_burst_is_folded(cluster: dict[str, Any]) -> None:
    """With a long quiet period (3 s), a lone edit is translated without waiting for it, while a burst of edits
    that follows it closely is folded into one more translation that carries the last edit."""
    server = cluster["server"]
    running = Running(server.client(), controller_options(quiet=3.0, max_delay=8.0))
    controller = running.controller
    try:
        wait_for(lambda: controller.translations >= 1, what="the first translation")
        time.sleep(3.2)  # a quiet period with no translation: the next edit is isolated
        before = controller.translations
        sent = time.monotonic()
        with_header(server, "lone")
        wait_for(lambda: served_header(controller) == "lone", timeout=10, what="the lone edit translated")
        assert time.monotonic() - sent < 2.0, "an isolated change waited for the quiet period"
        assert controller.translations == before + 1

        # a burst right after it (within the quiet period of the last translation): folded
        for i in range(20):
            with_header(server, f"burst-{i}")
            time.sleep(0.02)
        wait_for(lambda: served_header(controller) == "burst-19", timeout=15, what="the burst's last edit")
        assert controller.translations == before + 2, "the burst was not folded into one translation"
    finally:
        running.stop()


@pytest.mark.timeout(180)
def test_watch_drops_410_and_api_server_restarts_converge_and_envoy_keeps_serving(world: dict[str, Any]) -> None:
    server, port = world["server"], world["port"]
    wait_for(lambda: request(port, "/hello", HOST).status == 200, what="Envoy routes /hello")
    traffic = Traffic(port)
    try:
        # a dropped watch: the informer resumes, the next change arrives
        assert server.drop_watches() > 0
        with_header(server, "after-drop")
        wait_for(lambda: header_is(port, "after-drop"), what="a change after the watches were cut")
        # the API server goes away; meanwhile the VirtualService changes and the history is compacted, so the
        # informers' resume version is gone (410): they list again and find the change
        with server.outage():
            with_header(server, "after-restart")
            server.compact()
            time.sleep(1.0)  # informers back off, proxies keep their config
        wait_for(lambda: header_is(port, "after-restart"), timeout=40, what="the change made during the outage")
        # 409s on status writes: the next status is still written
        server.inject_conflict("canal.io/v1alpha1", "InternalGateway", IG[1], IG[0], times=3)
        broken = copy.deepcopy(next(o for o in world["objects"] if o["kind"] == "VirtualService"))
        broken["metadata"]["name"] = "broken"
        broken["spec"]["hosts"] = ["broken.default.svc.cluster.local"]
        broken["spec"]["http"] = [{"route": [{"destination": {"host": "nope.default.svc.cluster.local"}}]}]
        server.create(broken)
        wait_for(
            lambda: any(r["name"] == "broken" for r in status_of(server).get("rejected", [])),
            what="status written through 409 conflicts",
        )
        assert world["running"].controller.status_writer.conflicts >= 1
    finally:
        traffic.stop()
    assert traffic.ok > 20
    assert traffic.failures == [], traffic.failures[:5]


@pytest.mark.timeout(180)
def test_only_the_leader_writes_and_a_new_leader_takes_over(cluster: dict[str, Any]) -> None:
    server, port = cluster["server"], cluster["port"]
    lease = {"lease": ("istio-system", "canal-controller"), "lease_duration": 2.0, "renew_deadline": 1.0}
    replicas = [
        Running(server.client(), controller_options(identity=name, retry_period=0.2, **lease)) for name in ("a", "b")
    ]
    envoy = None
    try:
        leaders = wait_for(lambda: [r for r in replicas if r.controller.is_leader()] or None, what="one replica leads")
        (leader,) = leaders
        (follower,) = [r for r in replicas if r is not leader]
        # the gateway connects to the follower: every replica serves xDS
        envoy = Envoy(cluster["tmp"], xds_port(follower))
        wait_for(lambda: request(port, "/hello", HOST).status == 200, what="Envoy programmed by the follower")
        wait_for(lambda: status_of(server).get("conditions"), what="the leader writes status")
        assert leader.controller.status_writer.writes >= 1
        assert follower.controller.status_writer.writes == 0 and follower.controller.events.sent == 0
        # the leader goes away without releasing its lease (as a crashed pod): the follower takes over once the
        # lease expires, and its status shows the Envoy connected to it
        leader.controller.elector.release_on_cancel = False
        traffic = Traffic(port)
        leader.stop()
        replicas.remove(leader)
        wait_for(follower.controller.is_leader, timeout=10, what="the follower leads")
        wait_for(
            lambda: conditions(server).get("Programmed") == ("True", "Programmed"),
            what="the new leader's status: its own Envoy ACKed",
        )
        assert follower.controller.status_writer.writes >= 1
        traffic.stop()
        assert traffic.failures == [], traffic.failures[:5]
    finally:
        if envoy is not None:
            envoy.stop()
        for running in replicas:
            running.stop()


# ------------------------------------------------------------------------------------------------ CoreDNS mode


@pytest.mark.timeout(120)
def test_the_leader_edits_the_coredns_corefile_and_status_says_so(cluster: dict[str, Any]) -> None:
    """dns.mode coredns (put back as the example ships it): the Corefile gets the rewrite of helloworld's name to
    the gateway Service, and DNSProgrammed says it was written (no --dns-verify address here to probe)."""
    from canal.dns.coredns import ConfigMapRef

    server = cluster["server"]
    server.modify(
        "canal.io/v1alpha1", "InternalGateway", IG[1], IG[0], lambda o: o["spec"]["dns"].update({"mode": "coredns"})
    )
    original = (ROOT / "tests/corefiles/kubeadm.Corefile").read_text()
    server.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": original},
        }
    )
    running = Running(server.client(), controller_options(coredns=ConfigMapRef("kube-system", "coredns", "Corefile")))
    try:

        def corefile() -> str:
            return server.get("v1", "ConfigMap", "coredns", "kube-system")["data"]["Corefile"]

        rule = f"rewrite stop name exact {HOST} canal-gateway.istio-system.svc.cluster.local"
        wait_for(lambda: rule in corefile(), what="Canal's rewrite rule in the Corefile")
        wait_for(lambda: conditions(server).get("DNSProgrammed") == ("True", "Written"), what="DNSProgrammed")
        annotations = server.get("v1", "ConfigMap", "coredns", "kube-system")["metadata"]["annotations"]
        assert annotations["canal.io/original-corefile"] == original
        server.delete("networking.istio.io/v1", "VirtualService", "helloworld", "default")
        wait_for(lambda: corefile() == original, what="the original Corefile back once nothing is migrated")
    finally:
        running.stop()


@pytest.mark.timeout(120)
def test_canal_controller_runs_from_the_command_line(cluster: dict[str, Any]) -> None:
    """As the Deployment runs it: a kubeconfig, /ready once synced and translated, a clean exit on SIGTERM."""
    import signal
    import subprocess
    import urllib.request

    from tests.conftest import CANAL

    server = cluster["server"]
    kubeconfig = server.write_kubeconfig(cluster["tmp"] / "kubeconfig")
    metrics = free_port()
    addresses = ["--xds-address", f"127.0.0.1:{free_port()}", "--metrics-address", f"127.0.0.1:{metrics}"]
    process = subprocess.Popen(
        [str(CANAL), "controller", "--kubeconfig", str(kubeconfig), "--no-coredns", "--no-leader-election", *addresses],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=60, what="canal controller ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/status", timeout=2) as response:
            body = json.loads(response.read())
        assert body["controller"]["synced"] and body["controller"]["istioVersion"] == "v1"
        assert body["xds"]["istio-system/canal"]["serial"] >= 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output, output


@pytest.mark.timeout(120)
def test_leadership_lost_stops_writes_and_regained_resumes_them(cluster: dict[str, Any]) -> None:
    server = cluster["server"]
    options = controller_options(
        identity="solo", lease=("istio-system", "canal-controller"), lease_duration=2.0, renew_deadline=1.0,
        retry_period=0.2,
    )  # fmt: skip
    running = Running(server.client(), options)
    controller = running.controller
    try:
        wait_for(lambda: status_of(server).get("conditions"), what="the leader writes status")
        writes = controller.status_writer.writes
        # the Lease cannot be renewed for a while (its updates fail): leadership is lost, writes stop
        server.inject_failure(500, times=40, kind="Lease", method="PUT")
        wait_for(lambda: not controller.is_leader(), timeout=5, what="leadership lost")
        broken = copy.deepcopy(next(o for o in cluster["objects"] if o["kind"] == "VirtualService"))
        broken["metadata"]["name"] = "broken"
        broken["spec"]["hosts"] = ["broken.default.svc.cluster.local"]
        broken["spec"]["http"] = [{"route": [{"destination": {"host": "nope.default.svc.cluster.local"}}]}]
        server.create(broken)
        wait_for(lambda: any(r.ref.name == "broken" for r in controller.serving.state.rejections()), what="seen")
        time.sleep(0.6)  # a few status rounds while not leading
        assert controller.status_writer.writes == writes
        assert not any(r["name"] == "broken" for r in status_of(server).get("rejected", []))
        # the failures run out: the replica leads again and writes what happened meanwhile
        wait_for(controller.is_leader, timeout=30, what="leadership regained")
        wait_for(
            lambda: any(r["name"] == "broken" for r in status_of(server).get("rejected", [])),
            what="the new term's first status",
        )
        assert controller.elector.term >= 2
    finally:
        running.stop()


@pytest.mark.timeout(120)
def test_a_nack_is_in_status_and_an_event(cluster: dict[str, Any]) -> None:
    """Envoy cannot bind the gateway's port (something else holds it): it NACKs the listener, and status and an
    Event on the InternalGateway say which proxy rejected what."""
    import socket

    server, port = cluster["server"], cluster["port"]
    running = Running(server.client(), controller_options())
    envoy = None
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        try:
            envoy = Envoy(cluster["tmp"], xds_port(running))
            wait_for(lambda: conditions(server).get("Programmed", ("", ""))[1] == "Rejected", what="the NACK")
            nack = status_of(server)["lastNack"]
            assert nack["type"] == "lds" and nack["node"].startswith("gw-") and str(port) in nack["message"]

            def events() -> list[dict[str, Any]]:
                items, _ = server.store.list(server.store.kind("v1", "Event"), IG[0])
                return [e for e in items if e["reason"] == "ConfigRejected"]

            wait_for(events, what="a ConfigRejected Event")
            (event,) = events()
            assert event["involvedObject"] == {
                "apiVersion": "canal.io/v1alpha1",
                "kind": "InternalGateway",
                "namespace": IG[0],
                "name": IG[1],
            }
            assert "rejected lds" in event["message"]
        finally:
            if envoy is not None:
                envoy.stop()
            running.stop()


# ------------------------------------------------------------------------------------------------ Pods, per namespace

SHOP_PODS = {"reviews-v1-pod": ("10.244.5.1", "v1"), "reviews-v2-pod": ("10.244.5.2", "v2")}


def shop(port: int) -> list[dict[str, Any]]:
    """Namespace shop: Service reviews (targetPort 9080) with two pods, versions v1 and v2. No DestinationRule or
    VirtualService yet: nothing reads these Pods."""
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "reviews", "version": version}},
            "spec": {"nodeName": "worker-1"},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for name, (ip, version) in SHOP_PODS.items()
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.130.7",
                "clusterIPs": ["10.96.130.7"],
                "selector": {"app": "reviews"},
                "ports": [{"name": "http", "port": port, "targetPort": 9080, "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "reviews-q8v2x",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [ip],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"},
                }
                for name, (ip, _) in SHOP_PODS.items()
            ],
        },
        *pods,
    ]


def shop_rule() -> dict[str, Any]:
    """reviews' DestinationRule: a subset per version."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]},
    }


def reviews_route(port: int, subsets: bool) -> dict[str, Any]:
    dest = [{"destination": {"host": "reviews.shop.svc.cluster.local", "port": {"number": port}}}]
    if subsets:
        dest = [
            {"destination": {**dest[0]["destination"], "subset": "v1"}, "weight": 90},
            {"destination": {**dest[0]["destination"], "subset": "v2"}, "weight": 10},
        ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {
            "hosts": ["reviews.shop.svc.cluster.local"],
            "gateways": ["istio-system/canal"],
            "http": [{"route": dest}],
        },
    }


def pod_requests(server: KubeApiServer) -> set[tuple[str, str]]:
    """(verb, namespace) of every Pod list and watch the API server answered ("" namespace: cluster-wide)."""
    return {(r.verb, r.namespace) for r in server.requests if r.kind == "Pod" and r.verb in ("list", "watch")}


def subset_endpoints(state: Any, port: int) -> dict[str, list[str]] | None:
    """Per subset of reviews, its endpoint addresses; None while the state has no subset cluster."""
    config = state.envoy.get("istio-system/canal")
    names = {v: f"outbound|{port}|{v}|reviews.shop.svc.cluster.local" for v in ("v1", "v2")}
    if config is None or names["v1"] not in config.clusters:
        return None
    return {
        v: [e.address for e in config.endpoints[n].endpoints] if n in config.endpoints else [] for v, n in names.items()
    }


class Submitted:
    """Every state the controller hands to the publisher from now on, in order."""

    def __init__(self, controller: Controller) -> None:
        self.states: list[Any] = []
        submit = controller.serving.submit

        def record(state: Any) -> None:
            self.states.append(state)
            submit(state)

        controller.serving.submit = record  # type: ignore[method-assign]


@pytest.mark.timeout(60)
def test_pods_are_watched_only_where_translation_reads_them(cluster: dict[str, Any]) -> None:
    """helloworld has no subsets: of its Pods only the gateway's (istio-system) are read, as redirect backends; the
    application Pods in default and Pods of an unrelated namespace are never listed or watched."""
    import urllib.request

    server, port = cluster["server"], cluster["port"]
    for ns, name in (("unrelated", "batch-job-1"), ("unrelated", "batch-job-2")):
        server.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": "batch"}},
                "status": {
                    "phase": "Running",
                    "podIP": "10.244.7.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    running = Running(server.client(), controller_options())
    controller = running.controller
    try:
        wait_for(controller.ready, what="the controller ready")
        (rule,) = [
            r for k, r in controller.serving.state.redirects.items() if k == RedirectKey(HELLO_CLUSTER_IP, "tcp", port)
        ]
        assert [b.address for b in rule.backends] == ["10.244.9.5"]  # the example's gateway pod
        assert pod_requests(server) <= {("list", "istio-system"), ("watch", "istio-system")}
        assert ("list", "istio-system") in pod_requests(server)
        assert set(controller.translator.snapshot.objects["Pod"]) == {"istio-system"}
        status = controller.status()["controller"]
        assert status["podNamespaces"] == {"istio-system": {"synced": True, "pods": 1}}
        metrics_port = int(controller.options.metrics_address.rsplit(":", 1)[1])

        def scrape() -> str | None:
            try:  # served once the first translation went out
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    return response.read().decode()
            except OSError:
                return None

        text = wait_for(scrape, what="/metrics")
        assert 'canal_controller_pod_informer_synced{namespace="istio-system"} 1.0' in text
        assert 'canal_controller_pod_informer_pods{namespace="istio-system"} 1.0' in text
        assert "canal_controller_pod_namespaces 1.0" in text
        # a gateway pod that stops being ready leaves the redirect backends: istio-system is really watched
        server.modify(
            "v1", "Pod", "canal-gateway-7d9f8b6c5-k2m4n", "istio-system",
            lambda o: o["status"].update(conditions=[{"type": "Ready", "status": "False"}]),
        )  # fmt: skip
        wait_for(lambda: not controller.serving.state.redirects, what="no ready gateway pod: no redirects")
    finally:
        running.stop()


@pytest.mark.timeout(90)
def test_a_subset_in_a_new_namespace_is_published_with_its_endpoints_and_dropped_with_its_pods(
    cluster: dict[str, Any],
) -> None:
    """A subset route for a Service in a namespace whose Pods were not watched: the informer starts, and the first
    published state with the subset clusters already has their endpoints, even though the namespace's Pod list is
    slow (its first two attempts fail). Removing the subsets stops the informer and the snapshot forgets the Pods;
    bringing them back starts it again, with endpoints in the first state again."""
    server, port = cluster["server"], cluster["port"]
    for obj in shop(port):
        server.create(obj)
    running = Running(server.client(), controller_options())
    controller = running.controller
    try:
        wait_for(controller.ready, what="the controller ready")
        assert not any(ns == "shop" for _, ns in pod_requests(server))
        submitted = Submitted(controller)
        server.inject_failure(500, times=2, kind="Pod", namespace="shop", verb="list")
        server.create(shop_rule())
        server.create(reviews_route(port, subsets=True))
        wait_for(lambda: subset_endpoints(controller.serving.state, port), what="the subset clusters published")
        first = next(found for s in submitted.states if (found := subset_endpoints(s, port)) is not None)
        assert first == {"v1": ["10.244.5.1"], "v2": ["10.244.5.2"]}  # each subset selects its own version's pod
        assert [r.code for r in server.requests_of("list", kind="Pod") if r.namespace == "shop"][:3] == [500, 500, 200]
        assert controller.status()["controller"]["podNamespaces"]["shop"] == {"synced": True, "pods": 2}
        assert controller.serving.registry.get_sample_value("canal_controller_pod_sync_timeouts_total") == 0

        # a relabelled pod moves to the other subset: the namespace's Pod changes still reach the endpoints
        server.modify("v1", "Pod", "reviews-v2-pod", "shop", lambda o: o["metadata"]["labels"].update(version="v1"))
        wait_for(
            lambda: subset_endpoints(controller.serving.state, port) == {"v1": ["10.244.5.1", "10.244.5.2"], "v2": []},
            what="the relabelled pod in subset v1",
        )

        # no subset any more: nothing reads shop's Pods; its informer stops and the snapshot forgets them
        server.modify("networking.istio.io/v1", "VirtualService", "reviews", "shop",
                      lambda o: o.update(spec=reviews_route(port, subsets=False)["spec"]))  # fmt: skip
        wait_for(lambda: controller.source.pod_namespaces == {"istio-system"}, what="the shop Pod informer stopped")
        wait_for(lambda: not controller.translator.snapshot.in_namespace("Pod", "shop"), what="shop's Pods forgotten")
        wait_for(lambda: server.open_watches("Pod") == 1, what="only istio-system's Pod watch open")
        assert "shop" not in controller.status()["controller"]["podNamespaces"]
        config = controller.serving.state.envoy["istio-system/canal"]
        plain = f"outbound|{port}||reviews.shop.svc.cluster.local"
        assert [e.address for e in config.endpoints[plain].endpoints] == ["10.244.5.1", "10.244.5.2"]  # slices alone

        # the subsets come back: watched again, and again the first state with them has their endpoints
        submitted.states.clear()
        server.modify("networking.istio.io/v1", "VirtualService", "reviews", "shop",
                      lambda o: o.update(spec=reviews_route(port, subsets=True)["spec"]))  # fmt: skip
        wait_for(lambda: subset_endpoints(controller.serving.state, port), what="the subset clusters back")
        first = next(found for s in submitted.states if (found := subset_endpoints(s, port)) is not None)
        assert first == {"v1": ["10.244.5.1", "10.244.5.2"], "v2": []}
    finally:
        running.stop()


@pytest.mark.timeout(60)
def test_pods_are_listed_with_the_first_lists_where_rules_may_need_them_then_narrowed(cluster: dict[str, Any]) -> None:
    """At start, before anything is translated, Pods are listed wherever an InternalGateway or a DestinationRule with
    subsets may need them, alongside the other lists; the first translation then says what it really reads. Here
    reviews' subsets are used by no route: shop's Pods are listed once, then no longer watched and forgotten."""
    server, port = cluster["server"], cluster["port"]
    for obj in (*shop(port), shop_rule(), reviews_route(port, subsets=False)):
        server.create(obj)
    running = Running(server.client(), controller_options())
    controller = running.controller
    try:
        wait_for(controller.ready, what="the controller ready")
        assert ("list", "shop") in pod_requests(server)
        wait_for(lambda: controller.source.pod_namespaces == {"istio-system"}, what="shop's Pod informer stopped")
        wait_for(lambda: not controller.translator.snapshot.in_namespace("Pod", "shop"), what="shop's Pods forgotten")
        plain = f"outbound|{port}||reviews.shop.svc.cluster.local"
        endpoints = controller.serving.state.envoy["istio-system/canal"].endpoints[plain].endpoints
        assert [e.address for e in endpoints] == ["10.244.5.1", "10.244.5.2"]
    finally:
        running.stop()


@pytest.mark.timeout(60)
def test_a_slow_pod_list_holds_publishing_only_for_the_timeout(cluster: dict[str, Any], caplog) -> None:
    """The wait for a new namespace's Pods is bounded: past pod_sync_timeout the state goes out without them (a
    warning says so, a counter counts it), and the endpoints follow once the list arrives."""
    server, port = cluster["server"], cluster["port"]
    for obj in shop(port):
        server.create(obj)
    running = Running(server.client(), controller_options(pod_sync_timeout=0.3))
    controller = running.controller
    try:
        wait_for(controller.ready, what="the controller ready")
        server.inject_failure(500, times=3, kind="Pod", namespace="shop", verb="list")  # ~1.75-3.5 s of backoff
        server.create(shop_rule())
        server.create(reviews_route(port, subsets=True))
        wait_for(lambda: subset_endpoints(controller.serving.state, port), timeout=3, what="published without Pods")
        assert subset_endpoints(controller.serving.state, port) == {"v1": [], "v2": []}
        assert controller.serving.registry.get_sample_value("canal_controller_pod_sync_timeouts_total") == 1
        assert any("Pods in namespace(s) shop not listed within" in r.getMessage() for r in caplog.records)
        wait_for(
            lambda: subset_endpoints(controller.serving.state, port) == {"v1": ["10.244.5.1"], "v2": ["10.244.5.2"]},
            what="the endpoints once the list arrived",
        )
    finally:
        running.stop()


@pytest.mark.timeout(30)
def test_a_namespace_needed_again_while_its_informer_stops_keeps_its_pods(cluster: dict[str, Any]) -> None:
    """Stop and restart at once: the old informer's deletions are queued before the new one's list, so the Pods
    end up present (a deletion queued after the list would make the snapshot lose them)."""
    from canal.controller import KubeSource

    server = cluster["server"]
    for obj in shop(cluster["port"]):
        server.create(obj)
    api = server.client()
    source = KubeSource(api, (), 0.0, lambda: None)
    forget = source._forget_pods

    def slow_forget(*args: Any) -> None:
        time.sleep(0.5)  # an informer slow to stop: its deletions are late
        forget(*args)

    source._forget_pods = slow_forget  # type: ignore[method-assign]
    source.start()
    try:
        (first,) = source.watch_pods(frozenset({"shop"}))
        wait_for(first.synced.is_set, what="shop's Pods listed")
        assert {i.ref.name for i in source.take()} >= set(SHOP_PODS)
        assert source.watch_pods(frozenset()) == [] and source.pod_namespaces == frozenset()
        (second,) = source.watch_pods(frozenset({"shop"}))
        wait_for(second.synced.is_set, what="shop's Pods listed again")
        retiring = [t for t in threading.enumerate() if t.name.endswith("-retire")]
        wait_for(lambda: not any(t.is_alive() for t in retiring), what="the old informer's Pods forgotten")
        refs = {(i if isinstance(i, ObjectRef) else i.ref): i for i in source.take()}
        pods = {ref.name: item for ref, item in refs.items() if ref.kind == "Pod"}
        assert set(pods) == set(SHOP_PODS)
        assert all(not isinstance(i, ObjectRef) for i in pods.values()), "a deletion came after the new list"
    finally:
        source.stop()
        api.close()
