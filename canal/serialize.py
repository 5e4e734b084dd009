"""Canonical plain data for the model and the desired state: what `render` prints and versions hash.

Fields equal to their defaults are left out (a readable diff), mappings are sorted by key, sets are sorted:
the same input always gives byte-identical output.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from canal.desired import DesiredState, RedirectKey
from canal.model.base import Caveat, ObjectRef, Rejection

_MISSING = dataclasses.MISSING


@cache
def _field_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        out.append((f.name, default))
    return tuple(out)


def key_text(key: Any) -> str:
    if isinstance(key, ObjectRef):
        return str(key)
    if isinstance(key, RedirectKey):
        host = f"[{key.cluster_ip}]" if ":" in key.cluster_ip else key.cluster_ip
        return f"{host}:{key.port}/{key.protocol}"
    if isinstance(key, tuple):
        return "/".join(key_text(k) for k in key)
    return str(key)


def to_data(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, ObjectRef | Rejection | Caveat):
        return str(value)
    if isinstance(value, RedirectKey):
        return key_text(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name, default in _field_defaults(type(value)):
            item = getattr(value, name)
            if default is not _MISSING and item == default:
                continue
            out[name] = to_data(item)
        return out
    if isinstance(value, Mapping):
        return {key_text(k): to_data(value[k]) for k in sorted(value, key=key_text)}
    if isinstance(value, frozenset | set):
        return [to_data(v) for v in sorted(value, key=key_text)]
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"cannot serialise {type(value).__name__}")


def canonical_json(value: Any) -> str:
    return json.dumps(to_data(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_version(resource: Any) -> str:
    """Content hash of a resource: equal content, equal version, in any process and any run."""
    return hashlib.blake2b(canonical_json(resource).encode(), digest_size=12).hexdigest()


SECTIONS = ("envoy", "dns", "redirects", "status")


def _resources(mapping: Mapping[Any, Any]) -> list[Any]:
    """A mapping of named resources as a list sorted by name, each with its content version."""
    out = []
    for key in sorted(mapping, key=key_text):
        data = to_data(mapping[key])
        data["version"] = content_version(mapping[key])
        out.append(data)
    return out


def render_state(state: DesiredState, only: str | None = None) -> dict[str, Any]:
    """The desired state as plain data, for `canal render` and for humans."""
    sections: dict[str, Any] = {}
    if only in (None, "envoy"):
        sections["envoy"] = {
            group: {
                "listeners": _resources(cfg.listeners),
                "route_configs": _resources(cfg.route_configs),
                "clusters": _resources(cfg.clusters),
                "endpoints": _resources(cfg.endpoints),
            }
            for group, cfg in sorted(state.envoy.items())
        }
    if only in (None, "dns"):
        sections["dns"] = [to_data(state.dns[k]) for k in sorted(state.dns)]
    if only in (None, "redirects"):
        sections["redirects"] = [to_data(state.redirects[k]) for k in sorted(state.redirects)]
    if only in (None, "status"):
        sections["status"] = [to_data(state.status[k]) for k in sorted(state.status)]
    return sections
