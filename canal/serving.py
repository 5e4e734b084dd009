"""What `canal run` and `canal controller` share: the xDS server and its coalescing publisher, Canal's DNS server
(optional), the probe endpoints, and logging of rejections as the desired state changes. Sources differ (files,
the Kubernetes API); everything after the translator is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from canal.desired import DesiredState
from canal.dns.metrics import DnsMetrics
from canal.dns.server import DnsServer, system_upstreams
from canal.model.base import Rejection
from canal.observe import Endpoints
from canal.xds.bootstrap import split_address
from canal.xds.cache import SnapshotCache
from canal.xds.metrics import XdsMetrics
from canal.xds.publisher import DEFAULT_DRAIN_GRACE, DEFAULT_MAX_DELAY, DEFAULT_QUIET, Publisher
from canal.xds.server import XdsServer

log = logging.getLogger(__name__)


@dataclass
class ServingOptions:
    xds_address: str = "0.0.0.0:18000"
    metrics_address: str = "127.0.0.1:15014"
    quiet: float = DEFAULT_QUIET
    max_delay: float = DEFAULT_MAX_DELAY
    dns_address: str | None = None  # None: no DNS server
    dns_upstreams: list[tuple[str, int]] | None = None  # None: the machine's resolvers (/etc/resolv.conf)
    dns_forward: bool = True
    # after DNS answers and redirects are withdrawn, how long (beyond the records' TTL) the gateway keeps serving
    drain_grace: float = DEFAULT_DRAIN_GRACE


class Serving:
    """Desired states in (``submit``); xDS, DNS and probes out."""

    def __init__(
        self,
        options: ServingOptions,
        *,
        ready: Callable[[], bool] = lambda: True,
        status: Callable[[], dict[str, Any]] = dict,
        on_publish: Callable[[DesiredState], None] | None = None,
    ) -> None:
        self.serving_options = options
        self.registry = CollectorRegistry()
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, XdsMetrics(self.registry))
        self.publisher = Publisher(
            self.cache,
            quiet=options.quiet,
            max_delay=options.max_delay,
            on_publish=self._published,
            fleet=self.server,
            drain_grace=options.drain_grace,
        )
        self.server.watch_convergence(lambda group, _serial, _seconds: self.publisher.converged(group))
        self.endpoints = Endpoints(self.registry, self.ready, self.status)
        self.dns = self._dns_server() if options.dns_address else None
        self.state = DesiredState()
        self._source_ready = ready
        self._source_status = status
        self._on_publish = on_publish
        self._rejections: set[Rejection] = set()

    def _dns_server(self) -> DnsServer:
        options = self.serving_options
        upstreams = options.dns_upstreams
        if upstreams is None:
            upstreams = system_upstreams() if options.dns_forward else []
        return DnsServer(upstreams=upstreams, forward=options.dns_forward, metrics=DnsMetrics(self.registry))

    def ready(self) -> bool:
        dns_ready = self.dns is None or self.dns.port != 0
        return self.server.port != 0 and self.publisher.published.is_set() and dns_ready and self._source_ready()

    def status(self) -> dict[str, Any]:
        out = {
            "xds": self.server.status(),
            "rejections": [str(r) for r in sorted(self._rejections)],
            # DNS answers and redirects waiting for their gateway Envoys to ACK the routes that serve them
            "exposureHeld": self.publisher.held,
        }
        if self.dns is not None:
            out["dns"] = {
                "names": len(self.dns.table),
                "forward": self.dns.forward,
                "upstreams": [f"{host}:{port}" for host, port in self.dns.upstreams],
            }
        out.update(self._source_status())
        return out

    def submit(self, state: DesiredState) -> None:
        """A new desired state: logged (rejections that came and went) and handed to the publisher."""
        self.state = state
        rejections = set(state.rejections())
        for rejection in sorted(rejections - self._rejections):
            log.warning("rejected: %s", rejection)
        for rejection in sorted(self._rejections - rejections):
            log.info("no longer rejected: %s", rejection)
        self._rejections = rejections
        self.publisher.submit(state)

    def _published(self, state: DesiredState) -> None:
        if self.dns is not None and self.dns.update(state.dns):
            log.info("dns: serving %d name(s)", len(self.dns.table))
        if self._on_publish is not None:
            self._on_publish(state)

    async def start(self) -> None:
        """Serve: the first state is served at once, not after a quiet period."""
        options = self.serving_options
        self.publisher.flush()
        await self.server.start(options.xds_address)
        if self.dns is not None:
            assert options.dns_address is not None
            host, port = split_address(options.dns_address)
            await self.dns.start(host, port)
            log.info("dns server on %s (port %d)", options.dns_address, self.dns.port)
        host, port = split_address(options.metrics_address)
        await self.endpoints.start(host, port)

    async def close(self) -> None:
        """xDS first (its streams' grace period is the longest wait), DNS last: clients keep getting answers
        until the process is really going, as CoreDNS's lameduck does."""
        await self.server.stop()
        await self.endpoints.stop()
        if self.dns is not None:
            await self.dns.stop()
