"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it, with a stricter clock.

Every controller replica serves xDS from its own informers; only the leader writes (InternalGateway status,
Events, the CoreDNS Corefile). Two writers at once would fight over the same objects, so the property that
matters is: this replica's `is_leader` is False before any other replica could consider the lease expired.

How that holds (one host's clocks are never compared with another's):

* A candidate measures expiry from the moment *it* last saw the lease record change (holder, duration,
  acquire/renew time, transitions), plus the holder's ``leaseDurationSeconds``; the timestamps in the record
  are informational only, so a skewed clock on any node cannot shorten a lease. A lease first seen at startup
  is therefore waited out in full, however old its renewTime says it is.
* The leader's deadline is the local monotonic time at which its last successful renew *started* plus
  ``renew_deadline``. The write committed after that start, and every other replica saw it even later, so
  ``deadline < their observation + leaseDurationSeconds`` as long as ``renew_deadline < lease_duration``
  (leaseDurationSeconds is an integer: ``lease_duration`` is rounded *up*, never down).
* `is_leader` compares the deadline with the clock on every read, so it turns False on time even when the
  elector thread is stuck (a DNS lookup that ignores socket timeouts, a callback that blocks).
  Renew failures (API errors, timeouts, 409s that keep coming) are retried every ``retry_period`` until the
  deadline; seeing another holder ends the term at once.
* A term that lapsed is over even if a late renew then succeeds: `is_leader` never flaps back within a term.
  The replica steps down (on_stopped_leading) and campaigns again; its own lease it re-takes immediately.

Writes use the resourceVersion read (optimistic concurrency: a 409 re-reads and retries), keep the Lease's
other fields (those the official client models; it drops unknown ones on read), and write the record fields
client-go writes. On stop, with ``release_on_cancel``, the leader
first stops leading, then calls on_stopped_leading, then empties holderIdentity so another replica takes over
at its next poll instead of after the lease duration.

Writers use `Leadership` (`LeaderElector` or, without election, `AlwaysLeader`): `is_leader` right before each
write, or `guard()` for a `Term` that also notices a lost-and-regained lease between reading and writing.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge
from urllib3.exceptions import HTTPError

log = logging.getLogger(__name__)

T = TypeVar("T")
Callback = Callable[[], None]

JITTER_FACTOR = 1.2  # client-go's: a candidate polls every retry_period * [1, 2.2)
_WRITE_ATTEMPTS = 3  # read-modify-write rounds per tick when PUTs keep meeting 409s
_MIN_REQUEST_TIMEOUT = 0.001  # the client rejects a zero timeout (and zero would mean "none")


# ------------------------------------------------------------------------------------------------ leadership


class NotLeaderError(RuntimeError):
    """A leader-only write was about to happen outside the term it was started in."""


class Leadership(Protocol):
    """What leader-only writers need. `holds` is for work that spans time: it is False once the term the work
    started in has ended, even if this replica leads again (another leader may have written in between)."""

    @property
    def is_leader(self) -> bool: ...

    def leading_term(self) -> int | None:
        """The current term's number while leading, else None (one atomic read, unlike is_leader then term)."""
        ...

    def holds(self, term: int) -> bool:
        """Leading now, and still in `term`."""
        ...


@dataclass(frozen=True, slots=True)
class Term:
    """A writer's handle on the term its work started in: check it right before each write."""

    number: int
    leadership: Leadership

    @property
    def valid(self) -> bool:
        return self.leadership.holds(self.number)

    def check(self) -> None:
        if not self.valid:
            raise NotLeaderError(f"leadership term {self.number} has ended")


def guard(leadership: Leadership) -> Term:
    """The current term, for work that must be dropped if leadership changes before it writes."""
    term = leadership.leading_term()
    if term is None:
        raise NotLeaderError("not leading")
    return Term(term, leadership)


class AlwaysLeader:
    """Leadership without election (one replica, `--no-leader-election`, tests): one term that never ends."""

    @property
    def is_leader(self) -> bool:
        return True

    def leading_term(self) -> int | None:
        return 1

    def holds(self, term: int) -> bool:
        return term == 1

    def guard(self) -> Term:
        return guard(self)


# ---------------------------------------------------------------------------------------------------- metrics


class LeaderMetrics:
    """``canal_controller_leader`` (evaluated at scrape time, so a stuck elector cannot leave a stale 1) and
    ``canal_controller_leader_transitions_total`` (terms this replica started: each acquisition of the lease)."""

    def __init__(self, registry: CollectorRegistry, is_leader: Callable[[], bool]) -> None:
        self.leader = Gauge(
            "canal_controller_leader",
            "1 while this replica holds the controller Lease and may write status, Events and CoreDNS",
            registry=registry,
        )
        self.leader.set_function(lambda: 1.0 if is_leader() else 0.0)
        self.transitions = Counter(
            "canal_controller_leader_transitions",
            "Times this replica acquired the controller Lease (each starts a new leadership term)",
            registry=registry,
        )


# ------------------------------------------------------------------------------------------------ the record


@dataclass(frozen=True, slots=True)
class _Record:
    """The fields of a Lease that leader election reads; a change in any of them restarts the expiry clock."""

    holder: str
    duration: int
    acquire: datetime | None
    renew: datetime | None
    transitions: int

    @classmethod
    def of(cls, lease: client.V1Lease) -> _Record:
        spec = lease.spec
        if spec is None:
            return cls("", 0, None, None, 0)
        return cls(
            spec.holder_identity or "",
            spec.lease_duration_seconds or 0,
            spec.acquire_time,
            spec.renew_time,
            spec.lease_transitions or 0,
        )


def micro_time(moment: datetime) -> datetime:
    """A Lease time the API server accepts. MicroTime must have exactly six fractional digits, and the official
    client serializes with ``isoformat()``, which drops them when the microsecond is 0; 1 µs off fixes that."""
    moment = moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment.replace(microsecond=1) if moment.microsecond == 0 else moment


class _Outcome(Enum):
    OK = "ok"  # we hold the lease, freshly written
    HELD = "held"  # someone else holds it (still valid for a candidate; any other holder for the leader)
    FAILED = "failed"  # could not tell or could not write: retry later


class _Lead(Enum):
    RENEWED = "renewed"
    LOST = "lost"
    STOPPED = "stopped"


class _CallFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, 0 when the API server was not reached or did not answer in time


# --------------------------------------------------------------------------------------------------- elector


class LeaderElector:
    """Campaigns for, holds and releases one Lease. Run it with `run(stop)` on a thread of its own (or `start()`).

    ``api``: an official ApiClient or CoordinationV1Api. ``identity``: unique per replica (the pod name).
    Durations in seconds: ``lease_duration`` is what others wait after the last renew they saw;
    ``renew_deadline`` is how long this leader goes on without a successful renew (it must be shorter);
    ``retry_period`` is the renew interval and the candidates' polling interval (jittered up to 2.2x).

    ``on_started_leading`` / ``on_stopped_leading`` are called on the elector's thread, once per term, in
    order: renewals wait while they run, so they must return quickly (hand work to another thread). If one
    blocks, `is_leader` still turns False at the deadline. An exception in a callback is logged, nothing more.
    On stop the release waits for on_stopped_leading: a callback that drains in-flight writes makes the
    hand-over clean. A candidate's stop waits at most for its request in flight (bounded by renew_deadline).
    `is_leader`, `term`, `leading_term`, `holds` and `observed_holder` are safe from any thread.
    """

    def __init__(
        self,
        api: client.ApiClient | client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callback | None = None,
        on_stopped_leading: Callback | None = None,
        release_on_cancel: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not namespace or not name:
            raise ValueError("the Lease needs a namespace and a name")
        if not identity:
            raise ValueError("the identity must not be empty (use the pod name)")
        if retry_period <= 0:
            raise ValueError(f"retry_period must be positive, not {retry_period}")
        if renew_deadline <= JITTER_FACTOR * retry_period:
            raise ValueError(
                f"renew_deadline ({renew_deadline}s) must be greater than retry_period * {JITTER_FACTOR} "
                f"({JITTER_FACTOR * retry_period:g}s)"
            )
        if lease_duration <= renew_deadline:
            raise ValueError(
                f"lease_duration ({lease_duration}s) must be greater than renew_deadline ({renew_deadline}s)"
            )
        self.api = api if isinstance(api, client.CoordinationV1Api) else client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        # What others are told to wait; rounded up so it is never shorter than what this replica relies on.
        self.lease_duration_seconds = math.ceil(lease_duration)
        self._clock = time.monotonic
        self._lock = threading.Lock()
        # Shared with other threads (under _lock):
        self._leading = False
        self._deadline = 0.0  # monotonic; meaningful while _leading
        self._term = 0
        self._holder = ""
        self._running = False
        self._thread: threading.Thread | None = None
        self._thread_stop: threading.Event | None = None
        # The elector thread's own:
        self._lease: client.V1Lease | None = None  # as last read or written (its resourceVersion is the precondition)
        self._observed: _Record | None = None
        self._observed_at = 0.0
        self.metrics = LeaderMetrics(registry, lambda: self.is_leader) if registry is not None else None

    def __str__(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    # -- Leadership, for any thread

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the lease and its renew deadline has not passed (checked against the
        clock on every read, so it turns False on time even when the elector thread is stuck)."""
        with self._lock:
            return self._leading and self._clock() < self._deadline

    @property
    def term(self) -> int:
        """The number of the latest term this replica started (0 before the first); +1 per acquisition."""
        with self._lock:
            return self._term

    def leading_term(self) -> int | None:
        with self._lock:
            return self._term if self._leading and self._clock() < self._deadline else None

    def holds(self, term: int) -> bool:
        with self._lock:
            return self._leading and self._term == term and self._clock() < self._deadline

    def guard(self) -> Term:
        """The current term (raises NotLeaderError when not leading); ``term.check()`` before each write."""
        return guard(self)

    @property
    def observed_holder(self) -> str:
        """The holderIdentity in the Lease as last seen ("" when released or not seen yet), for /status."""
        with self._lock:
            return self._holder

    # -- running

    def start(self) -> threading.Thread:
        """`run` on a daemon thread of its own until `stop()`."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"the elector for {self} was already started")
            self._thread_stop = threading.Event()
            self._thread = threading.Thread(
                target=self.run, args=(self._thread_stop,), name=f"canal-leader-{self.identity}", daemon=True
            )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> bool:
        """End what `start()` started (stepping down and releasing as `run` does); True once the thread ended."""
        with self._lock:
            thread, event = self._thread, self._thread_stop
        if thread is None or event is None:
            raise RuntimeError(f"the elector for {self} was not started with start()")
        event.set()
        thread.join(timeout)
        return not thread.is_alive()

    def run(self, stop: threading.Event) -> None:
        """Campaign, lead, and campaign again after losing the lease, until `stop` is set. Blocking. On stop a
        leader steps down (is_leader False, then on_stopped_leading) and, with release_on_cancel, releases."""
        with self._lock:
            if self._running:
                raise RuntimeError(f"the elector for {self} is already running")
            self._running = True
        try:
            while not stop.is_set():
                if not self._campaign(stop):
                    break
                outcome = self._lead(stop)
                self._step_down()
                if outcome is _Lead.STOPPED:
                    if self.release_on_cancel:
                        self._release()
                    break
        finally:
            self._step_down()  # only does something when leaving by an exception
            with self._lock:
                self._running = False

    # -- the state machine (elector thread)

    def _campaign(self, stop: threading.Event) -> bool:
        """Try until acquired (True) or stopped (False)."""
        while not stop.is_set():
            started = self._clock()
            if self._attempt(leading=False, deadline=started + self.renew_deadline) is _Outcome.OK:
                self._begin_term(started)
                return True
            if stop.wait(self.retry_period * (1 + random.random() * JITTER_FACTOR)):
                return False
        return False

    def _lead(self, stop: threading.Event) -> _Lead:
        """Renew every retry_period until the term ends."""
        while not stop.wait(self.retry_period):
            outcome = self._renew(stop)
            if outcome is not _Lead.RENEWED:
                return outcome
        return _Lead.STOPPED

    def _renew(self, stop: threading.Event) -> _Lead:
        """One renewal: retried every retry_period until the deadline of the last successful one."""
        with self._lock:
            deadline = self._deadline
        while True:
            started = self._clock()
            if started >= deadline:
                log.warning("%s: no successful renew within %gs; stepping down", self, self.renew_deadline)
                return _Lead.LOST
            outcome = self._attempt(leading=True, deadline=deadline)
            if outcome is _Outcome.OK:
                with self._lock:
                    if self._clock() < self._deadline:
                        self._deadline = started + self.renew_deadline
                        return _Lead.RENEWED
                log.warning("%s: renewed only after the deadline had passed; this term is over", self)
                return _Lead.LOST
            if outcome is _Outcome.HELD:
                log.warning("%s: now held by %r; stepping down", self, self.observed_holder)
                return _Lead.LOST
            pause = min(self.retry_period, deadline - self._clock())
            if pause > 0 and stop.wait(pause):
                return _Lead.STOPPED

    def _begin_term(self, started: float) -> None:
        with self._lock:
            self._leading = True
            self._term += 1
            self._deadline = started + self.renew_deadline
            term = self._term
        if self.metrics is not None:
            self.metrics.transitions.inc()
        log.info("%s: acquired by %s (term %d)", self, self.identity, term)
        self._call_back(self._on_started, "on_started_leading")

    def _step_down(self) -> None:
        with self._lock:
            was_leading, self._leading = self._leading, False
            term = self._term
        if was_leading:
            log.info("%s: %s stopped leading (term %d)", self, self.identity, term)
            self._call_back(self._on_stopped, "on_stopped_leading")

    def _call_back(self, callback: Callback | None, what: str) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("%s: %s failed", self, what)

    # -- one acquire-or-renew attempt (client-go's tryAcquireOrRenew)

    def _attempt(self, *, leading: bool, deadline: float) -> _Outcome:
        try:
            return self._try_acquire_or_renew(leading=leading, deadline=deadline)
        except _CallFailed as failure:
            log.warning("%s: %s failed: %s", self, "renew" if leading else "acquire", failure)
        except Exception:  # a bug or a malformed answer must not end the thread: this replica would never lead again
            log.exception("%s: unexpected error while trying to %s", self, "renew" if leading else "acquire")
        self._lease = None
        return _Outcome.FAILED

    def _try_acquire_or_renew(self, *, leading: bool, deadline: float) -> _Outcome:
        if leading and self._lease is not None:
            # Fast path: assume the lease is as this replica last wrote it.
            try:
                self._accept(self._put(deadline, self._claimed(self._lease)))
                return _Outcome.OK
            except _CallFailed as failure:
                log.info("%s: renew of the last written version failed (%s); re-reading", self, failure)
                self._lease = None
        for _ in range(_WRITE_ATTEMPTS):
            try:
                lease = self._call(deadline, self._read)
            except _CallFailed as failure:
                if failure.status != 404:
                    raise
                if leading:
                    log.warning("%s: deleted while this replica led", self)
                    return _Outcome.HELD
                try:
                    self._accept(self._call(deadline, self._create))
                except _CallFailed as create_failed:
                    if create_failed.status == 409:  # AlreadyExists: another replica created it first; read theirs
                        continue
                    raise
                return _Outcome.OK
            record = self._observe(lease)
            if leading and record.holder != self.identity:
                return _Outcome.HELD
            if not leading and record.holder not in ("", self.identity) and self._valid(record):
                return _Outcome.HELD
            try:
                self._accept(self._put(deadline, self._claimed(lease)))
            except _CallFailed as failure:
                if failure.status == 409:  # written meanwhile: decide again on a fresh read
                    continue
                raise
            return _Outcome.OK
        log.warning("%s: still conflicting after %d writes", self, _WRITE_ATTEMPTS)
        return _Outcome.FAILED

    def _valid(self, record: _Record) -> bool:
        """Whether `record` has not expired by this replica's own observation (never by its timestamps)."""
        seconds = record.duration if record.duration > 0 else self.lease_duration_seconds
        return self._clock() < self._observed_at + seconds

    def _observe(self, lease: client.V1Lease) -> _Record:
        record = _Record.of(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
            with self._lock:
                changed, self._holder = self._holder != record.holder, record.holder
            if changed:
                log.info("%s: holder is now %r", self, record.holder)
        return record

    def _accept(self, lease: client.V1Lease) -> None:
        """What this replica just wrote is the version the next renew starts from."""
        self._lease = lease
        self._observe(lease)

    def _claimed(self, lease: client.V1Lease) -> client.V1Lease:
        """`lease` with this replica as holder, renewed now. Taking it from someone else (or from nobody) sets
        acquireTime and counts a transition; renewing keeps them. Everything else in the Lease is kept."""
        record = _Record.of(lease)
        now = micro_time(datetime.now(UTC))
        ours = record.holder == self.identity
        spec = copy.copy(lease.spec) if lease.spec is not None else client.V1LeaseSpec()
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_duration_seconds
        spec.acquire_time = micro_time(record.acquire) if ours and record.acquire is not None else now
        spec.renew_time = now
        spec.lease_transitions = record.transitions if ours else record.transitions + 1
        claimed = copy.copy(lease)
        claimed.spec = spec
        return claimed

    def _released(self, lease: client.V1Lease) -> client.V1Lease:
        """`lease` with no holder (client-go's release: others take it at their next poll)."""
        record = _Record.of(lease)
        now = micro_time(datetime.now(UTC))
        spec = copy.copy(lease.spec) if lease.spec is not None else client.V1LeaseSpec()
        spec.holder_identity = ""
        spec.lease_duration_seconds = 1
        spec.acquire_time = now
        spec.renew_time = now
        spec.lease_transitions = record.transitions
        released = copy.copy(lease)
        released.spec = spec
        return released

    def _release(self) -> None:
        """Hand the lease back on stop, unless someone else holds it by now (the resourceVersion guards that).
        Bounded (one retry period, at least 1 s) so a shutdown never waits long on a dead API server: a release
        that does not happen only means the others wait for the lease to expire."""
        deadline = self._clock() + min(self.renew_deadline, max(self.retry_period, 1.0))
        lease = self._lease
        try:
            for _ in range(_WRITE_ATTEMPTS):
                if lease is None:
                    lease = self._call(deadline, self._read)
                    self._observe(lease)
                if _Record.of(lease).holder != self.identity:
                    return
                try:
                    self._accept(self._put(deadline, self._released(lease)))
                except _CallFailed as failure:
                    if failure.status != 409:
                        raise
                    lease = None
                    continue
                log.info("%s: released by %s", self, self.identity)
                return
        except _CallFailed as failure:
            log.warning("%s: release failed (%s); others take over when it expires", self, failure)

    # -- API calls

    def _call(self, deadline: float, request: Callable[[float], T]) -> T:
        """One request with what is left until `deadline` as its timeout; failures as _CallFailed."""
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _CallFailed(0, "out of time before the request")
        try:
            return request(max(remaining, _MIN_REQUEST_TIMEOUT))
        except ApiException as error:
            raise _CallFailed(error.status or 0, f"HTTP {error.status}: {error.reason}") from error
        except (HTTPError, OSError) as error:
            raise _CallFailed(0, f"API server unreachable: {error}") from error

    def _read(self, timeout: float) -> client.V1Lease:
        return self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)

    def _create(self, timeout: float) -> client.V1Lease:
        now = micro_time(datetime.now(UTC))
        body = client.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=self.lease_duration_seconds,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        return self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)

    def _put(self, deadline: float, body: client.V1Lease) -> client.V1Lease:
        """Replace the Lease with `body`, whose resourceVersion is the precondition (stale: 409)."""
        return self._call(
            deadline, lambda t: self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=t)
        )
