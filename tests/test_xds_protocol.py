"""The ADS server at the protocol level: an in-process grpc.aio client plays Envoy (or a node agent), SotW and Delta.

The cache is filled the way `canal run` fills it: manifests -> translate -> Publisher -> SnapshotCache. Expected
resources follow from the manifests (which Services are routed, which endpoints they have) and from the xDS rules in
/work/shared/REFERENCE.md, never from the server's own output. Every receive is bounded; "nothing is sent" means
nothing arrived within SILENCE seconds.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest
from canal.xds.cache import SnapshotCache
from canal.xds.canal_redirect_pb2 import RedirectRule
from canal.xds.publisher import Publisher
from canal.xds.server import XdsServer, _SotwStream
from canal.xds.types import CLUSTER, ENDPOINT, LISTENER, REDIRECT, ROUTE, SHORT
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, base, destination_rule, route, service, virtual_service

GROUP = "istio-system/canal"
WEB = "outbound|80||web.default.svc.cluster.local"
API = "outbound|80||api.default.svc.cluster.local"
ROUTES = "http.80"  # the route configuration of the Gateway's HTTP server on port 80
RECEIVE = 5.0  # seconds: the bound on every expected response
SILENCE = 0.3  # seconds: how long "no response" is watched for
TEST_TIMEOUT = 30.0

PROTOCOLS = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
Response = discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse

PROTOS = {
    CLUSTER: (cluster_pb2.Cluster, lambda m: m.name),
    ENDPOINT: (endpoint_pb2.ClusterLoadAssignment, lambda m: m.cluster_name),
    LISTENER: (listener_pb2.Listener, lambda m: m.name),
    ROUTE: (route_pb2.RouteConfiguration, lambda m: m.name),
    REDIRECT: (RedirectRule, lambda m: f"{m.cluster_ip}:{m.port}/{m.protocol}"),
}


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (no pytest-asyncio here), bounded in time."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return run


# ------------------------------------------------------------------------------------------------ the world


def world(
    *,
    api_route: bool = False,
    api_host: bool = False,
    web_policy: dict | None = None,
    web_ips: tuple[str, ...] = ("10.244.1.1",),
    api_ips: tuple[str, ...] = ("10.244.2.1",),
) -> list[dict]:
    """Gateway istio-system/canal (HTTP 80, one ready gateway pod 10.244.9.1); Services web and api.

    The VirtualService for web sends everything to web and, with `api_route`, /api to api: only routed Services get
    a cluster, so `api_route` adds or removes the cluster API. `api_host` adds a VirtualService for the host api: its
    Service then moves to the gateway (a DNS record and a redirect rule, besides the cluster). A DestinationRule
    policy on web changes the WEB cluster and nothing else (its endpoints come from the EndpointSlice).
    """
    objs = [*base(), *app("web", ips=web_ips), *app("api", ips=api_ips)]
    http = [{"match": [{"uri": {"prefix": "/api"}}], "route": [route("api")]}] if api_route else []
    http.append({"route": [route("web")]})
    objs.append(virtual_service("web", http=http))
    if api_host:
        objs.append(virtual_service("api", http=[{"route": [route("api")]}]))
    if web_policy is not None:
        objs.append(destination_rule("web", "web", policy=web_policy))
    return objs


def pool(n: int) -> dict:
    return {"connectionPool": {"tcp": {"maxConnections": n}}}


def node(
    node_id: str = "gw-1", *, group: str | None = GROUP, role: str | None = None, cluster: str = ""
) -> base_pb2.Node:
    out = base_pb2.Node(id=node_id, cluster=cluster)
    metadata = {}
    if group is not None:
        metadata["canal.io/group"] = group
    if role is not None:
        metadata["canal.io/role"] = role
    if metadata:
        out.metadata.update(metadata)
    return out


NODE_AGENT = node("agent-1", group=None, role="node-agent")


# ------------------------------------------------------------------------------------------------ decoding


def unpack(body: any_pb2.Any, type_url: str) -> Any:
    cls, _ = PROTOS[type_url]
    assert body.type_url == type_url
    message = cls()
    assert body.Unpack(message)
    return message


def bodies(response: Response) -> dict[str, bytes]:
    """name -> serialized resource, for either protocol."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return {r.name: r.resource.value for r in response.resources}
    _, name_of = PROTOS[response.type_url]
    return {name_of(unpack(body, response.type_url)): body.value for body in response.resources}


def names(response: Response) -> list[str]:
    return sorted(bodies(response))


def routed_clusters(response: Response) -> set[str]:
    """The clusters a RouteConfiguration response sends traffic to."""
    out: set[str] = set()
    for name, value in bodies(response).items():
        config = route_pb2.RouteConfiguration.FromString(value)
        assert config.name == name
        for vhost in config.virtual_hosts:
            for r in vhost.routes:
                if r.route.cluster:
                    out.add(r.route.cluster)
                out |= {c.name for c in r.route.weighted_clusters.clusters}
    return out


def lb_endpoints(value: bytes) -> list[Any]:
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(value)
    return [e for locality in assignment.endpoints for e in locality.lb_endpoints]


def describe(response: Any) -> str:
    if isinstance(response, BaseException):
        return repr(response)
    removed = list(getattr(response, "removed_resources", []))
    return f"{SHORT.get(response.type_url, response.type_url)} {names(response)} removed={removed}"


# ------------------------------------------------------------------------------------------------ harness


class Client:
    """One ADS stream, driven by hand. Tracks what an Envoy would put in its next request of each type."""

    def __init__(self, port: int, *, delta: bool, identity: base_pb2.Node) -> None:
        self.delta = delta
        self.identity = identity
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.first = True
        self.names: dict[str, list[str]] = {}  # SotW: the current subscription per type
        self.nonce: dict[str, str] = {}  # SotW: the last nonce received per type
        self.version: dict[str, str] = {}  # SotW: the last version accepted per type
        self.nonces: list[str] = []  # every nonce received, in order
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self.inbox.put_nowait(EOFError("stream ended"))
                    return
                self.nonces.append(message.nonce)
                self.inbox.put_nowait(message)
        except grpc.aio.AioRpcError as err:
            self.inbox.put_nowait(err)

    async def send(self, type_url: str, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        request = cls(type_url=type_url, **fields)
        if self.first:  # like Envoy with set_node_on_first_message_only
            request.node.CopyFrom(self.identity)
            self.first = False
        await self.call.write(request)

    async def subscribe(self, type_url: str, wanted: list[str] | None = None, **fields: Any) -> None:
        """SotW: the new full subscription (with the type's latest nonce and version); Delta: names to add."""
        if self.delta:
            await self.send(type_url, resource_names_subscribe=wanted or [], **fields)
            return
        self.names[type_url] = list(wanted or [])
        await self.send(
            type_url,
            resource_names=self.names[type_url],
            response_nonce=self.nonce.get(type_url, ""),
            version_info=self.version.get(type_url, ""),
            **fields,
        )

    async def unsubscribe(self, type_url: str, gone: list[str]) -> None:
        assert self.delta
        await self.send(type_url, resource_names_unsubscribe=gone)

    async def ack(self, response: Response) -> None:
        if self.delta:
            await self.send(response.type_url, response_nonce=response.nonce)
            return
        self.nonce[response.type_url] = response.nonce
        self.version[response.type_url] = response.version_info
        await self.subscribe(response.type_url, self.names.get(response.type_url, []))

    async def nack(self, response: Response, message: str) -> None:
        error = status_pb2.Status(code=3, message=message)
        if self.delta:
            await self.send(response.type_url, response_nonce=response.nonce, error_detail=error)
            return
        self.nonce[response.type_url] = response.nonce  # version_info stays the last accepted one
        await self.subscribe(response.type_url, self.names.get(response.type_url, []), error_detail=error)

    async def receive(self, type_url: str | None = None) -> Response:
        try:
            item = await asyncio.wait_for(self.inbox.get(), RECEIVE)
        except TimeoutError:
            raise AssertionError(f"no response within {RECEIVE}s (expected {SHORT.get(type_url, 'any')})") from None
        if isinstance(item, BaseException):
            raise item
        if type_url is not None:
            assert item.type_url == type_url, f"expected {SHORT[type_url]}, got {describe(item)}"
        return item

    async def error(self) -> grpc.aio.AioRpcError:
        item = await asyncio.wait_for(self.inbox.get(), RECEIVE)
        assert isinstance(item, grpc.aio.AioRpcError), f"expected the stream to fail, got {describe(item)}"
        return item

    async def silent(self, seconds: float = SILENCE) -> None:
        await asyncio.sleep(seconds)
        assert self.inbox.empty(), f"unexpected: {[describe(i) for i in self.inbox._queue]}"  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.reader.cancel()
        await self.channel.close()


class Plane:
    """An XdsServer on 127.0.0.1 (port 0) fed through the Publisher, and the clients a test opens."""

    async def __aenter__(self) -> Plane:
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache)
        # no draining (removals go at once): these tests watch the protocol, tests/test_xds_publisher.py the drain
        self.publisher = Publisher(self.cache, quiet=0.0, max_delay=0.0, drain_grace=None)
        self.clients: list[Client] = []
        self.port = await self.server.start("127.0.0.1:0")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            await c.close()
        await self.server.stop(0)

    def publish(self, objs: list[dict]) -> None:
        self.publisher.submit(translate(Snapshot.from_dicts(objs)))
        self.publisher.flush()

    def client(self, *, delta: bool, identity: base_pb2.Node | None = None) -> Client:
        c = Client(self.port, delta=delta, identity=identity or node())
        self.clients.append(c)
        return c

    async def until(self, check: Callable[[dict[str, Any]], bool], node_id: str = "gw-1") -> dict[str, Any]:
        """Poll the proxy's status until `check` holds (bounded): the server has handled what was sent."""
        deadline = asyncio.get_running_loop().time() + RECEIVE
        while True:
            found = [p for p in self.server.status().get(GROUP, {}).get("proxies", []) if p["node"] == node_id]
            if len(found) == 1 and check(found[0]):
                return found[0]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"status of {node_id} never matched: {self.server.status()}")
            await asyncio.sleep(0.01)

    def proxy(self, node_id: str = "gw-1", group: str = GROUP) -> dict[str, Any]:
        found = [p for p in self.server.status()[group]["proxies"] if p["node"] == node_id]
        assert len(found) == 1, self.server.status()
        return found[0]


async def establish(c: Client, clusters: list[str]) -> dict[str, Response]:
    """Subscribe like a fresh Envoy (CDS and LDS wildcard, EDS for `clusters`, RDS for ROUTES), ACK until all four
    types were received; returns the last response of each type. Make before break: RDS (which routes to the
    clusters) comes only after CDS and EDS were ACKed."""
    await c.subscribe(CLUSTER)
    await c.subscribe(ENDPOINT, clusters)
    await c.subscribe(LISTENER)
    await c.subscribe(ROUTE, [ROUTES])
    got: dict[str, Response] = {}
    order = []
    while len(got) < 4:
        response = await c.receive()
        got[response.type_url] = response
        order.append(response.type_url)
        await c.ack(response)
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE], [SHORT[t] for t in order]
    assert names(got[CLUSTER]) == sorted(clusters)
    assert names(got[ENDPOINT]) == sorted(clusters)
    assert names(got[LISTENER]) == ["0.0.0.0_80"]
    assert names(got[ROUTE]) == [ROUTES]
    return got


async def holding_clusters(plane: Plane, delta: bool) -> Client:
    """A client subscribed to CDS alone that has ACKed the clusters of world()."""
    plane.publish(world())
    c = plane.client(delta=delta)
    await c.subscribe(CLUSTER)
    await c.ack(await c.receive(CLUSTER))
    return c


async def drain(c: Client, *, ack: bool = False) -> list[Response]:
    """Everything that arrives until SILENCE passes without a response (ACKing each one, if asked)."""
    out = []
    while True:
        try:
            response = await asyncio.wait_for(c.receive(), SILENCE)
        except TimeoutError:
            return out
        out.append(response)
        if ack:
            await c.ack(response)


# ------------------------------------------------------------------------------------------------ identity


@PROTOCOLS
@pytest.mark.parametrize(
    "identity",
    [
        node("lost", group=None),  # no metadata, no cluster
        node("lost", group=None, cluster="gateways"),  # a cluster that is not NS/NAME
        node("lost", group="canal"),  # a group that is not NS/NAME
        node("lost", group=None, role="gateway"),  # a role that is not node-agent
    ],
    ids=["nothing", "bad-cluster", "bad-group", "bad-role"],
)
@aio
async def test_a_node_without_a_group_is_refused_with_invalid_argument(delta, identity):
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta, identity=identity)
        await c.subscribe(CLUSTER)
        err = await c.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'lost'" in err.details() and "canal.io/group" in err.details()
        assert plane.server.streams.get(GROUP, set()) == set()  # never registered


@PROTOCOLS
@aio
async def test_node_cluster_ns_name_is_accepted_as_the_group(delta):
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta, identity=node("gw-9", group=None, cluster=GROUP))
        await c.subscribe(CLUSTER)
        assert names(await c.receive(CLUSTER)) == [WEB]
        assert [p["node"] for p in plane.server.status()[GROUP]["proxies"]] == ["gw-9"]


@PROTOCOLS
@aio
async def test_a_client_that_goes_away_leaves_no_stream_and_no_task_behind(delta):
    async with Plane() as plane:
        plane.publish(world())
        before = asyncio.all_tasks()
        c = plane.client(delta=delta)
        await c.subscribe(CLUSTER)
        await c.receive(CLUSTER)  # the server now waits for the next request or the next change
        await c.close()
        plane.clients.remove(c)

        def ours() -> set[asyncio.Task]:  # gRPC keeps a task waiting for the next call: not the stream's
            return {t for t in asyncio.all_tasks() - before if "AioServer" not in repr(t)}

        deadline = asyncio.get_running_loop().time() + RECEIVE
        while plane.server.streams.get(GROUP) or ours():
            assert asyncio.get_running_loop().time() < deadline, (
                f"left behind: streams {plane.server.streams}, tasks {ours()}"
            )
            await asyncio.sleep(0.01)
        assert plane.server.status()[GROUP]["proxies"] == []


@PROTOCOLS
@aio
async def test_an_unknown_resource_type_is_refused_with_invalid_argument(delta):
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta)
        await c.send("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
        err = await c.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tls.v3.Secret" in err.details()


# ------------------------------------------------------------------------------------------------ nonces


@aio
async def test_sotw_fresh_nonces_acks_are_quiet_and_stale_nonces_are_dropped():
    async with Plane() as plane:
        plane.publish(world(api_route=True))
        c = plane.client(delta=False)
        await c.subscribe(CLUSTER)
        cds1 = await c.receive(CLUSTER)
        assert names(cds1) == [API, WEB] and cds1.nonce and cds1.version_info
        await c.ack(cds1)
        await c.silent()  # an ACK of the latest nonce and version is not answered

        await c.subscribe(ENDPOINT, [WEB])
        eds1 = await c.receive(ENDPOINT)
        assert names(eds1) == [WEB]
        # A request with an older nonce (cds1's, not eds1's) asks for API too: stale, so dropped. The ACK below
        # carries only WEB; had the stale request been applied, API would be sent.
        await c.send(ENDPOINT, resource_names=[WEB, API], response_nonce=cds1.nonce)
        await c.silent()
        await c.ack(eds1)
        await c.silent()

        plane.publish(world(api_route=True, web_policy=pool(7)))  # the WEB cluster changes
        cds2 = await c.receive(CLUSTER)
        assert cds2.version_info != cds1.version_info
        forced = await c.receive(ENDPOINT)  # its endpoints follow (see the forced-EDS test)
        # A repeated ACK of cds1 is stale now: neither taken as an ACK of cds2 nor as a NACK.
        await c.send(CLUSTER, version_info=cds1.version_info, response_nonce=cds1.nonce)
        stale_nack = status_pb2.Status(code=3, message="stale")
        await c.send(CLUSTER, version_info=cds1.version_info, response_nonce=cds1.nonce, error_detail=stale_nack)
        await c.silent()
        proxy = plane.proxy()
        assert "cds" in proxy["lagging"] and not proxy["converged"] and proxy["errors"] == {}
        await c.ack(cds2)
        await c.ack(forced)
        await plane.until(lambda p: p["converged"] and p["lagging"] == [] and p["errors"] == {})
        assert len(set(c.nonces)) == len(c.nonces) == 4  # every response had its own nonce


@aio
async def test_delta_fresh_nonces_acks_are_quiet_and_stale_nonces_still_apply():
    async with Plane() as plane:
        plane.publish(world(api_route=True))
        c = plane.client(delta=True)
        await c.subscribe(CLUSTER)
        cds1 = await c.receive(CLUSTER)
        assert names(cds1) == [API, WEB] and cds1.nonce
        await c.ack(cds1)
        await c.silent()

        await c.subscribe(ENDPOINT, [WEB])
        eds1 = await c.receive(ENDPOINT)
        assert names(eds1) == [WEB]
        # Subscribing API with an older nonce while eds1 is unACKed: never dropped in Delta. Nothing is sent while
        # eds1 is in flight; its ACK releases API, and only API (WEB is held already).
        await c.subscribe(ENDPOINT, [API], response_nonce=cds1.nonce)
        await c.silent()
        await c.ack(eds1)
        eds2 = await c.receive(ENDPOINT)
        assert names(eds2) == [API] and list(eds2.removed_resources) == []
        await c.ack(eds2)
        await plane.until(lambda p: p["converged"])
        assert len(set(c.nonces)) == len(c.nonces) == 3


# ------------------------------------------------------------------------------------------------ NACK


@PROTOCOLS
@aio
async def test_nack_is_reported_not_resent_and_cleared_by_the_next_ack(delta):
    async with Plane() as plane:
        c = await holding_clusters(plane, delta)

        plane.publish(world(web_policy=pool(7)))
        rejected = await c.receive(CLUSTER)
        assert names(rejected) == [WEB]
        await c.nack(rejected, "cluster web: bad circuit breaker")
        await c.silent()  # the rejected version is not sent again
        await plane.until(lambda p: p["errors"] == {"cds": "cluster web: bad circuit breaker"})
        assert plane.server.errors == {(GROUP, "gw-1", "cds"): "cluster web: bad circuit breaker"}

        # A change that adds a cluster: Delta sends just the new one (never WEB's rejected version again);
        # SotW must send the full set, which is a new version of the set (WEB as last sent, plus API).
        plane.publish(world(web_policy=pool(7), api_route=True))
        accepted = await c.receive(CLUSTER)
        assert accepted.nonce != rejected.nonce
        if delta:
            assert names(accepted) == [API]
        else:
            assert names(accepted) == [API, WEB] and accepted.version_info != rejected.version_info
        await c.ack(accepted)

        plane.publish(world(web_policy=pool(8), api_route=True))  # the next change of WEB is pushed
        fixed = await c.receive(CLUSTER)
        assert names(fixed) == ([WEB] if delta else [API, WEB])
        (threshold,) = cluster_pb2.Cluster.FromString(bodies(fixed)[WEB]).circuit_breakers.thresholds
        assert threshold.max_connections.value == 8  # the new version, not the rejected one (7)
        await c.ack(fixed)
        await plane.until(lambda p: p["errors"] == {} and p["converged"])
        assert plane.server.errors == {}


@PROTOCOLS
@aio
async def test_nack_then_no_change_of_that_type_sends_nothing(delta):
    """The simplest NACK loop check: a change that leaves CDS as it is must not resend the rejected CDS."""
    async with Plane() as plane:
        c = await holding_clusters(plane, delta)
        plane.publish(world(web_policy=pool(7)))
        rejected = await c.receive(CLUSTER)
        await c.nack(rejected, "no")
        plane.publish(world(web_policy=pool(7), web_ips=("10.244.1.1", "10.244.1.9")))  # endpoints only
        await c.silent()
        proxy = await plane.until(lambda p: p["errors"] == {"cds": "no"})
        assert not proxy["converged"]


@PROTOCOLS
@aio
async def test_a_huge_nack_message_is_kept_short_for_status_and_logs(delta):
    """Envoy's NACK of a route configuration quotes the whole configuration (megabytes at a few thousand Services)."""
    async with Plane() as plane:
        c = await holding_clusters(plane, delta)
        plane.publish(world(web_policy=pool(7)))
        head = "Proto constraint validation failed (cluster web): "
        await c.nack(await c.receive(CLUSTER), head + "x" * 2_000_000)
        proxy = await plane.until(lambda p: bool(p["errors"]))
        kept = proxy["errors"]["cds"]
        assert kept.startswith(head) and kept.endswith("more characters)")
        assert len(kept) < 5000
        assert plane.server.errors[(GROUP, "gw-1", "cds")] == kept


# ------------------------------------------------------------------------------------------------ make before break


@PROTOCOLS
@aio
async def test_new_cluster_is_sent_and_warmed_before_the_route_that_uses_it(delta):
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta)
        held = await establish(c, [WEB])
        assert routed_clusters(held[ROUTE]) == {WEB}

        plane.publish(world(api_route=True))  # a VirtualService change that routes /api to a new cluster
        cds = await c.receive(CLUSTER)
        assert names(cds) == ([API] if delta else [API, WEB])
        await c.silent()  # no RDS while the new cluster is not ACKed (and LDS did not change)

        await c.ack(cds)
        await c.subscribe(ENDPOINT, [API] if delta else [WEB, API])  # Envoy asks for the new cluster's endpoints
        eds = await c.receive(ENDPOINT)
        assert names(eds) == [API]  # SotW too: EDS is incremental, WEB's unchanged endpoints are not resent
        assert [e.endpoint.address.socket_address.address for e in lb_endpoints(bodies(eds)[API])] == ["10.244.2.1"]
        await c.silent()  # still no RDS: the cluster is warming until its endpoints are ACKed

        await c.ack(eds)
        rds = await c.receive(ROUTE)
        assert routed_clusters(rds) == {WEB, API}
        await c.ack(rds)
        await plane.until(lambda p: p["converged"])


@PROTOCOLS
@aio
async def test_removed_cluster_stays_until_the_route_without_it_is_acked(delta):
    async with Plane() as plane:
        plane.publish(world(api_route=True))
        c = plane.client(delta=delta)
        held = await establish(c, [API, WEB])
        assert routed_clusters(held[ROUTE]) == {WEB, API}

        plane.publish(world())  # /api is gone, so is its cluster
        rds = await c.receive(ROUTE)  # the route stops using API first
        assert routed_clusters(rds) == {WEB}
        await c.silent()  # API stays in CDS (no CDS response) while the old route may still be in use

        await c.ack(rds)
        cds = await c.receive(CLUSTER)
        if delta:
            assert names(cds) == [] and list(cds.removed_resources) == [API]
        else:
            assert names(cds) == [WEB]  # SotW: the full set, without API
        await c.ack(cds)
        # what follows may drop API's endpoints; it must never bring API back
        for response in await drain(c, ack=True):
            assert API not in names(response), describe(response)
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])


@PROTOCOLS
@aio
async def test_a_removed_group_tells_its_envoys_to_drop_everything_routes_first(delta):
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta)
        await establish(c, [WEB])
        plane.publish([o for o in world() if o["kind"] != "InternalGateway"])  # the group is gone
        order: list[str] = []
        last: dict[str, Response] = {}
        for response in await drain(c, ack=True):
            order.append(response.type_url)
            last[response.type_url] = response
        # SotW: LDS and CDS are full-state (empty sets remove everything; Envoy then drops the route configuration
        # and the endpoints with their listener and cluster). Delta removes each type's resources by name.
        assert set(order) == ({CLUSTER, ENDPOINT, LISTENER, ROUTE} if delta else {CLUSTER, LISTENER}), [
            SHORT[t] for t in order
        ]
        assert all(names(r) == [] for r in last.values())
        if delta:
            removed = {SHORT[t]: list(r.removed_resources) for t, r in last.items()}
            assert removed == {"cds": [WEB], "eds": [WEB], "lds": ["0.0.0.0_80"], "rds": [ROUTES]}
        # break after make: the cluster goes only once the routes to it are gone
        assert order.index(CLUSTER) > max(order.index(t) for t in (ROUTE, LISTENER) if t in order)
        await plane.until(lambda p: p["converged"])


@PROTOCOLS
@aio
async def test_a_change_resends_only_the_route_configuration_it_touched(delta):
    """RDS is incremental in both protocols: with web on port 80 and api on 8080, editing web's VirtualService
    sends http.80 alone (SotW included: a route configuration left out of a response is unchanged, not removed)."""

    def two_ports(extra: bool) -> list[dict]:
        objs = [*base(servers=[(80, "HTTP"), (8080, "HTTP")]), *app("web"), *app("api", port=8080)]
        http = [{"match": [{"uri": {"prefix": "/v2"}}], "route": [route("web")]}] if extra else []
        objs.append(virtual_service("web", http=[*http, {"route": [route("web")]}]))
        objs.append(virtual_service("api", http=[{"route": [route("api")]}]))
        return objs

    async with Plane() as plane:
        plane.publish(two_ports(False))
        c = plane.client(delta=delta)
        await c.subscribe(CLUSTER)
        await c.ack(await c.receive(CLUSTER))
        await c.subscribe(ENDPOINT, [WEB, "outbound|8080||api.default.svc.cluster.local"])
        await c.ack(await c.receive(ENDPOINT))
        await c.subscribe(ROUTE, ["http.80", "http.8080"])
        first = await c.receive(ROUTE)
        assert names(first) == ["http.80", "http.8080"]
        await c.ack(first)

        plane.publish(two_ports(True))
        update = await c.receive(ROUTE)
        assert names(update) == ["http.80"]
        (vhost,) = route_pb2.RouteConfiguration.FromString(bodies(update)["http.80"]).virtual_hosts
        assert [r.match.prefix for r in vhost.routes] == ["/v2", "/"]
        await c.ack(update)
        await c.silent()  # nothing else changed
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])


@PROTOCOLS
@aio
async def test_changed_cluster_gets_its_unchanged_endpoints_again(delta):
    async with Plane() as plane:
        plane.publish(world())
        before = plane.cache.get(GROUP)
        c = plane.client(delta=delta)
        held = await establish(c, [WEB])

        plane.publish(world(web_policy=pool(7)))
        after = plane.cache.get(GROUP)
        # the premise: the cluster changed, its endpoints did not
        assert after.of(CLUSTER)[WEB].version != before.of(CLUSTER)[WEB].version
        assert after.of(ENDPOINT)[WEB].version == before.of(ENDPOINT)[WEB].version

        cds = await c.receive(CLUSTER)
        assert names(cds) == [WEB]
        eds = await c.receive(ENDPOINT)  # unasked: otherwise Envoy keeps the cluster warming for 15 s
        assert bodies(eds) == bodies(held[ENDPOINT])
        await c.silent()  # routes and listeners did not change: nothing else
        await c.ack(cds)
        await c.ack(eds)
        await plane.until(lambda p: p["converged"])


# ------------------------------------------------------------------------------------------------ reconnect


@aio
async def test_sotw_reconnect_with_held_versions_gets_nothing_and_a_stale_version_gets_the_set():
    async with Plane() as plane:
        plane.publish(world())
        first = plane.client(delta=False)
        held = await establish(first, [WEB])
        await first.close()
        plane.clients.remove(first)

        again = plane.client(delta=False)
        for type_url, wanted in ((CLUSTER, []), (ENDPOINT, [WEB]), (LISTENER, []), (ROUTE, [ROUTES])):
            await again.send(type_url, resource_names=wanted, version_info=held[type_url].version_info)
        await again.silent()
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])  # one gw-1: the first stream is gone

        stale = plane.client(delta=False, identity=node("gw-2"))
        await stale.send(CLUSTER, version_info="0123456789abcdef")  # not what the server holds
        cds = await stale.receive(CLUSTER)
        assert names(cds) == [WEB] and cds.version_info == held[CLUSTER].version_info


@aio
async def test_delta_reconnect_with_initial_versions_gets_nothing_and_stale_ones_are_fixed():
    async with Plane() as plane:
        plane.publish(world())
        first = plane.client(delta=True)
        held = await establish(first, [WEB])
        await first.close()
        plane.clients.remove(first)
        versions = {t: {r.name: r.version for r in response.resources} for t, response in held.items()}

        again = plane.client(delta=True)
        for type_url, wanted in ((CLUSTER, []), (ENDPOINT, [WEB]), (LISTENER, []), (ROUTE, [ROUTES])):
            await again.send(type_url, resource_names_subscribe=wanted, initial_resource_versions=versions[type_url])
        await again.silent()
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])

        gone = "outbound|80||gone.default.svc.cluster.local"
        stale = plane.client(delta=True, identity=node("gw-2"))
        await stale.send(CLUSTER, initial_resource_versions={WEB: "stale", gone: "whatever"})
        cds = await stale.receive(CLUSTER)
        assert names(cds) == [WEB] and list(cds.removed_resources) == [gone]
        assert bodies(cds) == bodies(held[CLUSTER])


# ------------------------------------------------------------------------------------------------ named EDS


@PROTOCOLS
@aio
async def test_named_eds_gets_only_the_named_endpoints_and_unsubscribe_works(delta):
    async with Plane() as plane:
        plane.publish(world(api_route=True))  # both clusters exist, so both load assignments do
        c = plane.client(delta=delta)
        await c.subscribe(ENDPOINT, [WEB])
        eds = await c.receive(ENDPOINT)
        assert names(eds) == [WEB]
        await c.ack(eds)
        plane.publish(world(api_route=True, api_ips=("10.244.2.7",)))  # only API's endpoints change
        await c.silent()  # not subscribed to API: nothing to say

        await c.subscribe(ENDPOINT, [API] if delta else [WEB, API])
        eds = await c.receive(ENDPOINT)
        assert names(eds) == [API]  # WEB is held already (SotW: EDS responses carry only what changed)
        assert [e.endpoint.address.socket_address.address for e in lb_endpoints(bodies(eds)[API])] == ["10.244.2.7"]
        await c.ack(eds)

        if delta:
            await c.unsubscribe(ENDPOINT, [WEB])
        else:
            await c.subscribe(ENDPOINT, [API])  # SotW: the new set, without WEB
        await c.silent()  # an unsubscribe needs no answer (and is handled before the change below)
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])  # and the client holds what it wants
        plane.publish(world(api_route=True, web_ips=("10.244.1.8",), api_ips=("10.244.2.8",)))  # both change
        eds = await c.receive(ENDPOINT)
        assert names(eds) == [API] and list(getattr(eds, "removed_resources", [])) == []
        assert [e.endpoint.address.socket_address.address for e in lb_endpoints(bodies(eds)[API])] == ["10.244.2.8"]
        await c.ack(eds)
        await plane.until(lambda p: p["converged"] and p["lagging"] == [])


# ------------------------------------------------------------------------------------------------ redirects


@PROTOCOLS
@aio
async def test_redirect_rules_go_to_node_agents_and_not_to_gateways(delta):
    async with Plane() as plane:
        plane.publish(world())
        web_ip = service("web")["spec"]["clusterIP"]  # the builders' stable ClusterIP for default/web

        agent = plane.client(delta=delta, identity=NODE_AGENT)
        await agent.subscribe(REDIRECT)
        rules = await agent.receive(REDIRECT)
        (name,) = names(rules)
        assert name == f"{web_ip}:80/tcp"
        rule = RedirectRule.FromString(bodies(rules)[name])
        assert (rule.cluster_ip, rule.protocol, rule.port) == (web_ip, "tcp", 80)
        assert [(b.address, b.port) for b in rule.backends] == [("10.244.9.1", 80)]  # the gateway pod
        assert (rule.service, rule.gateway) == ("default/web", GROUP)
        await agent.ack(rules)
        await agent.subscribe(CLUSTER)  # a node agent is not a gateway: no clusters
        for item in await drain(agent):
            assert item.type_url == CLUSTER and names(item) == [], describe(item)

        gateway = plane.client(delta=delta)
        await gateway.subscribe(REDIRECT)
        await gateway.subscribe(CLUSTER)
        received = await drain(gateway)
        assert [names(r) for r in received if r.type_url == REDIRECT] in ([], [[]])  # nothing, or an empty set
        assert [names(r) for r in received if r.type_url == CLUSTER] == [[WEB]]
        for response in received:
            await gateway.ack(response)

        # a newly routed host reaches the agent as a new rule (and the gateway still gets none)
        plane.publish(world(api_host=True))
        update = await agent.receive(REDIRECT)
        api_ip = service("api")["spec"]["clusterIP"]
        assert names(update) == ([f"{api_ip}:80/tcp"] if delta else sorted([f"{web_ip}:80/tcp", f"{api_ip}:80/tcp"]))
        received = await drain(gateway)
        assert [names(r) for r in received if r.type_url == CLUSTER] == ([[API]] if delta else [[API, WEB]])
        assert [names(r) for r in received if r.type_url == REDIRECT] == []


# ------------------------------------------------------------------------------------------------ after a NACK


@PROTOCOLS
@aio
async def test_a_request_after_a_nack_is_not_an_ack_and_the_error_stays(delta):
    """Envoy's GrpcMuxImpl sends error_detail once; its next request of the type (a subscription change) keeps the
    NACKed nonce, without error_detail, and version_info stays the last accepted version. That accepts nothing."""
    async with Plane() as plane:
        plane.publish(world(api_route=True))
        c = plane.client(delta=delta)
        await c.subscribe(ENDPOINT, [WEB])
        accepted = await c.receive(ENDPOINT)
        await c.ack(accepted)
        plane.publish(world(api_route=True, web_ips=("10.244.1.7",)))
        rejected = await c.receive(ENDPOINT)
        await c.nack(rejected, "bad endpoints")
        await c.silent()
        await plane.until(lambda p: p["errors"] == {"eds": "bad endpoints"})
        if delta:
            await c.subscribe(ENDPOINT, [API], response_nonce=rejected.nonce)
        else:
            await c.subscribe(ENDPOINT, [WEB, API])  # nonce=rejected.nonce, version_info=accepted's
            assert c.version[ENDPOINT] == accepted.version_info != rejected.version_info
        answer = await c.receive(ENDPOINT)
        assert API in names(answer)
        # the client has accepted nothing since the NACK: the error must still be reported
        assert plane.proxy()["errors"] == {"eds": "bad endpoints"}


@PROTOCOLS
@aio
async def test_route_to_a_cluster_whose_endpoints_were_rejected_is_held(delta):
    """Taking the request after a NACK as an ACK would count the new cluster as warm and send the route to it while
    Envoy holds no endpoints for it (the cluster stays warming, requests to /api fail)."""
    async with Plane() as plane:
        plane.publish(world())
        c = plane.client(delta=delta)
        await establish(c, [WEB])
        plane.publish(world(api_route=True))
        await c.ack(await c.receive(CLUSTER))
        await c.subscribe(ENDPOINT, [API] if delta else [WEB, API])
        rejected = await c.receive(ENDPOINT)
        await c.nack(rejected, "bad endpoints for api")
        await c.silent()  # API is not warm: no RDS
        # the client's next EDS request (any subscription change) repeats the nonce, without error_detail
        if delta:
            await c.subscribe(ENDPOINT, [API], response_nonce=rejected.nonce)
        else:
            await c.subscribe(ENDPOINT, [API, WEB])
        await c.silent()  # still nothing accepted for API: the route to it must wait


class _Context:
    """The parts of grpc.aio.ServicerContext that XdsServer.serve uses."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()  # as grpc.aio's abort does: it never returns


@aio
async def test_unknown_type_queued_behind_another_request_is_refused_cleanly():
    """Requests that arrive in one read are handled in a batch: an error in any of them is INVALID_ARGUMENT, not a
    traceback and StatusCode.UNKNOWN."""
    # Deterministic form of a timing-dependent case: the two requests are queued before the server reads the first.
    # Over gRPC the same happens when both arrive in one read; then the client sees StatusCode.UNKNOWN.
    server = XdsServer(SnapshotCache())
    context = _Context()
    hold = asyncio.Event()

    async def requests():
        yield discovery_pb2.DiscoveryRequest(node=node(), type_url=CLUSTER)
        yield discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/example.Unknown")
        await hold.wait()  # the client keeps the stream open

    try:
        async for _ in server.serve(_SotwStream(server, context.peer()), requests(), context):  # type: ignore[arg-type]
            pass
    except grpc.aio.AbortError:
        pass
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT and "example.Unknown" in context.aborted[1]


@aio
async def test_a_busy_port_is_an_error_not_a_shared_listener():
    """gRPC's default SO_REUSEPORT would let a second control plane share the port and take half the proxies."""
    first = XdsServer(SnapshotCache())
    port = await first.start("127.0.0.1:0")
    try:
        second = XdsServer(SnapshotCache())
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await second.start(f"127.0.0.1:{port}")
    finally:
        await first.stop()
