"""Helpers for the DNS server tests: the server on a background event loop, a controllable upstream, dig.

The server runs in its own thread so tests can use blocking sockets and `dig` subprocesses against it, as users
do. Everything binds 127.0.0.1 on free ports and is stopped on exit.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from canal.dns.server import DnsServer
from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from canal.desired import DnsRecord

DIG = shutil.which("dig")


def record(fqdn: str, *addresses: str, ttl: int = 5, gateway: str = "istio-system/canal") -> DnsRecord:
    return DnsRecord(fqdn, tuple(sorted(addresses)), ttl, gateway, "server")


def records(*items: DnsRecord) -> dict[str, DnsRecord]:
    return {r.fqdn: r for r in items}


class LoopThread:
    """An asyncio loop in a daemon thread; `run()` executes a coroutine on it and waits for the result."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> None:
        self.loop = loop_factory()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self._thread = threading.Thread(target=self.loop.run_forever, name="dns-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ServerHarness:
    """A started DnsServer on a LoopThread. `upstreams` may mix (host, port) pairs and FakeUpstreams; the fakes
    are started first on the same loop, and stopped with the server."""

    def __init__(
        self,
        table: Any = (),
        *,
        port: int = 0,
        upstreams: Iterable[Any] = (),
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
        **options: Any,
    ) -> None:
        self.thread = LoopThread(loop_factory)
        self._table = table if hasattr(table, "entries") else dict(table)
        self._wanted_port = port
        self._upstreams = list(upstreams)
        self._options = options
        self.server: DnsServer | None = None
        self.port = 0

    def __enter__(self) -> ServerHarness:
        try:
            addresses = []
            for upstream in self._upstreams:
                if isinstance(upstream, FakeUpstream):
                    self.thread.run(upstream.start())
                    addresses.append(upstream.address)
                else:
                    addresses.append(upstream)
            self.server = self.thread.run(self._make(addresses))
            self.port = self.thread.run(self.server.start("127.0.0.1", self._wanted_port))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    async def _make(self, upstreams: list[tuple[str, int]]) -> DnsServer:
        return DnsServer(self._table, upstreams=upstreams, **self._options)

    def update(self, table: Any) -> bool:
        assert self.server is not None
        return self.thread.call(self.server.update, table)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self.thread.run(self.server.stop())
            for upstream in self._upstreams:
                if isinstance(upstream, FakeUpstream):
                    self.thread.run(upstream.stop())
        finally:
            self.thread.close()


# ------------------------------------------------------------------------------------------------ upstream


@dataclass
class FakeUpstream:
    """A tiny authoritative server for the forwarding tests: answers `answers` (name -> IPv4s), NXDOMAIN for
    anything else, or nothing at all when `silent`. Keeps every query it received (transport, bytes)."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    silent: bool = False
    rcode: int | None = None  # answer every query with this rcode instead (e.g. SERVFAIL)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    port: int = 0
    _udp: Any = None
    _tcp: Any = None

    def reply(self, data: bytes) -> bytes | None:
        if self.silent:
            return None
        try:
            return self._answer(DNSRecord.parse(data))
        except Exception:  # the fuzz tests forward mutated queries: FORMERR for what dnslib cannot handle
            return data[:2] + bytes([0x80 | (data[2] & 0x79), 0x01]) + bytes(8)

    def _answer(self, query: DNSRecord) -> bytes:
        reply = query.reply()
        reply.header.ra = 1
        name = str(query.q.qname).rstrip(".").lower()
        if self.rcode is not None:
            reply.header.rcode = self.rcode
        elif name in self.answers:
            for ip in self.answers[name]:
                if query.q.qtype == QTYPE.A:
                    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ip), ttl=30))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                upstream.received.append(("udp", data))
                out = upstream.reply(data)
                if out is not None:
                    self.transport.sendto(out, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    upstream.received.append(("tcp", data))
                    out = upstream.reply(data)
                    if out is not None:
                        writer.write(len(out).to_bytes(2, "big") + out)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        for _ in range(50):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(tcp, "127.0.0.1", port)
            except OSError:
                sock.close()
                continue
            break
        self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=sock)
        self.port = port
        return port

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


# ------------------------------------------------------------------------------------------------ dig


@dataclass
class Dig:
    """The parts of dig's output the tests look at."""

    status: str
    flags: set[str]
    question: list[str]
    answer: list[list[str]]  # fields of each record line: name, ttl, class, type, data...
    authority: list[list[str]]
    edns_udp: int | None
    text: str

    def addresses(self) -> list[str]:
        return sorted(r[4] for r in self.answer if r[3] in ("A", "AAAA"))


_SECTION = re.compile(r"^;; (QUESTION|ANSWER|AUTHORITY|ADDITIONAL) SECTION:$")


def parse_dig(text: str) -> Dig:
    status = ""
    flags: set[str] = set()
    edns: int | None = None
    sections: dict[str, list[str]] = {"QUESTION": [], "ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
    current: str | None = None
    for line in text.splitlines():
        if m := re.search(r"status: (\w+)", line):
            status = m.group(1)
        if m := re.match(r"^;; flags: ([^;]*);", line):
            flags = set(m.group(1).split())
        if m := re.search(r"; EDNS: version: \d+, flags:[^;]*; udp: (\d+)", line):
            edns = int(m.group(1))
        if m := _SECTION.match(line):
            current = m.group(1)
            continue
        if not line.strip():
            current = None
            continue
        if current is not None:
            sections[current].append(line)
    return Dig(
        status=status,
        flags=flags,
        question=[q.lstrip(";") for q in sections["QUESTION"]],
        answer=[r.split() for r in sections["ANSWER"]],
        authority=[r.split() for r in sections["AUTHORITY"]],
        edns_udp=edns,
        text=text,
    )


def dig(port: int, *args: str, timeout: float = 20.0) -> Dig:
    """Run the real dig against 127.0.0.1:port (one try, 2 s) and parse what it printed."""
    assert DIG is not None
    out = subprocess.run(
        [DIG, "@127.0.0.1", "-p", str(port), "+tries=1", "+time=2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return parse_dig(out.stdout)


# ------------------------------------------------------------------------------------------------ raw clients


def query_bytes(
    name: str,
    qtype: str = "A",
    *,
    ident: int = 4242,
    edns: int | None = None,
    do: bool = False,
    options: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A query as a stub resolver sends it (RD set), optionally with an OPT record."""
    from dnslib import EDNS0, EDNSOption

    q = DNSRecord(DNSHeader(id=ident, bitmap=0, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else "", opts=[EDNSOption(c, d) for c, d in options]))
    return bytes(q.pack())


def udp_exchange(port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def tcp_frames(port: int, frames: Iterable[bytes], expect: int, timeout: float = 2.0) -> list[bytes]:
    """Send length-prefixed messages on one connection (in one write: pipelined) and read `expect` replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
        return [read_frame(sock) for _ in range(expect)]


def read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    return exactly(int.from_bytes(exactly(2), "big"))
