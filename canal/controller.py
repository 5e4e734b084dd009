"""`canal controller`: the in-cluster control plane. Informers -> incremental translation -> xDS, DNS and status.

Every replica watches the cluster and serves xDS from its own informers, so gateway Envoys and node agents can
connect to any replica. Only the leader (a coordination.k8s.io Lease) writes: InternalGateway status, Events and
the CoreDNS Corefile. Losing the lease stops those writes at once; serving goes on.

Change coalescing happens before translation: informer events are folded per object (the latest wins). An
isolated change (nothing translated for a quiet period) is translated at once, so a single edit reaches the
gateways in the time Envoy needs, not a quiet period later. Events that follow a translation within the quiet
period are a burst: they are folded until ``--quiet-period`` passes with no new event, never longer than
``--max-delay``, so a storm of edits costs at most one recomputation per quiet period, not one per event. The
publisher then pushes at once (its own quiet period is zero here: the wait already happened).

Pods are watched only where translation reads them (`Translator.pod_namespaces`): the namespaces of
InternalGateways (gateway pods) and of Services with subset clusters (subset membership is a Pod label), one
informer per namespace, started and stopped as that set changes after a translation. A translation that needs a
namespace not watched before is not published until that namespace's Pods are listed and translated (bounded by
``pod_sync_timeout``), so no state goes out whose subset endpoints are empty only because the list had not
arrived. A stopped informer's Pods are deleted from the snapshot: nothing reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from canal.desired import DesiredState, DnsRecord
from canal.kube import informer as informers
from canal.kube.events import EventRecorder, Notice
from canal.kube.status import DnsView, FleetView, Nack, StatusWriter, gateway_status, now
from canal.model.base import ObjectRef, Rejection
from canal.serving import Serving, ServingOptions
from canal.snapshot import Parsed, parse_object, ref_of
from canal.translate import Translator
from canal.translate.engine import pod_namespace_bound
from canal.xds.publisher import DEFAULT_DRAIN_GRACE
from canal.xds.types import NODE_AGENT_GROUP

log = logging.getLogger(__name__)

ISTIO_GROUP = "networking.istio.io"
_DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
_SYNC_TIMEOUT = 60.0  # the first lists (and the first translation's Pods): serve nothing partial before that
_POD_ROUNDS = 4  # translations of newly listed Pods before a state is published anyway (changes kept coming)
_RETIRE_JOIN = 30.0  # a stopped informer returns within a second: its open request is cut
# Pod informers' own connection pool: one watch per namespace, as many as translation needs, would overflow a pool
# sized for a watch per kind, and urllib3 then discards (and logs) a connection after every request. Connections
# are opened as needed; this only bounds how many are kept.
_POD_POOL = 1024
_BOUND_KINDS = frozenset({"InternalGateway", "DestinationRule"})  # what pod_namespace_bound reads; few, listed fast


@dataclass
class ControllerOptions:
    namespaces: tuple[str, ...] = ()  # empty: the whole cluster
    xds_address: str = "0.0.0.0:18000"
    metrics_address: str = "0.0.0.0:15014"
    quiet: float = 0.1
    max_delay: float = 1.0
    drain_grace: float = DEFAULT_DRAIN_GRACE  # withdrawn clients' routes stay this long beyond the DNS TTL
    resync: float = 300.0
    status_interval: float = 1.0
    # DNS: Canal's own server (dns.mode: server), and the CoreDNS ConfigMap (dns.mode: coredns; None: not managed)
    dns_address: str | None = None
    dns_upstreams: list[tuple[str, int]] | None = None
    dns_forward: bool = True
    coredns: Any = None  # a canal.dns.coredns.ConfigMapRef
    cluster_domain: str = "cluster.local"
    dns_verify: tuple[str, int] | None = None  # the cluster DNS to probe after a Corefile write
    dns_verify_timeout: float = 60.0
    # leader election; lease None: this replica always leads (a single replica, or tests)
    lease: tuple[str, str] | None = ("istio-system", "canal-controller")
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    # how long a translation that needs Pods of a namespace not watched before waits for their list
    pod_sync_timeout: float = 15.0


def slim(obj: dict[str, Any]) -> dict[str, Any] | None:
    """What the translator reads, without the bulk it does not (managedFields, last-applied copies, most of a
    Pod): the controller keeps one parsed copy of every object, so every byte per object counts at 50,000."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            for key in _DROP_ANNOTATIONS:
                annotations.pop(key, None)
    if obj.get("kind") == "Pod":
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        obj["spec"] = {"nodeName": spec.get("nodeName", "")} if isinstance(spec, dict) else {}
        if isinstance(status, dict):
            obj["status"] = {k: status[k] for k in ("phase", "podIP", "podIPs", "conditions") if k in status}
    return obj


@dataclass
class _PodWatch:
    informer: informers.Informer
    stop: threading.Event
    thread: threading.Thread


class KubeSource:
    """Informer events -> the latest change per object, waiting to be translated.

    Every kind but Pod is watched from the start (cluster-wide, or in each of `namespaces`). Pods are watched per
    namespace, in the namespaces `watch_pods` is given: the translator's own answer to which Pods it reads."""

    def __init__(
        self, api: Any, namespaces: tuple[str, ...], resync: float, wake: Callable[[], None], registry: Any = None
    ) -> None:
        from prometheus_client import Counter  # noqa: PLC0415 - with the informers' metrics, in the same registry

        self.api = api
        self.metrics = informers.InformerMetrics(registry)
        self.namespaces = namespaces
        self.resync = resync
        self.wake = wake
        self._lock = threading.Lock()
        self._pending: dict[ObjectRef, Parsed | ObjectRef] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.informers: list[informers.Informer] = []
        self.istio_version = ""
        self._pod_resource: informers.Resource | None = None
        self._pod_api: Any = None
        self._pods: dict[str, _PodWatch] = {}  # namespace -> its running Pod informer
        self._retiring: dict[str, threading.Thread] = {}  # namespace -> the thread stopping its old informer
        self._watching = threading.Lock()  # watch_pods (a worker thread) against stop (the event loop's)
        self.pod_sync_timeouts = Counter(
            "canal_controller_pod_sync_timeouts",
            "Translations published before the Pods of a newly needed namespace were listed (the wait timed out)",
            registry=self.metrics.registry,
        )
        self.metrics.registry.register(_PodInformerCollector(self))

    def resources(self) -> list[informers.Resource]:
        """Every kind at the version the API server serves; a missing CRD (InternalGateway, Istio's) is an error
        that names it, not an informer that backs off forever."""
        found = [informers.resolve(self.api, resource) for resource in informers.RESOURCES]
        self.istio_version = next(r.version for r in found if r.group == ISTIO_GROUP)
        log.info("watching %s", ", ".join(str(r) for r in found))
        return found

    def start(self) -> None:
        for resource in self.resources():
            if resource.kind == "Pod":
                self._pod_resource = resource  # per namespace, once translation says which (watch_pods)
                continue
            scopes: Iterable[str | None] = (
                (None,) if not resource.namespaced or not self.namespaces else self.namespaces
            )
            for namespace in scopes:
                self.informers.append(
                    informers.Informer(
                        self.api,
                        resource,
                        namespace,
                        self._on_events,
                        transform=slim,
                        resync=self.resync,
                        metrics=self.metrics,
                    )
                )
        for inf in self.informers:
            thread = threading.Thread(target=inf.run, args=(self._stop,), name=f"informer-{inf.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def synced(self) -> bool:
        with self._lock:
            pods = [w.informer for w in self._pods.values()]
        return bool(self.informers) and all(i.synced.is_set() for i in (*self.informers, *pods))

    # -- Pods, per namespace

    def pod_scope(self, needed: Iterable[str]) -> frozenset[str]:
        """The namespaces to watch Pods in: those translation reads, within --namespace when that is given."""
        wanted = frozenset(needed)
        return wanted & frozenset(self.namespaces) if self.namespaces else wanted

    @property
    def pod_namespaces(self) -> frozenset[str]:
        """The namespaces whose Pods are watched now."""
        with self._lock:
            return frozenset(self._pods)

    def pod_bound(self) -> frozenset[str]:
        """Before the first translation: the namespaces whose Pods it may read, from the InternalGateways and
        DestinationRules listed so far (a superset; the translation itself says which exactly)."""
        with self._lock:
            objects = [
                item.obj
                for item in self._pending.values()
                if isinstance(item, Parsed) and item.ref.kind in _BOUND_KINDS
            ]
        return pod_namespace_bound(objects)

    def pod_informers(self) -> dict[str, informers.Informer]:
        with self._lock:
            return {ns: w.informer for ns, w in sorted(self._pods.items())}

    def watch_pods(self, namespaces: frozenset[str]) -> list[informers.Informer]:
        """Watch Pods in exactly `namespaces`: start an informer for each one not watched, stop those no longer
        in it. Returns the started informers; the caller waits for their lists before publishing what needs them.
        Blocking only when a namespace comes back while its old informer is still stopping: the old one's
        deletions must be queued before the new one's list, or they would delete what it lists."""
        with self._watching:
            if self._pod_resource is None or self._stop.is_set():
                return []
            return self._watch_pods(namespaces)

    def _watch_pods(self, namespaces: frozenset[str]) -> list[informers.Informer]:
        for namespace in sorted(self.pod_namespaces - namespaces):
            self._retire(namespace)
        started = []
        for namespace in sorted(namespaces - self.pod_namespaces):
            retiring = self._retiring.pop(namespace, None)
            if retiring is not None:
                retiring.join()
            inf = informers.Informer(
                self._pods_api(),
                self._pod_resource,
                namespace,
                self._on_events,
                transform=slim,
                resync=self.resync,
                metrics=self.metrics,
                # Pods only matter once they have an address; the rest is churn (pending, scheduling)
                field_selector="status.phase=Running",
            )
            stop = threading.Event()
            thread = threading.Thread(target=inf.run, args=(stop,), name=f"informer-{inf.name}", daemon=True)
            with self._lock:
                self._pods[namespace] = _PodWatch(inf, stop, thread)
            thread.start()
            started.append(inf)
            log.info("watching Pods in namespace %s: translation reads them", namespace)
        for namespace in [ns for ns, t in self._retiring.items() if not t.is_alive()]:
            del self._retiring[namespace]
        return started

    def _pods_api(self) -> Any:
        """The API client of the Pod informers: the controller's configuration, its own connection pool."""
        if self._pod_api is None:
            from kubernetes import client  # noqa: PLC0415

            configuration = copy.copy(self.api.configuration)
            configuration.connection_pool_maxsize = _POD_POOL
            self._pod_api = client.ApiClient(configuration)
        return self._pod_api

    def _retire(self, namespace: str) -> None:
        with self._lock:
            watch = self._pods.pop(namespace)
        watch.stop.set()
        thread = threading.Thread(
            target=self._forget_pods,
            args=(namespace, watch),
            name=f"informer-{watch.informer.name}-retire",
            daemon=True,
        )
        self._retiring[namespace] = thread
        thread.start()

    def _forget_pods(self, namespace: str, watch: _PodWatch) -> None:
        """Once a stopped Pod informer has returned, delete what it delivered: the snapshot keeps nothing that
        no informer keeps current."""
        watch.thread.join(_RETIRE_JOIN)
        if watch.thread.is_alive():
            log.error("%s did not stop within %.0f s; forgetting its Pods anyway", watch.informer.name, _RETIRE_JOIN)
        gone = [ObjectRef("Pod", namespace, name) for name in watch.informer.delivered()]
        log.info("stopped watching Pods in namespace %s: nothing reads them; %d forgotten", namespace, len(gone))
        if gone:
            with self._lock:
                self._pending.update((ref, ref) for ref in gone)
            self.wake()

    # -- events

    def _on_events(self, events: list[informers.Event]) -> None:
        """Informer threads: parse here (off the event loop) and keep only the latest change per object."""
        changes: list[tuple[ObjectRef, Parsed | ObjectRef]] = []
        for event in events:
            ref = ref_of(event.obj)
            if ref is None:
                continue
            if event.type == "DELETED":
                changes.append((ref, ref))
            else:
                parsed = parse_object(event.obj)
                if parsed is not None:
                    changes.append((ref, parsed))
        if not changes:
            return
        with self._lock:
            self._pending.update(changes)
        self.wake()

    def take(self) -> list[Parsed | ObjectRef]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return list(pending.values())

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._watching, self._lock:
            pods = list(self._pods.values())
        for watch in pods:
            watch.stop.set()
        for thread in [*self._threads, *(w.thread for w in pods), *self._retiring.values()]:
            thread.join(timeout)
        if self._pod_api is not None:
            self._pod_api.close()


class _PodInformerCollector:
    """Per-namespace Pod informer metrics, read at scrape time (informers come and go with the namespaces)."""

    def __init__(self, source: KubeSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

        watched = self.source.pod_informers()
        count = GaugeMetricFamily(
            "canal_controller_pod_namespaces", "Namespaces whose Pods are watched (translation reads them)"
        )
        count.add_metric([], len(watched))
        synced = GaugeMetricFamily(
            "canal_controller_pod_informer_synced", "1 once the namespace's Pods were listed", labels=["namespace"]
        )
        pods = GaugeMetricFamily(
            "canal_controller_pod_informer_pods", "Running Pods delivered from the namespace", labels=["namespace"]
        )
        for namespace, inf in watched.items():
            synced.add_metric([namespace], 1.0 if inf.synced.is_set() else 0.0)
            pods.add_metric([namespace], inf.count)
        yield from (count, synced, pods)


@dataclass
class DnsProgress:
    """The CoreDNS writer's view: what was written and whether the cluster DNS answers it yet."""

    written: Mapping[str, DnsRecord] = field(default_factory=dict)
    verified: dict[str, DnsView] = field(default_factory=dict)  # by gateway
    error: str = ""


class Controller:
    def __init__(self, api: Any, options: ControllerOptions) -> None:
        from kubernetes import client  # noqa: PLC0415 - kubernetes imports slowly; only the controller needs it

        self.api = api
        self.options = options
        self.serving = Serving(
            ServingOptions(
                options.xds_address,
                options.metrics_address,
                0.0,
                0.0,
                options.dns_address,
                options.dns_upstreams,
                options.dns_forward,
                options.drain_grace,
            ),
            ready=self.ready,
            status=self.status,
            on_publish=self._published,
        )
        self.translator = Translator()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.source = KubeSource(api, options.namespaces, options.resync, self._wake, self.serving.registry)
        self.elector: Any = None
        self.status_writer = StatusWriter(client.CustomObjectsApi(api), self.is_leader)
        self.events = EventRecorder(client.CoreV1Api(api), self.is_leader, host=options.identity)
        self.dns_progress = DnsProgress()
        self.corefile: Any = None
        if options.coredns is not None:
            from canal.dns import coredns  # noqa: PLC0415
            from canal.dns.corefile import render_corefile, strip_canal_block  # noqa: PLC0415

            self.corefile = coredns.CorefileWriter(
                client.CoreV1Api(api),
                functools.partial(render_corefile, cluster_domain=options.cluster_domain),
                options.coredns,
                strip=strip_canal_block,
                metrics=coredns.CorednsMetrics(self.serving.registry),
            )
        self.translations = 0
        self._ready = False
        self._stop = asyncio.Event()
        self._status_due = asyncio.Event()
        self._dns_due = asyncio.Event()
        self._published_state = DesiredState()

    # ------------------------------------------------------------------------------------------ leadership

    def is_leader(self) -> bool:
        if self.options.lease is None:
            return True  # no election: the only replica
        return self.elector is not None and bool(self.elector.is_leader)

    def _start_elector(self) -> None:
        if self.options.lease is None:
            return
        from canal.kube.leader import LeaderElector  # noqa: PLC0415

        namespace, name = self.options.lease
        self.elector = LeaderElector(
            self.api,
            namespace,
            name,
            self.options.identity,
            lease_duration=self.options.lease_duration,
            renew_deadline=self.options.renew_deadline,
            retry_period=self.options.retry_period,
            on_started_leading=self._became_leader,
            on_stopped_leading=lambda: log.warning("lost leadership: status, Events and CoreDNS writes stop"),
            registry=self.serving.registry,
        )
        thread = threading.Thread(target=self.elector.run, args=(self.source._stop,), name="leader", daemon=True)
        thread.start()

    def _became_leader(self) -> None:
        log.info("leading (%s): writing status, Events and CoreDNS", self.options.identity)
        self.status_writer.forget()  # another leader may have written meanwhile: read before writing
        self.dns_progress.written = {}
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._status_due.set)
            self._loop.call_soon_threadsafe(self._dns_due.set)

    # ------------------------------------------------------------------------------------------ probes

    def ready(self) -> bool:
        """Listed and translated once; it stays so: Pods of a namespace needed later are not a reason to take a
        serving replica out of its Service while they are listed."""
        if not self._ready:
            self._ready = self.source.synced() and self.translations > 0
        return self._ready

    def status(self) -> dict[str, Any]:
        return {
            "controller": {
                "leader": self.is_leader(),
                "identity": self.options.identity,
                "istioVersion": self.source.istio_version,
                "synced": self.source.synced(),
                "podNamespaces": {
                    namespace: {"synced": inf.synced.is_set(), "pods": inf.count}
                    for namespace, inf in self.source.pod_informers().items()
                },
                "translations": self.translations,
                "statusWrites": self.status_writer.writes,
                "events": self.events.sent,
                "dnsError": self.dns_progress.error or None,
            }
        }

    # ------------------------------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _translate_loop(self) -> None:
        last_translation = -math.inf
        while True:
            await self._wakeup.wait()
            woke = time.monotonic()
            # An isolated change (the last translation is a quiet period old) is translated at once; one that
            # follows a translation closely is part of a burst, which is folded until it goes quiet.
            if woke - last_translation < self.options.quiet:
                await self._fold_burst(woke)
            self._wakeup.clear()
            previous = self.translator.desired
            state = self.translator.apply(self.source.take())
            if state is previous and self.translations:
                continue  # nothing the translator reads changed (a status write, a resync): not a translation
            state = await self._follow_pods(_SYNC_TIMEOUT if not self.translations else self.options.pod_sync_timeout)
            self.translations += 1
            last_translation = time.monotonic()
            self.serving.submit(state)
            self._status_due.set()

    async def _follow_pods(self, timeout: float) -> DesiredState:
        """Watch Pods where the translated state reads them. A namespace needed for the first time is listed and
        translated before anything is published (at most `timeout`), so the first state with a new subset
        cluster already has its endpoints; one no longer needed is stopped, and its Pods are forgotten in a
        later batch (nothing reads them meanwhile, so that changes no output)."""
        for _ in range(_POD_ROUNDS):
            wanted = self.source.pod_scope(self.translator.pod_namespaces())
            if wanted == self.source.pod_namespaces:
                return self.translator.desired
            started = await asyncio.to_thread(self.source.watch_pods, wanted)
            if not started:
                return self.translator.desired
            await self._await_listed(started, timeout)
            self._wakeup.clear()  # what is taken now needs no wakeup; anything later sets it again
            self.translator.apply(self.source.take())
        wanted = self.source.pod_scope(self.translator.pod_namespaces())
        if wanted != self.source.pod_namespaces:
            missing = ", ".join(sorted(wanted - self.source.pod_namespaces)) or "-"
            log.warning("Pods of %s: needs still changing after %d rounds; publishing first", missing, _POD_ROUNDS)
            await asyncio.to_thread(self.source.watch_pods, wanted)  # their lists wake the loop when they arrive
        return self.translator.desired

    async def _await_listed(self, started: list[informers.Informer], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(i.synced.is_set() for i in started):
            if time.monotonic() >= deadline or self._stop.is_set():
                late = [i for i in started if not i.synced.is_set()]
                errors = "; ".join(i.last_error for i in late if i.last_error) or "no error yet"
                log.warning(
                    "Pods in namespace(s) %s not listed within %.0f s (%s): publishing without them; their "
                    "gateway pods and subset endpoints follow once the list arrives",
                    ", ".join(str(i.namespace) for i in late),
                    timeout,
                    errors,
                )
                self.source.pod_sync_timeouts.inc()
                return
            await asyncio.sleep(0.005)

    async def _fold_burst(self, started: float) -> None:
        """Wait for a quiet period with no new events, at most max_delay after the burst's first event."""
        while True:
            self._wakeup.clear()
            remaining = self.options.max_delay - (time.monotonic() - started)
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), min(self.options.quiet, remaining))
            except TimeoutError:
                return

    def _published(self, state: DesiredState) -> None:
        self._published_state = state
        self._dns_due.set()
        self._status_due.set()

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), self.options.status_interval)
            self._status_due.clear()
            if not self.is_leader() or not self.translations:
                continue
            try:
                await asyncio.to_thread(self.write_status, self._published_state)
            except Exception as error:
                log.warning("status: %s", error)

    async def _dns_loop(self) -> None:
        while True:
            await self._dns_due.wait()
            self._dns_due.clear()
            if self.corefile is None or not self.is_leader():
                continue
            records = {n: r for n, r in self._published_state.dns.items() if r.mode == "coredns"}
            if records == self.dns_progress.written:
                continue
            await asyncio.to_thread(self._write_corefile, records)
            self._status_due.set()

    def _write_corefile(self, records: Mapping[str, DnsRecord]) -> None:
        from canal.dns import coredns  # noqa: PLC0415

        progress = self.dns_progress
        try:
            result = self.corefile.apply(records)
        except coredns.CorednsError as error:
            progress.error = str(error)
            for gateway in {r.gateway for r in records.values()}:
                progress.verified[gateway] = DnsView("coredns", False, "CorefileNotWritten", str(error))
            log.error("CoreDNS: %s", error)
            return
        progress.error = ""
        progress.written = dict(records)
        by_gateway: dict[str, list[DnsRecord]] = {}
        for record in records.values():
            by_gateway.setdefault(record.gateway, []).append(record)
        for gateway, owned in by_gateway.items():
            if self.options.dns_verify is None:
                message = f"{len(owned)} name(s) in the Corefile (not verified: no --dns-verify address)"
                progress.verified[gateway] = DnsView("coredns", True, "Written", message)
                continue
            sample = min(owned, key=lambda r: r.fqdn)
            outcome = coredns.verify(
                sample.fqdn,
                sample.addresses,
                f"{self.options.dns_verify[0]}:{self.options.dns_verify[1]}",
                deadline=self.options.dns_verify_timeout,
                since=result.written_at,
                metrics=self.corefile.metrics,
            )
            progress.verified[gateway] = DnsView("coredns", outcome.ok, outcome.reason, outcome.message)

    # ------------------------------------------------------------------------------------------ status

    def _fleet(self, xds: Mapping[str, Any], group: str) -> FleetView:
        proxies = xds.get(group, {}).get("proxies", [])
        nacks = tuple(
            Nack(p["node"], kind, message) for p in proxies for kind, message in sorted(p.get("errors", {}).items())
        )
        return FleetView(len(proxies), sum(1 for p in proxies if p["converged"]), nacks)

    def _dns_view(self, gateway: str, mode: str, state: DesiredState) -> DnsView:
        if mode == "none":
            return DnsView("none")
        names = sum(1 for r in state.dns.values() if r.gateway == gateway)
        if mode == "server":
            dns = self.serving.dns
            if dns is None:
                return DnsView("server", False, "NoDnsServer", "dns.mode is server but --dns-address is not set")
            return DnsView("server", True, "Serving", f"{names} name(s) served by Canal's DNS server")
        if self.corefile is None:
            return DnsView("coredns", False, "NotManaged", "CoreDNS is not managed by this controller (--no-coredns)")
        if names == 0:
            return DnsView("coredns", True, "NoNames", "no names to rewrite")
        return self.dns_progress.verified.get(gateway, DnsView("coredns", None, "Pending", "Corefile not written yet"))

    def write_status(self, state: DesiredState) -> None:
        """Blocking (runs in a thread): one status document per InternalGateway, Events for new problems."""
        xds = self.serving.server.status()
        nodes = self._fleet(xds, NODE_AGENT_GROUP)
        notices: list[Notice] = [
            Notice(r.ref, "Rejected", f"{r.field or '<object>'}: {r.reason}") for r in state.rejections()
        ]
        at = now()
        for ref, translated in state.status.items():
            if ref.kind != "InternalGateway":
                continue
            group = f"{ref.namespace}/{ref.name}"
            gateway = self.translator_gateway(ref)
            proxies = self._fleet(xds, group)
            notices.extend(
                Notice(ref, "ConfigRejected", f"{n.node} rejected {n.type}: {n.message}") for n in proxies.nacks
            )
            rejections = self._rejections_of(state, ref, translated.rejected)
            dns = self._dns_view(group, gateway.get("dns_mode", "coredns"), state)
            redirect_mode = gateway.get("redirect_mode", "nftables")
            self.status_writer.write(
                ref,
                lambda previous, t=translated, p=proxies, d=dns, m=redirect_mode, rj=rejections: gateway_status(
                    t, p, nodes, d, m, rj, previous, at
                ),
            )
        self.events.sync(notices)

    def translator_gateway(self, ref: ObjectRef) -> dict[str, str]:
        ig = self.translator.snapshot.get("InternalGateway", ref.namespace, ref.name)
        if ig is None:
            return {}
        return {"dns_mode": ig.dns_mode, "redirect_mode": ig.redirect_mode}

    @staticmethod
    def _rejections_of(state: DesiredState, ref: ObjectRef, rejected: Iterable[str]) -> list[Rejection]:
        out = list(state.status[ref].rejections)
        for name in rejected:
            namespace, _, short = name.partition("/")
            other = state.status.get(ObjectRef("VirtualService", namespace, short))
            if other is not None:
                out.extend(other.rejections)
        return out

    # ------------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.source.start()
        self._start_elector()
        self._wakeup.set()  # the first translation, even of an empty cluster, once the lists arrive
        deadline = time.monotonic() + _SYNC_TIMEOUT
        await self._prefetch_pods(deadline)
        while not self.source.synced() and time.monotonic() < deadline and not self._stop.is_set():
            await asyncio.sleep(0.05)  # serve only complete lists: never a partial state to the proxies
        tasks = [
            asyncio.create_task(self._translate_loop()),
            asyncio.create_task(self._status_loop()),
            asyncio.create_task(self._dns_loop()),
        ]
        await self._first_translation()
        await self.serving.start()
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.source.stop()
            await self.serving.close()

    async def _prefetch_pods(self, deadline: float) -> None:
        """List Pods alongside the other kinds rather than after the first translation: once the InternalGateways
        and DestinationRules (few) are listed, watch Pods where they may be read. The first translation then has
        them, and `_follow_pods` narrows the set to what it really reads."""
        few = [i for i in self.source.informers if i.resource.kind in _BOUND_KINDS]
        while not all(i.synced.is_set() for i in few):
            if time.monotonic() >= deadline or self._stop.is_set():
                return  # the first translation finds the namespaces itself
            await asyncio.sleep(0.01)
        bound = self.source.pod_scope(self.source.pod_bound())
        await asyncio.to_thread(self.source.watch_pods, bound)

    async def _first_translation(self) -> None:
        while not self.translations and not self._stop.is_set():
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


async def serve(api: Any, options: ControllerOptions) -> None:
    controller = Controller(api, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stop)
    await controller.run()
