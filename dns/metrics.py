"""Prometheus metrics of Canal's DNS server.

A custom collector rather than prometheus_client Counter objects: the server's fast path answers a query in a
few microseconds, and a labelled Counter/Histogram update (label lookup plus a lock) would cost as much as the
answer itself. The hot path bumps plain integers in pre-resolved cells; the registry reads them at scrape time.
One event-loop thread writes them; a scrape from another thread copies the cell dict first (a single C-level
operation under the GIL), so it never sees a dict change size under it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Server-side time from receiving a query to handing the reply to the socket (kernel queueing excluded).
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

TYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    41: "OPT",
    43: "DS",
    46: "RRSIG",
    47: "NSEC",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    251: "IXFR",
    252: "AXFR",
    255: "ANY",
    257: "CAA",
}
RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    16: "BADVERS",
}


def type_label(qtype: int) -> str:
    """A bounded label set: well-known type names, everything else `other`."""
    return TYPE_NAMES.get(qtype, "other")


def rcode_label(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, "other")


class Cell:
    """One counter the hot path increments directly (`cell.n += 1`)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Latency:
    """A histogram without locks: bucket counts and a sum, written by one thread."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class DnsMetrics:
    """Owns every metric of one DNS server; registers itself as a collector in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # (transport, type, rcode, rewritten) -> cell
        self._cells: dict[tuple[str, str, str, bool], Cell] = {}
        self._failures: dict[tuple[str, str], Cell] = {}  # (upstream, reason)
        self._dropped: dict[str, Cell] = {}  # reason
        self.forwarded = Cell()
        self.internal_errors = Cell()
        self.table_updates = Cell()
        self.local_latency = Latency()  # answered from the table, or refused / malformed
        self.upstream_latency = Latency()  # forwarded: includes the wait for the upstream
        self.records = 0
        self.cache_entries = 0
        self.tcp_connections = 0
        self.inflight = 0
        self.registry.register(self)

    # ------------------------------------------------------------------ writers (event-loop thread)

    def cell(self, transport: str, qtype: int, rcode: int, rewritten: bool = False) -> Cell:
        """The counter for one answered query of this kind; resolve once, then bump `.n` on the hot path."""
        key = (transport, type_label(qtype), rcode_label(rcode), rewritten)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell()
        return cell

    def upstream_failure(self, upstream: str, reason: str) -> None:
        key = (upstream, reason)
        cell = self._failures.get(key)
        if cell is None:
            cell = self._failures[key] = Cell()
        cell.n += 1

    def dropped(self, reason: str) -> None:
        cell = self._dropped.get(reason)
        if cell is None:
            cell = self._dropped[reason] = Cell()
        cell.n += 1

    # ------------------------------------------------------------------ readers (tests, /metrics)

    def queries(self, transport: str | None = None, qtype: str | None = None, rcode: str | None = None) -> int:
        """Answered queries matching the given labels (None matches any)."""
        wanted = (transport, qtype, rcode)
        return sum(
            c.n
            for key, c in dict(self._cells).items()
            if all(w is None or w == k for w, k in zip(wanted, key[:3], strict=True))
        )

    def rewritten(self) -> int:
        return sum(c.n for (_, _, _, rw), c in dict(self._cells).items() if rw)

    def failures(self, upstream: str | None = None, reason: str | None = None) -> int:
        return sum(
            c.n
            for (u, r), c in dict(self._failures).items()
            if (upstream is None or u == upstream) and (reason is None or r == reason)
        )

    def drops(self, reason: str | None = None) -> int:
        return sum(c.n for r, c in dict(self._dropped).items() if reason is None or r == reason)

    # ------------------------------------------------------------------ collector protocol

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "canal_dns_queries",
            "DNS queries answered, by transport, query type and response code",
            labels=["transport", "type", "rcode"],
        )
        rewritten = CounterMetricFamily(
            "canal_dns_rewritten_answers",
            "Authoritative answers from the record table (rewritten names: addresses, or NODATA)",
            labels=["type"],
        )
        forwarded = CounterMetricFamily("canal_dns_forwarded_queries", "Queries forwarded to an upstream")
        failures = CounterMetricFamily(
            "canal_dns_upstream_failures",
            "Upstream attempts that failed (timeout, error, SERVFAIL, REFUSED, overload)",
            labels=["upstream", "reason"],
        )
        dropped = CounterMetricFamily(
            "canal_dns_dropped_packets", "Packets not answered (too short, a response, overload)", labels=["reason"]
        )
        errors = CounterMetricFamily(
            "canal_dns_internal_errors", "Unexpected exceptions caught while handling a query (should stay 0)"
        )
        updates = CounterMetricFamily("canal_dns_table_updates", "Record tables swapped in")
        latency = HistogramMetricFamily(
            "canal_dns_request_duration_seconds",
            "Time from receiving a query to sending its reply (local: from the table; upstream: forwarded)",
            labels=["source"],
        )
        gauges = [
            GaugeMetricFamily("canal_dns_records", "Names in the record table"),
            GaugeMetricFamily("canal_dns_cache_entries", "Pre-packed answers in the fast-path cache"),
            GaugeMetricFamily("canal_dns_tcp_connections", "Open TCP client connections"),
            GaugeMetricFamily("canal_dns_forwards_in_flight", "Forwarded queries waiting for an upstream"),
        ]
        if not empty:
            by_query: dict[tuple[str, str, str], int] = {}
            by_type: dict[str, int] = {}
            for (transport, qtype, rcode, rw), cell in dict(self._cells).items():
                by_query[transport, qtype, rcode] = by_query.get((transport, qtype, rcode), 0) + cell.n
                if rw:
                    by_type[qtype] = by_type.get(qtype, 0) + cell.n
            for labels, value in sorted(by_query.items()):
                queries.add_metric(list(labels), value)
            for qtype, value in sorted(by_type.items()):
                rewritten.add_metric([qtype], value)
            forwarded.add_metric([], self.forwarded.n)
            for (upstream, reason), cell in sorted(dict(self._failures).items()):
                failures.add_metric([upstream, reason], cell.n)
            for reason, cell in sorted(dict(self._dropped).items()):
                dropped.add_metric([reason], cell.n)
            errors.add_metric([], self.internal_errors.n)
            updates.add_metric([], self.table_updates.n)
            for source, hist in (("local", self.local_latency), ("upstream", self.upstream_latency)):
                counts = list(hist.counts)
                buckets, running = [], 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    running += count
                    buckets.append((floatToGoString(bound), running))
                latency.add_metric([source], buckets, hist.total)
            for gauge, value in zip(
                gauges, (self.records, self.cache_entries, self.tcp_connections, self.inflight), strict=True
            ):
                gauge.add_metric([], value)
        yield from (queries, rewritten, forwarded, failures, dropped, errors, updates, latency, *gauges)
