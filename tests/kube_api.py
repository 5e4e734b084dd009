"""A Kubernetes API server for tests: real HTTP/1.1 and JSON on loopback, so the official client runs unmodified.

Why purpose-built rather than PyPI ``kmock``: kmock 0.8 lacks namespaces, PUT, resourceVersion, selectors and
watch-from-version (REFERENCE.md), which are exactly the behaviours Canal's writers and informers depend on; a
fix-up layer over it would be about as large as this file and would still inherit its routing. Here the API
semantics live in `Store` (plain Python under one lock) and `KubeApiServer` is a thin HTTP shell around it.

What it implements, as the real API server does: GET, LIST (labelSelector, fieldSelector on any dotted path;
paging with ``limit``/``continue`` and ``remainingItemCount``, 410 ``Expired`` once the first page's version is
compacted; built-in lists leave apiVersion/kind out of their items, custom resource lists keep them), WATCH
(synthetic ADDED for the current state when no resourceVersion is given, resume from a resourceVersion, ``ERROR``
with a 410 ``Expired`` Status when that version has left the bounded history, selector transitions as
ADDED/DELETED, timeoutSeconds, a BOOKMARK at the end when allowWatchBookmarks is set), POST (409 AlreadyExists),
PUT (409 Conflict on a stale metadata.resourceVersion, unconditional without one, no-op updates keep the
version), PATCH (JSON merge patch; strategic merge patch is treated as a JSON merge patch, so lists are replaced,
not merged by key; RFC 6902 JSON patch), DELETE, the ``/status`` subresource, and discovery for the registered
types (``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``: the
preferred version is chosen by the real priority order, GA > beta > alpha, unless a test picks one). One global
resourceVersion counter; uid, creationTimestamp and generation are set like the real API. Errors are real
``Status`` objects.

Test hooks (no real server has these): injected 409 conflicts and failures (any status code, by method, verb,
kind, name...; a watch can get its failure as an in-stream ``ERROR`` event), `drop_watches` (cut open watch
connections mid-stream), `outage` (down, then back on the same port with the same state), silent `modify` and
`delete` (a new version that no watch sees), `compact`, and a request log (with headers).

What it does not do: authentication, admission (namespaces need not exist), finalizers and graceful deletion,
owner-reference garbage collection, server-side apply, dryRun (rejected with 400 rather than silently
persisted), consistent paging (a continued page is read from the current state, not a snapshot at the first
page's version, so changes between pages show up early), several versions of one resource sharing storage (each
registered version is a separate store, no conversion), DELETE answering with the deleted object (it always
answers a ``Status``; the real API returns the object for Pods, Services and custom resources, so e.g. the
typed ``delete_namespaced_service`` cannot parse the answer), deletecollection, aggregated discovery, watch-list
(``sendInitialEvents``), periodic bookmarks (only the one at a watch's end), field-selector validation (any dotted
path is accepted), and schema validation beyond object names.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import random
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Matcher = Callable[[Obj], bool]


# ------------------------------------------------------------------------------------------------ resources


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One REST resource. `status`: it has a /status subresource (the main PUT then ignores status changes);
    `generation`: metadata.generation is kept and bumped when anything but metadata (and status, with the
    subresource) changes, as for custom resources; `custom`: CRD-backed, so list items keep apiVersion and kind
    (built-in lists leave them out, as the real API does)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False
    generation: bool = False
    custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        """The name the real API uses in error messages: ``plural[.group]``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def custom_resource(
    api_version: str, kind: str, plural: str, *, namespaced: bool = True, status: bool = True
) -> ResourceType:
    """A CRD-backed type: generation is always tracked for custom resources."""
    group, _, version = api_version.rpartition("/")
    return ResourceType(
        group, version, plural, kind, namespaced=namespaced, status=status, generation=True, custom=True
    )


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, status=True),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "services", "Service", status=True),
    ResourceType("", "v1", "endpoints", "Endpoints"),
    ResourceType("", "v1", "pods", "Pod", status=True, generation=True),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", generation=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
)


# --------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An API failure, answered as a ``Status`` object so the official client raises ApiException(code)."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _details(rtype: ResourceType, name: str) -> dict[str, str]:
    return {"name": name, "group": rtype.group, "kind": rtype.plural}


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.resource} "{name}" not found', _details(rtype, name))


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _no_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


# ------------------------------------------------------------------------------------------------ selectors

_LABEL_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)"
    r"(?:\s*(?P<op>==|!=|=)\s*(?P<value>[-A-Za-z0-9_.]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?"
    r"\s*(?:,|$)"
)


def label_selector(text: str) -> Matcher:
    """Equality (=, ==, !=), set (in, notin) and existence (key, !key) requirements, ANDed."""
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    pos = 0
    while pos < len(text):
        m = _LABEL_REQUIREMENT.match(text, pos)
        if m is None or m.end() == pos:
            raise _bad_request(f"unable to parse requirement: invalid label selector {text!r}")
        pos = m.end()
        key, op, value, set_op = m["key"], m["op"], m["value"], m["set"]
        if m["neg"] and (op or set_op):
            raise _bad_request(f"invalid label selector {text!r}")
        if m["neg"]:
            tests.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif set_op:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            if set_op == "in":
                tests.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            tests.append(lambda labels, k=key: k in labels)

    def match(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(t(labels) for t in tests)

    return match


def field_selector(text: str) -> Matcher:
    """``path=value``, ``path==value``, ``path!=value`` on dotted paths (metadata.name, spec.nodeName...)."""
    requirements: list[tuple[list[str], bool, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*)", part)
        if m is None:
            raise _bad_request(f"invalid field selector: {part!r}")
        requirements.append((m[1].split("."), m[2] == "!=", m[3]))

    def match(obj: Obj) -> bool:
        for path, negated, value in requirements:
            current: Any = obj
            for step in path:
                current = current.get(step) if isinstance(current, dict) else None
            actual = "" if current is None else str(current).lower() if isinstance(current, bool) else str(current)
            if (actual == value) == negated:
                return False
        return True

    return match


def _everything(_obj: Obj) -> bool:
    return True


# -------------------------------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes, objects merge, everything else replaces)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise KeyError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]] if path else []


def _index(token: str, size: int) -> int:
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")) or int(token) >= size:
        raise KeyError(f"invalid array index {token!r}")
    return int(token)


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, list):
            doc = doc[_index(token, len(doc))]
        elif isinstance(doc, dict):
            doc = doc[token]
        else:
            raise KeyError(token)
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else _index(last, len(parent) + 1), value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise KeyError("cannot remove the whole document")
    parent = _resolve(doc, tokens[:-1])
    if isinstance(parent, list):
        return parent.pop(_index(tokens[-1], len(parent)))
    if isinstance(parent, dict):
        return parent.pop(tokens[-1])
    raise KeyError(tokens[-1])


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; any failed operation (including ``test``) is 422, as the real API answers."""
    if not isinstance(operations, list):
        raise _bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    try:
        for op in operations:
            name, path = op["op"], _pointer(op["path"])
            if name == "add":
                doc = _add(doc, path, copy.deepcopy(op["value"]))
            elif name == "remove":
                _remove(doc, path)
            elif name == "replace":
                _resolve(doc, path)
                if path:
                    _remove(doc, path)
                doc = _add(doc, path, copy.deepcopy(op["value"]))
            elif name == "move":
                doc = _add(doc, path, _remove(doc, _pointer(op["from"])))
            elif name == "copy":
                doc = _add(doc, path, copy.deepcopy(_resolve(doc, _pointer(op["from"]))))
            elif name == "test":
                if _resolve(doc, path) != op["value"]:
                    raise KeyError(f"test failed at {op['path']}")
            else:
                raise KeyError(f"unknown operation {name!r}")
    except (KeyError, IndexError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {exc}") from exc
    return doc


# ----------------------------------------------------------------------------------------------------- store


@dataclass(frozen=True, slots=True)
class Event:
    """One committed change; `old` is the previous state (for selector transitions in watches)."""

    resource_version: int
    type: str  # ADDED, MODIFIED, DELETED
    rtype: ResourceType
    namespace: str
    obj: Obj
    old: Obj | None


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real API's: no vowels, no look-alikes
_FIRST_RESOURCE_VERSION = 100


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_of(rtype: ResourceType, obj: Obj) -> Obj:
    """What a generation bump looks at: everything but metadata (and status when it is a subresource)."""
    skip = {"metadata", "apiVersion", "kind", *(("status",) if rtype.status else ())}
    return {k: v for k, v in obj.items() if k not in skip}


class Store:
    """The API's state and semantics, without HTTP. Thread-safe: every method takes the one condition lock."""

    def __init__(self, resources: Iterable[ResourceType] = BUILTIN_RESOURCES, *, history: int = 1000) -> None:
        self.cond = threading.Condition()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._kinds: dict[tuple[str, str], ResourceType] = {}
        self._objects: dict[ResourceType, dict[tuple[str, str], Obj]] = {}
        self._events: deque[Event] = deque()
        self._history = history
        self._rv = _FIRST_RESOURCE_VERSION
        self._horizon = _FIRST_RESOURCE_VERSION  # a watch can start from any version >= this
        self.closed = False
        for rtype in resources:
            self.register(rtype)

    # -- types

    def register(self, rtype: ResourceType) -> None:
        with self.cond:
            self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
            self._kinds[(rtype.api_version, rtype.kind)] = rtype
            self._objects.setdefault(rtype, {})

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self.cond:
            return self._types.get((group, version, plural))

    def types(self) -> list[ResourceType]:
        with self.cond:
            return list(self._types.values())

    def kind(self, api_version: str, kind: str) -> ResourceType:
        with self.cond:
            try:
                return self._kinds[(api_version, kind)]
            except KeyError:
                raise KeyError(f"{api_version} {kind} is not registered with the test API server") from None

    @property
    def resource_version(self) -> int:
        with self.cond:
            return self._rv

    # -- reads

    def get(self, rtype: ResourceType, namespace: str, name: str) -> Obj:
        with self.cond:
            obj = self._objects[rtype].get((namespace, name))
            if obj is None:
                raise _not_found(rtype, name)
            return copy.deepcopy(obj)

    def list(self, rtype: ResourceType, namespace: str, matcher: Matcher = _everything) -> tuple[list[Obj], int]:
        """Items sorted by namespace/name, and the version they are current at."""
        with self.cond:
            return self._select(rtype, namespace, matcher), self._rv

    def page(
        self, rtype: ResourceType, namespace: str, matcher: Matcher = _everything, *, limit: int = 0, token: str = ""
    ) -> tuple[list[Obj], int, str, int]:
        """One page of a LIST (`limit` 0: everything): items, the list's version, the continue token ("" on the last
        page) and how many items remain. A continued page carries the first page's version but is read from the
        current state (no MVCC snapshot); once that version is compacted away the token is 410 Expired."""
        with self.cond:
            version, after = self._rv, None
            if token:
                version, after = _decode_continue(token)
                if version < self._horizon:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can "
                        "start a new list without the continue parameter.",
                    )
            bucket = self._objects[rtype]
            keys = [
                key
                for key in sorted(bucket)
                if (not namespace or key[0] == namespace) and (after is None or key > after) and matcher(bucket[key])
            ]
            chosen = keys[:limit] if limit else keys
            remaining = len(keys) - len(chosen)
            following = _encode_continue(version, chosen[-1]) if remaining else ""
            return [copy.deepcopy(bucket[key]) for key in chosen], version, following, remaining

    def _select(self, rtype: ResourceType, namespace: str, matcher: Matcher) -> list[Obj]:
        bucket = self._objects[rtype]
        return [
            copy.deepcopy(bucket[key])
            for key in sorted(bucket)
            if (not namespace or key[0] == namespace) and matcher(bucket[key])
        ]

    # -- writes

    def create(self, rtype: ResourceType, namespace: str, obj: Any, *, keep_status: bool = False) -> Obj:
        """POST semantics. `keep_status` is for seeding tests: the real API drops status on create."""
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise _bad_request("the body must be a JSON object with an object metadata")
        namespace = namespace if rtype.namespaced else ""
        self._check_identity(rtype, namespace, None, obj)
        result = copy.deepcopy(obj)
        result["apiVersion"], result["kind"] = rtype.api_version, rtype.kind
        meta = result.setdefault("metadata", {})
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
        if not name:
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind} "" is invalid: metadata.name: Required value: name or generateName is required',
                {"group": rtype.group, "kind": rtype.kind},
            )
        if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase RFC 1123 '
                "subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end "
                "with an alphanumeric character",
                {"name": name, "group": rtype.group, "kind": rtype.kind},
            )
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        with self.cond:
            bucket = self._objects[rtype]
            key = (namespace, name)
            if key in bucket:
                raise ApiError(409, "AlreadyExists", f'{rtype.resource} "{name}" already exists', _details(rtype, name))
            meta["name"] = name
            if rtype.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta.pop("generation", None)
            if rtype.generation:
                meta["generation"] = 1
            if rtype.status and not keep_status:
                result.pop("status", None)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            bucket[key] = result
            self._emit("ADDED", rtype, namespace, result, None)
            return copy.deepcopy(result)

    def update(self, rtype: ResourceType, namespace: str, name: str, obj: Any, *, status_only: bool = False) -> Obj:
        """PUT semantics, for the main resource or (status_only) its /status subresource."""
        with self.cond:
            return self._update(rtype, namespace, name, obj, status_only=status_only)

    def patch(
        self, rtype: ResourceType, namespace: str, name: str, content_type: str, patch: Any, *, status_only: bool
    ) -> Obj:
        """PATCH = read, apply the patch, then the PUT rules (a resourceVersion in the patch is a precondition)."""
        media = content_type.split(";", 1)[0].strip().lower()
        with self.cond:
            current = self._objects[rtype].get((namespace, name))
            if current is None:
                raise _not_found(rtype, name)
            if media in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                patched = merge_patch(current, patch)
            elif media == "application/json-patch+json":
                patched = json_patch(current, patch)
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {media}"
                )
            return self._update(rtype, namespace, name, patched, status_only=status_only)

    def delete(self, rtype: ResourceType, namespace: str, name: str, *, silent: bool = False) -> Obj:
        """DELETE semantics; `silent` (tests only) commits without a watch event, as if every watch missed it."""
        with self.cond:
            old = self._objects[rtype].pop((namespace, name), None)
            if old is None:
                raise _not_found(rtype, name)
            self._rv += 1
            deleted = copy.deepcopy(old)
            deleted["metadata"]["resourceVersion"] = str(self._rv)
            if not silent:
                self._emit("DELETED", rtype, namespace, deleted, old)
            return copy.deepcopy(deleted)

    def modify(
        self, rtype: ResourceType, namespace: str, name: str, mutate: Callable[[Obj], None], *, silent: bool = False
    ) -> Obj:
        """Another actor's write, for tests: `mutate` may change anything (status too); it is committed as is.
        `silent`: a new version but no watch event, as if every watch missed it (only a relist sees it)."""
        with self.cond:
            old = self._objects[rtype].get((namespace, name))
            if old is None:
                raise _not_found(rtype, name)
            new = copy.deepcopy(old)
            mutate(new)
            return self._commit(rtype, (namespace, name), old, new, silent=silent)

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: a watch from any earlier version then gets 410."""
        with self.cond:
            self._events.clear()
            self._horizon = self._rv

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def reopen(self) -> None:
        """Serve watches again after `close` (the state is kept): an outage's end."""
        with self.cond:
            self.closed = False

    def _check_identity(self, rtype: ResourceType, namespace: str, name: str | None, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        if obj.get("kind") and obj["kind"] != rtype.kind:
            raise _bad_request(f"the kind of the object ({obj['kind']}) does not match the URL ({rtype.kind})")
        if obj.get("apiVersion") and obj["apiVersion"] != rtype.api_version:
            raise _bad_request(
                f"the API version of the object ({obj['apiVersion']}) does not match the URL ({rtype.api_version})"
            )
        if name is not None and meta.get("name") and meta["name"] != name:
            raise _bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if rtype.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")

    def _update(self, rtype: ResourceType, namespace: str, name: str, obj: Any, *, status_only: bool) -> Obj:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise _bad_request("the body must be a JSON object with an object metadata")
        key = (namespace, name)
        old = self._objects[rtype].get(key)
        if old is None:
            raise _not_found(rtype, name)
        self._check_identity(rtype, namespace, name, obj)
        wanted = (obj.get("metadata") or {}).get("resourceVersion")
        if wanted and str(wanted) != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.resource} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                _details(rtype, name),
            )
        if status_only:
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = copy.deepcopy(obj["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(obj)
            new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
            meta = new.setdefault("metadata", {})
            for kept in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "generation"):
                if kept in old["metadata"]:
                    meta[kept] = old["metadata"][kept]
                else:
                    meta.pop(kept, None)
            if rtype.status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        return self._commit(rtype, key, old, new)

    def _commit(self, rtype: ResourceType, key: tuple[str, str], old: Obj, new: Obj, *, silent: bool = False) -> Obj:
        if new == old:
            return copy.deepcopy(old)  # a no-op update: no new version, no event (as the real API)
        meta = new["metadata"]
        if rtype.generation and _spec_of(rtype, new) != _spec_of(rtype, old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[rtype][key] = new
        if not silent:
            self._emit("MODIFIED", rtype, key[0], new, old)
        return copy.deepcopy(new)

    def _emit(self, type_: str, rtype: ResourceType, namespace: str, obj: Obj, old: Obj | None) -> None:
        if len(self._events) >= self._history:
            self._horizon = self._events.popleft().resource_version
        self._events.append(Event(self._rv, type_, rtype, namespace, copy.deepcopy(obj), old))
        self.cond.notify_all()

    # -- watch

    def watch(
        self,
        rtype: ResourceType,
        namespace: str,
        since: int | None,
        matcher: Matcher,
        *,
        timeout: float | None,
        bookmarks: bool,
        alive: Callable[[], bool],
    ) -> Iterator[Obj]:
        """Watch events as the real API streams them: ``{"type", "object"}``. Without `since`, synthetic ADDED
        events for the current state come first. Ends at the timeout, when `alive()` turns False, or on close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            if since is None:
                cursor = self._rv
                initial = [{"type": "ADDED", "object": o} for o in self._select(rtype, namespace, matcher)]
            elif since < self._horizon:
                initial, cursor = [self._expired(since)], -1
            else:
                initial, cursor = [], since
        yield from initial
        if cursor < 0:
            return
        while True:
            with self.cond:
                if self.closed:
                    return
                expired = cursor < self._horizon
                fresh = [] if expired else [e for e in self._events if e.resource_version > cursor]
                current = self._rv  # every version up to here is in `fresh` (events are contiguous)
                if not fresh and not expired:
                    self.cond.wait(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
            if expired:
                yield self._expired(cursor)
                return
            for event in fresh:
                out = _project(event, rtype, namespace, matcher)
                if out is not None:
                    yield out
            if fresh:
                cursor = fresh[-1].resource_version
            if deadline is not None and time.monotonic() >= deadline:
                if bookmarks:
                    meta = {"resourceVersion": str(max(cursor, current))}
                    yield {
                        "type": "BOOKMARK",
                        "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta},
                    }
                return
            if not alive():
                return

    def _expired(self, since: int) -> Obj:
        # The real watch cache answers this with reason Expired (code 410), not Gone.
        error = ApiError(410, "Expired", f"too old resource version: {since} ({self._horizon})")
        return {"type": "ERROR", "object": error.status()}


def _project(event: Event, rtype: ResourceType, namespace: str, matcher: Matcher) -> Obj | None:
    """What one watcher sees of an event: selector entries and exits become ADDED and DELETED."""
    if event.rtype != rtype or (namespace and event.namespace != namespace):
        return None
    now = matcher(event.obj)
    before = event.old is not None and matcher(event.old)
    if event.type == "DELETED":
        kind = "DELETED" if before else None
    elif event.type == "ADDED":
        kind = "ADDED" if now else None
    else:
        kind = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
    return None if kind is None else {"type": kind, "object": copy.deepcopy(event.obj)}


def _encode_continue(version: int, after: tuple[str, str]) -> str:
    """A continue token like the real one: opaque base64 of JSON with the list's version and where to go on."""
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": version, "start": list(after)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        namespace, name = data["start"]
        return int(data["rv"]), (str(namespace), str(name))
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad_request(f"invalid continue token: {exc}") from exc


# ---------------------------------------------------------------------------------------------- discovery


_VERSION_ORDER = re.compile(r"v(?P<major>[1-9][0-9]*)(?:(?P<stability>alpha|beta)(?P<minor>[1-9][0-9]*))?")


def version_priority(version: str) -> tuple[Any, ...]:
    """The real API's order of versions in a group (sort ascending: first is preferred): GA before beta before
    alpha, higher numbers first, then anything else alphabetically."""
    m = _VERSION_ORDER.fullmatch(version)
    if m is None:
        return (1, version)
    stability = {"": 0, "beta": 1, "alpha": 2}[m["stability"] or ""]
    return (0, stability, -int(m["major"]), -int(m["minor"] or 0))


_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _api_resources(group_version: str, types: Iterable[ResourceType]) -> Obj:
    resources: list[Obj] = []
    for rtype in sorted(types, key=lambda t: t.plural):
        common = {"singularName": rtype.kind.lower(), "namespaced": rtype.namespaced, "kind": rtype.kind}
        resources.append({"name": rtype.plural, **common, "verbs": _VERBS})
        if rtype.status:
            resources.append({"name": f"{rtype.plural}/status", **common, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _api_group(group: str, versions: Iterable[str], preferred: str | None) -> Obj:
    ordered = sorted(set(versions), key=version_priority)
    chosen = preferred if preferred in ordered else ordered[0]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in ordered],
        "preferredVersion": {"groupVersion": f"{group}/{chosen}", "version": chosen},
    }


def discovery_document(
    parts: list[str], types: Iterable[ResourceType], preferred: Mapping[str, str], address: str = ""
) -> Obj | None:
    """The discovery answer for a path split on "/" (``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``,
    ``/apis/<group>/<version>``), from the registered types; None when the path is not a discovery path.
    `address` (host:port) is what ``/api`` names as the server for every client CIDR."""
    by_group: dict[str, dict[str, list[ResourceType]]] = {}
    for rtype in types:
        by_group.setdefault(rtype.group, {}).setdefault(rtype.version, []).append(rtype)
    if parts == ["api"]:
        return {
            "kind": "APIVersions",
            "versions": sorted(by_group.get("", {}), key=version_priority),
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        }
    if len(parts) == 2 and parts[0] == "api":
        if parts[1] not in by_group.get("", {}):
            raise _no_route()
        return _api_resources(parts[1], by_group[""][parts[1]])
    if parts == ["apis"]:
        groups = [_api_group(g, vs, preferred.get(g)) for g, vs in sorted(by_group.items()) if g]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    if parts and parts[0] == "apis" and len(parts) in (2, 3):
        versions = by_group.get(parts[1], {}) if parts[1] else {}
        if not versions or (len(parts) == 3 and parts[2] not in versions):
            raise _no_route()
        if len(parts) == 2:
            return _api_group(parts[1], versions, preferred.get(parts[1]))
        return _api_resources(f"{parts[1]}/{parts[2]}", versions[parts[2]])
    return None


# ---------------------------------------------------------------------------------------------- HTTP server


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the server saw it, for assertions about what a client did."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # get, list, watch, create, update, patch, delete, discovery ("" for anything else)
    kind: str
    namespace: str
    name: str
    subresource: str
    body: Any
    code: int
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


@dataclass(frozen=True, slots=True)
class _Target:
    rtype: ResourceType
    namespace: str
    name: str
    subresource: str


@dataclass
class _Failure:
    code: int
    times: int
    method: str | None
    kind: str | None
    name: str | None
    namespace: str | None
    subresource: str | None
    message: str
    verb: str | None = None
    in_stream: bool = False


@dataclass
class _Conflict:
    rtype: ResourceType
    namespace: str
    name: str
    times: int
    mutate: Callable[[Obj], None]


def _default_bump(obj: Obj) -> None:
    """A concurrent writer's change: a counter annotation, so the object really differs."""
    meta = obj.setdefault("metadata", {})
    annotations = meta["annotations"] = dict(meta.get("annotations") or {})
    count = int(annotations.get("kube-api.test/concurrent-writes", "0"))
    annotations["kube-api.test/concurrent-writes"] = str(count + 1)


_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0+canal-test",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class KubeApiServer:
    """The test API server: `Store` behind a threaded HTTP/1.1 server on 127.0.0.1, plus test hooks."""

    def __init__(self, resources: Iterable[ResourceType] = (), *, history: int = 1000) -> None:
        self.store = Store((*BUILTIN_RESOURCES, *resources), history=history)
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._failures: list[_Failure] = []
        self._conflicts: list[_Conflict] = []
        self._watches: dict[socket.socket, str] = {}  # open watch connections -> kind
        self._preferred: dict[str, str] = {}
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle

    def start(self, port: int = 0) -> KubeApiServer:
        self.store.reopen()
        self._http = _HttpServer(("127.0.0.1", port), self)
        host, port = self._http.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="kube-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is None:
            return
        self.store.close()
        self._http.shutdown()
        self._http.close_connections()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = None

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server is down inside the block (open connections cut, new ones refused) and back on the same
        port after it, with its state, history and hooks kept; direct access (create, modify...) works meanwhile."""
        port = int(self.url.rsplit(":", 1)[1])
        self.stop()
        try:
            yield
        finally:
            self.start(port)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> client.ApiClient:
        """An official ApiClient pointed at this server (no auth, no TLS). Close it when done."""
        configuration = client.Configuration(host=self.url)
        return client.ApiClient(configuration)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server, for code that loads one the way users do (the `canal` commands)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config))  # JSON is YAML: no YAML dependency for the test server
        return path

    def register(self, rtype: ResourceType) -> None:
        """Serve a type from now on (a CRD being installed); it shows up in discovery too."""
        self.store.register(rtype)

    def prefer_version(self, group: str, version: str) -> None:
        """Make discovery name `version` as the group's preferredVersion (by default the real API's priority order
        decides: GA, then beta, then alpha). Register every served version of the group as its own type."""
        with self._lock:
            self._preferred[group] = version

    # -- direct access for tests (no HTTP, not in the request log)

    def create(self, obj: Obj, *, keep_status: bool = True) -> Obj:
        """Seed an object from a manifest dict (status kept, unlike a client's POST)."""
        rtype = self.store.kind(obj["apiVersion"], obj["kind"])
        return self.store.create(rtype, obj.get("metadata", {}).get("namespace", ""), obj, keep_status=keep_status)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> Obj | None:
        try:
            return self.store.get(self.store.kind(api_version, kind), namespace, name)
        except ApiError:
            return None

    def modify(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str = "",
        mutate: Callable[[Obj], None] = _default_bump,
        *,
        silent: bool = False,
    ) -> Obj:
        """Simulate another writer: commit `mutate`'s changes with a new version and a MODIFIED event (none when
        `silent`: a change every watch misses, which only a fresh LIST shows)."""
        return self.store.modify(self.store.kind(api_version, kind), namespace, name, mutate, silent=silent)

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "", *, silent: bool = False) -> Obj:
        return self.store.delete(self.store.kind(api_version, kind), namespace, name, silent=silent)

    def compact(self) -> None:
        self.store.compact()

    # -- test hooks

    def inject_conflict(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str = "",
        *,
        times: int = 1,
        mutate: Callable[[Obj], None] = _default_bump,
    ) -> None:
        """The next `times` PUTs to this object (or its status) are each preceded by a concurrent write
        (`mutate`), so a client holding the version it read gets a real 409 Conflict."""
        rtype = self.store.kind(api_version, kind)
        with self._lock:
            self._conflicts.append(_Conflict(rtype, namespace, name, times, mutate))

    def inject_failure(
        self,
        code: int = 500,
        *,
        times: int = 1,
        method: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        subresource: str | None = None,
        verb: str | None = None,
        message: str = "injected failure",
        in_stream: bool = False,
    ) -> None:
        """The next `times` requests matching every given filter (`verb`: list, watch, get...) are answered with a
        `code` Status. `in_stream`: a watch is answered 200 and then one ``ERROR`` event carrying that Status, as the
        real API reports errors once a watch has started. Discovery requests are never failed."""
        with self._lock:
            self._failures.append(
                _Failure(code, times, method, kind, name, namespace, subresource, message, verb, in_stream)
            )

    def drop_watches(self, kind: str | None = None) -> int:
        """Cut every open watch connection (of `kind`) mid-stream, without the final chunk, as a network failure or
        an API server crash does; returns how many were cut."""
        with self._lock:
            targets = [conn for conn, watched in self._watches.items() if kind in (None, watched)]
        for conn in targets:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return len(targets)

    def open_watches(self, kind: str | None = None) -> int:
        """How many watch responses are streaming right now (of `kind`)."""
        with self._lock:
            return sum(1 for watched in self._watches.values() if kind in (None, watched))

    def _watch_opened(self, conn: socket.socket, kind: str) -> None:
        with self._lock:
            self._watches[conn] = kind

    def _watch_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._watches.pop(conn, None)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def requests_of(self, verb: str, *, kind: str | None = None, name: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.verb == verb and kind in (None, r.kind) and name in (None, r.name)]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- request handling (called from the handler threads)

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        content_type: str,
        raw: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> _Response:
        seen = {k.lower(): v for k, v in (headers or {}).items()}
        target: _Target | None = None
        body: Any = None
        verb = ""
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _bad_request(f"the request body is not JSON: {exc}") from exc
            if path.rstrip("/") == "/version" and method == "GET":
                return self._log(_Response(200, _VERSION), method, path, query, "", None, body, seen)
            if method == "GET":
                with self._lock:
                    preferred = dict(self._preferred)
                parts = [p for p in path.split("/") if p]
                document = discovery_document(parts, self.store.types(), preferred, self.url.split("//", 1)[-1])
                if document is not None:
                    return self._log(_Response(200, document), method, path, query, "discovery", None, body, seen)
            target = self._route(path)
            verb = _verb(method, target, query)
            failure = self._maybe_fail(method, verb, target)
            if failure is None:
                response = self._execute(method, verb, target, query, content_type, body)
            else:
                error = ApiError(failure.code, _REASONS.get(failure.code, "InternalError"), failure.message)
                if not (failure.in_stream and verb == "watch"):
                    raise error
                event = {"type": "ERROR", "object": error.status()}
                response = _Response(200, None, watch=lambda _alive: iter([event]), watch_kind=target.rtype.kind)
        except ApiError as error:
            response = _Response(error.code, error.status())
        except Exception as exc:
            log.exception("test API server: %s %s failed", method, path)
            response = _Response(500, ApiError(500, "InternalError", f"test API server bug: {exc!r}").status())
        return self._log(response, method, path, query, verb, target, body, seen)

    def _log(
        self,
        response: _Response,
        method: str,
        path: str,
        query: Mapping[str, str],
        verb: str,
        target: _Target | None,
        body: Any,
        headers: Mapping[str, str],
    ) -> _Response:
        record = Request(
            method=method,
            path=path,
            query=dict(query),
            verb=verb,
            kind=target.rtype.kind if target else "",
            namespace=target.namespace if target else "",
            name=target.name if target else "",
            subresource=target.subresource if target else "",
            body=body,
            code=response.code,
            headers=dict(headers),
        )
        with self._lock:
            self._requests.append(record)
        return response

    def _route(self, path: str) -> _Target:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _no_route()
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and not (group == "" and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise _no_route()
        rtype = self.store.lookup(group, version, rest[0])
        if rtype is None or (namespace and not rtype.namespaced):
            raise _no_route()
        name = rest[1] if len(rest) > 1 else ""
        subresource = rest[2] if len(rest) > 2 else ""
        if subresource and (subresource != "status" or not rtype.status):
            raise _no_route()
        if name and rtype.namespaced and not namespace:
            raise _no_route()
        return _Target(rtype, namespace, name, subresource)

    def _maybe_fail(self, method: str, verb: str, target: _Target) -> _Failure | None:
        """The injected failure due for this request, if any (counted down)."""
        with self._lock:
            for failure in self._failures:
                if failure.times > 0 and all(
                    want is None or want == have
                    for want, have in (
                        (failure.method, method),
                        (failure.verb, verb),
                        (failure.kind, target.rtype.kind),
                        (failure.name, target.name),
                        (failure.namespace, target.namespace),
                        (failure.subresource, target.subresource),
                    )
                ):
                    failure.times -= 1
                    return failure
        return None

    def _maybe_conflict(self, target: _Target) -> None:
        with self._lock:
            due = [
                c
                for c in self._conflicts
                if c.times > 0 and (c.rtype, c.namespace, c.name) == (target.rtype, target.namespace, target.name)
            ]
            for conflict in due:
                conflict.times -= 1
        for conflict in due:
            self.store.modify(target.rtype, target.namespace, target.name, conflict.mutate)

    def _execute(
        self, method: str, verb: str, target: _Target, query: Mapping[str, str], content_type: str, body: Any
    ) -> _Response:
        if "dryRun" in query:
            raise _bad_request("dryRun is not supported by the test API server")
        store, rtype, ns, name = self.store, target.rtype, target.namespace, target.name
        status_only = target.subresource == "status"
        if verb == "get":
            return _Response(200, store.get(rtype, ns, name))
        if verb in ("list", "watch"):
            matcher = _matcher(query)
            version = query.get("resourceVersion", "")
            if version not in ("", "0") and not version.isdigit():
                raise _bad_request(f"invalid resourceVersion {version!r}")
            if verb == "watch":
                return _Response(
                    200, None, watch=lambda alive: self._watch(target, query, matcher, alive), watch_kind=rtype.kind
                )
            limit = query.get("limit", "")
            if limit and not limit.isdigit():
                raise _bad_request(f"invalid limit {limit!r}")
            items, rv, following, remaining = store.page(
                rtype, ns, matcher, limit=int(limit or 0), token=query.get("continue", "")
            )
            if not rtype.custom:  # built-in lists carry the type once, on the list, not on every item
                for item in items:
                    item.pop("apiVersion", None)
                    item.pop("kind", None)
            meta: Obj = {"resourceVersion": str(rv)}
            if following:
                meta.update({"continue": following, "remainingItemCount": remaining})
            listing = {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta, "items": items}
            return _Response(200, listing)
        if verb == "create":
            if rtype.namespaced and not ns:
                raise _no_route()
            return _Response(201, store.create(rtype, ns, body))
        if verb == "update":
            self._maybe_conflict(target)
            return _Response(200, store.update(rtype, ns, name, body, status_only=status_only))
        if verb == "patch":
            return _Response(200, store.patch(rtype, ns, name, content_type, body, status_only=status_only))
        if verb == "delete":
            deleted = store.delete(rtype, ns, name)
            details = {**_details(rtype, name), "uid": deleted["metadata"]["uid"]}
            return _Response(
                200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
            )
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {target.rtype.resource} here")

    def _watch(
        self, target: _Target, query: Mapping[str, str], matcher: Matcher, alive: Callable[[], bool]
    ) -> Iterator[Obj]:
        since = query.get("resourceVersion", "")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        return self.store.watch(
            target.rtype,
            target.namespace,
            None if since in ("", "0") else int(since),
            matcher,
            timeout=timeout if timeout else None,
            bookmarks=bookmarks,
            alive=alive,
        )


def _verb(method: str, target: _Target, query: Mapping[str, str]) -> str:
    named = bool(target.name)
    if method == "GET":
        if named:
            return "get"
        return "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
    if target.subresource and method not in ("PUT", "PATCH"):
        return ""
    return {
        ("POST", False): "create",
        ("PUT", True): "update",
        ("PATCH", True): "patch",
        ("DELETE", True): "delete",
    }.get((method, named), "")


def _matcher(query: Mapping[str, str]) -> Matcher:
    labels = label_selector(query["labelSelector"]) if query.get("labelSelector") else _everything
    fields = field_selector(query["fieldSelector"]) if query.get("fieldSelector") else _everything
    return lambda obj: labels(obj) and fields(obj)


@dataclass(frozen=True, slots=True)
class _Response:
    code: int
    body: Any
    watch: Callable[[Callable[[], bool]], Iterator[Obj]] | None = None
    watch_kind: str = ""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: KubeApiServer) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections[conn] = threading.current_thread()

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.pop(conn, None)

    def close_connections(self) -> None:
        """Shut down every open connection (idle keep-alives and watches) and wait for its handler."""
        with self._conn_lock:
            open_now = list(self._connections.items())
        for conn, _ in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in open_now:
            thread.join(timeout=5)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away
        log.exception("test API server: unhandled error for %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid delayed-ACK stalls
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is the record."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        response = self.server.api.handle(
            self.command, url.path, query, self.headers.get("Content-Type", ""), raw, dict(self.headers.items())
        )
        if response.watch is not None:
            self.server.api._watch_opened(self.connection, response.watch_kind)
            try:
                self._stream(response.watch(self._alive))
            finally:
                self.server.api._watch_closed(self.connection)
            return
        data = json.dumps(response.body).encode()
        self.send_response(response.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[Obj]) -> None:
        """A watch response: one JSON event per line, chunked, as the real API sends it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        if self.server.api.store.closed:
            self.close_connection = True

    def _alive(self) -> bool:
        """Whether the watching client is still connected (a readable socket with nothing to read is EOF)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(name="kube_api")
def kube_api_fixture() -> Iterator[KubeApiServer]:
    """A fresh test API server per test, as fixture ``kube_api`` (import the function into the test module)."""
    with KubeApiServer() as server:
        yield server


@pytest.fixture(name="kube_client")
def kube_client_fixture(kube_api: KubeApiServer) -> Iterator[client.ApiClient]:
    """An official ApiClient for ``kube_api``, as fixture ``kube_client``."""
    with kube_api.client() as api:
        yield api
