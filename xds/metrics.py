"""Prometheus metrics of the xDS server (a registry per server, so tests and embedders stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_CONVERGENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6)


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._proxies = Gauge("canal_xds_connected_proxies", "Connected xDS clients", ["group"], registry=self.registry)
        self._streams = Counter(
            "canal_xds_streams", "xDS streams opened (reconnects show up here)", ["group"], registry=self.registry
        )
        self._pushes = Counter("canal_xds_pushes", "xDS responses sent", ["group", "type"], registry=self.registry)
        self._bytes = Histogram(
            "canal_xds_push_bytes",
            "Serialized size of the resources in one response",
            ["type"],
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self._nacks = Counter(
            "canal_xds_nacks", "Responses a client rejected", ["group", "type"], registry=self.registry
        )
        self._convergence = Histogram(
            "canal_xds_convergence_seconds",
            "From a desired-state change to the ACK of every connected proxy of the group",
            ["group"],
            buckets=_CONVERGENCE_BUCKETS,
            registry=self.registry,
        )

    def connected(self, group: str, count: int) -> None:
        self._proxies.labels(group).set(count)

    def stream_opened(self, group: str) -> None:
        self._streams.labels(group).inc()

    def pushed(self, group: str, type_name: str, size: int) -> None:
        self._pushes.labels(group, type_name).inc()
        self._bytes.labels(type_name).observe(size)

    def nacked(self, group: str, type_name: str) -> None:
        self._nacks.labels(group, type_name).inc()

    def converged(self, group: str, seconds: float) -> None:
        self._convergence.labels(group).observe(seconds)
