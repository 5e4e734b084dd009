"""Faults under load: a real Envoy (from `canal bootstrap`) fed by `canal run`, continuous HTTP load through it
with the helloworld Host header, and one fault per test: the xDS server restarts (SIGTERM, SIGKILL), a burst of 100
VirtualService edits, a config Envoy rejects, the node agent restarts, the DNS server restarts.

Each test asserts the three things an operator needs: no request failed and no connection broke (nothing here
removes a route the load uses), the config converged afterwards (the control plane's /status, and the versions
Envoy's /config_dump holds), and the metrics and status say what happened. The load is a few hundred requests/s
of Python clients on two shared cores; each test measures its rate and asserts a floor, so a stalled load cannot
pass silently. Each prints one line with its numbers (run with -s to see them).

Clients that resolve through Canal's DNS server before every connection model a stub resolver (StubResolver).
One test pins down that a `canal run` that is still shutting down keeps answering DNS (its DNS server stops last).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.client
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import endpoint_slice, gateway, internal_gateway, pod, route, service, virtual_service
from tests.envoy_harness import CANAL, Backend, ControlPlane, Envoy, Process, Reply, free_port, request, wait_for
from tests.netns import NftMonitor, Topology, in_netns, need_netns, topology
from tests.traffic import DnsError, Outcome, Report, Traffic, http_request, tcp_connect

HOST = "helloworld.default.svc.cluster.local"  # the helloworld example's Host header
GROUP = "istio-system/canal"
NODE_AGENTS = "canal.io/node-agents"
# ~250 requests/s: 120 new connections/s plus 4 keep-alive connections at 33/s each. The floor is what two shared
# cores sustain with margin; below it the load (not Canal) stalled and the test would prove nothing.
LOAD: dict[str, Any] = {"new_per_second": 120, "keepalive": 4, "keepalive_interval": 0.03, "timeout": 3.0}
MIN_RATE = 100.0
PHASE = 3.0  # seconds of load before, during and after each fault


# ------------------------------------------------------------------------------------------------ observing


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def envoy_stats(envoy: Envoy) -> dict[str, int]:
    """Envoy's counters and gauges (admin /stats, text format)."""
    out = {}
    for line in envoy.admin("/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def envoy_config(envoy: Envoy) -> dict[str, Any]:
    """What Envoy holds, by xDS resource (admin /config_dump): the version of each listener, cluster, route
    configuration and endpoint set, plus anything warming or rejected."""
    dump = json.loads(envoy.admin("/config_dump?include_eds"))
    versions: dict[str, str] = {}
    warming: list[str] = []
    rejected: dict[str, str] = {}
    for config in dump["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump":
            versions["lds"] = config.get("version_info", "")
            for listener in config.get("dynamic_listeners", []):
                if "active_state" in listener:
                    versions[f"listener {listener['name']}"] = listener["active_state"]["version_info"]
                if "warming_state" in listener:
                    warming.append(f"listener {listener['name']}")
                if "error_state" in listener:  # (Envoy also lists a rejected listener once without its name)
                    error = listener["error_state"]
                    rejected[error["failed_configuration"]["name"]] = error.get("details", "")
        elif kind == "ClustersConfigDump":
            versions["cds"] = config.get("version_info", "")
            for cluster in config.get("dynamic_active_clusters", []):
                versions[f"cluster {cluster['cluster']['name']}"] = cluster["version_info"]
            warming += [f"cluster {c['cluster']['name']}" for c in config.get("dynamic_warming_clusters", [])]
        elif kind == "RoutesConfigDump":
            for rc in config.get("dynamic_route_configs", []):
                versions[f"route {rc['route_config']['name']}"] = rc["version_info"]
        elif kind == "EndpointsConfigDump":
            for ep in config.get("dynamic_endpoint_configs", []):
                versions[f"endpoints {ep['endpoint_config']['cluster_name']}"] = ep.get("version_info", "")
    return {"versions": versions, "warming": warming, "rejected": rejected, "dump": dump}


def proxies(plane: ControlPlane, group: str = GROUP) -> list[dict[str, Any]]:
    return plane.status()["xds"].get(group, {}).get("proxies", [])


def settled(plane: ControlPlane, group: str = GROUP) -> bool:
    """Every proxy of the group ACKed the current snapshot: nothing lagging, nothing rejected."""
    found = proxies(plane, group)
    return bool(found) and all(p["converged"] and not p["lagging"] and not p["errors"] for p in found)


# ------------------------------------------------------------------------------------------------ the load


@dataclass
class Timeline:
    """Named moments of one test (time.monotonic()), printed with the load's numbers."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        self.marks[name] = now = time.monotonic()
        return now

    def __getitem__(self, name: str) -> float:
        return self.marks[name]

    def describe(self) -> str:
        start = next(iter(self.marks.values()))
        return ", ".join(f"{name} +{at - start:.2f}s" for name, at in self.marks.items())


@contextlib.contextmanager
def loaded(traffic: Traffic, timeline: Timeline) -> Iterator[Traffic]:
    """Run ``traffic`` for the body; the first successful request marks "load" (so setup is not counted)."""
    traffic.start()
    try:
        wait_for(lambda: any(o.ok for o in traffic.snapshot().outcomes), timeout=10, what="the first request")
        timeline.mark("load")
        yield traffic
    finally:
        if traffic.running:
            traffic.stop()


def failure_lines(report: Report, start: float, limit: int = 8) -> str:
    """The first failures with their time relative to ``start``: what an assertion message needs."""
    rows = [f"+{o.at - start:.3f}s {o.kind} #{o.connection}: {o.error} {o.body[:80]!r}" for o in report.failures]
    broken = [f"connection #{c.serial} ({c.kind}): {c.error}" for c in report.broken]
    return "\n".join([*rows[:limit], *broken[:limit]])


def backends_seen(outcomes: Sequence[Outcome]) -> collections.Counter[str]:
    """Which backend answered (the test backends name themselves in their JSON body)."""
    return collections.Counter(json.loads(o.body)["backend"] for o in outcomes if o.ok)


def assert_clean(
    report: Report, timeline: Timeline, phases: Sequence[tuple[str, str, str]], title: str, min_rate: float = MIN_RATE
) -> str:
    """No failed request, no broken connection, a load of at least ``min_rate`` overall and requests answered in
    every phase (start mark, end mark) at half that rate: the fault happened under load. Returns the line the test
    prints for its report."""
    start = timeline["load"]
    end = max(o.at for o in report.outcomes)
    rate = len(report.outcomes) / (end - start)
    assert not report.failures and not report.broken, (
        f"{title}: {len(report.failures)} failed requests, {len(report.broken)} broken connections "
        f"({report.summary()}; {timeline.describe()}):\n{failure_lines(report, start)}"
    )
    assert rate >= min_rate, f"{title}: the load ran at {rate:.0f}/s, below {min_rate:.0f}/s: {report.summary()}"
    counts = []
    for name, begin, finish in phases:
        during = report.between(timeline[begin], timeline[finish])
        seconds = timeline[finish] - timeline[begin]
        assert len(during) >= min_rate / 2 * seconds, (
            f"{title}: only {len(during)} requests during {name} ({seconds:.2f}s; {timeline.describe()})"
        )
        counts.append(f"{name} {len(during)} in {seconds:.2f}s")
    kinds = collections.Counter(o.kind for o in report.outcomes)
    line = (
        f"{title}: {len(report.outcomes)} requests ({dict(kinds)}) in {end - start:.1f}s = {rate:.0f}/s, "
        f"0 failed, 0 broken of {len(report.connections)} connections; {'; '.join(counts)}; "
        f"backends {dict(backends_seen(report.outcomes))}; {timeline.describe()}"
    )
    return line


# ------------------------------------------------------------------------------------------------ the gateway


class Gateway:
    """`canal run` on manifests for the helloworld Service (two loopback backends) behind one Gateway HTTP port,
    and one Envoy from `canal bootstrap` connected to it."""

    def __init__(self, tmp: Path, *, dns: str = "none", plane_args: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.port = free_port()  # the Gateway's server port, which is also helloworld's Service port
        self.backend_port = free_port()
        self.dns = dns
        self.plane_args = list(plane_args)
        self.backends = [Backend(f"v{i}", f"127.0.0.{i + 1}", self.backend_port) for i in (1, 2)]
        self.processes: list[Process] = []  # everything started, stopped by close() (also after a failed start)

    def start(self, *, delta: bool = False, side: dict[str, Any] | None = None) -> Gateway:
        for backend in self.backends:
            backend.start()
        self.plane = self.start_plane()
        self.plane.write("base", self.base_objects())
        self.plane.write("routes", [self.virtual_service(side)])
        self.envoy = Envoy(self.tmp, self.plane.xds_port, delta=delta)
        self.processes.append(self.envoy)
        wait_for(lambda: self.get("/hello").status == 200, what="Envoy serving /hello")
        wait_for(lambda: settled(self.plane), what="the first convergence")
        return self

    def start_plane(self) -> ControlPlane:
        """`canal run` with this gateway's files and options; again on the same xDS port after the first."""
        previous = getattr(self, "plane", None)
        self.plane = ControlPlane(self.tmp, xds_port=previous and previous.xds_port, extra_args=self.plane_args)
        self.processes.append(self.plane)
        return self.plane

    def base_objects(self, extra_ports: Sequence[int] = ()) -> list[dict[str, Any]]:
        servers = [(self.port, "HTTP"), *((p, "HTTP") for p in extra_ports)]
        ig = internal_gateway(ips=["127.0.0.1"], redirect={"mode": "none"}, dns={"mode": self.dns, "ttl": 5})
        return [
            gateway(servers=servers),
            ig,
            service("helloworld", ports=[(self.port, "http")], ip="10.96.0.10"),
            endpoint_slice(
                "helloworld",
                endpoints=[(b.host, f"helloworld-{b.name}") for b in self.backends],
                ports=[("http", self.backend_port)],
            ),
            *(pod(f"helloworld-{b.name}", ip=b.host, app="helloworld", version=b.name) for b in self.backends),
        ]

    def virtual_service(self, side: dict[str, Any] | None = None) -> dict[str, Any]:
        """The load's route (exact /hello), and optionally a second route the load never uses (what edits touch)."""
        http = [{"match": [{"uri": {"exact": "/hello"}}], "route": [route("helloworld")]}]
        return virtual_service("helloworld", hosts=[HOST], http=[*http, *([side] if side else [])])

    def get(self, path: str) -> Reply:
        return request(self.port, path, HOST)

    def traffic(self) -> Traffic:
        return Traffic(tcp_connect("127.0.0.1", self.port), http_request(HOST, "/hello"), **LOAD)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        for backend in self.backends:
            backend.stop()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Starts a Gateway (one per test here); stops whatever it started, also when the start or the test failed."""
    built: list[Gateway] = []

    def build(*, dns: str = "none", plane_args: Sequence[str] = (), **start: Any) -> Gateway:
        built.append(Gateway(tmp_path, dns=dns, plane_args=plane_args))
        return built[-1].start(**start)

    yield build
    for gw in built:
        gw.close()


# ------------------------------------------------------------------------------------------------ xDS server restart


@pytest.mark.parametrize(
    ("sig", "protocol"),
    [(signal.SIGTERM, "sotw"), (signal.SIGKILL, "sotw"), (signal.SIGKILL, "delta")],
    ids=["SIGTERM-sotw", "SIGKILL-sotw", "SIGKILL-delta"],
)
def test_xds_server_restart_keeps_envoy_serving_and_it_resyncs(
    gateways: Callable[..., Gateway], sig: signal.Signals, protocol: str
) -> None:
    """Envoy serves from its last config while `canal run` is gone, reconnects (its retry back-off is 0.25-5 s)
    and, holding exactly the versions the new process would send (content hashes), is sent nothing again."""
    gw = gateways(delta=protocol == "delta")
    old = gw.plane
    before = envoy_config(gw.envoy)["versions"]
    initial = envoy_stats(gw.envoy)
    timeline = Timeline()
    with loaded(gw.traffic(), timeline) as traffic:
        time.sleep(PHASE)
        timeline.mark("stop")
        gw.plane.stop(sig)
        timeline.mark("stopped")
        wait_for(lambda: envoy_stats(gw.envoy)["control_plane.connected_state"] == 0, what="Envoy to see it go")
        time.sleep(PHASE)  # no control plane at all: Envoy routes with what it has
        timeline.mark("start")
        plane = gw.start_plane()
        timeline.mark("ready")
        wait_for(lambda: settled(plane), timeout=30, what="Envoy to reconnect and converge")
        timeline.mark("converged")
        time.sleep(PHASE)
        timeline.mark("end")
        report = traffic.stop()
    name = f"xds-restart[{signal.Signals(sig).name}-{protocol}]"
    line = assert_clean(
        report,
        timeline,
        [
            ("control plane away", "stopped", "start"),
            ("reconnect", "start", "converged"),
            ("after", "converged", "end"),
        ],
        name,
    )
    # SIGTERM is a clean stop (status 0); SIGKILL leaves the process no chance to clean anything up
    assert old.proc.returncode == (0 if sig == signal.SIGTERM else -signal.SIGKILL), old.log()
    after = envoy_config(gw.envoy)
    assert after["versions"] == before and not after["warming"] and not after["rejected"]
    stats = envoy_stats(gw.envoy)
    reconnects = stats["cluster.canal-xds.upstream_cx_total"] - initial["cluster.canal-xds.upstream_cx_total"]
    failed = stats["cluster_manager.cds.update_failure"] - initial["cluster_manager.cds.update_failure"]
    assert stats["control_plane.connected_state"] == 1
    assert reconnects >= 1 and failed >= 1  # Envoy counted the lost stream, its failed retries and the reconnect
    assert stats["listener_manager.lds.update_rejected"] == 0
    metrics = plane.metrics()
    assert metric(metrics, "canal_xds_streams_total", group=GROUP) == 1  # the new process saw Envoy reconnect
    assert metric(metrics, "canal_xds_connected_proxies", group=GROUP) == 1
    assert metric(metrics, "canal_xds_pushes_total", group=GROUP) == 0  # resumed: nothing had to be resent
    assert metric(metrics, "canal_xds_convergence_seconds_count", group=GROUP) == 1
    (proxy,) = proxies(plane)
    assert proxy["protocol"] == protocol and proxy["converged"] and proxy["errors"] == {}
    log = gw.tmp.joinpath(f"canal-{plane.xds_port}.log").read_text(errors="replace")
    assert log.count(" connected: node gw-") == 2, log[-3000:]  # one stream per process, both logged
    print(f"{line}; Envoy: {failed} failed xDS fetches, {reconnects} new xDS connection(s); new process: 0 pushes")


# ------------------------------------------------------------------------------------------------ burst of edits


def side_route(i: int) -> dict[str, Any]:
    """The route the edits rewrite: a new prefix and a new response header each time; the load never uses it."""
    return {
        "match": [{"uri": {"prefix": f"/side-{i}"}}],
        "headers": {"response": {"set": {"x-edit": str(i)}}},
        "route": [route("helloworld", weight=100)],
    }


def test_a_burst_of_100_virtualservice_edits_is_coalesced(gateways: Callable[..., Gateway]) -> None:
    """100 rewrites of the VirtualService file in about a second, with Canal's default coalescing (quiet period
    0.1 s, at most 1 s): far fewer publications and pushes than edits, the last edit wins, /hello never fails."""
    gw = gateways(plane_args=["--quiet-period", "0.1", "--max-delay", "1.0"], side=side_route(0))
    status = gw.plane.status()["xds"][GROUP]
    serial, metrics = status["serial"], gw.plane.metrics()
    rds = metric(metrics, "canal_xds_pushes_total", group=GROUP, type="rds")
    convergences = metric(metrics, "canal_xds_convergence_seconds_count", group=GROUP)
    rds_updates = envoy_stats(gw.envoy)[f"http.0.0.0.0_{gw.port}.rds.http.{gw.port}.update_success"]
    timeline = Timeline()
    with loaded(gw.traffic(), timeline) as traffic:
        time.sleep(PHASE)
        timeline.mark("burst")
        for i in range(1, 101):
            gw.plane.write("routes", [gw.virtual_service(side_route(i))])
            time.sleep(0.01)
        timeline.mark("written")
        wait_for(lambda: gw.get("/side-100").headers.get("x-edit") == "100", what="the last edit in Envoy")
        wait_for(lambda: settled(gw.plane), what="convergence after the burst")
        timeline.mark("converged")
        time.sleep(PHASE)
        timeline.mark("end")
        report = traffic.stop()
    line = assert_clean(report, timeline, [("burst", "burst", "written"), ("after", "converged", "end")], "burst")
    assert gw.get("/side-99").status == 404 and gw.get("/side-1").status == 404  # only the last edit is served
    status = gw.plane.status()["xds"][GROUP]
    metrics = gw.plane.metrics()
    published = status["serial"] - serial
    pushed = metric(metrics, "canal_xds_pushes_total", group=GROUP, type="rds") - rds
    converged = metric(metrics, "canal_xds_convergence_seconds_count", group=GROUP) - convergences
    applied = envoy_stats(gw.envoy)[f"http.0.0.0.0_{gw.port}.rds.http.{gw.port}.update_success"] - rds_updates
    print(f"{line}; 100 edits -> {published} publications, {pushed:.0f} RDS pushes, {converged:.0f} convergences")
    assert 1 <= published <= 10, f"{published} publications for 100 edits"
    assert 1 <= pushed <= 10 and 1 <= converged <= published and 1 <= applied <= 10
    assert metric(metrics, "canal_xds_pushes_total", group=GROUP, type="cds") == 1  # routes only: nothing else moved
    dump = json.dumps(envoy_config(gw.envoy)["dump"])
    assert '"/side-100"' in dump and '"/side-99"' not in dump


# ------------------------------------------------------------------------------------------------ NACK


def test_a_config_envoy_rejects_is_reported_and_the_load_keeps_the_last_good_one(
    gateways: Callable[..., Gateway],
) -> None:
    """A second Gateway port that something else on the host already listens on passes Canal's validation, but
    Envoy cannot bind it and NACKs the listeners (the trick of test_controller's NACK test). The load stays on the
    last good config, /status shows Envoy's message, the rejected version is not resent, and the next good
    change clears it."""
    gw = gateways()
    good = envoy_config(gw.envoy)["versions"]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        timeline = Timeline()
        with loaded(gw.traffic(), timeline) as traffic:
            time.sleep(PHASE)
            timeline.mark("bad config")
            gw.plane.write("base", gw.base_objects(extra_ports=[busy]))

            def nack() -> str:
                (proxy,) = proxies(gw.plane)
                return proxy["errors"].get("lds", "")

            message = wait_for(nack, what="the NACK in /status")
            timeline.mark("nacked")
            lds = metric(gw.plane.metrics(), "canal_xds_pushes_total", group=GROUP, type="lds")
            time.sleep(PHASE)  # serving on the last good config meanwhile; the rejected version is not resent
            timeline.mark("fix")
            metrics = gw.plane.metrics()
            held = envoy_config(gw.envoy)
            (proxy,) = proxies(gw.plane)
            gw.plane.write("base", gw.base_objects())
            wait_for(lambda: settled(gw.plane), what="the next good config to clear the NACK")
            timeline.mark("converged")
            time.sleep(PHASE)
            timeline.mark("end")
            report = traffic.stop()
    line = assert_clean(
        report, timeline, [("rejected", "nacked", "fix"), ("after the fix", "converged", "end")], "nack"
    )
    print(f"{line}; NACK message: {message[:160]!r}")
    assert "Address already in use" in message and str(busy) in message
    assert proxy["lagging"] == ["lds"] and not proxy["converged"]
    assert metric(metrics, "canal_xds_nacks_total", group=GROUP, type="lds") == 1
    assert metric(metrics, "canal_xds_pushes_total", group=GROUP, type="lds") == lds  # no resend loop
    assert held["versions"] == good  # Envoy kept every version it had
    (details,) = held["rejected"].values()  # and says what it rejected: the same message as /status
    assert f"0.0.0.0_{busy}" in held["rejected"] and details in message
    after = envoy_config(gw.envoy)
    assert after["versions"] == good and not after["warming"]  # the fix is the old content: the same versions
    final = gw.plane.metrics()
    assert metric(final, "canal_xds_nacks_total", group=GROUP, type="lds") == 1
    assert metric(final, "canal_xds_pushes_total", group=GROUP, type="lds") == lds + 1
    assert envoy_stats(gw.envoy)["listener_manager.lds.update_rejected"] == 1


# ------------------------------------------------------------------------------------------------ node agent restart


class NetnsPlane(ControlPlane):
    """`canal run` in the node's namespace (where the node agent finds it on 127.0.0.1)."""

    def __init__(self, workdir: Path, netns: str) -> None:
        self.netns = netns
        super().__init__(workdir, prefix=["ip", "netns", "exec", netns], xds_host="0.0.0.0")

    def get(self, path: str) -> tuple[int, bytes]:
        return in_netns(self.netns, lambda: ControlPlane.get(self, path))


class NetnsEnvoy(Envoy):
    """A gateway Envoy in a gateway pod's namespace."""

    def __init__(self, workdir: Path, netns: str, xds: tuple[str, int]) -> None:
        self.netns = netns
        super().__init__(workdir, xds[1], prefix=["ip", "netns", "exec", netns], xds_host=xds[0])

    def admin(self, path: str) -> str:
        return in_netns(self.netns, lambda: Envoy.admin(self, path))


class NodeAgent(Process):
    """`canal node-agent --xds-address` in the node's namespace: its nftables backend programs that namespace."""

    def __init__(self, workdir: Path, netns: str, xds_port: int) -> None:
        self.netns = netns
        self.http_port = free_port()
        args = ["ip", "netns", "exec", netns, str(CANAL), "-v", "node-agent"]
        args += ["--xds-address", f"127.0.0.1:{xds_port}", "--node-name", "node-1"]
        args += ["--metrics-address", f"127.0.0.1:{self.http_port}"]
        super().__init__(args, workdir / "node-agent.log")

    def get(self, path: str) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=3)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        return in_netns(self.netns, fetch)

    def ready(self) -> bool:
        return self.get("/ready")[0] == 200


def node_objects(topo: Topology, backends: Sequence[Backend]) -> list[dict[str, Any]]:
    """helloworld at the topology's migrated ClusterIP:port; the gateway pod is the gateway-1 namespace, where
    Envoy listens on the Service port; the helloworld pods are loopback backends inside that namespace."""
    gw = topo.gateways[0]
    port = topo.service_port
    ig = internal_gateway(ips=[gw.ipv4], redirect={"mode": "nftables"}, dns={"mode": "none"})
    return [
        gateway(servers=[(port, "HTTP")]),
        ig,
        pod("canal-gateway-1", "istio-system", gw.ipv4, app="canal-gateway"),
        service("helloworld", ports=[(port, "http")], ip=topo.cluster_ip),
        endpoint_slice(
            "helloworld",
            endpoints=[(b.host, f"helloworld-{b.name}") for b in backends],
            ports=[("http", backends[0].port)],
        ),
        *(pod(f"helloworld-{b.name}", ip=b.host, app="helloworld", version=b.name) for b in backends),
        virtual_service(
            "helloworld", hosts=[HOST], http=[{"match": [{"uri": {"exact": "/hello"}}], "route": [route("helloworld")]}]
        ),
    ]


@dataclass
class Node:
    topo: Topology
    plane: NetnsPlane
    agent: NodeAgent
    processes: list[Process]  # stopped at the end, newest first


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node in network namespaces (tests/netns.py) running `canal run`, a gateway Envoy with two backends in
    the gateway pod's namespace, and the node agent; all stopped and deleted afterwards."""
    need_netns()
    processes: list[Process] = []
    backends: list[Backend] = []
    with topology(gateways=1, ipv6=False) as topo:
        gw = topo.gateways[0]
        try:
            port = free_port()
            for i in (1, 2):
                backends.append(Backend(f"v{i}", f"127.0.0.{i + 1}", port))
                in_netns(gw.ns, backends[-1].start)  # its listening socket lives in the gateway pod's namespace
            plane = NetnsPlane(tmp_path, topo.node)
            processes.append(plane)
            plane.write("cluster", node_objects(topo, backends))
            processes.append(NetnsEnvoy(tmp_path, gw.ns, (gw.gateway4, plane.xds_port)))
            agent = NodeAgent(tmp_path, topo.node, plane.xds_port)
            processes.append(agent)
            wait_for(lambda: settled(plane) and settled(plane, NODE_AGENTS), timeout=30, what="gateway and agent")
            wait_for(agent.ready, what="the agent ready")
            yield Node(topo, plane, agent, processes)
        finally:
            for process in reversed(processes):
                process.stop()
            for backend in backends:
                backend.stop()


def test_node_agent_restart_keeps_the_redirects_in_the_kernel(node: Node) -> None:
    """Clients in a pod dial the migrated ClusterIP; the agent's DNAT sends them to the gateway Envoy. SIGKILL the
    agent: its rules stay in the kernel (it never removes them on exit), so nothing fails. The new agent reads the
    table back, ACKs the rules over xDS and changes nothing (checked with `nft monitor`, not by timing)."""
    topo, plane = node.topo, node.plane
    before = topo.list_table("ip", "canal", handles=True)
    assert before is not None and topo.cluster_ip in before
    connect = tcp_connect(topo.cluster_ip, topo.service_port)  # the ClusterIP itself: a client with a cached answer
    traffic = Traffic(connect, http_request(HOST, "/hello"), **LOAD, netns=topo.client.ns)
    timeline = Timeline()
    with NftMonitor(topo) as monitor, loaded(traffic, timeline):
        time.sleep(PHASE)

        def restart() -> NodeAgent:
            timeline.mark("kill")
            node.agent.stop(signal.SIGKILL)
            wait_for(lambda: not proxies(plane, NODE_AGENTS), what="the server to see the agent go")
            timeline.mark("gone")
            time.sleep(PHASE)  # no agent at all: the kernel keeps redirecting
            assert topo.list_table("ip", "canal", handles=True) == before
            timeline.mark("start")
            new = NodeAgent(plane.workdir, topo.node, plane.xds_port)
            node.processes.append(new)
            wait_for(new.ready, what="the new agent ready")
            wait_for(lambda: settled(plane, NODE_AGENTS), what="the new agent to ACK")
            timeline.mark("acked")
            return new

        new, events = monitor.between_marks(restart)
        time.sleep(PHASE)
        timeline.mark("end")
        report = traffic.stop()
    phases = [("no agent", "gone", "start"), ("restart", "start", "acked"), ("after", "acked", "end")]
    line = assert_clean(report, timeline, phases, "node-agent-restart")
    assert events == [], f"the restart changed the ruleset: {events}"
    assert topo.list_table("ip", "canal", handles=True) == before  # same rules, same handles
    status = json.loads(new.get("/status")[1])
    assert status["ready"] and status["xdsConnected"] and status["rulesOfThisBackend"] == 1
    assert status["lastApply"]["kind"] == "none", status  # it read the kernel back: nothing to change
    agent_metrics = new.get("/metrics")[1]
    assert metric(agent_metrics, "canal_node_agent_xds_responses_total", verdict="ack") >= 1
    assert metric(agent_metrics, "canal_node_agent_xds_responses_total", verdict="nack") == 0
    assert metric(agent_metrics, "canal_node_agent_applies_total", result="ok", kind="none") >= 1
    assert metric(agent_metrics, "canal_node_agent_applies_total", result="ok", kind="delta") == 0
    assert metric(agent_metrics, "canal_node_agent_applies_total", result="ok", kind="full") == 0
    metrics = plane.metrics()
    assert metric(metrics, "canal_xds_streams_total", group=NODE_AGENTS) == 2  # the reconnect, counted
    assert metric(metrics, "canal_xds_connected_proxies", group=NODE_AGENTS) == 1
    assert settled(plane) and set(backends_seen(report.outcomes)) == {"v1", "v2"}
    print(f"{line}; ruleset events during the restart: {len(events)}")


# ------------------------------------------------------------------------------------------------ DNS server restart


@dataclass
class StubResolver:
    """A name lookup modelled on glibc's stub resolver (res_send) with one nameserver: an A query over UDP, up to
    ``attempts`` tries (`options attempts:N`), each waiting ``timeout`` s (`options timeout:N`) for the reply with
    the query's ID; SERVFAIL and REFUSED move on to the next try, an answer or NXDOMAIN ends the lookup.

    ``connected``: glibc connect()s its UDP socket, so an ICMP port unreachable (nothing listens on the port)
    comes back as ECONNREFUSED and ends the try at once: measured here, glibc fails all three tries against a
    closed local port in 3 ms (EAI_AGAIN). Unconnected, the ICMP error is never seen and each try waits out its
    timeout: what a glibc client sees while its queries are black-holed rather than refused (a DNS pod gone from
    behind its ClusterIP before its endpoint is removed), and how musl's resolver (unconnected) behaves anyway."""

    server: tuple[str, int]
    attempts: int = 3
    timeout: float = 1.0
    connected: bool = True
    lookups: int = 0
    retried: int = 0  # lookups that needed more than one try
    refused: int = 0  # tries that ended with ECONNREFUSED
    timeouts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def resolve(self, name: str) -> str:
        problem = "no reply"
        for attempt in range(self.attempts):
            if attempt == 1:
                with self._lock:
                    self.retried += 1
            query = DNSRecord.question(name, "A")
            query.header.id = random.randrange(65536)
            try:
                reply = self._ask(query)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                problem = "ECONNREFUSED"
                continue
            except TimeoutError:
                with self._lock:
                    self.timeouts += 1
                problem = "timeout"
                continue
            rcode = reply.header.rcode
            if rcode in (RCODE.SERVFAIL, RCODE.REFUSED):
                problem = RCODE.get(rcode)
                continue
            with self._lock:
                self.lookups += 1
            addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
            if rcode != RCODE.NOERROR or not addresses:
                raise DnsError(f"EAI_NONAME: {RCODE.get(rcode)}, {len(addresses)} addresses")
            return addresses[0]
        raise DnsError(f"EAI_AGAIN: {problem} after {self.attempts} tries")

    def _ask(self, query: DNSRecord) -> DNSRecord:
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if self.connected:
                sock.connect(self.server)
                sock.send(query.pack())
            else:
                sock.sendto(query.pack(), self.server)
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    data = sock.recv(65535)
                except OSError as error:
                    if error.errno == errno.ECONNREFUSED:
                        raise ConnectionRefusedError(error.errno, "ECONNREFUSED") from None
                    raise
                reply = DNSRecord.parse(data)
                if reply.header.id == query.header.id:
                    return reply

    def connect(self, name: str, port: int, timeout: float = 2.0) -> Callable[[], socket.socket]:
        """Traffic's ``connect``: resolve before every new connection (a client honoring a short TTL)."""

        def open_connection() -> socket.socket:
            return tcp_connect(self.resolve(name), port, timeout)()

        return open_connection


def dns_gateway(gateways: Callable[..., Gateway]) -> tuple[Gateway, int]:
    """A Gateway whose `canal run` also serves the migrated names (helloworld -> the gateway, 127.0.0.1)."""
    dns_port = free_port()
    gw = gateways(plane_args=["--dns-address", f"127.0.0.1:{dns_port}", "--no-dns-forward"], dns="server")
    return gw, dns_port


def restart_plane(gw: Gateway, timeline: Timeline, stopped: str) -> ControlPlane:
    """SIGTERM the gateway's `canal run` (mark `stopped` once it exited), start a new one on the same ports, wait
    until Envoy converged on it, then a further PHASE of load; returns the new control plane."""
    timeline.mark("stop")
    gw.plane.stop(signal.SIGTERM)
    timeline.mark(stopped)
    plane = gw.start_plane()
    timeline.mark("ready")
    wait_for(lambda: settled(plane), timeout=30, what="Envoy back on the new process")
    timeline.mark("converged")
    time.sleep(PHASE)
    timeline.mark("end")
    return plane


def dns_answers(metrics: str) -> float:
    return metric(metrics, "canal_dns_queries_total", transport="udp", type="A", rcode="NOERROR")


def test_dns_server_restart_is_bridged_by_the_clients_retries(gateways: Callable[..., Gateway]) -> None:
    """Clients look the name up at Canal's DNS server (`canal run --dns-address`) before every new connection,
    then connect to the answer (the gateway). `canal run` restarts (SIGTERM, then a new process on the same
    ports): lookups in the gap time out and are retried, landing on the new process; no request fails.

    The resolver is glibc's with `options timeout:1 attempts:5` (5 is glibc's maximum), its queries black-holed
    while no server listens (unconnected: each try waits its timeout). Its tries are sent over 4 s; the DNS port is
    closed for 1.7-2.7 s here on two shared cores (1.2-1.5 s of it the old process still shutting down, with its
    DNS closed first; the rest the new one starting), more than the 2 s of `timeout:1 attempts:3`. For glibc's own
    socket (refused at once) see test_dns_server_answers_until_canal_run_exits."""
    gw, dns_port = dns_gateway(gateways)
    resolver = StubResolver(("127.0.0.1", dns_port), attempts=5, connected=False)
    wait_for(lambda: resolver.resolve(HOST) == "127.0.0.1", what="the name to resolve to the gateway")
    resolver = StubResolver(("127.0.0.1", dns_port), attempts=5, connected=False)
    traffic = Traffic(resolver.connect(HOST, gw.port), http_request(HOST, "/hello"), **LOAD)
    timeline = Timeline()
    with loaded(traffic, timeline):
        time.sleep(PHASE)
        old = gw.plane.metrics()
        plane = restart_plane(gw, timeline, "stopped")
        report = traffic.stop()
    line = assert_clean(
        report, timeline, [("no DNS server", "stop", "ready"), ("after", "ready", "end")], "dns-restart"
    )
    new = plane.metrics()
    answered = dns_answers(old), dns_answers(new)
    print(
        f"{line}; resolver: {resolver.lookups} lookups, {resolver.retried} retried, {resolver.timeouts} tries "
        f"timed out, {resolver.refused} refused; DNS answers: old process {answered[0]:.0f} (before the stop), "
        f"new process {answered[1]:.0f}"
    )
    assert resolver.lookups == len(report.connections)  # one lookup per connection, none failed
    assert resolver.retried >= 1 and resolver.timeouts >= 1  # the gap was real, and bridged by retries
    assert answered[0] > 0
    after_stop = sum(1 for c in report.connections if c.opened > timeline["stopped"])
    assert answered[1] >= after_stop > 0  # every lookup after the stop was answered by the new process
    assert metric(new, "canal_dns_rewritten_answers_total", type="A") == answered[1]
    assert metric(new, "canal_dns_internal_errors_total") == 0
    assert plane.status()["dns"]["names"] == 1


def test_dns_server_answers_until_canal_run_exits(gateways: Callable[..., Gateway]) -> None:
    """glibc's own resolver connect()s its UDP socket: while nothing listens on the DNS port every try is refused
    at once and the lookup fails (EAI_AGAIN) in milliseconds, so no retry bridges a stop-then-start restart of a
    single server for it (one nameserver; a second nameserver would). What Canal controls is how long that gap
    is: it should start when the old process exits, not when it is asked to stop. Failed lookups are counted and
    printed; they must all fall between the old process's exit and the new one being ready."""
    gw, dns_port = dns_gateway(gateways)
    resolver = StubResolver(("127.0.0.1", dns_port), connected=True)
    wait_for(lambda: resolver.resolve(HOST) == "127.0.0.1", what="the name to resolve to the gateway")
    traffic = Traffic(resolver.connect(HOST, gw.port), http_request(HOST, "/hello"), **LOAD)
    timeline = Timeline()
    with loaded(traffic, timeline):
        time.sleep(PHASE)
        restart_plane(gw, timeline, "exited")
        report = traffic.stop()
    failed = report.failures
    # The DNS server closes last, after xDS's grace for open streams; what remains is the interpreter's own
    # teardown after the loop ends (0.2 s idle, up to 0.4 s on this loaded 2-core machine): allow 0.6 s of it.
    early = [o for o in failed if o.at < timeline["exited"] - 0.6]
    start = timeline["load"]
    print(
        f"dns-restart[glibc]: {len(report.outcomes)} requests, {len(failed)} failed lookups "
        f"({len(early)} while the old process still ran); {timeline.describe()}; "
        f"resolver: {resolver.refused} refused tries, {resolver.retried} retried lookups"
    )
    assert not early, (
        f"{len(early)} lookups refused while the old `canal run` was still running "
        f"(first at +{early[0].at - start:.3f}s; {timeline.describe()})"
    )
    assert all(o.error is not None and o.error.startswith("dns: ") for o in failed)  # nothing failed at the gateway
    assert all(o.at < timeline["ready"] for o in failed)  # and no lookup failed once the new process was ready
    assert not report.broken
