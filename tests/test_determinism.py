"""Same input, byte-identical output: across input order, processes and hash seeds."""

from __future__ import annotations

import random

import yaml

from canal.serialize import canonical_json, render_state
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.conftest import EXAMPLES, run_canal
from tests.test_incremental import UNIVERSE


def _all_objects() -> list[dict]:
    """Every object of the incremental test's universe plus helloworld's app (no object defined twice)."""
    objs = [versions[0] for versions in UNIVERSE]
    for path in sorted((EXAMPLES / "helloworld").glob("1*.yaml")):
        objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    refs = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(set(refs)) == len(refs)
    return objs


def test_output_does_not_depend_on_input_order():
    objs = _all_objects()
    expected = canonical_json(render_state(translate(Snapshot.from_dicts(objs))))
    rng = random.Random(7)
    for _ in range(5):
        shuffled = objs[:]
        rng.shuffle(shuffled)
        assert canonical_json(render_state(translate(Snapshot.from_dicts(shuffled)))) == expected


def test_render_is_byte_identical_across_processes_and_hash_seeds(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(_all_objects()))
    outputs = set()
    for seed in ("0", "1", "12345"):
        result = run_canal("render", "-f", str(path), env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1
    assert "outbound|3306||db.a.svc.cluster.local" in outputs.pop()


def test_versions_are_content_hashes():
    state = translate(Snapshot.from_dicts(_all_objects()))
    again = translate(Snapshot.from_dicts(_all_objects()))
    rendered, rerendered = render_state(state), render_state(again)
    versions = [c["version"] for c in rendered["envoy"]["istio-system/canal"]["clusters"]]
    assert versions == [c["version"] for c in rerendered["envoy"]["istio-system/canal"]["clusters"]]
    assert len(set(versions)) == len(versions)  # different clusters, different content, different versions
