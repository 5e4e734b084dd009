"""The CoreDNS ConfigMap writer, its restore, and the check that the cluster DNS really serves the change.

Writing: read the ConfigMap, compute the new Corefile with an injected editor (``canal.dns.corefile`` in
production; this module never looks inside the text), and replace it carrying the resourceVersion it read, so a
concurrent writer (kubectl edit, the CoreDNS addon manager, another Canal replica) is never overwritten: on 409
the whole read-edit-write is redone on the fresh object, with bounded exponential backoff and jitter. When the
text would not change nothing is written (no resourceVersion churn, no CoreDNS reload). The first edit saves
the pre-Canal Corefile in an annotation, never overwritten afterwards, which is what ``restore`` puts back.

Verifying: CoreDNS picks up a new Corefile only after the kubelet syncs the ConfigMap volume (~1 min) and the
``reload`` plugin notices it (30 s +- 15 s), so a successful write proves nothing about resolution. `verify`
asks the cluster DNS for one rewritten name until it answers with the gateway address, and reports a
``DNSProgrammed`` condition with the measured propagation time.

Decisions are pure functions (`plan_apply`, `plan_restore`, `classify`); the Kubernetes and UDP I/O around them
is kept thin. Everything here is synchronous (the official client is): call it from a thread in asyncio code.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dnslib import QTYPE, RCODE, DNSRecord
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram
from urllib3.exceptions import HTTPError

from canal.desired import Condition

R = TypeVar("R")
Editor = Callable[[str, R], str]  # (original Corefile, records) -> new Corefile; raises when it cannot edit
Stripper = Callable[[str], str]  # Corefile -> the same without Canal's block

ORIGINAL_ANNOTATION = "canal.io/original-corefile"
CONDITION_TYPE = "DNSProgrammed"


@dataclass(frozen=True, slots=True)
class ConfigMapRef:
    """Where the Corefile lives (kubeadm, k3s, EKS and AKS all use kube-system/coredns, key Corefile)."""

    namespace: str = "kube-system"
    name: str = "coredns"
    key: str = "Corefile"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


KUBE_SYSTEM_COREDNS = ConfigMapRef()


# --------------------------------------------------------------------------------------------------- errors


class CorednsError(Exception):
    """Anything that stopped Canal from reading or writing the CoreDNS ConfigMap; the message names it."""

    def __init__(self, ref: ConfigMapRef, message: str) -> None:
        super().__init__(message)
        self.ref = ref


class ConfigMapMissing(CorednsError):
    pass


class CorefileMissing(CorednsError):
    pass


class CorefileEditFailed(CorednsError):
    """The editor refused the Corefile (unparseable, unexpected layout); nothing was written."""


class ConflictRetriesExhausted(CorednsError):
    pass


class OriginalCorefileMissing(CorednsError):
    """restore() without the annotation and without a strip function."""


class ApiFailure(CorednsError):
    """Any other API error (403, 5xx, 422 for an immutable ConfigMap...), with its HTTP status."""

    def __init__(self, ref: ConfigMapRef, message: str, status: int) -> None:
        super().__init__(ref, message)
        self.status = status


# ---------------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Plan:
    """What to write: the full ConfigMap for a replace (it carries the resourceVersion that was read, which is
    the optimistic-concurrency precondition), or None when it is already as wanted."""

    body: Mapping[str, Any] | None
    corefile: str  # the Corefile text once the plan is carried out
    source: str = ""  # restore: "annotation" or "strip"


def corefile_of(configmap: Mapping[str, Any], ref: ConfigMapRef) -> str:
    data = configmap.get("data") or {}
    if ref.key not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise CorefileMissing(ref, f"ConfigMap {ref} has no data key {ref.key!r} (keys: {keys})")
    return data[ref.key]


def _annotations(configmap: Mapping[str, Any]) -> Mapping[str, str]:
    return (configmap.get("metadata") or {}).get("annotations") or {}


def plan_apply(
    configmap: Mapping[str, Any], ref: ConfigMapRef, new_corefile: str, strip: Stripper | None = None
) -> Plan:
    """Write `new_corefile` unless it is already there; save the pre-Canal text on the first edit only. When the
    annotation is missing but the Corefile already holds a Canal block (annotation removed by hand), `strip`
    recovers the pre-Canal text; without it the current text is saved as is."""
    current = corefile_of(configmap, ref)
    if new_corefile == current:
        return Plan(None, current)
    body = copy.deepcopy(dict(configmap))
    meta = body.setdefault("metadata", {})
    annotations = dict(meta.get("annotations") or {})
    if ORIGINAL_ANNOTATION not in annotations:
        annotations[ORIGINAL_ANNOTATION] = strip(current) if strip is not None else current
    meta["annotations"] = annotations
    body["data"] = {**(body.get("data") or {}), ref.key: new_corefile}
    return Plan(body, new_corefile)


def plan_restore(configmap: Mapping[str, Any], ref: ConfigMapRef, strip: Stripper | None = None) -> Plan:
    """Put the saved pre-Canal Corefile back and drop the annotation; without one, strip Canal's block if a
    `strip` function is given, else refuse (there is nothing trustworthy to restore)."""
    annotations = _annotations(configmap)
    if ORIGINAL_ANNOTATION in annotations:
        original = annotations[ORIGINAL_ANNOTATION]
        body = copy.deepcopy(dict(configmap))
        meta = body["metadata"]
        meta["annotations"] = {k: v for k, v in annotations.items() if k != ORIGINAL_ANNOTATION}
        body["data"] = {**(body.get("data") or {}), ref.key: original}
        return Plan(body, original, "annotation")
    current = corefile_of(configmap, ref)
    if strip is None:
        raise OriginalCorefileMissing(
            ref,
            f"ConfigMap {ref} has no {ORIGINAL_ANNOTATION} annotation, so there is no saved pre-Canal Corefile to "
            "restore (Canal never edited it, or the annotation was removed); stripping Canal's block from the "
            "current Corefile is the alternative",
        )
    stripped = strip(current)
    if stripped == current:
        return Plan(None, current, "strip")
    body = copy.deepcopy(dict(configmap))
    body["data"] = {**(body.get("data") or {}), ref.key: stripped}
    return Plan(body, stripped, "strip")


# ---------------------------------------------------------------------------------------------------- write


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry policy for 409 Conflict: `attempts` read-edit-write rounds in all; the wait before round n+1 is
    min(cap, base * 2**(n-1)), shortened by up to `jitter` of itself so that racing writers spread out."""

    attempts: int = 6
    base: float = 0.1
    cap: float = 5.0
    jitter: float = 0.5

    def delay(self, attempt: int, rand: float) -> float:
        """The wait after failed attempt `attempt` (1-based), for a uniform `rand` in [0, 1)."""
        full = min(self.cap, self.base * 2 ** (attempt - 1))
        return full * (1.0 - self.jitter * rand)


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True, slots=True)
class WriteResult:
    ref: ConfigMapRef
    written: bool  # False: already as wanted, nothing was sent
    resource_version: str  # of the ConfigMap as it now is
    attempts: int
    corefile: str
    written_at: float | None = None  # time.monotonic() right after the write: where propagation is measured from
    source: str = ""  # restore: "annotation" or "strip"


class CorednsMetrics:
    """Prometheus metrics of the CoreDNS integration (a registry per owner, so tests stay isolated)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._propagation = Histogram(
            "canal_coredns_propagation_seconds",
            "From the ConfigMap write until the cluster DNS answered a rewritten name with the gateway address",
            buckets=(0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0),
            registry=self.registry,
        )
        self._failures = Counter(
            "canal_coredns_verification_failures",
            "Verifications that ended without the gateway address, by what the cluster DNS last answered",
            ["reason"],
            registry=self.registry,
        )
        self._writes = Counter(
            "canal_coredns_configmap_writes",
            "CoreDNS ConfigMap apply/restore outcomes (unchanged: nothing was sent)",
            ["result"],
            registry=self.registry,
        )
        self._conflicts = Counter(
            "canal_coredns_configmap_conflicts",
            "409 Conflicts on the CoreDNS ConfigMap, each retried on a fresh read",
            registry=self.registry,
        )

    def propagated(self, seconds: float) -> None:
        self._propagation.observe(seconds)

    def verification_failed(self, reason: str) -> None:
        self._failures.labels(reason).inc()

    def wrote(self, written: bool) -> None:
        self._writes.labels("written" if written else "unchanged").inc()

    def conflicted(self) -> None:
        self._conflicts.inc()


class CorefileWriter(Generic[R]):
    """Applies records to the CoreDNS ConfigMap through `edit`, with optimistic concurrency."""

    def __init__(
        self,
        api: client.CoreV1Api,
        edit: Editor[R],
        ref: ConfigMapRef = KUBE_SYSTEM_COREDNS,
        *,
        strip: Stripper | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        metrics: CorednsMetrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.api = api
        self.edit = edit
        self.ref = ref
        self.strip = strip
        self.backoff = backoff
        self.metrics = metrics
        self.sleep = sleep
        self.rand = rand

    def apply(self, records: R) -> WriteResult:
        """Make the Corefile say what `edit` makes of `records` (re-applied to the fresh text on every retry)."""

        def decide(configmap: Mapping[str, Any]) -> Plan:
            current = corefile_of(configmap, self.ref)
            try:
                new = self.edit(current, records)
            except Exception as exc:
                raise CorefileEditFailed(
                    self.ref, f"cannot edit the Corefile in ConfigMap {self.ref} (key {self.ref.key!r}): {exc}"
                ) from exc
            return plan_apply(configmap, self.ref, new, self._safe_strip)

        return _write(self.api, self.ref, decide, self.backoff, self.metrics, self.sleep, self.rand)

    def restore(self, strip: Stripper | None = None) -> WriteResult:
        return restore(
            self.api,
            self.ref,
            strip=strip,
            backoff=self.backoff,
            metrics=self.metrics,
            sleep=self.sleep,
            rand=self.rand,
        )

    def _safe_strip(self, text: str) -> str:
        if self.strip is None:
            return text
        try:
            return self.strip(text)
        except Exception as exc:
            raise CorefileEditFailed(
                self.ref, f"cannot strip Canal's block from the Corefile in ConfigMap {self.ref}: {exc}"
            ) from exc


def restore(
    api: client.CoreV1Api,
    ref: ConfigMapRef = KUBE_SYSTEM_COREDNS,
    *,
    strip: Stripper | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    metrics: CorednsMetrics | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
) -> WriteResult:
    """``canal dns restore``: put the pre-Canal Corefile back byte for byte and remove the annotation. Without
    the annotation this raises OriginalCorefileMissing, unless `strip` is given (then Canal's block is removed
    from the current text instead)."""

    def decide(configmap: Mapping[str, Any]) -> Plan:
        try:
            return plan_restore(configmap, ref, strip)
        except CorednsError:
            raise
        except Exception as exc:
            raise CorefileEditFailed(
                ref, f"cannot strip Canal's block from the Corefile in ConfigMap {ref}: {exc}"
            ) from exc

    return _write(api, ref, decide, backoff, metrics, sleep, rand)


def _write(
    api: client.CoreV1Api,
    ref: ConfigMapRef,
    decide: Callable[[Mapping[str, Any]], Plan],
    backoff: Backoff,
    metrics: CorednsMetrics | None,
    sleep: Callable[[float], None],
    rand: Callable[[], float],
) -> WriteResult:
    """Read, decide, replace with the read resourceVersion; on 409 start over on a fresh read."""
    attempts = max(1, backoff.attempts)
    for attempt in range(1, attempts + 1):
        configmap = _read(api, ref)
        plan = decide(configmap)
        version = str((configmap.get("metadata") or {}).get("resourceVersion") or "")
        if plan.body is None:
            if metrics is not None:
                metrics.wrote(False)
            return WriteResult(ref, False, version, attempt, plan.corefile, None, plan.source)
        try:
            written = api.replace_namespaced_config_map(ref.name, ref.namespace, dict(plan.body))
        except ApiException as exc:
            if exc.status == 409:
                if metrics is not None:
                    metrics.conflicted()
                if attempt < attempts:
                    sleep(backoff.delay(attempt, rand()))
                    continue
                raise ConflictRetriesExhausted(
                    ref,
                    f"ConfigMap {ref} kept changing under Canal: {attempts} attempts ended in 409 Conflict; "
                    "another writer is updating it continuously",
                ) from exc
            raise _api_failure(ref, "write", exc) from exc
        except HTTPError as exc:
            raise ApiFailure(ref, f"cannot write ConfigMap {ref}: the API server is unreachable ({exc})", 0) from exc
        if metrics is not None:
            metrics.wrote(True)
        return WriteResult(
            ref, True, written.metadata.resource_version or "", attempt, plan.corefile, time.monotonic(), plan.source
        )
    raise AssertionError("unreachable: the loop returns or raises")


def _read(api: client.CoreV1Api, ref: ConfigMapRef) -> dict[str, Any]:
    try:
        configmap = api.read_namespaced_config_map(ref.name, ref.namespace)
    except ApiException as exc:
        raise _api_failure(ref, "read", exc) from exc
    except HTTPError as exc:
        raise ApiFailure(ref, f"cannot read ConfigMap {ref}: the API server is unreachable ({exc})", 0) from exc
    return api.api_client.sanitize_for_serialization(configmap)


def _api_failure(ref: ConfigMapRef, action: str, exc: ApiException) -> CorednsError:
    if exc.status == 404:
        return ConfigMapMissing(ref, f"ConfigMap {ref} not found (is CoreDNS the cluster DNS?)")
    detail = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):  # the Status message says more than the reason phrase
        detail = json.loads(exc.body or "{}").get("message") or detail
    return ApiFailure(ref, f"cannot {action} ConfigMap {ref}: HTTP {exc.status}: {detail}", exc.status or 0)


# ----------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class DnsVerification:
    """The outcome of `verify`, shaped as a Kubernetes condition. Reasons: Programmed; or, with status False,
    what the cluster DNS last did: WrongAnswer, NXDomain, NoAnswer, ServerFailure, NoResponse."""

    status: str  # "True" or "False"
    reason: str
    message: str
    seconds: float | None = None  # propagation time when True
    type: str = CONDITION_TYPE

    @property
    def ok(self) -> bool:
        return self.status == "True"

    def condition(self) -> Condition:
        return Condition(self.type, self.status, self.reason, self.message)


@dataclass(frozen=True, slots=True)
class Observation:
    """One probe's outcome: reason "" means the gateway address was in the answer."""

    reason: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.reason == ""


def parse_address(text: str, default_port: int = 53) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def _normalize(addresses: Iterable[str]) -> frozenset[str]:
    return frozenset(str(ipaddress.ip_address(a)) for a in addresses)


def classify(reply: DNSRecord, name: str, expected: frozenset[str]) -> Observation:
    """Did `reply` answer `name` with one of the `expected` (normalized) addresses? Only records owned by the
    name asked, or by a CNAME chain from it, count: an answer for the rewritten target name means answer
    rewriting is missing, and stub resolvers drop such answers."""
    rcode = reply.header.rcode
    if rcode == RCODE.NXDOMAIN:
        return Observation("NXDomain", f"NXDOMAIN for {name}")
    if rcode != RCODE.NOERROR:
        return Observation("ServerFailure", f"{RCODE.get(rcode, str(rcode))} for {name}")
    owners = {name.lower().rstrip(".")}
    for rr in reply.rr:
        if rr.rtype == QTYPE.CNAME and str(rr.rname).lower().rstrip(".") in owners:
            owners.add(str(rr.rdata).lower().rstrip("."))
    found: list[str] = []
    strangers: list[str] = []
    for rr in reply.rr:
        if rr.rtype not in (QTYPE.A, QTYPE.AAAA):
            continue
        owner = str(rr.rname).lower().rstrip(".")
        (found if owner in owners else strangers).append(f"{owner} {ipaddress.ip_address(str(rr.rdata))}")
        if owner in owners and str(ipaddress.ip_address(str(rr.rdata))) in expected:
            return Observation("", f"{name} -> {ipaddress.ip_address(str(rr.rdata))}")
    if found:
        return Observation("WrongAnswer", f"answered {', '.join(found)}")
    if strangers:
        return Observation(
            "WrongAnswer", f"answered for another name ({', '.join(strangers)}): is answer rewriting configured?"
        )
    return Observation("NoAnswer", f"no address records for {name}")


def probe(server: tuple[str, int], name: str, qtype: str, timeout: float) -> DNSRecord | None:
    """One UDP query; None when nothing (matching) came back in time."""
    query = DNSRecord.question(name, qtype)
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(max(timeout, 0.001))
        deadline = time.monotonic() + timeout
        try:
            sock.connect(server)
            sock.send(query.pack())
            while True:
                data = sock.recv(65535)
                try:
                    reply = DNSRecord.parse(data)
                except Exception:  # dnslib raises assorted errors on garbage: not our answer
                    reply = None
                if reply is not None and reply.header.id == query.header.id and reply.questions == query.questions:
                    return reply
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
        except (TimeoutError, OSError):  # timeout, or ICMP port unreachable (ConnectionRefusedError)
            return None


def verify(
    name: str,
    addresses: Iterable[str],
    server: str,
    *,
    deadline: float = 180.0,
    interval: float = 1.0,
    since: float | None = None,
    metrics: CorednsMetrics | None = None,
    on_probe: Callable[[DnsVerification], None] | None = None,
) -> DnsVerification:
    """Ask `server` (host:port, UDP) for `name` every `interval` s until it answers with one of `addresses` or
    `deadline` s pass. `since` (a time.monotonic() value, e.g. WriteResult.written_at) is where the propagation
    time is measured from; default: now. `on_probe` gets the interim False result after each miss, so a status
    writer can report it while waiting."""
    expected = _normalize(addresses)
    if not expected:
        raise ValueError(f"no gateway addresses to verify {name} against")
    qtype = "A" if any(ipaddress.ip_address(a).version == 4 for a in expected) else "AAAA"
    host, port = parse_address(server)
    start = time.monotonic()
    origin = start if since is None else since
    end = start + deadline
    wanted = ", ".join(sorted(expected))
    probes = 0
    last = Observation("NoResponse", "no probe sent")
    while True:
        began = time.monotonic()
        probes += 1
        reply = probe((host, port), name, qtype, max(0.001, min(interval, end - began)))
        now = time.monotonic()
        last = (
            Observation("NoResponse", f"no reply from {server}") if reply is None else classify(reply, name, expected)
        )
        if last.ok:
            seconds = now - origin
            if metrics is not None:
                metrics.propagated(seconds)
            return DnsVerification(
                "True", "Programmed", f"{last.detail} via {server} after {seconds:.1f} s ({probes} probes)", seconds
            )
        if now >= end:
            break
        if on_probe is not None:
            on_probe(_miss(name, wanted, server, last, now - start, probes, final=False))
        time.sleep(max(0.0, min(began + interval, end) - time.monotonic()))
    if metrics is not None:
        metrics.verification_failed(last.reason)
    return _miss(name, wanted, server, last, time.monotonic() - start, probes, final=True)


def _miss(
    name: str, wanted: str, server: str, last: Observation, elapsed: float, probes: int, *, final: bool
) -> DnsVerification:
    verdict = f"did not resolve to {wanted} within {elapsed:.1f} s" if final else f"does not resolve to {wanted} yet"
    return DnsVerification(
        "False", last.reason, f"{name} {verdict} via {server}: {last.detail} ({probes} probes)", None
    )
