"""Parsing at the edge: defaults, API versions, unknown fields, duplicates and List documents."""

from __future__ import annotations

from canal.model.base import ObjectRef
from canal.snapshot import Snapshot, parse_object
from tests.builders import internal_gateway, service, virtual_service


def test_internal_gateway_defaults_follow_the_design():
    raw = {
        "apiVersion": "canal.io/v1alpha1",
        "kind": "InternalGateway",
        "metadata": {"name": "canal", "namespace": "mesh"},
        "spec": {"gatewayRef": {"name": "gw"}, "address": {"ips": ["10.96.0.50"]}},
    }
    ig = parse_object(raw).obj
    assert (ig.gateway.namespace, ig.gateway.name) == ("mesh", "gw")  # gateway namespace defaults to its own
    assert ig.cluster_domain == "cluster.local"
    assert (ig.dns_mode, ig.dns_ttl, ig.redirect_mode) == ("coredns", 5, "nftables")
    assert ig.namespace_selector is None  # absent selects nothing; {} would select everything
    assert ig.key == "mesh/canal"


def test_address_is_required_unless_dns_is_off():
    no_address = internal_gateway()
    del no_address["spec"]["address"]
    parsed = parse_object(no_address)
    assert parsed.obj is None
    assert [(r.field, r.reason.split(":")[0]) for r in parsed.problems.rejections] == [
        ("spec.address", "is required when dns.mode is coredns")
    ]
    no_address["spec"]["dns"] = {"mode": "none"}
    assert parse_object(no_address).obj is not None


def test_unknown_fields_are_caveats_not_silence():
    vs = virtual_service("web", http=[{"route": [{"destination": {"host": "web"}}], "rewite": {"uri": "/"}}])
    parsed = parse_object(vs)
    assert parsed.obj is not None
    assert [(c.field, c.message) for c in parsed.problems.caveats] == [
        ("spec.http[0].rewite", "unknown field, ignored")
    ]


def test_one_object_reports_all_of_its_broken_routes():
    vs = virtual_service(
        "web",
        http=[
            {"route": [{"destination": {"host": "web"}}], "timeout": "soon"},
            {"route": [{"destination": {"host": "web"}}]},
            {"match": [{"uri": {"exact": "/a", "prefix": "/a"}}], "route": [{"destination": {"host": "web"}}]},
        ],
    )
    fields = [r.field for r in parse_object(vs).problems.rejections]
    assert fields == ["spec.http[0].timeout", "spec.http[2].match[0].uri"]


def test_unknown_kinds_are_ignored_and_lists_are_flattened():
    docs = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
        {"apiVersion": "v1", "kind": "List", "items": [service("a"), service("b")]},
        {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "s"}},
    ]
    snapshot = Snapshot.from_dicts(docs)
    assert snapshot.count() == 2 and snapshot.get("Service", "default", "b") is not None


def test_second_definition_of_an_object_is_rejected():
    snapshot = Snapshot.from_dicts([service("a", ip="10.96.0.1"), service("a", ip="10.96.0.2")])
    assert snapshot.get("Service", "default", "a").cluster_ips == ("10.96.0.1",)
    (rejection,) = snapshot.problems[ObjectRef("Service", "default", "a")].rejections
    assert rejection.reason.startswith("defined more than once")


def test_timestamps_stay_strings_when_read_from_yaml(tmp_path):
    from canal.files import load_documents

    path = tmp_path / "svc.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a, creationTimestamp: 2024-01-01T00:00:00Z}\n")
    (doc,) = load_documents([str(path)])
    assert doc.data["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
