"""The snapshot cache: resources built once per content, route configurations assembled from per-host bytes.

The reference for every byte is protobuf's own serializer over the builders in canal.xds.resources: the cache may
assemble route configurations however it likes, as long as Envoy receives exactly what SerializeToString gives.
"""

from __future__ import annotations

import random

from canal.xds import resources
from canal.xds.cache import SnapshotCache
from canal.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from envoy.config.route.v3 import route_pb2

from canal.snapshot import Snapshot, parse_object
from canal.translate import Translator, translate
from tests.builders import app, base, route, virtual_service

GROUP = "istio-system/canal"


def cluster_objects(services: int, *, extra_route: int | None = None) -> list[dict]:
    """`services` Services with a VirtualService each; `extra_route` adds a /v2 route to that one."""
    objs = [*base()]
    for i in range(services):
        name = f"svc-{i}"
        objs += app(name, ips=(f"10.244.{i // 200}.{i % 200 + 1}",))
        http = [{"route": [route(name)]}]
        if i == extra_route:
            http.insert(0, {"match": [{"uri": {"prefix": "/v2"}}], "route": [route(name)]})
        objs.append(virtual_service(name, http=http))
    return objs


def expected_route_bytes(state, name: str) -> bytes:
    return resources.route_configuration(state.envoy[GROUP].route_configs[name]).SerializeToString(deterministic=True)


def test_assembled_route_configuration_is_byte_for_byte_the_serializers_output():
    state = translate(Snapshot.from_dicts(cluster_objects(30)))
    snapshot = SnapshotCache().set_envoy(GROUP, state.envoy[GROUP])
    (name,) = state.envoy[GROUP].route_configs
    body = snapshot.of(ROUTE)[name].body
    assert body.type_url == ROUTE
    assert body.value == expected_route_bytes(state, name)
    parsed = route_pb2.RouteConfiguration.FromString(body.value)
    assert parsed.name == name and len(parsed.virtual_hosts) == 30
    assert [v.name for v in parsed.virtual_hosts] == sorted(v.name for v in parsed.virtual_hosts)
    assert parsed.max_direct_response_body_size_bytes.value == resources.MAX_DIRECT_RESPONSE_BODY_BYTES


def test_incremental_changes_give_the_same_bytes_and_versions_as_a_fresh_cache():
    """One cache follows a Translator through random edits; after each, a fresh cache built from the same state must
    agree on every resource's bytes and version (the per-host reuse never serves a stale host)."""
    rng = random.Random(7)
    services = 20
    translator = Translator()
    state = translator.load(Snapshot.from_dicts(cluster_objects(services)))
    cache = SnapshotCache()
    cache.set_envoy(GROUP, state.envoy[GROUP])
    versions_seen: dict[bytes, str] = {}
    for _ in range(25):
        target = rng.randrange(services)
        objs = cluster_objects(services, extra_route=target if rng.random() < 0.7 else None)
        vs = next(o for o in objs if o["kind"] == "VirtualService" and o["metadata"]["name"] == f"svc-{target}")
        state = translator.apply([parse_object(vs)])
        incremental = cache.set_envoy(GROUP, state.envoy[GROUP])
        fresh = SnapshotCache().set_envoy(GROUP, state.envoy[GROUP])
        for type_url in (LISTENER, ROUTE, CLUSTER, ENDPOINT):
            got = {n: (r.version, r.body.value, r.references) for n, r in incremental.of(type_url).items()}
            want = {n: (r.version, r.body.value, r.references) for n, r in fresh.of(type_url).items()}
            assert got == want, type_url
        for name, resource in incremental.of(ROUTE).items():
            assert resource.body.value == expected_route_bytes(state, name)
            # a content hash: the same bytes always carry the same version, different bytes a different one
            assert versions_seen.setdefault(resource.body.value, resource.version) == resource.version
    assert len(set(versions_seen.values())) == len(versions_seen) >= 2


def test_an_unchanged_state_keeps_the_snapshot_and_a_route_change_rebuilds_only_routes():
    translator = Translator()
    state = translator.load(Snapshot.from_dicts(cluster_objects(5)))
    cache = SnapshotCache()
    first = cache.set_envoy(GROUP, state.envoy[GROUP])
    assert cache.set_envoy(GROUP, state.envoy[GROUP]) is first
    objs = cluster_objects(5, extra_route=2)
    changed = translator.apply([parse_object(o) for o in objs if o["metadata"]["name"] == "svc-2"])
    second = cache.set_envoy(GROUP, changed.envoy[GROUP])
    assert second.serial > first.serial
    for type_url in (LISTENER, CLUSTER, ENDPOINT):  # the very same Resource objects: nothing rebuilt
        assert all(second.of(type_url)[n] is r for n, r in first.of(type_url).items())
    (name,) = second.of(ROUTE)
    assert second.of(ROUTE)[name].version != first.of(ROUTE)[name].version
    assert second.of(ROUTE)[name].references == first.of(ROUTE)[name].references  # same clusters routed to
