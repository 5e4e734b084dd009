"""`canal run`: the file-backed control plane. Watches YAML files, translates incrementally, serves xDS and,
when asked, the DNS records of the migrated Services (Canal's own DNS server).

The imperative shell around the pure parts: files are polled (cheap stat calls; no platform-specific watcher),
each change is turned into upserts and deletes for the Translator, and the result goes through the coalescing
publisher to the xDS server. A file that stops parsing keeps its last good content, so a typo never withdraws
routes. DNS records are swapped in the DNS server in place at the same moment the publisher flushes, so names
and routes change together.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from canal.desired import DesiredState
from canal.dns.metrics import DnsMetrics
from canal.dns.server import DnsServer, system_upstreams
from canal.files import LoadError, expand_paths, parse_text
from canal.model.base import ObjectRef, Rejection
from canal.observe import Endpoints
from canal.snapshot import Parsed, parse_object, ref_of
from canal.translate import Translator
from canal.xds.bootstrap import split_address
from canal.xds.cache import SnapshotCache
from canal.xds.metrics import XdsMetrics
from canal.xds.publisher import DEFAULT_MAX_DELAY, DEFAULT_QUIET, Publisher
from canal.xds.server import XdsServer

log = logging.getLogger(__name__)


class FileSource:
    """Kubernetes documents from files, as incremental changes; the first definition of an object wins."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._stamps: dict[str, tuple[int, int]] = {}
        self._documents: dict[str, list[dict[str, Any]]] = {}
        self._raw: dict[ObjectRef, dict[str, Any]] = {}

    def poll(self) -> list[Parsed | ObjectRef] | None:
        """The changes since the last poll, or None when no file changed."""
        try:
            files = expand_paths(self.paths)
        except LoadError as err:
            log.error("%s", err)
            return None
        stamps = {}
        for path in files:
            try:
                st = Path(path).stat()
            except OSError:
                continue
            stamps[path] = (st.st_mtime_ns, st.st_size)
        if stamps == self._stamps:
            return None
        for path, stamp in stamps.items():
            if stamp != self._stamps.get(path):
                self._read(path)
        for path in set(self._documents) - set(stamps):
            del self._documents[path]
        self._stamps = stamps
        return self._diff()

    def _read(self, path: str) -> None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            self._documents[path] = [d.data for d in parse_text(text, path)]
        except (OSError, UnicodeDecodeError, LoadError) as err:
            kept = "keeping its last good content" if path in self._documents else "skipped"
            log.error("%s; %s", err, kept)

    def _diff(self) -> list[Parsed | ObjectRef]:
        raw: dict[ObjectRef, dict[str, Any]] = {}
        for path in sorted(self._documents):
            for document in self._documents[path]:
                ref = ref_of(document)
                if ref is None:
                    continue
                if ref in raw:
                    log.error("%s is defined more than once; %s: the first definition is kept", ref, path)
                    continue
                raw[ref] = document
        changes: list[Parsed | ObjectRef] = [ref for ref in self._raw if ref not in raw]
        for ref, document in raw.items():
            if self._raw.get(ref) != document:
                parsed = parse_object(document)
                assert parsed is not None
                changes.append(parsed)
        self._raw = raw
        return changes


@dataclass
class RunOptions:
    paths: list[str]
    xds_address: str = "0.0.0.0:18000"
    metrics_address: str = "127.0.0.1:15014"
    quiet: float = DEFAULT_QUIET
    max_delay: float = DEFAULT_MAX_DELAY
    poll: float = 1.0
    dns_address: str | None = None  # None: no DNS server
    dns_upstreams: list[tuple[str, int]] | None = None  # None: the machine's resolvers (/etc/resolv.conf)
    dns_forward: bool = True


class ControlPlane:
    """Files -> Translator -> Publisher -> xDS server, plus the probe endpoints."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.registry = CollectorRegistry()
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, XdsMetrics(self.registry))
        self.publisher = Publisher(
            self.cache, quiet=options.quiet, max_delay=options.max_delay, on_publish=self._published
        )
        self.translator = Translator()
        self.source = FileSource(options.paths)
        self.endpoints = Endpoints(self.registry, self.ready, self.status)
        self.dns = self._dns_server() if options.dns_address else None
        self.state = DesiredState()
        self._rejections: set[Rejection] = set()
        self._stop = asyncio.Event()

    def _dns_server(self) -> DnsServer:
        upstreams = self.options.dns_upstreams
        if upstreams is None:
            upstreams = system_upstreams() if self.options.dns_forward else []
        return DnsServer(upstreams=upstreams, forward=self.options.dns_forward, metrics=DnsMetrics(self.registry))

    def ready(self) -> bool:
        dns_ready = self.dns is None or self.dns.port != 0
        return self.server.port != 0 and self.publisher.published.is_set() and dns_ready

    def status(self) -> dict[str, Any]:
        out = {"xds": self.server.status(), "rejections": [str(r) for r in sorted(self._rejections)]}
        if self.dns is not None:
            out["dns"] = {
                "names": len(self.dns.table),
                "forward": self.dns.forward,
                "upstreams": [f"{host}:{port}" for host, port in self.dns.upstreams],
            }
        return out

    def reload(self, *, initial: bool = False) -> bool:
        changes = self.source.poll()
        if not changes and not initial:
            return False
        self.state = self.translator.apply(changes or [])
        rejections = set(self.state.rejections())
        for rejection in sorted(rejections - self._rejections):
            log.warning("rejected: %s", rejection)
        for rejection in sorted(self._rejections - rejections):
            log.info("no longer rejected: %s", rejection)
        self._rejections = rejections
        self.publisher.submit(self.state)
        return True

    def _published(self, state: DesiredState) -> None:
        if self.dns is not None and self.dns.update(state.dns):
            log.info("dns: serving %d name(s)", len(self.dns.table))

    async def start(self) -> None:
        self.reload(initial=True)
        self.publisher.flush()  # the first state is served at once, not after a quiet period
        await self.server.start(self.options.xds_address)
        if self.dns is not None:
            assert self.options.dns_address is not None
            host, port = split_address(self.options.dns_address)
            await self.dns.start(host, port)
            log.info("dns server on %s (port %d)", self.options.dns_address, self.dns.port)
        host, port = split_address(self.options.metrics_address)
        await self.endpoints.start(host, port)

    async def serve(self) -> None:
        await self.start()
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.options.poll)
                except TimeoutError:
                    self.reload()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self.endpoints.stop()
        if self.dns is not None:
            await self.dns.stop()
        await self.server.stop()


async def serve(options: RunOptions) -> None:
    plane = ControlPlane(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.stop)
    await plane.serve()
