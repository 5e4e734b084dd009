"""Desired state -> snapshot cache, coalescing bursts of changes.

An isolated change is published one quiet period after it arrived; a burst is published once, when it goes quiet,
but never later than `max_delay` after its first change (as Contour and Istio debounce their pushes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from canal.xds.cache import SnapshotCache
from canal.xds.types import NODE_AGENT_GROUP

from canal.desired import DesiredState

log = logging.getLogger(__name__)

DEFAULT_QUIET = 0.1
DEFAULT_MAX_DELAY = 1.0


class Publisher:
    def __init__(
        self,
        cache: SnapshotCache,
        *,
        quiet: float = DEFAULT_QUIET,
        max_delay: float = DEFAULT_MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
        on_publish: Callable[[DesiredState], None] | None = None,
    ) -> None:
        if quiet < 0 or max_delay < quiet:
            raise ValueError("need 0 <= quiet <= max_delay")
        self.cache = cache
        self.quiet = quiet
        self.max_delay = max_delay
        self.clock = clock
        self.on_publish = on_publish  # other publishers (DNS) that change together with the xDS snapshots
        self._latest: DesiredState | None = None
        self._first_change: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._published_groups: set[str] = set()
        self.published = asyncio.Event()  # set after the first publication (readiness)

    def submit(self, state: DesiredState) -> None:
        """Called on the event loop for every new desired state."""
        now = self.clock()
        self._latest = state
        if self._first_change is None:
            self._first_change = now
        due = min(now + self.quiet, self._first_change + self.max_delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - now), self.flush)

    def flush(self) -> None:
        """Publish the latest desired state now (also used at shutdown and by tests)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        state, changed_at = self._latest, self._first_change
        self._latest = self._first_change = None
        if state is None:
            return
        groups = set(state.envoy)
        for group in sorted(groups):
            self.cache.set_envoy(group, state.envoy[group], changed_at)
        for group in sorted(self._published_groups - groups):
            self.cache.remove(group)
        self.cache.set_redirects(NODE_AGENT_GROUP, state.redirects, changed_at)
        self._published_groups = groups
        if self.on_publish is not None:
            self.on_publish(state)
        self.published.set()
        log.debug("published %d gateway group(s)", len(groups))
