"""The node agent's xDS client: a Delta ADS subscription to Canal's redirect resource type.

Delta, not State of the World, because a one-rule change then costs one resource on the wire and one element in
the kernel, at 10 rules as at 10,000 (a SotW response carries and re-parses the whole set every time).

Protocol, as the server in xds/server.py implements it (REFERENCE.md, xDS section):
- Wildcard subscription; the node carries ``canal.io/role: node-agent``, which puts it in the node-agent group.
- Every response is handed to ``on_changes``; returning normally ACKs (the response's nonce), raising NACKs with the
  error in ``error_detail``; the server then holds the rejected versions and pushes again on the next change.
- On reconnect, ``initial_resource_versions`` tells the server what this agent holds, so it sends only what
  differs and ``removed_resources`` for rules that went away while the stream was down. A freshly started agent
  names the rules it read back from the kernel with an empty version: the server resends them (no flap: the
  kernel already has them) and removes those that are no longer wanted.
- Reconnects back off exponentially with jitter; the last good rules stay in the kernel meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc
from canal.xds.canal_redirect_pb2 import RedirectRule
from canal.xds.types import NODE_AGENT_ROLE, REDIRECT, ROLE_METADATA_KEY
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import code_pb2, status_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NACK_DETAIL_BYTES = 4096  # the server keeps at most this much of a NACK message


@dataclass(frozen=True, slots=True)
class Update:
    """One response: resources by name (None: removed), and the versions to remember once it is ACKed."""

    changes: Mapping[str, RedirectRule | None]
    versions: Mapping[str, str | None]
    initial: bool  # the first response of this stream


Handler = Callable[[Update], Awaitable[None]]


def node(node_id: str, zone: str = "") -> base_pb2.Node:
    out = base_pb2.Node(id=node_id, user_agent_name="canal-node-agent")
    out.metadata.update({ROLE_METADATA_KEY: NODE_AGENT_ROLE})
    if zone:
        out.locality.zone = zone
    return out


def decode(response: discovery_pb2.DeltaDiscoveryResponse) -> Update:
    """Resources of the redirect type only; anything else in the response is a protocol error (ValueError)."""
    changes: dict[str, RedirectRule | None] = {}
    versions: dict[str, str | None] = {}
    for resource in response.resources:
        if resource.resource.type_url != REDIRECT:
            raise ValueError(f"resource {resource.name}: type {resource.resource.type_url}, expected {REDIRECT}")
        message = RedirectRule()
        if not resource.resource.Unpack(message):
            raise ValueError(f"resource {resource.name}: does not decode as {REDIRECT}")
        changes[resource.name] = message
        versions[resource.name] = resource.version
    for name in response.removed_resources:
        changes[name] = None
        versions[name] = None
    return Update(changes, versions, False)


class DeltaClient:
    def __init__(
        self,
        address: str,
        node_id: str,
        on_changes: Handler,
        *,
        initial_names: Mapping[str, str] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        on_replied: Callable[[bool], None] | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.address = address
        self.node = node(node_id)
        self.on_changes = on_changes
        self.on_connected = on_connected or (lambda up: None)
        self.on_replied = on_replied or (lambda acked: None)  # after the ACK (True) or NACK (False) is written
        self.versions: dict[str, str] = dict(initial_names or {})  # what the agent holds (ACKed)
        self.backoff = backoff
        self.responses = 0

    def _request(self, first: bool, nonce: str = "", error: str = "") -> discovery_pb2.DeltaDiscoveryRequest:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=REDIRECT, response_nonce=nonce)
        if first:
            request.node.CopyFrom(self.node)
            request.initial_resource_versions.update(self.versions)
        if error:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error[:NACK_DETAIL_BYTES])
            )
        return request

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        """One stream; the ACK or NACK is written before the next response is read (and before on_replied)."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.DeltaAggregatedResources()
        await call.wait_for_connection()
        await call.write(self._request(first=True))
        self.on_connected(True)
        initial = True
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            try:
                update = decode(response)
                update = Update(update.changes, update.versions, initial)
                await self.on_changes(update)
            except Exception as error:
                log.warning("NACK of redirect rules (nonce %s): %s", response.nonce, error)
                await call.write(self._request(first=False, nonce=response.nonce, error=str(error)))
                self.on_replied(False)
            else:
                for name, version in update.versions.items():
                    if version is None:
                        self.versions.pop(name, None)
                    else:
                        self.versions[name] = version
                await call.write(self._request(first=False, nonce=response.nonce))
                self.on_replied(True)
            initial = False
            self.responses += 1

    async def run(self) -> None:
        """Forever: connect, follow the stream, reconnect with backoff. Cancel to stop."""
        delay = self.backoff[0]
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),  # the server accepts pings every 5 s or slower
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        while True:
            responses = self.responses
            try:
                async with grpc.aio.insecure_channel(self.address, options=options) as channel:
                    await self._stream(channel)
                log.warning("xDS stream to %s ended; reconnecting", self.address)
            except grpc.aio.AioRpcError as error:
                log.warning("xDS stream to %s: %s %s", self.address, error.code().name, error.details())
            finally:
                self.on_connected(False)
            if self.responses > responses:
                delay = self.backoff[0]  # the stream worked: start over with a short wait
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.backoff[1])
