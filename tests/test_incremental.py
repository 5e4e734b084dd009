"""Incremental translation must always equal a full rebuild.

A universe of object "slots" (one identity each: kind/namespace/name) with several versions per slot,
including broken ones, conflicting ones and ones that reshape what depends on them. Hypothesis drives random
batches of upserts and deletes through one long-lived Translator and, after every batch, compares its state
with a fresh translation of the same snapshot.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canal.model.base import ObjectRef
from canal.serialize import render_state
from canal.snapshot import parse_object
from canal.translate import Translator, translate
from tests.builders import (
    destination_rule,
    endpoint_slice,
    gateway,
    internal_gateway,
    namespace,
    pod,
    route,
    service,
    virtual_service,
)

READY = {"ready": True, "serving": True, "terminating": False}
DRAINING = {"ready": False, "serving": True, "terminating": True}


def _with(obj: dict, path: str, value: Any) -> dict:
    out = copy.deepcopy(obj)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return out


def _universe() -> list[list[dict]]:
    """Slots: each a list of versions of the same object."""
    slots: list[list[dict]] = []
    gw_canal = gateway(servers=[(80, "HTTP"), (8080, "HTTP"), (3306, "TCP")])
    slots.append([gw_canal, gateway(servers=[(80, "HTTP")]), gateway(servers=[(80, "HTTP", ["a/*"]), (3306, "TCP")])])
    slots.append([gateway("other", servers=[(80, "HTTP"), (3306, "TCP")])])
    slots.append(
        [
            internal_gateway(created="2024-01-01T00:00:00Z"),
            internal_gateway(created="2024-01-01T00:00:00Z", namespaceSelector={"matchLabels": {"migrate": "yes"}}),
            internal_gateway(created="2024-01-01T00:00:00Z", service_ref="canal-gateway", redirect={"mode": "none"}),
            internal_gateway(created="2024-01-01T00:00:00Z", dns={"mode": "nonsense"}),  # rejected
        ]
    )
    slots.append(
        [
            internal_gateway("other", gateway_name="other", ips=["10.96.0.60"], created="2023-06-01T00:00:00Z"),
            internal_gateway("other", gateway_name="other", ips=["10.96.0.60"], created="2025-06-01T00:00:00Z"),
            internal_gateway("other", gateway_name="canal", created="2025-06-01T00:00:00Z"),  # conflict
        ]
    )
    slots.append(
        [service("canal-gateway", "istio-system", ip="10.96.0.50"), service("canal-gateway", "istio-system", ip=None)]
    )
    slots.append(
        [
            pod("gw-1", "istio-system", "10.244.9.1", app="canal-gateway"),
            pod("gw-1", "istio-system", "10.244.9.1", ready=False, app="canal-gateway"),
        ]
    )
    slots.append([namespace("a", migrate="yes"), namespace("a")])
    slots.append([namespace("b", migrate="yes"), namespace("b")])
    # Services and their endpoints
    slots.append(
        [
            service("web", "a", [80], ip="10.96.1.1"),
            service("web", "a", [80, 8080], ip="10.96.1.1"),
            service("web", "a", [80, {"name": "dns", "port": 53, "protocol": "UDP"}], ip="10.96.1.1"),
        ]
    )
    slots.append([service("web", "b", [80], ip="10.96.1.2"), service("web", "b", [80], ip=None)])
    slots.append([service("api", "a", [8080], ip="10.96.1.3"), service("api", "a", [80, 8080], ip="10.96.1.3")])
    slots.append([service("db", "a", [(3306, "tcp-mysql")], ip="10.96.1.4")])
    slots.append([service("db2", "b", [(3306, "tcp-mysql")], ip="10.96.1.5")])
    slots.append(
        [
            endpoint_slice(
                "web", "a", [("10.244.1.1", "web-1"), ("10.244.1.2", "web-2")], [("http-80", 80), ("http-8080", 8080)]
            ),
            endpoint_slice("web", "a", [("10.244.1.1", "web-1", DRAINING), ("10.244.1.2", "web-2")], [("http-80", 80)]),
            endpoint_slice("web", "a", [("10.244.1.1", "web-1", DRAINING)], [("http-80", 80)]),
        ]
    )
    slots.append([endpoint_slice("web", "b", [("10.244.2.1", "web-1")])])
    slots.append([endpoint_slice("api", "a", [("10.244.1.7", "api-1")], [("http-8080", 8080)])])
    slots.append([endpoint_slice("db", "a", [("10.244.1.9", "db-1")], [("tcp-mysql", 3306)])])
    slots.append(
        [
            pod("web-1", "a", "10.244.1.1", app="web", version="v1"),
            pod("web-1", "a", "10.244.1.1", app="web", version="v2"),
        ]
    )
    slots.append([pod("web-2", "a", "10.244.1.2", app="web", version="v2")])
    # DestinationRules
    subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
    slots.append(
        [
            destination_rule("web", "web", "a", subsets=subsets),
            destination_rule("web", "web", "a", subsets=subsets[:1], policy={"loadBalancer": {"simple": "RANDOM"}}),
            destination_rule(
                "web",
                "web",
                "a",
                subsets=subsets,
                policy={"loadBalancer": {"consistentHash": {"httpHeaderName": "x-u"}}},
            ),
        ]
    )
    slots.append(
        [
            destination_rule(
                "web-gw",
                "web.a.svc.cluster.local",
                "istio-system",
                subsets=subsets,
                policy={"connectionPool": {"tcp": {"maxConnections": 5}}},
            )
        ]
    )
    # VirtualServices
    web_http = [
        {
            "match": [{"uri": {"prefix": "/"}}],
            "route": [route("web", weight=50, subset="v1"), route("web", weight=50, subset="v2")],
        }
    ]
    slots.append(
        [
            virtual_service("web", "a", hosts=["web"], http=[{"route": [route("web")]}]),
            virtual_service("web", "a", hosts=["web"], http=web_http),
            virtual_service(
                "web", "a", hosts=["web"], http=[{"match": [{"port": 80}], "route": [route("web", port=80)]}]
            ),
            virtual_service(
                "web", "a", hosts=["web"], http=[{"match": [{"uri": {"regex": "(?=bad)"}}], "route": [route("web")]}]
            ),
        ]
    )
    slots.append(
        [
            virtual_service(
                "web", "b", hosts=["web"], http=[{"route": [route("web")]}], created="2024-02-01T00:00:00Z"
            ),
            virtual_service(
                "web", "b", hosts=["web"], gateways=["istio-system/other"], http=[{"route": [route("web")]}]
            ),
        ]
    )
    slots.append(
        [
            virtual_service(
                "api",
                "a",
                hosts=["api"],
                http=[{"route": [route("api", port=8080)], "fault": {"abort": {"httpStatus": 503}}}],
            ),
            virtual_service(
                "api",
                "a",
                hosts=["api"],
                http=[{"route": [route("api")]}],
                gateways=["istio-system/canal", "istio-system/other"],
            ),
        ]
    )
    slots.append(
        [
            virtual_service(
                "star",
                "istio-system",
                hosts=["*"],
                gateways=["canal"],
                http=[{"match": [{"uri": {"exact": "/hello"}}], "route": [route("web.a.svc.cluster.local")]}],
            ),
            virtual_service(
                "star",
                "istio-system",
                hosts=["*"],
                gateways=["canal"],
                http=[
                    {
                        "route": [route("api.a.svc.cluster.local", port=8080)],
                        "corsPolicy": {"allowOrigins": [{"exact": "x"}]},
                    }
                ],
            ),
        ]
    )
    slots.append(
        [
            virtual_service(
                "db", "a", hosts=["db"], tcp=[{"route": [route("db", port=3306)]}], created="2024-01-01T00:00:00Z"
            ),
            virtual_service(
                "db", "a", hosts=["db"], tcp=[{"route": [route("db", port=3306)]}], created="2024-09-01T00:00:00Z"
            ),
        ]
    )
    slots.append(
        [
            virtual_service(
                "db2", "b", hosts=["db2"], tcp=[{"route": [route("db2", port=3306)]}], created="2024-03-01T00:00:00Z"
            )
        ]
    )
    slots.append(
        [
            _with(
                virtual_service("broken", "a", hosts=["web"], http=[{"route": [route("web")]}]),
                "spec.hosts",
                "not-a-list",
            )
        ]
    )
    return slots


UNIVERSE = _universe()
REFS = [parse_object(versions[0]).ref for versions in UNIVERSE]

# An operation: (slot, version) upserts that version, (slot, -1) deletes the object.
operation = st.tuples(st.integers(0, len(UNIVERSE) - 1), st.integers(-1, 3))
batches = st.lists(st.lists(operation, min_size=1, max_size=4), min_size=1, max_size=12)
initial = st.lists(st.booleans(), min_size=len(UNIVERSE), max_size=len(UNIVERSE))


def _item(slot: int, version: int):
    if version < 0:
        return REFS[slot]
    versions = UNIVERSE[slot]
    return parse_object(versions[version % len(versions)])


def _assert_same(incremental, full, context: str) -> None:
    if incremental != full:
        # render_state gives a readable diff of exactly what differs
        assert render_state(incremental) == render_state(full), context
        raise AssertionError(f"states differ outside their rendering: {context}")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=initial, steps=batches)
def test_incremental_equals_full_rebuild(start, steps):
    translator = Translator()
    first = [_item(i, 0) for i, present in enumerate(start) if present]
    state = translator.apply(first)
    _assert_same(state, translate(translator.snapshot), "after the initial batch")
    for n, batch in enumerate(steps):
        state = translator.apply([_item(slot, version) for slot, version in batch])
        _assert_same(state, translate(translator.snapshot), f"after batch {n}: {batch}")


def test_universe_exercises_the_interesting_paths():
    """Guard the property test's power: with everything present, the universe hits each mechanism."""
    translator = Translator()
    translator.apply([_item(i, 0) for i in range(len(UNIVERSE))])
    web = REFS.index(ObjectRef("VirtualService", "a", "web"))
    state = translator.apply([_item(web, 1)])  # the weighted-subsets version
    canal = state.envoy["istio-system/canal"]
    assert canal.listeners["0.0.0.0_3306"].protocol == "TCP"
    assert any(r.ref.name == "broken" for r in state.rejections())  # a parse rejection
    assert any("already" in r.reason for r in state.rejections())  # a conflict
    assert state.dns and state.redirects
    assert any("|v1|" in name for name in canal.clusters)  # subsets
    assert ObjectRef("InternalGateway", "istio-system", "other") in state.status
