"""A node running the whole migration story for real, in network namespaces (tests/netns.py), shared by
tests/test_migration.py and bench/migration.py.

    client ns ── requests to helloworld.default.svc.cluster.local:5000, resolved at Canal's DNS before every new
      │          connection (and, from a second client, to the ClusterIP itself: a cached answer / pinned IP)
    node ns ──── `canal run` (xDS + Canal's DNS server, forwarding other names to a CoreDNS stand-in that answers
      │          the Service's ClusterIP), `canal node-agent` (nftables), the kube-proxy-like DNAT of the ClusterIP to
      │          the pod and of the gateway Service's ClusterIP to the gateway pod
    old ns ───── the helloworld pod: an HTTP server answering every request with the peer it saw (x-peer)
    gw1 ns ───── the gateway Envoy (bootstrap from `canal bootstrap`, config over xDS from `canal run`)

The manifests are the README's: examples/helloworld with the pod IPs replaced by the namespaces' addresses (one
helloworld pod instead of two). What exists before the user acts ("the cluster": the app, and the gateway Service
and pod that `helm install` created) is one file; what the user applies to migrate (Gateway, InternalGateway,
VirtualService) is another, which each step of the migration and of the rollback rewrites or deletes. The
InternalGateway's address is the example's serviceRef: the gateway Service's ClusterIP, which kube-proxy (the
foreign table) takes to the gateway pod, as in a cluster; its dns.mode is `server`, since Canal's own DNS server
answers here.

Every process runs under `ip netns exec` in its own session and is killed at the end; the namespaces go with the
topology (and are swept by the next run if this one is killed).
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from canal.nodeagent.nftables import NftablesDataplane

from canal.desired import Backend, RedirectKey
from tests.envoy_harness import ENVOY, Process
from tests.netns import Topology, in_netns, topology
from tests.traffic import DnsError, Report, Traffic, dns_connect, http_request, resolve, tcp_connect

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "helloworld"
CANAL = Path(sys.executable).with_name("canal")

NAME = "helloworld.default.svc.cluster.local"
PORT = 5000  # the Service's port, its pods' targetPort and the gateway's listener (as in the example)
CLUSTER_IP = "10.96.120.15"  # the example's helloworld ClusterIP
GATEWAY_IP = "10.96.0.50"  # the example's canal-gateway Service ClusterIP
GROUP = "istio-system/canal"
AGENTS = "canal.io/node-agents"
XDS_PORT = 18000
METRICS_PORT = 15014
DNS_PORT = 53
UPSTREAM_PORT = 5353
ENVOY_ADMIN = 15000
AGENT_METRICS = 15100
PATH = "/hello"  # the VirtualService routes exact /hello

UPSTREAM = r"""
import os, socket, sys, threading
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
port, records = int(sys.argv[1]), dict(arg.split("=", 1) for arg in sys.argv[2:])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", port))
def serve():
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = DNSRecord.parse(data)
        except Exception:
            continue
        name = str(query.q.qname).rstrip(".").lower()
        reply = query.reply()
        reply.header.ra = 1
        if name not in records:
            reply.header.rcode = RCODE.NXDOMAIN
        elif query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(records[name]), ttl=5))
        sock.sendto(reply.pack(), peer)
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
os._exit(0)
"""


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(topo: Topology) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(cluster, migration): the example's objects with this topology's addresses (see the module docstring)."""
    backend, gateway = topo.old_backend.ipv4, topo.gateways[0].ipv4
    cluster: list[dict[str, Any]] = []
    migration: list[dict[str, Any]] = []
    for path in sorted(EXAMPLE.glob("*.yaml")):
        for doc in _load(path):
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind == "Pod" and name.startswith("helloworld-v2"):
                continue  # one pod: the old backend namespace
            if kind == "Pod":
                ip = gateway if doc["metadata"]["labels"].get("app") == "canal-gateway" else backend
                doc["status"]["podIP"], doc["status"]["podIPs"] = ip, [{"ip": ip}]
            if kind == "EndpointSlice":
                doc["endpoints"] = [dict(doc["endpoints"][0], addresses=[backend])]
            if kind == "InternalGateway":
                doc["spec"]["dns"]["mode"] = "server"
            (migration if kind in ("Gateway", "InternalGateway", "VirtualService") else cluster).append(doc)
    return cluster, migration


def gateway_only(migration: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The migration objects without the VirtualService: the gateway is configured, no Service is routed yet."""
    return [doc for doc in migration if doc["kind"] != "VirtualService"]


def unsteered(migration: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The migration objects with the InternalGateway's DNS rewriting and ClusterIP redirects off: the gateway keeps
    its routes, clients stop being sent to it (the first step of a rollback)."""
    out = copy.deepcopy(migration)
    for doc in out:
        if doc["kind"] == "InternalGateway":
            doc["spec"]["dns"]["mode"] = "none"
            doc["spec"]["redirect"]["mode"] = "none"
    return out


def http_get(port: int, path: str, host: str = "127.0.0.1", timeout: float = 3.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, http.client.HTTPException, ValueError, DnsError) as error:
            last = error
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")
        time.sleep(interval)


class Script:
    """A Python script in a namespace that prints "ready" and exits when its stdin closes (or it is killed)."""

    def __init__(self, ns: str, script: str, *args: str, isolated: bool = True) -> None:
        flags = ["-I", "-S"] if isolated else []
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *flags, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 15)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise AssertionError(f"script in {ns} did not start: {line!r}")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@dataclass
class MigrationNode:
    """The running node (see the module docstring): its processes, manifests and probes."""

    topo: Topology
    workdir: Path
    cluster: list[dict[str, Any]]
    migration: list[dict[str, Any]]
    processes: dict[str, Process] = field(default_factory=dict)
    scripts: list[Script] = field(default_factory=list)

    @property
    def manifest_dir(self) -> Path:
        return self.workdir / "manifests"

    @property
    def gateway(self) -> str:
        """The gateway pod's address: the peer the backend sees for requests served through the gateway."""
        return self.topo.gateways[0].ipv4

    @property
    def client(self) -> str:
        """The client pod's address: the peer the backend sees for requests that took the old path."""
        return self.topo.client.ipv4

    @property
    def dns_ttl(self) -> float:
        """The InternalGateway's dns.ttl: how long a client may keep using the gateway's address after a flip."""
        return next(float(d["spec"]["dns"]["ttl"]) for d in self.migration if d["kind"] == "InternalGateway")

    @property
    def dns_server(self) -> tuple[str, int]:
        return (self.topo.node_ipv4, DNS_PORT)

    # -------------------------------------------------------------------------------------------- manifests

    def write(self, name: str, objects: list[dict[str, Any]]) -> None:
        """Replace one manifest file atomically (rename), as kubectl apply replaces an object."""
        tmp = self.manifest_dir / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        tmp.rename(self.manifest_dir / f"{name}.yaml")

    def remove(self, name: str) -> None:
        (self.manifest_dir / f"{name}.yaml").unlink()

    def reset(self, timeout: float = 15.0) -> None:
        """Back to the state before any migration: old path in place, no migration objects, DNS and kernel direct."""
        self.topo.unrestrict_backend()
        (self.manifest_dir / "migration.yaml").unlink(missing_ok=True)
        wait_until(self.direct, timeout, "the node back on the old path")
        wait_until(lambda: self.settled(GROUP), timeout, "the gateway ACKs the empty configuration")

    # -------------------------------------------------------------------------------------------- probes

    def status(self) -> dict[str, Any]:
        """`canal run`'s /status (its probes listen on the node's loopback)."""
        code, body = in_netns(self.topo.node, lambda: http_get(METRICS_PORT, "/status"))
        if code != 200:
            raise ValueError(f"/status answered {code}")
        return json.loads(body)

    def converged(self, group: str) -> bool:
        """Every proxy of ``group`` (at least one) ACKed the latest snapshot of the group."""
        found = self.status()["xds"].get(group, {}).get("proxies", [])
        return bool(found) and all(p["converged"] for p in found)

    def settled(self, group: str) -> bool:
        """Nothing was ever published for ``group``, or every proxy of it ACKed the latest snapshot."""
        found = self.status()["xds"].get(group, {})
        return found.get("serial", 0) == 0 or all(p["converged"] for p in found.get("proxies", []))

    def answer(self) -> list[str]:
        """What Canal's DNS answers the client for the Service's name now."""
        return in_netns(self.topo.client.ns, lambda: resolve(NAME, self.dns_server, timeout=0.5))

    def redirects(self) -> dict[RedirectKey, tuple[Backend, ...]]:
        """What the node's kernel holds in Canal's table (read back with nft, not what the agent believes)."""
        return dict(NftablesDataplane(command=self.topo.nft_command).current() or {})

    def redirected(self) -> bool:
        return self.redirects().get(RedirectKey(CLUSTER_IP, "tcp", PORT)) == (Backend(self.gateway, PORT),)

    def envoy_serves(self) -> bool:
        """The gateway Envoy answers the route itself (a request from its own namespace, no NAT involved)."""
        request = http_request(f"{NAME}:{PORT}", PATH)()

        def ask() -> bool:
            with socket.create_connection((self.gateway, PORT), timeout=2) as sock:
                sock.sendall(request)
                return sock.recv(4096).startswith(b"HTTP/1.1 200")

        return in_netns(self.topo.gateways[0].ns, ask)

    def logs(self) -> str:
        """The tails of the processes' logs (for failure messages)."""
        return "\n".join(f"--- {name}\n{p.log()[-3000:]}" for name, p in self.processes.items())

    # -------------------------------------------------------------------------------------------- steps

    def migrated(self) -> bool:
        """DNS answers the gateway, the kernel redirects the ClusterIP, the gateway and the agent ACKed."""
        return self.answer() == [GATEWAY_IP] and self.redirected() and self.converged(GROUP) and self.converged(AGENTS)

    def direct(self) -> bool:
        """DNS answers the ClusterIP again (forwarded to the cluster DNS), no redirect, the agent ACKed that."""
        return self.answer() == [CLUSTER_IP] and not self.redirects() and self.converged(AGENTS)

    # -------------------------------------------------------------------------------------------- load

    def resolving_traffic(self, **options: Any) -> Traffic:
        """A client resolving the name before every new connection, as with a short TTL."""
        return Traffic(
            dns_connect(NAME, PORT, self.dns_server, timeout=2.0),
            http_request(f"{NAME}:{PORT}", PATH),
            netns=self.topo.client.ns,
            name="resolving",
            **options,
        )

    def pinned_traffic(self, **options: Any) -> Traffic:
        """A client dialing the ClusterIP itself (a cached answer, a pinned IP): only the node agent moves it."""
        return Traffic(
            tcp_connect(CLUSTER_IP, PORT, timeout=2.0),
            http_request(f"{NAME}:{PORT}", PATH),
            netns=self.topo.client.ns,
            name="pinned",
            **options,
        )


def _start(node: MigrationNode) -> None:
    topo, work = node.topo, node.workdir
    node.manifest_dir.mkdir()
    node.write("cluster", node.cluster)
    node.scripts.append(
        Script(topo.node, UPSTREAM, str(UPSTREAM_PORT), f"{NAME}={CLUSTER_IP}", isolated=False)  # CoreDNS stand-in
    )
    node.processes["canal-run"] = Process(
        [
            *topo.exec_prefix(topo.node), str(CANAL), "run", "-f", str(node.manifest_dir),
            "--xds-address", f"0.0.0.0:{XDS_PORT}", "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
            "--dns-address", f"{topo.node_ipv4}:{DNS_PORT}", "--dns-upstream", f"127.0.0.1:{UPSTREAM_PORT}",
            "--poll", "0.1", "--quiet-period", "0.05", "--max-delay", "0.5",
        ],
        work / "canal-run.log",
    )  # fmt: skip
    wait_until(
        lambda: (
            in_netns(topo.node, lambda: http_get(METRICS_PORT, "/ready"))[0] == 200
            or not node.processes["canal-run"].alive()
        ),
        20,
        "canal run ready",
    )
    assert node.processes["canal-run"].alive(), node.logs()
    gateway = topo.gateways[0]
    bootstrap = subprocess.run(
        [
            str(CANAL), "bootstrap", "--xds-address", f"{gateway.gateway4}:{XDS_PORT}", "--node-id", "gateway-1",
            "--group", GROUP, "--admin-port", str(ENVOY_ADMIN),
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    (work / "envoy.yaml").write_text(bootstrap)
    node.processes["envoy"] = Process(
        [
            *topo.exec_prefix(gateway.ns), str(ENVOY), "-c", str(work / "envoy.yaml"), "--concurrency", "1",
            "--log-level", "warn", "--base-id", str(os.getpid() % 60000 + 1000), "--disable-hot-restart",
            "--drain-time-s", "2",
        ],
        work / "envoy.log",
    )  # fmt: skip
    node.processes["node-agent"] = Process(
        [
            *topo.exec_prefix(topo.node), str(CANAL), "node-agent", "--xds-address", f"127.0.0.1:{XDS_PORT}",
            "--node-name", "node-1", "--metrics-address", f"127.0.0.1:{AGENT_METRICS}", "--resync", "0",
        ],
        work / "node-agent.log",
    )  # fmt: skip

    def connected() -> bool:
        xds = node.status()["xds"]
        return len(xds.get(GROUP, {}).get("proxies", [])) == 1 and len(xds.get(AGENTS, {}).get("proxies", [])) == 1

    try:
        wait_until(connected, 30, "the gateway Envoy and the node agent connect to canal run")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{node.logs()}") from None
    for name, process in node.processes.items():
        assert process.alive(), f"{name} exited\n{node.logs()}"


@contextlib.contextmanager
def migration_node(workdir: Path | None = None) -> Iterator[MigrationNode]:
    """Build and start the node; stop everything and remove the namespaces afterwards."""
    if not ENVOY.exists():
        raise FileNotFoundError(f"no Envoy binary at {ENVOY}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="canal-migration-")))
        topo = stack.enter_context(
            topology(
                gateways=1,
                ipv6=False,
                servers="http",
                gateway_servers="none",
                service_port=PORT,
                backend_port=PORT,
                gateway_port=PORT,
                cluster_ip=CLUSTER_IP,
                gateway_cluster_ip=GATEWAY_IP,
            )
        )
        cluster, migration = manifests(topo)
        node = MigrationNode(topo, workdir, cluster, migration)
        try:
            _start(node)
            yield node
        finally:
            for process in reversed(node.processes.values()):
                with contextlib.suppress(Exception):
                    process.stop()
            for script in node.scripts:
                with contextlib.suppress(Exception):
                    script.stop()


# ------------------------------------------------------------------------------------------------ the scenario


@dataclass(frozen=True)
class Timings:
    """Seconds. ``lifetime`` is the clients' keep-alive connection age limit (a pool's maximum connection age): it
    is how long connections opened before a flip stay on their path, so the old path can go only after it."""

    before: float = 1.5  # load on the old path before the user acts
    lifetime: float = 4.0
    removed: float = 1.5  # load with the old path gone
    end: float = 1.0  # load after the last step
    flip_timeout: float = 15.0


NEVER = math.inf


@dataclass
class Marks:
    """time.monotonic() of each step of the scenario (NEVER: the step was not taken)."""

    start: float = 0.0
    apply: float = NEVER  # the migration objects written (steering on)
    flipped: float = NEVER  # DNS answers the gateway, the kernel redirects, gateway and agent ACKed
    old_removed: float = NEVER  # only the gateway may reach the pod any more
    old_restored: float = NEVER  # rollback, first: the old path is back
    unsteer: float = NEVER  # rollback: DNS rewriting and redirects off (the routes stay), or everything deleted
    flipped_back: float = NEVER  # DNS answers the ClusterIP again, no redirect, agent ACKed
    routes_removed: float = NEVER  # rollback, last: the migration objects deleted
    stop: float = NEVER
    direct_after_removal: str = ""  # what a new direct connection to the pod got once the old path was removed

    def durations(self) -> dict[str, float]:
        out = {
            "apply -> flipped": self.flipped - self.apply,
            "unsteer -> flipped back": self.flipped_back - self.unsteer,
        }
        out["total"] = self.stop - self.start
        return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass
class Run:
    marks: Marks
    reports: dict[str, Report]  # traffic name -> what it saw


def _wait_closed(traffics: list[Traffic], before: float, timeout: float) -> None:
    """Until every keep-alive connection opened before ``before`` has ended (the clients rotate them)."""

    def closed() -> bool:
        return all(c.closed is not None for t in traffics for c in t.snapshot().opened_before(before, "keepalive"))

    wait_until(closed, timeout, f"keep-alive connections opened before {before:.2f} to close", interval=0.05)


def _direct_attempt(node: MigrationNode) -> str:
    """One new connection from the client straight to the pod: what un-migrated traffic gets now."""
    request = http_request(f"{NAME}:{PORT}", PATH)()

    def attempt() -> str:
        try:
            with socket.create_connection((node.topo.old_backend.ipv4, PORT), timeout=2) as sock:
                sock.sendall(request)
                return sock.recv(4096).split(b"\r\n", 1)[0].decode() or "closed"
        except OSError as error:
            return type(error).__name__

    return in_netns(node.topo.client.ns, attempt)


def run_scenario(
    node: MigrationNode,
    timings: Timings = Timings(),
    *,
    resolving: dict[str, Any] | None = None,
    pinned: dict[str, Any] | None = None,
    apply: str = "staged",
    rollback: str = "staged",
    log: Callable[[str], None] = lambda _: None,
) -> Run:
    """Migrate under load, remove the old path, then roll back (tests/test_migration.py says why each step is
    where it is). ``resolving``/``pinned``: Traffic options of the two clients.

    apply: "staged" (the objects with steering off, until the gateway serves the route; then steering on),
    "gateway-first" (Gateway and InternalGateway until the gateway ACKed, then the VirtualService) or "at-once"
    (all three in one write, like `kubectl apply -f examples/helloworld/`).
    rollback: "staged" (old path back; steering off; drain for the connection lifetime and the DNS TTL; delete the
    objects), "remove" (old path back; delete the objects at once) or "none" (stop after the migration)."""
    load = {"keepalive_lifetime": timings.lifetime, "keepalive_interval": 0.05, "timeout": 5.0, "max_requests": 10**6}
    traffics = [
        node.resolving_traffic(**{"new_per_second": 40, "keepalive": 2, **load, **(resolving or {})}),
        node.pinned_traffic(**{"new_per_second": 10, "keepalive": 1, **load, **(pinned or {})}),
    ]
    marks = Marks()
    drain = timings.lifetime + 10
    with contextlib.ExitStack() as stack:
        for traffic in traffics:
            stack.enter_context(traffic)
        marks.start = time.monotonic()
        time.sleep(timings.before)

        if apply != "at-once":
            log(f"migrate ({apply}): the gateway first")
            node.write("migration", unsteered(node.migration) if apply == "staged" else gateway_only(node.migration))
            wait_until(lambda: node.converged(GROUP), timings.flip_timeout, "the gateway ACKs its configuration")
            if apply == "staged":
                wait_until(node.envoy_serves, timings.flip_timeout, "the gateway serves the route")
        log(f"migrate ({apply}): Gateway, InternalGateway and VirtualService")
        marks.apply = time.monotonic()
        node.write("migration", node.migration)
        wait_until(node.migrated, timings.flip_timeout, "DNS, redirect and ACKs of the migration")
        marks.flipped = time.monotonic()
        log(f"flipped after {marks.flipped - marks.apply:.3f} s; waiting for the older keep-alive connections")
        _wait_closed(traffics, marks.flipped, drain)
        if rollback == "none":
            time.sleep(timings.end)
            marks.stop = time.monotonic()
            return Run(marks, {t.name: t.stop() for t in traffics})

        log("remove the old path")
        node.topo.restrict_backend()
        marks.old_removed = time.monotonic()
        marks.direct_after_removal = _direct_attempt(node)
        time.sleep(timings.removed)

        log("rollback: restore the old path")
        node.topo.unrestrict_backend()
        marks.old_restored = time.monotonic()
        marks.unsteer = time.monotonic()
        if rollback == "staged":
            log("rollback: DNS rewriting and redirects off, the routes stay")
            node.write("migration", unsteered(node.migration))
        else:
            log("rollback: delete Gateway, InternalGateway and VirtualService")
            node.remove("migration")
        wait_until(node.direct, timings.flip_timeout, "DNS and redirect back to the ClusterIP")
        marks.flipped_back = time.monotonic()
        if rollback == "staged":
            log(f"flipped back after {marks.flipped_back - marks.unsteer:.3f} s; draining the gateway")
            _wait_closed(traffics, marks.flipped_back, drain)
            time.sleep(max(0.0, marks.flipped_back + node.dns_ttl - time.monotonic()))  # cached answers expire
            marks.routes_removed = time.monotonic()
            node.remove("migration")
        wait_until(lambda: node.converged(GROUP), timings.flip_timeout, "the gateway ACKs the removal")
        time.sleep(timings.end)
        marks.stop = time.monotonic()
        return Run(marks, {t.name: t.stop() for t in traffics})


def _check(name: str, report: Any, marks: Marks, path: dict[str, str]) -> list[str]:
    problems = []
    for o in report.failures[:20]:
        where = f" ({o.detail})" if o.detail else ""
        problems.append(f"{name}: failed {o.kind} request at +{o.at - marks.start:.3f} s: {o.error}{where}")
    for c in report.broken[:20]:
        problems.append(f"{name}: connection {c.serial} ({c.kind}) broke: {c.error}")
    problems += [f"{name}: connection {c.serial} still open after stop()" for c in report.connections if not c.closed]
    opened = {c.serial: c.opened for c in report.connections}

    def since(o: Any) -> float:
        """When the path of ``o`` was chosen: its connection's opening (a new request's: when it was made)."""
        return o.at if o.kind == "new" else opened.get(o.connection, o.at)

    def expect(where: str, outcomes: list[Any], what: str) -> None:
        wrong = [o for o in outcomes if o.ok and path.get(o.via or "") != where]
        if wrong:
            o = wrong[0]
            problems.append(
                f"{name}: {len(wrong)} {what} not via {where}; first at +{o.at - marks.start:.3f} s "
                f"on connection {o.connection}, the backend saw {o.via}"
            )

    outcomes = report.outcomes
    expect(
        "direct", [o for o in outcomes if since(o) < marks.apply], "requests on connections from before the migration"
    )
    expect("gateway", [o for o in outcomes if marks.flipped <= since(o) < marks.unsteer], "requests after the flip")
    expect("direct", [o for o in outcomes if since(o) >= marks.flipped_back], "requests after the flip back")
    for c in report.connections:
        if c.opened < marks.flipped and (c.closed or marks.stop) > marks.old_removed:
            problems.append(f"{name}: connection {c.serial} from before the flip outlived the old path")
    if marks.old_removed < NEVER and not [o for o in outcomes if marks.old_removed <= o.at < marks.old_restored]:
        problems.append(f"{name}: no requests while the old path was removed")
    return problems


def violations(node: MigrationNode, run: Run) -> list[str]:
    """Everything the run did wrong, as readable lines (empty: zero failures and every request on its path)."""
    marks = run.marks
    path = {node.gateway: "gateway", node.client: "direct"}
    problems = [line for name, report in run.reports.items() for line in _check(name, report, marks, path)]
    survivors = [
        o
        for report in run.reports.values()
        for o in report.outcomes
        if o.kind == "keepalive" and o.at >= marks.flipped and path.get(o.via or "") == "direct"
    ]
    if not survivors:
        problems.append("no keep-alive connection from before the flip served requests after it (lifetime too short?)")
    if marks.old_removed < NEVER and marks.direct_after_removal != "ConnectionRefusedError":  # RST to the SYN
        problems.append(f"removing the old path did not cut direct traffic: {marks.direct_after_removal}")
    return problems


def phases(node: MigrationNode, run: Run) -> list[tuple[str, float, dict[str, int]]]:
    """(phase, seconds, requests by path) for each step of the run that happened: the counts a report prints."""
    m = run.marks
    bounds = [
        ("before", m.start, m.apply),
        ("migrating", m.apply, m.flipped),
        ("migrated", m.flipped, min(m.old_removed, m.stop)),
        ("old path removed", m.old_removed, m.old_restored),
        ("rolling back", m.old_restored, m.flipped_back),
        ("rolled back", m.flipped_back, m.stop),
    ]
    path = {node.gateway: "gateway", node.client: "direct"}
    out = []
    for name, start, end in bounds:
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        counts: dict[str, int] = {}
        for report in run.reports.values():
            for o in report.between(start, end):
                key = path.get(o.via or "", "other") if o.ok else f"failed ({o.error})"
                counts[key] = counts.get(key, 0) + 1
        out.append((name, end - start, dict(sorted(counts.items()))))
    return out
