"""Robustness: random and mutated packets never crash the server, never stop it answering, and never make it
answer with more than a bounded multiple of what it was sent.

The amplification bound, from DNS sizes (RFC 1035) and this table (every name has at most one IPv4 and one
IPv6 address):
- an error reply (FORMERR, NOTIMP) is a 12-byte header, and the packet was at least 12 bytes;
- REFUSED, SERVFAIL or BADVERS echo the question and, only if the query had one, an 11-byte OPT: never larger
  than the query;
- an authoritative reply to a query for a name N of w wire octets (so the query is >= 12 + w + 4) adds at most
  an A (16) and an AAAA (28) record, or an SOA of at most 15 + 10 + 22 + 26 + 20 = 93 octets, plus the OPT,
  which the query then also carried; with w >= 32 for the names below that is < 3x the query;
- forwarded queries go to a fake upstream that answers one A record at most (16 octets) or NXDOMAIN.
So 3x the query size bounds every reply.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest
from canal.dns.server import Query, Rejected, parse_query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dns_harness import FakeUpstream, ServerHarness, query_bytes, read_frame, record, records

pytestmark = pytest.mark.timeout(180)

HELLO = "helloworld.default.svc.cluster.local"
TWO = "two.default.svc.cluster.local"
TABLE = records(record(HELLO, "10.96.0.50", "fd00::50"), record(TWO, "10.0.0.1"))
EXT = "ext.example.test"
AMPLIFICATION = 3
PROBE = "probe.default.svc.cluster.local"
FUZZ_TABLE = {**TABLE, **records(record(PROBE, "10.9.9.9"))}

names = st.sampled_from(
    [HELLO, "HelloWorld.DEFAULT.svc.Cluster.local", TWO + ".", EXT, "missing.example.test", "a", "."]
) | st.from_regex(r"[A-Za-z0-9-]{1,20}(\.[a-z]{1,12}){0,3}", fullmatch=True)
qtypes = st.sampled_from(["A", "AAAA", "MX", "TXT", "ANY", "SOA", "AXFR", "IXFR", "SRV", "CNAME", "OPT", "HTTPS"])
options = st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=40)), max_size=3)
valid_queries = st.builds(
    query_bytes,
    names,
    qtypes,
    ident=st.integers(0, 65535),
    edns=st.none() | st.integers(0, 65535),
    do=st.booleans(),
    options=options,
)


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    """A valid query with some bytes overwritten, header counts changed, cut short or extended."""
    data = bytearray(draw(valid_queries))
    for position, value in draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6)):
        data[position % len(data)] = value
    if draw(st.booleans()):
        counts = draw(st.tuples(*[st.integers(0, 3)] * 4))
        data[4:12] = struct.pack("!4H", *counts)
    cut = draw(st.none() | st.integers(0, len(data)))
    if cut is not None:
        del data[cut:]
    data += draw(st.binary(max_size=30))
    return bytes(data)


packets = st.binary(max_size=600) | mutated_queries() | valid_queries


# ------------------------------------------------------------------------------------------------ pure


@settings(max_examples=1500, deadline=None)
@given(packets)
def test_parse_query_never_raises(data):
    out = parse_query(data)
    assert isinstance(out, Query | Rejected)
    if isinstance(out, Rejected) and out.reply is not None:
        assert len(out.reply) == 12 and out.reply[:2] == data[:2]
    if isinstance(out, Query):
        assert data[12 : 12 + len(out.question)] == out.question


# ------------------------------------------------------------------------------------------------ over the network


@pytest.fixture(scope="module")
def fuzzed():
    upstream = FakeUpstream(answers={EXT: ["192.0.2.7"]})
    with ServerHarness(FUZZ_TABLE, upstreams=[upstream], timeout=0.5, attempts=1) as harness:
        yield harness
        assert harness.thread.errors == []
        assert harness.server.metrics.internal_errors.n == 0


def answered(data: bytes) -> bool:
    """Whether the server owes this packet exactly one reply: everything but what parse_query drops (too short,
    or a response). Forwarded queries are answered too, by the upstream or with SERVFAIL."""
    out = parse_query(data)
    return not (isinstance(out, Rejected) and out.rcode is None)


def probe(sock: socket.socket, port: int, ident: int) -> None:
    """A valid query for a known name; fails the test if the server does not answer it."""
    data = query_bytes(PROBE, ident=ident)
    sock.sendto(data, ("127.0.0.1", port))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        reply = sock.recv(4096)
        if reply[:2] == data[:2]:
            assert reply[3] & 0x0F == 0 and b"\x0a\x09\x09\x09" in reply
            return
    pytest.fail("the server stopped answering valid queries")


def assert_bounded(reply: bytes, sent: bytes) -> None:
    assert len(reply) <= AMPLIFICATION * len(sent), (sent.hex(), reply.hex())
    assert reply[:2] == sent[:2]  # whatever we answer echoes the ID


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=packets)
def test_udp_fuzz(fuzzed, caplog, data):
    caplog.set_level(logging.ERROR, logger="canal.dns")
    port = fuzzed.port
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fuzz,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as checker,
    ):
        checker.settimeout(3)
        fuzz.sendto(data, ("127.0.0.1", port))
        probe(checker, port, ident=0xC0DE)
        # a local reply to the fuzz packet was sent before the probe's; a forwarded one may take a moment
        fuzz.settimeout(3 if answered(data) else 0.0)
        replies = []
        try:
            while True:
                replies.append(fuzz.recv(65535))
                fuzz.settimeout(0.0)
        except (BlockingIOError, TimeoutError):
            pass
    assert len(replies) == (1 if answered(data) else 0)
    for reply in replies:
        assert_bounded(reply, data)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(packets, min_size=1, max_size=4), garbage=st.binary(max_size=64))
def test_tcp_fuzz(fuzzed, caplog, frames, garbage):
    """Length-prefixed fuzz frames on one connection, then either a probe on the same connection or raw unframed
    garbage before closing. With the probe, exactly one reply per frame the server owes one must arrive (local
    ones before the probe's, forwarded ones possibly after); a fresh connection must be served either way."""
    caplog.set_level(logging.ERROR, logger="canal.dns")
    port = fuzzed.port
    probe_query = query_bytes(PROBE, ident=0xC0DE)
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
        if garbage:
            sock.sendall(garbage)  # the server now waits for a frame that never completes; we just leave
        else:
            sock.sendall(len(probe_query).to_bytes(2, "big") + probe_query)
            owed = {}  # ID -> sizes of the frames that carry it and are owed a reply
            for f in frames:
                if answered(f):
                    owed.setdefault(f[:2], []).append(len(f))
            probed = False
            while not probed or any(owed.values()):
                reply = read_frame(sock)
                if not probed and reply[:2] == probe_query[:2] and PROBE.encode()[:5] in reply:
                    probed = True
                    continue
                fitting = [size for size in owed.get(reply[:2], []) if len(reply) <= AMPLIFICATION * size]
                assert fitting, f"a reply no frame was owed, or too large: {reply.hex()}"
                owed[reply[:2]].remove(min(fitting))
    with socket.create_connection(("127.0.0.1", port), timeout=3) as fresh:
        fresh.sendall(len(probe_query).to_bytes(2, "big") + probe_query)
        assert read_frame(fresh)[:2] == probe_query[:2]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_server_still_serves_after_fuzzing(fuzzed):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        probe(sock, fuzzed.port, ident=1)
    assert fuzzed.thread.errors == []
    assert fuzzed.server.metrics.internal_errors.n == 0
