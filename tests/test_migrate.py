"""`canal migrate`: the preflight that guards taking a namespace off the sidecars, the label change and its record,
restarts in batches, and rollback.

The pure part is checked on manifests written here; the CLI runs as a user runs it, against the test API server,
with the InternalGateway's status written into it the way the controller writes it (``gateway_status``) and
rollouts simulated by a thread that plays the Deployment controller. Expected values come from the manifests and
the issue (label names, the annotation, the order of restarts), not from the code's output.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from canal.kube.status import DnsView, FleetView, gateway_status
from canal.migrate import (
    RESTARTED_AT,
    SAVED_ANNOTATION,
    Inventory,
    PlanError,
    Workload,
    enforcers,
    find_workloads,
    injects,
    migration_restarts,
    plan_migration,
    plan_rollback,
    policy_findings,
    preflight,
    rollback_restarts,
    rollout_status,
)
from canal.model.base import ObjectRef
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import (
    app,
    endpoint_slice,
    gateway,
    internal_gateway,
    namespace,
    pod,
    route,
    service,
    virtual_service,
)
from tests.conftest import run_canal
from tests.kube_api import KubeApiServer, ResourceType, custom_resource

NS = "shop"
IG_REF = ObjectRef("InternalGateway", "istio-system", "canal")
T0 = "2026-12-01T10:00:00Z"
WEB = "web.shop.svc.cluster.local"


def web_route(name: str = "web", host: str = WEB, port: int = 80) -> dict[str, Any]:
    return virtual_service(name, NS, hosts=[host], http=[{"route": [route(host, port)]}])


def world(labels: dict[str, str] | None = None, generation: int = 3, **ig_spec: Any) -> list[dict[str, Any]]:
    """Namespace shop (injection on) with Service web (two ready endpoints) routed by VirtualService shop/web
    through InternalGateway istio-system/canal, and Service db with no endpoints; the gateway side as the
    helloworld example has it. No status yet: see ``programmed``."""
    ig = internal_gateway(service_ref="canal-gateway", **ig_spec)
    ig["metadata"]["generation"] = generation
    return [
        namespace(NS, **(labels if labels is not None else {"istio-injection": "enabled"})),
        gateway(),
        ig,
        service("canal-gateway", "istio-system", [80], ip="10.96.0.50", selector={"app": "canal-gateway"}),
        pod("gw-1", "istio-system", "10.244.9.1", app="canal-gateway"),
        *app("web", NS, ips=("10.244.1.1", "10.244.1.2")),
        service("db", NS, [5432]),
        web_route(),
    ]


def the_gateway(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "InternalGateway")


def programmed(objects: list[dict[str, Any]], **conditions: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The status the controller writes when every proxy and node agent ACKed and DNS answers; ``conditions``
    overrides some: type -> (status, reason, message)."""
    translated = translate(Snapshot.from_dicts(objects)).status[IG_REF]
    dns = DnsView("coredns", True, "Verified", "answers")
    doc = gateway_status(translated, FleetView(2, 2), FleetView(3, 3), dns, "nftables", [], None, T0)
    for cond in doc["conditions"]:
        if cond["type"] in conditions:
            cond["status"], cond["reason"], cond["message"] = conditions[cond["type"]]
    the_gateway(objects)["status"] = doc
    return objects


def refusals(findings: list[Any]) -> list[str]:
    return [str(f) for f in findings if f.blocking]


# ---------------------------------------------------------------------------------------------- preflight


def test_a_namespace_whose_traffic_the_gateway_carries_may_go() -> None:
    found = [str(f) for f in preflight(NS, programmed(world()))]
    assert "ok: Service shop/web: 2 ready endpoint(s), routed by InternalGateway istio-system/canal" in found
    assert "skip: Service shop/db: no ready endpoints: no traffic to move" in found
    assert any(f.startswith("ok: InternalGateway istio-system/canal: ") and "generation 3" in f for f in found)
    assert not [f for f in found if f.startswith("refused")]


@pytest.mark.parametrize(
    ("kind", "reason", "message"),
    [
        ("Programmed", "NoProxies", "no proxies connected"),
        ("DNSProgrammed", "CorefileNotWritten", "cannot write ConfigMap kube-system/coredns"),
        ("NodesProgrammed", "Pending", "1/3 node agents ACKed the current config"),
    ],
)
def test_a_gateway_condition_not_true_refuses(kind: str, reason: str, message: str) -> None:
    found = refusals(preflight(NS, programmed(world(), **{kind: ("False", reason, message)})))
    assert found == [f"refused: InternalGateway istio-system/canal: {kind} is False ({reason}: {message})"]


def test_a_status_for_an_older_generation_is_not_trusted() -> None:
    objects = programmed(world(generation=3))
    the_gateway(objects)["metadata"]["generation"] = 4  # the spec changed after the controller wrote status
    found = refusals(preflight(NS, objects))
    assert len(found) == 3  # each of Programmed, DNSProgrammed and NodesProgrammed
    assert all("for generation 3 and the object is at generation 4" in f for f in found)


def test_a_gateway_without_status_refuses() -> None:
    found = refusals(preflight(NS, world()))
    assert found == [
        "refused: InternalGateway istio-system/canal: has no status yet: is `canal controller` running and leading?"
    ]


def test_a_service_with_endpoints_and_no_route_refuses() -> None:
    objects = programmed([*world(), *app("cart", NS, ips=("10.244.1.6",))])
    found = refusals(preflight(NS, objects))
    assert found == [
        "refused: Service shop/cart: 1 ready endpoint(s) but no gateway route: no VirtualService bound to an "
        "InternalGateway routes it and no InternalGateway's namespaceSelector selects namespace shop"
    ]


def test_the_translators_reason_is_given_for_a_service_it_leaves_direct() -> None:
    # port 8080 has no server on the Gateway (which serves 80 only)
    api = virtual_service("api", NS, hosts=["api.shop.svc.cluster.local"], http=[{"route": [route("api", 8080)]}])
    objects = programmed([*world(), *app("api", NS, port=8080, ips=("10.244.1.5",)), api])
    (found,) = refusals(preflight(NS, objects))
    assert found.startswith("refused: Service shop/api: 1 ready endpoint(s) but no gateway route: ")
    assert "port 8080" in found and "Gateway istio-system/canal" in found


def test_a_rejected_virtualservice_in_the_namespace_refuses() -> None:
    broken = web_route("broken", "broken.shop.svc.cluster.local")
    broken["spec"]["http"][0]["route"][0]["destination"]["host"] = "nope.shop.svc.cluster.local"
    found = refusals(preflight(NS, programmed([*world(), broken])))
    assert len(found) == 1
    assert found[0].startswith("refused: VirtualService shop/broken: rejected: spec.http[0].route[0].destination.host")
    assert "nope.shop.svc.cluster.local" in found[0]


def test_services_without_traffic_are_skipped_not_refused() -> None:
    headless = service("peers", NS, [7000], ip="None")
    external = service("legacy", NS, [80], ip=None, type="ExternalName", externalName="legacy.example.com")
    not_ready = endpoint_slice("cold", NS, [("10.244.1.9", "cold-0", {"ready": False})])
    objects = programmed(
        [
            *world(),
            headless,
            endpoint_slice("peers", NS, [("10.244.1.7", "peers-0")], [("http-7000", 7000)]),
            external,
            service("cold", NS, [80]),
            not_ready,
        ]
    )
    found = [str(f) for f in preflight(NS, objects)]
    assert not [f for f in found if f.startswith("refused")]
    assert "skip: Service shop/peers: headless: clients reach its pods directly; Canal does not move it" in found
    assert "skip: Service shop/legacy: ExternalName: a DNS alias with no traffic of its own" in found
    assert "skip: Service shop/cold: no ready endpoints: no traffic to move" in found


def test_a_namespace_selector_covers_services_without_a_virtualservice() -> None:
    objects = world(
        labels={"istio-injection": "enabled", "canal.io/migrate": "true"},
        namespaceSelector={"matchLabels": {"canal.io/migrate": "true"}},
    )
    objects = programmed([o for o in objects if o["kind"] != "VirtualService"])
    assert not refusals(preflight(NS, objects))


def test_a_namespace_selector_on_the_injection_label_itself_refuses() -> None:
    objects = world(namespaceSelector={"matchLabels": {"istio-injection": "enabled"}})
    objects = programmed([o for o in objects if o["kind"] != "VirtualService"])
    (found,) = refusals(preflight(NS, objects))
    assert found.startswith(
        "refused: Service shop/web: labelling the namespace istio-injection=disabled would take it off "
        "InternalGateway istio-system/canal"
    )


def test_a_virtualservice_the_controller_has_not_reported_bound_refuses() -> None:
    objects = programmed(world())
    the_gateway(objects)["status"]["boundVirtualServices"] = []  # the controller has not seen shop/web yet
    found = refusals(preflight(NS, objects))
    assert len(found) == 1 and found[0].startswith("refused: VirtualService shop/web: routes Services of shop")


def test_a_mesh_only_virtualservice_is_a_warning() -> None:
    mesh = virtual_service("retries", NS, hosts=["db"], gateways=["mesh"], http=[{"route": [route("db", 5432)]}])
    findings = preflight(NS, programmed([*world(), mesh]))
    assert not refusals(findings)
    assert [str(f) for f in findings if f.level == "warning"] == [
        "warning: VirtualService shop/retries: is bound to no InternalGateway: only sidecars apply it, so this "
        "namespace's pods stop following it once they have none"
    ]


def test_a_missing_namespace_refuses() -> None:
    assert refusals(preflight("nowhere", programmed(world()))) == ["refused: Namespace nowhere: not found"]


# ----------------------------------------------------------------------------------------- the label change


def test_the_migration_label_remembers_what_was_there() -> None:
    change = plan_migration(namespace(NS, **{"istio-injection": "enabled", "team": "a"}))
    assert change.labels == {"istio-injection": "disabled"}
    assert json.loads(change.annotations[SAVED_ANNOTATION]) == {"istio-injection": "enabled", "istio.io/rev": None}
    assert change.after == {"istio-injection": "disabled", "team": "a"}
    assert change.steps[0] == "label namespace shop istio-injection=disabled (was: enabled)"


def test_a_revision_label_is_removed_and_remembered() -> None:
    change = plan_migration(namespace(NS, **{"istio.io/rev": "1-24"}))
    assert change.labels == {"istio-injection": "disabled", "istio.io/rev": None}
    assert json.loads(change.annotations[SAVED_ANNOTATION]) == {"istio-injection": None, "istio.io/rev": "1-24"}
    assert change.steps[0] == "label namespace shop istio-injection=disabled (was: not set)"


def test_a_second_migration_keeps_the_first_record() -> None:
    first = namespace(NS, **{"istio-injection": "disabled"})
    first["metadata"]["annotations"] = {SAVED_ANNOTATION: '{"istio-injection": "enabled", "istio.io/rev": null}'}
    assert plan_migration(first).empty
    first["metadata"]["labels"]["istio-injection"] = "enabled"  # someone turned it back on by hand
    change = plan_migration(first)
    assert change.labels == {"istio-injection": "disabled"} and not change.annotations


def test_rollback_restores_exactly() -> None:
    migrated = namespace(NS, **{"istio-injection": "disabled", "team": "a"})
    migrated["metadata"]["annotations"] = {SAVED_ANNOTATION: '{"istio-injection": null, "istio.io/rev": "1-24"}'}
    change = plan_rollback(migrated)
    assert change.labels == {"istio-injection": None, "istio.io/rev": "1-24"}
    assert change.annotations == {SAVED_ANNOTATION: None}
    assert change.after == {"istio.io/rev": "1-24", "team": "a"}


def test_rollback_of_a_namespace_canal_did_not_migrate_changes_nothing() -> None:
    assert plan_rollback(namespace(NS, **{"istio-injection": "disabled"})).empty


def test_an_annotation_canal_did_not_write_is_not_guessed_at() -> None:
    odd = namespace(NS)
    odd["metadata"]["annotations"] = {SAVED_ANNOTATION: "enabled"}
    with pytest.raises(PlanError, match="not what Canal writes"):
        plan_rollback(odd)


# ------------------------------------------------------------------------------------------------ workloads

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def deployment(name: str, replicas: int = 2, template_annotations: dict | None = None, **labels: str) -> dict:
    """A Deployment whose controller has caught up (status matches generation 1)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "generation": 1},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, **labels}, "annotations": dict(template_annotations or {})},
                "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
            },
        },
        "status": ready_status(replicas, 1),
    }


def ready_status(replicas: int, generation: int) -> dict[str, int]:
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
    }


def replica_set(deploy: str, digest: str = "5d8f7c6b9") -> dict:
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy, "uid": "u", "controller": True}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": f"{deploy}-{digest}", "namespace": NS, "ownerReferences": [owner]},
        "spec": {"selector": {"matchLabels": {"app": deploy}}},
    }


def owned_pod(owner_kind: str, owner: str, index: int, sidecar: bool, digest: str = "5d8f7c6b9") -> dict:
    """A pod of a workload: for a Deployment, owned by its ReplicaSet ``<owner>-<digest>``."""
    name = f"{owner}-{digest}-{index}" if owner_kind == "Deployment" else f"{owner}-{index}"
    body = pod(name, NS, f"10.244.2.{index + 10}", app=owner)
    kind, ref = ("ReplicaSet", f"{owner}-{digest}") if owner_kind == "Deployment" else (owner_kind, owner)
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": kind, "name": ref, "uid": "u", "controller": True}
    ]
    body["metadata"]["labels"]["pod-template-hash"] = digest
    body["spec"]["containers"] = [{"name": "app"}]
    if sidecar:
        body["metadata"]["annotations"] = dict(SIDECAR)
        body["spec"]["containers"].append({"name": "istio-proxy"})
    return body


def test_sidecar_pods_find_their_workloads() -> None:
    stateful = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "queue", "namespace": NS},
        "spec": {"replicas": 1, "template": {"metadata": {}, "spec": {}}},
    }
    native = owned_pod("StatefulSet", "queue", 0, sidecar=False)
    native["spec"]["initContainers"] = [{"name": "istio-proxy", "restartPolicy": "Always"}]  # a native sidecar
    bare = pod("debug", NS, "10.244.2.99")
    bare["metadata"]["annotations"] = dict(SIDECAR)
    objects = [
        deployment("a"),
        replica_set("a"),
        owned_pod("Deployment", "a", 0, sidecar=True),
        owned_pod("Deployment", "a", 1, sidecar=True),
        deployment("b"),  # its ReplicaSet is not listed: found by the <deployment>-<pod-template-hash> rule
        owned_pod("Deployment", "b", 2, sidecar=True, digest="7f9c"),
        deployment("plain"),
        replica_set("plain"),
        owned_pod("Deployment", "plain", 3, sidecar=False),
        deployment("scaled-down", replicas=0, template_annotations=SIDECAR),  # no pods: the template says so
        stateful,
        native,
        bare,
    ]
    inventory = find_workloads(NS, objects)
    found = {str(w): (w.pods, w.sidecar_pods, w.has_sidecar) for w in inventory.workloads}
    assert found == {
        "Deployment shop/a": (2, 2, True),
        "Deployment shop/b": (1, 1, True),
        "Deployment shop/plain": (1, 0, False),
        "Deployment shop/scaled-down": (0, 0, True),
        "StatefulSet shop/queue": (1, 1, True),
    }
    assert inventory.unmanaged == ("Pod shop/debug",)
    plan = migration_restarts(inventory, batch=2)
    assert [[w.name for w in b] for b in plan.batches] == [["a", "b"], ["scaled-down", "queue"]]
    assert [str(n) for n in plan.notes] == [
        "warning: Pod shop/debug: has a sidecar and no Deployment, StatefulSet or DaemonSet to restart: recreate it"
    ]


def test_workloads_a_restart_cannot_fix_are_named_not_restarted() -> None:
    injected = Workload("Deployment", NS, "kube-injected", pods=1, sidecar_pods=1, template_proxy=True)
    on_delete = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "manual", "namespace": NS},
        "spec": {"updateStrategy": {"type": "OnDelete"}, "template": {"metadata": {"annotations": SIDECAR}}},
    }
    paused = {**deployment("paused", template_annotations=SIDECAR)}
    paused["spec"]["paused"] = True
    plan = migration_restarts(Inventory((injected, *find_workloads(NS, [on_delete, paused]).workloads)), batch=1)
    assert plan.batches == ()
    assert [n.subject for n in plan.notes] == [
        "Deployment shop/kube-injected",
        "Deployment shop/paused",
        "StatefulSet shop/manual",
    ]
    assert "istioctl kube-inject" in plan.notes[0].reason
    assert "kubectl rollout resume" in plan.notes[1].reason and "OnDelete" in plan.notes[2].reason


def test_which_workloads_the_injector_would_give_a_sidecar() -> None:
    plain = Workload("Deployment", NS, "a", pods=1)
    opted_out = Workload("Deployment", NS, "b", pods=1, inject="false")
    opted_in = Workload("Deployment", NS, "c", pods=1, inject="true")
    assert injects({"istio-injection": "enabled"}, plain) and not injects({"istio-injection": "enabled"}, opted_out)
    assert injects({"istio.io/rev": "1-24"}, plain)
    assert not injects({"istio-injection": "disabled", "istio.io/rev": "1-24"}, opted_in)  # the label wins
    assert not injects({}, plain) and injects({}, opted_in)
    plan = rollback_restarts(Inventory((plain, opted_out, opted_in)), {"istio.io/rev": "1-24"}, batch=5)
    assert [[w.name for w in b] for b in plan.batches] == [["a", "c"]]


@pytest.mark.parametrize(
    ("obj", "done"),
    [
        (deployment("a"), True),
        ({**deployment("a"), "metadata": {"name": "a", "generation": 2}}, False),  # not observed yet
        ({**deployment("a"), "status": {**ready_status(2, 1), "updatedReplicas": 1}}, False),
        ({**deployment("a"), "status": {**ready_status(2, 1), "replicas": 3}}, False),  # an old pod terminating
        ({**deployment("a"), "status": {**ready_status(2, 1), "availableReplicas": 1}}, False),
        (
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 2},
                "spec": {"replicas": 3},
                "status": {"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3},
            },
            True,
        ),
        (
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 2},
                "spec": {"replicas": 3},
                "status": {
                    "observedGeneration": 2,
                    "readyReplicas": 3,
                    "updatedReplicas": 3,
                    "currentRevision": "q-1",
                    "updateRevision": "q-2",
                },
            },
            False,
        ),
        (
            {
                "kind": "DaemonSet",
                "metadata": {"generation": 4},
                "status": {
                    "observedGeneration": 4,
                    "desiredNumberScheduled": 3,
                    "updatedNumberScheduled": 3,
                    "numberAvailable": 2,
                },
            },
            False,
        ),
    ],
)
def test_rollout_status(obj: dict, done: bool) -> None:
    assert rollout_status(obj).done is done


def test_a_deployment_past_its_progress_deadline_has_failed() -> None:
    stuck = deployment("a")
    stuck["status"]["updatedReplicas"] = 1
    stuck["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
    ]
    assert rollout_status(stuck).failed == "its progress deadline was exceeded"


# ------------------------------------------------------------------------------------ Istio security policy

ROOT = "istio-system"
A_AND_B = "the sidecars of 2 workloads in shop (Deployment shop/a, Deployment shop/b)"
ONLY_A = "the sidecars of 1 workload in shop (Deployment shop/a)"
NOT_APPLIED = "(Canal's gateway does not apply AuthorizationPolicy)"
PLAINTEXT = (
    "without sidecars they accept plaintext from any client and the requirement is silently no longer met "
    "(sidecar clients' auto mTLS falls back to plaintext for pods without a sidecar, and Canal's gateway sends "
    "plaintext)"
)


def policy(kind: str, name: str, ns: str = NS, version: str = "v1", created: str = "", **spec: Any) -> dict:
    """A security.istio.io object as the API returns it."""
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": f"security.istio.io/{version}", "kind": kind, "metadata": meta, "spec": spec}


def strict(name: str = "default", ns: str = NS, mode: str = "STRICT", **spec: Any) -> dict:
    return policy("PeerAuthentication", name, ns, mtls={"mode": mode}, **spec)


def policies_for(*extra: dict, root: str = ROOT, accept: bool = False) -> list[str]:
    """The policy findings for namespace shop, whose Deployments a and b (app=a, app=b) have sidecars, and
    Service web's pods (app=web) none."""
    objects = [*world(), *sidecar_deployments("a", "b"), *extra]
    return [str(f) for f in policy_findings(NS, objects, root, accept)]


def test_an_authorization_policy_the_sidecars_enforce_refuses_the_migration() -> None:
    deny = policy("AuthorizationPolicy", "deny-all", action="DENY", rules=[{}])
    objects = programmed([*world(), *sidecar_deployments("a", "b"), deny])
    assert refusals(preflight(NS, objects)) == [
        f"refused: AuthorizationPolicy shop/deny-all: DENY policy enforced by {A_AND_B}; without sidecars it is no "
        f"longer enforced: the requests it denies get through {NOT_APPLIED}"
    ]


@pytest.mark.parametrize(
    ("spec", "lost"),
    [
        ({}, "requests no ALLOW policy matches are no longer denied"),  # action ALLOW by default; {} allows nothing
        ({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}, "requests no ALLOW"),
        ({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}, "its external authorizer (opa)"),
    ],
)
def test_every_enforcing_action_refuses(spec: dict, lost: str) -> None:
    (found,) = policies_for(policy("AuthorizationPolicy", "p", **spec))
    assert found.startswith(f"refused: AuthorizationPolicy shop/p: {spec.get('action', 'ALLOW')} policy enforced by")
    assert lost in found and found.endswith(NOT_APPLIED)


def test_an_audit_policy_is_a_warning_only() -> None:
    # AUDIT never allows or denies a request: without it only the audit record is lost, no access changes
    (found,) = policies_for(policy("AuthorizationPolicy", "audit", action="AUDIT", rules=[{}]))
    assert found.startswith(f"warning: AuthorizationPolicy shop/audit: AUDIT policy enforced by {A_AND_B}")
    assert "no longer audited" in found


def test_a_selector_counts_only_the_sidecar_workloads_it_matches() -> None:
    only_a = policy("AuthorizationPolicy", "only-a", selector={"matchLabels": {"app": "a"}}, action="DENY")
    nobody = policy("AuthorizationPolicy", "nobody", selector={"matchLabels": {"app": "gone"}}, action="DENY")
    web = policy("AuthorizationPolicy", "web", selector={"matchLabels": {"app": "web"}}, action="DENY")  # no sidecar
    found = policies_for(only_a, nobody, web)
    assert len(found) == 1 and found[0].startswith(
        f"refused: AuthorizationPolicy shop/only-a: DENY policy enforced by {ONLY_A}; "
    )


def test_a_root_namespace_policy_applies_mesh_wide_and_others_do_not() -> None:
    mesh = policy("AuthorizationPolicy", "mesh-deny", ns=ROOT, action="DENY", rules=[{}])
    elsewhere = policy("AuthorizationPolicy", "other-deny", ns="billing", action="DENY", rules=[{}])
    b_only = policy("AuthorizationPolicy", "b-only", ns=ROOT, selector={"matchLabels": {"app": "b"}})
    found = policies_for(mesh, elsewhere, b_only)
    assert [f.split(": ")[1] for f in found] == [
        "AuthorizationPolicy istio-system/b-only",
        "AuthorizationPolicy istio-system/mesh-deny",
    ]
    assert found[1].startswith(
        f"refused: AuthorizationPolicy istio-system/mesh-deny: mesh-wide (root namespace istio-system): DENY policy "
        f"enforced by {A_AND_B}; "
    )
    assert "(Deployment shop/b);" in found[0]


def test_the_root_namespace_is_the_one_given() -> None:
    mesh = policy("AuthorizationPolicy", "mesh-deny", ns=ROOT, action="DENY")
    custom = policy("AuthorizationPolicy", "mesh-deny", ns="mesh-root", action="DENY")
    found = policies_for(mesh, custom, root="mesh-root")
    assert len(found) == 1 and found[0].startswith(
        "refused: AuthorizationPolicy mesh-root/mesh-deny: mesh-wide (root namespace mesh-root)"
    )


def test_a_strict_peer_authentication_refuses() -> None:
    assert policies_for(strict()) == [
        f"refused: PeerAuthentication shop/default: requires mutual TLS (STRICT) at {A_AND_B}; {PLAINTEXT}"
    ]


@pytest.mark.parametrize("mode", ["PERMISSIVE", "DISABLE", "UNSET"])
def test_a_peer_authentication_that_does_not_require_mtls_is_no_loss(mode: str) -> None:
    assert policies_for(strict(mode=mode)) == []


def test_peer_authentication_is_composed_as_istio_does() -> None:
    mesh = strict("default", ROOT)
    # mesh-wide STRICT
    (found,) = policies_for(mesh)
    assert found.startswith("refused: PeerAuthentication istio-system/default: mesh-wide (root namespace istio-system)")
    # ... overridden for the namespace: nothing is lost
    assert policies_for(mesh, strict("relaxed", mode="PERMISSIVE")) == []
    # ... and a namespace UNSET inherits it
    (found,) = policies_for(mesh, strict("inherit", mode="UNSET"))
    assert found.startswith("refused: PeerAuthentication istio-system/default: ")
    # a workload policy overrides the namespace for the workloads it selects only
    relax_a = strict("a-permissive", mode="PERMISSIVE", selector={"matchLabels": {"app": "a"}})
    (found,) = policies_for(strict(), relax_a)
    b_only = "the sidecars of 1 workload in shop (Deployment shop/b)"
    assert found.startswith(f"refused: PeerAuthentication shop/default: requires mutual TLS (STRICT) at {b_only}")
    # selectors in the root namespace are ignored by Istio for PeerAuthentication
    assert policies_for(strict("root-selector", ROOT, selector={"matchLabels": {"app": "a"}})) == []
    # of two namespace-wide policies the oldest wins
    old = strict("old", mode="PERMISSIVE")
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    new = strict("new")
    new["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    assert policies_for(new, old) == []


def test_a_port_level_strict_mode_names_its_ports() -> None:
    ports = strict(
        "a-ports",
        mode="PERMISSIVE",
        selector={"matchLabels": {"app": "a"}},
        portLevelMtls={"9090": {"mode": "STRICT"}, "8080": {"mode": "STRICT"}, "7070": {"mode": "DISABLE"}},
    )
    assert policies_for(ports) == [
        f"refused: PeerAuthentication shop/a-ports: requires mutual TLS (STRICT) on ports 8080, 9090 at {ONLY_A}; "
        f"{PLAINTEXT}"
    ]


def test_a_request_authentication_refuses() -> None:
    jwt = policy("RequestAuthentication", "jwt", jwtRules=[{"issuer": "https://auth.example.com"}])
    assert policies_for(jwt) == [
        "refused: RequestAuthentication shop/jwt: JWT validation (issuer https://auth.example.com) enforced by "
        f"{A_AND_B}; without sidecars tokens are no longer validated: a request with an invalid or expired JWT is no "
        "longer rejected (Canal's gateway does not apply RequestAuthentication)"
    ]


def test_accepting_turns_every_policy_into_a_warning() -> None:
    found = policies_for(
        policy("AuthorizationPolicy", "deny", action="DENY"),
        strict(),
        policy("RequestAuthentication", "jwt", jwtRules=[{"issuer": "x"}]),
        accept=True,
    )
    assert [f.split(": ")[:2] for f in found] == [
        ["warning", "AuthorizationPolicy shop/deny"],
        ["warning", "PeerAuthentication shop/default"],
        ["warning", "RequestAuthentication shop/jwt"],
    ]


def test_findings_are_sorted_and_do_not_depend_on_the_order_listed() -> None:
    extra = [
        policy("RequestAuthentication", "jwt", version="v1beta1", jwtRules=[{"issuer": "x"}]),
        strict("default", ROOT),
        policy("AuthorizationPolicy", "z", action="DENY"),
        policy("AuthorizationPolicy", "a", ns=ROOT, action="DENY"),
        policy("AuthorizationPolicy", "m", action="DENY"),
    ]
    found = policies_for(*extra)
    assert [f.split(": ")[1] for f in found] == [
        "AuthorizationPolicy istio-system/a",
        "AuthorizationPolicy shop/m",
        "AuthorizationPolicy shop/z",
        "PeerAuthentication istio-system/default",
        "RequestAuthentication shop/jwt",  # v1beta1 counts as v1 does
    ]
    assert policies_for(*reversed(extra)) == found


def test_policies_bound_to_gateways_or_waypoints_are_not_the_sidecars() -> None:
    waypoint = policy("AuthorizationPolicy", "waypoint", action="DENY", targetRefs=[{"kind": "Service", "name": "a"}])
    gateway_bound = policy("RequestAuthentication", "gw", targetRef={"kind": "Gateway", "name": "ingress"})
    assert policies_for(waypoint, gateway_bound) == []


def test_which_workloads_enforce_policy() -> None:
    kube_injected = deployment("kube-injected")  # istio-proxy in its template: a restart keeps the sidecar
    kube_injected["spec"]["template"]["spec"]["containers"].append({"name": "istio-proxy"})
    job_pod = pod("job-x", NS, "10.244.2.50", app="job")
    job_pod["metadata"]["annotations"] = dict(SIDECAR)
    objects = [
        *sidecar_deployments("a"),
        deployment("plain"),
        replica_set("plain"),
        owned_pod("Deployment", "plain", 7, sidecar=False),
        deployment("scaled-down", replicas=0, template_annotations=SIDECAR, tier="back"),
        kube_injected,
        job_pod,
    ]
    found = {e.name: e for e in enforcers(NS, objects)}
    assert sorted(found) == ["Deployment shop/a", "Deployment shop/scaled-down", "Pod shop/job-x"]
    assert found["Deployment shop/scaled-down"].selected_by({"tier": "back"})  # its template's labels
    assert found["Deployment shop/a"].selected_by({"pod-template-hash": "5d8f7c6b9"})  # its pods' labels
    assert not found["Deployment shop/a"].selected_by({"app": "b"})


def test_a_namespace_without_sidecars_or_policies_has_no_policy_findings() -> None:
    assert policy_findings(NS, [*world(), strict(), policy("AuthorizationPolicy", "deny", action="DENY")]) == []
    assert policy_findings(NS, [*world(), *sidecar_deployments("a")]) == []


# ------------------------------------------------------------------------------------- the CLI, end to end

RESOURCES = (
    custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways"),
    custom_resource("networking.istio.io/v1", "Gateway", "gateways"),
    custom_resource("networking.istio.io/v1", "VirtualService", "virtualservices"),
    custom_resource("networking.istio.io/v1", "DestinationRule", "destinationrules"),
    ResourceType("apps", "v1", "deployments", "Deployment", status=True, generation=True),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", status=True, generation=True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", status=True, generation=True),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", status=True, generation=True),
)
WRITES = ("create", "update", "patch", "delete")


class Cluster:
    """The test API server seeded with ``world()`` and sidecar-injected Deployments, and a kubeconfig for it."""

    def __init__(self, server: KubeApiServer, tmp: Path) -> None:
        self.server = server
        self.kubeconfig = str(server.write_kubeconfig(tmp / "kubeconfig"))

    def seed(self, objects: list[dict[str, Any]], **conditions: tuple[str, str, str]) -> None:
        """Create the objects, then write the gateway's status for the generation the server gave it."""
        for obj in objects:
            self.server.create(copy.deepcopy(obj))
        stored = self.server.get("canal.io/v1alpha1", "InternalGateway", "canal", "istio-system")
        as_stored = copy.deepcopy(objects)
        the_gateway(as_stored)["metadata"]["generation"] = stored["metadata"]["generation"]
        doc = the_gateway(programmed(as_stored, **conditions))["status"]
        self.server.modify(
            "canal.io/v1alpha1", "InternalGateway", "canal", "istio-system", lambda o: o.__setitem__("status", doc)
        )

    def canal(self, *args: str) -> Any:
        return run_canal("migrate", *args, "--kubeconfig", self.kubeconfig)

    def namespace(self) -> dict[str, Any]:
        return self.server.get("v1", "Namespace", NS)["metadata"]

    def deployment(self, name: str) -> dict[str, Any]:
        return self.server.get("apps/v1", "Deployment", name, NS)

    def writes(self) -> list[tuple[str, str, str]]:
        return [(r.verb, r.kind, r.name) for r in self.server.requests if r.verb in WRITES]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with KubeApiServer(RESOURCES) as server:
        yield Cluster(server, tmp_path)


def sidecar_deployments(*names: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        out += [deployment(name), replica_set(name)]
        out += [owned_pod("Deployment", name, 2 * i + k, sidecar=True) for k in range(2)]
    return out


class Rollouts:
    """Plays the Deployment controller: a restarted Deployment becomes ready ``delay`` seconds after its restart,
    except those named ``stuck``. Records the order and how many were rolling at once."""

    def __init__(self, server: KubeApiServer, names: list[str], stuck: tuple[str, ...] = (), delay: float = 0.3):
        self.server, self.names, self.stuck, self.delay = server, names, stuck, delay
        self.seen: dict[str, float] = {}
        self.ready: list[str] = []
        self.most_at_once = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Rollouts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rolling = 0
            for name in self.names:
                obj = self.server.get("apps/v1", "Deployment", name, NS)
                annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
                generation = obj["metadata"]["generation"]
                if RESTARTED_AT not in annotations or obj["status"]["observedGeneration"] >= generation:
                    continue
                rolling += 1
                since = self.seen.setdefault(name, time.monotonic())
                if name not in self.stuck and time.monotonic() - since >= self.delay:
                    self.server.modify("apps/v1", "Deployment", name, NS, self._ready(generation))
                    self.ready.append(name)
            self.most_at_once = max(self.most_at_once, rolling)

    @staticmethod
    def _ready(generation: int) -> Callable[[dict[str, Any]], None]:
        def mutate(obj: dict[str, Any]) -> None:
            obj["status"] = ready_status(obj["spec"]["replicas"], generation)

        return mutate


def restarted(cluster: Cluster, name: str) -> bool:
    annotations = cluster.deployment(name)["spec"]["template"]["metadata"].get("annotations") or {}
    return RESTARTED_AT in annotations


def test_a_dry_run_prints_the_steps_and_writes_nothing(cluster: Cluster) -> None:
    cluster.seed([*world(), *sidecar_deployments("a", "b")])
    cluster.server.clear_requests()
    result = cluster.canal("namespace", NS, "--dry-run", "--restart")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dry run: label namespace shop istio-injection=disabled (was: enabled)" in lines
    assert "dry run: restart Deployment shop/a (batch 1/2)" in lines
    assert "dry run: restart Deployment shop/b (batch 2/2)" in lines
    assert lines[-1] == "dry run: nothing was changed"
    assert cluster.writes() == []
    assert cluster.namespace()["labels"] == {"istio-injection": "enabled"}


def test_a_refusal_gives_its_reasons_and_changes_nothing(cluster: Cluster) -> None:
    cluster.seed(world(), Programmed=("False", "NoProxies", "no proxies connected"))
    cluster.server.clear_requests()
    result = cluster.canal("namespace", NS)
    assert result.returncode == 1
    assert (
        "  refused: InternalGateway istio-system/canal: Programmed is False (NoProxies: no proxies connected)"
        in result.stdout.splitlines()
    )
    assert "migration of shop refused: 1 problem(s); nothing changed" in result.stderr
    assert cluster.writes() == []
    assert cluster.namespace()["labels"] == {"istio-injection": "enabled"}


def test_a_migration_labels_the_namespace_and_records_what_it_was(cluster: Cluster) -> None:
    cluster.seed([*world(), *sidecar_deployments("a")])
    cluster.server.clear_requests()
    result = cluster.canal("namespace", NS)
    assert result.returncode == 0, result.stderr
    meta = cluster.namespace()
    assert meta["labels"] == {"istio-injection": "disabled"}
    assert json.loads(meta["annotations"][SAVED_ANNOTATION]) == {"istio-injection": "enabled", "istio.io/rev": None}
    assert cluster.writes() == [("patch", "Namespace", NS)]
    assert "label namespace shop istio-injection=disabled (was: enabled)" in result.stdout.splitlines()
    assert "keep their sidecars until restarted (rerun with --restart): Deployment shop/a" in result.stdout
    assert not restarted(cluster, "a")


def test_a_concurrent_edit_of_the_namespace_is_read_again(cluster: Cluster) -> None:
    cluster.seed(world())
    cluster.server.inject_failure(409, method="PATCH", kind="Namespace", message="the object has been modified")
    result = cluster.canal("namespace", NS)
    assert result.returncode == 0, result.stderr
    assert cluster.namespace()["labels"] == {"istio-injection": "disabled"}
    assert len(cluster.server.requests_of("patch", kind="Namespace")) == 2


@pytest.mark.timeout(60)
def test_restarts_go_one_at_a_time_and_stop_at_the_first_that_is_not_ready(cluster: Cluster) -> None:
    names = ["a", "b", "c"]
    cluster.seed([*world(), *sidecar_deployments(*names), deployment("plain")])
    with Rollouts(cluster.server, [*names, "plain"], stuck=("b",)) as rollouts:
        result = cluster.canal("namespace", NS, "--restart", "--batch", "1", "--timeout", "1.5")
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert lines.index("restart Deployment shop/a (batch 1/3)") < lines.index("restart Deployment shop/b (batch 2/3)")
    assert any(line.startswith("Deployment shop/a: ready (2/2 updated") for line in lines)
    assert "error: Deployment shop/b did not become ready within 1.5s" in result.stderr
    assert "not restarted: Deployment shop/c" in result.stderr
    assert rollouts.ready == ["a"] and rollouts.most_at_once == 1
    assert restarted(cluster, "a") and restarted(cluster, "b")
    assert not restarted(cluster, "c") and not restarted(cluster, "plain")  # later ones, and no sidecar: untouched
    assert [r.name for r in cluster.server.requests_of("patch", kind="Deployment")] == ["a", "b"]
    assert cluster.namespace()["labels"] == {"istio-injection": "disabled"}  # the label stays: rerun or roll back


@pytest.mark.timeout(60)
def test_restarts_in_batches_wait_for_each_batch(cluster: Cluster) -> None:
    names = ["a", "b", "c"]
    cluster.seed([*world(), *sidecar_deployments(*names)])
    with Rollouts(cluster.server, names, delay=0.2) as rollouts:
        result = cluster.canal("namespace", NS, "--restart", "--batch", "2", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert sorted(rollouts.ready[:2]) == ["a", "b"] and rollouts.ready[2] == "c"
    assert rollouts.most_at_once == 2
    assert "restart Deployment shop/c (batch 2/2)" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == "done: namespace shop gets no new sidecars"


@pytest.mark.timeout(60)
def test_rollback_restores_the_labels_exactly(cluster: Cluster) -> None:
    labels = {"istio.io/rev": "1-24", "team": "payments"}
    plain = [deployment("a"), replica_set("a"), owned_pod("Deployment", "a", 0, sidecar=False)]
    opted_out = deployment("batch-job", **{"sidecar.istio.io/inject": "false"})
    cluster.seed([*world(labels=labels), *plain, opted_out])
    result = cluster.canal("namespace", NS)
    assert result.returncode == 0, result.stderr
    assert cluster.namespace()["labels"] == {"istio-injection": "disabled", "team": "payments"}
    assert "remove label istio.io/rev=1-24 from namespace shop (it enables injection too)" in result.stdout

    with Rollouts(cluster.server, ["a", "batch-job"]):
        back = cluster.canal("rollback", NS, "--restart", "--timeout", "20")
    assert back.returncode == 0, back.stderr
    meta = cluster.namespace()
    assert meta["labels"] == labels
    assert SAVED_ANNOTATION not in (meta.get("annotations") or {})
    lines = back.stdout.splitlines()
    assert "remove label istio-injection from namespace shop (was: disabled; not set before Canal)" in lines
    assert "label namespace shop istio.io/rev=1-24 (was: not set)" in lines
    assert "restart Deployment shop/a (batch 1/1)" in lines  # the revision label gives its pods a sidecar again
    assert not restarted(cluster, "batch-job")

    again = cluster.canal("rollback", NS)
    assert again.returncode == 0
    assert "has no canal.io/migrated-from-istio-injection annotation" in again.stdout
    assert cluster.namespace()["labels"] == labels


def test_usage_errors(cluster: Cluster) -> None:
    assert cluster.canal("namespace").returncode == 2
    assert cluster.canal("namespace", NS, "--batch", "0").returncode == 2
    assert cluster.canal("namespace", NS, "--timeout", "0").returncode == 2
    missing = cluster.canal("rollback", "nowhere")
    assert missing.returncode == 1 and "error: namespace nowhere not found" in missing.stderr


# ------------------------------------------------------------------- the CLI and Istio security policy

SECURITY = tuple(
    custom_resource(f"security.istio.io/{version}", kind, plural, status=False)
    for version in ("v1", "v1beta1")
    for kind, plural in (
        ("AuthorizationPolicy", "authorizationpolicies"),
        ("PeerAuthentication", "peerauthentications"),
        ("RequestAuthentication", "requestauthentications"),
    )
)
DENY_ALL = policy("AuthorizationPolicy", "deny-all", action="DENY", rules=[{}])
MESH_STRICT = strict("default", ROOT)
HINT = "2 Istio security policies above would no longer be enforced; to migrate anyway, leaving them unenforced"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Cluster]:
    """The test API server with Istio's security CRDs installed (v1 and v1beta1, as Istio 1.22+ serves them)."""
    with KubeApiServer(RESOURCES + SECURITY) as server:
        yield Cluster(server, tmp_path)


def test_policies_the_sidecars_enforce_refuse_the_migration(secured: Cluster) -> None:
    secured.seed([*world(), *sidecar_deployments("a", "b"), DENY_ALL, MESH_STRICT])
    secured.server.clear_requests()
    result = secured.canal("namespace", NS, "--restart")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert (
        f"  refused: AuthorizationPolicy shop/deny-all: DENY policy enforced by {A_AND_B}; without sidecars it is no "
        f"longer enforced: the requests it denies get through {NOT_APPLIED}"
    ) in lines
    assert (
        "  refused: PeerAuthentication istio-system/default: mesh-wide (root namespace istio-system): requires "
        f"mutual TLS (STRICT) at {A_AND_B}; {PLAINTEXT}"
    ) in lines
    assert "migration of shop refused: 2 problem(s); nothing changed" in result.stderr
    assert f"{HINT}, rerun with --accept-unenforced-policies" in result.stderr
    assert secured.writes() == []
    assert secured.namespace()["labels"] == {"istio-injection": "enabled"}
    listed = {(r.kind, r.namespace) for r in secured.server.requests_of("list") if r.path.startswith("/apis/security")}
    assert listed == {
        (k, ns) for k in ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication") for ns in (NS, ROOT)
    }


def test_accepting_unenforced_policies_migrates_and_warns(secured: Cluster) -> None:
    jwt = policy("RequestAuthentication", "jwt", jwtRules=[{"issuer": "https://auth.example.com"}])
    secured.seed([*world(), *sidecar_deployments("a"), DENY_ALL, jwt])
    result = secured.canal("namespace", NS, "--accept-unenforced-policies")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.startswith(f"  warning: AuthorizationPolicy shop/deny-all: DENY policy enforced by {ONLY_A}")
        for line in lines
    )
    assert any(line.startswith("  warning: RequestAuthentication shop/jwt: JWT validation") for line in lines)
    assert "warning: continuing although 2 Istio security policies will no longer be enforced in shop" in lines
    assert lines[-1] == "done: namespace shop gets no new sidecars"
    assert secured.namespace()["labels"] == {"istio-injection": "disabled"}


def test_a_dry_run_prints_the_policies_too(secured: Cluster) -> None:
    secured.seed([*world(), *sidecar_deployments("a"), DENY_ALL])
    secured.server.clear_requests()
    refused = secured.canal("namespace", NS, "--dry-run")
    assert refused.returncode == 1
    assert any(
        line.startswith("  refused: AuthorizationPolicy shop/deny-all: ") for line in refused.stdout.splitlines()
    )
    accepted = secured.canal("namespace", NS, "--dry-run", "--accept-unenforced-policies")
    assert accepted.returncode == 0, accepted.stderr
    lines = accepted.stdout.splitlines()
    assert any(line.startswith("  warning: AuthorizationPolicy shop/deny-all: ") for line in lines)
    assert "dry run: label namespace shop istio-injection=disabled (was: enabled)" in lines
    assert lines[-1] == "dry run: nothing was changed"
    assert secured.writes() == []


def test_a_policy_not_matching_any_sidecar_workload_lets_the_migration_go(secured: Cluster) -> None:
    elsewhere = policy("AuthorizationPolicy", "deny-all", ns="billing", action="DENY")
    web_only = policy("AuthorizationPolicy", "web", selector={"matchLabels": {"app": "web"}}, action="DENY")
    secured.seed([*world(), *sidecar_deployments("a"), elsewhere, web_only, strict(mode="PERMISSIVE")])
    result = secured.canal("namespace", NS)
    assert result.returncode == 0, result.stderr
    assert "AuthorizationPolicy" not in result.stdout and "PeerAuthentication" not in result.stdout
    assert secured.namespace()["labels"] == {"istio-injection": "disabled"}


def test_the_istio_root_namespace_option(secured: Cluster) -> None:
    secured.seed([*world(), *sidecar_deployments("a"), strict("default", "mesh-root")])
    assert secured.canal("namespace", NS, "--dry-run").returncode == 0  # istio-system is the root by default
    result = secured.canal("namespace", NS, "--dry-run", "--istio-root-namespace", "mesh-root")
    assert result.returncode == 1
    assert "  refused: PeerAuthentication mesh-root/default: mesh-wide (root namespace mesh-root): " in result.stdout


def test_the_served_version_is_discovered(tmp_path: Path) -> None:
    older = tuple(r for r in SECURITY if r.version == "v1beta1")  # Istio before 1.22
    with KubeApiServer(RESOURCES + older) as server:
        cluster = Cluster(server, tmp_path)
        cluster.seed(
            [*world(), *sidecar_deployments("a"), policy("AuthorizationPolicy", "deny-all", version="v1beta1")]
        )
        result = cluster.canal("namespace", NS)
        assert result.returncode == 1
        assert "  refused: AuthorizationPolicy shop/deny-all: ALLOW policy enforced by" in result.stdout
        paths = {r.path for r in server.requests_of("list") if "security.istio.io" in r.path}
    assert "/apis/security.istio.io/v1beta1/namespaces/shop/authorizationpolicies" in paths


def test_without_the_security_crds_there_is_nothing_to_enforce(tmp_path: Path) -> None:
    only_authz = tuple(r for r in SECURITY if r.version == "v1" and r.kind == "AuthorizationPolicy")
    for resources in (RESOURCES, RESOURCES + only_authz):  # no security.istio.io at all; one CRD of three
        with KubeApiServer(resources) as server:
            cluster = Cluster(server, tmp_path)
            cluster.seed([*world(), *sidecar_deployments("a")])
            result = cluster.canal("namespace", NS, "--dry-run")
            assert result.returncode == 0, result.stderr
            assert "warning" not in result.stdout


def test_policies_that_cannot_be_listed_refuse(secured: Cluster) -> None:
    secured.seed([*world(), *sidecar_deployments("a")])
    secured.server.inject_failure(
        403, verb="list", kind="PeerAuthentication", namespace=NS, message="forbidden by RBAC"
    )
    result = secured.canal("namespace", NS)
    assert result.returncode == 1
    assert "error: cannot list peerauthentications in shop: HTTP 403: forbidden by RBAC" in result.stderr
    assert secured.namespace()["labels"] == {"istio-injection": "enabled"}


def test_rollback_does_not_look_at_policies(secured: Cluster) -> None:
    secured.seed([*world(), *sidecar_deployments("a"), DENY_ALL, MESH_STRICT])
    assert secured.canal("namespace", NS, "--accept-unenforced-policies").returncode == 0
    secured.server.clear_requests()
    back = secured.canal("rollback", NS)
    assert back.returncode == 0, back.stderr
    assert secured.namespace()["labels"] == {"istio-injection": "enabled"}
    assert "AuthorizationPolicy" not in back.stdout
    assert not [r for r in secured.server.requests if "security.istio.io" in r.path]
    assert secured.canal("rollback", NS, "--accept-unenforced-policies").returncode == 2  # not an option of rollback
