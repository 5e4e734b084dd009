"""The CoreDNS Corefile editor over real Corefiles: golden outputs, round trips, and every way a Corefile is refused.

Inputs in tests/corefiles/ are the distributions' defaults (kubeadm, k3s, EKS, AKS; each file says where it comes
from) and one hand-written Corefile with several server blocks, zones and ports. ``<name>.added.Corefile`` and
``<name>.updated.Corefile`` are the expected outputs for ADD and UPDATE below, reviewed by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from pathlib import Path

import pytest
from canal.dns.corefile import (
    CorefileError,
    canal_name,
    corefile_diff,
    find_canal_block,
    has_canal_block,
    parse_corefile,
    plan_corefile,
    render_canal_block,
    render_corefile,
    strip_canal_block,
    tokenize,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from canal.desired import DnsRecord
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, gateway, internal_gateway, route, service, virtual_service

HERE = Path(__file__).parent / "corefiles"
DISTROS = ["kubeadm", "k3s", "eks", "aks", "multi"]
CLUSTER_BLOCK_LINE = {"kubeadm": 3, "k3s": 3, "eks": 3, "aks": 3, "multi": 9}
GW = "canal-gateway.istio-system.svc.cluster.local"


def rec(fqdn: str, ttl: int = 5, gateway: str = "istio-system/canal", target: str = GW, ips=("10.96.0.50",)):
    return DnsRecord(fqdn, tuple(ips), ttl, gateway, "coredns", target)


def by_name(*records: DnsRecord) -> dict[str, DnsRecord]:
    return {r.fqdn: r for r in records}


# Two names through the gateway Service, one through an address.ips gateway (dual-stack), one for Canal's own
# DNS server (mode "server": never in the Corefile).
ADD = by_name(
    rec("helloworld.default.svc.cluster.local"),
    rec("ratings.bookinfo.svc.cluster.local"),
    rec("legacy.default.svc.cluster.local", 10, "istio-system/static", "", ("fd00:10:96::60", "10.96.0.60")),
    DnsRecord("api.default.svc.cluster.local", ("10.96.0.70",), 5, "istio-system/local", "server", ""),
)
# ratings leaves, reviews arrives, the Service gateway's TTL goes to 30 and the static gateway loses its IPv6.
UPDATE = by_name(
    rec("helloworld.default.svc.cluster.local", 30),
    rec("reviews.bookinfo.svc.cluster.local", 30),
    rec("legacy.default.svc.cluster.local", 10, "istio-system/static", "", ("10.96.0.61",)),
    DnsRecord("api.default.svc.cluster.local", ("10.96.0.70",), 5, "istio-system/local", "server", ""),
)


def read(name: str) -> str:
    return (HERE / name).read_text()


def original(distro: str) -> str:
    return read(f"{distro}.Corefile")


# ----------------------------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("distro", DISTROS)
def test_add_matches_the_golden_file(distro):
    assert render_corefile(original(distro), ADD) == read(f"{distro}.added.Corefile")


@pytest.mark.parametrize("distro", DISTROS)
def test_update_matches_the_golden_file_from_the_added_and_from_the_original(distro):
    expected = read(f"{distro}.updated.Corefile")
    assert render_corefile(read(f"{distro}.added.Corefile"), UPDATE) == expected
    assert render_corefile(original(distro), UPDATE) == expected


@pytest.mark.parametrize("distro", DISTROS)
@pytest.mark.parametrize("records", [ADD, UPDATE], ids=["added", "updated"])
def test_applying_the_same_records_twice_changes_nothing(distro, records):
    once = render_corefile(original(distro), records)
    edit = plan_corefile(once, records)
    assert edit.after == once
    assert not edit.changed
    assert edit.diff() == ""


@pytest.mark.parametrize("distro", DISTROS)
@pytest.mark.parametrize("stage", ["added", "updated"])
def test_removing_every_record_restores_the_original_byte_for_byte(distro, stage):
    edited = read(f"{distro}.{stage}.Corefile")
    assert render_corefile(edited, {}) == original(distro)
    assert strip_canal_block(edited) == original(distro)
    only_server_mode = {k: v for k, v in ADD.items() if v.mode == "server"}
    assert render_corefile(edited, only_server_mode) == original(distro)


@pytest.mark.parametrize("distro", DISTROS)
def test_an_untouched_corefile_round_trips_and_has_no_canal_block(distro):
    text = original(distro)
    assert render_corefile(text, {}) == text
    assert strip_canal_block(text) == text
    assert not has_canal_block(text)
    assert has_canal_block(read(f"{distro}.added.Corefile"))
    corefile = parse_corefile(text)
    assert corefile.source == text
    # Every byte is a token, a comment or white space: nothing is lost or invented by the lexer.
    pieces = sorted([(t.start, t.end) for t in corefile.tokens] + [(c.start, c.end) for c in corefile.comments])
    gaps = [text[a[1] : b[0]] for a, b in itertools.pairwise(pieces)]
    assert all(not g.strip() for g in gaps)
    assert not text[: pieces[0][0]].strip() and not text[pieces[-1][1] :].strip()


@pytest.mark.parametrize("distro", DISTROS)
def test_the_golden_outputs_parse_and_hold_one_intact_canal_block(distro):
    for stage in ("added", "updated"):
        text = read(f"{distro}.{stage}.Corefile")
        block = find_canal_block(parse_corefile(text))
        assert block is not None and block.intact
        assert block.block.line == CLUSTER_BLOCK_LINE[distro]


def test_the_rules_are_sorted_exact_and_point_at_the_gateway_names():
    text = render_corefile(original("kubeadm"), ADD)
    rules = [line.strip() for line in text.splitlines() if line.strip().startswith("rewrite")]
    assert rules == [
        "rewrite continue ttl exact helloworld.default.svc.cluster.local 5",
        f"rewrite stop name exact helloworld.default.svc.cluster.local {GW}",
        "rewrite stop name exact legacy.default.svc.cluster.local static.istio-system.canal.cluster.local",
        "rewrite continue ttl exact ratings.bookinfo.svc.cluster.local 5",
        f"rewrite stop name exact ratings.bookinfo.svc.cluster.local {GW}",
    ]
    assert "api.default" not in text  # mode "server" records are Canal's DNS server's business
    assert "hosts" not in text.split("# canal:end")[0]  # never a second hosts block (k3s has one)


def test_output_is_identical_whatever_the_order_of_the_records():
    shuffled = dict(reversed(list(ADD.items())))
    assert render_corefile(original("k3s"), shuffled) == render_corefile(original("k3s"), ADD)
    assert render_corefile(original("k3s"), list(ADD.values())) == render_corefile(original("k3s"), ADD)


def test_k3s_keeps_its_nodehosts_block_and_imports_untouched():
    edited = render_corefile(original("k3s"), ADD)
    corefile = parse_corefile(edited)
    (block,) = corefile.blocks
    hosts = [d for d in block.directives if d.name == "hosts"]
    assert len(hosts) == 1 and hosts[0].args == ("/etc/coredns/NodeHosts",)
    assert [c.name for c in hosts[0].children] == ["ttl", "reload", "fallthrough"]
    assert [d.args for d in block.directives if d.name == "import"] == [("/etc/coredns/custom/*.override",)]
    assert [d.args for d in corefile.imports] == [("/etc/coredns/custom/*.server",)]


def test_the_multi_block_corefile_is_edited_in_the_cluster_domain_block_only():
    edited = render_corefile(original("multi"), ADD)
    corefile = parse_corefile(edited)
    labels = [b.label for b in corefile.blocks]
    assert labels == [
        "cluster.local:1053 in-addr.arpa:1053 ip6.arpa:1053",
        "consul.local:1053 example.org:1053",
        "dns://.:1053",
        ".:5353",
    ]
    block = find_canal_block(corefile)
    assert block is not None and block.block.label == labels[0]
    before = parse_corefile(original("multi"))
    for old, new in zip(before.blocks[1:], corefile.blocks[1:], strict=True):
        assert (
            edited[new.open_brace.start : new.close_brace.end]
            == before.source[old.open_brace.start : old.close_brace.end]
        )


def test_crlf_corefiles_get_crlf_lines_and_still_restore_byte_for_byte():
    text = original("kubeadm").replace("\n", "\r\n")
    edited = render_corefile(text, ADD)
    assert "\r\n" in edited and "\n" not in edited.replace("\r\n", "")
    assert edited == read("kubeadm.added.Corefile").replace("\n", "\r\n")
    assert render_corefile(edited, ADD) == edited
    assert render_corefile(edited, {}) == text


def test_a_reindented_canal_block_is_not_tampering_and_is_rewritten_in_canonical_form():
    edited = read("kubeadm.added.Corefile")
    reindented = edited.replace("    rewrite", "\trewrite")
    assert find_canal_block(parse_corefile(reindented)).intact
    assert strip_canal_block(reindented) == original("kubeadm")


def test_the_block_is_inserted_first_and_indented_like_its_server_block():
    text = ".:53 {\n\terrors\n\tkubernetes cluster.local {\n\t\tpods insecure\n\t}\n}\n"
    edited = render_corefile(text, by_name(rec("a.b.svc.cluster.local")))
    lines = edited.split("\n")
    assert lines[1].startswith("\t# canal:begin v1 sha256=")
    assert lines[2] == "\trewrite continue ttl exact a.b.svc.cluster.local 5"
    assert lines[4] == "\t# canal:end" and lines[5] == "\terrors"


def test_canal_rules_come_before_the_users_own_rewrite_rules():
    """All rewrite lines of a server block form one rule list in Corefile order, and the first match stops it."""
    text = original("kubeadm").replace(
        "    errors\n", "    errors\n    rewrite name suffix .old.local .svc.cluster.local\n"
    )
    edited = render_corefile(text, ADD)
    rewrites = [line.strip() for line in edited.splitlines() if line.strip().startswith("rewrite")]
    assert rewrites[-1] == "rewrite name suffix .old.local .svc.cluster.local"
    assert len(rewrites) == 6
    assert render_corefile(edited, {}) == text


# ----------------------------------------------------------------------------------------------- address.ips


def test_address_ips_gateways_get_a_canal_name_answered_by_templates():
    records = by_name(
        rec("a.x.svc.cluster.local", 7, "ns1/gw", "", ("10.0.0.1", "10.0.0.2")),
        rec("b.x.svc.cluster.local", 7, "ns1/gw", "", ("10.0.0.2", "10.0.0.1")),
    )
    text = render_canal_block(records, indent="", unit="  ")
    assert text.count("template IN A gw.ns1.canal.cluster.local {") == 1  # one set per gateway
    assert "template IN AAAA" not in text  # no IPv6: the ANY template answers NODATA for AAAA
    assert (
        '  answer "gw.ns1.canal.cluster.local. 7 IN A 10.0.0.1"\n  answer "gw.ns1.canal.cluster.local. 7 IN A 10.0.0.2"'
        in text
    )
    assert "  match ^gw\\.ns1\\.canal\\.cluster\\.local\\.$\n" in text
    assert "ttl exact" not in text  # the template's RRs carry the TTL
    assert "rewrite stop name exact a.x.svc.cluster.local gw.ns1.canal.cluster.local\n" in text


def test_records_of_one_ips_gateway_must_agree():
    records = by_name(
        rec("a.x.svc.cluster.local", 7, "ns1/gw", "", ("10.0.0.1",)),
        rec("b.x.svc.cluster.local", 7, "ns1/gw", "", ("10.0.0.9",)),
    )
    with pytest.raises(CorefileError, match="disagree") as err:
        render_corefile(original("kubeadm"), records)
    assert err.value.kind == "record"


def test_canal_names_are_readable_unique_and_always_valid():
    assert canal_name("istio-system/canal") == "canal.istio-system.canal.cluster.local"
    assert canal_name("ns/a.b", "Corp.Internal.") == "a.b.ns.canal.corp.internal"
    long = canal_name("ns/" + "x" * 63 + "." + "y" * 63 + "." + "z" * 63 + "." + "w" * 60)
    assert re.fullmatch(r"gw-[0-9a-f]{16}\.canal\.cluster\.local", long)
    assert canal_name("ns/" + "x" * 70) != canal_name("ns/" + "x" * 71)
    with pytest.raises(CorefileError):
        canal_name("no-namespace")


# ----------------------------------------------------------------------------------------------- from the translator


def test_records_from_the_translator_render_for_a_custom_cluster_domain():
    objs = [
        gateway(),
        internal_gateway(service_ref="canal-gateway", clusterDomain="corp.internal", dns={"mode": "coredns", "ttl": 9}),
        service("canal-gateway", "istio-system", ip="10.96.0.50"),
        *app("web"),
        virtual_service("web", http=[{"route": [route("web")]}]),
    ]
    records = translate(Snapshot.from_dicts(objs)).dns
    corefile = original("kubeadm").replace("kubernetes cluster.local", "kubernetes corp.internal")
    edited = render_corefile(corefile, records, cluster_domain="corp.internal")
    assert "    rewrite continue ttl exact web.default.svc.corp.internal 9\n" in edited
    assert (
        "    rewrite stop name exact web.default.svc.corp.internal canal-gateway.istio-system.svc.corp.internal\n"
        in edited
    )
    with pytest.raises(CorefileError) as err:  # the kubeadm default serves cluster.local, not corp.internal
        render_corefile(original("kubeadm"), records, cluster_domain="corp.internal")
    assert err.value.kind == "no-server-block"


def test_the_helloworld_example_renders():
    objs = [
        gateway(),
        internal_gateway(ips=["10.96.0.50"]),
        *app("helloworld"),
        virtual_service("helloworld", http=[{"route": [route("helloworld")]}]),
    ]
    edited = render_corefile(original("eks"), translate(Snapshot.from_dicts(objs)).dns)
    assert (
        "rewrite stop name exact helloworld.default.svc.cluster.local canal.istio-system.canal.cluster.local" in edited
    )
    assert 'answer "canal.istio-system.canal.cluster.local. 5 IN A 10.96.0.50"' in edited


# ----------------------------------------------------------------------------------------------- refusals


BAD = [
    ("unbalanced-open", "syntax", 2, "the '{' opened here is never closed; the '{' of line 8 is closed at line 12"),
    (
        "unbalanced-close",
        "syntax",
        10,
        "unexpected '}' with no matching '{' (the '}' of line 7 closes the '{' of line 2",
    ),
    ("unterminated-quote", "syntax", 4, "unterminated quoted string"),
    ("no-cluster-block", "no-server-block", 2, "'.:53' at line 2 answers it on dns:53, but has no kubernetes plugin"),
    ("shadowed", "no-server-block", 8, "'cluster.local:53' at line 8 answers it on dns:53, but has no kubernetes"),
    ("two-candidates", "ambiguous", 8, "more than one server block serves the cluster domain cluster.local: '.:53'"),
    ("unended-canal", "canal-block", 3, "the Canal block begun here has no '# canal:end'"),
    ("canal-in-directive", "canal-block", 5, "a Canal marker is inside the 'kubernetes' directive of line 4"),
    ("brace-line", "layout", 2, "has more on the line of its '{'"),
    ("no-braces", "layout", 2, "a server block without braces is not supported"),
]


@pytest.mark.parametrize(("name", "kind", "line", "message"), BAD, ids=[b[0] for b in BAD])
def test_broken_or_unexpected_corefiles_are_refused_with_the_line_and_the_reason(name, kind, line, message):
    text = read(f"bad/{name}.Corefile")
    with pytest.raises(CorefileError) as err:
        render_corefile(text, ADD)
    assert (err.value.kind, err.value.line) == (kind, line)
    assert message in str(err.value)
    assert str(err.value).startswith(f"line {line}: ")


def test_a_hand_edited_canal_block_is_refused_and_only_forced_stripping_removes_it():
    tampered = read("kubeadm.added.Corefile").replace(
        "ratings.bookinfo.svc.cluster.local 5", "ratings.bookinfo.svc.cluster.local 300"
    )
    assert tampered != read("kubeadm.added.Corefile")
    for attempt in (
        lambda: render_corefile(tampered, ADD),
        lambda: render_corefile(tampered, {}),
        lambda: strip_canal_block(tampered),
    ):
        with pytest.raises(CorefileError, match="edited by hand") as err:
            attempt()
        assert (err.value.kind, err.value.line) == ("canal-block", 4)
    assert strip_canal_block(tampered, force=True) == original("kubeadm")
    added_line = read("kubeadm.added.Corefile").replace(
        "# canal:end", "rewrite stop name exact x.y.svc.cluster.local a.b.c\n    # canal:end"
    )
    with pytest.raises(CorefileError, match="edited by hand"):
        render_corefile(added_line, ADD)
    no_digest = re.sub(r"sha256=[0-9a-f]+ ", "", read("kubeadm.added.Corefile"))
    with pytest.raises(CorefileError, match="edited by hand"):
        strip_canal_block(no_digest)


def test_a_canal_block_left_in_another_server_block_is_refused():
    block = render_canal_block(ADD)
    text = original("multi").replace(".:5353 {\n", ".:5353 {\n" + block)
    with pytest.raises(CorefileError, match="served by the one at line") as err:
        render_corefile(text, ADD)
    assert err.value.kind == "canal-block"
    assert render_corefile(text, {}) == original("multi")  # with nothing to write, it is simply cleaned up


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("    # canal:end\n", ""), "has no '# canal:end'"),
        (
            lambda t: t.replace("    # canal:end\n", "").replace(
                "    # canal:begin", "    # canal:end\n    # canal:begin"
            ),
            "comes before",
        ),
        (
            lambda t: t.replace(
                "    errors\n", t[t.index("    # canal:begin") : t.index("    errors\n")] + "    errors\n"
            ),
            "more than one Canal block",
        ),
        (lambda t: t.replace("    # canal:end", "    errors # canal:end"), "on a line of its own"),
        (
            lambda t: t.replace(".:53 {\n", "(snip) {\n    errors\n}\n.:53 {\n").replace(
                "    # canal:begin", "    # x"
            ),
            "without a",
        ),
    ],
    ids=["no-end", "end-first", "two-blocks", "trailing-marker", "end-only"],
)
def test_malformed_canal_markers_are_refused(edit, message):
    text = edit(read("kubeadm.added.Corefile"))
    with pytest.raises(CorefileError, match=re.escape(message)) as err:
        render_corefile(text, ADD)
    assert err.value.kind == "canal-block"
    assert has_canal_block(text)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (rec("Bad Name.default.svc.cluster.local"), "not a valid DNS name"),
        (rec('x"y.default.svc.cluster.local'), "not a valid DNS name"),
        (rec("{$HOME}.default.svc.cluster.local"), "not a valid DNS name"),
        (rec("a" * 64 + ".default.svc.cluster.local"), "not a valid DNS name"),
        (rec("a.default.svc.cluster.local", ttl=-1), "TTL -1"),
        (rec("a.default.svc.cluster.local", ttl=2**31), "TTL"),
        (rec("a.default.svc.cluster.local", target="x y"), "target"),
        (rec("a.default.svc.cluster.local", target="", ips=("10.0.0.300",)), "does not appear to be an IPv4"),
        (rec("a.default.svc.cluster.local", target="", ips=()), "no target and no addresses"),
        (rec("a.default.svc.cluster.local", target="gw.elsewhere.example"), "outside the kubernetes plugin's zones"),
    ],
)
def test_records_that_cannot_be_written_exactly_are_refused(record, message):
    with pytest.raises(CorefileError, match=re.escape(message)) as err:
        render_corefile(original("kubeadm"), by_name(record))
    assert err.value.kind == "record"


def test_names_outside_the_cluster_domain_block_are_refused():
    with pytest.raises(CorefileError, match="answered by the server block at line 23 on dns:1053") as err:
        render_corefile(original("multi"), by_name(rec("db.service.consul.local")))
    assert err.value.kind == "layout"


def test_records_for_several_names_may_be_upper_case_or_end_with_a_dot():
    records = [rec("Helloworld.Default.svc.cluster.local."), rec("ratings.bookinfo.svc.cluster.local")]
    assert render_corefile(original("kubeadm"), records) == render_corefile(
        original("kubeadm"), [rec("helloworld.default.svc.cluster.local"), rec("ratings.bookinfo.svc.cluster.local")]
    )
    with pytest.raises(CorefileError, match="appears twice"):
        render_corefile(original("kubeadm"), [rec("a.b.svc.cluster.local"), rec("A.B.svc.cluster.local")])


# ----------------------------------------------------------------------------------------------- the parser


def test_the_parser_follows_the_caddyfile_token_rules():
    text = (
        '(snip) {\n    log . "a # b \\"c\\" \\d"\n}\n'
        "dns://.:5353, example.org:1053 {\n"
        "    import snip\n"
        "    forward . {$UPSTREAM}#comment without a space\n"
        '    template IN A x {\n        answer "{{ .Name }} 60 IN A 1.2.3.4"\n    }\n'
        '    hosts {\n        10.0.0.1 a.b # "not a quote\n        fallthrough }\n'
        '    errors "multi\nline"\n'
        "}\n"
    )
    corefile = parse_corefile(text)
    (snip,) = corefile.snippets
    assert snip.name == "snip" and snip.directives[0].args == (".", 'a # b "c" \\d')
    (block,) = corefile.blocks
    assert [(k.scheme, k.zone, k.port) for k in block.keys] == [("dns", ".", "5353"), ("dns", "example.org.", "1053")]
    names = [d.name for d in block.directives]
    assert names == ["import", "forward", "template", "hosts", "errors"]
    forward = block.directives[1]
    assert forward.args == (".", "{$UPSTREAM}", "without", "a", "space")  # a glued '#' hides one word only
    assert block.directives[2].children[0].args == ("{{ .Name }} 60 IN A 1.2.3.4",)
    hosts = block.directives[3]
    assert [c.name for c in hosts.children] == ["10.0.0.1", "fallthrough"]
    assert block.directives[4].args == ("multi\nline",)
    assert [c.text for c in corefile.comments] == ["#comment", '# "not a quote']


def test_server_keys_normalise_like_coredns():
    keys = (
        parse_corefile("cluster.local:53 In-Addr.Arpa tls://.:853 grpc://. .:{$PORT} 10.0.0.0/8 {\n}\n").blocks[0].keys
    )
    assert [(k.scheme, k.zone, k.port) for k in keys] == [
        ("dns", "cluster.local.", "53"),
        ("dns", "in-addr.arpa.", "53"),
        ("tls", ".", "853"),
        ("grpc", ".", "443"),
        ("dns", ".", "{$PORT}"),
        ("dns", "10.0.0.0/8.", "53"),
    ]


def test_a_kubernetes_plugin_imported_from_a_snippet_counts():
    text = "(k8s) {\n    kubernetes cluster.local\n}\n.:53 {\n    import k8s\n    forward . 1.1.1.1\n}\n"
    edited = render_corefile(text, by_name(rec("a.b.svc.cluster.local")))
    assert find_canal_block(parse_corefile(edited)).block.line == 4
    assert render_corefile(edited, {}) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (".:53 {\n    errors }\n", "unexpected '}' after directive 'errors'"),
        ("}\n", "unexpected '}' with no matching '{'"),
        (".:53 {\n{\n}\n}\n", "unexpected '{' where a directive should start"),
        ("a, {\n}\n", "expected another server block key"),
        ("import\n", "import takes exactly one argument"),
        ("(s) {\n}\n(s) {\n}\n", "defined twice"),
        (".:53 {\n}\n.:53 {\n}\n", None),
    ],
)
def test_syntax_errors(text, message):
    if message is None:  # parses; the duplicate zone is refused when a block must be chosen
        parse_corefile(text)
        with pytest.raises(CorefileError, match="served by two server blocks"):
            render_corefile(text, ADD)
        return
    with pytest.raises(CorefileError, match=re.escape(message)):
        parse_corefile(text)


# ----------------------------------------------------------------------------------------------- helpers


def test_the_diff_is_a_unified_diff_of_the_canal_block():
    edit = plan_corefile(original("aks"), ADD)
    diff = edit.diff()
    assert diff.startswith("--- Corefile\n+++ Corefile (canal)\n@@ -1,6 +1,28 @@\n")
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(added) == 22 and all(line.startswith("+    ") for line in added)
    assert not [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert (
        corefile_diff("a", "b") == "--- Corefile\n+++ Corefile (canal)\n@@ -1 +1 @@\n"
        "-a\n\\ No newline at end of file\n+b\n\\ No newline at end of file\n"
    )
    assert edit.names == (
        "helloworld.default.svc.cluster.local",
        "legacy.default.svc.cluster.local",
        "ratings.bookinfo.svc.cluster.local",
    )
    assert edit.server_block_line == 3


def test_warnings_for_a_missing_reload_plugin_and_autopath():
    text = ".:53 {\n    kubernetes cluster.local\n    autopath @kubernetes\n}\n"
    warnings = plan_corefile(text, ADD).warnings
    assert any(w.startswith("no reload plugin:") for w in warnings)
    assert any(w.startswith("autopath at line 3") for w in warnings)
    assert plan_corefile(original("kubeadm"), ADD).warnings == ()
    assert "imported files not inspected" in plan_corefile(original("k3s").replace("    reload\n", ""), ADD).warnings[0]


def test_has_canal_block_never_raises():
    assert has_canal_block('.:53 {\n    # canal:begin\n    log "unterminated\n')
    assert not has_canal_block('.:53 {\n    log "# canal:begin"\n}\n')
    assert not has_canal_block("")


# ----------------------------------------------------------------------------------------------- properties

POOL = [
    rec("a.one.svc.cluster.local"),
    rec("b.one.svc.cluster.local", 17),
    rec("c.two.svc.cluster.local", 0),
    rec("d.two.svc.cluster.local", 10, "istio-system/static", "", ("10.96.0.60", "fd00::60")),
    rec("e.two.svc.cluster.local", 10, "istio-system/static", "", ("10.96.0.60", "fd00::60")),
    rec("f.three.svc.cluster.local", 3, "other/edge", "", ("fd00::1",)),
]


@settings(max_examples=60, deadline=None)
@given(
    distro=st.sampled_from(DISTROS),
    first=st.sets(st.sampled_from(range(len(POOL)))),
    second=st.sets(st.sampled_from(range(len(POOL)))),
)
def test_any_sequence_of_edits_depends_only_on_the_last_records(distro, first, second):
    text = original(distro)
    r1 = [POOL[i] for i in sorted(first)]
    r2 = [POOL[i] for i in sorted(second)]
    step1 = render_corefile(text, r1)
    step2 = render_corefile(step1, r2)
    assert step2 == render_corefile(text, r2)
    assert render_corefile(step2, r2) == step2
    assert render_corefile(step2, []) == text
    assert has_canal_block(step2) == bool(r2)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}"#\\ \t\n\r.:$abk(),', max_size=80))
def test_the_parser_only_ever_raises_corefile_errors(text):
    try:
        corefile = parse_corefile(text)
    except CorefileError as err:
        assert err.line is None or err.line >= 1
        return
    for tok in corefile.tokens:
        assert text[tok.start : tok.end].strip() or tok.quoted
    with contextlib.suppress(CorefileError):
        render_corefile(text, ADD)


def caddy_lexer(text: str) -> tuple[list[tuple[str, int]], bool]:
    """coredns/caddy's lexer.next() transliterated line by line, as the reference for ours: (text, line) per token,
    and whether the input ended inside a quoted string (which CoreDNS accepts and we refuse)."""
    tokens: list[tuple[str, int]] = []
    i, line, n = (1 if text.startswith("\ufeff") else 0), 1, len(text)
    go_space = set("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
    while True:
        val: list[str] = []
        comment = quoted = escaped = False
        token_line = line
        while True:
            if i >= n:
                if val:
                    tokens.append(("".join(val), token_line))
                return tokens, quoted
            ch = text[i]
            i += 1
            if quoted:
                if not escaped:
                    if ch == "\\":
                        escaped = True
                        continue
                    if ch == '"':
                        tokens.append(("".join(val), token_line))
                        break
                if ch == "\n":
                    line += 1
                if escaped and ch != '"':
                    val.append("\\")
                val.append(ch)
                escaped = False
                continue
            if ch in go_space:
                if ch == "\r":
                    continue
                if ch == "\n":
                    line += 1
                    comment = False
                if val:
                    tokens.append(("".join(val), token_line))
                    break
                continue
            if ch == "#":
                comment = True
            if comment:
                continue
            if not val:
                token_line = line
                if ch == '"':
                    quoted = True
                    continue
            val.append(ch)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet='{}"#\\ \t\r\n\u2003\x1cab$', max_size=60))
def test_the_lexer_matches_coredns_caddy_token_for_token(text):
    expected, unterminated = caddy_lexer(text)
    try:
        tokens, _ = tokenize(text)
    except CorefileError as err:
        assert err.reason == "unterminated quoted string"
        assert unterminated
        return
    assert not unterminated
    assert [(t.text, t.line) for t in tokens] == expected
