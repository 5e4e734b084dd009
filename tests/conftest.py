"""Shared fixtures: the examples, a YAML loader for inline manifests, and a subprocess runner for the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from canal.snapshot import Snapshot
from canal.translate import translate
from tests.kube_api import kube_api_fixture, kube_client_fixture  # noqa: F401 (fixtures kube_api, kube_client)
from tests.netns import need_netns

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CANAL = Path(sys.executable).with_name("canal")


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def state_of(*texts: str):
    snapshot = Snapshot.from_dicts([d for t in texts for d in docs(t)])
    return translate(snapshot)


def run_canal(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would, from outside the checkout."""
    return subprocess.run(
        [str(CANAL), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.environ.get("TMPDIR", "/tmp"),
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def helloworld_dir() -> Path:
    return EXAMPLES / "helloworld"


@pytest.fixture
def scratch_nft() -> Iterator[tuple[str, ...]]:
    """A bare network namespace for nftables tests; yields the nft command prefix that runs in it (root only)."""
    need_netns()
    name = f"canal-scratch-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield ("ip", "netns", "exec", name, "nft")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def pytest_configure(config: pytest.Config) -> None:
    """A CI runner (or a user) stopping the run with SIGTERM gets the same clean stop as Ctrl-C: fixtures tear
    down, so the Envoys, control planes, namespaces and kernel tables they started do not outlive the run."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, interrupt)
