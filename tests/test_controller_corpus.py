"""The bad-input corpus through the Kubernetes API: each case's objects are written to the test API server next to
the corpus base, and `canal controller` reports every expected rejection as a Warning Event on the object (and,
for the home gateway's VirtualServices and the InternalGateway itself, in the InternalGateway's status), while the
base's VirtualService stays bound and routed. The expectations are the corpus's own `# expect:` lines.

One controller serves all cases in turn (objects written, checked, then put back as the base had them), which is
how a live cluster meets bad input: one broken object among good ones, never a fresh start.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from canal.model.base import ObjectRef
from tests.envoy_harness import wait_for
from tests.kube_api import ApiError, KubeApiServer
from tests.test_controller import IG, RESOURCES, Running, controller_options, status_of
from tests.test_corpus import BASE, CASES, KNOWN_BUGS, Case, _documents

HOME = ObjectRef("VirtualService", "default", "helloworld")
# Cases about files, which an API server cannot hold: an object defined twice (the API keeps one version of each
# object), or an age written into metadata.creationTimestamp (the API server sets it on create, so the object created
# first, here the base, is the older one, and wins, as the API's own timestamps say).
FILE_ONLY = {
    "064-duplicate-definition": "an object defined twice in the files",
    "065-duplicate-of-base-service": "an object defined twice in the files",
    "066-internal-gateway-takes-over-base-gateway": "relies on a creationTimestamp the API server would overwrite",
    # the controller watches Pods only where the translator reads them (gateway namespaces, subset Services)
    "083-pod-ip-ipv6-zone": "a broken Pod in a namespace whose Pods the controller does not watch",
}
API_REFUSED: list[str] = []  # cases whose objects the API server itself refuses (e.g. no metadata.name)


def key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("name", ""), meta.get("namespace", "")


def events_of(server: KubeApiServer) -> list[dict[str, Any]]:
    rtype = server.store.kind("v1", "Event")
    return [e for ns in ("default", "istio-system", "other", "apps", "team-a") for e in server.store.list(rtype, ns)[0]]


@pytest.mark.timeout(600)
def test_every_corpus_case_through_the_api_is_reported_and_the_base_keeps_serving() -> None:
    with KubeApiServer(RESOURCES) as server:
        base = {key(o): o for o in _documents(BASE)}
        for obj in base.values():
            server.create(copy.deepcopy(obj))
        running = Running(server.client(), controller_options())
        controller = running.controller
        try:
            wait_for(lambda: HOME in controller.serving.state.status, what="the base translated")
            problems: dict[str, str] = {}
            for path in CASES:
                if path.stem in KNOWN_BUGS or path.stem in FILE_ONLY:
                    continue
                case = Case.load(path)
                problem = run_case(server, controller, base, case)
                if problem:
                    problems[path.stem] = problem
            assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())
            assert len(API_REFUSED) < len(CASES) // 10, API_REFUSED  # nearly every case reaches Canal
        finally:
            running.stop()


def run_case(server: KubeApiServer, controller: Any, base: dict, case: Case) -> str:
    """Apply, check, restore; returns what went wrong ('' when nothing did)."""
    written: list[dict[str, Any]] = []
    refused = []
    for obj in _documents(case.path):
        try:
            if key(obj) in base:
                server.modify(*_where(obj), lambda o, new=obj: o.update(copy.deepcopy({"spec": new.get("spec")})))
            else:
                server.create(copy.deepcopy(obj))
            written.append(obj)
        except (ApiError, ApiException, ValueError, KeyError) as error:
            refused.append(f"{key(obj)}: {error}")
    try:
        if refused and not written:
            API_REFUSED.append(case.path.stem)  # Kubernetes itself stops it before Canal could see it
            return ""

        def reported() -> bool:
            state = controller.serving.state
            found = state.rejections()
            return all(any(e.matches(r) for r in found) for e in case.expected)

        try:
            wait_for(reported, timeout=10, what="the expected rejections")
        except AssertionError:
            found = "\n  ".join(map(str, controller.serving.state.rejections()))
            return f"expected {[str(e) for e in case.expected]}, the controller has:\n  {found}"
        state = controller.serving.state
        if HOME not in state.status or not state.status[HOME].bound:
            return "the base VirtualService is no longer bound"
        for expected in case.expected:
            if not _reported_in_api(server, expected):
                return f"{expected}: no Event / status entry"
        return ""
    finally:
        for obj in written:
            if key(obj) in base:
                original = base[key(obj)]
                server.modify(
                    *_where(obj), lambda o, orig=original: o.update(copy.deepcopy({"spec": orig.get("spec")}))
                )
            else:
                server.delete(*_where(obj))
        wait_for(lambda: not controller.serving.state.rejections(), timeout=10, what="the base clean again")


def _where(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    api_version, kind, name, namespace = key(obj)
    return api_version, kind, name, namespace


def _reported_in_api(server: KubeApiServer, expected: Any) -> bool:
    """A Warning Event naming the object, with the field and reason; and for the home gateway's objects, the
    InternalGateway's status lists it."""

    def found() -> bool:
        for event in events_of(server):
            involved = event["involvedObject"]
            ref = f"{involved['kind']} {involved['namespace']}/{involved['name']}".replace(" /", " ")
            if ref == expected.ref and event["reason"] == "Rejected" and expected.reason in event["message"]:
                return event["message"].startswith(f"{expected.field}: ")
        return False

    try:
        wait_for(found, timeout=5, what="the Event")
    except AssertionError:
        return False
    kind, _, name = expected.ref.partition(" ")
    if kind in ("VirtualService", "InternalGateway"):
        ns, _, short = name.rpartition("/")
        listed = [r for r in status_of(server).get("rejected", []) if r["name"] == short and r["namespace"] == ns]
        # a VirtualService that names another gateway (or none) is not this gateway's to report
        return bool(listed) or not _names_home_gateway(server, kind, ns, short)
    return True


def _names_home_gateway(server: KubeApiServer, kind: str, namespace: str, name: str) -> bool:
    if kind == "InternalGateway":
        return (namespace, name) == IG
    obj = server.get("networking.istio.io/v1", "VirtualService", name, namespace) or {}
    gateways = (obj.get("spec") or {}).get("gateways") or []
    return any(g in ("istio-system/canal", "canal") for g in gateways if isinstance(g, str))
