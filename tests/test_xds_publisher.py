"""The Publisher: desired states -> snapshot cache, coalesced (quiet period, capped by max_delay).

Timing assertions are one-sided and lenient (a timer never fires early; a loaded machine only makes it late); the
strict assertions are about counts and order, which do not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import pytest
from canal.xds.cache import Snapshot as CacheSnapshot
from canal.xds.cache import SnapshotCache
from canal.xds.canal_redirect_pb2 import RedirectRule
from canal.xds.publisher import Publisher
from canal.xds.types import CLUSTER, ENDPOINT, ENVOY_TYPES, LISTENER, NODE_AGENT_GROUP, REDIRECT, ROUTE

from canal.desired import DesiredState
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, base, endpoint_slice, gateway, internal_gateway, route, service, virtual_service

GROUP = "istio-system/canal"
OTHER = "istio-system/other"
WEB = "outbound|80||web.default.svc.cluster.local"


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 30))


def state(
    i: int = 1, *, other: bool = False, other_ttl: int = 5, routed: bool = True, gateway_ip: str = ""
) -> DesiredState:
    """A distinct desired state per `i`: web's single endpoint is 10.244.1.<i>; `routed`: web's VirtualService."""
    objs = [*base(), *app("web", ips=(f"10.244.1.{i}",))]
    if routed:
        objs.append(virtual_service("web", http=[{"route": [route("web")]}]))
    if gateway_ip:
        objs = [o for o in objs if o["kind"] != "InternalGateway"] + [internal_gateway(ips=[gateway_ip])]
    if other:
        objs += [
            gateway("other", servers=[(8080, "HTTP")]),
            internal_gateway(
                "other", gateway_name="other", ips=["10.96.0.60"], dns={"mode": "server", "ttl": other_ttl}
            ),
            service("greeter", ports=[8080], ip=None),
            endpoint_slice("greeter", endpoints=[("10.244.3.1", "greeter-0")], ports=[("http-8080", 8080)]),
            virtual_service("greeter", gateways=["istio-system/other"], http=[{"route": [route("greeter")]}]),
        ]
    return translate(Snapshot.from_dicts(objs))


def endpoint_of(snapshot: CacheSnapshot | None) -> str:
    from envoy.config.endpoint.v3 import endpoint_pb2

    assert snapshot is not None
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(snapshot.of(ENDPOINT)[WEB].body.value)
    (locality,) = assignment.endpoints
    (endpoint,) = locality.lb_endpoints
    return endpoint.endpoint.address.socket_address.address


class RecordingCache(SnapshotCache):
    """Records each flush: the Publisher calls set_redirects exactly once per flush, with that state's redirects."""

    def __init__(self, states: list[DesiredState]) -> None:
        super().__init__()
        self.index = {id(s.redirects): i for i, s in enumerate(states)}
        self.flushes: list[tuple[float, int, float | None]] = []  # (when, index of the state, changed_at)

    def set_redirects(self, group: str, rules: Mapping[Any, Any], changed_at: float | None = None) -> CacheSnapshot:
        self.flushes.append((time.monotonic(), self.index[id(rules)], changed_at))
        return super().set_redirects(group, rules, changed_at)


class Ticks:
    """The Publisher's clock: real monotonic time, remembering what it answered (one call per submit)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seen: list[float] = []

    def __call__(self) -> float:
        self.seen.append(self.clock())
        return self.seen[-1]


async def wait_for_flushes(cache: RecordingCache, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(cache.flushes) < count:
        assert time.monotonic() < deadline, f"{len(cache.flushes)} flush(es) after {timeout}s, expected {count}"
        await asyncio.sleep(0.005)


async def wait_for_state(cache: RecordingCache, index: int, timeout: float = 5.0) -> None:
    """Until the state submitted as `index` was published."""
    deadline = time.monotonic() + timeout
    while not cache.flushes or cache.flushes[-1][1] != index:
        assert time.monotonic() < deadline, f"state {index} not published after {timeout}s: {cache.flushes}"
        await asyncio.sleep(0.005)


def check_batches(cache: RecordingCache, ticks: Ticks, submitted: int) -> list[int]:
    """Each flush publishes the latest state submitted before it, with changed_at = the first submit of its batch;
    batches cover every submit, in order. Returns the batch sizes."""
    assert len(ticks.seen) == submitted
    sizes, first = [], 0
    for _, last, changed_at in cache.flushes:
        assert last >= first, "a flush published an older state than one already published"
        assert changed_at == ticks.seen[first]
        sizes.append(last - first + 1)
        first = last + 1
    assert first == submitted, "the last state submitted was not published"
    return sizes


# ------------------------------------------------------------------------------------------------ coalescing


def test_quiet_must_not_exceed_max_delay():
    with pytest.raises(ValueError, match="quiet"):
        Publisher(SnapshotCache(), quiet=0.5, max_delay=0.1)
    with pytest.raises(ValueError):
        Publisher(SnapshotCache(), quiet=-1, max_delay=1)


def test_an_isolated_change_is_published_once_after_the_quiet_period():
    states = [state(1)]

    async def body() -> None:
        cache = RecordingCache(states)
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3)
        assert not publisher.published.is_set()
        start = time.monotonic()
        publisher.submit(states[0])
        assert cache.flushes == [] and cache.get(GROUP) is None  # not before the quiet period
        await wait_for_flushes(cache, 1)
        await asyncio.sleep(0.2)  # well past quiet and max_delay: nothing more
        assert len(cache.flushes) == 1
        when, index, changed_at = cache.flushes[0]
        assert index == 0 and changed_at is not None and changed_at >= start
        assert when - start >= 0.05 - 0.005  # never early (timer resolution aside)
        assert publisher.published.is_set()
        assert endpoint_of(cache.get(GROUP)) == "10.244.1.1"
        assert cache.get(GROUP).changed_at == changed_at  # convergence is measured from the change

    run(body())


def test_a_burst_is_published_once_with_its_last_state():
    states = [state(i) for i in range(1, 21)]

    async def body() -> None:
        cache = RecordingCache(states)
        ticks = Ticks()
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3, clock=ticks)
        for s in states:
            publisher.submit(s)
            # Yield to the loop between changes. The pending flush can never run here, even on a stalled machine:
            # this task is already queued, so it resubmits (cancelling the timer) before a due timer runs.
            await asyncio.sleep(0)
        await wait_for_flushes(cache, 1)
        await asyncio.sleep(0.4)  # longer than max_delay: a timer that was not cancelled would have fired
        assert check_batches(cache, ticks, len(states)) == [20]
        assert endpoint_of(cache.get(GROUP)) == "10.244.1.20"

    run(body())


def test_a_continuous_stream_is_published_at_least_every_max_delay():
    """Real time: changes every 20 ms (under the 50 ms quiet period) for at least 0.8 s, max_delay 0.2 s."""
    states = [state(i) for i in range(1, 41)]

    async def body() -> None:
        cache = RecordingCache(states)
        ticks = Ticks()
        publisher = Publisher(cache, quiet=0.05, max_delay=0.2, clock=ticks)
        for s in states:
            publisher.submit(s)
            await asyncio.sleep(0.02)
        during = len(cache.flushes)
        await wait_for_state(cache, len(states) - 1)  # the stream's tail (unless max_delay just flushed it)
        # Without max_delay the stream would be one batch. A late timer (loaded machine) fires as soon as the loop
        # runs again, and longer gaps only split batches further: at least 2 flushes during 0.8 s, whatever the load.
        assert during >= 2, cache.flushes
        sizes = check_batches(cache, ticks, len(states))
        assert sum(sizes) == len(states)
        assert endpoint_of(cache.get(GROUP)) == "10.244.1.40"

    run(body())


def test_max_delay_bounds_a_batch_in_the_publishers_clock():
    """Deterministic form: a virtual clock advancing 20 ms per change. Once the batch is max_delay (0.3) old, the
    flush is due at once and runs during the next (real) pause, so no batch spans more than 0.3 s of changes:
    at most 16 changes (0.00, 0.02, ..., 0.30). Real stalls can only make batches smaller."""
    states = [state(i) for i in range(1, 51)]

    async def body() -> None:
        cache = RecordingCache(states)
        step = iter(range(10_000))
        ticks = Ticks(lambda: next(step) * 0.02)
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3, clock=ticks)
        for s in states:
            publisher.submit(s)
            await asyncio.sleep(0.005)  # real time: far below the 50 ms quiet period
        await wait_for_flushes(cache, 1)
        publisher.flush()  # the tail, without waiting for it
        sizes = check_batches(cache, ticks, len(states))
        assert max(sizes) <= 16, sizes
        assert len(sizes) >= 4  # ceil(50 / 16)

    run(body())


def test_flush_without_changes_does_nothing_and_an_unchanged_state_keeps_the_snapshot():
    states = [state(1), state(1)]  # equal content, separately translated (distinct objects)

    async def body() -> None:
        cache = RecordingCache(states)
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3)
        publisher.flush()
        assert cache.flushes == [] and not publisher.published.is_set()
        publisher.submit(states[0])
        publisher.flush()  # at once (canal run does this at start)
        first = cache.get(GROUP)
        publisher.submit(states[1])
        publisher.flush()
        assert [index for _, index, _ in cache.flushes] == [0, 1]
        assert cache.get(GROUP) is first  # nothing an Envoy can see changed: same snapshot, same serial
        await asyncio.sleep(0.1)
        assert len(cache.flushes) == 2  # flush() cancelled the pending timers

    run(body())


def test_on_publish_sees_each_published_state_after_the_snapshots_changed():
    """Other publishers (Canal's DNS server) change together with the xDS snapshots: once per flush, with the
    state the flush published, after the cache holds it."""
    states = [state(i) for i in range(1, 6)]

    async def body() -> None:
        cache = RecordingCache(states)
        seen: list[tuple[int, str]] = []
        publisher = Publisher(
            cache,
            quiet=0.02,
            max_delay=0.2,
            on_publish=lambda s: seen.append((states.index(s), endpoint_of(cache.get(GROUP)))),
        )
        for s in states[:3]:  # a burst: one flush, of the last state
            publisher.submit(s)
        await wait_for_flushes(cache, 1)
        publisher.submit(states[3])
        publisher.flush()
        publisher.flush()  # nothing new: no second call
        assert seen == [(2, "10.244.1.3"), (3, "10.244.1.4")]

    run(body())


# ------------------------------------------------------------------------------------------------ groups


def test_a_removed_gateway_group_drains_then_is_emptied_and_the_others_are_kept():
    """Its DNS answers go at once; its Envoys keep the old config for the drain period (TTL 0 + grace), then are told
    to drop everything."""

    async def body() -> None:
        cache = SnapshotCache()
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3, drain_grace=0.3)
        first = state(1, other=True, other_ttl=0)
        publisher.submit(first)
        publisher.flush()
        assert {GROUP, OTHER} <= set(cache.groups())
        other = cache.get(OTHER)
        assert other is not None
        assert set(other.of(LISTENER)) == {"0.0.0.0_8080"}
        assert set(other.of(CLUSTER)) == {"outbound|8080||greeter.default.svc.cluster.local"}
        assert "greeter.default.svc.cluster.local" in publisher.exposed.dns
        mine = cache.get(GROUP)

        publisher.submit(state(1))  # the InternalGateway "other" is gone
        publisher.flush()
        assert "greeter.default.svc.cluster.local" not in publisher.exposed.dns  # withdrawn at once
        assert cache.get(OTHER) is other  # still serving what it served
        changed = cache.changed(OTHER)
        await asyncio.sleep(0.6)
        emptied = cache.get(OTHER)
        assert emptied is not None and emptied.serial > other.serial
        assert all(emptied.of(t) == {} for t in (*ENVOY_TYPES, REDIRECT))  # its Envoys are told to drop everything
        assert changed.is_set()  # and the streams of that group are woken up to tell them
        assert cache.get(GROUP) is mine  # the other group did not change

        serial = emptied.serial
        publisher.submit(state(2))
        publisher.flush()
        assert cache.get(OTHER).serial == serial  # removed once, not again on every publication


def test_redirect_rules_go_to_the_node_agent_group_only():
    async def body() -> None:
        cache = SnapshotCache()
        publisher = Publisher(cache, quiet=0.05, max_delay=0.3)
        desired = state(1, other=True)
        publisher.submit(desired)
        publisher.flush()
        web_ip = service("web")["spec"]["clusterIP"]
        agents = cache.get(NODE_AGENT_GROUP)
        assert agents is not None
        assert set(agents.of(REDIRECT)) == {f"{web_ip}:80/tcp"}  # greeter is headless (ip=None): no redirect
        rule = RedirectRule.FromString(agents.of(REDIRECT)[f"{web_ip}:80/tcp"].body.value)
        assert (rule.cluster_ip, rule.port, rule.protocol, rule.gateway) == (web_ip, 80, "tcp", GROUP)
        assert [(b.address, b.port) for b in rule.backends] == [("10.244.9.1", 80)]
        assert all(agents.of(t) == {} for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT))
        for group in (GROUP, OTHER):
            assert cache.get(group).of(REDIRECT) == {}

    run(body())


class FakeFleet:
    """The xDS server's view of a group's Envoys, set by the test."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.acked: dict[str, int] = {}

    def connected(self, group: str) -> int:
        return self.count.get(group, 0)

    def converged_serial(self, group: str) -> int:
        return self.acked.get(group, 0)


WEB_NAME = "web.default.svc.cluster.local"


def test_exposure_waits_for_the_gateway_ack_and_withdrawal_does_not():
    """A new DNS answer and redirect go out only once every connected Envoy of the group ACKed the snapshot that
    serves them; with none connected there is nothing to wait for; a withdrawal goes at once."""

    async def body() -> None:
        cache, fleet = SnapshotCache(), FakeFleet()
        seen: list[DesiredState] = []
        publisher = Publisher(cache, quiet=0.0, max_delay=0.0, fleet=fleet, on_publish=seen.append, drain_grace=0.0)
        fleet.count[GROUP] = 1  # one Envoy connected, nothing ACKed yet
        publisher.submit(state(1))
        publisher.flush()
        assert WEB_NAME not in publisher.exposed.dns and not publisher.exposed.redirects
        assert cache.get(NODE_AGENT_GROUP).of(REDIRECT) == {}
        assert publisher.held == 2  # the name and the ClusterIP redirect
        serial = cache.get(GROUP).serial
        fleet.acked[GROUP] = serial - 1
        publisher.converged(GROUP)  # an older snapshot: still held
        assert WEB_NAME not in publisher.exposed.dns
        fleet.acked[GROUP] = serial
        publisher.converged(GROUP)
        assert WEB_NAME in publisher.exposed.dns and len(publisher.exposed.redirects) == 1
        assert len(cache.get(NODE_AGENT_GROUP).of(REDIRECT)) == 1 and publisher.held == 0
        assert seen[-1] is publisher.exposed  # DNS (and status) were told

        # the VirtualService goes: withdrawn at once, without waiting for any ACK
        publisher.submit(state(1, routed=False))
        publisher.flush()
        assert WEB_NAME not in publisher.exposed.dns and not publisher.exposed.redirects

        # nothing connected: nothing to wait for
        fleet.count[GROUP] = 0
        publisher.submit(state(2))
        publisher.flush()
        assert WEB_NAME in publisher.exposed.dns and publisher.held == 0

    run(body())


def test_a_changed_answer_keeps_the_old_one_until_the_gateway_acked():
    async def body() -> None:
        cache, fleet = SnapshotCache(), FakeFleet()
        publisher = Publisher(cache, quiet=0.0, max_delay=0.0, fleet=fleet)
        publisher.submit(state(1))
        publisher.flush()  # nothing connected: exposed at once
        before = publisher.exposed.dns[WEB_NAME]
        fleet.count[GROUP] = 1
        fleet.acked[GROUP] = cache.get(GROUP).serial
        publisher.submit(state(2, gateway_ip="10.96.0.51"))  # the gateway's config changes too (an endpoint)
        publisher.flush()
        assert publisher.exposed.dns[WEB_NAME] is before  # the old answer stays while the gateway catches up
        fleet.acked[GROUP] = cache.get(GROUP).serial
        publisher.converged(GROUP)
        assert publisher.exposed.dns[WEB_NAME].addresses == ("10.96.0.51",)
        # an answer change alone, the gateway's config unchanged: nothing to wait for
        publisher.submit(state(2, gateway_ip="10.96.0.52"))
        publisher.flush()
        assert publisher.exposed.dns[WEB_NAME].addresses == ("10.96.0.52",)

    run(body())


def test_retain_keeps_what_the_new_config_dropped_unless_it_conflicts():
    from canal.xds.publisher import retain

    old, new = state(1, other=True).envoy, state(1).envoy
    # the web host's routes stay; a retained host whose domains a new host claims would be a duplicate: skipped
    merged = retain(new[GROUP], old[GROUP])
    assert merged.listeners == {**new[GROUP].listeners}
    without = state(1, routed=False).envoy.get(GROUP)
    assert without is not None
    kept = retain(without, new[GROUP])
    (name,) = new[GROUP].route_configs
    assert set(kept.route_configs[name].virtual_hosts) == set(new[GROUP].route_configs[name].virtual_hosts)
    assert set(kept.clusters) == set(new[GROUP].clusters) | set(without.clusters)
    assert set(kept.endpoints) == set(new[GROUP].endpoints) | set(without.endpoints)
    clash = retain(new[GROUP], new[GROUP])  # every old host is claimed by the new one of the same name
    assert clash.route_configs[name].virtual_hosts == new[GROUP].route_configs[name].virtual_hosts
