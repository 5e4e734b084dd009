"""Informers: list, then watch from the list's resourceVersion, delivering raw JSON dicts in batches.

Why not `kubernetes.watch.Watch` and the typed list methods: the generated models cost many times what `json.loads`
does (measured here on a list of 5,000 small Pods: 88 MB kept and ~10x the time, against 15 MB), and a client-go
style cache would be a second full copy of every object next to the controller's parsed model. So requests go
through the official client's urllib3 pool and configuration (host, auth with token refresh, TLS, proxy), responses
are parsed as plain JSON, watch streams are read line by line, and per object the informer keeps only ``key ->
resourceVersion``: exactly what a relist needs to be diffed against what was delivered. Lists are paged
(``limit``/``continue``) so the largest response held at once is one page, and the first list is delivered page by
page (tracemalloc, 50,000 small Pods from the test API server, consumer keeping nothing: 14 MB peak and 8 MB kept,
against a 142 MB peak as one batch).

Recovery, as client-go's reflector does it: a watch that ends normally is resumed from the last resourceVersion
(no relist); a BOOKMARK only advances that version; 410 Gone/Expired means a fresh list, diffed, delivered as one
batch; other HTTP errors, ERROR events and connection failures back off (exponential, jittered) and then resume
the watch (or retry the list). A periodic resync is a fresh list too, catching anything a watch missed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple
from urllib.parse import urlencode

import urllib3
from kubernetes.client import ApiClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from canal.model.internal_gateway import GROUP as CANAL_GROUP
from canal.snapshot import ISTIO_GROUP, KINDS

log = logging.getLogger(__name__)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
Obj = dict[str, Any]

_CONNECT_TIMEOUT = 10.0
_READ_MARGIN = 30.0  # a watch is silent until its timeoutSeconds: read timeouts must be longer than that
_CHUNK = 64 * 1024
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    json.JSONDecodeError,
)


class Event(NamedTuple):
    """One delivered change. For DELETED from a relist only the key is known: `obj` is then a minimal dict
    (apiVersion, kind, metadata.name/namespace), enough for `canal.snapshot.ref_of`."""

    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj


# ------------------------------------------------------------------------------------------------ resources


@dataclass(frozen=True, slots=True)
class Resource:
    """One REST resource at one served version."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None = None) -> str:
        """The collection URL path: cluster-wide when `namespace` is None (or the resource is cluster-scoped)."""
        if namespace is not None and self.namespaced:
            return f"{self.group_version_path}/namespaces/{namespace}/{self.plural}"
        return f"{self.group_version_path}/{self.plural}"

    def with_version(self, version: str) -> Resource:
        return replace(self, version=version)

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}/{self.version}" if self.group else f"{self.plural}/{self.version}"


INTERNAL_GATEWAYS = Resource(CANAL_GROUP, "v1alpha1", "internalgateways", "InternalGateway")
# Istio's kinds are served as v1 (Istio 1.22+), v1beta1 or v1alpha3: `resolve` picks the served one.
ISTIO_GATEWAYS = Resource(ISTIO_GROUP, "v1", "gateways", "Gateway")
VIRTUAL_SERVICES = Resource(ISTIO_GROUP, "v1", "virtualservices", "VirtualService")
DESTINATION_RULES = Resource(ISTIO_GROUP, "v1", "destinationrules", "DestinationRule")
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
PODS = Resource("", "v1", "pods", "Pod")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
RESOURCES: tuple[Resource, ...] = (
    INTERNAL_GATEWAYS,
    ISTIO_GATEWAYS,
    VIRTUAL_SERVICES,
    DESTINATION_RULES,
    SERVICES,
    ENDPOINT_SLICES,
    PODS,
    NAMESPACES,
)
_SUPPORTED = {(k.group, k.name): k.versions for k in KINDS}
_CRD_GROUPS = frozenset({CANAL_GROUP, ISTIO_GROUP})


def supported_versions(resource: Resource) -> tuple[str, ...]:
    """The versions canal.snapshot parses for this kind (its single source of truth), best first."""
    return _SUPPORTED.get((resource.group, resource.kind), (resource.version,))


# --------------------------------------------------------------------------------------------------- errors


class ApiStatusError(Exception):
    """A non-2xx answer; `reason` and `message` come from the Status object the API server sent, when it did."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {code} {reason}: {message}" if message else f"HTTP {code} {reason}")
        self.code = code
        self.reason = reason
        self.message = message

    @classmethod
    def from_status(cls, code: int, status: Any, fallback: str = "") -> ApiStatusError:
        status = status if isinstance(status, dict) else {}
        return cls(
            int(status.get("code") or code), str(status.get("reason") or fallback), str(status.get("message") or "")
        )


class DiscoveryError(Exception):
    """The API server does not serve what Canal needs (or discovery itself failed); the message says which."""


class NotInstalled(DiscoveryError):
    """404 from discovery: the group or resource is not served, typically because its CRD is not installed."""


class _Expired(Exception):
    """410: the version we would resume from is gone; only a fresh list helps."""


class _Stopped(Exception):
    """The stop event was set while a request was open (it was cut, or a list was left unfinished)."""


class _DeliveryFailed(Exception):
    """`on_events` raised: what it was given is not known to be applied, so a relist re-delivers it."""


# ------------------------------------------------------------------------------------------------- requests


def _headers(api: ApiClient) -> dict[str, str]:
    """The headers the official client would send: its defaults (User-Agent), cookie, and auth from its
    configuration (`auth_settings` calls the refresh hook, so exec plugins and rotated in-cluster tokens work)."""
    headers = {str(k): str(v) for k, v in api.default_headers.items()}
    headers["Accept"] = "application/json"
    if getattr(api, "cookie", None):
        headers["Cookie"] = api.cookie
    for setting in api.configuration.auth_settings().values():
        if setting.get("in") == "header" and setting.get("value"):
            headers[setting["key"]] = setting["value"]
    return headers


def _request(
    api: ApiClient, path: str, query: Sequence[tuple[str, str]], timeout: urllib3.Timeout
) -> urllib3.BaseHTTPResponse:
    """GET through the client's own urllib3 pool (its TLS and proxy settings), body not read yet."""
    url = api.configuration.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
    response = api.rest_client.pool_manager.request(
        "GET", url, headers=_headers(api), preload_content=False, timeout=timeout
    )
    if not 200 <= response.status < 300:
        try:
            body = response.data
        finally:
            response.release_conn()
        try:
            status = json.loads(body) if body else None
        except ValueError:
            status = {"message": body[:200].decode(errors="replace")}
        raise ApiStatusError.from_status(response.status, status, response.reason or "")
    return response


def _json_object(data: bytes, what: str) -> Obj:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise json.JSONDecodeError(f"{what}: expected a JSON object", data.decode(errors="replace")[:80], 0)
    return value


def _transport_problem(exc: Exception) -> str:
    """A failure without an HTTP status, in words an operator can act on."""
    if isinstance(exc, json.JSONDecodeError):
        return "the answer was not valid JSON"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "the API server stopped answering"
    if isinstance(
        exc,
        (urllib3.exceptions.MaxRetryError, urllib3.exceptions.NewConnectionError, ConnectionRefusedError),
    ):
        return "the API server is unreachable"
    return "the connection broke"


def _interrupt(response: urllib3.BaseHTTPResponse) -> None:
    """Make a read blocked in another thread return now: shut the socket down (closing it would not wake it)."""
    with contextlib.suppress(AttributeError, ValueError, RuntimeError, OSError):
        response.shutdown()  # urllib3 >= 2.3
        return
    sock = getattr(getattr(response, "_connection", None), "sock", None)  # older urllib3
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------------------------ discovery

_DISCOVERY_TIMEOUT = urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=30.0)


def _discovery_document(api: ApiClient, path: str, what: str) -> Obj:
    try:
        response = _request(api, path, (), _DISCOVERY_TIMEOUT)
        try:
            return _json_object(response.data, path)
        finally:
            response.release_conn()
    except ApiStatusError as exc:
        if exc.code == 404:
            raise NotInstalled(f"{what} is not served by the API server (GET {path}: 404)") from exc
        raise DiscoveryError(f"discovery of {what} failed: GET {path}: {exc}") from exc
    except _TRANSPORT_ERRORS as exc:
        raise DiscoveryError(f"discovery of {what} failed: GET {path}: {exc}") from exc


def discover_version(api: ApiClient, group: str, supported: Sequence[str]) -> str:
    """The version of `group` to use: the server's preferred one if supported, else the first served one (in the
    server's order) that is. Raises NotInstalled when the group is not served, DiscoveryError when no served
    version is supported."""
    if not supported:
        raise ValueError("supported must name at least one version")
    what = f"API group {group}" if group else "the core API"
    document = _discovery_document(api, f"/apis/{group}" if group else "/api", what)
    if group:
        served = [str(v.get("version")) for v in document.get("versions") or () if isinstance(v, dict)]
        preferred = (document.get("preferredVersion") or {}).get("version")
    else:  # APIVersions: a plain list, no preference
        served = [str(v) for v in document.get("versions") or ()]
        preferred = None
    if preferred in supported:
        return str(preferred)
    for version in served:
        if version in supported:
            return version
    raise DiscoveryError(
        f"{what} serves {', '.join(served) or 'no versions'}; Canal supports {', '.join(supported)}"
        + (" (Istio 1.22+ serves v1, older releases v1beta1 and v1alpha3)" if group == ISTIO_GROUP else "")
    )


def ensure_served(api: ApiClient, resource: Resource) -> None:
    """Raise NotInstalled unless the API server serves `resource` at its version (a CRD can be missing from a
    group that exists, or be installed at other versions only)."""
    document = _discovery_document(api, resource.group_version_path, resource.api_version)
    names = {r.get("name") for r in document.get("resources") or () if isinstance(r, dict)}
    if resource.plural not in names:
        raise NotInstalled(f"{resource.kind} ({resource}) is not served by the API server: is its CRD installed?")


def resolve(api: ApiClient, resource: Resource, supported: Sequence[str] | None = None) -> Resource:
    """`resource` at the version the API server serves (from `supported`, default what canal.snapshot parses),
    checked to be served; errors name the kind, the group and what is served."""
    try:
        version = discover_version(api, resource.group, supported or supported_versions(resource))
        found = resource.with_version(version)
        ensure_served(api, found)
    except NotInstalled as exc:
        raise NotInstalled(f"{resource.kind} cannot be watched: {exc}") from exc
    except DiscoveryError as exc:
        raise DiscoveryError(f"{resource.kind} cannot be watched: {exc}") from exc
    return found


# -------------------------------------------------------------------------------------------------- metrics


class InformerMetrics:
    """Prometheus metrics shared by a controller's informers (a registry per owner, so tests stay isolated)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._events = Counter(
            "canal_controller_watch_events",
            "Watch events received, by kind and event type (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR)",
            ["kind", "type"],
            registry=self.registry,
        )
        self._relists = Counter(
            "canal_controller_relists",
            "Full LISTs delivered, by why: initial, expired (410 on a watch), resync, error (after a failed delivery)",
            ["kind", "reason"],
            registry=self.registry,
        )
        self._errors = Counter(
            "canal_controller_api_errors",
            "Failed informer requests, by verb (list, watch) and HTTP code (0: no answer)",
            ["kind", "verb", "code"],
            registry=self.registry,
        )
        self._synced = Gauge(
            "canal_controller_informer_synced", "1 once the first LIST was delivered", ["kind"], registry=self.registry
        )

    def event(self, kind: str, type_: str) -> None:
        self._events.labels(kind, type_).inc()

    def relisted(self, kind: str, reason: str) -> None:
        self._relists.labels(kind, reason).inc()

    def failed(self, kind: str, verb: str, code: int) -> None:
        self._errors.labels(kind, verb, str(code)).inc()

    def synced(self, kind: str) -> None:
        self._synced.labels(kind).set(1)


# ------------------------------------------------------------------------------------------------- informer


@dataclass(frozen=True, slots=True)
class Backoff:
    """The wait after `n` consecutive failures: min(maximum, initial * 2**(n-1)), shortened by up to `jitter` of
    itself so that informers failing together (an API server restart) do not come back in lockstep."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.5

    def delay(self, failures: int, rand: float) -> float:
        full = min(self.maximum, self.initial * 2 ** max(0, failures - 1))
        return full * (1.0 - self.jitter * rand)


DEFAULT_BACKOFF = Backoff()


class Informer:
    """Keeps `on_events` current with one resource (in one namespace, or cluster-wide): a first list (a batch per
    page), then watch events (a batch per chunk read), relists when needed (one batch with the diff). Event types
    are the consumer's view: ADDED for what it does not have, DELETED only for what it was given. `run(stop)`
    blocks; `synced` is set once the first list was delivered."""

    def __init__(
        self,
        api: ApiClient,
        resource: Resource,
        namespace: str | None,
        on_events: Callable[[list[Event]], None],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        transform: Callable[[Obj], Obj | None] | None = None,
        resync: float | None = 600.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        watch_timeout: int = 300,
        bookmarks: bool = True,
        page_size: int = 500,
        request_timeout: float = 60.0,
        metrics: InformerMetrics | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if namespace is not None and not resource.namespaced:
            raise ValueError(f"{resource.kind} is cluster-scoped: it has no namespace to watch")
        if watch_timeout < 1:
            raise ValueError("watch_timeout is whole seconds, at least 1")
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.on_events = on_events
        self.label_selector = label_selector or ""
        self.field_selector = field_selector or ""
        self.transform = transform
        self.resync = resync if resync and resync > 0 else None
        self.backoff = backoff
        self.watch_timeout = int(watch_timeout)
        self.bookmarks = bookmarks
        self.page_size = max(0, page_size)
        self.request_timeout = request_timeout
        self.metrics = metrics
        self._rand = rand
        self.synced = threading.Event()
        self.resource_version = ""  # the last version seen (list, event or bookmark)
        self.last_error: str | None = None  # the last failure, None once a request succeeded again
        self._known: dict[str, str] = {}  # key ("ns/name" or "name") -> resourceVersion of what was delivered
        self._failures = 0  # consecutive
        self._progress = False  # a watch since the last list got somewhere
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()

    @property
    def name(self) -> str:
        return f"{self.resource.kind} in {self.namespace}" if self.namespace is not None else self.resource.kind

    @property
    def count(self) -> int:
        """How many objects were delivered and not deleted since."""
        return len(self._known)

    def delivered(self) -> list[str]:
        """The names of the objects delivered and not deleted since (what a stopped informer's consumer must
        forget)."""
        return [key.rpartition("/")[2] for key in list(self._known)]

    # -- the loop

    def run(self, stop: threading.Event) -> None:
        """List, deliver, watch, recover, until `stop` is set; then return promptly (an open request is cut)."""
        self._stop = stop
        self._finished.clear()
        guard = threading.Thread(target=self._cut_on_stop, name=f"informer-{self.resource.plural}-stop", daemon=True)
        guard.start()
        try:
            self._loop(stop)
        finally:
            self._finished.set()
            guard.join(1.0)

    def _loop(self, stop: threading.Event) -> None:
        relist, reason = True, "initial"
        resync_at = math.inf
        while not stop.is_set():
            try:
                if relist:
                    self._relist(reason)
                    relist = False
                    resync_at = time.monotonic() + self.resync if self.resync else math.inf
                self._watch(resync_at)
                if time.monotonic() >= resync_at:
                    relist, reason = True, "resync"
            except _Stopped:
                break
            except _Expired as exc:
                relist, reason = True, "expired"
                log.info("%s: %s; listing again", self.name, exc)
                if not self._progress:  # expired right after a list: do not spin on it
                    self._failures += 1
                    self._pause(stop)
            except _DeliveryFailed:
                relist, reason = True, "error"
                self._failures += 1
                self._pause(stop)
            except (ApiStatusError, *_TRANSPORT_ERRORS) as exc:
                if stop.is_set():
                    break
                self._failed(exc, "list" if relist else "watch")
                self._pause(stop)
            except Exception as exc:  # a bug or an answer shaped like nothing above: keep the informer alive
                log.exception("%s: unexpected error; listing again after backoff", self.name)
                self.last_error = f"{self.name}: unexpected error: {exc!r}"
                relist, reason = True, "error"
                self._failures += 1
                self._pause(stop)

    def _cut_on_stop(self) -> None:
        while not self._stop.wait(0.25):
            if self._finished.is_set():
                return
        with self._lock:
            response = self._response
        if response is not None:
            _interrupt(response)

    def _pause(self, stop: threading.Event) -> None:
        stop.wait(self.backoff.delay(self._failures, self._rand()))

    def _failed(self, exc: Exception, verb: str) -> None:
        self._failures += 1
        code = exc.code if isinstance(exc, ApiStatusError) else 0
        what = f"{verb} {self.resource}" + (f" in namespace {self.namespace}" if self.namespace is not None else "")
        if code == 403:
            message = f"{what} is forbidden ({exc}): the controller's RBAC must allow list and watch on it"
        elif code == 404 and self.resource.group in _CRD_GROUPS:
            message = f"{what}: not served by the API server (is the {self.resource.kind} CRD installed?)"
        elif code == 404:
            message = f"{what}: not served by the API server (is it older than this API version?)"
        elif code:
            message = f"{what} failed: {exc}"
        else:
            message = f"{what} failed: {_transport_problem(exc)} ({type(exc).__name__}: {exc})"
        self.last_error = message
        log.warning("%s; retry %d after backoff", message, self._failures)
        if self.metrics is not None:
            self.metrics.failed(self.resource.kind, verb, code)

    def _succeeded(self) -> None:
        self._failures = 0
        self.last_error = None

    # -- requests

    def _query(self) -> list[tuple[str, str]]:
        query = []
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        return query

    def _open(self, query: Sequence[tuple[str, str]], read_timeout: float) -> urllib3.BaseHTTPResponse:
        timeout = urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=read_timeout)
        response = _request(self.api, self.resource.path(self.namespace), query, timeout)
        with self._lock:
            self._response = response
        if self._stop.is_set():  # the guard may have looked before the response was registered
            _interrupt(response)
        return response

    def _close(self, response: urllib3.BaseHTTPResponse, complete: bool) -> None:
        with self._lock:
            self._response = None
        if not complete:  # unread bytes would corrupt the next request on this connection
            response.close()
        response.release_conn()

    # -- lists

    def _relist(self, reason: str) -> None:
        """A fresh list, diffed against what was delivered. Until the first one completed, each page is delivered
        (and committed) as it arrives, so 50,000 Pods never sit in one batch; the consumer publishes nothing before
        `synced` anyway. Once synced, a relist's diff is one batch, so a live consumer applies it at once."""
        incremental = not self.synced.is_set()
        try:
            version, fresh, events = self._list(self.page_size, incremental)
        except ApiStatusError as exc:
            if exc.code != 410 or not self.page_size:
                raise
            log.info("%s: the list's continue token expired (%s); one full list instead", self.name, exc)
            version, fresh, events = self._list(0, incremental)
        events.extend(Event(DELETED, self._tombstone(key)) for key in sorted(self._known.keys() - fresh.keys()))
        self._deliver(events)
        self._known = fresh
        self.resource_version = version
        self._progress = False
        self._succeeded()
        if self.metrics is not None:
            self.metrics.relisted(self.resource.kind, reason)
        if not self.synced.is_set():
            self.synced.set()
            if self.metrics is not None:
                self.metrics.synced(self.resource.kind)
        log.info(
            "%s: listed %d objects at version %s (%s), %d changes", self.name, len(fresh), version, reason, len(events)
        )

    def _list(self, limit: int, incremental: bool) -> tuple[str, dict[str, str], list[Event]]:
        """Every page, diffed against what was delivered: `fresh` is every key listed, `events` the changes not
        delivered yet (none when `incremental`: each page's changes were delivered and committed as it came)."""
        fresh: dict[str, str] = {}
        events: list[Event] = []
        version, token = "", ""
        while True:
            query = self._query()
            if limit:
                query.append(("limit", str(limit)))
            if token:
                query.append(("continue", token))
            response = self._open(query, self.request_timeout)
            complete = False
            try:
                data = response.data
                complete = True
            finally:
                self._close(response, complete)
            if self._stop.is_set():
                raise _Stopped
            page = _json_object(data, "list")
            del data
            meta = page.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            version = version or str(meta.get("resourceVersion") or "")
            changed: dict[str, str] = {}
            page_events = [] if incremental else events
            for item in page.get("items") or ():
                if isinstance(item, dict):
                    self._diff(item, fresh, page_events, changed)
            del page
            if incremental:
                self._deliver(page_events)
                self._known.update(changed)
            token = str(meta.get("continue") or "")
            if not token:
                return version, fresh, events

    def _diff(self, item: Obj, fresh: dict[str, str], events: list[Event], changed: dict[str, str]) -> None:
        item.setdefault("apiVersion", self.resource.api_version)  # built-in list items leave the type out
        item.setdefault("kind", self.resource.kind)
        key, version = self._key(item)
        if key is None:
            return
        old = self._known.get(key)
        if old is not None and old == version:
            fresh[key] = version
            return
        out = self._transformed(item)
        if out is None:
            return  # not delivered; a DELETED follows if it was delivered before
        fresh[key] = version
        changed[key] = version
        events.append(Event(MODIFIED if old is not None else ADDED, out))

    # -- watches

    def _watch(self, resync_at: float) -> None:
        """One watch request, read to its end; returns when the server ended it normally."""
        timeout = self.watch_timeout
        if resync_at < math.inf:
            timeout = max(1, min(timeout, math.ceil(resync_at - time.monotonic())))
        query = [*self._query(), ("watch", "true"), ("resourceVersion", self.resource_version)]
        query.append(("timeoutSeconds", str(timeout)))
        if self.bookmarks:
            query.append(("allowWatchBookmarks", "true"))
        try:
            response = self._open(query, timeout + _READ_MARGIN)
        except ApiStatusError as exc:
            if exc.code == 410:
                raise _Expired(str(exc)) from exc
            raise
        complete = False
        try:
            buffered = b""
            for chunk in response.stream(_CHUNK):
                lines = (buffered + chunk).split(b"\n")
                buffered = lines.pop()
                self._on_lines(lines)
            self._on_lines([buffered])
            complete = True
        except _TRANSPORT_ERRORS:
            if self._stop.is_set():
                raise _Stopped from None
            raise
        finally:
            self._close(response, complete)
        if self._stop.is_set():
            raise _Stopped
        self._progress = True
        self._succeeded()

    def _on_lines(self, lines: Iterable[bytes]) -> None:
        """Deliver the events of these lines as one batch, then commit what was delivered."""
        batch: list[Event] = []
        pending: dict[str, str | None] = {}  # key -> new version, None: deleted (applied after delivery)
        version = self.resource_version
        for line in lines:
            if not line.strip():
                continue
            event = _json_object(line, "watch event")
            type_, obj = event.get("type"), event.get("object")
            if self.metrics is not None:
                self.metrics.event(self.resource.kind, str(type_))
            if not isinstance(obj, dict):
                log.warning("%s: ignoring a watch event without an object: %.200s", self.name, line)
                continue
            if type_ == "ERROR":
                self._commit(batch, pending, version)
                error = ApiStatusError.from_status(500, obj, "WatchError")
                if error.code == 410:
                    raise _Expired(str(error))
                raise error
            meta = obj.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            if type_ == "BOOKMARK":
                version = str(meta.get("resourceVersion") or version)
                continue
            if type_ not in (ADDED, MODIFIED, DELETED):
                log.warning("%s: ignoring a watch event of type %r", self.name, type_)
                continue
            obj.setdefault("apiVersion", self.resource.api_version)
            obj.setdefault("kind", self.resource.kind)
            key, object_version = self._key(obj)
            if key is None:
                continue
            version = object_version or version
            old = pending[key] if key in pending else self._known.get(key)
            if type_ == DELETED:
                if old is not None:  # never delivered (filtered out): nothing to delete downstream
                    batch.append(Event(DELETED, self._transformed(obj) or self._tombstone(key)))
                    pending[key] = None
                continue
            if old == object_version:
                continue  # already delivered at this version (a list page read after it changed)
            out = self._transformed(obj)
            if out is None:
                if old is not None:
                    batch.append(Event(DELETED, self._tombstone(key)))
                    pending[key] = None
                continue
            batch.append(Event(MODIFIED if old is not None else ADDED, out))
            pending[key] = object_version
        self._commit(batch, pending, version)

    def _commit(self, batch: list[Event], pending: dict[str, str | None], version: str) -> None:
        self._deliver(batch)
        for key, known in pending.items():
            if known is None:
                self._known.pop(key, None)
            else:
                self._known[key] = known
        if version != self.resource_version:
            self.resource_version = version
            self._progress = True
            self._succeeded()

    # -- objects

    def _deliver(self, events: list[Event]) -> None:
        if not events:
            return
        try:
            self.on_events(events)
        except Exception as exc:
            log.exception("%s: on_events failed on %d events; they will be listed again", self.name, len(events))
            self.last_error = f"{self.name}: on_events failed: {exc!r}"
            raise _DeliveryFailed from exc

    def _transformed(self, obj: Obj) -> Obj | None:
        """The transform's result; one object it cannot handle is left out (and logged), never the whole stream."""
        if self.transform is None:
            return obj
        try:
            return self.transform(obj)
        except Exception:
            log.exception("%s: transform failed on %s; it is left out", self.name, self._key(obj)[0])
            return None

    def _key(self, obj: Obj) -> tuple[str | None, str]:
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
            log.warning("%s: ignoring an object without metadata.name", self.name)
            return None, ""
        version = str(meta.get("resourceVersion") or "")
        if not self.resource.namespaced:
            return meta["name"], version
        return f"{meta.get('namespace') or self.namespace or ''}/{meta['name']}", version

    def _tombstone(self, key: str) -> Obj:
        """What is left of a deleted object when only its key is known: enough to name it."""
        namespace, _, name = key.rpartition("/")
        meta = {"name": name, "namespace": namespace} if self.resource.namespaced else {"name": name}
        return {"apiVersion": self.resource.api_version, "kind": self.resource.kind, "metadata": meta}
