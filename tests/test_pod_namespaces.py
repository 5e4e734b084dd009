"""Translator.pod_namespaces: the namespaces whose Pods the translation reads, so the controller watches only those.

Pods are read in two places: the gateway pods of an InternalGateway (in its own namespace, the redirect backends)
and the Pods behind the endpoints of a subset cluster (their labels decide subset membership). Every other
cluster's endpoints come from EndpointSlices alone. The property test checks the incrementally kept answer
against a full translation and against what the published state itself shows, over the universe of
tests/test_incremental.py, and that pod_namespace_bound (what a controller can know before translating) never
leaves one out.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from canal.desired import DesiredState
from canal.model.base import ObjectRef
from canal.snapshot import Snapshot, parse_object
from canal.translate import Translator
from canal.translate.engine import pod_namespace_bound
from tests.builders import (
    app,
    base,
    destination_rule,
    gateway,
    internal_gateway,
    pod,
    route,
    service,
    virtual_service,
)
from tests.test_incremental import REFS, UNIVERSE, batches, initial

IG = "istio-system/canal"
V1 = "outbound|80|v1|reviews.shop.svc.cluster.local"
SUBSETS = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]


def apply(translator: Translator, *objs: dict) -> DesiredState:
    return translator.apply([parse_object(o) for o in objs])


def delete(translator: Translator, kind: str, ns: str, name: str) -> DesiredState:
    return translator.apply([ObjectRef(kind, ns, name)])


def subset_route(name: str = "reviews", ns: str = "shop", subset: str = "v1") -> dict:
    return virtual_service(name, ns, http=[{"route": [route(name, subset=subset)]}])


def plain_route(name: str = "reviews", ns: str = "shop") -> dict:
    return virtual_service(name, ns, http=[{"route": [route(name)]}])


def test_gateway_namespaces_only_while_no_route_uses_a_subset():
    translator = Translator()
    apply(translator, *base(), *app("reviews", "shop", ips=("10.244.1.1", "10.244.1.2")), plain_route())
    apply(translator, destination_rule("reviews", "reviews", "shop", subsets=SUBSETS))
    assert translator.pod_namespaces() == {"istio-system"}  # a DestinationRule alone reads no Pod


def test_a_subset_route_adds_its_service_namespace_and_removing_it_takes_it_away():
    translator = Translator()
    apply(translator, *base(), *app("reviews", "shop", ips=("10.244.1.1", "10.244.1.2")), plain_route())
    apply(translator, destination_rule("reviews", "reviews", "shop", subsets=SUBSETS))
    state = apply(translator, subset_route())
    assert translator.pod_namespaces() == {"istio-system", "shop"}
    assert [e.address for e in state.envoy[IG].endpoints[V1].endpoints] == ["10.244.1.1"]
    apply(translator, plain_route())
    assert translator.pod_namespaces() == {"istio-system"}
    apply(translator, subset_route())
    delete(translator, "VirtualService", "shop", "reviews")
    assert translator.pod_namespaces() == {"istio-system"}


def test_a_subset_of_a_missing_service_reads_no_pod_until_the_service_exists():
    translator = Translator()
    apply(translator, *base(), destination_rule("reviews", "reviews", "shop", subsets=SUBSETS), subset_route())
    assert translator.pod_namespaces() == {"istio-system"}
    apply(translator, *app("reviews", "shop"))
    assert translator.pod_namespaces() == {"istio-system", "shop"}
    delete(translator, "Service", "shop", "reviews")
    assert translator.pod_namespaces() == {"istio-system"}


def test_a_namespace_stays_while_any_gateway_or_service_needs_it():
    translator = Translator()
    apply(
        translator,
        *base(),
        gateway("other", "edge"),
        internal_gateway("other", "edge", gateway_name="other", ips=["10.96.0.60"]),
        *app("reviews", "shop"),
        *app("ratings", "shop"),
        destination_rule("reviews", "reviews", "shop", subsets=SUBSETS),
        destination_rule("ratings", "ratings", "shop", subsets=SUBSETS),
        subset_route(),
        subset_route("ratings"),
        # the same subset cluster on a second gateway
        virtual_service(
            "reviews-edge", "shop", hosts=["reviews"], gateways=["edge/other"], http=[{"route": [route("reviews")]}]
        ),
    )
    assert translator.pod_namespaces() == {"istio-system", "edge", "shop"}
    apply(translator, plain_route())
    assert translator.pod_namespaces() == {"istio-system", "edge", "shop"}  # ratings still has a subset
    apply(translator, plain_route("ratings"))
    assert translator.pod_namespaces() == {"istio-system", "edge"}
    apply(translator, subset_route())
    # the gateway goes: its namespace and the subset clusters only it built go with it
    delete(translator, "InternalGateway", "istio-system", "canal")
    assert translator.pod_namespaces() == {"edge"}


def test_a_reshaped_gateway_forgets_and_recounts_its_subset_clusters():
    translator = Translator()
    apply(
        translator,
        *base(),
        *app("reviews", "shop"),
        destination_rule("reviews", "reviews", "shop", subsets=SUBSETS),
        subset_route(),
    )
    apply(translator, gateway(servers=[(80, "HTTP"), (8080, "HTTP")]))  # a new scope: the state is rebuilt
    assert translator.pod_namespaces() == {"istio-system", "shop"}
    apply(translator, internal_gateway(gateway_name="missing"))  # rejected: no scope, no clusters
    assert translator.pod_namespaces() == {"istio-system"}
    apply(translator, internal_gateway())
    assert translator.pod_namespaces() == {"istio-system", "shop"}


def test_a_pod_change_rebuilds_subset_endpoints_only():
    translator = Translator()
    before = apply(
        translator,
        *base(),
        *app("reviews", "shop", ips=("10.244.1.1", "10.244.1.2")),
        *app("web", "shop", ips=("10.244.2.1",)),
        destination_rule("reviews", "reviews", "shop", subsets=SUBSETS),
        subset_route(),
        plain_route("web"),
    )
    # web has no subset cluster: its Pod's labels are read by nothing, so no endpoint is rebuilt
    after = apply(translator, pod("web-0", "shop", "10.244.2.1", app="web", version="v9"))
    assert after.envoy is before.envoy
    # reviews-1 joins subset v1: its endpoints follow
    after = apply(translator, pod("reviews-1", "shop", "10.244.1.2", app="reviews", version="v1"))
    assert [e.address for e in after.envoy[IG].endpoints[V1].endpoints] == ["10.244.1.1", "10.244.1.2"]


def test_a_full_translation_agrees():
    objs = [
        *base(),
        *app("reviews", "shop"),
        service("unused", "other"),
        destination_rule("reviews", "reviews", "shop", subsets=SUBSETS),
        subset_route(),
    ]
    full = Translator()
    full.load(Snapshot.from_dicts(objs))
    assert full.pod_namespaces() == {"istio-system", "shop"}


def test_the_bound_before_translation_covers_every_rule_with_subsets():
    objs = [
        internal_gateway(),
        destination_rule("reviews", "reviews", "shop", subsets=SUBSETS),
        destination_rule("ratings", "ratings.books", "shop", subsets=SUBSETS),  # names another namespace
        destination_rule("web", "web.front.svc.cluster.local", "shop", policy={"loadBalancer": {"simple": "RANDOM"}}),
        destination_rule("ext", "api.example.com", "shop", subsets=SUBSETS),  # not a Service
    ]
    parsed = [parse_object(o).obj for o in objs]
    assert pod_namespace_bound(parsed) == {"istio-system", "shop", "books"}


def _from_output(translator: Translator) -> frozenset[str]:
    """The same answer read off the snapshot and the published state: gateway namespaces, and the namespace of
    every subset cluster Envoy is given."""
    state = translator.desired
    found = {ig.meta.namespace for ig in translator.snapshot.all("InternalGateway")}
    for config in state.envoy.values():
        found.update(c.service.split("/", 1)[0] for c in config.clusters.values() if c.subset)
    return frozenset(found)


def _item(slot: int, version: int):
    if version < 0:
        return REFS[slot]
    versions = UNIVERSE[slot]
    return parse_object(versions[version % len(versions)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=initial, steps=batches)
def test_incremental_pod_namespaces_equal_a_full_translation(start, steps):
    translator = Translator()
    translator.apply([_item(i, v) for i, v in enumerate(start) if v is not None])
    for n, batch in enumerate([[], *steps]):
        translator.apply([_item(slot, version) for slot, version in batch])
        full = Translator()
        full.load(translator.snapshot)
        assert translator.pod_namespaces() == full.pod_namespaces() == _from_output(translator), f"batch {n}"
        objects = [
            obj for names in translator.snapshot.objects.values() for ns in names.values() for obj in ns.values()
        ]
        assert translator.pod_namespaces() <= pod_namespace_bound(objects), f"batch {n}"
