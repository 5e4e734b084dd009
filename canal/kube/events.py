"""Kubernetes Events for what users must see where they look (`kubectl describe`): rejections and NACKs.

One Event per distinct problem while it lasts: the same rejection seen on every recomputation is not re-sent;
once it is gone and comes back, it is sent again. Only the leader records (the others see the same problems).
Events are best effort: a failure to record is logged, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from canal.model.base import ObjectRef

log = logging.getLogger(__name__)

COMPONENT = "canal-controller"
API_VERSIONS = {
    "InternalGateway": "canal.io/v1alpha1",
    "Gateway": "networking.istio.io/v1",
    "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1",
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Pod": "v1",
    "Namespace": "v1",
}


@dataclass(frozen=True, slots=True, order=True)
class Notice:
    ref: ObjectRef
    reason: str  # CamelCase, e.g. Rejected, ConfigRejected
    message: str
    type: str = "Warning"


@dataclass
class EventRecorder:
    """``api``: a kubernetes.client.CoreV1Api; ``is_leader``: checked before every Event."""

    api: Any
    is_leader: Callable[[], bool]
    host: str = ""
    _active: set[Notice] = field(default_factory=set)
    sent: int = 0

    def sync(self, notices: Iterable[Notice]) -> int:
        """Record the notices that are new since the last sync; forget those that ended. Returns how many were sent."""
        current = set(notices)
        if not self.is_leader():
            self._active = current  # a new leader starts from what is current, it does not replay history
            return 0
        fresh = sorted(current - self._active)
        self._active = current
        count = 0
        for notice in fresh:
            if self._record(notice):
                count += 1
            else:
                self._active.discard(notice)  # not recorded: tried again on the next sync
        return count

    def _record(self, notice: Notice) -> bool:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - kubernetes imports slowly

        ref = notice.ref
        namespace = ref.namespace or "default"  # cluster-scoped objects' Events go to default, as kubectl shows
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": API_VERSIONS.get(ref.kind, ""),
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
            },
            "reason": notice.reason,
            "message": notice.message[:1024],
            "type": notice.type,
            "source": {"component": COMPONENT, "host": self.host},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.host,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.api.create_namespaced_event(namespace, body)
        except (ApiException, OSError) as error:
            log.warning("could not record an Event for %s (%s): %s", ref, notice.reason, error)
            return False
        self.sent += 1
        return True
