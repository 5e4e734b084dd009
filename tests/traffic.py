"""Continuous HTTP/1.1 load with an exact account of every request and every connection.

Migration and fault tests must prove "zero failed requests and zero reset connections", so the client cannot hide
anything the way general-purpose clients do (urllib3 and http.client retry stale connections, pools swallow resets
on close). Here every request becomes one ``Outcome`` and every connection one ``ConnectionRecord`` saying how it
ended: closed cleanly (FIN both ways, no RST), or the error. Requests come from threads: ``new_per_second`` on a
fresh connection each (resolved and connected by the caller's ``connect``, so DNS is part of every new
connection) and ``keepalive`` long-lived connections, optionally rotated after ``keepalive_lifetime`` seconds like
a connection pool with a maximum connection age. Everything is bounded: socket timeouts, ``max_requests`` and
``stop()``.

A connection the server closed while it was idle is detected before reuse (as real clients do) and replaced
without counting a failure; one the server reset while idle is recorded as a reset connection.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import itertools
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Outcome:
    at: float  # time.monotonic() when the request was sent ("new": when the attempt began, before connect)
    kind: str  # "new" (fresh connection per request) or "keepalive" (long-lived connection)
    connection: int  # connection serial number
    ok: bool  # complete HTTP/1.1 response with status 200
    status: int | None
    error: str | None  # "reset", "timeout", "refused", "closed", "dns: ...", ... (None when ok)
    via: str | None  # value of the response header named by `via_header`
    body: bytes
    elapsed: float = 0.0  # seconds from `at` to the complete response (or the error)
    detail: str = ""  # for a failed connect: where it dialed ("dialed 10.96.0.50:5000"), when known


@dataclass(frozen=True)
class ConnectionRecord:
    """One connection's life. ``error`` None and ``closed`` set: it ended cleanly (no reset, no timeout)."""

    serial: int
    kind: str
    opened: float  # time.monotonic() when connect() returned
    closed: float | None  # None while still open
    requests: int  # requests sent on it
    error: str | None  # how it broke ("reset", ...); None: fine so far / closed cleanly
    closed_by: str | None  # "client" (lifetime, stop, one request done), "server" (Connection: close, idle close)
    peer: str | None  # the address the client dialed (before any NAT)


@dataclass(frozen=True)
class Report:
    outcomes: tuple[Outcome, ...]
    connections: tuple[ConnectionRecord, ...] = ()
    connect_failures: int = 0  # connect() raised: no connection record, one failed Outcome each

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def broken(self) -> list[ConnectionRecord]:
        """Connections that were reset or otherwise did not end cleanly (including between requests)."""
        return [c for c in self.connections if c.error is not None]

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.at < end]

    def by_via(self) -> collections.Counter[str | None]:
        return collections.Counter(o.via for o in self.outcomes)

    def opened_before(self, moment: float, kind: str = "keepalive") -> list[ConnectionRecord]:
        return [c for c in self.connections if c.kind == kind and c.opened < moment]

    def summary(self) -> str:
        """One line for assertion messages and benchmark logs."""
        kinds = collections.Counter(o.kind for o in self.outcomes)
        errors = collections.Counter(o.error for o in self.failures)
        return (
            f"{len(self.outcomes)} requests ({dict(sorted(kinds.items()))}), {len(self.failures)} failed "
            f"{dict(errors)}, {len(self.connections)} connections, {len(self.broken)} broken, via {dict(self.by_via())}"
        )


# ------------------------------------------------------------------------------------------------ errors


class Closed(ConnectionError):
    """The server closed the connection before a complete response."""


class BadResponse(ValueError):
    """Bytes that are not an HTTP/1.1 response."""


class DnsError(Exception):
    """Name resolution failed after the retries."""


def classify(error: BaseException) -> str:
    """A short, stable name for what went wrong (what the tests count)."""
    if isinstance(error, DnsError):
        return f"dns: {error}"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        return "reset"  # EPIPE: the peer's RST arrived before our write
    if isinstance(error, Closed):
        return "closed"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, BadResponse):
        return f"bad response: {error}"
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if isinstance(error, OSError) and error.errno:
        return errno.errorcode.get(error.errno, str(error.errno)).lower()
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------ helpers


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (sockets it creates from now on live there)."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            number = ctypes.get_errno()
            raise OSError(number, f"setns({name}): {os.strerror(number)}")
    finally:
        os.close(fd)


def http_request(host_header: str, path: str = "/", headers: dict[str, str] | None = None) -> Callable[[], bytes]:
    """A GET request (keep-alive, HTTP/1.1) as bytes, built once."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", "User-Agent: canal-traffic"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return lambda: data


def tcp_connect(host: str, port: int, timeout: float = 2.0) -> Callable[[], socket.socket]:
    """Connect to a fixed address (a client with a pinned IP or a cached answer)."""

    def connect() -> socket.socket:
        return _open(host, port, timeout)

    return connect


def resolve(name: str, server: tuple[str, int], *, timeout: float = 0.5, tries: int = 3) -> list[str]:
    """The A records of ``name`` from ``server`` over UDP, retried like a stub resolver (timeouts, SERVFAIL)."""
    problem = "no answer"
    for _ in range(tries):
        query = DNSRecord.question(name, "A")
        with socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.sendto(query.pack(), server)
                deadline = time.monotonic() + timeout
                while True:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    data, _ = sock.recvfrom(65535)
                    reply = DNSRecord.parse(data)
                    if reply.header.id == query.header.id:
                        break
            except TimeoutError:
                problem = "timeout"
                continue
            except OSError as error:
                problem = classify(error)
                continue
        rcode = reply.header.rcode
        if rcode == RCODE.SERVFAIL:
            problem = "SERVFAIL"
            continue
        if rcode != RCODE.NOERROR:
            raise DnsError(RCODE.get(rcode))
        addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
        if not addresses:
            raise DnsError("no A record")
        return addresses
    raise DnsError(problem)


def dns_connect(
    name: str,
    port: int,
    server: tuple[str, int],
    *,
    timeout: float = 2.0,
    resolve_timeout: float = 0.5,
    tries: int = 3,
) -> Callable[[], socket.socket]:
    """Resolve ``name`` at ``server`` before every new connection (a client honoring a very short TTL), then
    connect to the first address."""

    def connect() -> socket.socket:
        address = resolve(name, server, timeout=resolve_timeout, tries=tries)[0]
        return _open(address, port, timeout)

    return connect


def _open(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException as error:
        sock.close()
        error.add_note(f"dialed {host}:{port}")
        raise
    return sock


# ------------------------------------------------------------------------------------------------ HTTP


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes
    close: bool  # the server will close the connection after this response


@dataclass
class _Conn:
    """A client connection and what is known about it (the mutable side of a ConnectionRecord)."""

    serial: int
    kind: str
    sock: socket.socket
    opened: float
    peer: str | None
    requests: int = 0
    closed: float | None = None
    error: str | None = None
    closed_by: str | None = None
    buffer: bytes = b""

    def record(self) -> ConnectionRecord:
        return ConnectionRecord(
            self.serial, self.kind, self.opened, self.closed, self.requests, self.error, self.closed_by, self.peer
        )

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("response timed out")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed("closed before a complete response")
        self.buffer += chunk

    def _take(self, count: int, deadline: float) -> bytes:
        while len(self.buffer) < count:
            self._fill(deadline)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise BadResponse("line too long")
            self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def exchange(self, request: bytes, timeout: float) -> _Response:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        self.sock.sendall(request)
        self.requests += 1
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise BadResponse("headers too long")
            self._fill(deadline)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(repr(status_line[:80]))
        headers: dict[str, str] = {}
        for line in header_lines:
            key, sep, value = line.partition(":")
            if not sep:
                raise BadResponse(f"header line {line[:80]!r}")
            headers[key.strip().lower()] = value.strip()
        close = headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked(deadline)
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]), deadline)
        elif parts[1] in ("204", "304") or parts[1].startswith("1"):
            body = b""
        else:  # delimited by the close
            body, close = self._until_close(deadline), True
        return _Response(int(parts[1]), headers, body, close)

    def _chunked(self, deadline: float) -> bytes:
        body = b""
        while True:
            size = int(self._line(deadline).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self._line(deadline):  # trailers, then the empty line
                    pass
                return body
            body += self._take(size, deadline)
            self._take(2, deadline)

    def _until_close(self, deadline: float) -> bytes:
        with contextlib.suppress(Closed):
            while True:
                self._fill(deadline)
        data, self.buffer = self.buffer, b""
        return data

    def dropped_while_idle(self) -> bool:
        """Before reusing the connection: has the server closed it meanwhile? (Raises if it reset it.)"""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        return self.sock.recv(1, socket.MSG_PEEK) == b""

    def close_gracefully(self, timeout: float) -> None:
        """Half-close, wait for the server's FIN, close: a reset at any point is recorded, never hidden."""
        deadline = time.monotonic() + timeout
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no FIN from the server")
                self.sock.settimeout(remaining)
                if not self.sock.recv(65536):
                    break
        except OSError as error:
            self.error = self.error or classify(error)
        finally:
            self.abandon()

    def abandon(self) -> None:
        self.closed = self.closed or time.monotonic()
        if self.error is not None:
            # the socket is broken anyway: close without lingering so no thread waits on it
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# ------------------------------------------------------------------------------------------------ the load


class Traffic:
    """Continuous HTTP/1.1 load from threads: `new_per_second` requests on fresh connections plus `keepalive`
    long-lived connections each sending a request every `keepalive_interval` s. Bounded by max_requests and stop()."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        request: Callable[[], bytes],
        *,
        new_per_second: float = 50,
        keepalive: int = 2,
        keepalive_interval: float = 0.05,
        timeout: float = 2.0,
        via_header: str = "x-peer",
        max_requests: int = 20000,
        netns: str | None = None,
        keepalive_lifetime: float | None = None,  # rotate each keep-alive connection after this many seconds
        new_workers: int | None = None,  # threads sharing the new-connection schedule (default: from the rate)
        name: str = "traffic",
    ) -> None:
        if new_per_second < 0 or keepalive < 0 or keepalive_interval <= 0 or timeout <= 0:
            raise ValueError("rates, counts and timeouts must be positive")
        self.connect = connect
        self.request = request
        self.new_per_second = new_per_second
        self.keepalive = keepalive
        self.keepalive_interval = keepalive_interval
        self.timeout = timeout
        self.via_header = via_header.lower()
        self.max_requests = max_requests
        self.netns = netns
        self.keepalive_lifetime = keepalive_lifetime
        self.name = name
        if new_workers is None:
            new_workers = max(4, min(64, math.ceil(new_per_second / 10))) if new_per_second else 0
        self.new_workers = new_workers
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self._outcomes: list[Outcome] = []
        self._conns: dict[int, _Conn] = {}
        self._connect_failures = 0
        self._sent = 0
        self._next_new = 0.0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    # -------------------------------------------------------------------------------------------- control

    def start(self) -> Traffic:
        if self._threads:
            raise RuntimeError("already started")
        self._next_new = time.monotonic()
        workers = [(self._new_worker, f"{self.name}-new-{i}") for i in range(self.new_workers)]
        workers += [(self._keepalive_worker, f"{self.name}-keepalive-{i}") for i in range(self.keepalive)]
        ready = threading.Barrier(len(workers) + 1) if workers else None
        for target, name in workers:
            thread = threading.Thread(target=self._run, args=(target, ready), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        if ready is not None:
            ready.wait(10)  # every thread is in its namespace before start() returns
        if self._errors:
            self.stop()
            raise self._errors[0]
        return self

    def stop(self) -> Report:
        """Stop sending, close keep-alive connections gracefully, join the threads, report."""
        self._stop.set()
        deadline = time.monotonic() + 3 * self.timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"traffic threads did not stop: {alive}")
        if self._errors:
            raise self._errors[0]
        return self.snapshot()

    def snapshot(self) -> Report:
        """Everything so far (connections still open have closed=None)."""
        with self._lock:
            return Report(
                tuple(self._outcomes), tuple(c.record() for c in self._conns.values()), self._connect_failures
            )

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def stopped(self) -> bool:
        """stop() was called or the budget is spent (threads may still be closing connections)."""
        return self._stop.is_set()

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------------- workers

    def _run(self, target: Callable[[], None], ready: threading.Barrier | None) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
        except BaseException as error:
            self._errors.append(error)
            self._stop.set()
        finally:
            if ready is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    ready.wait(10)
        if self._stop.is_set():
            return
        try:
            target()
        except BaseException as error:  # a bug in this module, not a request failure: surface it in stop()
            self._errors.append(error)
            self._stop.set()

    def _budget(self) -> bool:
        """Take one request from max_requests; False when it is used up (which ends the load)."""
        with self._lock:
            if self._sent >= self.max_requests:
                self._stop.set()  # the budget is spent: the load ends, keep-alive connections close
                return False
            self._sent += 1
            return True

    def _slot(self) -> float:
        """The next send time on the shared new-connection schedule (never in the past: no catch-up bursts)."""
        with self._lock:
            slot = max(self._next_new, time.monotonic())
            self._next_new = slot + 1.0 / self.new_per_second
            return slot

    def _add(self, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes.append(outcome)

    def _open(self, kind: str, at: float) -> _Conn | None:
        serial = next(self._serial)
        try:
            sock = self.connect()
        except Exception as error:
            with self._lock:
                self._connect_failures += 1
            detail = "; ".join(getattr(error, "__notes__", ()))
            elapsed = time.monotonic() - at
            self._add(Outcome(at, kind, serial, False, None, classify(error), None, b"", elapsed, detail))
            return None
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = None
        conn = _Conn(serial, kind, sock, time.monotonic(), peer)
        with self._lock:
            self._conns[serial] = conn
        return conn

    def _exchange(self, conn: _Conn, at: float) -> _Response | None:
        """One request on ``conn``: its Outcome is recorded; None when it failed (the connection is then broken)."""
        try:
            response = conn.exchange(self.request(), self.timeout)
        except Exception as error:
            conn.error = classify(error)
            self._add(Outcome(at, conn.kind, conn.serial, False, None, conn.error, None, b"", time.monotonic() - at))
            conn.abandon()
            return None
        ok = response.status == 200
        self._add(
            Outcome(
                at,
                conn.kind,
                conn.serial,
                ok,
                response.status,
                None if ok else f"status {response.status}",
                response.headers.get(self.via_header),
                response.body,
                time.monotonic() - at,
            )
        )
        return response

    def _new_worker(self) -> None:
        while not self._stop.is_set():
            slot = self._slot()
            if self._stop.wait(max(0.0, slot - time.monotonic())) or not self._budget():
                break
            at = time.monotonic()
            conn = self._open("new", at)
            if conn is None:
                continue
            response = self._exchange(conn, at)
            if response is not None:
                conn.closed_by = "server" if response.close else "client"
                conn.close_gracefully(self.timeout)

    def _keepalive_worker(self) -> None:
        conn: _Conn | None = None
        try:
            while not self._stop.is_set():
                if conn is not None and self._retire(conn):
                    conn = None
                if not self._budget():
                    break
                at = time.monotonic()
                if conn is None:
                    conn = self._open("keepalive", at)
                    if conn is None:
                        self._stop.wait(self.keepalive_interval)
                        continue
                response = self._exchange(conn, at)
                if response is None:
                    conn = None
                elif response.close:
                    conn.closed_by = "server"
                    conn.close_gracefully(self.timeout)
                    conn = None
                self._stop.wait(max(0.0, at + self.keepalive_interval - time.monotonic()))
        finally:
            if conn is not None and conn.closed is None:
                conn.closed_by = "client"
                conn.close_gracefully(self.timeout)

    def _retire(self, conn: _Conn) -> bool:
        """Before reusing ``conn``: True if it is gone (closed by the server while idle, reset, or too old)."""
        try:
            if conn.dropped_while_idle():
                conn.closed_by = "server"
                conn.close_gracefully(self.timeout)
                return True
        except OSError as error:
            conn.error = classify(error)
            conn.abandon()
            return True
        if self.keepalive_lifetime is not None and time.monotonic() - conn.opened >= self.keepalive_lifetime:
            conn.closed_by = "client"
            conn.close_gracefully(self.timeout)
            return True
        return False
