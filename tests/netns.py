"""A small node in network namespaces, for tests that need a real kernel dataplane (nftables NAT, conntrack).

Topology (one ``Topology``; every name carries the pid and a sequence number, so parallel runs never collide):

    client ns ("a pod")  ──veth──┐
    old-backend ns       ──veth──┤  node ns: forwarding on; a foreign kube-proxy-like `table ip/ip6 kube-proxy-test`
    gateway-1 ns         ──veth──┤  DNATs each ClusterIP:port to the old backend (priority -100, prerouting and
    gateway-N ns         ──veth──┘  output); the agent under test installs its own table here (``nft_command``).

The client namespace's traffic crosses the node's prerouting hook; sockets opened in the node namespace itself cross
its output hook (the node has an interface holding the "node IP" and a default route, because routing happens
before NAT output). Every leaf namespace runs an identity server (a Python subprocess under `ip netns exec`) that
answers each line with who it is, the address the connection reached, and the peer it saw, so a test can tell where
a connection landed and keep talking on it later. Client sockets are opened inside a namespace by a short-lived
thread that setns()es into it (a socket stays in the namespace it was created in), so they are cheap and bounded by
socket timeouts. Dual stack: every link has an IPv4 and an IPv6 address, the foreign tables cover both families.

Tests of whole request paths (tests/test_migration.py) build it with HTTP servers instead (``servers="http"``: they
answer every request with the peer they saw in an ``x-peer`` header), their own ports, a gateway Service ClusterIP
that the foreign table DNATs to the gateway endpoints (as kube-proxy does for the gateway's Service), and can turn
on a NetworkPolicy-like filter that lets only the gateways reach the old backend (``restrict_backend``).

Everything is torn down at the end (servers killed, namespaces deleted), also on failure; namespaces left by a run
that was killed outright are deleted by the next run (their pid is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from canal.desired import Backend, RedirectKey, RedirectRule

T = TypeVar("T")

PREFIX = "canal-t"  # namespace names: canal-t<pid>-<seq>-<role>
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 20.0
IO_TIMEOUT = 5.0

CLUSTER_IP = "10.96.0.10"  # the migrated Service
CLUSTER_IP6 = "fd00:96::10"
OTHER_CLUSTER_IP = "10.96.0.20"  # a Service that is not migrated: kube-proxy keeps it
OTHER_CLUSTER_IP6 = "fd00:96::20"
SERVICE_PORT = 80
OTHER_PORT = 8443  # another port of the migrated Service, kept by kube-proxy
OLD_BACKEND_PORT = 8080  # the Service's pods' targetPort
GATEWAY_PORT = 15001  # the gateway Envoys' listener
FOREIGN_TABLE = "kube-proxy-test"
FOREIGN_PRIORITY = -100  # kube-proxy's
POLICY_TABLE = "netpol-test"  # restrict_backend(): who may still reach the old backend

_sequence = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


# ------------------------------------------------------------------------------------------------ prerequisites


@functools.cache
def netns_problem() -> str | None:
    """Why the network-namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and nftables rules)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"no {tool!r} binary (Debian package {package}; scripts/test installs it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    try:
        result = _run(["ip", "netns", "exec", probe, "nft", "list", "tables"], check=False)
        if result.returncode != 0:
            return f"nft does not work in a network namespace: {result.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def need_netns() -> None:
    """Skip (with the reason) when the machine cannot run these tests; CANAL_REQUIRE_NETNS=1 makes that a failure."""
    problem = netns_problem()
    if problem is None:
        return
    if os.environ.get("CANAL_REQUIRE_NETNS") == "1":
        pytest.fail(f"CANAL_REQUIRE_NETNS=1 but {problem}")
    pytest.skip(problem)


def has_ipv6() -> bool:
    return Path("/proc/sys/net/ipv6").is_dir()


# ------------------------------------------------------------------------------------------------ commands


def _run(
    args: Sequence[str], *, stdin: str | None = None, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """The named network namespaces (`ip netns list`)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours() -> list[str]:
    """The namespaces this process created and has not deleted yet."""
    mine = f"{PREFIX}{os.getpid()}-"
    return [name for name in namespaces() if name.startswith(mine)]


def sweep_stale() -> None:
    """Delete namespaces left by earlier runs whose process is gone (a run killed before its teardown)."""
    for name in namespaces():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)-.*", name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            _run(["ip", "netns", "del", name], check=False)
        except PermissionError:
            pass


def in_netns(ns: str, action: Callable[[], T], timeout: float = IO_TIMEOUT + 5) -> T:
    """Run ``action`` in a fresh thread that has joined network namespace ``ns`` (sockets it creates stay there)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({ns}): {os.strerror(error)}")
            finally:
                os.close(fd)
            box["value"] = action()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"action in namespace {ns} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------------ clients


@dataclass(frozen=True)
class Reply:
    """One answer of an identity server."""

    name: str  # the server: "old-backend", "gateway-1", ...
    address: str  # the local address the connection reached (after DNAT)
    port: int
    peer: str  # the source address the server saw
    peer_port: int
    echo: str


class Connection:
    """A TCP connection opened inside a namespace; ``ask`` sends a line and returns the server's answer."""

    def __init__(self, sock: socket.socket, description: str) -> None:
        self.sock = sock
        self.description = description
        self._buffer = b""
        self._count = itertools.count()

    def ask(self, text: str | None = None, timeout: float = IO_TIMEOUT) -> Reply:
        text = text if text is not None else f"ping-{next(self._count)}"
        self.sock.settimeout(timeout)
        self.sock.sendall(text.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{self.description}: closed by the server (buffered {self._buffer!r})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        name, address, port, peer, peer_port, echo = line.decode().split(" ", 5)
        if echo != text:
            raise AssertionError(f"{self.description}: asked {text!r}, the server echoed {echo!r}")
        return Reply(name, address, int(port), peer, int(peer_port), echo)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def connect(ns: str, host: str, port: int, timeout: float = IO_TIMEOUT, source: str | None = None) -> Connection:
    """A TCP connection from namespace ``ns`` to host:port (bounded by ``timeout``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def open_socket() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return Connection(in_netns(ns, open_socket, timeout + 5), f"{ns} -> {where}")


def ask(ns: str, host: str, port: int, timeout: float = IO_TIMEOUT, source: str | None = None) -> Reply:
    """Open a connection, ask once, close: where does a new connection from ``ns`` to host:port land?"""
    with connect(ns, host, port, timeout, source) as conn:
        return conn.ask(timeout=timeout)


# ------------------------------------------------------------------------------------------------ servers

SERVER = r"""
import os, socket, sys, threading
name, port, ipv6 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if ipv6:
    server = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=256)
else:
    server = socket.create_server(("0.0.0.0", port), backlog=256)
def plain(address):
    return address[7:] if address.startswith("::ffff:") else address
def serve(conn):
    with conn:
        local, peer = conn.getsockname(), conn.getpeername()
        head = f"{name} {plain(local[0])} {local[1]} {plain(peer[0])} {peer[1]} "
        for line in conn.makefile("rb"):
            conn.sendall(head.encode() + line.rstrip(b"\r\n") + b"\n")
def accept():
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # the test closes stdin (or dies): exit
os._exit(0)
"""


HTTP_SERVER = r"""
import os, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port, ipv6 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def plain(address):
    return address[7:] if address.startswith("::ffff:") else address
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        local, peer = self.connection.getsockname(), plain(self.client_address[0])
        body = f"{name} {plain(local[0])} {local[1]} {peer} {self.client_address[1]} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("x-peer", peer)
        self.send_header("x-server", name)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
    daemon_threads = True
    request_queue_size = 256
    def server_bind(self):
        if ipv6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
server = Server(("::" if ipv6 else "0.0.0.0", port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # the test closes stdin (or dies): exit
os._exit(0)
"""
SCRIPTS = {"identity": SERVER, "http": HTTP_SERVER}


@dataclass
class Server:
    """A server in a namespace. identity: answers every line with "<name> <local addr> <port> <peer> <port> <line>";
    http: answers every GET with 200, the peer it saw in ``x-peer``, its name in ``x-server`` and the same line as the
    identity server (plus the path) as the body."""

    name: str
    ns: str
    port: int
    ipv6: bool
    process: subprocess.Popen[bytes] | None = None
    kind: str = "identity"

    def start(self, timeout: float = IO_TIMEOUT * 2) -> None:
        script = SCRIPTS[self.kind]
        args = [sys.executable, "-I", "-S", "-c", script, self.name, str(self.port), "1" if self.ipv6 else "0"]
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise AssertionError(f"server {self.name} in {self.ns} did not start: {line!r}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# ------------------------------------------------------------------------------------------------ the topology


@dataclass(frozen=True)
class Endpoint:
    """A leaf namespace: its identity (what its server answers), addresses, and the node's address on its link."""

    name: str
    ns: str
    ipv4: str
    ipv6: str
    gateway4: str  # the node's side of the link (the namespace's default route)
    gateway6: str
    port: int = 0  # the port its server listens on (0: no server)

    def address(self, family: int = 4) -> str:
        return self.ipv4 if family == 4 else self.ipv6


@dataclass
class Topology:
    prefix: str
    node: str  # the node namespace (holds the NAT rules)
    node_ipv4: str
    node_ipv6: str
    client: Endpoint  # a pod on the node (its traffic crosses the node's prerouting hook)
    old_backend: Endpoint  # stands for the Service's pods, reached through the foreign DNAT
    gateways: list[Endpoint]  # the gateway endpoints, one namespace each
    ipv6: bool
    servers: list[Server] = field(default_factory=list)
    cluster_ip: str = CLUSTER_IP
    cluster_ip6: str = CLUSTER_IP6
    other_cluster_ip: str = OTHER_CLUSTER_IP
    other_cluster_ip6: str = OTHER_CLUSTER_IP6
    service_port: int = SERVICE_PORT
    other_port: int = OTHER_PORT
    foreign_table: str = FOREIGN_TABLE
    gateway_cluster_ip: str | None = None  # a gateway Service the foreign table DNATs to the gateways (IPv4)
    server_kind: str = "identity"  # what the old backend runs: "identity", "http" or "none"
    gateway_server_kind: str = "identity"  # what the gateways run (the same kinds)

    @property
    def namespaces(self) -> list[str]:
        return [self.node, self.client.ns, self.old_backend.ns, *(g.ns for g in self.gateways)]

    @property
    def nft_command(self) -> tuple[str, ...]:
        """The nft invocation prefix that acts on the node namespace (NftablesDataplane(command=...))."""
        return ("ip", "netns", "exec", self.node, "nft")

    def exec_prefix(self, ns: str | None = None) -> list[str]:
        return ["ip", "netns", "exec", ns or self.node]

    def nft(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run nft in the node namespace."""
        return _run([*self.nft_command, *args], stdin=stdin, check=check)

    def list_table(self, family: str, table: str, handles: bool = False) -> str | None:
        """`nft list table` text (with -a: handles too), None when the table does not exist."""
        result = self.nft(*(["-a"] if handles else []), "list", "table", family, table, check=False)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise AssertionError(f"nft list table {family} {table}: {result.stderr.strip()}")
        return result.stdout

    def tables(self) -> list[tuple[str, str]]:
        """(family, name) of every nft table in the node namespace."""
        out = self.nft("list", "tables").stdout
        return [tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("table ")]  # type: ignore[misc]

    def cluster(self, family: int = 4) -> str:
        return self.cluster_ip if family == 4 else self.cluster_ip6

    def connect(self, ns: str, host: str, port: int | None = None, **kwargs: Any) -> Connection:
        return connect(ns, host, self.service_port if port is None else port, **kwargs)

    def ask(self, ns: str, host: str, port: int | None = None, **kwargs: Any) -> Reply:
        return ask(ns, host, self.service_port if port is None else port, **kwargs)

    def rule(
        self,
        gateways: Sequence[Endpoint] | None = None,
        family: int = 4,
        cluster_ip: str | None = None,
        port: int | None = None,
        mode: str = "nftables",
    ) -> tuple[RedirectKey, RedirectRule]:
        """The redirect of the migrated Service (or ``cluster_ip``) to ``gateways`` (default: all)."""
        chosen = self.gateways if gateways is None else gateways
        key = RedirectKey(cluster_ip or self.cluster(family), "tcp", self.service_port if port is None else port)
        backends = tuple(Backend(g.address(family), g.port) for g in chosen)
        return key, RedirectRule(key, backends, "default/web", "canal-system/gateway", mode)

    def restrict_backend(self, allowed: Sequence[str] | None = None) -> None:
        """A NetworkPolicy-like filter on the node: TCP to the old backend's port is answered with a reset unless
        it comes from ``allowed`` (default: the gateways' addresses). Established connections are cut too."""
        chosen = [g.ipv4 for g in self.gateways] if allowed is None else list(allowed)
        lines = [
            f"add table ip {POLICY_TABLE}",
            f"delete table ip {POLICY_TABLE}",
            f"table ip {POLICY_TABLE} {{",
            "\tchain forward {",
            "\t\ttype filter hook forward priority 0; policy accept;",
            f"\t\tip daddr {self.old_backend.ipv4} tcp dport {self.old_backend.port} "
            f"ip saddr != {{ {', '.join(chosen)} }} reject with tcp reset",
            "\t}",
            "}",
        ]
        self.nft("-f", "-", stdin="\n".join(lines) + "\n")

    def unrestrict_backend(self) -> None:
        """Remove the filter of ``restrict_backend`` (no error when there is none)."""
        self.nft("-f", "-", stdin=f"add table ip {POLICY_TABLE}\ndelete table ip {POLICY_TABLE}\n")

    def foreign_rules(self) -> str:
        """The kube-proxy-like tables (nft -f text): the migrated Service (two ports) and another Service, each
        ClusterIP:port DNATed to the old backend; and the gateway Service, when there is one, DNATed to the
        gateways (round robin)."""
        families = [("ip", 4)] + ([("ip6", 6)] if self.ipv6 else [])
        out = []
        for family, version in families:
            services = (
                (self.cluster(version), self.service_port),
                (self.cluster(version), self.other_port),
                (self.other_cluster_ip if version == 4 else self.other_cluster_ip6, self.service_port),
            )
            backend = self.old_backend.address(version)
            target = f"[{backend}]:{self.old_backend.port}" if version == 6 else f"{backend}:{self.old_backend.port}"
            lines = [f"table {family} {self.foreign_table} {{"]
            for chain in ("prerouting", "output"):
                lines.append(f"\tchain {chain} {{")
                lines.append(f"\t\ttype nat hook {chain} priority {FOREIGN_PRIORITY}; policy accept;")
                for ip, port in services:
                    lines.append(f"\t\t{family} daddr {ip} tcp dport {port} dnat to {target}")
                if self.gateway_cluster_ip is not None and version == 4:
                    lines.append(
                        f"\t\tip daddr {self.gateway_cluster_ip} tcp dport {self.service_port} {self._to_gateways()}"
                    )
                lines.append("\t}")
            lines.append("}")
            out.append("\n".join(lines) + "\n")
        return "".join(out)

    def _to_gateways(self) -> str:
        if len(self.gateways) == 1:
            return f"dnat to {self.gateways[0].ipv4}:{self.gateways[0].port}"
        pairs = ", ".join(f"{i} : {g.ipv4} . {g.port}" for i, g in enumerate(self.gateways))
        return f"dnat ip to numgen inc mod {len(self.gateways)} map {{ {pairs} }}"


def _build(topo: Topology, links: list[tuple[Endpoint, str]]) -> None:
    node = topo.node
    for ns in topo.namespaces:
        _run(["ip", "netns", "add", ns])
    sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
    if topo.ipv6:
        sysctls += ["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.all.accept_dad=0"]
        sysctls += ["net.ipv6.conf.default.accept_dad=0"]
    _run(["ip", "netns", "exec", node, "sysctl", "-qw", *sysctls])
    commands = [
        ["link", "set", "lo", "up"],
        # A veth pair with both ends in the node (no `dummy` module on every kernel): holds the node IP and the
        # default route, so that connect() to a ClusterIP from the node finds a route before NAT output rewrites it.
        ["link", "add", "node0", "type", "veth", "peer", "name", "node0-peer"],
        ["link", "set", "node0-peer", "up"],
        ["link", "set", "node0", "up"],
        ["addr", "add", f"{topo.node_ipv4}/32", "dev", "node0"],
        ["route", "add", "default", "dev", "node0"],
    ]
    if topo.ipv6:
        commands += [
            ["addr", "add", f"{topo.node_ipv6}/128", "dev", "node0", "nodad"],
            ["-6", "route", "add", "default", "dev", "node0"],
        ]
    for endpoint, ifname in links:
        commands += [
            ["link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", endpoint.ns],
            ["link", "set", ifname, "up"],
            ["addr", "add", f"{endpoint.gateway4}/24", "dev", ifname],
        ]
        if topo.ipv6:
            commands.append(["addr", "add", f"{endpoint.gateway6}/64", "dev", ifname, "nodad"])
    for args in commands:
        _run(["ip", "-n", node, *args])
    for endpoint, _ in links:
        leaf = [
            ["link", "set", "lo", "up"],
            ["link", "set", "eth0", "up"],
            ["addr", "add", f"{endpoint.ipv4}/24", "dev", "eth0"],
            ["route", "add", "default", "via", endpoint.gateway4],
        ]
        if topo.ipv6:
            leaf += [
                ["addr", "add", f"{endpoint.ipv6}/64", "dev", "eth0", "nodad"],
                ["-6", "route", "add", "default", "via", endpoint.gateway6],
            ]
        for args in leaf:
            _run(["ip", "-n", endpoint.ns, *args])
    topo.nft("-f", "-", stdin=topo.foreign_rules())
    for endpoint, _ in links:
        kind = topo.gateway_server_kind if endpoint in topo.gateways else topo.server_kind
        if endpoint.port and kind != "none":
            server = Server(endpoint.name, endpoint.ns, endpoint.port, topo.ipv6, kind=kind)
            topo.servers.append(server)
            server.start()


def _teardown(topo: Topology) -> None:
    for server in topo.servers:
        with contextlib.suppress(Exception):
            server.stop()
    for ns in reversed(topo.namespaces):
        _run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def topology(
    gateways: int = 2,
    ipv6: bool | None = None,
    *,
    servers: str = "identity",
    gateway_servers: str | None = None,
    service_port: int = SERVICE_PORT,
    backend_port: int = OLD_BACKEND_PORT,
    gateway_port: int = GATEWAY_PORT,
    cluster_ip: str = CLUSTER_IP,
    gateway_cluster_ip: str | None = None,
) -> Iterator[Topology]:
    """Build the node (see the module docstring) with ``gateways`` gateway endpoints; remove it all afterwards.

    servers: what the old backend runs on its port ("identity", "http", or "none" when the test starts its own);
    gateway_servers: the same for the gateways (default: like the old backend; "none" where Envoy runs)."""
    if not 1 <= gateways <= 200:
        raise ValueError("1-200 gateway endpoints")
    gateway_servers = servers if gateway_servers is None else gateway_servers
    if not {servers, gateway_servers} <= {*SCRIPTS, "none"}:
        raise ValueError(f"servers: one of {sorted(SCRIPTS)} or 'none'")
    sweep_stale()
    ipv6 = has_ipv6() if ipv6 is None else ipv6
    prefix = f"{PREFIX}{os.getpid()}-{next(_sequence)}"

    def endpoint(name: str, role: str, subnet: int, port: int) -> Endpoint:
        return Endpoint(
            name=name,
            ns=f"{prefix}-{role}",
            ipv4=f"10.10.{subnet}.2",
            ipv6=f"fd10:{subnet}::2",
            gateway4=f"10.10.{subnet}.1",
            gateway6=f"fd10:{subnet}::1",
            port=port,
        )

    client = endpoint("client", "client", 1, 0)
    old = endpoint("old-backend", "old", 2, backend_port)
    gws = [endpoint(f"gateway-{i}", f"gw{i}", 2 + i, gateway_port) for i in range(1, gateways + 1)]
    topo = Topology(
        prefix, f"{prefix}-node", "10.10.0.1", "fd10::1", client, old, gws, ipv6,
        cluster_ip=cluster_ip, service_port=service_port, gateway_cluster_ip=gateway_cluster_ip,
        server_kind=servers, gateway_server_kind=gateway_servers,
    )  # fmt: skip
    links = [(client, "to-client"), (old, "to-old"), *((g, f"to-gw{i}") for i, g in enumerate(gws, 1))]
    try:
        _build(topo, links)
        yield topo
    finally:
        _teardown(topo)


@pytest.fixture
def netns_topology() -> Iterator[Topology]:
    """A node with two gateway endpoints (skips when the machine cannot run network-namespace tests)."""
    need_netns()
    with topology(gateways=2) as topo:
        yield topo


# ------------------------------------------------------------------------------------------------ nft monitor


class NftMonitor:
    """`nft monitor` in the node namespace, between two marker tables: every ruleset change in between is seen
    (including "# new generation" lines), so "nothing changed" is a checked fact rather than a timing guess."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._marker = itertools.count()

    def __enter__(self) -> NftMonitor:
        self.process = subprocess.Popen(
            [*self.topo.nft_command, "monitor"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _marked(self, name: str) -> tuple[int, int] | None:
        """(index of the marker's first line, index after its transaction's "# new generation" line), once seen."""
        added, deleted = f"add table ip {name}", f"delete table ip {name}"
        if deleted not in self._lines:
            return None
        first = self._lines.index(added)
        last = len(self._lines) - 1 - self._lines[::-1].index(deleted)
        for i in range(last + 1, len(self._lines)):
            if self._lines[i].startswith("# new generation"):
                return first, i + 1
        return None

    def mark(self, timeout: float = IO_TIMEOUT) -> tuple[int, int]:
        """Add and delete a marker table and wait until the monitor printed that transaction completely."""
        name = f"canal-test-marker-{next(self._marker)}"
        deadline = time.monotonic() + timeout
        while True:  # the monitor subscribes asynchronously: repeat the marker until it is seen
            self.topo.nft("-f", "-", stdin=f"add table ip {name}\ndelete table ip {name}\n")
            with self._cond:
                if self._cond.wait_for(lambda: self._marked(name) is not None, timeout=0.2):
                    return self._marked(name)  # type: ignore[return-value]
            if time.monotonic() > deadline:
                with self._cond:
                    raise AssertionError(f"nft monitor did not report marker {name}: {self._lines!r}")

    def between_marks(self, action: Callable[[], T]) -> tuple[T, list[str]]:
        """Run ``action``; return its result and the ruleset events (nft monitor lines) it caused."""
        _, start = self.mark()
        result = action()
        end, _ = self.mark()
        with self._cond:
            return result, [line for line in self._lines[start:end] if line.strip()]

    def __exit__(self, *_exc: object) -> None:
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if process is not None and process.stdout is not None:
            process.stdout.close()
