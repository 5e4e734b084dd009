"""The InternalGateway CustomResourceDefinition, as shipped in the package.

The manifest lives in ``canal/internalgateways.canal.io.yaml`` (package data, so an installed Canal has it
too, the container image included); the Helm chart's ``charts/canal/crds/`` holds a byte-identical copy, checked
by tests/test_crd.py. ``canal controller --install-crds`` and the tests read the same file through this module.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

import yaml

from canal.model.internal_gateway import GROUP, VERSION

FILENAME = "internalgateways.canal.io.yaml"
NAME = f"internalgateways.{GROUP}"


def manifest_text() -> str:
    """The manifest exactly as shipped (comments included), e.g. to print or to apply as is."""
    return resources.files("canal").joinpath(FILENAME).read_text(encoding="utf-8")


@cache
def _manifest() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(manifest_text(), Loader=loader)
    if not isinstance(data, dict) or data.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{FILENAME} is not a CustomResourceDefinition")
    return data


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict (a fresh copy: callers may change it)."""
    return copy.deepcopy(_manifest())


def schema(version: str = VERSION) -> dict[str, Any]:
    """The openAPIV3Schema of one served version (the whole object: apiVersion, kind, metadata, spec, status)."""
    for entry in _manifest()["spec"]["versions"]:
        if entry["name"] == version:
            return copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    raise KeyError(f"{NAME} has no version {version!r}")
