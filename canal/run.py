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

from canal.desired import DesiredState
from canal.files import LoadError, expand_paths, parse_text
from canal.model.base import ObjectRef
from canal.serving import Serving, ServingOptions
from canal.snapshot import Parsed, parse_object, ref_of
from canal.translate import Translator
from canal.xds.publisher import DEFAULT_DRAIN_GRACE, DEFAULT_MAX_DELAY, DEFAULT_QUIET

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
    drain_grace: float = DEFAULT_DRAIN_GRACE


class ControlPlane:
    """Files -> Translator -> the shared serving core (xDS, DNS, probes)."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.serving = Serving(
            ServingOptions(
                options.xds_address,
                options.metrics_address,
                options.quiet,
                options.max_delay,
                options.dns_address,
                options.dns_upstreams,
                options.dns_forward,
                options.drain_grace,
            )
        )
        self.translator = Translator()
        self.source = FileSource(options.paths)
        self._stop = asyncio.Event()

    @property
    def state(self) -> DesiredState:
        return self.serving.state

    def reload(self, *, initial: bool = False) -> bool:
        changes = self.source.poll()
        if not changes and not initial:
            return False
        self.serving.submit(self.translator.apply(changes or []))
        return True

    async def start(self) -> None:
        self.reload(initial=True)
        await self.serving.start()

    async def serve(self) -> None:
        await self.start()
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.options.poll)
                except TimeoutError:
                    self.reload()
        finally:
            await self.serving.close()

    def stop(self) -> None:
        self._stop.set()


async def serve(options: RunOptions) -> None:
    plane = ControlPlane(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.stop)
    await plane.serve()
