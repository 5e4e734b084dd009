"""tests/traffic.py on loopback: the load generator counts what succeeded and names what failed, so a migration
test reporting "zero failures" is a measured fact. Servers here succeed, reset (SO_LINGER 0) or refuse on purpose.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from tests.traffic import Report, Traffic, dns_connect, http_request, resolve, tcp_connect


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; answers the peer it saw in x-peer; /close answers with Connection: close."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = f"{self.path} from {self.client_address[0]}\n".encode()
        status = 503 if self.path == "/unavailable" else 200
        self.send_response(status)
        self.send_header("x-peer", self.client_address[0])
        self.send_header("content-length", str(len(body)))
        if self.path == "/close":
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def resetting_port() -> Iterator[int]:
    """Accepts, reads the request, closes with SO_LINGER 0: the client sees a TCP RST instead of a response."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def run(traffic: Traffic, requests: int, limit: float = 10.0) -> Report:
    """Let ``traffic`` run until it made ``requests`` requests (or ``limit`` s passed), then stop it."""
    traffic.start()
    deadline = time.monotonic() + limit
    while len(traffic.snapshot().outcomes) < requests and time.monotonic() < deadline:
        time.sleep(0.02)
    return traffic.stop()


def test_counts_successes_on_new_and_keepalive_connections(http_port: int) -> None:
    traffic = Traffic(
        tcp_connect("127.0.0.1", http_port),
        http_request("web"),
        new_per_second=100,
        keepalive=2,
        keepalive_interval=0.01,
        keepalive_lifetime=0.3,  # rotated a few times: every rotation must be a clean close
        max_requests=400,
    )
    report = run(traffic, 400)
    assert len(report.outcomes) == 400 and not report.failures, report.summary()
    assert report.by_via() == {"127.0.0.1": 400}
    assert report.outcomes[0].body.endswith(b"from 127.0.0.1\n")
    new = [c for c in report.connections if c.kind == "new"]
    kept = [c for c in report.connections if c.kind == "keepalive"]
    assert new and all(c.requests == 1 for c in new)
    assert len(kept) > 2 and max(c.requests for c in kept) > 5  # reused, and rotated by the lifetime
    assert not report.broken and all(c.closed is not None for c in report.connections), report.summary()
    assert {c.closed_by for c in report.connections} == {"client"}


def test_server_side_connection_close_is_not_a_failure(http_port: int) -> None:
    """A response with Connection: close ends the keep-alive connection cleanly; the next request reconnects."""
    traffic = Traffic(
        tcp_connect("127.0.0.1", http_port), http_request("web", "/close"), new_per_second=0, keepalive=1,
        keepalive_interval=0.01, max_requests=20,
    )  # fmt: skip
    report = run(traffic, 20)
    assert len(report.outcomes) == 20 and not report.failures and not report.broken, report.summary()
    assert len(report.connections) == 20 and {c.closed_by for c in report.connections} == {"server"}


def test_a_non_200_status_is_a_failure(http_port: int) -> None:
    traffic = Traffic(
        tcp_connect("127.0.0.1", http_port), http_request("web", "/unavailable"), new_per_second=50, keepalive=1,
        max_requests=10,
    )  # fmt: skip
    report = run(traffic, 10)
    assert len(report.failures) == 10 and {(o.status, o.error) for o in report.failures} == {(503, "status 503")}
    assert not report.broken  # the connections themselves were fine


def test_detects_a_reset(resetting_port: int) -> None:
    traffic = Traffic(
        tcp_connect("127.0.0.1", resetting_port), http_request("web"), new_per_second=50, keepalive=1,
        keepalive_interval=0.02, max_requests=30,
    )  # fmt: skip
    report = run(traffic, 30)
    assert len(report.outcomes) == 30
    assert {o.error for o in report.failures} == {"reset"} and len(report.failures) == 30, report.summary()
    assert len(report.broken) == 30 and {c.error for c in report.broken} == {"reset"}


def test_detects_a_refused_connection() -> None:
    with socket.socket() as bound:  # bound, not listening: the kernel refuses connections
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        traffic = Traffic(tcp_connect("127.0.0.1", port), http_request("web"), new_per_second=50, max_requests=20)
        report = run(traffic, 20)
    assert len(report.outcomes) == 20 and {o.error for o in report.failures} == {"refused"}
    assert report.connect_failures == 20 and report.connections == ()


def test_resolves_before_every_new_connection_and_names_dns_failures(http_port: int) -> None:
    """A tiny authoritative server: web answers 127.0.0.1, anything else NXDOMAIN; the first query of each name is
    dropped, so the stub-resolver retry is exercised too."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.1)
    seen: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(4096)
            except TimeoutError:
                continue
            query = DNSRecord.parse(data)
            name = str(query.q.qname).rstrip(".")
            seen.append(name)
            if seen.count(name) == 1:
                continue  # lost
            reply = query.reply()
            if name == "web.test":
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=0))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            server.sendto(reply.pack(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = server.getsockname()
    try:
        assert resolve("web.test", address, timeout=0.2) == ["127.0.0.1"]
        good = Traffic(
            dns_connect("web.test", http_port, address, resolve_timeout=0.2), http_request("web.test"),
            new_per_second=50, keepalive=0, max_requests=10,
        )  # fmt: skip
        report = run(good, 10)
        assert len(report.outcomes) == 10 and not report.failures, report.summary()
        assert seen.count("web.test") == 12  # one lost + one per resolve() call: once per new connection
        bad = Traffic(
            dns_connect("nope.test", http_port, address, resolve_timeout=0.2), http_request("nope.test"),
            new_per_second=20, keepalive=0, max_requests=3,
        )  # fmt: skip
        report = run(bad, 3)
        assert {o.error for o in report.failures} == {"dns: NXDOMAIN"} and len(report.failures) == 3
    finally:
        stop.set()
        thread.join(5)
        server.close()
