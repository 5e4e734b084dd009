"""Canal's DNS server: authoritative for the rewritten Service names, a forwarder for everything else.

asyncio UDP + TCP on one port; dnslib builds the replies. It answers A/AAAA of the names in its record table
with the gateway addresses (AA set), NOERROR/NODATA with the zone's SOA for other types of those names, and
forwards every other name to the configured upstreams (or REFUSES it when forwarding is off). It never recurses
itself and never answers a name it does not own from anything but an upstream's reply.

The wire handling is pure functions (`parse_query`, `build_reply`, `local_reply`, `parse_resolv_conf`); the
`DnsServer` class is the shell: sockets, caches, forwarding, metrics.

Fast path: a reply is a function of the query bytes after the ID and of the table, so answers are cached as
pre-packed bytes without their ID. Two levels, both bounded (FIFO eviction) and both replaced, never edited, when
the table changes: by the raw query bytes after the ID (one dict lookup and a concatenation per hit), and by the
parsed shape (exact-case name, type, class, the RD/CD flags, EDNS presence, DO bit and the size limit). Queries
with EDNS options (dig's random cookie, client subnet) are never keyed by raw bytes, since those bytes never
repeat; they reach the shape cache after a parse. Cookies and other options are ignored (RFC 7873 section 5.2:
a server without cookie support answers without one).

UDP is served straight from the socket in a reader callback that drains a batch of datagrams per wake-up, on
either event loop, instead of one protocol callback per packet: about four times the throughput of protocol
callbacks on the plain asyncio loop (bench/dns.py). Forwarded UDP queries are callback-driven too (a timer per
attempt, no task). uvloop, when installed (`new_event_loop`), speeds up the rest: forwarding and TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from canal.dns.metrics import Cell, DnsMetrics, Latency
from canal.dns.records import EMPTY_TABLE, Entry, Labels, RecordTable, build_table
from dnslib import AAAA as RD_AAAA
from dnslib import EDNS0, QTYPE, RR, SOA, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib import A as RD_A

from canal.desired import DnsRecord

log = logging.getLogger(__name__)

TYPE_A = 1
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

UDP_MIN = 512  # RFC 1035 / RFC 6891 section 6.2.5: any smaller advertised size means 512
DEFAULT_MAX_UDP = 1232  # DNS flag day 2020: the largest UDP reply that avoids IP fragmentation
TCP_MAX = 65535
_QR = 0x8000
_OPCODE = 0x7800
_RD = 0x0100
_CD = 0x0010
_ECHOED = _RD | _CD  # the query flags a reply copies, hence part of the cache key
_TCP_PIPELINE = 16  # forwarded queries in flight per TCP connection
_UDP_BATCH = 64  # datagrams served per wake-up before the loop gets to run other work
_UDP_RECV = 65535
_ERROR_LOG_INTERVAL = 1.0


# ============================================================================================== wire: queries


@dataclass(frozen=True, slots=True)
class Edns:
    udp_size: int
    version: int
    do: bool
    options: bool  # any options (cookie, client subnet, padding): raw bytes then vary between queries


@dataclass(frozen=True, slots=True)
class Query:
    """A query we can answer or forward: one question, EDNS parsed, everything else ignored."""

    id: int
    flags: int
    labels: Labels  # exact case, as sent
    qtype: int
    qclass: int
    question: bytes  # the raw question section (name, type, class)
    edns: Edns | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A packet we do not answer normally: `reply` is the error to send, or None to drop it silently."""

    reason: str
    rcode: int | None
    reply: bytes | None
    qtype: int = 0


def _header_only(data: bytes, rcode: int) -> bytes:
    """An error reply with no sections, for packets whose question cannot be trusted (RFC 1035 4.1.1)."""
    ident, flags = struct.unpack_from("!HH", data)
    return struct.pack("!6H", ident, _QR | (flags & (_OPCODE | _ECHOED)) | rcode, 0, 0, 0, 0)


def _reject(data: bytes, reason: str, rcode: int | None) -> Rejected:
    return Rejected(reason, rcode, None if rcode is None else _header_only(data, rcode))


def _skip_name(data: bytes, pos: int) -> int:
    """The offset after a (possibly compressed) name; -1 if it runs off the packet or uses reserved bits."""
    n = len(data)
    for _ in range(128):  # a name has at most 127 labels; stops loops of labels that never end
        if pos >= n:
            return -1
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= n else -1
        if length > 63:
            return -1
        pos += 1 + length
    return -1


def parse_query(data: bytes) -> Query | Rejected:
    """Parse a query strictly: exactly one question, no answer or authority records, at most one OPT (with the
    root as owner and well-formed options). Anything else is FORMERR; other opcodes are NOTIMP; packets too short
    for a header and responses (QR set: answering them could make two servers bounce a packet forever) are
    dropped. Compression in the question is refused: it is the first name of the packet, so it has nothing to
    point back to."""
    if type(data) is not bytes:  # a bytearray or memoryview from a caller: labels must be hashable
        data = bytes(data)
    n = len(data)
    if n < 12:
        return Rejected("short", None, None)
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    if flags & _QR:
        return Rejected("response", None, None)
    if flags & _OPCODE:
        return _reject(data, "opcode", NOTIMP)
    if qdcount != 1 or ancount or nscount:
        return _reject(data, "sections", FORMERR)
    pos = 12
    labels: list[bytes] = []
    while True:
        if pos >= n:
            return _reject(data, "question", FORMERR)
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63 or pos + 1 + length > n:
            return _reject(data, "question", FORMERR)
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
        if pos - 12 > 254:  # the wire name, root label included, is at most 255 octets
            return _reject(data, "question", FORMERR)
    if pos + 4 > n:
        return _reject(data, "question", FORMERR)
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    question = data[12:pos]
    edns: Edns | None = None
    for _ in range(arcount):
        owner = pos
        pos = _skip_name(data, pos)
        if pos < 0 or pos + 10 > n:
            return _reject(data, "additional", FORMERR)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlen > n:
            return _reject(data, "additional", FORMERR)
        if rtype == TYPE_OPT:
            if edns is not None or data[owner] != 0:  # RFC 6891 6.1.1: one OPT, owned by the root
                return _reject(data, "opt", FORMERR)
            opt, end = pos, pos + rdlen
            while opt < end:
                if opt + 4 > end:
                    return _reject(data, "opt", FORMERR)
                opt += 4 + int.from_bytes(data[opt + 2 : opt + 4], "big")
            if opt != end:
                return _reject(data, "opt", FORMERR)
            edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, do=bool(ttl & 0x8000), options=rdlen > 0)
        pos += rdlen
    return Query(ident, flags, tuple(labels), qtype, qclass, question, edns)


def udp_limit(edns: Edns | None, max_udp: int = DEFAULT_MAX_UDP) -> int:
    """The largest UDP reply for this query: 512 without EDNS, else the client's size within [512, max_udp]."""
    if edns is None:
        return UDP_MIN
    return max(UDP_MIN, min(edns.udp_size, max_udp))


# ============================================================================================== wire: replies


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    rcode: int
    truncated: bool


def build_reply(
    q: Query,
    *,
    rcode: int,
    aa: bool,
    ra: bool,
    answers: Iterable[RR] = (),
    authority: Iterable[RR] = (),
    limit: int = TCP_MAX,
    advertise: int = DEFAULT_MAX_UDP,
) -> Reply:
    """A reply echoing the ID, the RD and CD flags and the question; an OPT (our size, the client's DO bit) when
    the query had one. Over `limit`, the sections are dropped and TC set (RFC 2181 9: never a partial RRset),
    so the client retries over TCP."""
    answers, authority = list(answers), list(authority)

    def pack(tc: bool) -> bytes:
        header = DNSHeader(
            id=q.id, bitmap=0, qr=1, aa=int(aa), tc=int(tc), rd=int(bool(q.flags & _RD)), ra=int(ra), rcode=rcode & 0xF
        )
        header.cd = int(bool(q.flags & _CD))
        record = DNSRecord(
            header,
            questions=[DNSQuestion(DNSLabel(q.labels), q.qtype, q.qclass)],
            rr=[] if tc else answers,
            auth=[] if tc else authority,
        )
        if q.edns is not None:
            record.add_ar(EDNS0(udp_len=advertise, ext_rcode=rcode >> 4, flags="do" if q.edns.do else ""))
        return record.pack()

    data = pack(False)
    if len(data) <= limit:
        return Reply(data, rcode, False)
    return Reply(pack(True), rcode, True)


def local_reply(
    entry: Entry, q: Query, *, serial: int, limit: int, ra: bool, advertise: int = DEFAULT_MAX_UDP
) -> Reply:
    """The authoritative reply for a name in the table: its addresses for A/AAAA/ANY, else NODATA + SOA (with
    the table's serial)."""
    owner = DNSLabel(q.labels)  # the question's spelling: answers keep the case of the question
    answers: list[RR] = []
    if q.qtype in (TYPE_A, TYPE_ANY):
        answers += [RR(owner, QTYPE.A, CLASS_IN, entry.ttl, RD_A(ip)) for ip in entry.a]
    if q.qtype in (TYPE_AAAA, TYPE_ANY):
        answers += [RR(owner, QTYPE.AAAA, CLASS_IN, entry.ttl, RD_AAAA(ip)) for ip in entry.aaaa]
    soa = entry.soa
    soa_rr = RR(
        DNSLabel(soa.zone),
        QTYPE.SOA,
        CLASS_IN,
        soa.ttl,
        SOA(soa.mname, soa.rname, (serial, soa.refresh, soa.retry, soa.expire, soa.minimum)),
    )
    if q.qtype == TYPE_SOA and entry.name == soa.zone:
        answers.append(soa_rr)
    authority = [] if answers else [soa_rr]
    return build_reply(
        q, rcode=NOERROR, aa=True, ra=ra, answers=answers, authority=authority, limit=limit, advertise=advertise
    )


def error_reply(q: Query, rcode: int, *, ra: bool, limit: int = TCP_MAX, advertise: int = DEFAULT_MAX_UDP) -> bytes:
    return build_reply(q, rcode=rcode, aa=False, ra=ra, limit=limit, advertise=advertise).data


def truncated_reply(q: Query, rcode: int, *, ra: bool, advertise: int = DEFAULT_MAX_UDP) -> bytes:
    """Header, question and OPT with TC set: for an upstream reply too large for the client's UDP size."""
    return build_reply(q, rcode=rcode, aa=False, ra=ra, limit=0, advertise=advertise).data


def _relayed(query: bytes, reply: bytes) -> bytes:
    """An upstream's reply as we pass it on: the client's ID, and AA cleared, since we are not the authority
    for a name we forward (RFC 1035 4.1.1)."""
    return query[:2] + bytes([reply[2] & ~0x04 & 0xFF]) + reply[3:]


def _same_question(reply: bytes, question: bytes) -> bool:
    """Whether an upstream's packet answers our question: QR set, and either the same question (name in any
    case, since upstreams may randomise it; same type and class) or none at all with an error rcode (a FORMERR
    or NOTIMP from an upstream that could not read the question, RFC 1035 4.1.1)."""
    if len(reply) < 12 or not reply[2] & 0x80:
        return False
    if reply[4:6] == b"\x00\x00":
        return reply[3] & 0x0F != NOERROR
    end = 12 + len(question)
    return (
        len(reply) >= end
        and reply[4:6] == b"\x00\x01"
        and reply[12 : end - 4].lower() == question[:-4].lower()
        and reply[end - 4 : end] == question[-4:]
    )


# ============================================================================================== resolv.conf


def parse_resolv_conf(text: str, port: int = 53) -> list[tuple[str, int]]:
    """The `nameserver` addresses of resolv.conf text, in order, as (host, port). Like glibc: comments start
    with `#` or `;`, only the first three servers count, and a line that is not a valid address is skipped.
    IPv6 scope ids (`fe80::1%eth0`) are kept, since the socket layer needs them."""
    out: list[tuple[str, int]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        server = (fields[1], port)
        if server not in out:
            out.append(server)
    return out[:3]


def system_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The machine's resolvers, for forwarding by default; [] when the file cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return []


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (faster forwarding and TCP; see bench/dns.py), else asyncio's. For
    `asyncio.Runner(loop_factory=new_event_loop)`."""
    try:
        import uvloop  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ============================================================================================== the server


class _State:
    """One table and the caches built from it: replaced as a whole, so no cached answer outlives its table."""

    __slots__ = ("keyed", "raw", "table")

    def __init__(self, table: RecordTable) -> None:
        self.table = table
        self.raw: dict[bytes, tuple[bytes, Cell]] = {}  # query bytes after the ID -> (reply after the ID, counter)
        self.keyed: dict[tuple[Any, ...], tuple[bytes, Cell]] = {}  # parsed shape -> same


def _put(cache: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    if key not in cache and len(cache) >= size:
        del cache[next(iter(cache))]  # FIFO: O(1), and good enough for a working set that fits
    cache[key] = value


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, upstream: _Upstream) -> None:
        self.upstream = upstream

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.upstream.received(data)

    def error_received(self, exc: Exception) -> None:
        self.upstream.failed(exc)


class _Upstream:
    """One upstream server. UDP goes through one connected socket shared by all forwarded queries (the kernel
    drops packets from other sources); each query gets a fresh random ID and a reply must echo it and the
    question. TCP opens a connection per query (only for clients that came over TCP)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.pending: dict[int, _UdpForward] = {}
        self.transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        """Connect the UDP socket; if that fails (no route), every UDP attempt to this upstream is an error."""
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self), remote_addr=(self.host, self.port)
            )
        except OSError as err:
            log.warning("dns upstream %s unusable over UDP: %s", self.label, err)

    def send(self, forward: _UdpForward) -> int:
        """Send the client's query with a fresh ID; the reply goes to `forward.answered`."""
        if self.transport is None or self.transport.is_closing():
            raise OSError("no UDP socket")
        for _ in range(32):
            ident = secrets.randbits(16)
            if ident not in self.pending:
                break
        else:
            raise OSError("no free query ID")
        self.pending[ident] = forward
        self.transport.sendto(ident.to_bytes(2, "big") + forward.data[2:])
        return ident

    def received(self, data: bytes) -> None:
        if len(data) < 12:
            return
        ident = int.from_bytes(data[:2], "big")
        forward = self.pending.get(ident)
        if forward is not None and _same_question(data, forward.q.question):
            del self.pending[ident]
            forward.answered(data)
        # anything else (late, spoofed, garbled) is ignored: the query keeps waiting for its own reply

    def failed(self, exc: Exception) -> None:
        """ICMP port unreachable and the like: fail every waiting query now instead of at its timeout."""
        waiting = list(self.pending.values())
        self.pending.clear()
        for forward in waiting:
            forward.errored(exc)

    async def tcp(self, data: bytes, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            ident = secrets.randbits(16)
            payload = ident.to_bytes(2, "big") + data[2:]
            writer.write(len(payload).to_bytes(2, "big") + payload)
            await writer.drain()
            while True:
                reply = await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
                if reply[:2] == payload[:2] and _same_question(reply, question):
                    return reply
        finally:
            writer.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        waiting = list(self.pending.values())
        self.pending.clear()
        for forward in waiting:
            forward.cancel()


class _UdpForward:
    """A UDP client's query on its way through the upstreams. Driven by callbacks (the upstream's reply, a
    timer, an ICMP error) rather than a task: a forwarded query then costs a timer and a dict entry, not a
    task, two futures and a wait_for."""

    __slots__ = (
        "addr",
        "attempt",
        "data",
        "done",
        "ident",
        "index",
        "last",
        "q",
        "server",
        "start",
        "t0",
        "timer",
        "upstream",
    )

    def __init__(self, server: DnsServer, data: bytes, addr: Any, q: Query, t0: float) -> None:
        self.server, self.data, self.addr, self.q, self.t0 = server, data, addr, q, t0
        self.attempt = 0
        self.start = server._preferred
        self.last: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: _Upstream | None = None
        self.index = 0
        self.ident = 0
        self.done = False

    def next(self) -> None:
        """Try the next upstream, or answer with the last upstream error (SERVFAIL if there was none)."""
        server = self.server
        upstreams = server._upstreams
        while self.attempt < server.attempts and upstreams:
            index = (self.start + self.attempt) % len(upstreams)
            self.attempt += 1
            upstream = upstreams[index]
            try:
                self.ident = upstream.send(self)
            except OSError:
                server.metrics.upstream_failure(upstream.label, "error")
                continue
            self.upstream, self.index = upstream, index
            self.timer = asyncio.get_running_loop().call_later(server.timeout, self.timed_out)
            return
        self.finish(self.last or error_reply(self.q, SERVFAIL, ra=True, advertise=server.max_udp_payload))

    def answered(self, reply: bytes) -> None:
        try:
            if self.timer is not None:
                self.timer.cancel()
            rcode = reply[3] & 0x0F
            if rcode in (SERVFAIL, REFUSED):
                self.server.metrics.upstream_failure(
                    self.upstream.label, "SERVFAIL" if rcode == SERVFAIL else "REFUSED"
                )
                self.last = reply
                self.next()
                return
            self.server._preferred = self.index
            self.finish(reply)
        except Exception:
            self.server._internal_error()

    def timed_out(self) -> None:
        try:
            if self.upstream is not None:
                self.upstream.pending.pop(self.ident, None)
                self.server.metrics.upstream_failure(self.upstream.label, "timeout")
            self.next()
        except Exception:
            self.server._internal_error()

    def errored(self, exc: Exception) -> None:
        try:
            if self.timer is not None:
                self.timer.cancel()
            if self.upstream is not None:
                self.server.metrics.upstream_failure(self.upstream.label, "error")
                log.debug("dns upstream %s: %s", self.upstream.label, exc)
            self.next()
        except Exception:
            self.server._internal_error()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._release()

    def _release(self) -> None:
        if not self.done:
            self.done = True
            self.server._inflight -= 1
            self.server.metrics.inflight = self.server._inflight

    def finish(self, reply: bytes) -> None:
        if self.done:
            return
        self._release()
        server, q = self.server, self.q
        # The upstream saw the client's own OPT, so it sized the reply for the client; check anyway.
        client_limit = UDP_MIN if q.edns is None else max(UDP_MIN, q.edns.udp_size)
        if len(reply) > client_limit:
            reply = truncated_reply(q, reply[3] & 0x0F, ra=bool(reply[3] & 0x80), advertise=server.max_udp_payload)
        server.metrics.cell("udp", q.qtype, reply[3] & 0x0F).n += 1
        server._send_udp(_relayed(self.data, reply), self.addr)
        server.metrics.upstream_latency.observe(perf_counter() - self.t0)


class DnsServer:
    """Serves a `RecordTable` over UDP and TCP on one port; `update()` swaps the table while serving.

    upstreams: where names not in the table go (see `system_upstreams`); forward=False refuses them instead.
    timeout: seconds per upstream attempt; attempts: tries in total, rotating through the upstreams and starting
    with the one that last answered. A reply larger than the client's UDP size (512 without EDNS, capped at
    `max_udp_payload`) is sent truncated (TC); TCP gets everything. cache_size bounds each fast-path cache
    (entries); TCP connections close after `tcp_idle_timeout` seconds without a query, and beyond
    `max_tcp_connections` new ones are closed at once; beyond `max_inflight` forwarded queries, new ones get
    SERVFAIL at once (that also bounds a forwarding loop through a misconfigured upstream).
    """

    def __init__(
        self,
        table: RecordTable | Mapping[str, DnsRecord] = EMPTY_TABLE,
        *,
        upstreams: Iterable[tuple[str, int]] = (),
        forward: bool = True,
        timeout: float = 2.0,
        attempts: int = 2,
        metrics: DnsMetrics | None = None,
        max_udp_payload: int = DEFAULT_MAX_UDP,
        cache_size: int = 20_000,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 256,
        max_inflight: int = 1024,
    ) -> None:
        self.metrics = metrics or DnsMetrics()
        self.forward = forward
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.max_udp_payload = max(UDP_MIN, min(max_udp_payload, TCP_MAX))
        self.cache_size = max(1, cache_size)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_inflight = max_inflight
        self.port = 0
        self._upstreams = [_Upstream(h, p) for h, p in dict.fromkeys(upstreams)]
        self._preferred = 0
        self._local_latency: Latency = self.metrics.local_latency
        self._state = _State(EMPTY_TABLE)
        self._source: Mapping[str, DnsRecord] | None = None  # the mapping the current table was built from
        self._udp: socket.socket | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0
        self._last_error_log = 0.0
        self._closing = False
        self.update(table)

    # ------------------------------------------------------------------------------------------ public API

    @property
    def table(self) -> RecordTable:
        return self._state.table

    @property
    def upstreams(self) -> list[tuple[str, int]]:
        return [(u.host, u.port) for u in self._upstreams]

    @property
    def recursion_available(self) -> bool:
        return self.forward and bool(self._upstreams)

    def update(self, table: RecordTable | Mapping[str, DnsRecord]) -> bool:
        """Serve `table` from now on (a mapping of DnsRecords is built into one, reusing the current table's work
        for records that are the same objects). One attribute swap: a query sees the old or the new table, never
        a mix, and the caches go with the old table. Returns whether the content changed (an identical table, or
        the very mapping given last time, keeps the warm caches)."""
        current = self._state.table
        if not isinstance(table, RecordTable):
            if table is self._source:
                return False
            self._source = table
            table = build_table(table, previous=current)
        else:
            self._source = None
        if current is not EMPTY_TABLE and table.serial == current.serial and table.entries == current.entries:
            return False
        self._state = _State(table)
        self.metrics.table_updates.n += 1
        self.metrics.records = len(table)
        for problem in table.problems:
            log.warning("dns record not served: %s", problem)
        return True

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on UDP and TCP `host:port` (port 0: a free port, the same for both); returns the port. Answers
        only once the upstreams are connected. One start and one stop per instance."""
        loop = asyncio.get_running_loop()
        for _ in range(1 if port else 50):
            sock = self._udp_socket(host, port)
            bound = sock.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(
                    self._tcp_client, host, bound, reuse_address=True, backlog=128, start_serving=False
                )
            except OSError:
                sock.close()
                if port:
                    raise
                continue
            break
        else:
            raise OSError(f"no port free for both UDP and TCP on {host}")
        self.port = bound
        self._drop_self_upstreams(host, bound)
        if self.forward:
            for upstream in self._upstreams:
                await upstream.open()
        self._state = _State(self._state.table)  # recursion_available is in the cached replies
        self._udp = sock
        loop.add_reader(sock.fileno(), self._udp_readable)
        await self._tcp.start_serving()
        log.info(
            "dns server on %s port %d (udp+tcp): %d names; %s",
            host,
            bound,
            len(self.table),
            f"forwarding to {', '.join(u.label for u in self._upstreams)}"
            if self.recursion_available
            else "not forwarding (REFUSED for other names)",
        )
        return bound

    async def stop(self) -> None:
        """Stop listening, close client connections, cancel forwarded queries."""
        self._closing = True
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._tasks):  # TCP client handlers
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for upstream in self._upstreams:
            upstream.close()  # cancels the UDP forwards still waiting

    # ------------------------------------------------------------------------------------------ internals

    @staticmethod
    def _udp_socket(host: str, port: int) -> socket.socket:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)  # absorb bursts; the kernel caps it
            sock.bind(address)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _drop_self_upstreams(self, host: str, port: int) -> None:
        """Forwarding to ourselves would loop (e.g. resolv.conf pointing at the address we serve on)."""

        def is_self(upstream: _Upstream) -> bool:
            if upstream.port != port:
                return False
            try:
                address = ipaddress.ip_address(upstream.host.split("%", 1)[0])
            except ValueError:
                return False
            return upstream.host == host or address.is_loopback or address.is_unspecified or host in ("0.0.0.0", "::")

        for upstream in [u for u in self._upstreams if is_self(u)]:
            log.warning("dns upstream %s is this server; not forwarding to it", upstream.label)
            self._upstreams.remove(upstream)

    def _internal_error(self) -> None:
        """Count and (rate-limited) log an unexpected exception; call from an except block."""
        self.metrics.internal_errors.n += 1
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.exception("dns: unexpected error while handling a query (packet dropped)")

    def _answer(self, data: bytes, transport: str) -> tuple[bytes | None, Query | None]:
        """(reply, None) when answered here; (None, query) when it must be forwarded; (None, None) to drop."""
        state = self._state
        metrics = self.metrics
        parsed = parse_query(data)
        if isinstance(parsed, Rejected):
            if parsed.rcode is None:
                metrics.dropped(parsed.reason)
            else:
                metrics.cell(transport, parsed.qtype, parsed.rcode).n += 1
            return parsed.reply, None
        q = parsed
        tcp = transport == "tcp"
        limit = TCP_MAX if tcp else udp_limit(q.edns, self.max_udp_payload)
        if q.edns is not None and q.edns.version != 0:  # RFC 6891 6.1.3
            metrics.cell(transport, q.qtype, BADVERS).n += 1
            return error_reply(q, BADVERS, ra=self.recursion_available, advertise=self.max_udp_payload), None
        key = (q.labels, q.qtype, q.qclass, q.flags & _ECHOED, None if q.edns is None else q.edns.do, limit)
        hit = state.keyed.get(key)
        if hit is None:
            owned = q.qclass in (CLASS_IN, CLASS_ANY) and q.qtype not in (TYPE_AXFR, TYPE_IXFR)
            entry = state.table.lookup_labels(q.labels) if owned else None
            if entry is None:
                if self.recursion_available and q.qtype not in (TYPE_AXFR, TYPE_IXFR):
                    return None, q
                metrics.cell(transport, q.qtype, REFUSED).n += 1
                return error_reply(q, REFUSED, ra=self.recursion_available, advertise=self.max_udp_payload), None
            reply = local_reply(
                entry,
                q,
                serial=state.table.serial,
                limit=limit,
                ra=self.recursion_available,
                advertise=self.max_udp_payload,
            )
            hit = (reply.data[2:], metrics.cell(transport, q.qtype, NOERROR, rewritten=True))
            _put(state.keyed, key, hit, self.cache_size)
        if not tcp and (q.edns is None or not q.edns.options):
            _put(state.raw, data[2:], hit, self.cache_size)
        metrics.cache_entries = len(state.keyed) + len(state.raw)
        hit[1].n += 1
        return data[:2] + hit[0], None

    def _udp_readable(self) -> None:
        """Serve every datagram waiting on the socket (up to a batch), straight from the socket: one event-loop
        wake-up per batch instead of per packet, on either loop. The hot path is a dict lookup on the query
        bytes after the ID and one sendto."""
        sock = self._udp
        if sock is None:
            return
        recvfrom, sendto, latency = sock.recvfrom, sock.sendto, self._local_latency
        for _ in range(_UDP_BATCH):
            try:
                data, addr = recvfrom(_UDP_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error queued for the socket (ICMP): nothing to answer
            t0 = perf_counter()
            try:
                hit = self._state.raw.get(data[2:])
                if hit is None:
                    self._udp_slow(data, addr, t0)
                    continue
                hit[1].n += 1  # counted first, like the slow path: a client that got its reply sees it counted
                sendto(data[:2] + hit[0], addr)
                latency.observe(perf_counter() - t0)
            except (BlockingIOError, InterruptedError):
                self.metrics.dropped("send-buffer")  # UDP: the client retries, as it would for a lost packet
            except OSError:
                self.metrics.dropped("send-error")
            except Exception:
                self._internal_error()

    def _send_udp(self, data: bytes, addr: Any) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.metrics.dropped("send-buffer")
        except OSError:
            self.metrics.dropped("send-error")

    def _udp_slow(self, data: bytes, addr: Any, t0: float) -> None:
        reply, query = self._answer(data, "udp")
        if reply is not None:
            self._udp.sendto(reply, addr)  # type: ignore[union-attr]
            self._local_latency.observe(perf_counter() - t0)
        elif query is not None:
            self.metrics.forwarded.n += 1
            if self._inflight >= self.max_inflight:
                self.metrics.upstream_failure("*", "overload")
                self._send_udp(error_reply(query, SERVFAIL, ra=True, advertise=self.max_udp_payload), addr)
                self.metrics.cell("udp", query.qtype, SERVFAIL).n += 1
                return
            self._inflight += 1
            self.metrics.inflight = self._inflight
            _UdpForward(self, data, addr, query, t0).next()

    async def _forward_tcp_upstream(self, q: Query, data: bytes) -> bytes:
        """For TCP clients: the upstream's reply over TCP (ID not yet restored); SERVFAIL when all attempts
        failed. Same rotation and failure rules as `_UdpForward`."""
        metrics = self.metrics
        metrics.forwarded.n += 1
        if self._inflight >= self.max_inflight:
            metrics.upstream_failure("*", "overload")
            return error_reply(q, SERVFAIL, ra=True, advertise=self.max_udp_payload)
        self._inflight += 1
        metrics.inflight = self._inflight
        last: bytes | None = None
        try:
            count = len(self._upstreams)
            start = self._preferred
            for attempt in range(self.attempts):
                index = (start + attempt) % count
                upstream = self._upstreams[index]
                try:
                    reply = await asyncio.wait_for(upstream.tcp(data, q.question), self.timeout)
                except TimeoutError:
                    metrics.upstream_failure(upstream.label, "timeout")
                    continue
                except (OSError, EOFError) as err:  # refused, unreachable, reset, incomplete read
                    metrics.upstream_failure(upstream.label, "error")
                    log.debug("dns upstream %s: %s", upstream.label, err)
                    continue
                rcode = reply[3] & 0x0F
                if rcode in (SERVFAIL, REFUSED):
                    metrics.upstream_failure(upstream.label, "SERVFAIL" if rcode == SERVFAIL else "REFUSED")
                    last = reply
                    continue
                self._preferred = index
                return reply
            return last or error_reply(q, SERVFAIL, ra=True, advertise=self.max_udp_payload)
        finally:
            self._inflight -= 1
            metrics.inflight = self._inflight

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._tcp_writers) >= self.max_tcp_connections:
            self.metrics.dropped("tcp-connections")
            writer.close()
            return
        self._tcp_writers.add(writer)
        self.metrics.tcp_connections = len(self._tcp_writers)
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        pending: set[asyncio.Task[None]] = set()
        idle = self.tcp_idle_timeout
        try:
            while not self._closing:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), idle)
                    data = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), idle)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                t0 = perf_counter()
                try:
                    reply, query = self._answer(data, "tcp")
                except Exception:
                    self._internal_error()
                    continue
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    self._local_latency.observe(perf_counter() - t0)
                elif query is not None:
                    if len(pending) >= _TCP_PIPELINE:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.get_running_loop().create_task(self._forward_tcp(writer, data, query, t0))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.wait_for(writer.drain(), idle)
            if pending:  # the client stopped sending (or went idle): its forwarded queries may still answer
                await asyncio.wait(pending, timeout=self.timeout * self.attempts + 1)
        except (TimeoutError, ConnectionError):
            pass  # a client that stopped reading, or went away
        except Exception:
            self._internal_error()
        finally:
            for task in list(pending):
                task.cancel()
            self._tcp_writers.discard(writer)
            self.metrics.tcp_connections = len(self._tcp_writers)
            self._tasks.discard(me)  # type: ignore[arg-type]
            writer.close()

    async def _forward_tcp(self, writer: asyncio.StreamWriter, data: bytes, q: Query, t0: float) -> None:
        try:
            reply = await self._forward_tcp_upstream(q, data)
            self.metrics.cell("tcp", q.qtype, reply[3] & 0x0F).n += 1
            if not writer.is_closing():
                writer.write(len(reply).to_bytes(2, "big") + _relayed(data, reply))
            self.metrics.upstream_latency.observe(perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._internal_error()
