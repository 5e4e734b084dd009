"""The test API server, proven with the official client: CRUD, conflicts, list + watch, status, Leases, hooks."""

from __future__ import annotations

import datetime
import json
import threading
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.kube_api import (
    ApiError,
    KubeApiServer,
    custom_resource,
    field_selector,
    json_patch,
    label_selector,
    merge_patch,
)

pytestmark = pytest.mark.timeout(60)

INTERNAL_GATEWAYS = custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways")
CLUSTER_THINGS = custom_resource("example.io/v1", "ClusterThing", "clusterthings", namespaced=False, status=False)


def config_map(name: str, namespace: str = "default", labels: dict | None = None, **data: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "data": data,
    }


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


# ----------------------------------------------------------------------------------------------------- CRUD


def test_config_map_create_read_replace_patch_delete(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    created = core.create_namespaced_config_map("default", config_map("a", key="one"))
    assert created.metadata.uid and created.metadata.creation_timestamp is not None
    first = int(created.metadata.resource_version)

    read = core.read_namespaced_config_map("a", "default")
    assert read.data == {"key": "one"}
    assert read.metadata.resource_version == created.metadata.resource_version

    read.data["key"] = "two"
    replaced = core.replace_namespaced_config_map("a", "default", read)
    assert replaced.data == {"key": "two"}
    assert int(replaced.metadata.resource_version) > first
    assert replaced.metadata.uid == created.metadata.uid

    patched = core.patch_namespaced_config_map("a", "default", {"data": {"extra": "x"}})  # strategic merge
    assert patched.data == {"key": "two", "extra": "x"}
    patched = core.patch_namespaced_config_map(
        "a", "default", [{"op": "remove", "path": "/data/extra"}, {"op": "replace", "path": "/data/key", "value": "3"}]
    )
    assert patched.data == {"key": "3"}
    assert [r.query for r in kube_api.requests_of("patch")] == [{}, {}]
    assert kube_api.requests_of("patch")[0].body == {"data": {"extra": "x"}}

    core.delete_namespaced_config_map("a", "default")
    assert kube_api.requests[-1].code == 200
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("a", "default")
    assert missing.value.status == 404
    assert status_of(missing.value)["reason"] == "NotFound"
    assert status_of(missing.value)["message"] == 'configmaps "a" not found'


def test_errors_are_status_objects(kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a"))
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map("default", config_map("a"))
    assert exists.value.status == 409
    assert status_of(exists.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "a" already exists',
        "reason": "AlreadyExists",
        "code": 409,
        "details": {"name": "a", "group": "", "kind": "configmaps"},
    }
    with pytest.raises(ApiException) as invalid:
        core.create_namespaced_config_map("default", config_map("Not_A_Name"))
    assert (invalid.value.status, status_of(invalid.value)["reason"]) == (422, "Invalid")
    with pytest.raises(ApiException) as missing:
        core.replace_namespaced_config_map("nope", "default", config_map("nope"))
    assert missing.value.status == 404
    with pytest.raises(ApiException) as mismatch:
        core.replace_namespaced_config_map("a", "default", config_map("b"))
    assert (mismatch.value.status, status_of(mismatch.value)["reason"]) == (400, "BadRequest")
    with pytest.raises(ApiException) as wrong_namespace:
        core.create_namespaced_config_map("default", config_map("c", namespace="other"))
    assert wrong_namespace.value.status == 400


def test_stale_replace_conflicts_and_unconditional_replace_wins(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a", key="one"))
    mine = core.read_namespaced_config_map("a", "default")
    theirs = core.read_namespaced_config_map("a", "default")
    theirs.data["key"] = "theirs"
    core.replace_namespaced_config_map("a", "default", theirs)

    mine.data["key"] = "mine"
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("a", "default", mine)
    assert conflict.value.status == 409
    assert status_of(conflict.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(conflict.value)["message"]

    mine.metadata.resource_version = None  # no precondition: last write wins, as the real API allows
    assert core.replace_namespaced_config_map("a", "default", mine).data == {"key": "mine"}

    with pytest.raises(ApiException) as precondition:  # a resourceVersion in a patch is a precondition too
        core.patch_namespaced_config_map("a", "default", {"metadata": {"resourceVersion": "1"}, "data": {"k": "v"}})
    assert precondition.value.status == 409


def test_no_op_replace_keeps_the_version(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a", key="one"))
    read = core.read_namespaced_config_map("a", "default")
    version = kube_api.store.resource_version
    assert core.replace_namespaced_config_map("a", "default", read).metadata.resource_version == (
        read.metadata.resource_version
    )
    assert kube_api.store.resource_version == version


def test_list_with_selectors_across_namespaces(kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a", labels={"app": "x", "tier": "web"}))
    core.create_namespaced_config_map("default", config_map("b", labels={"app": "y"}))
    core.create_namespaced_config_map("kube-system", config_map("c", namespace="kube-system", labels={"app": "x"}))

    listing = core.list_namespaced_config_map("default")
    assert [i.metadata.name for i in listing.items] == ["a", "b"]
    assert int(listing.metadata.resource_version) >= max(int(i.metadata.resource_version) for i in listing.items)

    def names(**kwargs) -> list[str]:
        return [i.metadata.name for i in core.list_config_map_for_all_namespaces(**kwargs).items]

    assert names(label_selector="app=x") == ["a", "c"]  # sorted by namespace, then name
    assert sorted(names(label_selector="app in (x, y),tier!=web")) == ["b", "c"]
    assert names(label_selector="!tier,app") == [n for n in names() if n != "a"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert sorted(names(field_selector="metadata.namespace!=default")) == ["c"]
    with pytest.raises(ApiException) as bad:
        names(label_selector="app in x")
    assert bad.value.status == 400


def test_endpoint_slices_by_service_label(kube_client):
    discovery = client.DiscoveryV1Api(kube_client)
    for service, address in (("hello", "10.0.0.1"), ("other", "10.0.0.2")):
        discovery.create_namespaced_endpoint_slice(
            "default",
            {
                "metadata": {"generateName": f"{service}-", "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            },
        )
    slices = discovery.list_namespaced_endpoint_slice("default", label_selector="kubernetes.io/service-name=hello")
    assert len(slices.items) == 1
    assert (
        slices.items[0].metadata.name.startswith("hello-") and len(slices.items[0].metadata.name) == len("hello-") + 5
    )
    assert slices.items[0].endpoints[0].addresses == ["10.0.0.1"]
    assert slices.items[0].metadata.generation == 1


def test_cluster_scoped_namespaces_and_version(kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": "team-a", "labels": {"istio-injection": "disabled"}}})
    assert core.read_namespace("team-a").metadata.labels == {"istio-injection": "disabled"}
    assert [n.metadata.name for n in core.list_namespace(label_selector="istio-injection=disabled").items] == ["team-a"]
    status = core.replace_namespace_status("team-a", {"metadata": {"name": "team-a"}, "status": {"phase": "Active"}})
    assert status.status.phase == "Active"
    assert client.VersionApi(kube_client).get_code().git_version.startswith("v1.")


# ---------------------------------------------------------------------------------------------------- watch


def collect(func, *args, count: int | None = None, **kwargs) -> list[tuple[str, str, str]]:
    """Run one watch to its end (its timeout, or `count` events): (type, name, resourceVersion) per event."""
    w = watch.Watch()
    seen = []
    for e in w.stream(func, *args, **kwargs):
        meta = e["raw_object"]["metadata"]
        seen.append((e["type"], meta["name"], meta.get("resourceVersion")))
        if len(seen) == count:
            w.stop()
    return seen


def test_watch_from_a_version_replays_and_resumes(kube_client):
    core = client.CoreV1Api(kube_client)
    start = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", config_map("a", key="1"))
    modified = core.patch_namespaced_config_map("a", "default", {"data": {"key": "2"}})
    core.create_namespaced_config_map("kube-system", config_map("elsewhere", namespace="kube-system"))
    core.delete_namespaced_config_map("a", "default")

    events = collect(core.list_namespaced_config_map, "default", resource_version=start, timeout_seconds=5, count=3)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert [int(v) for _, _, v in events] == sorted(int(v) for _, _, v in events)

    resumed = collect(
        core.list_namespaced_config_map,
        "default",
        resource_version=modified.metadata.resource_version,
        timeout_seconds=5,
        count=1,
    )
    assert [(t, n) for t, n, _ in resumed] == [("DELETED", "a")]


def test_watch_streams_live_changes(kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("before"))
    seen: list[tuple[str, str]] = []
    w = watch.Watch()
    ready = threading.Event()

    def consume() -> None:
        for event in w.stream(core.list_namespaced_config_map, "default", timeout_seconds=10):
            seen.append((event["type"], event["object"].metadata.name))
            ready.set()
            if event["type"] == "DELETED":
                w.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    assert ready.wait(5)  # the synthetic ADDED for the existing object
    core.create_namespaced_config_map("default", config_map("live"))
    core.patch_namespaced_config_map("live", "default", {"data": {"k": "v"}})
    core.delete_namespaced_config_map("live", "default")
    thread.join(10)
    assert not thread.is_alive()
    assert seen == [("ADDED", "before"), ("ADDED", "live"), ("MODIFIED", "live"), ("DELETED", "live")]


def test_watch_selector_transitions(kube_client):
    core = client.CoreV1Api(kube_client)
    start = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", config_map("a", labels={"canal": "yes"}))
    core.patch_namespaced_config_map("a", "default", {"metadata": {"labels": {"canal": None}}})
    core.patch_namespaced_config_map("a", "default", {"metadata": {"labels": {"canal": "yes"}}})
    core.create_namespaced_config_map("default", config_map("unlabelled"))
    events = collect(
        core.list_namespaced_config_map,
        "default",
        label_selector="canal=yes",
        resource_version=start,
        timeout_seconds=1,
    )
    assert [(t, n) for t, n, _ in events] == [("ADDED", "a"), ("DELETED", "a"), ("ADDED", "a")]


def test_watch_from_a_compacted_version_is_gone(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    old = core.create_namespaced_config_map("default", config_map("a")).metadata.resource_version
    core.patch_namespaced_config_map("a", "default", {"data": {"k": "v"}})
    kube_api.compact()
    with pytest.raises(ApiException) as gone:
        collect(core.list_namespaced_config_map, "default", resource_version=old, timeout_seconds=1)
    assert gone.value.status == 410
    # Without a timeout the client retries once on 410, then gives up too.
    with pytest.raises(ApiException) as again:
        collect(core.list_namespaced_config_map, "default", resource_version=old)
    assert again.value.status == 410
    assert len([r for r in kube_api.requests_of("watch") if r.query.get("resourceVersion") == old]) == 3


def test_bounded_history_expires_old_versions():
    with KubeApiServer(history=3) as server, server.client() as api:
        core = client.CoreV1Api(api)
        first = core.create_namespaced_config_map("default", config_map("a")).metadata.resource_version
        for value in "12345":
            core.patch_namespaced_config_map("a", "default", {"data": {"k": value}})
        with pytest.raises(ApiException) as gone:
            collect(core.list_namespaced_config_map, "default", resource_version=first, timeout_seconds=1)
        assert gone.value.status == 410
        recent = str(server.store.resource_version - 2)
        events = collect(core.list_namespaced_config_map, "default", resource_version=recent, timeout_seconds=1)
        assert [t for t, _, _ in events] == ["MODIFIED", "MODIFIED"]


def test_watch_bookmark_carries_the_latest_version(kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a"))
    w = watch.Watch()
    types = [
        e["type"]
        for e in w.stream(core.list_namespaced_config_map, "default", allow_watch_bookmarks=True, timeout_seconds=1)
    ]
    assert types == ["ADDED", "BOOKMARK"]
    assert w.resource_version == core.list_namespaced_config_map("default").metadata.resource_version


def test_stop_ends_open_watches_promptly():
    server = KubeApiServer().start()
    api = server.client()
    core = client.CoreV1Api(api)
    done = threading.Event()

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=30):
                pass
        except Exception:  # the connection going away mid-stream is what this test provokes
            pass
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.requests_of("watch") and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    server.stop()
    assert done.wait(5)
    assert time.monotonic() - began < 3
    thread.join(5)
    api.close()


# ------------------------------------------------------------------------------------------ custom resources


def internal_gateway(name: str = "canal") -> dict:
    return {
        "apiVersion": "canal.io/v1alpha1",
        "kind": "InternalGateway",
        "metadata": {"name": name, "namespace": "istio-system"},
        "spec": {"gatewayRef": {"name": "canal"}},
        "status": {"conditions": [{"type": "Accepted", "status": "True"}]},
    }


def test_custom_resource_with_status_subresource(kube_api, kube_client):
    kube_api.register(INTERNAL_GATEWAYS)
    custom = client.CustomObjectsApi(kube_client)
    args = ("canal.io", "v1alpha1", "istio-system", "internalgateways")

    created = custom.create_namespaced_custom_object(*args, internal_gateway())
    assert "status" not in created  # status is not writable through the main resource
    assert created["metadata"]["generation"] == 1

    created["status"] = {"conditions": [{"type": "Accepted", "status": "True"}]}
    created["metadata"]["labels"] = {"x": "y"}
    replaced = custom.replace_namespaced_custom_object(*args, "canal", created)
    assert "status" not in replaced
    assert replaced["metadata"]["generation"] == 1  # metadata changes do not bump generation

    replaced["status"] = created["status"]
    with_status = custom.replace_namespaced_custom_object_status(*args, "canal", replaced)
    assert with_status["status"] == created["status"]
    assert with_status["metadata"]["generation"] == 1
    assert with_status["metadata"]["labels"] == {"x": "y"}

    spec_patched = custom.patch_namespaced_custom_object(
        *args, "canal", {"spec": {"gatewayRef": {"name": "other"}}, "status": {"conditions": []}}
    )
    assert spec_patched["metadata"]["generation"] == 2
    assert spec_patched["status"] == created["status"]  # a main-resource patch cannot touch status

    status_patched = custom.patch_namespaced_custom_object_status(
        *args, "canal", {"status": {"observedGeneration": 2}, "spec": {"gatewayRef": None}}
    )
    assert status_patched["status"]["observedGeneration"] == 2
    assert status_patched["spec"] == {"gatewayRef": {"name": "other"}}  # a status patch cannot touch spec
    assert custom.get_namespaced_custom_object_status(*args, "canal")["status"]["observedGeneration"] == 2

    stale = dict(created)
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object_status(*args, "canal", stale)
    assert conflict.value.status == 409

    listing = custom.list_cluster_custom_object("canal.io", "v1alpha1", "internalgateways")
    assert [i["metadata"]["name"] for i in listing["items"]] == ["canal"]
    custom.delete_namespaced_custom_object(*args, "canal")
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object(*args, "canal")
    assert gone.value.status == 404


def test_cluster_scoped_custom_resource_without_status(kube_api, kube_client):
    kube_api.register(CLUSTER_THINGS)
    custom = client.CustomObjectsApi(kube_client)
    body = {"apiVersion": "example.io/v1", "kind": "ClusterThing", "metadata": {"name": "t"}, "status": {"s": 1}}
    created = custom.create_cluster_custom_object("example.io", "v1", "clusterthings", body)
    assert created["status"] == {"s": 1}  # without the subresource, status is an ordinary field
    assert "namespace" not in created["metadata"]
    with pytest.raises(ApiException) as no_status:
        custom.get_cluster_custom_object_status("example.io", "v1", "clusterthings", "t")
    assert no_status.value.status == 404
    patched = custom.patch_cluster_custom_object("example.io", "v1", "clusterthings", "t", {"status": {"s": 2}})
    assert patched["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as unknown:
        custom.list_cluster_custom_object("example.io", "v1", "unregistered")
    assert unknown.value.status == 404


def test_custom_resource_watch(kube_api, kube_client):
    kube_api.register(INTERNAL_GATEWAYS)
    custom = client.CustomObjectsApi(kube_client)
    args = ("canal.io", "v1alpha1", "istio-system", "internalgateways")
    start = custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(*args, internal_gateway())
    custom.patch_namespaced_custom_object_status(*args, "canal", {"status": {"observedGeneration": 1}})
    events = collect(custom.list_namespaced_custom_object, *args, resource_version=start, timeout_seconds=5, count=2)
    assert [t for t, _, _ in events] == ["ADDED", "MODIFIED"]
    assert custom.get_namespaced_custom_object(*args, "canal")["metadata"]["resourceVersion"] == events[1][2]


def test_lease(kube_client):
    leases = client.CoordinationV1Api(kube_client)
    now = datetime.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
    created = leases.create_namespaced_lease(
        "istio-system",
        client.V1Lease(
            metadata=client.V1ObjectMeta(name="canal-controller"),
            spec=client.V1LeaseSpec(
                holder_identity="pod-a", lease_duration_seconds=15, acquire_time=now, renew_time=now
            ),
        ),
    )
    assert created.spec.acquire_time == now
    created.spec.renew_time = now + datetime.timedelta(seconds=5)
    renewed = leases.replace_namespaced_lease("canal-controller", "istio-system", created)
    assert renewed.spec.renew_time == now + datetime.timedelta(seconds=5)

    created.spec.holder_identity = "pod-b"  # a contender holding the old version loses
    with pytest.raises(ApiException) as conflict:
        leases.replace_namespaced_lease("canal-controller", "istio-system", created)
    assert conflict.value.status == 409
    assert leases.read_namespaced_lease("canal-controller", "istio-system").spec.holder_identity == "pod-a"


# ----------------------------------------------------------------------------------------------- test hooks


def test_injected_conflicts_precede_the_next_puts(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_config_map("default", config_map("a", key="1"))
    kube_api.inject_conflict("v1", "ConfigMap", "a", "default", times=2)
    for _ in range(2):
        read = core.read_namespaced_config_map("a", "default")
        with pytest.raises(ApiException) as conflict:
            core.replace_namespaced_config_map("a", "default", read)
        assert conflict.value.status == 409
    read = core.read_namespaced_config_map("a", "default")
    read.data["key"] = "2"
    assert core.replace_namespaced_config_map("a", "default", read).data == {"key": "2"}
    assert [r.code for r in kube_api.requests_of("update")] == [409, 409, 200]
    assert read.metadata.annotations == {"kube-api.test/concurrent-writes": "2"}


def test_injected_failures(kube_api, kube_client):
    core = client.CoreV1Api(kube_client)
    kube_api.inject_failure(503, method="POST", kind="ConfigMap")
    with pytest.raises(ApiException) as unavailable:
        core.create_namespaced_config_map("default", config_map("a"))
    assert (unavailable.value.status, status_of(unavailable.value)["reason"]) == (503, "ServiceUnavailable")
    core.create_namespaced_config_map("default", config_map("a"))
    kube_api.inject_failure(500, times=2, name="a")
    for _ in range(2):
        with pytest.raises(ApiException) as broken:
            core.read_namespaced_config_map("a", "default")
        assert broken.value.status == 500
    assert core.read_namespaced_config_map("a", "default").metadata.name == "a"
    assert [(r.verb, r.code) for r in kube_api.requests] == [
        ("create", 503),
        ("create", 201),
        ("get", 500),
        ("get", 500),
        ("get", 200),
    ]


def test_direct_access_for_seeding_and_other_writers(kube_api, kube_client):
    seeded = kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "gw", "namespace": "istio-system"},
            "spec": {"clusterIP": "10.96.0.50"},
            "status": {"loadBalancer": {}},
        }
    )
    assert seeded["status"] == {"loadBalancer": {}}
    kube_api.modify("v1", "Service", "gw", "istio-system", lambda o: o["spec"].update(clusterIP="10.96.0.51"))
    core = client.CoreV1Api(kube_client)
    assert core.read_namespaced_service("gw", "istio-system").spec.cluster_ip == "10.96.0.51"
    assert kube_api.get("v1", "Service", "gw", "istio-system")["spec"]["clusterIP"] == "10.96.0.51"
    kube_api.delete("v1", "Service", "gw", "istio-system")
    assert kube_api.get("v1", "Service", "gw", "istio-system") is None
    assert kube_api.requests_of("get") == [kube_api.requests[0]]


# ----------------------------------------------------------------------------------------------- pure parts


def test_label_selector_grammar():
    labels = {"metadata": {"labels": {"app": "x", "tier": "web"}}}
    cases = {
        "app=x": True,
        "app==x": True,
        "app!=x": False,
        "missing!=x": True,
        "app in (x,y)": True,
        "app notin (x)": False,
        "missing notin (x)": True,
        "app,tier": True,
        "!tier": False,
        "!missing": True,
        "app=x, tier=db": False,
        "": True,
    }
    assert {s: label_selector(s)(labels) for s in cases} == cases
    with pytest.raises(ApiError):
        label_selector("app=(x")


def test_field_selector_paths():
    obj = {"metadata": {"name": "a", "namespace": "n"}, "spec": {"nodeName": "node-1", "ready": True}}
    assert field_selector("metadata.name=a,spec.nodeName==node-1")(obj)
    assert not field_selector("metadata.namespace!=n")(obj)
    assert field_selector("spec.ready=true")(obj)
    assert field_selector("spec.missing=")(obj)


def test_merge_patch_rfc7386_examples():
    assert merge_patch({"a": "b", "c": {"d": "e", "f": "g"}}, {"a": "z", "c": {"f": None}}) == {
        "a": "z",
        "c": {"d": "e"},
    }
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert merge_patch({"a": "b"}, {"a": {"c": None}}) == {"a": {}}


def test_json_patch_operations():
    doc = {"a": [1, 2], "b": {"c": 1}}
    result = json_patch(
        doc,
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "move", "from": "/b/c", "path": "/d"},
            {"op": "copy", "from": "/d", "path": "/e~1f"},
            {"op": "test", "path": "/a", "value": [0, 1, 2, 3]},
        ],
    )
    assert result == {"a": [0, 1, 2, 3], "b": {}, "d": 1, "e/f": 1}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    for broken in ({"op": "test", "path": "/a", "value": []}, {"op": "remove", "path": "/zz"}, {"op": "x", "path": ""}):
        with pytest.raises(ApiError) as error:
            json_patch(doc, [broken])
        assert error.value.code == 422
