"""Canal's DNS server, checked the way users check it: the real `dig` against it on 127.0.0.1.

Each test starts its own server (and fake upstreams) on free loopback ports in a background event loop and
stops them on exit. Expected values come from the records each test defines and from DNS rules (RFC 1035 sizes
and compression, RFC 6891 EDNS, RFC 2308 NODATA), never from the server's own output.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from canal.dns.metrics import DnsMetrics
from canal.dns.records import build_table
from canal.dns.server import new_event_loop
from dnslib import QTYPE, DNSRecord
from prometheus_client import CollectorRegistry

from tests.dns_harness import (
    DIG,
    FakeUpstream,
    ServerHarness,
    dig,
    query_bytes,
    read_frame,
    record,
    records,
    tcp_frames,
    udp_exchange,
)

pytestmark = pytest.mark.timeout(120)
needs_dig = pytest.mark.skipif(DIG is None, reason="dig is not installed (Debian package dnsutils / bind9-dnsutils)")

HELLO = "helloworld.default.svc.cluster.local"
MANY = "many.default.svc.cluster.local"
MANY_V4 = tuple(f"10.1.0.{i}" for i in range(1, 41))  # 40 addresses: more than fits in 512 bytes
TABLE = records(record(HELLO, "10.96.0.50", "fd00::50", ttl=5), record(MANY, *MANY_V4, ttl=30))
EXT = "ext.example.test"


def wire_len(name: str) -> int:
    """Octets of a name on the wire, uncompressed (RFC 1035 3.1): a length byte per label, plus the root."""
    return sum(len(label) + 1 for label in name.rstrip(".").split(".")) + 1


def a_reply_size(name: str, count: int, edns: bool) -> int:
    """Header + question + `count` A records whose owner is a pointer to the question (RFC 1035 4.1.4) + OPT."""
    return 12 + wire_len(name) + 4 + count * (2 + 2 + 2 + 4 + 2 + 4) + (11 if edns else 0)


@pytest.fixture
def served():
    with ServerHarness(TABLE, forward=False) as harness:
        yield harness


# ------------------------------------------------------------------------------------------------ answers


@needs_dig
def test_a_record_is_authoritative(served):
    out = dig(served.port, HELLO, "A")
    assert out.status == "NOERROR"
    assert "aa" in out.flags and "qr" in out.flags
    assert out.addresses() == ["10.96.0.50"]
    ((name, ttl, cls, rtype, _),) = out.answer
    assert (name, ttl, cls, rtype) == (HELLO + ".", "5", "IN", "A")


@needs_dig
def test_aaaa_record(served):
    out = dig(served.port, HELLO, "AAAA")
    assert out.status == "NOERROR" and "aa" in out.flags
    assert out.addresses() == ["fd00::50"]


@needs_dig
@pytest.mark.parametrize("qtype", ["MX", "TXT", "SRV", "CNAME"])
def test_other_types_of_a_known_name_are_nodata_with_soa(served, qtype):
    out = dig(served.port, HELLO, qtype)
    assert out.status == "NOERROR"
    assert "aa" in out.flags
    assert out.answer == []
    serial = build_table(TABLE).serial
    (soa,) = out.authority
    assert soa == [
        "cluster.local.",
        "5",
        "IN",
        "SOA",
        "ns.dns.cluster.local.",
        "hostmaster.cluster.local.",
        str(serial),
        "7200",
        "1800",
        "86400",
        "5",
    ]


@needs_dig
def test_any_returns_both_families(served):
    out = dig(served.port, HELLO, "ANY")
    assert out.status == "NOERROR" and out.addresses() == ["10.96.0.50", "fd00::50"]


@needs_dig
def test_mixed_case_is_answered_in_the_question_case(served):
    asked = "HelloWorld.Default.SVC.Cluster.Local"
    out = dig(served.port, asked, "A")
    assert out.status == "NOERROR"
    assert out.question[0].split()[0] == asked + "."
    assert [r[0] for r in out.answer] == [asked + "."]
    assert out.addresses() == ["10.96.0.50"]
    assert dig(served.port, HELLO.upper() + ".", "AAAA").addresses() == ["fd00::50"]


@needs_dig
def test_tcp(served):
    out = dig(served.port, HELLO, "A", "+tcp")
    assert out.status == "NOERROR" and out.addresses() == ["10.96.0.50"]
    assert served.server.metrics.queries(transport="tcp", qtype="A", rcode="NOERROR") == 1


# ------------------------------------------------------------------------------------------------ EDNS and size


@needs_dig
def test_edns_opt_is_returned_and_do_echoed(served):
    out = dig(served.port, HELLO, "A")
    assert out.edns_udp == 1232  # dig sends EDNS by default; we answer with our own OPT (our size)
    assert dig(served.port, HELLO, "A", "+noedns").edns_udp is None
    secured = dig(served.port, HELLO, "A", "+dnssec")
    assert "; EDNS: version: 0, flags: do;" in secured.text


@needs_dig
@pytest.mark.parametrize("args", [("+bufsize=512",), ("+noedns",)])
def test_truncation_over_udp_and_full_answer_over_tcp(served, args):
    edns = "+noedns" not in args
    full = a_reply_size(MANY, len(MANY_V4), edns)
    assert full > 512
    truncated = dig(served.port, MANY, "A", *args, "+ignore")
    assert "tc" in truncated.flags
    assert truncated.answer == []
    # dig retries over TCP by itself when it sees TC
    retried = dig(served.port, MANY, "A", *args)
    assert "tc" not in retried.flags
    assert retried.addresses() == sorted(MANY_V4)
    assert f"MSG SIZE  rcvd: {full}" in retried.text
    over_tcp = dig(served.port, MANY, "A", "+tcp", *args)
    assert over_tcp.addresses() == sorted(MANY_V4)


@needs_dig
def test_client_udp_size_is_honoured_to_the_byte(served):
    full = a_reply_size(MANY, len(MANY_V4), edns=True)
    assert 512 < full < 1232
    fits = dig(served.port, MANY, "A", f"+bufsize={full}", "+ignore")
    assert "tc" not in fits.flags and fits.addresses() == sorted(MANY_V4)
    assert f"MSG SIZE  rcvd: {full}" in fits.text
    short = dig(served.port, MANY, "A", f"+bufsize={full - 1}", "+ignore")
    assert "tc" in short.flags and short.answer == []


@needs_dig
def test_udp_replies_are_capped_at_the_server_payload_size():
    huge = "huge.default.svc.cluster.local"
    v4 = tuple(f"10.2.{i // 250}.{i % 250 + 1}" for i in range(100))
    full = a_reply_size(huge, len(v4), edns=True)
    assert 1232 < full < 4096
    with ServerHarness(records(record(huge, *v4)), forward=False) as default:
        assert "tc" in dig(default.port, huge, "A", "+bufsize=4096", "+ignore").flags
    with ServerHarness(records(record(huge, *v4)), forward=False, max_udp_payload=4096) as raised:
        out = dig(raised.port, huge, "A", "+bufsize=4096", "+ignore")
        assert "tc" not in out.flags and len(out.answer) == 100


# ------------------------------------------------------------------------------------------------ forwarding


@needs_dig
def test_forwarded_name_gets_the_upstream_answer_and_opt_passes_through():
    good = FakeUpstream(answers={EXT: ["192.0.2.7"]})
    with ServerHarness(TABLE, upstreams=[good], timeout=0.5) as h:
        out = dig(h.port, EXT, "A", "+bufsize=1400")
        assert out.status == "NOERROR"
        assert out.addresses() == ["192.0.2.7"]
        assert "aa" not in out.flags  # not our name: not authoritative
        ((transport, seen),) = good.received
        assert transport == "udp"
        query = DNSRecord.parse(seen)
        (opt,) = [r for r in query.ar if r.rtype == QTYPE.OPT]
        assert opt.rclass == 1400  # the client's own UDP size reached the upstream
        assert 10 in [o.code for o in opt.rdata]  # and its cookie option
        assert str(query.q.qname) == EXT + "."
        assert h.server.metrics.forwarded.n == 1


@needs_dig
def test_nxdomain_from_the_upstream_reaches_the_client():
    with ServerHarness(TABLE, upstreams=[FakeUpstream()], timeout=0.5) as h:
        out = dig(h.port, "missing.example.test", "A")
        assert out.status == "NXDOMAIN"


@needs_dig
def test_names_in_the_table_are_never_forwarded():
    upstream = FakeUpstream()
    with ServerHarness(TABLE, upstreams=[upstream], timeout=0.5) as h:
        assert dig(h.port, HELLO, "A").addresses() == ["10.96.0.50"]
        assert dig(h.port, HELLO, "MX").status == "NOERROR"
        assert upstream.received == []
        assert "ra" in dig(h.port, HELLO, "A").flags  # recursion is available, through the upstream


@needs_dig
def test_silent_upstream_times_out_and_the_next_one_answers():
    silent, good = FakeUpstream(silent=True), FakeUpstream(answers={EXT: ["192.0.2.8"]})
    with ServerHarness(TABLE, upstreams=[silent, good], timeout=0.3, attempts=2) as h:
        started = time.monotonic()
        out = dig(h.port, EXT, "A")
        assert out.addresses() == ["192.0.2.8"]
        assert time.monotonic() - started >= 0.3
        assert len(silent.received) == 1 and len(good.received) == 1
        silent_label = f"127.0.0.1:{silent.port}"
        assert h.server.metrics.failures(silent_label, "timeout") == 1
        # the upstream that answered is tried first from now on
        assert dig(h.port, EXT, "A").addresses() == ["192.0.2.8"]
        assert len(silent.received) == 1


@needs_dig
def test_servfail_when_every_upstream_fails():
    first, second = FakeUpstream(silent=True), FakeUpstream(silent=True)
    with ServerHarness(TABLE, upstreams=[first, second], timeout=0.2, attempts=3) as h:
        out = dig(h.port, EXT, "A")
        assert out.status == "SERVFAIL"
        assert (len(first.received), len(second.received)) == (2, 1)  # three attempts, alternating
        assert h.server.metrics.failures(reason="timeout") == 3


@needs_dig
def test_an_upstream_servfail_is_retried_elsewhere():
    broken, good = FakeUpstream(rcode=2), FakeUpstream(answers={EXT: ["192.0.2.9"]})
    with ServerHarness(TABLE, upstreams=[broken, good], timeout=0.5, attempts=2) as h:
        assert dig(h.port, EXT, "A").addresses() == ["192.0.2.9"]
        assert h.server.metrics.failures(f"127.0.0.1:{broken.port}", "SERVFAIL") == 1


@needs_dig
def test_a_closed_upstream_port_fails_fast():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    good = FakeUpstream(answers={EXT: ["192.0.2.10"]})
    with ServerHarness(TABLE, upstreams=[("127.0.0.1", closed_port), good], timeout=5.0, attempts=2) as h:
        started = time.monotonic()
        assert dig(h.port, EXT, "A").addresses() == ["192.0.2.10"]
        assert time.monotonic() - started < 2.0  # far below the 5 s attempt timeout
        assert h.server.metrics.failures(f"127.0.0.1:{closed_port}", "error") == 1


@needs_dig
def test_forwarding_over_tcp_for_tcp_clients():
    good = FakeUpstream(answers={EXT: ["192.0.2.11"]})
    with ServerHarness(TABLE, upstreams=[good], timeout=0.5) as h:
        out = dig(h.port, EXT, "A", "+tcp")
        assert out.addresses() == ["192.0.2.11"]
        assert [t for t, _ in good.received] == ["tcp"]


def test_forwards_in_flight_are_bounded():
    """Past max_inflight, a forwarded query gets SERVFAIL at once instead of queueing without bound."""
    silent = FakeUpstream(silent=True)
    with ServerHarness(TABLE, upstreams=[silent], timeout=1.0, attempts=1, max_inflight=1) as h:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waiting:
            waiting.sendto(query_bytes(EXT, ident=1), ("127.0.0.1", h.port))
            started = time.monotonic()
            reply = udp_exchange(h.port, query_bytes("other.example.test", ident=2))
            assert reply[3] & 0x0F == 2 and time.monotonic() - started < 0.5  # SERVFAIL, without waiting
            assert udp_exchange(h.port, query_bytes(HELLO, ident=3))[3] & 0x0F == 0  # local answers go on
            waiting.settimeout(3)
            assert waiting.recv(512)[3] & 0x0F == 2  # the first one times out at the upstream: SERVFAIL
        assert len(silent.received) == 1
        assert h.server.metrics.failures("*", "overload") == 1


def test_tcp_client_that_closes_its_side_still_gets_forwarded_answers():
    """`printf query | nc`-style clients send, then shut down their write side: answer before closing."""
    good = FakeUpstream(answers={EXT: ["192.0.2.13"]})
    with ServerHarness(TABLE, upstreams=[good], timeout=0.5) as h:
        with socket.create_connection(("127.0.0.1", h.port), timeout=3) as sock:
            frames = [query_bytes(EXT, ident=1), query_bytes(HELLO, ident=2)]
            sock.sendall(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
            sock.shutdown(socket.SHUT_WR)
            replies = {r[:2]: DNSRecord.parse(r) for r in (read_frame(sock), read_frame(sock))}
            assert sock.recv(10) == b""  # then the server closes
        assert [str(r.rdata) for r in replies[b"\x00\x01"].rr] == ["192.0.2.13"]
        assert [str(r.rdata) for r in replies[b"\x00\x02"].rr] == ["10.96.0.50"]


@needs_dig
def test_refused_when_forwarding_is_off():
    upstream = FakeUpstream(answers={EXT: ["192.0.2.7"]})
    with ServerHarness(TABLE, upstreams=[upstream], forward=False) as h:
        out = dig(h.port, EXT, "A")
        assert out.status == "REFUSED"
        assert "ra" not in out.flags
        assert upstream.received == []
        assert dig(h.port, HELLO, "A").addresses() == ["10.96.0.50"]


def test_upstream_pointing_at_the_server_itself_is_dropped():
    """resolv.conf may name the very address the server listens on: forwarding there would loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with ServerHarness(TABLE, port=port, upstreams=[("127.0.0.1", port), ("192.0.2.1", 53)]) as h:
        assert h.port == port
        assert h.server.upstreams == [("192.0.2.1", 53)]


# ------------------------------------------------------------------------------------------------ raw protocol


def test_id_and_question_are_echoed_exactly_over_udp_and_tcp(served):
    for ident, name in ((0, "hElLoWoRlD.dEfAuLt.svc.cluster.local"), (65535, HELLO.upper()), (12345, HELLO)):
        data = query_bytes(name, "A", ident=ident, edns=1232)
        question = data[12 : 12 + wire_len(name) + 4]
        for reply in (udp_exchange(served.port, data), tcp_frames(served.port, [data], 1)[0]):
            assert reply[:2] == data[:2]
            assert reply[12 : 12 + len(question)] == question
            parsed = DNSRecord.parse(reply)
            assert [str(r.rdata) for r in parsed.rr] == ["10.96.0.50"]


def test_repeated_queries_hit_the_cache_and_keep_their_own_ids(served):
    for ident in range(1, 200):
        reply = udp_exchange(served.port, query_bytes(HELLO, ident=ident))
        assert int.from_bytes(reply[:2], "big") == ident
    assert served.server.metrics.queries(qtype="A", rcode="NOERROR") == 199


def test_formerr_notimp_badvers_and_dropped(served):
    base = query_bytes(HELLO, ident=777)
    two_questions = base[:4] + b"\x00\x02" + base[6:] + base[12:]
    reply = udp_exchange(served.port, two_questions)
    assert reply[:2] == base[:2] and reply[3] & 0x0F == 1  # FORMERR
    update_opcode = base[:2] + bytes([base[2] | 0x28]) + base[3:]  # opcode 5 (UPDATE)
    assert udp_exchange(served.port, update_opcode)[3] & 0x0F == 4  # NOTIMP
    response = base[:2] + bytes([base[2] | 0x80]) + base[3:]
    assert udp_exchange(served.port, response, timeout=0.3) is None  # never answer a response
    assert udp_exchange(served.port, b"\x00\x01", timeout=0.3) is None
    edns1 = DNSRecord.parse(query_bytes(HELLO, edns=1232))
    edns1.ar[0].ttl = 1 << 16  # EDNS version 1
    parsed = DNSRecord.parse(udp_exchange(served.port, bytes(edns1.pack())))
    (opt,) = parsed.ar
    assert (opt.ttl >> 24) << 4 | parsed.header.rcode == 16  # BADVERS = extended rcode 1, low bits 0
    assert parsed.rr == []
    assert served.server.metrics.drops("response") == 1 and served.server.metrics.drops("short") == 1


def test_zone_transfers_are_refused(served):
    data = query_bytes(HELLO, "AXFR", ident=5)
    (reply,) = tcp_frames(served.port, [data], 1)
    assert reply[3] & 0x0F == 5  # REFUSED
    assert udp_exchange(served.port, data)[3] & 0x0F == 5


def test_tcp_pipelines_several_queries_on_one_connection(served):
    frames = [query_bytes(HELLO, t, ident=i) for i, t in enumerate(["A", "AAAA", "MX", "A"], start=1)]
    replies = tcp_frames(served.port, frames, len(frames))
    assert [int.from_bytes(r[:2], "big") for r in replies] == [1, 2, 3, 4]
    parsed = [DNSRecord.parse(r) for r in replies]
    assert [str(p.rr[0].rdata) if p.rr else None for p in parsed] == ["10.96.0.50", "fd00::50", None, "10.96.0.50"]


def test_tcp_idle_timeout_and_connection_limit():
    with ServerHarness(TABLE, forward=False, tcp_idle_timeout=0.3, max_tcp_connections=1) as h:
        first = socket.create_connection(("127.0.0.1", h.port), timeout=2)
        try:
            data = query_bytes(HELLO, ident=1)
            first.sendall(len(data).to_bytes(2, "big") + data)
            assert read_frame(first)[:2] == data[:2]
            # a second connection over the limit is closed at once
            with socket.create_connection(("127.0.0.1", h.port), timeout=2) as second:
                assert second.recv(10) == b""
            assert h.server.metrics.drops("tcp-connections") == 1
            # the idle one is closed by the server after the idle timeout
            started = time.monotonic()
            assert first.recv(10) == b""
            assert 0.2 < time.monotonic() - started < 1.5
        finally:
            first.close()
        # the slot is free again
        assert tcp_frames(h.port, [query_bytes(HELLO, ident=9)], 1)[0][:2] == b"\x00\x09"


@needs_dig
def test_serves_on_uvloop_when_installed():
    uvloop = pytest.importorskip("uvloop", reason="uvloop is optional; the asyncio loop is tested everywhere else")
    loop = new_event_loop()
    assert isinstance(loop, uvloop.Loop)
    loop.close()
    good = FakeUpstream(answers={EXT: ["192.0.2.12"]})
    with ServerHarness(TABLE, upstreams=[good], timeout=0.5, loop_factory=new_event_loop) as h:
        assert isinstance(h.thread.loop, uvloop.Loop)
        assert dig(h.port, HELLO, "A").addresses() == ["10.96.0.50"]
        assert dig(h.port, HELLO, "AAAA", "+tcp").addresses() == ["fd00::50"]
        assert dig(h.port, EXT, "A").addresses() == ["192.0.2.12"]
        assert dig(h.port, EXT, "A", "+tcp").addresses() == ["192.0.2.12"]
        assert "tc" in dig(h.port, MANY, "A", "+bufsize=512", "+ignore").flags
        assert h.thread.errors == []


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_count_types_results_rewrites_and_latency():
    registry = CollectorRegistry()
    metrics = DnsMetrics(registry)
    with ServerHarness(TABLE, forward=False, metrics=metrics) as h:
        udp_exchange(h.port, query_bytes(HELLO, "A", ident=1))
        udp_exchange(h.port, query_bytes(HELLO, "A", ident=2))
        udp_exchange(h.port, query_bytes(HELLO, "MX", ident=3))
        udp_exchange(h.port, query_bytes(EXT, "A", ident=4))
        tcp_frames(h.port, [query_bytes(HELLO, "AAAA", ident=5)], 1)

    def value(name, **labels):
        return registry.get_sample_value(name, labels) or 0

    assert value("canal_dns_queries_total", transport="udp", type="A", rcode="NOERROR") == 2
    assert value("canal_dns_queries_total", transport="udp", type="MX", rcode="NOERROR") == 1
    assert value("canal_dns_queries_total", transport="udp", type="A", rcode="REFUSED") == 1
    assert value("canal_dns_queries_total", transport="tcp", type="AAAA", rcode="NOERROR") == 1
    assert value("canal_dns_rewritten_answers_total", type="A") == 2
    assert value("canal_dns_rewritten_answers_total", type="MX") == 1  # NODATA is an authoritative answer too
    assert value("canal_dns_request_duration_seconds_count", source="local") == 5
    assert value("canal_dns_records") == 2
    assert value("canal_dns_internal_errors_total") == 0


def test_metrics_for_forwarding_failures():
    registry = CollectorRegistry()
    silent = FakeUpstream(silent=True)
    with ServerHarness(TABLE, upstreams=[silent], timeout=0.2, attempts=1, metrics=DnsMetrics(registry)) as h:
        reply = udp_exchange(h.port, query_bytes(EXT, ident=1))
        assert reply[3] & 0x0F == 2
    label = f"127.0.0.1:{silent.port}"
    assert registry.get_sample_value("canal_dns_forwarded_queries_total") == 1
    assert registry.get_sample_value("canal_dns_upstream_failures_total", {"upstream": label, "reason": "timeout"}) == 1
    assert registry.get_sample_value("canal_dns_request_duration_seconds_count", {"source": "upstream"}) == 1
    assert registry.get_sample_value("canal_dns_queries_total", {"transport": "udp", "type": "A", "rcode": "SERVFAIL"})


# ------------------------------------------------------------------------------------------------ updates


@needs_dig
def test_update_swaps_records_in_place(served):
    port = served.port
    assert dig(port, HELLO, "A").addresses() == ["10.96.0.50"]
    changed = records(record(HELLO, "10.96.0.99"), record("new.default.svc.cluster.local", "10.0.0.5"))
    assert served.update(changed)
    assert served.port == port
    assert dig(port, HELLO, "A").addresses() == ["10.96.0.99"]
    assert dig(port, HELLO, "AAAA").answer == []  # the IPv6 address is gone: NODATA
    assert dig(port, "new.default.svc.cluster.local", "A").addresses() == ["10.0.0.5"]
    assert (
        served.update(records(record(HELLO, "10.96.0.99"), record("new.default.svc.cluster.local", "10.0.0.5")))
        is False
    )
    assert served.update({})
    assert dig(port, HELLO, "A").status == "REFUSED"  # forwarding is off and the name is no longer ours


def test_stop_releases_the_port():
    with ServerHarness(TABLE) as h:
        port = h.port
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_live_update_under_load_loses_nothing_and_never_serves_stale():
    """Clients query continuously (UDP A, UDP AAAA, TCP A) while the table changes six times. Every query must
    get an answer, and each answer must be exactly the record set of a version that was live at some moment
    between sending the query and receiving its reply: never a mix, never a version already replaced before
    the query was sent (which a stale fast-path entry would produce)."""
    name, extra = "web.default.svc.cluster.local", "extra.default.svc.cluster.local"

    def version(k: int) -> dict:
        items = [record(name, f"10.0.{k}.1", f"10.0.{k}.2", f"fd00::{k}:1")]
        if k % 2:
            items.append(record(extra, f"10.9.{k}.1"))
        return records(*items)

    versions = [version(k) for k in range(7)]

    def expected(k: int, qname: str, qtype: str) -> frozenset[str] | str:
        rec = versions[k].get(qname)
        if rec is None:
            return "REFUSED"
        family = [ipaddress.ip_address(a) for a in rec.addresses]
        return frozenset(str(a) for a in family if (a.version == 6) == (qtype == "AAAA"))

    results: list[tuple[float, float | None, str, str, frozenset[str] | str | None]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def outcome(reply: bytes) -> frozenset[str] | str:
        parsed = DNSRecord.parse(reply)
        if parsed.header.rcode:
            return {5: "REFUSED"}.get(parsed.header.rcode, f"rcode {parsed.header.rcode}")
        return frozenset(str(r.rdata) for r in parsed.rr)

    def udp_client(qtype: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            for i in range(20_000):
                if stop.is_set():
                    break
                qname = extra if i % 3 == 0 else name
                data = query_bytes(qname, qtype, ident=i % 65536)
                sent = time.monotonic()
                sock.sendto(data, ("127.0.0.1", port))
                try:
                    while True:
                        reply = sock.recv(4096)
                        if reply[:2] == data[:2]:
                            break
                    got, when = outcome(reply), time.monotonic()
                except TimeoutError:
                    got, when = None, None
                with lock:
                    results.append((sent, when, qname, qtype, got))

    def tcp_client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            for i in range(20_000):
                if stop.is_set():
                    break
                qname = extra if i % 3 == 0 else name
                data = query_bytes(qname, "A", ident=i % 65536)
                sent = time.monotonic()
                sock.sendall(len(data).to_bytes(2, "big") + data)
                try:
                    got, when = outcome(read_frame(sock)), time.monotonic()
                except (TimeoutError, ConnectionError):
                    got, when = None, None
                with lock:
                    results.append((sent, when, qname, "A", got))

    with ServerHarness(versions[0], forward=False) as h:
        port = h.port
        clients = [
            threading.Thread(target=udp_client, args=("A",)),
            threading.Thread(target=udp_client, args=("AAAA",)),
            threading.Thread(target=tcp_client),
        ]
        for t in clients:
            t.start()
        switches: list[tuple[float, float]] = [(float("-inf"), float("-inf"))]
        try:
            for k in range(1, len(versions)):
                time.sleep(0.15)
                began = time.monotonic()
                assert h.update(versions[k])
                switches.append((began, time.monotonic()))
            time.sleep(0.15)
        finally:
            stop.set()
            for t in clients:
                t.join(10)
        assert h.thread.errors == []
        assert h.server.metrics.internal_errors.n == 0

    assert len(results) > 300, "the clients did not keep the server busy"
    lost = [r for r in results if r[1] is None]
    assert lost == []
    seen_versions = set()  # by the name whose addresses are unique to each version
    for sent, received, qname, qtype, got in results:
        # version k is live from the start of its swap until the end of the next swap
        live = [
            k
            for k in range(len(versions))
            if switches[k][0] <= received and (k + 1 == len(versions) or sent <= switches[k + 1][1])
        ]
        allowed = {expected(k, qname, qtype): k for k in live}
        assert got in allowed, (qname, qtype, got, live)
        if qname == name:
            seen_versions.add(allowed[got])
    assert seen_versions == set(range(len(versions))), "every version should have been served"
