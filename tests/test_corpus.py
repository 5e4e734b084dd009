"""The bad-input corpus: every file in tests/corpus/bad is rejected precisely, and nothing else is disturbed.

Each case file holds the broken object(s) plus whatever extra valid objects it needs; it is validated together
with tests/corpus/base.yaml (the helloworld example). Its leading comments declare the outcome:

    # expect: Kind ns/name: field.path: reason substring    (one or more; together, every rejection there is)
    # why: the Istio/Envoy rule the input breaks               (documentation only)
    # unaffected: Kind ns/name [on ig-namespace/ig-name]       (kept and not rejected; a VirtualService also bound)

Expectations were written from the rules, not copied from Canal's output. Where Canal disagrees and Canal is
wrong, the case is listed in KNOWN_BUGS and runs as a strict xfail.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from canal.desired import DesiredState
from canal.files import parse_text
from canal.model.base import ObjectRef, Rejection
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.conftest import CANAL

CORPUS = Path(__file__).resolve().parent / "corpus"
BASE = CORPUS / "base.yaml"
CASES = sorted((CORPUS / "bad").glob("*.yaml"))
HOME_GATEWAY = "istio-system/canal"  # the base InternalGateway that VirtualService default/helloworld binds to

# Cases where Canal is wrong (input accepted, wrong field path, misleading message); see each case's `why:`.
KNOWN_BUGS: dict[str, str] = {}  # case stem -> "canal bug: ..." (strict xfail until fixed)

_HEADER = re.compile(r"#\s*(?P<key>[a-z]+):\s*(?P<value>.*?)\s*$")
_REF = re.compile(r"(?P<kind>[A-Za-z]+) (?:(?P<namespace>[^/\s]+)/)?(?P<name>\S+)")


@dataclass(frozen=True)
class Expected:
    ref: str  # "Kind ns/name", as Rejection prints it
    field: str
    reason: str  # a substring of the reason

    @classmethod
    def parse(cls, text: str) -> Expected:
        ref, field, reason = text.split(": ", 2)
        return cls(ref, field, reason)

    def matches(self, rejection: Rejection) -> bool:
        return (
            str(rejection.ref) == self.ref
            and (rejection.field or "<object>") == self.field
            and self.reason in rejection.reason
        )

    def matches_line(self, line: str) -> bool:
        prefix = f"{self.ref}: {self.field}: "
        return line.startswith(prefix) and self.reason in line[len(prefix) :]

    def __str__(self) -> str:
        return f"{self.ref}: {self.field}: ...{self.reason}..."


@dataclass(frozen=True)
class Unaffected:
    ref: ObjectRef
    gateway: str  # for a VirtualService: the InternalGateway it must stay bound to

    @classmethod
    def parse(cls, text: str) -> Unaffected:
        target, _, gateway = text.partition(" on ")
        found = _REF.fullmatch(target.strip())
        assert found, f"bad unaffected: line {text!r}"
        ref = ObjectRef(found["kind"], found["namespace"] or "", found["name"])
        return cls(ref, gateway.strip() or HOME_GATEWAY)


@dataclass(frozen=True)
class Case:
    path: Path
    expected: tuple[Expected, ...]
    unaffected: tuple[Unaffected, ...]

    @classmethod
    def load(cls, path: Path) -> Case:
        expected, unaffected = [], []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break  # the declarations are the leading comment block
            found = _HEADER.match(line)
            assert found, f"{path.name}: unreadable header line {line!r}"
            key, value = found["key"], found["value"]
            if key == "expect":
                expected.append(Expected.parse(value))
            elif key == "unaffected":
                unaffected.append(Unaffected.parse(value))
            else:
                assert key == "why", f"{path.name}: unknown header {key!r}"
        assert expected, f"{path.name}: no expect: line"
        return cls(path, tuple(expected), tuple(unaffected))


def _documents(path: Path) -> list[dict]:
    # The CLI's own loader: timestamps stay strings, as the API server sends them.
    return [d.data for d in parse_text(path.read_text(), str(path))]


def validate(case: Case) -> tuple[Snapshot, DesiredState]:
    snapshot = Snapshot.from_dicts(_documents(BASE) + _documents(case.path))
    return snapshot, translate(snapshot)


def _lines(items: list) -> str:
    return "\n".join(map(str, items))


def _param(path: Path):
    bug = KNOWN_BUGS.get(path.stem)
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(path, id=path.stem, marks=marks)


def test_corpus_is_big_enough_and_every_known_bug_is_a_case():
    assert len(CASES) >= 40
    assert len({p.stem[:3] for p in CASES}) == len(CASES), "case numbers must be unique"
    assert set(KNOWN_BUGS) <= {p.stem for p in CASES}


def test_base_is_valid():
    snapshot = Snapshot.from_dicts(_documents(BASE))
    state = translate(snapshot)
    assert state.rejections() == []
    assert state.status[ObjectRef("VirtualService", "default", "helloworld")].bound == {HOME_GATEWAY}


@pytest.mark.parametrize("path", [_param(p) for p in CASES])
def test_bad_input_is_rejected_precisely(path: Path):
    case = Case.load(path)
    snapshot, state = validate(case)
    rejections = state.rejections()
    printed = _lines(rejections) or "<no rejections>"

    missing = [e for e in case.expected if not any(e.matches(r) for r in rejections)]
    assert not missing, f"expected rejection(s) not reported:\n{_lines(missing)}\ngot:\n{printed}"
    unexpected = [r for r in rejections if not any(e.matches(r) for e in case.expected)]
    assert not unexpected, f"rejection(s) nobody expected:\n{_lines(unexpected)}"

    for keep in case.unaffected:
        ref = keep.ref
        status = state.status.get(ref)
        assert snapshot.get(ref.kind, ref.namespace, ref.name) is not None, f"{ref} was dropped"
        # Only the object's own rejections count: an InternalGateway's status also lists those of its VirtualServices.
        assert not [r for r in rejections if r.ref == ref], f"{ref} is rejected"
        if ref.kind == "VirtualService":
            assert status is not None and keep.gateway in status.bound, f"{ref} is not bound to {keep.gateway}"
        if ref.kind == "InternalGateway":
            assert status is not None
            accepted = next(c for c in status.conditions if c.type == "Accepted")
            assert accepted.status == "True", f"{ref}: {accepted}"


def test_cli_rejects_every_case_without_traceback(tmp_path):
    """The real command, once per case (in parallel): exit 1, the expected lines on stdout, no traceback."""
    cases = [Case.load(p) for p in CASES]

    def run(case: Case) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CANAL), "validate", "-f", str(BASE), "-f", str(case.path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, cases))

    failures = []
    for case, result in zip(cases, results, strict=True):
        name = case.path.stem
        lines = result.stdout.splitlines()
        if "Traceback" in result.stderr or "Traceback" in result.stdout:
            failures.append(f"{name}: traceback\n{result.stderr}")
            continue
        # The command prints exactly what the in-process API reports.
        _, state = validate(case)
        if lines != [str(r) for r in state.rejections()]:
            failures.append(f"{name}: CLI output differs from the in-process rejections:\n{result.stdout}")
        if name in KNOWN_BUGS:
            continue
        if result.returncode != 1:
            failures.append(f"{name}: exit code {result.returncode}, expected 1")
        for expected in case.expected:
            if not any(expected.matches_line(line) for line in lines):
                failures.append(f"{name}: missing on stdout: {expected}\n{result.stdout}")
    assert not failures, "\n\n".join(failures)
