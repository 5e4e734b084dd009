"""`canal migrate`: take a namespace off Istio's sidecars only once the gateway already carries its traffic.

Labelling a namespace ``istio-injection=disabled`` by hand is safe only if every Service there that has traffic is
served by a programmed gateway; otherwise the restarted pods lose their routes. So the labelling is guarded.

Functional core (pure, over Kubernetes-style dicts): ``preflight`` translates the cluster's objects with the
controller's own translator and checks every Service in the namespace with ready endpoints is migrated (a DNS
record or redirect rule of some InternalGateway) by a gateway whose status says Programmed, DNSProgrammed and
NodesProgrammed for its current generation, and (``policy_findings``) names the Istio security policies that only
the sidecars enforce and that lapse with them; ``plan_migration`` / ``plan_rollback`` compute the namespace label
change (the previous labels are saved in an annotation so a rollback restores them exactly); ``find_workloads``,
``migration_restarts`` / ``rollback_restarts`` and ``rollout_status`` decide what to roll and when it is done.
Imperative shell: ``KubeCluster`` (the API calls) and ``run_migrate`` / ``run_rollback`` (print every step, restart
in batches, wait for readiness, stop at the first failure).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from canal.desired import DesiredState
from canal.model.base import ObjectRef
from canal.model.kube import Service
from canal.snapshot import Snapshot
from canal.translate import translate

INJECTION_LABEL = "istio-injection"
REVISION_LABEL = "istio.io/rev"  # a revision label enables injection too (unless istio-injection is set)
SAVED_ANNOTATION = "canal.io/migrated-from-istio-injection"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
SIDECAR_STATUS = "sidecar.istio.io/status"  # written on every pod the injector changed
SIDECAR_INJECT = "sidecar.istio.io/inject"
PROXY_CONTAINER = "istio-proxy"
SAVED_LABELS = (INJECTION_LABEL, REVISION_LABEL)
REQUIRED_CONDITIONS = ("Programmed", "DNSProgrammed", "NodesProgrammed")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
_ROUTING_KINDS = frozenset({"VirtualService", "DestinationRule"})
# Istio's security policies: enforced by the sidecars, so they lapse with them (see ``policy_findings``).
SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")  # Istio 1.22+ serves v1, older releases v1beta1
AUTHORIZATION_POLICY, PEER_AUTHENTICATION, REQUEST_AUTHENTICATION = (
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
)
POLICY_KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION, REQUEST_AUTHENTICATION)
POLICY_PLURALS = {
    AUTHORIZATION_POLICY: "authorizationpolicies",
    PEER_AUTHENTICATION: "peerauthentications",
    REQUEST_AUTHENTICATION: "requestauthentications",
}
DEFAULT_ROOT_NAMESPACE = "istio-system"  # Istio's meshConfig.rootNamespace default
ACCEPT_FLAG = "--accept-unenforced-policies"

OK, SKIP, WARN, REFUSE = "ok", "skip", "warning", "refused"

Obj = Mapping[str, Any]
Echo = Callable[..., None]


class PlanError(ValueError):
    """The namespace cannot be changed as asked (e.g. a saved annotation Canal cannot read)."""


class ClusterError(Exception):
    """An API call failed; the message names the object and what the API server said."""


class NotFound(ClusterError):
    """404."""


class ConflictError(ClusterError):
    """409: the object changed since it was read."""


# ------------------------------------------------------------------------------------------------- helpers


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _of_kind(objects: Iterable[Obj], kind: str, namespace: str | None = None) -> list[Obj]:
    return [
        o
        for o in objects
        if o.get("kind") == kind and (namespace is None or _meta(o).get("namespace", "default") == namespace)
    ]


def _labels(obj: Obj) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(_meta(obj).get("labels")).items()}


def _shown(value: str | None) -> str:
    return "not set" if value is None else value


# ---------------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True, slots=True)
class Finding:
    """One preflight result: ``level`` ok, skip, warning or refused (only refused blocks the migration)."""

    level: str
    subject: str  # the object it is about, e.g. "Service default/web"
    reason: str

    @property
    def blocking(self) -> bool:
        return self.level == REFUSE

    def __str__(self) -> str:
        return f"{self.level}: {self.subject}: {self.reason}"


def _owners(state: DesiredState) -> dict[tuple[str, str], str]:
    """(namespace, name) of every migrated Service -> the InternalGateway owning it: its DNS record, or with
    dns.mode none its ClusterIP redirects (either one steers its clients to the gateway)."""
    out: dict[tuple[str, str], str] = {}
    for fqdn, record in state.dns.items():
        parts = fqdn.split(".")
        if len(parts) > 3 and parts[2] == "svc":
            out[(parts[1], parts[0])] = record.gateway
    for rule in state.redirects.values():
        namespace, _, name = rule.service.partition("/")
        out.setdefault((namespace, name), rule.gateway)
    return out


def _mentions(service: Service) -> re.Pattern[str]:
    """A message about this Service: its FQDN, or "Service <namespace>/<name>"."""
    name, namespace = re.escape(service.meta.name), re.escape(service.meta.namespace)
    return re.compile(rf"(?<![-a-z0-9.]){name}\.{namespace}\.svc\.|\bService {namespace}/{name}(?![-a-z0-9.])")


def _why_not_migrated(state: DesiredState, service: Service) -> str:
    """The translator's own words for why a Service stays direct, when it said any."""
    pattern = _mentions(service)
    reasons: set[str] = set()
    for status in state.status.values():
        for rejection in status.rejections:
            if pattern.search(rejection.reason):
                reasons.add(f"{rejection.ref}: {rejection.reason}")
        for caveat in status.caveats:
            if caveat.ref == service.ref or pattern.search(caveat.message):
                reasons.add(caveat.message if caveat.ref == service.ref else f"{caveat.ref}: {caveat.message}")
    if reasons:
        return "; ".join(sorted(reasons)[:3])
    return (
        "no VirtualService bound to an InternalGateway routes it and no InternalGateway's namespaceSelector "
        f"selects namespace {service.meta.namespace}"
    )


def _ready_endpoints(snapshot: Snapshot, service: Service) -> int:
    return sum(
        1
        for slc in snapshot.in_namespace("EndpointSlice", service.meta.namespace).values()
        if slc.service_name == service.meta.name
        for ep in slc.endpoints
        if ep.ready and ep.addresses
    )


def _gateway_findings(gateway: str, raw: Obj | None) -> list[Finding]:
    """Programmed, DNSProgrammed and NodesProgrammed True, each for the object's current generation."""
    subject = f"InternalGateway {gateway}"
    if raw is None:
        return [Finding(REFUSE, subject, "not found")]
    generation = _meta(raw).get("generation")
    status = _map(raw.get("status"))
    if not status:
        return [Finding(REFUSE, subject, "has no status yet: is `canal controller` running and leading?")]
    conditions = {c.get("type"): c for c in status.get("conditions") or () if isinstance(c, Mapping)}
    found = []
    for kind in REQUIRED_CONDITIONS:
        cond = conditions.get(kind)
        if cond is None:
            found.append(Finding(REFUSE, subject, f"{kind} is not reported in its status"))
        elif cond.get("status") != "True":
            detail = ": ".join(str(p) for p in (cond.get("reason"), cond.get("message")) if p)
            found.append(Finding(REFUSE, subject, f"{kind} is {cond.get('status', 'Unknown')} ({detail})"))
        elif cond.get("observedGeneration") != generation:
            found.append(
                Finding(
                    REFUSE,
                    subject,
                    f"{kind} is True but for generation {cond.get('observedGeneration')} and the object is at "
                    f"generation {generation}: a status for an older spec is not trusted (is the controller "
                    "catching up?)",
                )
            )
    if not found:
        found.append(Finding(OK, subject, f"{', '.join(REQUIRED_CONDITIONS)} are True (generation {generation})"))
    return found


def _routing_virtual_services(state: DesiredState, gateway: str, services: set[tuple[str, str]]) -> set[str]:
    """The VirtualServices (namespace/name) whose routes on this gateway serve these Services: from route names
    (``<ns>/<vs>/...``) on the Services' virtual hosts, and TCP proxies whose clusters are theirs."""
    config = state.envoy.get(gateway)
    if config is None:
        return set()
    out = set()
    for route_config in config.route_configs.values():
        for vkey, vhost in route_config.virtual_hosts.items():
            parts = vkey.split(".")
            if len(parts) < 3 or (parts[1], parts[0]) not in services:
                continue
            out.update("/".join(r.name.split("/")[:2]) for r in vhost.routes)
    for listener in config.listeners.values():
        if listener.tcp is None:
            continue
        for weight in listener.tcp.clusters:
            cluster = config.clusters.get(weight.cluster)
            if cluster is not None and tuple(cluster.service.split("/", 1)) in services:
                out.add("/".join(listener.tcp.source.split("/")[:2]))
    return {name for name in out if not name.startswith("namespace-default/")}


def _relabelled(objects: Sequence[Obj], namespace: str, labels: Mapping[str, str]) -> list[Obj]:
    out = []
    for obj in objects:
        if obj.get("kind") == "Namespace" and _meta(obj).get("name") == namespace:
            changed = copy.deepcopy(dict(obj))
            changed.setdefault("metadata", {})["labels"] = dict(labels)
            out.append(changed)
        else:
            out.append(obj)
    return out


def _namespace(objects: Iterable[Obj], namespace: str) -> Obj | None:
    return next((o for o in _of_kind(objects, "Namespace") if _meta(o).get("name") == namespace), None)


def preflight(
    namespace: str,
    objects: Iterable[Obj],
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    accept_unenforced_policies: bool = False,
) -> list[Finding]:
    """Whether the namespace's Services can lose their sidecars now. ``objects``: what the translator reads
    (InternalGateways with their status, Gateways, VirtualServices, DestinationRules, Services, EndpointSlices,
    Pods, Namespaces), as the API returns them, plus the namespace's workloads and the Istio security policies of
    the namespace and of ``root_namespace``; the gateways' status documents come from the InternalGateways.

    A Service with traffic (a ready endpoint) must be migrated by an InternalGateway (its DNS name or ClusterIP
    goes to the gateway) now and still once the namespace is relabelled (a namespaceSelector may read the labels),
    and that gateway's status must say it is programmed for its current spec. Headless, ExternalName and
    endpoint-less Services are skipped. Rejected objects in the namespace, or naming its Services, refuse, and so
    do the Istio security policies the sidecars enforce (``policy_findings``) unless they are accepted."""
    docs = list(objects)
    ns_obj = _namespace(docs, namespace)
    if ns_obj is None:
        return [Finding(REFUSE, f"Namespace {namespace}", "not found")]
    snapshot = Snapshot.from_dicts(docs)
    state = translate(snapshot)
    after = translate(Snapshot.from_dicts(_relabelled(docs, namespace, plan_migration(ns_obj).after)))
    owners, owners_after = _owners(state), _owners(after)
    findings: list[Finding] = []
    used: set[str] = set()
    routed: dict[str, set[tuple[str, str]]] = defaultdict(set)
    services = snapshot.in_namespace("Service", namespace)
    for name in sorted(services):
        service: Service = services[name]
        subject = f"Service {namespace}/{name}"
        key = (namespace, name)
        if service.type == "ExternalName":
            findings.append(Finding(SKIP, subject, "ExternalName: a DNS alias with no traffic of its own"))
            continue
        if not service.cluster_ips:
            findings.append(Finding(SKIP, subject, "headless: clients reach its pods directly; Canal does not move it"))
            continue
        ready = _ready_endpoints(snapshot, service)
        if not ready:
            findings.append(Finding(SKIP, subject, "no ready endpoints: no traffic to move"))
            continue
        gateway = owners.get(key)
        if gateway is None:
            why = _why_not_migrated(state, service)
            used.add(why)
            findings.append(Finding(REFUSE, subject, f"{ready} ready endpoint(s) but no gateway route: {why}"))
            continue
        if owners_after.get(key) != gateway:
            findings.append(
                Finding(
                    REFUSE,
                    subject,
                    f"labelling the namespace {INJECTION_LABEL}=disabled would take it off InternalGateway "
                    f"{gateway} (a namespaceSelector reads the label): {_why_not_migrated(after, service)}",
                )
            )
            continue
        routed[gateway].add(key)
        findings.append(Finding(OK, subject, f"{ready} ready endpoint(s), routed by InternalGateway {gateway}"))
    if not routed and not any(f.blocking for f in findings):
        findings.append(Finding(OK, f"Namespace {namespace}", "no Service with ready endpoints: nothing to route"))
    for ref in sorted(r for r in snapshot.problems if r.kind == "Service" and r.namespace == namespace):
        for rejection in snapshot.problems[ref].rejections:
            findings.append(Finding(REFUSE, str(ref), f"Canal cannot read it: {rejection.field}: {rejection.reason}"))
            used.add(rejection.reason)
    # Routing Canal rejects (even a mesh-only VirtualService's: without sidecars nothing would apply it), when it
    # lives in the namespace or names one of its Services.
    mentions = [_mentions(s) for s in services.values()]
    for rejection in state.rejections():
        if rejection.ref.kind == "Service" and rejection.ref.namespace == namespace:
            continue  # reported above
        here = rejection.ref.namespace == namespace and rejection.ref.kind in _ROUTING_KINDS
        if (here or any(p.search(rejection.reason) for p in mentions)) and not any(rejection.reason in u for u in used):
            findings.append(
                Finding(REFUSE, str(rejection.ref), f"rejected: {rejection.field or '<object>'}: {rejection.reason}")
            )
    for name in sorted(snapshot.in_namespace("VirtualService", namespace)):
        translated = state.status.get(ObjectRef("VirtualService", namespace, name))
        if translated is None or not translated.bound:
            findings.append(
                Finding(
                    WARN,
                    f"VirtualService {namespace}/{name}",
                    "is bound to no InternalGateway: only sidecars apply it, so this namespace's pods stop "
                    "following it once they have none",
                )
            )
    raw_gateways = {
        f"{_meta(o).get('namespace', 'default')}/{_meta(o).get('name')}": o for o in _of_kind(docs, "InternalGateway")
    }
    for gateway in sorted(routed):
        raw = raw_gateways.get(gateway)
        findings.extend(_gateway_findings(gateway, raw))
        status = _map(raw.get("status") if raw else None)
        if not status:
            continue  # refused above already
        bound = set(status.get("boundVirtualServices") or ())
        for vs in sorted(_routing_virtual_services(state, gateway, routed[gateway]) - bound):
            findings.append(
                Finding(
                    REFUSE,
                    f"VirtualService {vs}",
                    f"routes Services of {namespace} through InternalGateway {gateway}, but the gateway's status does "
                    "not list it as bound yet (the controller has not caught up)",
                )
            )
    findings.extend(policy_findings(namespace, docs, root_namespace, accept_unenforced_policies))
    return findings


# ---------------------------------------------------------------------------------------- the label change


@dataclass(frozen=True, slots=True)
class NamespaceChange:
    """A merge patch of the namespace's labels and annotations (None removes a key), and what it does in words."""

    namespace: str
    labels: Mapping[str, str | None]
    annotations: Mapping[str, str | None]
    steps: tuple[str, ...]
    after: Mapping[str, str]  # the namespace's labels once the change is made

    @property
    def empty(self) -> bool:
        return not self.labels and not self.annotations

    def patch(self, resource_version: str) -> dict[str, Any]:
        """The body; the resourceVersion read makes a concurrent edit a 409 instead of a lost update."""
        meta: dict[str, Any] = {"resourceVersion": resource_version}
        if self.labels:
            meta["labels"] = dict(self.labels)
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        return {"metadata": meta}


def _after(labels: Mapping[str, str], patch: Mapping[str, str | None]) -> dict[str, str]:
    out = dict(labels)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def plan_migration(namespace_obj: Obj) -> NamespaceChange:
    """``istio-injection=disabled`` and no ``istio.io/rev``; the labels as they were go into an annotation, once
    (a second migration keeps the first record, so a rollback returns to the state before Canal)."""
    name = str(_meta(namespace_obj).get("name", ""))
    labels = _labels(namespace_obj)
    annotations = _map(_meta(namespace_obj).get("annotations"))
    patch: dict[str, str | None] = {}
    steps = []
    if labels.get(INJECTION_LABEL) != "disabled":
        patch[INJECTION_LABEL] = "disabled"
        steps.append(f"label namespace {name} {INJECTION_LABEL}=disabled (was: {_shown(labels.get(INJECTION_LABEL))})")
    if REVISION_LABEL in labels:
        patch[REVISION_LABEL] = None
        steps.append(
            f"remove label {REVISION_LABEL}={labels[REVISION_LABEL]} from namespace {name} (it enables injection too)"
        )
    saved: dict[str, str | None] = {}
    if SAVED_ANNOTATION in annotations:
        if patch:
            steps.append(f"keep annotation {SAVED_ANNOTATION}: it already holds the labels from before Canal")
    elif patch:
        value = json.dumps({k: labels.get(k) for k in SAVED_LABELS}, sort_keys=True)
        saved[SAVED_ANNOTATION] = value
        steps.append(f"annotate namespace {name} {SAVED_ANNOTATION}={value} (what rollback restores)")
    if not patch:
        steps.append(f"namespace {name} already has {INJECTION_LABEL}=disabled and no {REVISION_LABEL}: unchanged")
    return NamespaceChange(name, patch, saved, tuple(steps), _after(labels, patch))


def plan_rollback(namespace_obj: Obj) -> NamespaceChange:
    """Put back the labels saved by ``plan_migration`` (set or absent, exactly) and drop the annotation."""
    name = str(_meta(namespace_obj).get("name", ""))
    labels = _labels(namespace_obj)
    raw = _map(_meta(namespace_obj).get("annotations")).get(SAVED_ANNOTATION)
    if raw is None:
        step = f"namespace {name} has no {SAVED_ANNOTATION} annotation (not migrated by Canal): labels left alone"
        return NamespaceChange(name, {}, {}, (step,), labels)
    try:
        saved = json.loads(raw)
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not all(v is None or isinstance(v, str) for v in saved.values()):
        raise PlanError(
            f"namespace {name}: annotation {SAVED_ANNOTATION} is not what Canal writes ({raw!r}); fix the labels by "
            "hand and remove it"
        )
    patch: dict[str, str | None] = {}
    steps = []
    for key in sorted(saved):
        value, now = saved[key], labels.get(key)
        if value == now:
            continue
        patch[key] = value
        if value is None:
            steps.append(f"remove label {key} from namespace {name} (was: {now}; not set before Canal)")
        else:
            steps.append(f"label namespace {name} {key}={value} (was: {_shown(now)})")
    if not patch:
        steps.append(f"namespace {name}: labels already as before Canal")
    steps.append(f"remove annotation {SAVED_ANNOTATION} from namespace {name}")
    return NamespaceChange(name, patch, {SAVED_ANNOTATION: None}, tuple(steps), _after(labels, patch))


# ------------------------------------------------------------------------------------------------ workloads


@dataclass(frozen=True, slots=True)
class Workload:
    """A Deployment, StatefulSet or DaemonSet and what its pods and pod template say about sidecars."""

    kind: str
    namespace: str
    name: str
    pods: int = 0
    sidecar_pods: int = 0
    template_sidecar: bool = False  # the template carries the injector's annotation
    template_proxy: bool = False  # the template itself has istio-proxy (istioctl kube-inject): a restart keeps it
    inject: str = ""  # the template's sidecar.istio.io/inject label (or annotation)
    revision: str = ""  # the template's istio.io/rev label
    held: str = ""  # why a restart would replace no pod (updateStrategy OnDelete, a paused Deployment)

    @property
    def has_sidecar(self) -> bool:
        return self.sidecar_pods > 0 or self.template_sidecar or self.template_proxy

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Inventory:
    workloads: tuple[Workload, ...]
    unmanaged: tuple[str, ...] = ()  # sidecar pods no Deployment, StatefulSet or DaemonSet owns (Jobs, bare pods)


def _has_proxy(pod_spec: Mapping[str, Any]) -> bool:
    containers = [*(pod_spec.get("containers") or ()), *(pod_spec.get("initContainers") or ())]  # native sidecars
    return any(isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER for c in containers)


def pod_has_sidecar(pod: Obj) -> bool:
    """The injector's status annotation, or an istio-proxy container (a regular or a native, init, sidecar)."""
    return SIDECAR_STATUS in _map(_meta(pod).get("annotations")) or _has_proxy(_map(pod.get("spec")))


_FINISHED = ("Succeeded", "Failed")


def _controller_of(obj: Obj) -> tuple[str, str] | None:
    refs = [r for r in _meta(obj).get("ownerReferences") or () if isinstance(r, Mapping)]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    return (str(ref.get("kind")), str(ref.get("name"))) if ref else None


def _live_pods(objects: Iterable[Obj], namespace: str) -> list[Obj]:
    return [p for p in _of_kind(objects, "Pod", namespace) if _map(p.get("status")).get("phase") not in _FINISHED]


def _workload_of(pod: Obj, replicasets: Mapping[str, Obj]) -> tuple[str, str] | None:
    """(kind, name) of the pod's controller, through its ReplicaSet to the Deployment; without the ReplicaSet,
    by the naming rule ``<deployment>-<pod-template-hash>``."""
    owner = _controller_of(pod)
    if owner is not None and owner[0] == "ReplicaSet":
        rs = replicasets.get(owner[1])
        parent = _controller_of(rs) if rs is not None else None
        digest = _labels(pod).get("pod-template-hash", "")
        if parent is None and rs is None and digest and owner[1].endswith(f"-{digest}"):
            parent = ("Deployment", owner[1][: -len(digest) - 1])
        owner = parent
    return owner


def find_workloads(namespace: str, objects: Iterable[Obj]) -> Inventory:
    """Every workload of the namespace, with its live pods (Pod -> ReplicaSet -> Deployment, or StatefulSet and
    DaemonSet directly) and its template. Without the ReplicaSet (not listed, already gone) a pod still finds its
    Deployment by the ReplicaSet naming rule ``<deployment>-<pod-template-hash>``. The template is evidence too,
    for workloads whose pods are not there to look at."""
    docs = list(objects)
    workloads = {(k, str(_meta(o).get("name"))): o for k in WORKLOAD_KINDS for o in _of_kind(docs, k, namespace)}
    replicasets = {str(_meta(o).get("name")): o for o in _of_kind(docs, "ReplicaSet", namespace)}
    pods: dict[tuple[str, str], int] = defaultdict(int)
    sidecars: dict[tuple[str, str], int] = defaultdict(int)
    unmanaged = []
    for pod in _live_pods(docs, namespace):
        owner = _workload_of(pod, replicasets)
        sidecar = pod_has_sidecar(pod)
        if owner is None or owner not in workloads:
            if sidecar:
                unmanaged.append(f"Pod {namespace}/{_meta(pod).get('name')}")
            continue
        pods[owner] += 1
        sidecars[owner] += sidecar
    out = []
    for key in sorted(workloads, key=lambda k: (WORKLOAD_KINDS.index(k[0]), k[1])):
        obj = workloads[key]
        spec = _map(obj.get("spec"))
        template = _map(spec.get("template"))
        tmeta, tspec = _map(template.get("metadata")), _map(template.get("spec"))
        labels, annotations = _map(tmeta.get("labels")), _map(tmeta.get("annotations"))
        held = ""
        if key[0] != "Deployment" and _map(spec.get("updateStrategy")).get("type") == "OnDelete":
            held = "updateStrategy OnDelete: a restart replaces no pod; delete its pods to finish"
        elif key[0] == "Deployment" and spec.get("paused"):
            held = "paused: a restart replaces no pod until `kubectl rollout resume`"
        out.append(
            Workload(
                key[0],
                namespace,
                key[1],
                pods=pods[key],
                sidecar_pods=sidecars[key],
                template_sidecar=SIDECAR_STATUS in annotations,
                template_proxy=_has_proxy(tspec),
                inject=str(labels.get(SIDECAR_INJECT) or annotations.get(SIDECAR_INJECT) or ""),
                revision=str(labels.get(REVISION_LABEL) or ""),
                held=held,
            )
        )
    return Inventory(tuple(out), tuple(sorted(unmanaged)))


def injects(namespace_labels: Mapping[str, str], workload: Workload) -> bool:
    """Whether Istio's injector webhooks would give this workload's new pods a sidecar (Istio's selectors: the
    namespace label wins, then a namespace revision, then the pod's own opt-in)."""
    label = namespace_labels.get(INJECTION_LABEL)
    if label == "disabled" or workload.inject == "false":
        return False
    if label == "enabled":
        return True
    if label is None and REVISION_LABEL in namespace_labels:
        return True
    return label is None and (workload.inject == "true" or bool(workload.revision))


@dataclass(frozen=True, slots=True)
class RestartPlan:
    batches: tuple[tuple[Workload, ...], ...]
    notes: tuple[Finding, ...] = ()  # workloads left alone, and why

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return tuple(w for b in self.batches for w in b)


def _batched(chosen: list[Workload], batch: int) -> tuple[tuple[Workload, ...], ...]:
    if batch < 1:
        raise PlanError("--batch must be at least 1")
    return tuple(tuple(chosen[i : i + batch]) for i in range(0, len(chosen), batch))


def migration_restarts(inventory: Inventory, batch: int) -> RestartPlan:
    """The sidecar-injected workloads, ``batch`` at a time; those a restart cannot fix are named instead."""
    chosen, notes = [], []
    for workload in inventory.workloads:
        if not workload.has_sidecar:
            continue
        if workload.template_proxy:
            notes.append(
                Finding(
                    WARN,
                    str(workload),
                    "its pod template itself contains istio-proxy (istioctl kube-inject?): a restart keeps the "
                    "sidecar; re-apply it without the injected container",
                )
            )
        elif workload.held:
            notes.append(Finding(WARN, str(workload), workload.held))
        else:
            chosen.append(workload)
    notes.extend(
        Finding(WARN, pod, "has a sidecar and no Deployment, StatefulSet or DaemonSet to restart: recreate it")
        for pod in inventory.unmanaged
    )
    return RestartPlan(_batched(chosen, batch), tuple(notes))


def rollback_restarts(inventory: Inventory, namespace_labels: Mapping[str, str], batch: int) -> RestartPlan:
    """The workloads whose running pods have no sidecar but would get one from the injector now."""
    chosen, notes = [], []
    for workload in inventory.workloads:
        if workload.has_sidecar or workload.pods == 0 or not injects(namespace_labels, workload):
            continue
        if workload.held:
            notes.append(Finding(WARN, str(workload), workload.held))
        else:
            chosen.append(workload)
    return RestartPlan(_batched(chosen, batch), tuple(notes))


@dataclass(frozen=True, slots=True)
class Rollout:
    done: bool
    message: str
    failed: str = ""  # non-empty: it will not become ready by waiting


def rollout_status(obj: Obj) -> Rollout:
    """`kubectl rollout status` for one workload: the controller saw the current spec, and every replica is
    updated and ready (Deployments: available, with no old replica left)."""
    kind, meta = obj.get("kind"), _meta(obj)
    spec, status = _map(obj.get("spec")), _map(obj.get("status"))
    generation, observed = _int(meta.get("generation")), _int(status.get("observedGeneration"))
    if observed < generation:
        return Rollout(False, f"its controller has observed generation {observed} of {generation}")
    ready, updated = _int(status.get("readyReplicas")), _int(status.get("updatedReplicas"))
    if kind == "Deployment":
        for cond in status.get("conditions") or ():
            if isinstance(cond, Mapping) and cond.get("reason") == "ProgressDeadlineExceeded":
                return Rollout(False, str(cond.get("message", "")), "its progress deadline was exceeded")
        desired = _int(spec.get("replicas")) if "replicas" in spec else 1
        total, available = _int(status.get("replicas")), _int(status.get("availableReplicas"))
        message = f"{updated}/{desired} updated, {ready}/{desired} ready, {available}/{desired} available"
        if total > updated:
            message += f", {total - updated} old replica(s) terminating"
        done = updated >= desired and ready >= desired and available >= desired and total <= updated
        return Rollout(done, message)
    if kind == "StatefulSet":
        desired = _int(spec.get("replicas")) if "replicas" in spec else 1
        partition = _int(_map(_map(spec.get("updateStrategy")).get("rollingUpdate")).get("partition"))
        message = f"{updated}/{desired} updated, {ready}/{desired} ready"
        done = ready >= desired and updated >= desired - partition
        current, wanted = status.get("currentRevision"), status.get("updateRevision")
        if not partition and current and wanted and current != wanted:
            done = False
        return Rollout(done, message)
    desired = _int(status.get("desiredNumberScheduled"))  # DaemonSet
    updated, available = _int(status.get("updatedNumberScheduled")), _int(status.get("numberAvailable"))
    message = f"{updated}/{desired} updated, {available}/{desired} available"
    return Rollout(updated >= desired and available >= desired, message)


# ------------------------------------------------------------------------------------ Istio security policy
# Istio's security policies are enforced by the sidecar of each workload they select; Canal's gateway translates
# none of them. So once a namespace's pods lose their sidecars, every such policy selecting them silently stops
# applying: access rules (AuthorizationPolicy), required mutual TLS (PeerAuthentication STRICT) and JWT checks
# (RequestAuthentication). Preflight names each one; only an explicit flag accepts the loss.

_SHOWN_WORKLOADS = 5
Ports = frozenset[str] | None  # STRICT on these ports only, or (None) on every port
# What an AuthorizationPolicy's action stops doing without the sidecar. AUDIT only marks requests for an audit
# log and never allows or denies one, so losing it changes no access: a warning, never a refusal.
_LOST_ACTION = {
    "ALLOW": "requests no ALLOW policy matches are no longer denied",
    "DENY": "the requests it denies get through",
    "CUSTOM": "requests are no longer checked by its external authorizer",
    "AUDIT": "the requests it matches are no longer audited; AUDIT allows and denies nothing, so access is unchanged",
}


@dataclass(frozen=True, slots=True)
class Enforcer:
    """A workload of the namespace whose sidecar enforces Istio security policy now and that loses it with the
    migration. ``labels``: what Istio's workload selectors are matched against (its live sidecar pods' labels,
    and its pod template's for the pods it will start)."""

    name: str  # "Deployment shop/web", or "Pod shop/job-x" for a pod no Deployment/StatefulSet/DaemonSet owns
    labels: tuple[Mapping[str, str], ...]

    def selected_by(self, selector: Mapping[str, str] | None) -> bool:
        return any(_selects(selector, labels) for labels in self.labels)


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Istio's workload selector rule: every matchLabels pair present; no selector selects every workload."""
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def enforcers(namespace: str, objects: Iterable[Obj]) -> list[Enforcer]:
    """The namespace's workloads that have a sidecar (live pods with one, or the injector's mark on the template)
    and lose it to the label: those whose template itself holds istio-proxy keep theirs and are left out."""
    docs = list(objects)
    raw = {(k, str(_meta(o).get("name"))): o for k in WORKLOAD_KINDS for o in _of_kind(docs, k, namespace)}
    replicasets = {str(_meta(o).get("name")): o for o in _of_kind(docs, "ReplicaSet", namespace)}
    pod_labels: dict[tuple[str, str], list[Mapping[str, str]]] = defaultdict(list)
    out = []
    for pod in _live_pods(docs, namespace):
        if not pod_has_sidecar(pod):
            continue
        owner = _workload_of(pod, replicasets)
        if owner in raw:
            pod_labels[owner].append(_labels(pod))
        else:
            out.append(Enforcer(f"Pod {namespace}/{_meta(pod).get('name')}", (_labels(pod),)))
    inventory = {(w.kind, w.name): w for w in find_workloads(namespace, docs).workloads}
    for key, workload in inventory.items():
        if not workload.has_sidecar or workload.template_proxy:
            continue
        template = _map(_map(_map(raw[key].get("spec")).get("template")).get("metadata"))
        own = {str(k): str(v) for k, v in _map(template.get("labels")).items()}
        out.append(Enforcer(str(workload), (own, *pod_labels[key])))
    return sorted(out, key=lambda e: e.name)


def _policies(objects: Iterable[Obj], kind: str, namespaces: set[str]) -> list[Obj]:
    """The kind's policies in these namespaces, oldest first (Istio's tie-break between competing policies)."""
    found = [
        o
        for o in objects
        if o.get("kind") == kind
        and str(o.get("apiVersion", "")).rpartition("/")[0] == SECURITY_GROUP
        and _ns(o) in namespaces
    ]
    return sorted(found, key=lambda o: (str(_meta(o).get("creationTimestamp") or ""), _ref(o)))


def _ns(obj: Obj) -> str:
    return str(_meta(obj).get("namespace") or "default")


def _ref(policy: Obj) -> str:
    return f"{_ns(policy)}/{_meta(policy).get('name')}"


def _selector(policy: Obj) -> dict[str, str] | None:
    """spec.selector.matchLabels; None (or empty) selects the whole namespace, or the mesh from the root."""
    match = _map(_map(_map(policy.get("spec")).get("selector")).get("matchLabels"))
    return {str(k): str(v) for k, v in match.items()} or None


def _on_sidecars(policy: Obj) -> bool:
    """A policy with targetRef(s) binds to a Gateway or a waypoint, never to a sidecar: not this check's concern."""
    spec = _map(policy.get("spec"))
    return not spec.get("targetRef") and not spec.get("targetRefs")


def _mode(mtls: Any) -> str:
    mode = _map(mtls).get("mode")
    return str(mode).upper() if mode else "UNSET"


def _plural(count: int, one: str, many: str = "") -> str:
    return f"{count} {one}" if count == 1 else f"{count} {many or one + 's'}"


def _scope(policy: Obj, namespace: str, root: str) -> str:
    here = _ns(policy)
    return f"mesh-wide (root namespace {root}): " if here == root != namespace else ""


def _who(matched: Sequence[Enforcer], namespace: str) -> str:
    names = [e.name for e in matched]
    shown = ", ".join(names[:_SHOWN_WORKLOADS])
    if len(names) > _SHOWN_WORKLOADS:
        shown += f" and {len(names) - _SHOWN_WORKLOADS} more"
    return f"the sidecars of {_plural(len(names), 'workload')} in {namespace} ({shown})"


def _action(policy: Obj) -> str:
    return str(_map(policy.get("spec")).get("action") or "ALLOW").upper()


def _authorization_reason(policy: Obj, matched: Sequence[Enforcer], namespace: str, root: str) -> str:
    action = _action(policy)
    lost = _LOST_ACTION.get(action, f"its {action} action no longer applies")
    provider = _map(_map(policy.get("spec")).get("provider")).get("name")
    if action == "CUSTOM" and provider:
        lost += f" ({provider})"
    return (
        f"{_scope(policy, namespace, root)}{action} policy enforced by {_who(matched, namespace)}; without sidecars "
        f"it is no longer enforced: {lost} (Canal's gateway does not apply AuthorizationPolicy)"
    )


def _request_authentication_reason(policy: Obj, matched: Sequence[Enforcer], namespace: str, root: str) -> str:
    rules = _map(policy.get("spec")).get("jwtRules") or ()
    issuers = sorted({str(_map(r)["issuer"]) for r in rules if _map(r).get("issuer")})
    which = f" (issuer {', '.join(issuers)})" if issuers else ""
    return (
        f"{_scope(policy, namespace, root)}JWT validation{which} enforced by {_who(matched, namespace)}; without "
        "sidecars tokens are no longer validated: a request with an invalid or expired JWT is no longer rejected "
        "(Canal's gateway does not apply RequestAuthentication)"
    )


def _port_order(port: str) -> tuple[int, str]:
    return (int(port) if port.isdigit() else 1 << 16, port)


def _strict_sources(labels: Mapping[str, str], namespace: str, root: str, policies: Sequence[Obj]) -> dict[str, Ports]:
    """Which PeerAuthentication makes one pod's inbound mutual TLS STRICT, composed as Istio does: the oldest
    mesh-wide (root namespace, no selector), namespace-wide and matching workload policy (a selector outside the
    root namespace: Istio ignores selectors there), each overriding the one before unless its mode is UNSET;
    port-level modes only from the workload policy. Policy -> its STRICT ports (None: every port)."""
    mesh = next((p for p in policies if _ns(p) == root and not _selector(p)), None)
    local = [p for p in policies if _ns(p) == namespace != root]
    whole = next((p for p in local if not _selector(p)), None)
    workload = next((p for p in local if _selector(p) and _selects(_selector(p), labels)), None)
    mode, source = "PERMISSIVE", None
    for policy in (mesh, whole, workload):
        if policy is not None and _mode(_map(policy.get("spec")).get("mtls")) != "UNSET":
            mode, source = _mode(_map(policy.get("spec")).get("mtls")), policy
    if mode == "STRICT" and source is not None:
        return {_ref(source): None}
    if workload is None:
        return {}
    levels = _map(_map(workload.get("spec")).get("portLevelMtls"))
    ports = frozenset(str(port) for port, mtls in levels.items() if _mode(mtls) == "STRICT")
    return {_ref(workload): ports} if ports else {}


def _peer_authentication_reason(
    policy: Obj, matched: Sequence[Enforcer], ports: Sequence[str], namespace: str, root: str
) -> str:
    where = f" on {'port' if len(ports) == 1 else 'ports'} {', '.join(ports)}" if ports else ""
    return (
        f"{_scope(policy, namespace, root)}requires mutual TLS (STRICT){where} at {_who(matched, namespace)}; "
        "without sidecars they accept plaintext from any client and the requirement is silently no longer met "
        "(sidecar clients' auto mTLS falls back to plaintext for pods without a sidecar, and Canal's gateway "
        "sends plaintext)"
    )


def policy_findings(
    namespace: str, objects: Iterable[Obj], root_namespace: str = DEFAULT_ROOT_NAMESPACE, accept: bool = False
) -> list[Finding]:
    """The Istio security policies (security.istio.io, in ``namespace`` or mesh-wide in ``root_namespace``) that
    the sidecars of the namespace's workloads enforce and that stop being enforced without them, by kind, then
    namespace/name. Each refuses, or with ``accept`` is a warning; an AuthorizationPolicy with action AUDIT is
    always a warning. STRICT PeerAuthentication counts only where it is the effective mode (PERMISSIVE, DISABLE
    or a more specific policy overriding it is no loss)."""
    docs = list(objects)
    workloads = enforcers(namespace, docs)
    scope = {namespace, root_namespace}
    level = WARN if accept else REFUSE
    findings: list[Finding] = []
    for policy in _policies(docs, AUTHORIZATION_POLICY, scope):
        matched = [e for e in workloads if e.selected_by(_selector(policy))]
        if matched and _on_sidecars(policy):
            reason = _authorization_reason(policy, matched, namespace, root_namespace)
            findings.append(
                Finding(WARN if _action(policy) == "AUDIT" else level, f"{AUTHORIZATION_POLICY} {_ref(policy)}", reason)
            )
    peers = [p for p in _policies(docs, PEER_AUTHENTICATION, scope) if _on_sidecars(p)]
    strict: dict[str, dict[str, Ports]] = defaultdict(dict)  # policy -> workload -> its STRICT ports
    for workload in workloads:
        for labels in workload.labels:
            for ref, ports in _strict_sources(labels, namespace, root_namespace, peers).items():
                seen = strict[ref].get(workload.name, frozenset())
                strict[ref][workload.name] = None if seen is None or ports is None else seen | ports
    by_ref = {_ref(p): p for p in peers}
    for ref, per_workload in strict.items():
        matched = [e for e in workloads if e.name in per_workload]
        every = any(ports is None for ports in per_workload.values())
        ports = () if every else sorted(set().union(*(p for p in per_workload.values() if p)), key=_port_order)
        reason = _peer_authentication_reason(by_ref[ref], matched, ports, namespace, root_namespace)
        findings.append(Finding(level, f"{PEER_AUTHENTICATION} {ref}", reason))
    for policy in _policies(docs, REQUEST_AUTHENTICATION, scope):
        matched = [e for e in workloads if e.selected_by(_selector(policy))]
        if matched and _on_sidecars(policy):
            reason = _request_authentication_reason(policy, matched, namespace, root_namespace)
            findings.append(Finding(level, f"{REQUEST_AUTHENTICATION} {_ref(policy)}", reason))
    order = {kind: i for i, kind in enumerate(POLICY_KINDS)}
    return sorted(findings, key=lambda f: (order[f.subject.split(" ", 1)[0]], f.subject))


def is_policy_finding(finding: Finding) -> bool:
    """Whether a finding is about an Istio security policy (what the accept flag accepts)."""
    return finding.subject.split(" ", 1)[0] in POLICY_KINDS


# ------------------------------------------------------------------------------------------------ the shell


_PLURALS = {"Deployment": "deployment", "StatefulSet": "stateful_set", "DaemonSet": "daemon_set"}
_PAGE = 500


def _api_error(err: Any) -> str:
    detail = getattr(err, "reason", "") or ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):  # the Status message says more
        detail = json.loads(err.body or "{}").get("message") or detail
    return f"HTTP {getattr(err, 'status', '?')}: {detail}"


class KubeCluster:
    """The API calls `canal migrate` makes; everything is read as raw JSON, as the controller's informers do."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client  # noqa: PLC0415 - kubernetes imports slowly

        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _call(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415
        from urllib3.exceptions import HTTPError  # noqa: PLC0415

        try:
            return call(*args, **kwargs)
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"cannot {what}: not found") from err
            if err.status == 409:
                raise ConflictError(f"{what}: {_api_error(err)}") from err
            raise ClusterError(f"cannot {what}: {_api_error(err)}") from err
        except HTTPError as err:
            raise ClusterError(f"cannot {what}: the API server is unreachable ({err})") from err

    def _raw(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = self._call(what, call, *args, _preload_content=False, **kwargs)
        return json.loads(response.data)

    def _list(self, what: str, api_version: str, kind: str, call: Callable[..., Any], *args: Any) -> list[Obj]:
        """Every page; built-in lists leave apiVersion and kind out of their items, so they are put back."""
        items: list[Obj] = []
        token = ""
        while True:
            kwargs: dict[str, Any] = {"limit": _PAGE}
            if token:
                kwargs["_continue"] = token
            try:
                page = self._raw(f"list {what}", call, *args, **kwargs)
            except NotFound:
                raise ClusterError(f"cannot list {what}: not served by the API server") from None
            for item in page.get("items") or ():
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                items.append(item)
            token = _map(page.get("metadata")).get("continue") or ""
            if not token:
                return items

    def namespace(self, name: str) -> dict[str, Any] | None:
        try:
            obj = self._raw(f"read namespace {name}", self.core.read_namespace, name)
        except NotFound:
            return None
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", "Namespace")
        return obj

    def workload_objects(self, namespace: str) -> list[Obj]:
        """Pods, ReplicaSets, Deployments, StatefulSets and DaemonSets of the namespace."""
        out = self._list(f"pods in {namespace}", "v1", "Pod", self.core.list_namespaced_pod, namespace)
        for kind, call in (
            ("ReplicaSet", self.apps.list_namespaced_replica_set),
            ("Deployment", self.apps.list_namespaced_deployment),
            ("StatefulSet", self.apps.list_namespaced_stateful_set),
            ("DaemonSet", self.apps.list_namespaced_daemon_set),
        ):
            out += self._list(f"{kind}s in {namespace}", "apps/v1", kind, call, namespace)
        return out

    def security_policies(self, namespaces: Iterable[str]) -> list[Obj]:
        """The Istio security policies of these namespaces, each kind at the version the API server serves. A kind
        whose CRD is not installed (discovery answers 404) has none: nothing can be enforced by it."""
        from canal.kube import informer  # noqa: PLC0415

        out: list[Obj] = []
        for kind in POLICY_KINDS:
            wanted = informer.Resource(SECURITY_GROUP, SECURITY_VERSIONS[0], POLICY_PLURALS[kind], kind)
            try:
                found = informer.resolve(self.api, wanted, SECURITY_VERSIONS)
            except informer.NotInstalled:
                continue
            except informer.DiscoveryError as err:
                raise ClusterError(f"cannot check Istio security policies: {err}") from err
            for namespace in sorted(set(namespaces)):
                out += self._list(
                    f"{found.plural} in {namespace}",
                    found.api_version,
                    kind,
                    self.custom.list_namespaced_custom_object,
                    found.group,
                    found.version,
                    namespace,
                    found.plural,
                )
        return out

    def objects(self, namespace: str, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> list[Obj]:
        """What preflight translates (cluster-wide where a VirtualService or gateway elsewhere can matter), the
        namespace's workloads, and the Istio security policies that can select them (its own and the root
        namespace's)."""
        from canal.kube import informer  # noqa: PLC0415

        out: list[Obj] = []
        for resource in (
            informer.INTERNAL_GATEWAYS,
            informer.ISTIO_GATEWAYS,
            informer.VIRTUAL_SERVICES,
            informer.DESTINATION_RULES,
        ):
            try:
                found = informer.resolve(self.api, resource)
            except informer.DiscoveryError as err:
                raise ClusterError(str(err)) from err
            out += self._list(
                f"{found.kind}s",
                found.api_version,
                found.kind,
                self.custom.list_cluster_custom_object,
                found.group,
                found.version,
                found.plural,
            )
        gateway_namespaces = {_meta(o).get("namespace", "default") for o in _of_kind(out, "InternalGateway")}
        out += self._list("namespaces", "v1", "Namespace", self.core.list_namespace)
        out += self._list("services", "v1", "Service", self.core.list_service_for_all_namespaces)
        out += self._list(
            f"EndpointSlices in {namespace}",
            "discovery.k8s.io/v1",
            "EndpointSlice",
            self.discovery.list_namespaced_endpoint_slice,
            namespace,
        )
        for ns in sorted(gateway_namespaces - {namespace}):  # the gateway pods: redirect targets
            out += self._list(f"pods in {ns}", "v1", "Pod", self.core.list_namespaced_pod, ns)
        return out + self.workload_objects(namespace) + self.security_policies({namespace, root_namespace})

    def patch_namespace(self, name: str, body: Mapping[str, Any]) -> None:
        self._call(
            f"patch namespace {name}",
            self.core.patch_namespace,
            name,
            dict(body),
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )

    def restart(self, workload: Workload, at: str) -> None:
        """What `kubectl rollout restart` does: a new template annotation, so the controller replaces every pod."""
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}
        call = getattr(self.apps, f"patch_namespaced_{_PLURALS[workload.kind]}")
        try:
            self._call(
                f"restart {workload}",
                call,
                workload.name,
                workload.namespace,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        except NotFound:
            raise ClusterError(f"cannot restart {workload}: it no longer exists") from None

    def read(self, workload: Workload) -> dict[str, Any] | None:
        call = getattr(self.apps, f"read_namespaced_{_PLURALS[workload.kind]}")
        try:
            obj = self._raw(f"read {workload}", call, workload.name, workload.namespace)
        except NotFound:
            return None
        obj.setdefault("kind", workload.kind)
        return obj


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Options:
    dry_run: bool = False
    restart: bool = False
    batch: int = 1
    timeout: float = 300.0  # per batch
    poll: float = 2.0  # the longest pause between readiness checks (they start at 0.1 s and double)
    root_namespace: str = DEFAULT_ROOT_NAMESPACE  # Istio's: its security policies there apply mesh-wide
    accept_unenforced_policies: bool = False  # migrate although sidecar-enforced security policies lapse
    now: Callable[[], str] = field(default=_now)  # the restartedAt stamp


EXIT_OK, EXIT_FAILED = 0, 1


def _change_namespace(
    cluster: KubeCluster, name: str, plan: Callable[[Obj], NamespaceChange], dry_run: bool, echo: Echo
) -> NamespaceChange | None:
    """Plan against the namespace as read and patch with its resourceVersion; on a conflict read and plan again.
    Every step is printed before it is made. None when the namespace is gone."""
    printed: tuple[str, ...] = ()
    for _ in range(5):
        obj = cluster.namespace(name)
        if obj is None:
            echo(f"error: namespace {name} not found", err=True)
            return None
        change = plan(obj)
        if change.steps != printed:
            for step in change.steps:
                echo(f"dry run: {step}" if dry_run else step)
            printed = change.steps
        if change.empty or dry_run:
            return change
        try:
            cluster.patch_namespace(name, change.patch(str(_meta(obj).get("resourceVersion", ""))))
        except ConflictError:
            continue
        return change
    raise ClusterError(f"namespace {name} kept changing while Canal patched it; try again")


def _wait(cluster: KubeCluster, batch: Sequence[Workload], options: Options, echo: Echo) -> str:
    """Poll until every workload of the batch is rolled out; "" when they are, else what went wrong."""
    deadline = time.monotonic() + options.timeout
    pending = list(batch)
    said: dict[Workload, str] = {}
    pause = 0.1
    while True:
        for workload in list(pending):
            obj = cluster.read(workload)
            if obj is None:
                return f"{workload} was deleted while it rolled out"
            rollout = rollout_status(obj)
            if rollout.failed:
                return f"{workload} failed: {rollout.failed} ({rollout.message})"
            if rollout.done:
                echo(f"{workload}: ready ({rollout.message})")
                pending.remove(workload)
            elif said.get(workload) != rollout.message:
                echo(f"waiting for {workload}: {rollout.message}")
                said[workload] = rollout.message
        if not pending:
            return ""
        if time.monotonic() >= deadline:
            return "; ".join(
                f"{w} did not become ready within {options.timeout:g}s ({said.get(w, 'no status')})" for w in pending
            )
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, options.poll)


def _restart(cluster: KubeCluster, plan: RestartPlan, options: Options, echo: Echo) -> int:
    for note in plan.notes:
        echo(str(note))
    total = len(plan.batches)
    if not total:
        echo("nothing to restart")
        return EXIT_OK
    stamp = options.now()
    for index, batch in enumerate(plan.batches, 1):
        for workload in batch:
            step = f"restart {workload} (batch {index}/{total})"
            if options.dry_run:
                echo(f"dry run: {step}")
                continue
            echo(step)
            cluster.restart(workload, stamp)
        if options.dry_run:
            continue
        problem = _wait(cluster, batch, options, echo)
        if problem:
            echo(f"error: {problem}; stopped", err=True)
            left = [str(w) for b in plan.batches[index:] for w in b]
            if left:
                echo(f"not restarted: {', '.join(left)}", err=True)
            return EXIT_FAILED
    return EXIT_OK


def run_migrate(cluster: KubeCluster, namespace: str, options: Options, echo: Echo) -> int:
    """Preflight, then the label, then (``restart``) the sidecar-injected workloads in batches."""
    try:
        objects = cluster.objects(namespace, options.root_namespace)
        findings = preflight(
            namespace,
            objects,
            root_namespace=options.root_namespace,
            accept_unenforced_policies=options.accept_unenforced_policies,
        )
        echo(f"preflight for namespace {namespace}:")
        for finding in findings:
            echo(f"  {finding}")
        blocking = [f for f in findings if f.blocking]
        if blocking:
            echo(f"error: migration of {namespace} refused: {len(blocking)} problem(s); nothing changed", err=True)
            policies = sum(is_policy_finding(f) for f in blocking)
            if policies:
                echo(
                    f"{_plural(policies, 'Istio security policy', 'Istio security policies')} above would no longer "
                    f"be enforced; to migrate anyway, leaving them unenforced, rerun with {ACCEPT_FLAG}",
                    err=True,
                )
            return EXIT_FAILED
        lapsing = sum(is_policy_finding(f) for f in findings)
        if lapsing:
            policies = _plural(lapsing, "Istio security policy", "Istio security policies")
            echo(f"warning: continuing although {policies} will no longer be enforced in {namespace}")
        inventory = find_workloads(namespace, objects)
        plan = migration_restarts(inventory, options.batch)
        if _change_namespace(cluster, namespace, plan_migration, options.dry_run, echo) is None:
            return EXIT_FAILED
        if options.restart:
            status = _restart(cluster, plan, options, echo)
            if status != EXIT_OK:
                echo(f"namespace {namespace} stays labelled; rerun to continue, or `canal migrate rollback`", err=True)
                return status
        elif plan.workloads:
            names = ", ".join(str(w) for w in plan.workloads)
            echo(f"note: these keep their sidecars until restarted (rerun with --restart): {names}")
    except (ClusterError, PlanError) as err:
        echo(f"error: {err}", err=True)
        return EXIT_FAILED
    echo("dry run: nothing was changed" if options.dry_run else f"done: namespace {namespace} gets no new sidecars")
    return EXIT_OK


def run_rollback(cluster: KubeCluster, namespace: str, options: Options, echo: Echo) -> int:
    """Restore the saved labels; with ``restart``, roll the workloads that would now get a sidecar back."""
    try:
        change = _change_namespace(cluster, namespace, plan_rollback, options.dry_run, echo)
        if change is None:
            return EXIT_FAILED
        if options.restart:
            inventory = find_workloads(namespace, cluster.workload_objects(namespace))
            status = _restart(cluster, rollback_restarts(inventory, change.after, options.batch), options, echo)
            if status != EXIT_OK:
                return status
    except (ClusterError, PlanError) as err:
        echo(f"error: {err}", err=True)
        return EXIT_FAILED
    echo("dry run: nothing was changed" if options.dry_run else f"done: namespace {namespace} rolled back")
    return EXIT_OK
