"""Node-agent benchmark: the nftables backend next to a raw `nft -f` of the same rules, in one run (root).

The rules are the redirects Canal translates from bench/translate.py's synthetic cluster (every Service migrated,
ClusterIP:port -> the gateway pods), sized to `--rules` (default 1,000 and 10,000). Everything runs in a scratch
network namespace this script creates (the process enters it, so no `ip netns exec` per command) and removes.

Per size, `--rounds` interleaved rounds, medians reported:
- full apply, from no table: Canal (`NftablesDataplane.apply`: reads the kernel back, renders, one transaction
  through libnftables in-process, the default; and the same with `--nft-binary`, one `nft -f -`) next to the
  floor, `nft -f` of a file holding exactly the text Canal sends (written before the clock starts);
- restart: a new dataplane applying the same rules onto the table already there (reads it back with `nft -j`,
  parses, finds nothing to do): what a restarted agent costs;
- one change at the full size (a rule moved to another backend set, then back): Canal's `update` (what the xDS
  path calls; in-process and with the binary), Canal's `apply` of the whole changed set (what the file path
  calls: a diff over every rule), and the floor, `nft -f` of the same element-level transaction.
After each Canal apply, the table is read back with a fresh dataplane and compared with the rules (`--verify`, on
by default), so a fast but wrong apply cannot pass.

  sudo .venv/bin/python bench/nodeagent.py                 # 1,000 and 10,000 rules, about a minute
  sudo .venv/bin/python bench/nodeagent.py --rules 1000 --rounds 3   # quick check

Targets (issue 5): full apply within 1.5x of the floor; one change under 10 ms. Exit 1 if missed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("canal_bench_translate", _HERE / "translate.py")
workload = importlib.util.module_from_spec(_spec)  # bench/translate.py: the synthetic cluster generator
_spec.loader.exec_module(workload)

from canal.nodeagent.nftables import NftablesDataplane, build_state, render_changes, render_table  # noqa: E402
from canal.nodeagent.rules import for_mode  # noqa: E402

from canal.desired import Backend, RedirectKey, RedirectRule  # noqa: E402
from canal.snapshot import Snapshot  # noqa: E402
from canal.translate import translate  # noqa: E402

TABLE = "canal"
TARGET_FULL_RATIO = 1.5
TARGET_CHANGE_MS = 10.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def redirects(count: int) -> dict[RedirectKey, RedirectRule]:
    """`count` redirect rules as Canal translates them: a synthetic cluster just big enough, its first rules."""
    services = count
    while True:
        cluster = workload.generate(services=services, namespaces=max(10, services // 100))
        rules = for_mode(translate(Snapshot.from_dicts(cluster.objects)).redirects, "nftables")
        if len(rules) >= count:
            return dict(sorted(rules.items())[:count])
        services = services * count // max(1, len(rules)) + 10


def nft(args: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)}: {result.stderr.strip()}")


def clock(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def drop_table() -> None:
    nft(["-f", "-"], f"add table ip {TABLE}\ndelete table ip {TABLE}\n")


def verify(rules: dict[RedirectKey, RedirectRule]) -> None:
    installed = NftablesDataplane(TABLE).current()
    expected = {k: r.backends for k, r in rules.items()}
    if dict(installed or {}) != expected:
        raise SystemExit("verify: the kernel does not hold the rules that were applied")


def bench_size(rules: dict[RedirectKey, RedirectRule], rounds: int, check: bool, folder: Path) -> dict[str, float]:
    state = build_state({k: r.backends for k, r in rules.items()})
    full_text = render_table(TABLE, "ip", state)
    full_file = folder / f"full-{len(rules)}.nft"
    full_file.write_text(full_text)
    # the change: the first rule moves to another backend set (one gateway pod less), and back
    key = next(iter(rules))
    first = rules[key]
    moved = RedirectRule(key, first.backends[:1] or (Backend("10.244.250.1", key.port),), *_tail(first))
    if moved.backends == first.backends:
        moved = RedirectRule(key, (Backend("10.244.250.1", key.port),), *_tail(first))
    forth = render_changes(TABLE, "ip", state, {key: moved.backends})
    back = render_changes(TABLE, "ip", forth.state, {key: first.backends})
    forth_file, back_file = folder / "forth.nft", folder / "back.nft"
    forth_file.write_text(forth.text)
    back_file.write_text(back.text)
    changed_rules = {**rules, key: moved}

    samples: dict[str, list[float]] = {}

    def sample(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    for round_ in range(rounds):
        log(f"  {len(rules)} rules: round {round_ + 1}/{rounds}")
        drop_table()
        sample("floor full", clock(lambda: nft(["-f", str(full_file)])))
        drop_table()
        binary = NftablesDataplane(TABLE, command=("nft",))
        sample("canal full (binary)", clock(lambda dp=binary: dp.apply(rules)))
        if check:
            verify(rules)
        drop_table()
        dataplane = NftablesDataplane(TABLE)  # libnftables in-process, the default
        sample("canal full", clock(lambda dp=dataplane: dp.apply(rules)))
        if check:
            verify(rules)
        restarted = NftablesDataplane(TABLE)
        sample("canal restart", clock(lambda dp=restarted: dp.apply(rules)))
        binary = NftablesDataplane(TABLE, command=("nft",))
        binary.apply(rules)  # reads the table back: the same state as `dataplane`
        # one change, three ways; each pair (forth, back) leaves the table as it was
        for _ in range(5):
            sample("floor change", clock(lambda: nft(["-f", str(forth_file)])))
            sample("floor change", clock(lambda: nft(["-f", str(back_file)])))
            sample("canal update", clock(lambda dp=dataplane: dp.update({key: moved})))
            if check:
                verify(changed_rules)
            sample("canal update", clock(lambda dp=dataplane: dp.update({key: first})))
            sample("canal apply (diff)", clock(lambda dp=dataplane: dp.apply(changed_rules)))
            sample("canal apply (diff)", clock(lambda dp=dataplane: dp.apply(rules)))
            sample("canal update (binary)", clock(lambda dp=binary: dp.update({key: moved})))
            sample("canal update (binary)", clock(lambda dp=binary: dp.update({key: first})))
        if check:
            verify(rules)
    drop_table()
    return {name: statistics.median(values) for name, values in samples.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"


def _tail(rule: RedirectRule) -> tuple[str, str, str]:
    return rule.service, rule.gateway, rule.mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it creates a network namespace and nftables tables in it")
    from pyroute2 import netns  # noqa: PLC0415

    name = f"canal-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    results: dict[int, dict[str, float]] = {}
    try:
        netns.setns(name)  # this process (and every nft it starts) now works in the scratch namespace
        with tempfile.TemporaryDirectory() as tmp:
            for count in args.rules:
                log(f"translating a cluster for {count} redirects")
                rules = redirects(count)
                chains = len(build_state({k: r.backends for k, r in rules.items()}).chains)
                log(f"  {len(rules)} rules, {chains} backend chain(s)")
                results[count] = bench_size(rules, args.rounds, args.verify, Path(tmp))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)

    print(f"Machine: {yaml.safe_dump(workload.machine(), default_flow_style=True).strip()}")
    print(f"nft: {subprocess.run(['nft', '--version'], capture_output=True, text=True, check=False).stdout.strip()}")
    print(f"Command: {' '.join(sys.argv)} (rounds: {args.rounds}; medians)\n")
    print(
        "| rules | floor: nft -f (full) | Canal full apply | ratio | Canal with --nft-binary | ratio "
        "| Canal restart (read back, no change) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    missed = []
    for count, r in results.items():
        ratio = r["canal full"] / r["floor full"]
        binary_ratio = r["canal full (binary)"] / r["floor full"]
        print(
            f"| {count:,} | {ms(r['floor full'])} | {ms(r['canal full'])} | {ratio:.2f}x "
            f"| {ms(r['canal full (binary)'])} | {binary_ratio:.2f}x | {ms(r['canal restart'])} |"
        )
        if ratio > TARGET_FULL_RATIO:
            missed.append(f"full apply at {count}: {ratio:.2f}x the floor (target {TARGET_FULL_RATIO}x)")
    print(
        "\n| rules | one change: floor (nft -f of the delta) | Canal update | Canal apply (whole set, diffed) "
        "| Canal update with --nft-binary |"
    )
    print("|---:|---:|---:|---:|---:|")
    for count, r in results.items():
        print(
            f"| {count:,} | {ms(r['floor change'])} | {ms(r['canal update'])} | {ms(r['canal apply (diff)'])} "
            f"| {ms(r['canal update (binary)'])} |"
        )
    biggest = results[max(results)]
    if biggest["canal update"] * 1000 > TARGET_CHANGE_MS:
        missed.append(f"one change at {max(results)}: {biggest['canal update'] * 1000:.1f} ms (target 10 ms)")
    for line in missed:
        print(f"\nMISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
