"""The CoreDNS ConfigMap writer against the test API server (official client, real HTTP), and the DNS
verification against a real dnslib responder on loopback.

The Corefile editor itself (canal.dns.corefile) is tested elsewhere; here `edit` and `strip` are a test double
that appends or removes a marker-delimited block, since this module must not depend on the editor's internals.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import pytest
from canal.dns.coredns import (
    KUBE_SYSTEM_COREDNS,
    ORIGINAL_ANNOTATION,
    ApiFailure,
    Backoff,
    ConfigMapMissing,
    ConfigMapRef,
    ConflictRetriesExhausted,
    CorednsMetrics,
    CorefileEditFailed,
    CorefileMissing,
    CorefileWriter,
    DnsVerification,
    OriginalCorefileMissing,
    parse_address,
    plan_apply,
    plan_restore,
    restore,
    verify,
)
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client
from prometheus_client import CollectorRegistry

from canal.desired import Condition
from tests.kube_api import (
    KubeApiServer,
)

pytestmark = pytest.mark.timeout(60)

KUBEADM = """.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
"""
NODE_HOSTS = "172.18.0.2 node-1\n"
RECORDS = {"helloworld.default.svc.cluster.local": "10.96.0.50"}
FAST = Backoff(attempts=4, base=0.001, cap=0.01, jitter=0.5)

# ------------------------------------------------------------------------------- test double: text editing

BEGIN, END = "# canal:begin\n", "# canal:end\n"


def strip_block(text: str) -> str:
    start = text.find(BEGIN)
    if start < 0:
        return text
    end = text.index(END, start) + len(END)
    return text[:start] + text[end:]


def edit(original: str, records: Mapping[str, str]) -> str:
    """Append one marker-delimited block; refuse a text without a server block, as the real editor would."""
    base = strip_block(original)
    if "{" not in base:
        raise ValueError("no server block for cluster.local")
    if not records:
        return base
    return base + BEGIN + "".join(f"# {name} -> {ip}\n" for name, ip in sorted(records.items())) + END


# ------------------------------------------------------------------------------------------------- fixtures


def seed(
    kube_api: KubeApiServer,
    corefile: str = KUBEADM,
    *,
    namespace: str = "kube-system",
    name: str = "coredns",
    key: str = "Corefile",
    annotations: dict | None = None,
) -> dict:
    return kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"k8s-app": "kube-dns"},
                "annotations": annotations or {},
            },
            "data": {key: corefile, "NodeHosts": NODE_HOSTS},
        }
    )


def stored(kube_api: KubeApiServer, ref: ConfigMapRef = KUBE_SYSTEM_COREDNS) -> dict:
    obj = kube_api.get("v1", "ConfigMap", ref.name, ref.namespace)
    assert obj is not None
    return obj


@pytest.fixture
def core(kube_client) -> client.CoreV1Api:
    return client.CoreV1Api(kube_client)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def writer(core, sleeps) -> CorefileWriter[Mapping[str, str]]:
    return CorefileWriter(core, edit, backoff=FAST, sleep=sleeps.append, rand=lambda: 0.5)


# ----------------------------------------------------------------------------------------------------- apply


def test_first_apply_writes_and_saves_the_original(kube_api, writer):
    seeded = seed(kube_api)
    result = writer.apply(RECORDS)
    assert (result.written, result.attempts, result.ref) == (True, 1, ConfigMapRef())
    assert result.written_at is not None and result.written_at <= time.monotonic()
    cm = stored(kube_api)
    assert cm["data"] == {"Corefile": edit(KUBEADM, RECORDS), "NodeHosts": NODE_HOSTS}
    assert cm["metadata"]["annotations"] == {ORIGINAL_ANNOTATION: KUBEADM}
    assert cm["metadata"]["labels"] == {"k8s-app": "kube-dns"}
    assert result.resource_version == cm["metadata"]["resourceVersion"]
    [put] = kube_api.requests_of("update")
    assert put.body["metadata"]["resourceVersion"] == seeded["metadata"]["resourceVersion"]  # the precondition


def test_identical_apply_sends_no_put(kube_api, writer):
    seed(kube_api)
    first = writer.apply(RECORDS)
    second = writer.apply(RECORDS)
    assert (second.written, second.resource_version) == (False, first.resource_version)
    assert second.written_at is None
    assert len(kube_api.requests_of("update")) == 1
    assert stored(kube_api)["metadata"]["resourceVersion"] == first.resource_version


def test_later_edits_keep_the_first_original(kube_api, writer):
    seed(kube_api)
    writer.apply(RECORDS)
    writer.apply({**RECORDS, "other.default.svc.cluster.local": "10.96.0.50"})
    assert stored(kube_api)["metadata"]["annotations"][ORIGINAL_ANNOTATION] == KUBEADM
    removed = writer.apply({})
    assert removed.written
    assert stored(kube_api)["data"]["Corefile"] == KUBEADM
    assert stored(kube_api)["metadata"]["annotations"][ORIGINAL_ANNOTATION] == KUBEADM


@pytest.mark.parametrize("conflicts", [1, 2])
def test_conflicts_are_retried_on_a_fresh_read(kube_api, writer, sleeps, conflicts):
    seed(kube_api)
    edits = iter(range(1, 10))

    def someone_else(obj: dict) -> None:  # e.g. kubectl edit, between Canal's read and its write
        obj["data"]["Corefile"] += f"# concurrent edit {next(edits)}\n"

    kube_api.inject_conflict("v1", "ConfigMap", "coredns", "kube-system", times=conflicts, mutate=someone_else)
    metrics = CorednsMetrics(CollectorRegistry())
    writer.metrics = metrics
    result = writer.apply(RECORDS)

    assert (result.written, result.attempts) == (True, conflicts + 1)
    theirs = KUBEADM + "".join(f"# concurrent edit {n}\n" for n in range(1, conflicts + 1))
    cm = stored(kube_api)
    assert cm["data"]["Corefile"] == edit(theirs, RECORDS)  # their edits survive, Canal's block re-applied
    assert cm["metadata"]["annotations"][ORIGINAL_ANNOTATION] == theirs
    assert [r.code for r in kube_api.requests_of("update")] == [409] * conflicts + [200]
    assert len(kube_api.requests_of("get")) == conflicts + 1
    assert sleeps == [FAST.delay(n, 0.5) for n in range(1, conflicts + 1)]
    assert metrics.registry.get_sample_value("canal_coredns_configmap_conflicts_total") == conflicts
    assert metrics.registry.get_sample_value("canal_coredns_configmap_writes_total", {"result": "written"}) == 1


def test_persistent_conflicts_give_up_after_the_configured_attempts(kube_api, core, sleeps):
    seed(kube_api)
    kube_api.inject_conflict("v1", "ConfigMap", "coredns", "kube-system", times=100)
    writer = CorefileWriter(core, edit, backoff=Backoff(attempts=3, base=0.001), sleep=sleeps.append)
    with pytest.raises(ConflictRetriesExhausted) as error:
        writer.apply(RECORDS)
    assert "kube-system/coredns" in str(error.value) and "3 attempts" in str(error.value)
    assert error.value.ref == ConfigMapRef()
    assert [r.code for r in kube_api.requests_of("update")] == [409, 409, 409]
    assert len(sleeps) == 2
    assert ORIGINAL_ANNOTATION not in stored(kube_api)["metadata"]["annotations"]


def test_an_editor_error_leaves_the_configmap_untouched(kube_api, core):
    before = seed(kube_api)

    def broken(_original: str, _records: object) -> str:
        raise ValueError("unbalanced braces at line 3")

    with pytest.raises(CorefileEditFailed) as error:
        CorefileWriter(core, broken, backoff=FAST).apply(RECORDS)
    assert "kube-system/coredns" in str(error.value) and "unbalanced braces at line 3" in str(error.value)
    assert isinstance(error.value.__cause__, ValueError)
    assert kube_api.requests_of("update") == []
    assert stored(kube_api) == before


def test_an_unexpected_layout_is_refused_too(kube_api, writer):
    before = seed(kube_api, "# only a comment, no server block\n")
    with pytest.raises(CorefileEditFailed, match="no server block"):
        writer.apply(RECORDS)
    assert stored(kube_api) == before


def test_missing_configmap_and_missing_key_are_named(kube_api, core):
    with pytest.raises(ConfigMapMissing, match="kube-system/coredns not found"):
        CorefileWriter(core, edit, backoff=FAST).apply(RECORDS)
    ref = ConfigMapRef(namespace="dns", name="custom", key="Corefile.override")
    seed(kube_api, namespace="dns", name="custom")
    with pytest.raises(CorefileMissing) as error:
        CorefileWriter(core, edit, ref, backoff=FAST).apply(RECORDS)
    assert str(error.value) == "ConfigMap dns/custom has no data key 'Corefile.override' (keys: Corefile, NodeHosts)"
    with pytest.raises(CorefileMissing, match="dns/custom"):
        restore(core, ref)
    assert kube_api.requests_of("update") == []


def test_a_configurable_location(kube_api, core):
    ref = ConfigMapRef(namespace="dns", name="custom", key="Corefile.override")
    seed(kube_api, namespace="dns", name="custom", key="Corefile.override")
    CorefileWriter(core, edit, ref, backoff=FAST).apply(RECORDS)
    assert stored(kube_api, ref)["data"]["Corefile.override"] == edit(KUBEADM, RECORDS)


def test_other_api_errors_surface_without_retries(kube_api, writer):
    seed(kube_api)
    kube_api.inject_failure(500, method="PUT", message="etcd is sad")
    with pytest.raises(ApiFailure) as error:
        writer.apply(RECORDS)
    assert str(error.value) == "cannot write ConfigMap kube-system/coredns: HTTP 500: etcd is sad"
    assert error.value.status == 500
    assert len(kube_api.requests_of("update")) == 1
    kube_api.inject_failure(403, method="GET")
    with pytest.raises(ApiFailure) as forbidden:
        writer.apply(RECORDS)
    assert forbidden.value.status == 403 and "read" in str(forbidden.value)
    assert writer.apply(RECORDS).written  # nothing stuck: the next round works


def test_an_unreachable_api_server_is_an_api_failure(core, kube_api):
    kube_api.stop()
    core.api_client.configuration.retries = 0
    with pytest.raises(ApiFailure, match="kube-system/coredns: the API server is unreachable") as error:
        CorefileWriter(core, edit, backoff=FAST).apply(RECORDS)
    assert error.value.status == 0


# --------------------------------------------------------------------------------------------------- restore

TRICKY = '\ufeff.:53 {\r\n\terrors   \n    # ünïcödé — “quotes” \\ "x"\n    forward . 1.1.1.1\n}'  # no final newline


def test_restore_puts_the_original_back_byte_for_byte(kube_api, core, writer):
    seed(kube_api, TRICKY, annotations={"other.io/keep": "me"})
    writer.apply(RECORDS)
    writer.apply({**RECORDS, "b.default.svc.cluster.local": "10.96.0.50"})
    result = restore(core, backoff=FAST)
    assert (result.written, result.source, result.corefile) == (True, "annotation", TRICKY)
    cm = stored(kube_api)
    assert cm["data"]["Corefile"].encode() == TRICKY.encode()
    assert cm["metadata"]["annotations"] == {"other.io/keep": "me"}
    assert cm["data"]["NodeHosts"] == NODE_HOSTS

    again = writer.apply(RECORDS)  # Canal can take over again, saving the (same) original anew
    assert again.written and stored(kube_api)["metadata"]["annotations"][ORIGINAL_ANNOTATION] == TRICKY


def test_restore_without_the_annotation_fails_clearly(kube_api, core):
    seed(kube_api)
    with pytest.raises(OriginalCorefileMissing) as error:
        restore(core, backoff=FAST)
    message = str(error.value)
    assert "kube-system/coredns" in message and ORIGINAL_ANNOTATION in message and "strip" in message
    assert kube_api.requests_of("update") == []


def test_restore_without_the_annotation_strips_when_asked(kube_api, core):
    seed(kube_api, edit(KUBEADM, RECORDS))  # a Canal block, but the annotation was removed by hand
    result = restore(core, strip=strip_block, backoff=FAST)
    assert (result.written, result.source) == (True, "strip")
    assert stored(kube_api)["data"]["Corefile"] == KUBEADM
    unchanged = restore(core, strip=strip_block, backoff=FAST)
    assert (unchanged.written, unchanged.source) == (False, "strip")
    assert len(kube_api.requests_of("update")) == 1


def test_restore_retries_conflicts(kube_api, core, writer):
    seed(kube_api)
    writer.apply(RECORDS)
    kube_api.inject_conflict("v1", "ConfigMap", "coredns", "kube-system", times=1)
    result = restore(core, backoff=FAST, sleep=lambda _s: None)
    assert (result.written, result.attempts) == (True, 2)
    assert stored(kube_api)["data"]["Corefile"] == KUBEADM


def test_writer_saves_the_stripped_text_when_the_annotation_was_lost(kube_api, core):
    seed(kube_api, edit(KUBEADM, {"old.default.svc.cluster.local": "10.96.0.9"}))
    CorefileWriter(core, edit, strip=strip_block, backoff=FAST).apply(RECORDS)
    assert stored(kube_api)["metadata"]["annotations"][ORIGINAL_ANNOTATION] == KUBEADM


# ------------------------------------------------------------------------------------------------ pure plans


def configmap(corefile: str, annotations: dict | None = None) -> dict:
    return {
        "metadata": {"name": "coredns", "namespace": "kube-system", "resourceVersion": "7", "annotations": annotations},
        "data": {"Corefile": corefile},
    }


@settings(max_examples=100, deadline=None)
@given(original=st.text(), first=st.text(), second=st.text())
def test_apply_then_restore_round_trips_any_text(original, first, second):
    ref = ConfigMapRef()
    plan = plan_apply(configmap(original), ref, first)
    if first == original:
        assert plan.body is None
        return
    assert plan.body["metadata"]["resourceVersion"] == "7"
    later = plan_apply(plan.body, ref, second)
    body = later.body if later.body is not None else plan.body
    assert body["metadata"]["annotations"][ORIGINAL_ANNOTATION] == original
    restored = plan_restore(body, ref)
    assert restored.body["data"]["Corefile"] == original
    assert ORIGINAL_ANNOTATION not in restored.body["metadata"]["annotations"]


def test_plans_do_not_mutate_their_input():
    cm = configmap("a", {"x": "y"})
    snapshot = repr(cm)
    plan_restore(plan_apply(cm, ConfigMapRef(), "b").body, ConfigMapRef())
    assert repr(cm) == snapshot


def test_backoff_is_exponential_capped_and_jittered():
    b = Backoff(attempts=5, base=0.1, cap=1.0, jitter=0.5)
    assert [b.delay(n, 0.0) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay(1, 0.999) == pytest.approx(0.05, abs=1e-3)
    assert Backoff(jitter=0.0).delay(3, 0.7) == Backoff(jitter=0.0).delay(3, 0.0)


# ---------------------------------------------------------------------------------------------- verification

NAME = "helloworld.default.svc.cluster.local"
GATEWAY = "10.96.0.50"
OLD = "10.96.0.11"
Behaviour = Callable[[DNSRecord, float], DNSRecord | None]  # (query, seconds since start) -> reply or silence


def answer(ip: str, owner: str | None = None) -> Callable[[DNSRecord], DNSRecord]:
    def reply_to(query: DNSRecord) -> DNSRecord:
        reply = query.reply()
        rdata = AAAA(ip) if ":" in ip else A(ip)
        reply.add_answer(RR(owner or query.q.qname, QTYPE.AAAA if ":" in ip else QTYPE.A, rdata=rdata, ttl=5))
        return reply

    return reply_to


def nxdomain(query: DNSRecord) -> DNSRecord:
    reply = query.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    return reply


def servfail(query: DNSRecord) -> DNSRecord:
    reply = query.reply()
    reply.header.rcode = RCODE.SERVFAIL
    return reply


def switching(
    before: Callable[[DNSRecord], DNSRecord], after: Callable[[DNSRecord], DNSRecord], at: float
) -> Behaviour:
    return lambda query, elapsed: (after if elapsed >= at else before)(query)


class Responder:
    """A real DNS server on 127.0.0.1 (UDP, dnslib), whose answers change over time like a reloading CoreDNS."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.queries: list[DNSRecord] = []
        self._stop = threading.Event()
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = DNSRecord.parse(data)
            self.queries.append(query)
            reply = self.behaviour(query, time.monotonic() - self.started)
            if reply is not None:
                self.sock.sendto(reply.pack(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def responder() -> Iterator[Callable[[Behaviour], Responder]]:
    running: list[Responder] = []

    def start(behaviour: Behaviour) -> Responder:
        running.append(Responder(behaviour))
        return running[-1]

    yield start
    for r in running:
        r.close()


@pytest.mark.parametrize(("before", "interim"), [(answer(OLD), "WrongAnswer"), (nxdomain, "NXDomain")])
def test_programmed_once_the_gateway_address_is_served(responder, before, interim):
    dns = responder(switching(before, answer(GATEWAY), at=0.3))
    metrics = CorednsMetrics(CollectorRegistry())
    seen: list[DnsVerification] = []
    result = verify(
        NAME,
        [GATEWAY],
        dns.address,
        deadline=5,
        interval=0.05,
        since=dns.started,
        metrics=metrics,
        on_probe=seen.append,
    )
    assert (result.type, result.status, result.reason, result.ok) == ("DNSProgrammed", "True", "Programmed", True)
    assert result.seconds is not None and 0.3 <= result.seconds < 3
    assert GATEWAY in result.message and dns.address in result.message
    assert seen and {s.reason for s in seen} == {interim} and all(s.status == "False" for s in seen)
    assert metrics.registry.get_sample_value("canal_coredns_propagation_seconds_count") == 1
    assert metrics.registry.get_sample_value("canal_coredns_propagation_seconds_sum") == pytest.approx(result.seconds)
    assert all(q.q.qtype == QTYPE.A and str(q.q.qname) == NAME + "." for q in dns.queries)
    assert result.condition() == Condition("DNSProgrammed", "True", "Programmed", result.message)


@pytest.mark.parametrize(
    ("behaviour", "reason", "detail"),
    [
        (answer(OLD), "WrongAnswer", OLD),
        (nxdomain, "NXDomain", "NXDOMAIN"),
        (answer(GATEWAY, owner="canal-gateway.istio-system.svc.cluster.local"), "WrongAnswer", "answer rewriting"),
        (lambda q: q.reply(), "NoAnswer", "no address records"),
        (servfail, "ServerFailure", "SERVFAIL"),
    ],
)
def test_never_programmed_reports_what_was_seen(responder, behaviour, reason, detail):
    dns = responder(lambda query, _elapsed: behaviour(query))
    metrics = CorednsMetrics(CollectorRegistry())
    began = time.monotonic()
    result = verify(NAME, [GATEWAY], dns.address, deadline=0.4, interval=0.05, metrics=metrics)
    assert time.monotonic() - began < 2
    assert (result.status, result.reason, result.seconds, result.ok) == ("False", reason, None, False)
    assert detail in result.message and "within 0.4 s" in result.message and NAME in result.message
    assert metrics.registry.get_sample_value("canal_coredns_verification_failures_total", {"reason": reason}) == 1
    assert metrics.registry.get_sample_value("canal_coredns_propagation_seconds_count") == 0


def test_no_response(responder):
    silent = responder(lambda _query, _elapsed: None)
    result = verify(NAME, [GATEWAY], silent.address, deadline=0.3, interval=0.1)
    assert (result.status, result.reason) == ("False", "NoResponse")
    assert len(silent.queries) >= 2
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: ICMP port unreachable
    refused = verify(NAME, [GATEWAY], f"127.0.0.1:{port}", deadline=0.2, interval=0.05)
    assert refused.reason == "NoResponse"


def test_a_cname_chain_to_the_gateway_counts(responder):
    def chained(query: DNSRecord) -> DNSRecord:
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.CNAME, rdata=CNAME("canal-gateway.istio-system.svc.cluster.local")))
        reply.add_answer(RR("canal-gateway.istio-system.svc.cluster.local", QTYPE.A, rdata=A(GATEWAY)))
        return reply

    dns = responder(lambda query, _elapsed: chained(query))
    assert verify(NAME, [OLD, GATEWAY], dns.address, deadline=2, interval=0.05).ok


def test_ipv6_only_gateways_are_probed_with_aaaa(responder):
    dns = responder(lambda query, _elapsed: answer("fd00::50")(query))
    result = verify(NAME, ["fd00:0::50"], dns.address, deadline=2, interval=0.05)
    assert result.ok
    assert {q.q.qtype for q in dns.queries} == {QTYPE.AAAA}


def test_parse_address():
    assert parse_address("10.96.0.10") == ("10.96.0.10", 53)
    assert parse_address("127.0.0.1:15353") == ("127.0.0.1", 15353)
    assert parse_address("[fd00::10]:5353") == ("fd00::10", 5353)
    assert parse_address("fd00::10") == ("fd00::10", 53)
    with pytest.raises(ValueError, match="no gateway addresses"):
        verify(NAME, [], "127.0.0.1:53")
