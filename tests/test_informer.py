"""Informers against the test API server: list then watch, resume, 410 relists, bookmarks, failures and backoff,
dropped streams, selectors, transforms, resync, paging, discovery, and a prompt stop. Every wait is bounded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from canal.kube.informer import (
    DESTINATION_RULES,
    INTERNAL_GATEWAYS,
    NAMESPACES,
    SERVICES,
    VIRTUAL_SERVICES,
    Backoff,
    DiscoveryError,
    Event,
    Informer,
    InformerMetrics,
    NotInstalled,
    Resource,
    discover_version,
    ensure_served,
    resolve,
)
from canal.model.base import ObjectRef
from canal.snapshot import ISTIO_VERSIONS, parse_object, ref_of
from tests.kube_api import KubeApiServer, custom_resource

pytestmark = pytest.mark.timeout(30)

FAST = Backoff(initial=0.02, maximum=0.2, jitter=0.5)
WAIT = 5.0  # seconds any single expected thing may take


# --------------------------------------------------------------------------------------------------- helpers


def service(name: str, namespace: str = "default", labels: dict | None = None, **meta: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}, **meta},
        "spec": {"ports": [{"port": 80}]},
    }


def config_map(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}}


def wait_until(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Recorder:
    """The `on_events` callback of a test: keeps every batch, lets the test wait for what it expects."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self._cond:
            self.batches.append(events)  # kept as given: the informer must not reuse a list it delivered
            self._cond.notify_all()

    @property
    def events(self) -> list[tuple[str, str]]:
        """(type, namespace/name) of every delivered event, in order."""
        with self._cond:
            return [(e.type, name_of(e.obj)) for batch in self.batches for e in batch]

    def wait_for(self, count: int, timeout: float = WAIT) -> list[tuple[str, str]]:
        """Wait until `count` events in all were delivered; returns them."""
        with self._cond:
            if not self._cond.wait_for(lambda: sum(len(b) for b in self.batches) >= count, timeout):
                raise AssertionError(f"expected {count} events, got {self.events}")
        return self.events


def name_of(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(("informer-", "run-"))], 3)


@pytest.fixture
def start(kube_client) -> Iterator[Callable[..., tuple[Informer, Recorder]]]:
    """Start informers in threads (fast backoff unless told otherwise); all are stopped and joined at the end."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start_informer(resource: Resource, **kwargs: object) -> tuple[Informer, Recorder]:
        recorder = Recorder()
        kwargs.setdefault("backoff", FAST)
        api, namespace = kwargs.pop("api", kube_client), kwargs.pop("namespace", None)
        informer = Informer(api, resource, namespace, recorder, **kwargs)  # type: ignore[arg-type]
        stop = threading.Event()
        thread = threading.Thread(target=informer.run, args=(stop,), name=f"run-{resource.plural}", daemon=True)
        thread.start()
        running.append((stop, thread))
        return informer, recorder

    yield start_informer
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        thread.join(3)
        assert not thread.is_alive()


def watches(kube_api: KubeApiServer, kind: str = "Service") -> list:
    return kube_api.requests_of("watch", kind=kind)


def lists(kube_api: KubeApiServer, kind: str = "Service") -> list:
    return kube_api.requests_of("list", kind=kind)


# ------------------------------------------------------------------------------------------------ the parts


def test_resource_paths_and_backoff():
    assert SERVICES.path() == "/api/v1/services"
    assert SERVICES.path("team-a") == "/api/v1/namespaces/team-a/services"
    assert NAMESPACES.path("ignored") == "/api/v1/namespaces"  # cluster-scoped: no namespace segment
    assert VIRTUAL_SERVICES.with_version("v1beta1").path("x") == (
        "/apis/networking.istio.io/v1beta1/namespaces/x/virtualservices"
    )
    assert str(INTERNAL_GATEWAYS) == "internalgateways.canal.io/v1alpha1"
    backoff = Backoff(initial=0.5, maximum=4, jitter=0.5)
    assert [backoff.delay(n, 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.delay(3, 0.999) == pytest.approx(1.0, abs=0.01)  # jitter only ever shortens the wait


def test_requests_carry_the_client_configuration(kube_api):
    """Host, auth (refreshed per request, as exec plugins and in-cluster tokens are) and User-Agent all come from
    the official client's configuration, though the informer does not use its typed methods."""
    rotations = iter(range(1, 1000))
    configuration = client.Configuration(host=kube_api.url)
    configuration.api_key = {"authorization": "token-0"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(authorization=f"token-{next(rotations)}")
    with client.ApiClient(configuration) as api:
        api.user_agent = "canal-controller/test"
        informer = Informer(api, SERVICES, None, Recorder(), watch_timeout=1)
        stop = threading.Event()
        thread = threading.Thread(target=informer.run, args=(stop,), name="run-services")
        thread.start()
        try:
            assert informer.synced.wait(WAIT)
            wait_until(lambda: len(watches(kube_api)) >= 2)
        finally:
            stop.set()
            thread.join(3)
    sent = [r.headers for r in kube_api.requests if r.kind == "Service"][:3]
    assert [h["authorization"] for h in sent] == ["Bearer token-1", "Bearer token-2", "Bearer token-3"]
    assert {(h["user-agent"], h["accept"]) for h in sent} == {("canal-controller/test", "application/json")}


# ------------------------------------------------------------------------------------------- list and watch


def test_list_then_watch_delivers_changes_in_order(kube_api, kube_client, start):
    kube_api.create(service("a"))
    kube_api.create(service("b", "other"))
    metrics = InformerMetrics()
    informer, recorder = start(SERVICES, metrics=metrics)
    assert informer.synced.wait(WAIT)
    first = recorder.batches[0]
    assert [(e.type, name_of(e.obj)) for e in first] == [("ADDED", "default/a"), ("ADDED", "other/b")]
    # Built-in list items come without apiVersion/kind (as from the real API); the informer puts them back.
    assert [ref_of(e.obj) for e in first] == [ObjectRef("Service", "default", "a"), ObjectRef("Service", "other", "b")]
    assert parse_object(first[0].obj).obj is not None

    core = client.CoreV1Api(kube_client)
    core.create_namespaced_service("default", service("c"))
    core.patch_namespaced_service("c", "default", {"metadata": {"labels": {"x": "y"}}})
    kube_api.delete("v1", "Service", "a", "default")  # (the typed delete expects a Service back; see kube_api)
    assert recorder.wait_for(5)[2:] == [("ADDED", "default/c"), ("MODIFIED", "default/c"), ("DELETED", "default/a")]
    deleted = recorder.batches[-1][-1].obj
    assert ref_of(deleted) == ObjectRef("Service", "default", "a")
    assert informer.resource_version == str(kube_api.store.resource_version)
    assert informer.count == 2
    assert informer.last_error is None
    for type_ in ("ADDED", "MODIFIED", "DELETED"):
        assert sample(metrics.registry, "canal_controller_watch_events_total", kind="Service", type=type_) == 1
    assert sample(metrics.registry, "canal_controller_relists_total", kind="Service", reason="initial") == 1
    assert sample(metrics.registry, "canal_controller_informer_synced", kind="Service") == 1


def test_watch_resumes_from_its_version_when_the_server_ends_it(kube_api, start):
    kube_api.create(service("a"))
    informer, recorder = start(SERVICES, watch_timeout=1, bookmarks=False)
    assert informer.synced.wait(WAIT)
    listed_at = informer.resource_version
    created = kube_api.create(service("b"))
    recorder.wait_for(2)
    wait_until(lambda: len(watches(kube_api)) >= 3)  # two ended by the server's timeoutSeconds
    first, *later = watches(kube_api)
    assert (first.query["resourceVersion"], first.query["timeoutSeconds"]) == (listed_at, "1")
    assert later[-1].query["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert len(lists(kube_api)) == 1  # resumed, never listed again
    assert recorder.events == [("ADDED", "default/a"), ("ADDED", "default/b")]


def test_expired_version_relists_once_and_reports_what_changed(kube_api, start):
    for name in "abc":
        kube_api.create(service(name))
    metrics = InformerMetrics()
    informer, recorder = start(SERVICES, metrics=metrics)
    assert informer.synced.wait(WAIT)
    listed_at = informer.resource_version
    with kube_api.outage():  # the informer cannot see these as watch events...
        kube_api.delete("v1", "Service", "a", "default")
        kube_api.modify("v1", "Service", "b", "default")
        kube_api.create(service("d"))
        kube_api.compact()  # ...and its version is gone from the history: 410 on resuming
    recorder.wait_for(6)
    relist = recorder.batches[1]
    assert [(e.type, name_of(e.obj)) for e in relist] == [
        ("MODIFIED", "default/b"),
        ("ADDED", "default/d"),
        ("DELETED", "default/a"),
    ]
    tombstone = relist[-1].obj
    assert tombstone == {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "default"}}
    assert ref_of(tombstone) == ObjectRef("Service", "default", "a")
    assert len(lists(kube_api)) == 2
    assert sample(metrics.registry, "canal_controller_relists_total", kind="Service", reason="expired") == 1
    assert any(w.query["resourceVersion"] == listed_at for w in watches(kube_api)[1:])  # tried to resume first
    wait_until(lambda: watches(kube_api)[-1].query["resourceVersion"] == informer.resource_version)
    assert int(informer.resource_version) > int(listed_at)


def test_bookmarks_advance_the_version_without_events(kube_api, start):
    kube_api.create(service("a"))
    informer, recorder = start(SERVICES, watch_timeout=1)
    assert informer.synced.wait(WAIT)
    listed_at = informer.resource_version
    other = kube_api.create(config_map("unrelated"))  # the version moves on; no Service changed
    wait_until(lambda: informer.resource_version == other["metadata"]["resourceVersion"])
    assert int(listed_at) < int(informer.resource_version)
    wait_until(lambda: watches(kube_api)[-1].query["resourceVersion"] == other["metadata"]["resourceVersion"])
    assert all(w.query["allowWatchBookmarks"] == "true" for w in watches(kube_api))
    assert recorder.events == [("ADDED", "default/a")]
    assert len(lists(kube_api)) == 1


# ------------------------------------------------------------------------------------------------- failures


def test_server_errors_back_off_then_recover(kube_api, start):
    kube_api.create(service("a"))
    kube_api.inject_failure(500, times=2, verb="list", kind="Service")
    kube_api.inject_failure(503, times=1, verb="watch", kind="Service")
    kube_api.inject_failure(500, times=1, verb="watch", kind="Service", in_stream=True)
    metrics = InformerMetrics()
    began = time.monotonic()
    informer, recorder = start(SERVICES, backoff=Backoff(initial=0.1, maximum=1, jitter=0), metrics=metrics)
    assert informer.synced.wait(WAIT)
    assert time.monotonic() - began >= 0.1 + 0.2  # backed off twice, doubling
    listed_at = informer.resource_version
    wait_until(lambda: len(watches(kube_api)) >= 3)
    kube_api.create(service("b"))
    assert recorder.wait_for(2) == [("ADDED", "default/a"), ("ADDED", "default/b")]
    assert [r.code for r in lists(kube_api)] == [500, 500, 200]  # the failed watches did not cause a relist
    assert [r.code for r in watches(kube_api)][:3] == [503, 200, 200]  # the second one streamed an ERROR event
    assert {w.query["resourceVersion"] for w in watches(kube_api)[:3]} == {listed_at}  # each resumed, none relisted
    errors = "canal_controller_api_errors_total"
    assert sample(metrics.registry, errors, kind="Service", verb="list", code="500") == 2
    assert sample(metrics.registry, errors, kind="Service", verb="watch", code="503") == 1
    assert sample(metrics.registry, errors, kind="Service", verb="watch", code="500") == 1
    assert informer.last_error is None


def test_connection_failures_back_off_and_the_watch_resumes(kube_api, start):
    kube_api.create(service("a"))
    metrics = InformerMetrics()
    informer, recorder = start(SERVICES, metrics=metrics)
    assert informer.synced.wait(WAIT)
    errors = ("canal_controller_api_errors_total", {"kind": "Service", "verb": "watch", "code": "0"})
    with kube_api.outage():
        kube_api.create(service("b"))
        wait_until(lambda: (metrics.registry.get_sample_value(*errors) or 0) >= 2)  # refused, backing off
        assert "the API server is unreachable" in (informer.last_error or "")
    assert recorder.wait_for(2) == [("ADDED", "default/a"), ("ADDED", "default/b")]
    assert len(lists(kube_api)) == 1  # the history still had the version: resumed, not relisted


def test_a_watch_dropped_mid_stream_resumes_from_the_last_version(kube_api, start):
    informer, recorder = start(SERVICES, bookmarks=False)
    assert informer.synced.wait(WAIT)
    seen = kube_api.create(service("a"))
    recorder.wait_for(1)
    wait_until(lambda: kube_api.open_watches("Service") == 1)
    assert kube_api.drop_watches("Service") == 1
    kube_api.create(service("b"))
    assert recorder.wait_for(2) == [("ADDED", "default/a"), ("ADDED", "default/b")]
    resumed = watches(kube_api)[1]
    assert resumed.query["resourceVersion"] == seen["metadata"]["resourceVersion"]
    assert len(lists(kube_api)) == 1


def test_a_failing_callback_gets_the_changes_again_from_a_relist(kube_api, kube_client, caplog):
    calls: list[list[tuple[str, str]]] = []

    def on_events(events: list[Event]) -> None:
        calls.append([(e.type, name_of(e.obj)) for e in events])
        if len(calls) == 2:
            raise RuntimeError("downstream broke")

    kube_api.create(service("x"))
    metrics = InformerMetrics()
    informer = Informer(kube_client, SERVICES, None, on_events, backoff=FAST, metrics=metrics)
    stop = threading.Event()
    thread = threading.Thread(target=informer.run, args=(stop,), name="run-services")
    thread.start()
    try:
        assert informer.synced.wait(WAIT)
        kube_api.create(service("a"))
        wait_until(lambda: len(calls) >= 3)
    finally:
        stop.set()
        thread.join(3)
    assert calls == [[("ADDED", "default/x")], [("ADDED", "default/a")], [("ADDED", "default/a")]]
    assert sample(metrics.registry, "canal_controller_relists_total", kind="Service", reason="error") == 1
    assert "on_events failed" in caplog.text


def test_forbidden_and_missing_crds_are_reported_then_picked_up(kube_api, start, caplog):
    caplog.set_level(logging.WARNING, logger="canal.kube.informer")
    kube_api.inject_failure(403, times=1, verb="list", kind="Service", message='services is forbidden: User "x"')
    services, _ = start(SERVICES)
    assert services.synced.wait(WAIT)
    assert "forbidden" in caplog.text and "RBAC" in caplog.text

    informer, recorder = start(INTERNAL_GATEWAYS)
    wait_until(lambda: "InternalGateway CRD installed" in (informer.last_error or ""))
    assert not informer.synced.is_set()
    kube_api.register(custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways"))
    kube_api.create(
        {
            "apiVersion": "canal.io/v1alpha1",
            "kind": "InternalGateway",
            "metadata": {"name": "canal", "namespace": "istio-system"},
            "spec": {"gatewayRef": {"name": "canal"}},
        }
    )
    assert informer.synced.wait(WAIT)
    assert recorder.wait_for(1) == [("ADDED", "istio-system/canal")]
    assert informer.last_error is None


# -------------------------------------------------------------------------------------- scope and filtering


def test_a_namespaced_informer_sees_only_its_namespace(kube_api, start):
    kube_api.create(service("a", "team-a"))
    kube_api.create(service("b", "team-b"))
    informer, recorder = start(SERVICES, namespace="team-a")
    assert informer.synced.wait(WAIT)
    kube_api.create(service("b2", "team-b"))
    kube_api.create(service("a2", "team-a"))
    assert recorder.wait_for(2) == [("ADDED", "team-a/a"), ("ADDED", "team-a/a2")]
    assert {r.path for r in kube_api.requests if r.kind == "Service"} == {"/api/v1/namespaces/team-a/services"}
    with pytest.raises(ValueError, match="cluster-scoped"):
        Informer(None, NAMESPACES, "team-a", print)  # type: ignore[arg-type]


def test_label_and_field_selectors(kube_api, start):
    kube_api.create(service("a", labels={"canal": "yes"}))
    kube_api.create(service("b"))
    informer, recorder = start(SERVICES, label_selector="canal=yes")
    named, named_recorder = start(SERVICES, field_selector="metadata.name=b")
    assert informer.synced.wait(WAIT) and named.synced.wait(WAIT)
    kube_api.modify("v1", "Service", "b", "default", lambda o: o["metadata"]["labels"].update(canal="yes"))
    kube_api.modify("v1", "Service", "a", "default", lambda o: o["metadata"]["labels"].clear())
    assert recorder.wait_for(3) == [("ADDED", "default/a"), ("ADDED", "default/b"), ("DELETED", "default/a")]
    assert named_recorder.wait_for(2) == [("ADDED", "default/b"), ("MODIFIED", "default/b")]
    assert {r.query.get("labelSelector") for r in kube_api.requests if r.kind == "Service"} == {"canal=yes", None}
    assert "metadata.name=b" in {r.query.get("fieldSelector") for r in watches(kube_api)}


def test_transform_strips_and_drops_and_deletes_only_what_was_delivered(kube_api, start):
    def transform(obj: dict) -> dict | None:
        if obj["metadata"].get("labels", {}).get("skip") == "true":
            return None
        obj["metadata"].pop("managedFields", None)
        return obj

    kube_api.create(service("a", managedFields=[{"manager": "kubectl"}]))
    kube_api.create(service("b", labels={"skip": "true"}))
    informer, recorder = start(SERVICES, transform=transform)
    assert informer.synced.wait(WAIT)
    assert recorder.events == [("ADDED", "default/a")]
    assert "managedFields" not in recorder.batches[0][0].obj["metadata"]

    kube_api.modify("v1", "Service", "a", "default", lambda o: o["metadata"]["labels"].update(skip="true"))
    kube_api.modify("v1", "Service", "b", "default")  # still dropped: nothing
    kube_api.modify("v1", "Service", "b", "default", lambda o: o["metadata"]["labels"].clear())
    kube_api.create(service("c", labels={"skip": "true"}))
    kube_api.delete("v1", "Service", "c", "default")  # never delivered: no DELETED either
    kube_api.create(service("z"))
    assert recorder.wait_for(4)[1:] == [("DELETED", "default/a"), ("ADDED", "default/b"), ("ADDED", "default/z")]
    assert recorder.batches[1][0].obj == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "a", "namespace": "default"},
    }


# ---------------------------------------------------------------------------------------- resync and paging


def test_periodic_resync_catches_what_the_watch_missed(kube_api, start):
    kube_api.create(service("a"))
    kube_api.create(service("b"))
    metrics = InformerMetrics()
    informer, recorder = start(SERVICES, resync=1, metrics=metrics)
    assert informer.synced.wait(WAIT)
    kube_api.modify("v1", "Service", "a", "default", silent=True)  # no watch event: only a list shows these
    kube_api.delete("v1", "Service", "b", "default", silent=True)
    assert recorder.wait_for(4)[2:] == [("MODIFIED", "default/a"), ("DELETED", "default/b")]
    assert sample(metrics.registry, "canal_controller_relists_total", kind="Service", reason="resync") >= 1
    assert all(int(w.query["timeoutSeconds"]) <= 1 for w in watches(kube_api))  # the watch ends for the resync
    wait_until(lambda: sample(metrics.registry, "canal_controller_relists_total", kind="Service", reason="resync") >= 2)
    assert len(recorder.batches) == 2  # a resync that finds nothing new delivers nothing


def test_lists_are_paged_and_a_relist_after_sync_is_one_batch(kube_api, start):
    for name in "abcde":
        kube_api.create(service(name))
    informer, recorder = start(SERVICES, page_size=2, resync=1)
    assert informer.synced.wait(WAIT)
    # Before the first sync each page is delivered as it comes: never all Pods of a cluster in one batch.
    assert [[name_of(e.obj)[-1] for e in batch] for batch in recorder.batches] == [["a", "b"], ["c", "d"], ["e"]]
    pages = lists(kube_api)
    assert [r.query.get("limit") for r in pages] == ["2", "2", "2"]
    assert [bool(r.query.get("continue")) for r in pages] == [False, True, True]
    wait_until(lambda: watches(kube_api))
    assert watches(kube_api)[0].query["resourceVersion"] == informer.resource_version

    kube_api.modify("v1", "Service", "a", "default", silent=True)  # first page and last page: one resync batch
    kube_api.delete("v1", "Service", "e", "default", silent=True)
    recorder.wait_for(7)
    assert [(e.type, name_of(e.obj)) for e in recorder.batches[3]] == [
        ("MODIFIED", "default/a"),
        ("DELETED", "default/e"),
    ]


def test_an_expired_continue_token_falls_back_to_one_full_list(kube_api, start):
    for name in "abc":
        kube_api.create(service(name))
    compacted = threading.Event()

    def compact_mid_list(obj: dict) -> dict:
        if not compacted.is_set():  # between the first and second page: the list's version leaves the history
            compacted.set()
            kube_api.create(config_map("moves-the-version"))
            kube_api.compact()
        return obj

    informer, recorder = start(SERVICES, page_size=1, transform=compact_mid_list)
    assert informer.synced.wait(WAIT)
    assert recorder.events == [("ADDED", f"default/{n}") for n in "abc"]  # page one, then the rest: each once
    assert [(r.query.get("limit"), bool(r.query.get("continue")), r.code) for r in lists(kube_api)] == [
        ("1", False, 200),
        ("1", True, 410),
        (None, False, 200),
    ]


# ------------------------------------------------------------------------------------------------ discovery


def test_discovery_documents_parse_with_the_official_client(kube_api, kube_client):
    kube_api.register(custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways"))
    groups = client.ApisApi(kube_client).get_api_versions()
    assert {g.name for g in groups.groups} == {"canal.io", "coordination.k8s.io", "discovery.k8s.io"}
    assert client.CoreApi(kube_client).get_api_versions().versions == ["v1"]
    group = client.DiscoveryApi(kube_client).get_api_group()
    assert (group.preferred_version.version, [v.version for v in group.versions]) == ("v1", ["v1"])
    core = client.CoreV1Api(kube_client).get_api_resources()
    assert {"services", "services/status", "pods", "namespaces"} <= {r.name for r in core.resources}
    assert {r.name: r.namespaced for r in core.resources}["namespaces"] is False
    ensure_served(kube_client, INTERNAL_GATEWAYS)  # /apis/canal.io/v1alpha1 lists internalgateways
    assert kube_api.requests_of("discovery")


def register_istio(kube_api: KubeApiServer, versions: tuple[str, ...], plurals: tuple[str, ...] | None = None) -> None:
    kinds = {"gateways": "Gateway", "virtualservices": "VirtualService", "destinationrules": "DestinationRule"}
    for version in versions:
        for plural in plurals or tuple(kinds):
            kube_api.register(custom_resource(f"networking.istio.io/{version}", kinds[plural], plural))


@pytest.mark.parametrize(
    ("served", "preferred", "expected"),
    [
        (("v1", "v1beta1", "v1alpha3"), None, "v1"),
        (("v1beta1", "v1alpha3"), None, "v1beta1"),
        (("v1alpha3",), None, "v1alpha3"),
        (("v1", "v1beta1", "v1alpha3"), "v1alpha3", "v1alpha3"),  # the server's preference, when Canal parses it
        (("v2", "v1beta1"), None, "v1beta1"),  # v2 preferred by the server but unknown to Canal
    ],
)
def test_discovery_picks_the_served_istio_version(kube_api, kube_client, start, served, preferred, expected):
    register_istio(kube_api, served)
    if preferred:
        kube_api.prefer_version("networking.istio.io", preferred)
    assert discover_version(kube_client, "networking.istio.io", ISTIO_VERSIONS) == expected
    resource = resolve(kube_client, VIRTUAL_SERVICES)
    assert (resource.version, resource.api_version) == (expected, f"networking.istio.io/{expected}")
    kube_api.create(
        {
            "apiVersion": resource.api_version,
            "kind": "VirtualService",
            "metadata": {"name": "hello", "namespace": "default"},
            "spec": {"hosts": ["hello"], "gateways": ["istio-system/canal"], "http": [{"route": []}]},
        }
    )
    informer, recorder = start(resource)
    assert informer.synced.wait(WAIT)
    assert [ref_of(e.obj) for e in recorder.batches[0]] == [ObjectRef("VirtualService", "default", "hello")]


def test_discovery_errors_name_the_group_and_what_is_served(kube_api, kube_client):
    register_istio(kube_api, ("v2",))
    with pytest.raises(DiscoveryError) as unsupported:
        discover_version(kube_client, "networking.istio.io", ISTIO_VERSIONS)
    assert str(unsupported.value).startswith("API group networking.istio.io serves v2; Canal supports v1, v1beta1")
    assert not isinstance(unsupported.value, NotInstalled)

    with pytest.raises(NotInstalled, match=r"InternalGateway cannot be watched: API group canal.io is not served"):
        resolve(kube_client, INTERNAL_GATEWAYS)

    with KubeApiServer() as other, other.client() as api:
        register_istio(other, ("v1",), plurals=("gateways", "virtualservices"))
        with pytest.raises(NotInstalled, match=r"DestinationRule \(destinationrules.networking.istio.io/v1\) is not"):
            resolve(api, DESTINATION_RULES)
        assert resolve(api, VIRTUAL_SERVICES).version == "v1"
        assert discover_version(api, "", ["v1"]) == "v1"


# ----------------------------------------------------------------------------------------------------- stop


def test_stop_ends_run_promptly_during_a_watch_and_during_backoff(kube_api, kube_client):
    def run(informer: Informer) -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        thread = threading.Thread(target=informer.run, args=(stop,), name=f"run-{informer.resource.plural}")
        thread.start()
        return stop, thread

    watching = Informer(kube_client, SERVICES, None, Recorder(), watch_timeout=300)
    stop, thread = run(watching)
    assert watching.synced.wait(WAIT)
    wait_until(lambda: kube_api.open_watches("Service") == 1)
    began = time.monotonic()
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and time.monotonic() - began < 1.0
    wait_until(lambda: kube_api.open_watches("Service") == 0)  # the connection was closed, not left open

    kube_api.inject_failure(500, times=1, verb="list", kind="Pod")
    backing_off = Informer(kube_client, Resource("", "v1", "pods", "Pod"), None, Recorder(), backoff=Backoff(30, 30, 0))
    stop, thread = run(backing_off)
    wait_until(lambda: backing_off.last_error is not None)
    began = time.monotonic()
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and time.monotonic() - began < 1.0
