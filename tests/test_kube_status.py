"""InternalGateway status, the pure part: which conditions the runtime views turn into, what is carried over from
the previous status, and the `canal status` rendering. Expected documents are written out from the CRD's status
schema (charts/canal/crds) and the issue's condition list, not from the code's output."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from canal.desired import Condition, ObjectStatus
from canal.kube.status import (
    DnsView,
    FleetView,
    Nack,
    comparable,
    describe,
    gateway_status,
    table,
)
from canal.model.base import ObjectRef, Rejection

IG = ObjectRef("InternalGateway", "istio-system", "canal")
VS = ObjectRef("VirtualService", "default", "broken")
T0, T1 = "2026-12-01T10:00:00Z", "2026-12-01T10:05:00Z"
TRANSLATED = ObjectStatus(
    IG,
    generation=3,
    conditions=(
        Condition("Accepted", "True", "Accepted"),
        Condition("AddressResolved", "True", "Resolved", "10.96.0.50"),
    ),
    bound=frozenset({"default/helloworld"}),
    rejected=frozenset({"default/broken"}),
)
REJECTION = Rejection(VS, "spec.http[0].route[0].destination.host", "Service default/nope not found")
ALL_ACKED = FleetView(connected=2, programmed=2)


DNS_OK = DnsView("coredns", True, "Programmed", "1.2 s")


def status(proxies=ALL_ACKED, nodes=ALL_ACKED, dns=DNS_OK, previous=None, at=T0, redirect="nftables"):
    return gateway_status(TRANSLATED, proxies, nodes, dns, redirect, [REJECTION], previous, at)


def conditions(doc: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in doc["conditions"]}


def test_a_healthy_gateway() -> None:
    doc = status()
    assert conditions(doc) == {
        "Accepted": ("True", "Accepted"),
        "AddressResolved": ("True", "Resolved"),
        "Programmed": ("True", "Programmed"),
        "DNSProgrammed": ("True", "Programmed"),
        "NodesProgrammed": ("True", "Programmed"),
    }
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 for c in doc["conditions"])
    assert doc["observedGeneration"] == 3
    assert doc["boundVirtualServices"] == ["default/helloworld"] and doc["boundCount"] == 1
    assert doc["rejected"] == [
        {
            "kind": "VirtualService",
            "namespace": "default",
            "name": "broken",
            "field": "spec.http[0].route[0].destination.host",
            "reason": "Service default/nope not found",
        }
    ]
    assert doc["proxies"] == {"connected": 2, "programmed": 2} and "lastNack" not in doc


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [
        (FleetView(), ("False", "NoProxies")),
        (FleetView(connected=3, programmed=2), ("False", "Pending")),
        (FleetView(2, 1, (Nack("gw-1", "rds", "bad regex"),)), ("False", "Rejected")),
    ],
)
def test_programmed_needs_every_connected_proxy_to_ack(proxies: FleetView, expected: tuple[str, str]) -> None:
    assert conditions(status(proxies=proxies))["Programmed"] == expected


def test_a_nack_is_kept_as_last_nack_with_the_time_it_was_first_seen() -> None:
    nacked = FleetView(2, 1, (Nack("gw-1", "rds", "invalid regex"),))
    first = status(proxies=nacked, at=T0)
    assert first["lastNack"] == {"node": "gw-1", "type": "rds", "message": "invalid regex", "time": T0}
    assert (
        "gw-1 rejected rds: invalid regex"
        in next(c for c in first["conditions"] if c["type"] == "Programmed")["message"]
    )
    again = status(proxies=nacked, previous=first, at=T1)
    assert again["lastNack"]["time"] == T0
    healed = status(previous=again, at=T1)  # no NACK now: the last one stays visible, Programmed goes True
    assert healed["lastNack"] == first["lastNack"]
    assert conditions(healed)["Programmed"] == ("True", "Programmed")


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    first = status(at=T0)
    same = status(previous=first, at=T1)
    assert all(c["lastTransitionTime"] == T0 for c in same["conditions"])
    assert comparable(same) == comparable(first)  # a rewrite of the same facts is skipped
    flipped = status(proxies=FleetView(), previous=first, at=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Programmed"] == T1 and times["Accepted"] == T0
    assert comparable(flipped) != comparable(first)


def test_dns_and_redirect_modes() -> None:
    assert conditions(status(dns=DnsView("none")))["DNSProgrammed"] == ("True", "Disabled")
    assert conditions(status(dns=DnsView("coredns")))["DNSProgrammed"] == ("Unknown", "Pending")
    wrong = DnsView("coredns", False, "WrongAnswer", "10.96.120.15")
    assert conditions(status(dns=wrong))["DNSProgrammed"] == ("False", "WrongAnswer")
    assert conditions(status(nodes=FleetView()))["NodesProgrammed"] == ("False", "NoNodeAgents")
    assert conditions(status(nodes=FleetView(), redirect="none"))["NodesProgrammed"] == ("True", "Disabled")


def item(name: str, doc: dict | None) -> dict:
    out = {
        "apiVersion": "canal.io/v1alpha1",
        "kind": "InternalGateway",
        "metadata": {"namespace": "istio-system", "name": name, "creationTimestamp": T0, "generation": 3},
        "spec": {"gatewayRef": {"name": "canal"}},
    }
    if doc is not None:
        out["status"] = doc
    return out


def test_the_status_table_and_description() -> None:
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    text = table([item("b", None), item("a", status(proxies=FleetView(3, 2)))], at=at)
    lines = [line.split() for line in text.splitlines()]
    header = ["NAMESPACE", "NAME", "GATEWAY", "BOUND", "REJECTED", "PROGRAMMED", "PROXIES", "DNS", "NODES", "AGE"]
    assert lines[0] == header
    assert lines[1] == ["istio-system", "a", "canal", "1", "1", "False", "2/3", "True", "2/2", "2h"]
    assert lines[2] == ["istio-system", "b", "canal", "0", "0", "Unknown", "0/0", "Unknown", "0/0", "2h"]
    detail = describe(item("a", status(proxies=FleetView(2, 1, (Nack("gw-1", "lds", "port in use"),)))))
    assert "Programmed=False Rejected: 1 rejection(s); gw-1 rejected lds: port in use" in detail
    assert "  VirtualService default/broken: spec.http[0].route[0].destination.host: Service default/nope" in detail
    assert "Last NACK: gw-1 rejected lds at 2026-12-01T10:00:00Z: port in use" in detail
    assert "not written yet" in describe(item("b", None))
