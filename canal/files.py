"""The file source: Kubernetes-style YAML or JSON documents from files, directories and stdin."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_SUFFIXES = (".yaml", ".yml", ".json")


class LoadError(Exception):
    """The input cannot be read as Kubernetes documents at all (bad YAML, a document that is not a mapping)."""


def _loader_class() -> type:
    """The fastest safe loader, without YAML 1.1 timestamps: Kubernetes keeps timestamps as strings."""
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    return Loader


_LOADER = _loader_class()


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # file path (or "<stdin>") and document number, for messages
    data: dict[str, Any]


def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files as given, directories recursively (YAML and JSON files, sorted), "-" for stdin."""
    out: list[str] = []
    for text in paths:
        if text == "-":
            out.append(text)
            continue
        path = Path(text)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in _SUFFIXES)
        elif path.is_file():
            out.append(str(path))
        else:
            raise LoadError(f"{text}: no such file or directory")
    return out


def parse_text(text: str, source: str) -> Iterator[Document]:
    try:
        for index, data in enumerate(yaml.load_all(text, Loader=_LOADER), start=1):
            if data is None:
                continue
            if not isinstance(data, dict):
                raise LoadError(f"{source}: document {index} is not a mapping (got {type(data).__name__})")
            yield Document(f"{source}#{index}", data)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise LoadError(f"{source}:{where}: invalid YAML: {problem}") from None


def load_documents(paths: Iterable[str]) -> list[Document]:
    documents: list[Document] = []
    for path in expand_paths(paths):
        if path == "-":
            documents.extend(parse_text(sys.stdin.read(), "<stdin>"))
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise LoadError(f"{path}: cannot read: {err}") from None
        documents.extend(parse_text(text, path))
    return documents
