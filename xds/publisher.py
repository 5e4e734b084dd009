"""Desired state -> snapshot cache, coalescing bursts of changes, and moving clients make-before-break.

An isolated change is published one quiet period after it arrived; a burst is published once, when it goes quiet,
but never later than `max_delay` after its first change (as Contour and Istio debounce their pushes).

DNS answers and ClusterIP redirects are what send clients to a gateway (here: its *exposure*). They move in the
order that never sends a request where nothing can serve it:

- An exposure that is new or changed waits until every gateway Envoy of its group connected to this server has
  ACKed the snapshot published with it (its listener, routes and clusters). Until then the old answer stays (or
  none: the clients keep going direct). With no Envoy of the group connected here there is nothing to wait for
  (another replica may serve them, or none is running yet).
- An exposure that goes away is withdrawn at once, but the gateway keeps serving what it served before for a
  drain period (the withdrawn DNS records' TTL plus `drain_grace`): clients with a cached answer, connections
  opened before the node agents removed the redirect and keep-alive connections still reach routes that work.
  Only then are the listeners, routes and clusters nobody asked for any more removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from canal.xds.cache import SnapshotCache
from canal.xds.types import NODE_AGENT_GROUP

from canal.desired import DesiredState, EnvoyConfig, RouteConfig

log = logging.getLogger(__name__)

DEFAULT_QUIET = 0.1
DEFAULT_MAX_DELAY = 1.0
DEFAULT_DRAIN_GRACE = 5.0  # beyond the DNS TTL: node agents applying the withdrawal, Envoy's own listener drain
_RECHECK = 1.0  # while exposure waits: how often to look again (a proxy may have disconnected meanwhile)


class Fleet(Protocol):
    """What the xDS server knows about the gateway Envoys of a group."""

    def connected(self, group: str) -> int: ...

    def converged_serial(self, group: str) -> int:
        """The newest snapshot serial every connected Envoy of the group has ACKed (0: none)."""
        ...


@dataclass(frozen=True, slots=True)
class _Drain:
    until: float
    config: EnvoyConfig  # what the group was told before the withdrawal


def retain(new: EnvoyConfig, old: EnvoyConfig) -> EnvoyConfig:
    """`new` plus what `old` had and `new` does not: listeners on ports `new` leaves free, route configurations,
    virtual hosts whose domains no new host claims, clusters and their endpoints. New wins on every conflict."""
    ports = {listener.port for listener in new.listeners.values()}
    listeners = dict(new.listeners)
    for name, listener in old.listeners.items():
        if name not in listeners and listener.port not in ports:
            listeners[name] = listener
    route_configs = dict(new.route_configs)
    for name, config in old.route_configs.items():
        current = route_configs.get(name)
        if current is None:
            route_configs[name] = config
            continue
        claimed = {domain for host in current.virtual_hosts.values() for domain in host.domains}
        hosts = dict(current.virtual_hosts)
        for key, host in config.virtual_hosts.items():
            if key not in hosts and claimed.isdisjoint(host.domains):
                hosts[key] = host
                claimed.update(host.domains)
        if len(hosts) != len(current.virtual_hosts):
            route_configs[name] = RouteConfig(current.name, hosts)
    clusters = {**old.clusters, **new.clusters}
    endpoints = {**old.endpoints, **new.endpoints}
    return EnvoyConfig(listeners, route_configs, clusters, endpoints)


class Publisher:
    def __init__(
        self,
        cache: SnapshotCache,
        *,
        quiet: float = DEFAULT_QUIET,
        max_delay: float = DEFAULT_MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
        on_publish: Callable[[DesiredState], None] | None = None,
        fleet: Fleet | None = None,
        drain_grace: float | None = DEFAULT_DRAIN_GRACE,
    ) -> None:
        if quiet < 0 or max_delay < quiet:
            raise ValueError("need 0 <= quiet <= max_delay")
        self.cache = cache
        self.quiet = quiet
        self.max_delay = max_delay
        self.clock = clock
        self.on_publish = on_publish  # other publishers (DNS) that change together with the xDS snapshots
        self.fleet = fleet  # None: exposure is never held back (no gateway Envoys to wait for)
        self.drain_grace = drain_grace  # None: no draining, removals go at once (protocol tests, raw benchmarks)
        self._latest: DesiredState | None = None
        self._first_change: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._state: DesiredState | None = None  # the latest flushed desired state
        self._envoy: dict[str, EnvoyConfig] = {}  # desired config per group, as last flushed
        self._drains: dict[str, list[_Drain]] = {}
        self._needs: dict[str, int] = {}  # group -> the snapshot serial its pending exposure waits for
        self._changed_at: float | None = None
        self.exposed = DesiredState()  # what DNS and the node agents were last given (dns, redirects)
        self.held = 0  # exposure entries waiting for their gateway's ACK
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
        self._state, self._changed_at = state, changed_at
        self._start_drains(state)
        self._publish_envoy(state.envoy, changed_at)
        self._expose(flushed=True)
        self.published.set()

    def converged(self, group: str) -> None:
        """The xDS server saw every connected Envoy of `group` ACK a snapshot: held exposure may go."""
        if group in self._needs:
            self._expose()

    # ------------------------------------------------------------------------------------------ internals

    def _start_drains(self, state: DesiredState) -> None:
        """A group whose exposure shrinks keeps serving its previous config for the drain period."""
        if self.drain_grace is None:
            return
        ttl: dict[str, float] = {}
        exposed = self.exposed
        if exposed.dns is not state.dns:
            for fqdn, record in exposed.dns.items():
                if state.dns.get(fqdn) is None:
                    ttl[record.gateway] = max(ttl.get(record.gateway, 0.0), float(record.ttl))
        if exposed.redirects is not state.redirects:
            for key, rule in exposed.redirects.items():
                if state.redirects.get(key) is None:
                    ttl.setdefault(rule.gateway, 0.0)
        now = self.clock() if ttl else 0.0
        for group, seconds in ttl.items():
            previous = self._envoy.get(group)
            if previous is not None and previous is not state.envoy.get(group):
                self._drains.setdefault(group, []).append(_Drain(now + seconds + self.drain_grace, previous))
                log.info("%s: clients withdrawn; serving its previous routes for %.0f s more", group, seconds)
        self._schedule_drain_end()

    def _publish_envoy(self, desired: Mapping[str, EnvoyConfig], changed_at: float | None) -> None:
        now = self.clock() if self._drains else 0.0
        for group in list(self._drains):
            self._drains[group] = [d for d in self._drains[group] if d.until > now]
            if not self._drains[group]:
                del self._drains[group]
        groups = set(desired) | set(self._drains)
        for group in sorted(groups):
            config = desired.get(group, EnvoyConfig())
            for drain in reversed(self._drains.get(group, ())):  # newest first: the latest old config wins
                config = retain(config, drain.config)
            snapshot = self.cache.set_envoy(group, config, changed_at)
            if self._needs.get(group, 0) < snapshot.serial:
                self._needs[group] = snapshot.serial
        for group in sorted(set(self._envoy) - groups):
            self.cache.remove(group)
            self._needs.pop(group, None)
        self._envoy = dict(desired)
        log.debug("published %d gateway group(s)", len(groups))

    def _ready(self, group: str) -> bool:
        fleet = self.fleet
        if fleet is None or fleet.connected(group) == 0:
            return True
        return fleet.converged_serial(group) >= self._needs.get(group, 0)

    def _expose(self, *, flushed: bool = False) -> None:
        """Give DNS and the node agents the desired exposure, except what waits for its gateway's ACK."""
        state = self._state
        if state is None:
            return
        ready: dict[str, bool] = {}

        def ok(group: str) -> bool:
            if group not in ready:
                ready[group] = self._ready(group)
            return ready[group]

        dns, held_dns = _hold(self.exposed.dns, state.dns, lambda r: ok(r.gateway))
        redirects, held_redirects = _hold(self.exposed.redirects, state.redirects, lambda r: ok(r.gateway))
        self.held = held_dns + held_redirects
        for group in [g for g, is_ready in ready.items() if is_ready]:
            self._needs.pop(group, None)
        changed = dns is not self.exposed.dns or redirects is not self.exposed.redirects
        first = not self.published.is_set()
        self.exposed = replace(state, dns=dns, redirects=redirects)
        if changed or first:
            self.cache.set_redirects(NODE_AGENT_GROUP, redirects, self._changed_at)
        if self.on_publish is not None and (changed or flushed):
            self.on_publish(self.exposed)
        if self.held:
            log.info("%d DNS answer(s) or redirect(s) wait for their gateway's ACK", self.held)
            self._schedule_recheck()

    def _schedule_drain_end(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        ends = [d.until for drains in self._drains.values() for d in drains]
        if ends:  # the clock is read only when something drains (tests count its calls)
            delay = max(0.0, min(ends) - self.clock())
            self._drain_timer = asyncio.get_running_loop().call_later(delay, self._drain_ended)

    def _drain_ended(self) -> None:
        self._drain_timer = None
        self._publish_envoy(self._envoy, None)
        self._schedule_drain_end()
        self._expose()  # the serials moved on; nothing new is exposed by this alone

    def _schedule_recheck(self) -> None:
        if self._recheck_timer is None:
            self._recheck_timer = asyncio.get_running_loop().call_later(_RECHECK, self._recheck)

    def _recheck(self) -> None:
        self._recheck_timer = None
        if self.held:
            self._expose()


def _hold(
    exposed: Mapping[Any, Any], desired: Mapping[Any, Any], ready: Callable[[Any], bool]
) -> tuple[Mapping[Any, Any], int]:
    """`desired`, except that a new or changed entry whose gateway is not ready keeps its exposed value (or stays
    out); returns the mapping and how many entries were held. Withdrawals always go through."""
    if exposed is desired:
        return desired, 0
    held: dict[Any, Any] = {}
    for key, value in desired.items():
        previous = exposed.get(key)
        if previous is not value and previous != value and not ready(value):
            held[key] = previous
    if not held:
        return desired, 0
    out = dict(desired)
    for key, previous in held.items():
        if previous is None:
            del out[key]
        else:
            out[key] = previous
    return out, len(held)
