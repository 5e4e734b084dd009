"""Leader election against the test API server (official client, real HTTP, resourceVersion and 409s).

Durations are scaled down: lease 2 s, renew deadline 1 s, retry period 0.2 s (candidates poll every 0.2-0.44 s).
The lease is an integer number of seconds on the wire, so 2 s keeps the arithmetic exact; rounding 1.5 s up is
tested on its own. Timing assertions compare local monotonic times only, with slack for scheduling noise.

The test API server cannot tell its clients apart, so faults that must hit one replica only (a network partition,
a request that hangs past every timeout, a creation race) come from `FaultyLeases`, the official
CoordinationV1Api with switches in front of the real HTTP calls. Faults that hit everyone (500s on writes,
409s from a concurrent writer) use the server's own inject_failure and inject_conflict.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry
from urllib3.exceptions import ProtocolError

from canal.kube.leader import (
    JITTER_FACTOR,
    AlwaysLeader,
    LeaderElector,
    NotLeaderError,
    Term,
    guard,
    micro_time,
)
from tests.kube_api import KubeApiServer

pytestmark = pytest.mark.timeout(60)

LEASE = 2.0
RENEW = 1.0
RETRY = 0.2
MAX_POLL = RETRY * (1 + JITTER_FACTOR)  # the longest a candidate waits between two looks at the lease
SLACK = 0.25  # scheduling noise on a loaded CI machine
NS, NAME = "canal-system", "canal-controller"
LEASE_API = "coordination.k8s.io/v1"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


# ---------------------------------------------------------------------------------------------------- helpers


class FaultyLeases(client.CoordinationV1Api):
    """The official Lease API with per-replica faults: a partition (every call fails as a reset connection), a
    write that hangs regardless of its timeout, and a hook that runs just before a create (to lose a race)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        super().__init__(api_client)
        self.partitioned = threading.Event()
        self.hang_next_write = threading.Event()
        self.hung = threading.Event()  # set while a write is hanging
        self.unhang = threading.Event()
        self.before_create: Callable[[], None] | None = None

    def _fault(self) -> None:
        if self.partitioned.is_set():
            raise ProtocolError("test partition: connection reset by peer")

    def read_namespaced_lease(self, *args: Any, **kwargs: Any) -> client.V1Lease:
        self._fault()
        return super().read_namespaced_lease(*args, **kwargs)

    def create_namespaced_lease(self, *args: Any, **kwargs: Any) -> client.V1Lease:
        self._fault()
        if self.before_create is not None:
            self.before_create()
        return super().create_namespaced_lease(*args, **kwargs)

    def replace_namespaced_lease(self, *args: Any, **kwargs: Any) -> client.V1Lease:
        self._fault()
        if self.hang_next_write.is_set():
            self.hang_next_write.clear()
            self.hung.set()
            self.unhang.wait(30)
            self.hung.clear()
        return super().replace_namespaced_lease(*args, **kwargs)


@dataclass
class Replica:
    """One controller replica: its elector, its own connection, and when its callbacks ran."""

    identity: str
    elector: LeaderElector
    api_client: client.ApiClient
    faults: FaultyLeases | None
    started: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    leader_in_stopped: list[bool] = field(default_factory=list)  # is_leader as on_stopped_leading saw it
    holder_in_stopped: list[str] = field(default_factory=list)  # the Lease's holder as on_stopped_leading saw it

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader


class Cluster:
    """Replicas against one test API server; every elector is stopped and every client closed at the end."""

    def __init__(self, kube_api: KubeApiServer) -> None:
        self.kube_api = kube_api
        self.replicas: list[Replica] = []

    def replica(
        self,
        identity: str,
        *,
        faulty: bool = False,
        start: bool = True,
        registry: CollectorRegistry | None = None,
        **options: Any,
    ) -> Replica:
        api_client = self.kube_api.client()
        faults = FaultyLeases(api_client) if faulty else None
        holder: list[Replica] = []

        def on_started() -> None:
            holder[0].started.append(time.monotonic())

        def on_stopped() -> None:
            replica = holder[0]
            replica.stopped.append(time.monotonic())
            replica.leader_in_stopped.append(replica.elector.is_leader)
            replica.holder_in_stopped.append(self.holder())

        settings: dict[str, Any] = {"lease_duration": LEASE, "renew_deadline": RENEW, "retry_period": RETRY}
        settings.update(options)
        elector = LeaderElector(
            faults if faults is not None else api_client,  # the controller passes its ApiClient
            NS,
            NAME,
            identity,
            on_started_leading=on_started,
            on_stopped_leading=on_stopped,
            registry=registry,
            **settings,
        )
        replica = Replica(identity, elector, api_client, faults)
        holder.append(replica)
        self.replicas.append(replica)
        if start:
            elector.start()
        return replica

    def lease(self) -> dict[str, Any] | None:
        return self.kube_api.get(LEASE_API, "Lease", NAME, NS)

    def spec(self) -> dict[str, Any]:
        lease = self.lease()
        assert lease is not None, "no Lease"
        return lease["spec"]

    def holder(self) -> str:
        lease = self.lease()
        return (lease or {}).get("spec", {}).get("holderIdentity") or ""

    def leaders(self) -> list[Replica]:
        return [r for r in self.replicas if r.is_leader]

    def close(self) -> None:
        for replica in self.replicas:
            if replica.faults is not None:
                replica.faults.unhang.set()
            try:
                ended = replica.elector.stop(timeout=5)
            except RuntimeError:  # never started
                ended = True
            assert ended, f"the elector of {replica.identity} did not stop"
        for replica in self.replicas:
            replica.api_client.close()


class Sampler:
    """Samples every replica's is_leader (and the Lease as stored) every millisecond or so, on its own thread.

    A replica counts as leader in a sample only if it read True both before and after the others were read, so
    two leaders in one sample really overlapped (is_leader never flaps back within a term)."""

    def __init__(self, cluster: Cluster, period: float = 0.001) -> None:
        self.cluster = cluster
        self.period = period
        self.samples: list[tuple[float, tuple[bool, ...]]] = []
        self.lease_changes: list[tuple[float, dict[str, Any]]] = []  # (when first seen, spec)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            replicas = list(self.cluster.replicas)
            first = [r.is_leader for r in replicas]
            second = [r.is_leader for r in replicas]
            now = time.monotonic()
            self.samples.append((now, tuple(a and b for a, b in zip(first, second, strict=True))))
            lease = self.cluster.lease()
            spec = (lease or {}).get("spec") or {}
            if not self.lease_changes or self.lease_changes[-1][1] != spec:
                self.lease_changes.append((now, spec))
            time.sleep(self.period)

    def overlaps(self) -> list[tuple[float, tuple[bool, ...]]]:
        return [(t, s) for t, s in self.samples if sum(s) > 1]

    def first(self, index: int, value: bool, after: float = 0.0) -> float:
        for t, sample in self.samples:
            if t >= after and index < len(sample) and sample[index] == value:
                return t
        raise AssertionError(f"replica {index} never had is_leader={value} after {after}")

    def last_change_before(self, moment: float) -> tuple[float, dict[str, Any]]:
        changes = [(t, s) for t, s in self.lease_changes if t <= moment]
        assert changes, "the Lease was never seen"
        return changes[-1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` every 2 ms; the monotonic time it first held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return time.monotonic()
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stays(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` holds on every check for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not condition():
            return False
        time.sleep(0.005)
    return condition()


@pytest.fixture
def cluster(kube_api: KubeApiServer) -> Iterator[Cluster]:
    cluster = Cluster(kube_api)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every elector and sampler thread a test starts has ended once its fixtures are torn down."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith(("canal-leader", "test-"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


def seed_lease(kube_api: KubeApiServer, holder: str, *, renewed: datetime, transitions: int = 0) -> None:
    """A Lease written by another replica (as client-go formats MicroTime)."""
    stamp = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kube_api.create(
        {
            "apiVersion": LEASE_API,
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS, "labels": {"app": "canal"}},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": int(LEASE),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": transitions,
            },
        }
    )


# ---------------------------------------------------------------------------------------------- acquisition


def test_one_of_two_leads_and_writes_the_record_as_client_go(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")
    b = cluster.replica("b")
    assert stays(lambda: a.is_leader and not b.is_leader, 3 * MAX_POLL)
    assert b.elector.observed_holder == "a"
    assert (a.elector.term, b.elector.term) == (1, 0)
    assert len(a.started) == 1 and not a.stopped and not b.started

    first = cluster.spec()
    assert first["holderIdentity"] == "a"
    assert first["leaseDurationSeconds"] == 2
    assert first["leaseTransitions"] == 0
    time.sleep(2 * RETRY + 0.05)
    later = cluster.spec()
    assert later["renewTime"] > first["renewTime"], "the leader renews every retry period"
    assert later["acquireTime"] == first["acquireTime"], "renewing keeps acquireTime"

    writes = [r for r in kube_api.requests if r.kind == "Lease" and r.verb in ("create", "update")]
    assert writes[0].verb == "create" and writes[0].code == 201
    assert all(r.body["spec"]["holderIdentity"] == "a" for r in writes), "the candidate never writes a held lease"
    for request in writes:  # MicroTime: the API server rejects anything but six fractional digits
        assert MICRO_TIME.match(request.body["spec"]["renewTime"]), request.body
        assert MICRO_TIME.match(request.body["spec"]["acquireTime"]), request.body
    assert all(r.body["metadata"].get("resourceVersion") for r in writes[1:]), "renewals carry the version read"


def test_a_lease_first_seen_is_waited_out_by_local_time_whatever_its_timestamps_say(
    cluster: Cluster, kube_api: KubeApiServer
) -> None:
    """An hour-old renewTime (a dead holder, or a clock behind) does not let a candidate take over at once: expiry
    is counted from when this replica saw the record, as client-go does, so clock skew cannot split the brain."""
    seed_lease(kube_api, "old-pod", renewed=datetime.now(UTC) - timedelta(hours=1), transitions=7)
    started = time.monotonic()
    a = cluster.replica("a")
    acquired = wait_for(lambda: a.is_leader, LEASE + MAX_POLL + 2, "a to take over the stale lease")
    assert acquired - started >= LEASE - 0.05
    assert acquired - started <= LEASE + MAX_POLL + SLACK + 0.3
    spec = cluster.spec()
    assert spec["holderIdentity"] == "a"
    assert spec["leaseTransitions"] == 8, "a takeover counts a transition"
    assert spec["acquireTime"] > (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert cluster.lease()["metadata"]["labels"] == {"app": "canal"}, "the rest of the Lease is kept"


def test_losing_the_creation_race_reads_the_winners_lease(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a", faulty=True, start=False)
    assert a.faults is not None
    a.faults.before_create = lambda: seed_lease(kube_api, "winner", renewed=datetime.now(UTC))
    a.elector.start()
    wait_for(lambda: a.elector.observed_holder == "winner", 3, "a to read the winner's lease")
    assert stays(lambda: not a.is_leader, 3 * MAX_POLL), "the winner's lease is valid"
    creates = kube_api.requests_of("create", kind="Lease")
    assert [r.code for r in creates] == [409], "one create, answered AlreadyExists"
    assert not kube_api.requests_of("update", kind="Lease")


# ------------------------------------------------------------------------------------------------- takeover


def test_takeover_after_the_leader_stops_renewing_waits_out_the_lease(cluster: Cluster) -> None:
    a = cluster.replica("a", release_on_cancel=False)
    wait_for(lambda: a.is_leader, 3, "a to lead")
    b = cluster.replica("b")
    time.sleep(2 * MAX_POLL)  # b has seen the lease
    with Sampler(cluster) as sampler:
        time.sleep(0.1)
        stopped = time.monotonic()
        assert a.elector.stop(timeout=2)
        assert not a.is_leader and len(a.stopped) == 1
        acquired = wait_for(lambda: b.is_leader, LEASE + MAX_POLL + 2, "b to take over")
    last_renew, _ = sampler.last_change_before(stopped + 0.05)
    # b cannot have taken over before the lease expired by its own observation of a's last renew ...
    assert acquired >= last_renew + LEASE - 0.05
    # ... and it notices within one poll afterwards
    assert acquired <= last_renew + LEASE + MAX_POLL + SLACK
    assert acquired - stopped <= LEASE + MAX_POLL + SLACK
    spec = cluster.spec()
    assert spec["holderIdentity"] == "b"
    assert spec["leaseTransitions"] == 1
    assert not sampler.overlaps()


def test_graceful_release_hands_over_at_once(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")
    acquired_by_a = cluster.spec()["acquireTime"]
    b = cluster.replica("b")
    time.sleep(2 * MAX_POLL)
    with Sampler(cluster) as sampler:
        stopped = time.monotonic()
        assert a.elector.stop(timeout=2)
        acquired = wait_for(lambda: b.is_leader, LEASE, "b to take over")
    assert acquired - stopped <= MAX_POLL + SLACK, "no waiting for the lease to expire"
    # a stopped leading before it released: on_stopped_leading saw is_leader False and a still holding the lease
    assert a.leader_in_stopped == [False]
    assert a.holder_in_stopped == ["a"]
    released = [r for r in kube_api.requests_of("update", kind="Lease") if r.body["spec"]["holderIdentity"] == ""]
    assert len(released) == 1 and released[0].code == 200
    assert released[0].body["spec"]["leaseDurationSeconds"] == 1
    spec = cluster.spec()
    assert spec["holderIdentity"] == "b"
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] != acquired_by_a
    assert not sampler.overlaps()


def test_a_stopped_candidate_releases_nothing(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")
    b = cluster.replica("b")
    time.sleep(MAX_POLL)
    assert b.elector.stop(timeout=2)
    assert cluster.holder() == "a" and a.is_leader
    assert all(r.body["spec"]["holderIdentity"] == "a" for r in kube_api.requests_of("update", kind="Lease"))


# ---------------------------------------------------------------------------------------------- stepping down


def test_leader_steps_down_within_renew_deadline_when_renews_fail(cluster: Cluster, kube_api: KubeApiServer) -> None:
    """500s on every Lease write: the leader retries each retry period and stops leading at last renew + renew
    deadline, a second before the lease could expire for anyone else."""
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")
    with Sampler(cluster) as sampler:
        time.sleep(2 * RETRY)
        injected = time.monotonic()
        kube_api.inject_failure(500, times=10**6, method="PUT", kind="Lease", message="etcdserver: request timed out")
        down = wait_for(lambda: bool(a.stopped), RENEW + RETRY + 1, "a to step down")
        assert stays(lambda: not a.is_leader, 3 * RETRY), "no new term while the writes fail"
    last_renew, _ = sampler.last_change_before(injected + 0.05)
    not_leader = sampler.first(0, False, after=injected)
    expires_for_others = last_renew + LEASE  # the earliest anyone observing that renew could take over
    # is_leader turned False at the deadline of the last successful renew (which started before it was seen) ...
    assert not_leader <= last_renew + RENEW + 0.05
    # ... not at the first failure: the renew was retried until then
    assert not_leader >= last_renew + RENEW - RETRY - 0.1
    assert a.stopped[0] <= last_renew + RENEW + 0.1
    # and all of it well before the lease could have expired for the others
    margin = (LEASE - RENEW) / 2
    assert not_leader < expires_for_others - margin
    assert down < expires_for_others - margin
    failed = [r for r in kube_api.requests_of("update", kind="Lease") if r.code == 500]
    assert len(failed) >= 3, "renews are retried every retry period"
    assert a.leader_in_stopped == [False]
    assert cluster.holder() == "a", "the record is untouched: nobody took over"


def test_partitioned_leader_steps_down_before_another_takes_over(cluster: Cluster) -> None:
    a = cluster.replica("a", faulty=True)
    wait_for(lambda: a.is_leader, 3, "a to lead")
    b = cluster.replica("b")
    time.sleep(2 * MAX_POLL)
    assert a.faults is not None
    with Sampler(cluster) as sampler:
        time.sleep(0.05)
        cut = time.monotonic()
        a.faults.partitioned.set()
        wait_for(lambda: b.is_leader, LEASE + MAX_POLL + 2, "b to take over")
        a.faults.partitioned.clear()
        wait_for(lambda: a.elector.observed_holder == "b", 2, "a to see b")
        assert stays(lambda: b.is_leader and not a.is_leader, 2 * MAX_POLL)
    a_down = sampler.first(0, False, after=cut)
    b_up = sampler.first(1, True, after=cut)
    assert a_down <= cut + RENEW + 0.05
    assert b_up - a_down >= LEASE - RENEW - RETRY - 0.1, "a gap of about lease - renew deadline between leaders"
    assert not sampler.overlaps()
    assert (len(a.started), len(a.stopped), len(b.started)) == (1, 1, 1)
    assert cluster.spec()["leaseTransitions"] == 1


def test_is_leader_turns_false_by_the_clock_while_the_elector_thread_is_stuck(cluster: Cluster) -> None:
    registry = CollectorRegistry()
    a = cluster.replica("a", faulty=True, registry=registry)
    assert a.faults is not None
    wait_for(lambda: a.is_leader, 3, "a to lead")
    term = a.elector.guard()
    assert term.valid and registry.get_sample_value("canal_controller_leader") == 1.0
    a.faults.hang_next_write.set()  # the next renew blocks, whatever its timeout says (think getaddrinfo)
    hung = wait_for(a.faults.hung.is_set, 2, "a renew to hang")
    not_leader = wait_for(lambda: not a.is_leader, RENEW + 0.5, "is_leader to turn False")
    # the deadline counts from the start of the last successful renew, a retry period before the hung one
    assert not_leader - hung <= RENEW - RETRY + 0.1
    assert a.faults.hung.is_set(), "the elector thread is still stuck: the clock alone did it"
    assert not a.stopped, "on_stopped_leading runs on the elector thread, which is stuck"
    assert not term.valid and a.elector.leading_term() is None
    with pytest.raises(NotLeaderError):
        a.elector.guard()
    assert registry.get_sample_value("canal_controller_leader") == 0.0, "the gauge follows the clock too"

    a.faults.unhang.set()  # the late renew succeeds, but the term it belonged to is over
    wait_for(lambda: bool(a.stopped), 2, "on_stopped_leading")
    wait_for(lambda: a.is_leader, 3 * MAX_POLL + 1, "a to lead again (its own lease)")
    assert a.elector.term == 2 and len(a.started) == 2
    assert not term.valid, "a term never comes back"
    assert a.elector.guard().number == 2
    assert cluster.spec()["leaseTransitions"] == 0, "the same holder again: no transition"
    assert registry.get_sample_value("canal_controller_leader_transitions_total") == 2.0


def test_leader_steps_down_at_once_when_another_holder_is_observed(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def intrude(lease: dict[str, Any]) -> None:
        lease["spec"].update(holderIdentity="intruder", renewTime=stamp, acquireTime=stamp)

    intruded = time.monotonic()
    kube_api.modify(LEASE_API, "Lease", NAME, NS, intrude)
    down = wait_for(lambda: bool(a.stopped), RENEW, "a to step down")
    assert down - intruded <= RETRY + SLACK, "at the next renew, not at the deadline"
    assert not a.is_leader and a.elector.observed_holder == "intruder"
    again = wait_for(lambda: a.is_leader, LEASE + MAX_POLL + 2, "a to take the intruder's expired lease")
    assert again - intruded >= LEASE - 0.05, "the intruder's lease is honoured for its full duration"
    assert cluster.spec()["leaseTransitions"] == 1
    assert a.elector.term == 2


# ------------------------------------------------------------------------------------------------ conflicts


def test_conflicts_on_renew_are_retried_on_a_fresh_read(cluster: Cluster, kube_api: KubeApiServer) -> None:
    a = cluster.replica("a")
    wait_for(lambda: a.is_leader, 3, "a to lead")

    def renewed_after(count: int) -> Callable[[], bool]:
        def check() -> bool:
            updates = kube_api.requests_of("update", kind="Lease")
            conflicts = [i for i, r in enumerate(updates) if r.code == 409]
            return len(conflicts) >= count and any(r.code == 200 for r in updates[conflicts[-1] :])

        return check

    with Sampler(cluster) as sampler:
        # one concurrent write: the optimistic renew gets 409, the re-read renew succeeds in the same tick
        kube_api.inject_conflict(LEASE_API, "Lease", NAME, NS, times=1)
        wait_for(renewed_after(1), 2, "a renew after one conflict")
        # more conflicts than one tick's attempts: the next tick goes on, well within the renew deadline
        kube_api.inject_conflict(LEASE_API, "Lease", NAME, NS, times=5)
        wait_for(renewed_after(6), 2, "a renew after five more conflicts")
        time.sleep(2 * RETRY)
    assert all(s[0] for _, s in sampler.samples), "a led throughout"
    assert a.elector.term == 1 and not a.stopped
    lease = cluster.lease()
    assert lease is not None
    assert lease["metadata"]["annotations"]["kube-api.test/concurrent-writes"] == "6", "the other writer's change stays"
    assert lease["spec"]["holderIdentity"] == "a"


def test_never_two_leaders_through_partitions_and_hand_overs(cluster: Cluster) -> None:
    """Three replicas; the leader is partitioned away twice (the other two race for the expired lease: one gets
    the 409), then stops gracefully. Sampled every millisecond, is_leader is never True on two at once."""
    replicas = [cluster.replica(name, faulty=True) for name in ("a", "b", "c")]
    with Sampler(cluster) as sampler:
        wait_for(lambda: len(cluster.leaders()) == 1, 3, "a leader")
        for _ in range(2):
            old = cluster.leaders()[0]
            assert old.faults is not None
            old.faults.partitioned.set()
            wait_for(lambda old=old: any(r.is_leader for r in replicas if r is not old), LEASE + 3, "a new leader")
            old.faults.partitioned.clear()
        assert cluster.spec()["leaseTransitions"] == 2
        last = cluster.leaders()[0]
        released = time.monotonic()
        assert last.elector.stop(timeout=2)
        took_over = wait_for(lambda: bool(cluster.leaders()), LEASE, "a leader after the release")
        time.sleep(2 * RETRY)
    assert took_over - released <= MAX_POLL + SLACK
    assert cluster.spec()["leaseTransitions"] == 3
    overlaps = sampler.overlaps()
    assert not overlaps, f"two leaders at once: {overlaps[:3]}"
    assert len(sampler.samples) > 1000
    assert sum(len(r.started) for r in replicas) == 4
    assert sum(len(r.stopped) for r in replicas) == 3


# ----------------------------------------------------------------------------------------------- lifecycle


def test_stop_ends_run_promptly(cluster: Cluster) -> None:
    """The controller runs `run(stop)` on its own thread; setting the event ends it within a request or so."""
    a = cluster.replica("a", start=False)
    b = cluster.replica("b", start=False)
    stop = threading.Event()
    threads = [
        threading.Thread(target=r.elector.run, args=(stop,), name=f"test-run-{r.identity}", daemon=True) for r in (a, b)
    ]
    threads[0].start()
    wait_for(lambda: a.is_leader, 3, "a to lead")
    threads[1].start()
    time.sleep(MAX_POLL)
    with pytest.raises(RuntimeError):
        a.elector.run(stop)  # one run at a time
    with pytest.raises(RuntimeError):
        a.elector.stop()  # not started with start()
    began = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(2)
        assert not thread.is_alive()
    assert time.monotonic() - began < 0.5
    assert not a.is_leader and len(a.stopped) == 1
    assert cluster.holder() == "", "released on the way out"


def test_stop_while_the_api_server_is_unreachable_is_prompt(cluster: Cluster) -> None:
    a = cluster.replica("a", faulty=True)
    wait_for(lambda: a.is_leader, 3, "a to lead")
    assert a.faults is not None
    a.faults.partitioned.set()
    began = time.monotonic()
    assert a.elector.stop(timeout=2)
    assert time.monotonic() - began < 0.5
    assert not a.is_leader and cluster.holder() == "a", "the release failed; the lease will just expire"
    with pytest.raises(RuntimeError):
        a.elector.start()  # one start per elector


# ------------------------------------------------------------------------------------------------ the parts


def test_settings_are_validated_and_the_lease_duration_rounded_up(kube_api: KubeApiServer) -> None:
    with kube_api.client() as api:

        def elector(**options: Any) -> LeaderElector:
            return LeaderElector(api, NS, NAME, options.pop("identity", "a"), **options)

        assert elector().lease_duration_seconds == 15
        # never shorter than the renew deadline this replica relies on
        assert elector(lease_duration=1.5, renew_deadline=1.0, retry_period=0.2).lease_duration_seconds == 2
        for bad in (
            {"identity": ""},
            {"retry_period": 0},
            {"lease_duration": 10.0, "renew_deadline": 10.0},
            {"renew_deadline": 2.4, "retry_period": 2.0},  # not more than retry_period * 1.2
        ):
            with pytest.raises(ValueError):
                elector(**bad)
        with pytest.raises(ValueError):
            LeaderElector(api, "", NAME, "a")


def test_micro_time_always_has_six_fractional_digits() -> None:
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert MICRO_TIME.match(micro_time(whole).isoformat())
    assert micro_time(whole) - whole == timedelta(microseconds=1)
    exact = whole.replace(microsecond=123456)
    assert micro_time(exact) == exact
    assert micro_time(datetime(2026, 1, 2, 3, 4, 5, 7)).tzinfo is UTC, "naive times are UTC"


def test_terms_and_guards() -> None:
    always = AlwaysLeader()
    term = guard(always)
    assert term == Term(1, always) and term.valid and always.is_leader
    term.check()
    assert always.guard().number == 1 and not always.holds(2)

    class Flipping:
        def __init__(self) -> None:
            self.term: int | None = 1

        @property
        def is_leader(self) -> bool:
            return self.term is not None

        def leading_term(self) -> int | None:
            return self.term

        def holds(self, term: int) -> bool:
            return self.term == term

    leadership = Flipping()
    held = guard(leadership)
    leadership.term = 2  # lost and regained between reading and writing
    assert not held.valid
    with pytest.raises(NotLeaderError):
        held.check()
    leadership.term = None
    with pytest.raises(NotLeaderError):
        guard(leadership)


def test_metrics(cluster: Cluster) -> None:
    registry = CollectorRegistry()
    a = cluster.replica("a", registry=registry)
    assert registry.get_sample_value("canal_controller_leader_transitions_total") in (0.0, 1.0)
    wait_for(lambda: a.is_leader, 3, "a to lead")
    assert registry.get_sample_value("canal_controller_leader") == 1.0
    assert registry.get_sample_value("canal_controller_leader_transitions_total") == 1.0
    assert a.elector.stop(timeout=2)
    assert registry.get_sample_value("canal_controller_leader") == 0.0
