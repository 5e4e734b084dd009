"""The ADS server: State-of-the-World and Delta xDS over one gRPC stream per client (grpc.aio).

Protocol rules (Envoy's "xDS REST and gRPC protocol"; lessons from go-control-plane):

- Every response carries a fresh nonce. A request is an ACK or NACK only if its response_nonce is the last one
  sent for that type; NACK means error_detail is set. A NACKed version is not sent again (no resend loop); the
  error is kept for status and metrics, and the next change is pushed as usual.
- SotW: requests with a stale nonce are dropped (the client will send its current subscription with the next
  ACK). Delta: they are never dropped; subscribe/unsubscribe always apply. LDS, CDS and the redirect type are
  full-state in SotW (a missing name is a deletion); RDS and EDS are per name.
- Make before break: a listener or route configuration is sent only when every cluster it uses is ACKed and has
  received its endpoints since it last changed; a cluster leaves CDS only after nothing the client holds still
  routes to it. A changed cluster always gets its ClusterLoadAssignment again (otherwise it warms for 15 s).
- Versions are content hashes, so a client reconnecting with the versions it holds is not sent them again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from canal.xds.cache import Resource, Snapshot, SnapshotCache, type_version
from canal.xds.metrics import XdsMetrics
from canal.xds.types import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, REDIRECT, ROUTE, SHORT, group_of
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a full sync of thousands of services is tens of MB; 4 MB is gRPC's default
# Envoy pings its xDS connection every 30 s (the bootstrap's connection_keepalive). gRPC servers by default count a
# ping that comes sooner than 5 minutes after the last one, with no data in between, as abuse, and after two such
# strikes end the connection with GOAWAY "too_many_pings": every idle Envoy would lose its stream every ~90 s.
MIN_CLIENT_PING_INTERVAL = 5.0
ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, REDIRECT)
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER, REDIRECT})
GATED_TYPES = frozenset({LISTENER, ROUTE})


MAX_ERROR_CHARS = 4096


def nack_message(message: str) -> str:
    """Envoy's NACK text can embed the whole rejected resource (megabytes for a big route configuration): keep the
    head, where Envoy names the problem, for logs, status and metrics."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters)"


@dataclass(slots=True)
class _TypeState:
    """What one client holds of one resource type, as far as this stream knows."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    subscribed: bool = False
    # SotW bookkeeping
    nonce: str = ""
    waiting: bool = False  # the client sent a request we have not answered (SotW flow control)
    sent: dict[str, Resource] = field(default_factory=dict)
    sent_version: str = ""
    nacked_version: str = ""
    nacked_nonce: str = ""  # a later request repeating this nonce is a subscription change, not an ACK
    # Delta bookkeeping
    client: dict[str, str] = field(default_factory=dict)  # name -> version the client holds
    pending: dict[str, dict[str, Resource | None]] = field(default_factory=dict)  # nonce -> changes
    nacked: dict[str, str] = field(default_factory=dict)
    # Both
    acked: dict[str, Resource] = field(default_factory=dict)
    error: str = ""
    # (the type's resources in the snapshot, the snapshot's clusters, the stream's epoch) when a pass found nothing
    # to send: while all three are the same objects, the next pass would find nothing either
    quiet: tuple[Any, Any, int] | None = None


class ProtocolError(Exception):
    pass


class _Stream(ABC):
    """One connected client: its subscriptions, what it ACKed, and the gating rules shared by SotW and Delta."""

    delta = False

    def __init__(self, server: XdsServer, peer: str) -> None:
        self.server = server
        self.peer = peer
        self.node_id = ""
        self.group = ""
        self.types: dict[str, _TypeState] = {}
        self.snapshot: Snapshot | None = None
        self.force_endpoints: set[str] = set()  # clusters whose endpoints must be sent again
        self.warm: dict[str, str] = {}  # cluster -> cluster version its endpoints were ACKed for
        self.nonces = itertools.count(1)
        self.converged_serial = 0
        self.epoch = 0  # bumped by every request: what a client holds or wants may have changed

    # ---------------------------------------------------------------------------------------- identity

    def identify(self, node: base_pb2.Node) -> None:
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        group = group_of(node.cluster, metadata)
        if group is None:
            raise ProtocolError(
                f"node {node.id!r} names no node group: set node metadata canal.io/group: <namespace>/<name> "
                "(canal bootstrap does) or canal.io/role: node-agent"
            )
        self.node_id = node.id or self.peer
        self.group = group

    def state(self, type_url: str) -> _TypeState:
        found = self.types.get(type_url)
        if found is None:
            if type_url not in ORDER:
                raise ProtocolError(f"resource type {type_url} is not served by Canal")
            found = self.types[type_url] = _TypeState()
        return found

    def nonce(self) -> str:
        return f"{next(self.nonces)}"

    # ------------------------------------------------------------------------------------------- targets

    def in_use(self) -> set[str]:
        """Clusters the client's current (or in-flight) listeners and routes send traffic to."""
        used: set[str] = set()
        for type_url in (LISTENER, ROUTE):
            state = self.types.get(type_url)
            if state is None:
                continue
            for resources in (state.acked, state.sent, *state.pending.values()):
                for resource in resources.values():
                    if resource is not None:
                        used |= resource.references
        return used

    def target(self, type_url: str, snapshot: Snapshot, *, final: bool = False) -> dict[str, Resource] | None:
        """What the client should hold of a type now; None while make-before-break holds it back.

        `final` ignores the gating and the stale clusters kept for in-use routes: the converged state.
        """
        state = self.types[type_url]
        available = snapshot.of(type_url)
        if state.wildcard or (len(state.names) >= len(available) and state.names.issuperset(available.keys())):
            wanted = dict(available)  # also Envoy's EDS subscription: every cluster by name
        else:
            wanted = {name: available[name] for name in state.names if name in available}
        if final:
            return wanted
        if type_url == CLUSTER:
            held = self.types[CLUSTER].acked
            for name in self.in_use() - wanted.keys():
                if name in held:  # still routed to: removed once the routes that use it are gone
                    wanted[name] = held[name]
        elif type_url == ENDPOINT:
            previous = {**state.sent, **state.acked}
            for name in state.names - wanted.keys():
                if name in previous and name in self.types.get(CLUSTER, _TypeState()).acked:
                    wanted[name] = previous[name]  # a stale cluster keeps its endpoints while it is kept
        elif type_url in GATED_TYPES and not all(
            self.ready(c, snapshot)
            for r in wanted.values()
            if not self.holds(state, r)  # what the client has already routes only to what it has
            for c in r.references
        ):
            return None
        return wanted

    @abstractmethod
    def holds(self, state: _TypeState, resource: Resource) -> bool:
        """The client has this version of the resource (or is being sent it): per protocol (SotW, Delta)."""

    def ready(self, cluster: str, snapshot: Snapshot) -> bool:
        """The client has this cluster at its current version, and has its endpoints since that version."""
        acked = self.types.get(CLUSTER)
        if acked is None:
            return False
        held = acked.acked.get(cluster)
        wanted = snapshot.of(CLUSTER).get(cluster)
        return (
            held is not None
            and wanted is not None
            and held.version == wanted.version
            and (self.warm.get(cluster) == held.version)
        )

    def is_quiet(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> bool:
        """Nothing can have changed for this type since a pass that had nothing to send (the common case for
        clusters and endpoints when a change touches only routes: their tables are the same objects)."""
        quiet = state.quiet
        if quiet is None or quiet[2] != self.epoch:
            return False
        if type_url == ENDPOINT and self.force_endpoints:
            return False
        return quiet[0] is snapshot.of(type_url) and quiet[1] is snapshot.of(CLUSTER)

    def mark_quiet(self, state: _TypeState, type_url: str, snapshot: Snapshot) -> None:
        state.quiet = (snapshot.of(type_url), snapshot.of(CLUSTER), self.epoch)

    def endpoints_acked(self, names: Iterable[str]) -> None:
        clusters = self.types.get(CLUSTER)
        if clusters is None:
            return
        for name in names:
            held = clusters.acked.get(name)
            if held is not None:
                self.warm[name] = held.version

    def clusters_sent(self, previous: dict[str, Resource], now: dict[str, Resource]) -> None:
        """A new or changed cluster warms until it receives endpoints: make sure it does."""
        for name, resource in now.items():
            old = previous.get(name)
            if old is None or old.version != resource.version:
                self.force_endpoints.add(name)

    def lagging(self, snapshot: Snapshot) -> list[str]:
        """The types whose ACKed resources differ from what the snapshot says the client should hold."""
        out = []
        for type_url, state in self.types.items():
            if not state.subscribed:
                continue
            final = self.target(type_url, snapshot, final=True)
            assert final is not None
            if final == state.acked:  # the usual case, settled by identity at C speed
                continue
            if {n: r.version for n, r in final.items()} != {n: r.version for n, r in state.acked.items()}:
                out.append(SHORT[type_url])
        return out

    def converged(self, snapshot: Snapshot) -> bool:
        return not self.lagging(snapshot)


class _SotwStream(_Stream):
    def holds(self, state: _TypeState, resource: Resource) -> bool:
        held = state.acked.get(resource.name)
        return held is not None and held.version == resource.version

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        self.epoch += 1
        state = self.state(request.type_url)
        if request.response_nonce != state.nonce:
            return  # stale: a response is on its way; its ACK will carry the current subscription
        state.subscribed = True
        state.names = set(request.resource_names)
        state.wildcard = request.type_url in WILDCARD_TYPES and (not state.names or "*" in state.names)
        state.waiting = True
        if not request.response_nonce:
            self._resume(request, state)
            return
        if request.HasField("error_detail"):
            state.nacked_version, state.nacked_nonce = state.sent_version, state.nonce
            state.error = nack_message(request.error_detail.message)
            self.server.nacked(self, request.type_url, state.error)
            return
        if state.nacked_nonce == state.nonce:
            # Envoy clears error_detail after sending a NACK once but keeps the nonce: its next request of this
            # type (a subscription change) still refers to the rejected response and accepts nothing.
            return
        state.acked = state.sent
        state.error = ""
        if request.type_url == ENDPOINT:
            self.endpoints_acked(state.sent)
        self.server.acked(self, request.type_url)

    def _resume(self, request: discovery_pb2.DiscoveryRequest, state: _TypeState) -> None:
        """A client reconnecting with versions it already holds (content hashes) is not sent them again."""
        if not request.version_info or self.snapshot is None:
            return
        current = self.target(request.type_url, self.snapshot, final=True) or {}
        if type_version(current) == request.version_info:
            state.sent = state.acked = current
            state.sent_version = request.version_info
            if request.type_url == ENDPOINT:
                self.warm.update({n: r.version for n, r in self.snapshot.of(CLUSTER).items() if n in current})

    def responses(self) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        snapshot = self.snapshot
        if snapshot is None:
            return out
        for type_url in ORDER:
            state = self.types.get(type_url)
            if state is None or not state.waiting or self.is_quiet(type_url, state, snapshot):
                continue
            wanted = self.target(type_url, snapshot)
            if wanted is None:
                continue
            available = snapshot.of(type_url)
            version = snapshot.version(type_url) if wanted == available else type_version(wanted)
            forced = type_url == ENDPOINT and bool(self.force_endpoints & wanted.keys())
            if (version == state.sent_version and not forced) or version == state.nacked_version:
                self.mark_quiet(state, type_url, snapshot)
                continue
            body = wanted
            if type_url not in FULL_STATE_TYPES:
                # RDS and EDS are incremental in SotW too: what a response leaves out is unchanged, not removed.
                # Sending only what differs from what the client holds spares Envoy re-reading every route
                # configuration (64 of them on a sharded gateway) and every endpoint set on each change.
                body = {
                    name: resource
                    for name, resource in wanted.items()
                    if (held := state.acked.get(name)) is None
                    or held.version != resource.version
                    or (type_url == ENDPOINT and name in self.force_endpoints)
                }
                if not body:  # only unsubscribed or vanished names: the client already holds the rest
                    state.sent = state.acked = dict(wanted)
                    state.sent_version = version
                    self.mark_quiet(state, type_url, snapshot)
                    continue
            if type_url == CLUSTER:
                self.clusters_sent(state.sent, wanted)
            if type_url == ENDPOINT:
                self.force_endpoints -= wanted.keys()
            state.nonce = self.nonce()
            state.sent, state.sent_version, state.waiting = wanted, version, False
            ordered = [body[name] for name in sorted(body)]
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    type_url=type_url,
                    nonce=state.nonce,
                    resources=[r.body for r in ordered],
                )
            )
            self.server.pushed(self, type_url, ordered)
        return out


class _DeltaStream(_Stream):
    delta = True

    def holds(self, state: _TypeState, resource: Resource) -> bool:
        return state.client.get(resource.name) == resource.version

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        self.epoch += 1
        state = self.state(request.type_url)
        if not state.subscribed:
            state.subscribed = True
            subscribe = set(request.resource_names_subscribe)
            state.wildcard = request.type_url in WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            state.client = dict(request.initial_resource_versions)
            self._resume(request.type_url, state)
        state.names |= set(request.resource_names_subscribe) - {"*"}
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            state.names.discard(name)
            state.client.pop(name, None)
            state.acked.pop(name, None)
        changes = state.pending.pop(request.response_nonce, None) if request.response_nonce else None
        if changes is None:
            return  # an initial request, a subscription change, or a stale nonce: never dropped in Delta
        if request.HasField("error_detail"):
            state.error = nack_message(request.error_detail.message)
            for name, resource in changes.items():
                if resource is None:
                    continue
                state.nacked[name] = resource.version
                held = state.acked.get(name)
                if held is None:
                    state.client.pop(name, None)
                else:
                    state.client[name] = held.version
            self.server.nacked(self, request.type_url, state.error)
            return
        state.error = ""
        for name, resource in changes.items():
            if resource is None:
                state.acked.pop(name, None)
            else:
                state.acked[name] = resource
        if request.type_url == ENDPOINT:
            self.endpoints_acked(name for name, r in changes.items() if r is not None)
        self.server.acked(self, request.type_url)

    def _resume(self, type_url: str, state: _TypeState) -> None:
        if self.snapshot is None:
            return
        available = self.snapshot.of(type_url)
        for name, version in state.client.items():
            resource = available.get(name)
            if resource is not None and resource.version == version:
                state.acked[name] = resource
                if type_url == ENDPOINT:
                    held = self.snapshot.of(CLUSTER).get(name)
                    if held is not None:
                        self.warm[name] = held.version

    def responses(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        out = []
        snapshot = self.snapshot
        if snapshot is None:
            return out
        for type_url in ORDER:
            state = self.types.get(type_url)
            if state is None or not state.subscribed or state.pending or self.is_quiet(type_url, state, snapshot):
                continue  # one response in flight per type keeps make-before-break simple
            wanted = self.target(type_url, snapshot)
            if wanted is None:
                continue
            for name in [n for n, v in state.nacked.items() if n not in wanted or wanted[n].version != v]:
                del state.nacked[name]  # the rejected version is no longer wanted: its error is history
            if state.error and not state.nacked:
                state.error = ""
                self.server.acked(self, type_url)
            forced = self.force_endpoints if type_url == ENDPOINT else set()
            changed: dict[str, Resource | None] = {}
            for name, resource in wanted.items():
                held = state.client.get(name)
                if (held != resource.version or name in forced) and state.nacked.get(name) != resource.version:
                    changed[name] = resource
            removed = sorted(name for name in state.client if name not in wanted)
            if not changed and not removed:
                self.mark_quiet(state, type_url, snapshot)
                continue
            if type_url == CLUSTER:
                self.clusters_sent({n: r for n, r in state.acked.items()}, {n: r for n, r in changed.items() if r})
            if type_url == ENDPOINT:
                self.force_endpoints -= changed.keys()
            for name in removed:
                changed[name] = None
                state.client.pop(name, None)
            for name, resource in changed.items():
                if resource is not None:
                    state.client[name] = resource.version
            nonce = self.nonce()
            state.pending[nonce] = changed
            sent = [changed[name] for name in sorted(changed) if changed[name] is not None]
            out.append(
                discovery_pb2.DeltaDiscoveryResponse(
                    system_version_info=str(snapshot.serial),
                    type_url=type_url,
                    nonce=nonce,
                    resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in sent],
                    removed_resources=removed,
                )
            )
            self.server.pushed(self, type_url, sent)
        return out


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, server: XdsServer) -> None:
        self.server = server

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for response in self.server.serve(_SotwStream(self.server, context.peer()), request_iterator, context):
            yield response

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        async for response in self.server.serve(_DeltaStream(self.server, context.peer()), request_iterator, context):
            yield response


class XdsServer:
    """Serves a SnapshotCache to Envoys and node agents; tracks what each of them ACKed."""

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: XdsMetrics | None = None,
        *,
        min_client_ping_interval: float = MIN_CLIENT_PING_INTERVAL,
    ) -> None:
        self.cache = cache
        self.metrics = metrics or XdsMetrics()
        self.min_client_ping_interval = min_client_ping_interval
        self.streams: dict[str, set[_Stream]] = {}
        self.errors: dict[tuple[str, str, str], str] = {}  # (group, node, type) -> last NACK message
        self._observed: dict[str, int] = {}  # group -> last snapshot serial whose convergence was measured
        self._convergence_watchers: list[Callable[[str, int, float], None]] = []
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def connected(self, group: str) -> int:
        """How many Envoys of the group are connected to this server."""
        return len(self.streams.get(group, ()))

    def converged_serial(self, group: str) -> int:
        """The newest snapshot serial every connected Envoy of the group has ACKed (0: none yet)."""
        return self._observed.get(group, 0)

    def watch_convergence(self, callback: Callable[[str, int, float], None]) -> None:
        """Call `callback(group, serial, seconds)` each time every connected proxy of a group ACKs a snapshot.

        What status ("Programmed") and benchmarks wait on; `seconds` runs from the desired-state change."""
        self._convergence_watchers.append(callback)

    async def start(self, address: str) -> int:
        """Listen on host:port (port 0 picks one); returns the bound port."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", round(self.min_client_ping_interval * 1000)),
                # gRPC sets SO_REUSEPORT by default: a second control plane on the same port would silently
                # share it (the kernel spreads proxies over both); a busy port must be an error instead.
                ("grpc.so_reuseport", 0),
            ]
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as err:  # grpc's way of saying the bind failed (in use, no such address)
            raise OSError(f"cannot listen on {address}: {err}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        log.info("xDS server listening on %s (port %d)", address, self.port)
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # ------------------------------------------------------------------------------------------- streams

    async def serve(self, stream: _Stream, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):  # noqa: ANN201
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for request in requests:
                    await queue.put(request)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(pump())
        registered = False
        getter: asyncio.Task | None = None
        waiter: asyncio.Task | None = None
        try:
            first = await queue.get()
            if first is None:
                return
            try:
                stream.identify(first.node)
            except ProtocolError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                return
            self.streams.setdefault(stream.group, set()).add(stream)
            registered = True
            self.metrics.connected(stream.group, len(self.streams[stream.group]))
            self.metrics.stream_opened(stream.group)
            log.info(
                "%s connected: node %s, group %s, %s",
                stream.peer,
                stream.node_id,
                stream.group,
                "delta" if stream.delta else "sotw",
            )
            stream.snapshot = self.cache.get(stream.group)
            pending: Any = first
            while True:
                if pending is not None:
                    batch = [pending]  # and everything already received behind it, before answering
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    pending = None
                    for request in batch:
                        if request is None:
                            return  # the client closed its side
                        try:
                            stream.on_request(request)
                        except ProtocolError as err:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                            return
                self._check_converged(stream)  # before answering: an ACK that completes convergence counts at once
                for response in stream.responses():
                    yield response
                    # not kept alive while the stream waits for the next change (18 MB per Envoy at 10,000
                    # Services, bench/controller.py)
                    del response
                self._check_converged(stream)  # and after: answering can settle a narrowed subscription
                changed = self.cache.changed(stream.group)
                latest = self.cache.get(stream.group)
                if latest is not stream.snapshot:
                    stream.snapshot = latest
                    continue
                if getter is None:
                    getter = asyncio.create_task(queue.get())
                waiter = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                if getter in done:
                    pending = getter.result()
                    getter = None
                    if pending is None:
                        return
                stream.snapshot = self.cache.get(stream.group)
        finally:
            for task in (reader, getter, waiter):  # also when the client cancels the RPC mid-wait
                if task is not None:
                    task.cancel()
            if registered:
                self.streams[stream.group].discard(stream)
                self.metrics.connected(stream.group, len(self.streams[stream.group]))
                log.info("%s disconnected: node %s", stream.peer, stream.node_id)

    # ------------------------------------------------------------------------------------ bookkeeping

    def pushed(self, stream: _Stream, type_url: str, resources: list[Resource]) -> None:
        self.metrics.pushed(stream.group, SHORT[type_url], sum(r.size for r in resources))

    def nacked(self, stream: _Stream, type_url: str, message: str) -> None:
        self.errors[(stream.group, stream.node_id, SHORT[type_url])] = message
        self.metrics.nacked(stream.group, SHORT[type_url])
        log.warning("node %s (group %s) rejected %s: %s", stream.node_id, stream.group, SHORT[type_url], message)

    def acked(self, stream: _Stream, type_url: str) -> None:
        self.errors.pop((stream.group, stream.node_id, SHORT[type_url]), None)

    def _check_converged(self, stream: _Stream) -> None:
        """Convergence time: from the desired-state change to the ACK of every connected proxy of the group."""
        snapshot = stream.snapshot
        if snapshot is None or stream.converged_serial == snapshot.serial or not stream.converged(snapshot):
            return
        stream.converged_serial = snapshot.serial
        if self._observed.get(stream.group, 0) >= snapshot.serial:
            return
        if all(s.converged_serial == snapshot.serial for s in self.streams.get(stream.group, ())):
            self._observed[stream.group] = snapshot.serial
            seconds = time.monotonic() - snapshot.changed_at
            self.metrics.converged(stream.group, seconds)
            for callback in self._convergence_watchers:
                callback(stream.group, snapshot.serial, seconds)

    def status(self) -> dict[str, Any]:
        """For the status endpoint: who is connected, at which versions, and what was rejected."""
        out: dict[str, Any] = {}
        for group in sorted(set(self.streams) | set(self.cache.groups())):
            snapshot = self.cache.get(group)
            out[group] = {
                "serial": snapshot.serial if snapshot else 0,
                "proxies": [
                    {
                        "node": s.node_id,
                        "protocol": "delta" if s.delta else "sotw",
                        "converged": snapshot is not None and s.converged_serial == snapshot.serial,
                        "lagging": s.lagging(snapshot) if snapshot is not None else [],
                        "errors": {SHORT[t]: st.error for t, st in s.types.items() if st.error},
                    }
                    for s in sorted(self.streams.get(group, ()), key=lambda s: s.node_id)
                ],
            }
        return out
