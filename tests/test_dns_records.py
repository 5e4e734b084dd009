"""The record table (canal.dns.records) and the pure wire helpers of the server: no sockets here."""

from __future__ import annotations

import struct

import pytest
from canal.dns.records import build_table, name_labels, normalize, table_serial, zone_of
from canal.dns.server import (
    FORMERR,
    NOTIMP,
    Query,
    Rejected,
    local_reply,
    parse_query,
    parse_resolv_conf,
    system_upstreams,
    udp_limit,
)
from dnslib import QTYPE, DNSRecord

from canal.desired import DnsRecord
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, base, route, virtual_service
from tests.dns_harness import query_bytes, record, records

HELLO = "helloworld.default.svc.cluster.local"


# ------------------------------------------------------------------------------------------ table


def test_table_from_a_translated_desired_state():
    ips = ["10.96.0.60", "fd00::60"]
    objs = [
        *base(ips=ips, dns={"mode": "server", "ttl": 7}),
        *app("web"),
        virtual_service("web", http=[{"route": [route("web")]}]),
    ]
    state = translate(Snapshot.from_dicts(objs))
    table = build_table(state.dns)
    entry = table.lookup("web.default.svc.cluster.local")
    assert entry is not None
    assert entry.a == ("10.96.0.60",)
    assert entry.aaaa == ("fd00::60",)
    assert entry.ttl == 7
    assert entry.gateway == "istio-system/canal"
    assert table.problems == ()


def test_every_mode_is_served():
    """The mode says which publisher the cluster uses; Canal's own server serves all records."""
    table = build_table(
        {
            "a.ns.svc.cluster.local": DnsRecord("a.ns.svc.cluster.local", ("10.0.0.1",), 5, "g/1", "coredns"),
            "b.ns.svc.cluster.local": DnsRecord("b.ns.svc.cluster.local", ("10.0.0.2",), 5, "g/2", "server"),
        }
    )
    assert table.names() == ["a.ns.svc.cluster.local", "b.ns.svc.cluster.local"]


@pytest.mark.parametrize(
    "spelling", [HELLO, HELLO + ".", "HelloWorld.Default.SVC.cluster.LOCAL", "HELLOWORLD.DEFAULT.SVC.CLUSTER.LOCAL."]
)
def test_lookup_ignores_case_and_trailing_dot(spelling):
    table = build_table(records(record(HELLO, "10.96.0.50")))
    entry = table.lookup(spelling)
    assert entry is not None and entry.name == HELLO
    labels = tuple(part.encode() for part in spelling.rstrip(".").split("."))
    assert table.lookup_labels(labels) is entry


def test_lookup_misses_other_names_and_label_tricks():
    table = build_table(records(record(HELLO, "10.96.0.50")))
    assert table.lookup("helloworld.default.svc.cluster") is None
    assert table.lookup("x." + HELLO) is None
    # one label that contains the dots must not alias the five-label name
    assert table.lookup_labels((HELLO.encode(),)) is None
    # only ASCII letters fold: a Latin-1 byte that lower()s in other encodings stays itself
    assert table.lookup_labels((b"HELLOWORLD\xc9", b"default")) is None


def test_addresses_split_by_family_sorted_and_deduplicated():
    r = DnsRecord(
        "web.ns.svc.cluster.local", ("10.0.0.9", "fd00::2", "10.0.0.10", "fd00::1", "10.0.0.9"), 5, "g/g", "x"
    )
    entry = build_table({r.fqdn: r}).lookup(r.fqdn)
    assert entry.a == ("10.0.0.9", "10.0.0.10")  # numeric order, not string order
    assert entry.aaaa == ("fd00::1", "fd00::2")


def test_unservable_records_are_reported_not_served():
    table = build_table(
        records(
            record("ok.ns.svc.cluster.local", "10.0.0.1"),
            record("bad-ip.ns.svc.cluster.local", "10.0.0.300"),
            record("bad..name.svc.cluster.local", "10.0.0.2"),
            record("x" * 64 + ".ns.svc.cluster.local", "10.0.0.3"),
        )
    )
    assert table.names() == ["ok.ns.svc.cluster.local"]
    assert set(table.problems) == {
        "bad-ip.ns.svc.cluster.local: '10.0.0.300' is not an IP address",
        "bad-ip.ns.svc.cluster.local: no usable address",
        "'bad..name.svc.cluster.local': not a valid DNS name",
        f"'{'x' * 64}.ns.svc.cluster.local': not a valid DNS name",
    }


def test_some_bad_addresses_keep_the_good_ones():
    table = build_table(records(record("web.ns.svc.cluster.local", "10.0.0.1", "nonsense")))
    assert table.lookup("web.ns.svc.cluster.local").a == ("10.0.0.1",)
    assert table.problems == ("web.ns.svc.cluster.local: 'nonsense' is not an IP address",)


@pytest.mark.parametrize(
    ("fqdn", "zone"),
    [
        (HELLO, "cluster.local"),
        ("web.shop.svc.k8s.example.com", "k8s.example.com"),
        ("Web.Shop.SVC.Cluster.Local.", "cluster.local"),
        ("gateway.example.com", "gateway.example.com"),  # not a Service name: its own zone
    ],
)
def test_zone_is_the_cluster_domain(fqdn, zone):
    assert zone_of(fqdn) == zone


def test_soa_follows_coredns_kubernetes_plugin():
    table = build_table(
        records(record(HELLO, "10.96.0.50", ttl=5), record("slow.ns.svc.cluster.local", "10.0.0.1", ttl=900))
    )
    soa = table.lookup(HELLO).soa
    assert (soa.zone, soa.mname, soa.rname) == ("cluster.local", "ns.dns.cluster.local", "hostmaster.cluster.local")
    assert (soa.refresh, soa.retry, soa.expire) == (7200, 1800, 86400)
    assert (soa.minimum, soa.ttl) == (5, 5)
    slow = table.lookup("slow.ns.svc.cluster.local").soa
    assert (slow.minimum, slow.ttl) == (900, 300)  # the SOA's own TTL is capped at 300, as in CoreDNS


def test_serial_is_a_content_hash():
    a = records(record("a.ns.svc.cluster.local", "10.0.0.1"), record("b.ns.svc.cluster.local", "10.0.0.2"))
    reordered = dict(reversed(list(a.items())))
    changed = records(record("a.ns.svc.cluster.local", "10.0.0.1"), record("b.ns.svc.cluster.local", "10.0.0.3"))
    assert table_serial(a) == table_serial(reordered) == build_table(a).serial
    assert table_serial(a) != table_serial(changed)


def test_table_is_immutable():
    table = build_table(records(record(HELLO, "10.96.0.50")))
    with pytest.raises(TypeError):
        table.entries[("x",)] = None  # type: ignore[index]


def test_ttl_is_clamped_to_the_dns_range():
    table = build_table(
        records(
            record("a.ns.svc.cluster.local", "10.0.0.1", ttl=-3),
            record("b.ns.svc.cluster.local", "10.0.0.1", ttl=2**40),
        )
    )
    assert table.lookup("a.ns.svc.cluster.local").ttl == 0
    assert table.lookup("b.ns.svc.cluster.local").ttl == 2**31 - 1


def test_name_helpers():
    assert normalize("A.B.") == "a.b"
    assert name_labels("A.b.") == (b"a", b"b")
    assert name_labels(".") == ()
    assert name_labels("a..b") is None
    assert name_labels("ü.example") is None
    assert name_labels(".".join(["a" * 63] * 4)) is None  # 4 * 64 + 1 = 257 octets > 255


# ------------------------------------------------------------------------------------------ query parsing


def test_parse_query_keeps_exact_bytes():
    data = query_bytes("HelloWorld.Default.svc.cluster.local", "AAAA", ident=0xBEEF)
    q = parse_query(data)
    assert isinstance(q, Query)
    assert q.id == 0xBEEF
    assert q.labels == (b"HelloWorld", b"Default", b"svc", b"cluster", b"local")
    assert q.qtype == QTYPE.AAAA and q.qclass == 1
    assert data.endswith(q.question) and q.question.startswith(b"\x0aHelloWorld")
    assert q.edns is None


def test_parse_query_edns():
    q = parse_query(query_bytes(HELLO, edns=4096, do=True, options=[(10, b"12345678")]))
    assert q.edns is not None
    assert (q.edns.udp_size, q.edns.version, q.edns.do, q.edns.options) == (4096, 0, True, True)
    plain = parse_query(query_bytes(HELLO, edns=1232))
    assert (plain.edns.do, plain.edns.options) == (False, False)


def _header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, ident: int = 7) -> bytes:
    return struct.pack("!6H", ident, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x07example\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("data", "reason", "rcode"),
    [
        (b"", "short", None),
        (b"\x00" * 11, "short", None),
        (_header(flags=0x8100) + QUESTION, "response", None),  # QR set: never answer a response
        (_header(flags=0x2100) + QUESTION, "opcode", NOTIMP),  # UPDATE
        (_header(qd=0), "sections", FORMERR),
        (_header(qd=2) + QUESTION + QUESTION, "sections", FORMERR),
        (_header(an=1) + QUESTION, "sections", FORMERR),
        (_header() + b"\x03web", "question", FORMERR),  # name runs off the end
        (_header() + b"\xc0\x0c\x00\x01\x00\x01", "question", FORMERR),  # compression in the question
        (_header() + b"\x03web\x00\x00", "question", FORMERR),  # no class
        (
            _header()
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"a" * 63
            + b"\x00"
            + b"\x00\x01\x00\x01",
            "question",
            FORMERR,
        ),
        (_header(ar=1) + QUESTION + b"\x00\x00\x29", "additional", FORMERR),  # truncated OPT
        (_header(ar=2) + QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2, "opt", FORMERR),
        (_header(ar=1) + QUESTION + b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00", "opt", FORMERR),
        (_header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x03\x00\x0a\x00", "opt", FORMERR),
    ],
)
def test_parse_query_rejects(data, reason, rcode):
    out = parse_query(data)
    assert isinstance(out, Rejected)
    assert (out.reason, out.rcode) == (reason, rcode)
    if rcode is None:
        assert out.reply is None
    else:
        reply = DNSRecord.parse(out.reply)
        assert reply.header.id == 7 and reply.header.qr == 1 and reply.header.rcode == rcode
        assert reply.header.rd == 1  # RD is echoed


def test_udp_limit():
    q = parse_query(query_bytes(HELLO))
    assert udp_limit(q.edns) == 512
    assert udp_limit(parse_query(query_bytes(HELLO, edns=100)).edns) == 512  # below 512 means 512
    assert udp_limit(parse_query(query_bytes(HELLO, edns=900)).edns) == 900
    assert udp_limit(parse_query(query_bytes(HELLO, edns=4096)).edns) == 1232
    assert udp_limit(parse_query(query_bytes(HELLO, edns=4096)).edns, max_udp=4096) == 4096


def test_local_reply_answers_in_the_question_case():
    table = build_table(records(record(HELLO, "10.96.0.50", "fd00::50", ttl=5)))
    q = parse_query(query_bytes("HELLOworld.default.SVC.cluster.local", "ANY", ident=99))
    reply = local_reply(table.lookup(HELLO), q, serial=table.serial, limit=512, ra=False)
    parsed = DNSRecord.parse(reply.data)
    assert reply.data[:2] == (99).to_bytes(2, "big")
    assert reply.data[12 : 12 + len(q.question)] == q.question
    assert parsed.header.aa == 1 and parsed.header.ra == 0
    assert sorted(str(r.rdata) for r in parsed.rr) == ["10.96.0.50", "fd00::50"]
    assert {str(r.rname) for r in parsed.rr} == {"HELLOworld.default.SVC.cluster.local."}


# ------------------------------------------------------------------------------------------ resolv.conf


def test_parse_resolv_conf():
    text = """
# generated by NetworkManager
search example.com
nameserver 10.0.0.2
nameserver   fe80::1%eth0   # link-local, with its interface
; a comment
#nameserver 10.9.9.9
nameserver not-an-address
nameserver 10.0.0.2
options edns0 trust-ad
nameserver 2001:db8::53
nameserver 10.0.0.4
"""
    assert parse_resolv_conf(text) == [("10.0.0.2", 53), ("fe80::1%eth0", 53), ("2001:db8::53", 53)]
    assert parse_resolv_conf("nameserver 127.0.0.53\n", port=5353) == [("127.0.0.53", 5353)]
    assert parse_resolv_conf("") == []
    assert parse_resolv_conf("nameserver\n") == []


def test_system_upstreams_reads_the_file(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\n")
    assert system_upstreams(str(path)) == [("192.0.2.53", 53)]
    assert system_upstreams(str(tmp_path / "missing")) == []


# ------------------------------------------------------------------------------------------ incremental builds


def test_incremental_build_reuses_unchanged_records_and_equals_a_full_build():
    base = records(*(record(f"s{i}.ns.svc.cluster.local", f"10.0.0.{i}") for i in range(1, 50)))
    first = build_table(base)
    changed = dict(base)
    changed["s7.ns.svc.cluster.local"] = record("s7.ns.svc.cluster.local", "10.9.9.9")
    del changed["s8.ns.svc.cluster.local"]
    changed["new.ns.svc.cluster.local"] = record("new.ns.svc.cluster.local", "10.9.9.10", ttl=30)
    second = build_table(changed, previous=first)
    full = build_table(changed)
    assert (second.entries, second.serial, second.problems) == (full.entries, full.serial, full.problems)
    assert second.serial != first.serial
    assert second.lookup("s1.ns.svc.cluster.local") is first.lookup("s1.ns.svc.cluster.local")  # reused as is
    assert second.lookup("s7.ns.svc.cluster.local").a == ("10.9.9.9",)
    assert second.lookup("s8.ns.svc.cluster.local") is None
    assert second.lookup("new.ns.svc.cluster.local").ttl == 30
    assert build_table(base, previous=second).serial == first.serial  # back to the same content, same serial


@pytest.mark.parametrize("order", [0, 1])
def test_names_differing_only_in_case_serve_one_deterministically(order):
    upper = DnsRecord("Web.ns.svc.cluster.local", ("10.0.0.1",), 5, "g/a", "server")
    lower = DnsRecord("web.ns.svc.cluster.local", ("10.0.0.2",), 5, "g/b", "server")
    items = [upper, lower] if order == 0 else [lower, upper]
    table = build_table({r.fqdn: r for r in items})
    assert table.lookup("web.ns.svc.cluster.local").a == ("10.0.0.1",)  # "Web..." sorts before "web..."
    assert table.problems == (
        "web.ns.svc.cluster.local: defined twice (names are case-insensitive); Web.ns.svc.cluster.local is served",
    )
