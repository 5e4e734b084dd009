"""InternalGateway status: what the translator decided plus what the data plane did, as one status document.

The pure part, ``gateway_status``, combines the translator's ObjectStatus (Accepted, AddressResolved, ShardsReady,
RedirectReady, bound and rejected objects) with the runtime views (which gateway Envoys and node agents are
connected and have ACKed the current config, whether DNS answers the gateway) into the status the CRD declares
(charts/canal/crds). ``lastTransitionTime`` is carried over from the previous status while a condition's status is
unchanged, so rewriting the same facts is a no-op the writer can skip. The writer (``StatusWriter``) is the shell:
it writes through the status subresource, only when the document changed, with the resourceVersion it read
(a 409 means someone else wrote: read again and retry), and only while this replica leads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from canal.desired import Condition, ObjectStatus
from canal.model.base import ObjectRef, Rejection

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "canal.io", "v1alpha1", "internalgateways"
MESSAGE_LIMIT = 1024  # a condition message; Kubernetes allows 32 KiB, but status is for people


@dataclass(frozen=True, slots=True)
class Nack:
    node: str
    type: str  # lds, rds, cds, eds, redirect
    message: str


@dataclass(frozen=True, slots=True)
class FleetView:
    """The proxies of one xDS group (a gateway's Envoys, or the node agents) as the xDS server sees them."""

    connected: int = 0
    programmed: int = 0  # connected and ACKed the current snapshot
    nacks: tuple[Nack, ...] = ()


@dataclass(frozen=True, slots=True)
class DnsView:
    """Whether migrated names resolve to the gateway (from the CoreDNS writer's verification or Canal's server)."""

    mode: str  # coredns, server, none
    programmed: bool | None = None  # None: not known yet
    reason: str = ""
    message: str = ""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(cond: Condition, generation: int, previous: Mapping[str, Mapping[str, Any]], at: str) -> dict:
    before = previous.get(cond.type)
    since = before.get("lastTransitionTime") if before and before.get("status") == cond.status else None
    return {
        "type": cond.type,
        "status": cond.status,
        "reason": cond.reason,
        "message": cond.message[:MESSAGE_LIMIT],
        "observedGeneration": generation,
        "lastTransitionTime": since or at,
    }


def programmed(view: FleetView, kind: str, what: str, none_reason: str) -> Condition:
    """Programmed (gateway Envoys) or NodesProgrammed (node agents): every connected one ACKed the current config."""
    if view.nacks:
        first = view.nacks[0]
        message = f"{len(view.nacks)} rejection(s); {first.node} rejected {first.type}: {first.message}"
        return Condition(kind, "False", "Rejected", message)
    if view.connected == 0:
        return Condition(kind, "False", none_reason, f"no {what} connected")
    ok = view.programmed == view.connected
    message = f"{view.programmed}/{view.connected} {what} ACKed the current config"
    return Condition(kind, "True" if ok else "False", "Programmed" if ok else "Pending", message)


def dns_condition(view: DnsView) -> Condition:
    if view.mode == "none":
        return Condition("DNSProgrammed", "True", "Disabled", "dns.mode is none: names are not rewritten")
    if view.programmed is None:
        return Condition("DNSProgrammed", "Unknown", view.reason or "Pending", view.message or "not verified yet")
    status = "True" if view.programmed else "False"
    return Condition(
        "DNSProgrammed", status, view.reason or ("Programmed" if view.programmed else "NotYet"), view.message
    )


def gateway_status(
    translated: ObjectStatus,
    proxies: FleetView,
    nodes: FleetView,
    dns: DnsView,
    redirect_mode: str,
    rejections: Iterable[Rejection],
    previous: Mapping[str, Any] | None,
    at: str,
) -> dict[str, Any]:
    """The status document of one InternalGateway. ``rejections``: those of the objects in ``translated.rejected``
    and of the InternalGateway itself, as the desired state holds them."""
    generation = translated.generation
    earlier = {c.get("type"): c for c in (previous or {}).get("conditions", []) if isinstance(c, Mapping)}
    conditions = list(translated.conditions)
    conditions.append(programmed(proxies, "Programmed", "proxies", "NoProxies"))
    conditions.append(dns_condition(dns))
    if redirect_mode == "none":
        conditions.append(Condition("NodesProgrammed", "True", "Disabled", "redirect.mode is none"))
    else:
        conditions.append(programmed(nodes, "NodesProgrammed", "node agents", "NoNodeAgents"))
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [_condition(c, generation, earlier, at) for c in conditions],
        "boundVirtualServices": sorted(translated.bound),
        "boundCount": len(translated.bound),
        "rejected": [
            {"kind": r.ref.kind, "namespace": r.ref.namespace, "name": r.ref.name, "field": r.field, "reason": r.reason}
            for r in sorted(set(rejections))
        ],
        "proxies": {"connected": proxies.connected, "programmed": proxies.programmed},
        "nodes": {"connected": nodes.connected, "programmed": nodes.programmed},
    }
    nack = (proxies.nacks or nodes.nacks or (None,))[0]
    if nack is not None:
        earlier_nack = (previous or {}).get("lastNack") or {}
        same = all(earlier_nack.get(k) == getattr(nack, k) for k in ("node", "type", "message"))
        out["lastNack"] = {
            "node": nack.node,
            "type": nack.type,
            "message": nack.message[:MESSAGE_LIMIT],
            "time": earlier_nack.get("time") if same and earlier_nack.get("time") else at,
        }
    elif previous and previous.get("lastNack"):
        out["lastNack"] = previous["lastNack"]  # the last one stays visible until the next
    return out


def comparable(status: Mapping[str, Any] | None) -> Any:
    """The status without timestamps: two documents that differ only in when they were computed are equal."""
    if not status:
        return None
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return out


# ---------------------------------------------------------------------------------------------------- the shell


@dataclass
class StatusWriter:
    """Writes InternalGateway status through the status subresource; skips unchanged documents; leader only.

    ``api``: a kubernetes.client.CustomObjectsApi; ``is_leader``: checked right before every write. What was last
    written is remembered, so an unchanged status costs no request at all.
    """

    api: Any
    is_leader: Callable[[], bool]
    retries: int = 5
    _written: dict[ObjectRef, Any] = field(default_factory=dict)  # ref -> comparable(last written or read status)
    writes: int = 0
    conflicts: int = 0

    def forget(self, ref: ObjectRef | None = None) -> None:
        """Drop what is remembered (leadership changed hands, the object was recreated): read before writing."""
        if ref is None:
            self._written.clear()
        else:
            self._written.pop(ref, None)

    def write(self, ref: ObjectRef, compute: Callable[[Mapping[str, Any] | None], dict[str, Any]]) -> bool:
        """Compute the status (``compute`` gets the current status, for lastTransitionTime) and write it if it
        differs from what the object holds. True when written."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - kubernetes imports slowly

        if ref in self._written and comparable(compute(self._written[ref][1])) == self._written[ref][0]:
            return False
        for attempt in range(self.retries):
            if not self.is_leader():
                return False
            try:
                obj = self.api.get_namespaced_custom_object(GROUP, VERSION, ref.namespace, PLURAL, ref.name)
            except ApiException as error:
                if error.status == 404:
                    self._written.pop(ref, None)
                    return False
                raise
            current = obj.get("status") or None
            status = compute(current)
            if comparable(status) == comparable(current):
                self._written[ref] = (comparable(current), current)
                return False
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "InternalGateway",
                "metadata": obj["metadata"],  # carries the resourceVersion read: a concurrent write is a 409
                "status": status,
            }
            if not self.is_leader():
                return False
            try:
                self.api.replace_namespaced_custom_object_status(GROUP, VERSION, ref.namespace, PLURAL, ref.name, body)
            except ApiException as error:
                if error.status == 409:
                    self.conflicts += 1
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                if error.status == 404:
                    self._written.pop(ref, None)
                    return False
                raise
            self.writes += 1
            self._written[ref] = (comparable(status), status)
            return True
        log.warning("status of %s: still conflicting after %d attempts; retried on the next change", ref, self.retries)
        return False


# ------------------------------------------------------------------------------------------- canal status


def _condition_of(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), {})


def _age(created: str, at: datetime | None = None) -> str:
    try:
        then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return "?"
    seconds = int(((at or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(items: Iterable[Mapping[str, Any]], at: datetime | None = None) -> str:
    """`canal status`: one line per InternalGateway, like `kubectl get` with the CRD's columns and a few more."""
    header = ("NAMESPACE", "NAME", "GATEWAY", "BOUND", "REJECTED", "PROGRAMMED", "PROXIES", "DNS", "NODES", "AGE")
    rows = [header]
    for item in sorted(items, key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"])):
        meta, spec, status = item["metadata"], item.get("spec") or {}, item.get("status") or {}
        proxies, nodes = status.get("proxies") or {}, status.get("nodes") or {}
        rows.append(
            (
                meta.get("namespace", ""),
                meta["name"],
                (spec.get("gatewayRef") or {}).get("name", ""),
                str(status.get("boundCount", 0)),
                str(len(status.get("rejected", []))),
                _condition_of(status, "Programmed").get("status", "Unknown"),
                f"{proxies.get('programmed', 0)}/{proxies.get('connected', 0)}",
                _condition_of(status, "DNSProgrammed").get("status", "Unknown"),
                f"{nodes.get('programmed', 0)}/{nodes.get('connected', 0)}",
                _age(meta.get("creationTimestamp", ""), at),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def describe(item: Mapping[str, Any]) -> str:
    """`canal status -n NS NAME`: everything the status says, readable."""
    meta, status = item["metadata"], item.get("status") or {}
    lines = [f"InternalGateway {meta.get('namespace', '')}/{meta['name']}"]
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if observed is None:
        lines.append("  status: not written yet (is the controller running and leading?)")
    elif generation is not None and observed != generation:
        lines.append(f"  status is for generation {observed}; the object is at {generation} (catching up)")
    lines.append("Conditions:")
    for c in status.get("conditions", []):
        lines.append(f"  {c.get('type', '')}={c.get('status', '')} {c.get('reason', '')}: {c.get('message', '')}")
    proxies, nodes = status.get("proxies") or {}, status.get("nodes") or {}
    lines.append(f"Proxies: {proxies.get('programmed', 0)}/{proxies.get('connected', 0)} programmed")
    lines.append(f"Node agents: {nodes.get('programmed', 0)}/{nodes.get('connected', 0)} programmed")
    bound = status.get("boundVirtualServices", [])
    lines.append(f"Bound VirtualServices ({len(bound)}):")
    lines.extend(f"  {name}" for name in bound)
    rejected = status.get("rejected", [])
    lines.append(f"Rejected ({len(rejected)}):")
    for r in rejected:
        field_ = r.get("field") or "<object>"
        lines.append(f"  {r.get('kind')} {r.get('namespace')}/{r.get('name')}: {field_}: {r.get('reason')}")
    nack = status.get("lastNack")
    if nack:
        lines.append(
            f"Last NACK: {nack.get('node')} rejected {nack.get('type')} at {nack.get('time')}: {nack.get('message')}"
        )
    return "\n".join(lines) + "\n"
