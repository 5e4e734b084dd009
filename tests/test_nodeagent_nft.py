"""The nftables backend of the node agent against the real kernel, in network namespaces (tests/netns.py).

Every expectation comes from the topology: which namespace and address is the old backend, which are the gateway
endpoints. The servers answer with their identity, so "where did this connection land" is read off the wire.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from canal.nodeagent.dataplane import ApplyError
from canal.nodeagent.nftables import NftablesDataplane
from canal.nodeagent.rules import to_json

from canal.desired import Backend, RedirectKey, RedirectRule
from tests.netns import Endpoint, NftMonitor, Reply, Topology, need_netns, topology

TABLE = "canal"
BIN = Path(sys.executable).parent
CANAL = BIN / "canal"

Rules = dict[RedirectKey, RedirectRule]


@pytest.fixture
def topo() -> Iterator[Topology]:
    need_netns()
    with topology(gateways=3) as built:
        yield built


def dataplane(topo: Topology, command: Sequence[str] | None = None) -> NftablesDataplane:
    return NftablesDataplane(table=TABLE, command=command or topo.nft_command)


def rules(*pairs: tuple[RedirectKey, RedirectRule]) -> Rules:
    return dict(pairs)


def installed(ruleset: Rules) -> dict[RedirectKey, tuple[Backend, ...]]:
    """What the kernel should hold for ``ruleset``: each key -> its backends (read back by current())."""
    return {key: rule.backends for key, rule in ruleset.items()}


def lands_on(reply: Reply, endpoint: Endpoint, family: int = 4) -> bool:
    return (reply.name, reply.address, reply.port) == (endpoint.name, endpoint.address(family), endpoint.port)


def assert_lands(reply: Reply, endpoint: Endpoint, family: int = 4) -> None:
    assert lands_on(reply, endpoint, family), (
        f"expected {endpoint.name} at {endpoint.address(family)}:{endpoint.port}, got {reply}"
    )


def foreign_snapshot(topo: Topology) -> dict[str, str | None]:
    """The kube-proxy-like tables' text, without and with handles."""
    families = ["ip", "ip6"] if topo.ipv6 else ["ip"]
    out: dict[str, str | None] = {}
    for family in families:
        out[family] = topo.list_table(family, topo.foreign_table)
        out[f"{family} -a"] = topo.list_table(family, topo.foreign_table, handles=True)
    assert all(out.values()), "the foreign tables must exist"
    return out


def canal_tables(topo: Topology) -> list[tuple[str, str]]:
    return [t for t in topo.tables() if t[1] == TABLE]


def families(topo: Topology) -> list[int]:
    return [4, 6] if topo.ipv6 else [4]


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.timeout(60)
def test_before_any_rule_the_cluster_ip_reaches_the_old_backend(topo: Topology) -> None:
    """The harness itself: the foreign DNAT takes the ClusterIP to the old backend from the pod, the node and the
    gateway namespaces, in both families; the gateways answer directly; Canal owns no table yet."""
    for family in families(topo):
        for ns, source in (
            (topo.client.ns, topo.client.address(family)),
            (topo.node, topo.node_ipv4 if family == 4 else topo.node_ipv6),
            (topo.gateways[0].ns, topo.gateways[0].address(family)),
        ):
            reply = topo.ask(ns, topo.cluster(family))
            assert_lands(reply, topo.old_backend, family)
            assert reply.peer == source  # DNAT only: the backend sees the real client
        for gateway in topo.gateways:
            assert_lands(topo.ask(topo.client.ns, gateway.address(family), gateway.port), gateway, family)
    assert canal_tables(topo) == []
    assert dataplane(topo).current() is None


@pytest.mark.timeout(60)
def test_apply_moves_new_connections_and_keeps_established_ones(topo: Topology) -> None:
    gateway = topo.gateways[0]
    before = foreign_snapshot(topo)
    established = {
        "pod": topo.connect(topo.client.ns, topo.cluster_ip),  # crosses the node's prerouting hook
        "node": topo.connect(topo.node, topo.cluster_ip),  # the node's own output hook
    }
    for conn in established.values():
        assert_lands(conn.ask(), topo.old_backend)

    result = dataplane(topo).apply(rules(topo.rule([gateway])))
    assert (result.mode, result.added) == ("full", 1)

    # New connections land on the gateway, the source address untouched.
    reply = topo.ask(topo.client.ns, topo.cluster_ip)
    assert_lands(reply, gateway)
    assert reply.peer == topo.client.ipv4
    reply = topo.ask(topo.node, topo.cluster_ip)
    assert_lands(reply, gateway)
    assert reply.peer == topo.node_ipv4
    # A connection opened before keeps talking to the old backend (conntrack), again and again, until it closes.
    for _ in range(3):
        for conn in established.values():
            assert_lands(conn.ask(), topo.old_backend)
    # The Service that is not migrated stays with kube-proxy.
    assert_lands(topo.ask(topo.client.ns, topo.other_cluster_ip), topo.old_backend)
    assert_lands(topo.ask(topo.node, topo.other_cluster_ip), topo.old_backend)
    # Another port of the migrated ClusterIP is not redirected.
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip, topo.other_port), topo.old_backend)
    assert_lands(topo.ask(topo.node, topo.cluster_ip, topo.other_port), topo.old_backend)
    for conn in established.values():
        conn.close()
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), gateway)
    assert foreign_snapshot(topo) == before  # kube-proxy's table is byte-identical (handles too)


@pytest.mark.timeout(60)
def test_removing_the_rules_restores_the_old_path(topo: Topology) -> None:
    gateway = topo.gateways[1]
    before = foreign_snapshot(topo)
    agent = dataplane(topo)
    ruleset = rules(*(topo.rule([gateway], family) for family in families(topo)))
    agent.apply(ruleset)
    redirected = {family: topo.connect(topo.client.ns, topo.cluster(family)) for family in families(topo)}
    for family, conn in redirected.items():
        assert_lands(conn.ask(), gateway, family)

    result = agent.apply({})
    assert result.removed == len(ruleset)
    assert canal_tables(topo) == []
    for family in families(topo):
        assert_lands(topo.ask(topo.client.ns, topo.cluster(family)), topo.old_backend, family)
        assert_lands(topo.ask(topo.node, topo.cluster(family)), topo.old_backend, family)
    for family, conn in redirected.items():  # established connections are not moved back either
        assert_lands(conn.ask(), gateway, family)

    # Again, removed by cleanup() this time.
    agent.apply(ruleset)
    for family in families(topo):
        assert_lands(topo.ask(topo.client.ns, topo.cluster(family)), gateway, family)
    assert agent.cleanup() is True
    for family in families(topo):
        assert_lands(topo.ask(topo.client.ns, topo.cluster(family)), topo.old_backend, family)
        assert_lands(topo.ask(topo.node, topo.cluster(family)), topo.old_backend, family)
    for family, conn in redirected.items():
        assert_lands(conn.ask(), gateway, family)
        conn.close()
    assert foreign_snapshot(topo) == before


@pytest.mark.timeout(60)
def test_cleanup_leaves_no_canal_table(topo: Topology) -> None:
    expected_foreign = [("ip", topo.foreign_table)] + ([("ip6", topo.foreign_table)] if topo.ipv6 else [])
    agent = dataplane(topo)
    agent.apply(rules(*(topo.rule(family=family) for family in families(topo))))
    assert sorted(canal_tables(topo)) == sorted((f, TABLE) for f in (["ip", "ip6"] if topo.ipv6 else ["ip"]))

    assert dataplane(topo).cleanup() is True  # any instance cleans up: the tables are found by name
    assert sorted(topo.tables()) == sorted(expected_foreign)
    assert dataplane(topo).current() is None
    assert agent.cleanup() is False  # nothing left
    assert sorted(topo.tables()) == sorted(expected_foreign)


# ------------------------------------------------------------------------------------------------ restart


@pytest.mark.timeout(60)
def test_a_restarted_agent_changes_nothing_and_resets_nothing(topo: Topology) -> None:
    fams = families(topo)
    ruleset = rules(
        *(topo.rule(topo.gateways, family) for family in fams),
        *(topo.rule(topo.gateways[:1], family, port=443) for family in fams),
        topo.rule(topo.gateways[1:], 4, cluster_ip="10.96.5.5", port=8443),
    )
    old_path = topo.connect(topo.client.ns, topo.cluster_ip)  # opened before any rule
    assert_lands(old_path.ask(), topo.old_backend)
    dataplane(topo).apply(ruleset)
    new_path = {family: topo.connect(topo.client.ns, topo.cluster(family)) for family in fams}
    landed = {family: conn.ask() for family, conn in new_path.items()}
    for family, reply in landed.items():
        assert any(lands_on(reply, g, family) for g in topo.gateways), reply
    tables = {f: topo.list_table(f, TABLE, handles=True) for f in (["ip", "ip6"] if topo.ipv6 else ["ip"])}
    foreign = foreign_snapshot(topo)

    with NftMonitor(topo) as monitor:
        restarted = dataplane(topo)  # a new process would start from nothing but the kernel
        (read, result), events = monitor.between_marks(lambda: (restarted.current(), restarted.apply(ruleset)))
    assert read == installed(ruleset)
    assert result.mode == "none"
    assert events == [], f"the restarted agent changed the ruleset: {events}"
    assert {f: topo.list_table(f, TABLE, handles=True) for f in tables} == tables  # same objects, same handles
    assert foreign_snapshot(topo) == foreign
    # No connection was reset or moved.
    assert_lands(old_path.ask(), topo.old_backend)
    for family, conn in new_path.items():
        again = conn.ask()
        assert (again.name, again.address) == (landed[family].name, landed[family].address)
    old_path.close()
    for conn in new_path.values():
        conn.close()


# ------------------------------------------------------------------------------------------------ spreading


@pytest.mark.timeout(90)
def test_several_gateway_endpoints_share_new_connections_round_robin(topo: Topology) -> None:
    count = 10 * len(topo.gateways)
    dataplane(topo).apply(rules(*(topo.rule(topo.gateways, family) for family in families(topo))))
    names = {g.name: g for g in topo.gateways}
    for family in families(topo):
        for ns in (topo.client.ns, topo.node):
            conns = [topo.connect(ns, topo.cluster(family)) for _ in range(count)]
            try:
                first = [conn.ask() for conn in conns]
                for reply in first:
                    assert_lands(reply, names[reply.name], family)
                spread = Counter(reply.name for reply in first)
                assert spread == dict.fromkeys(names, 10), f"{ns} IPv{family}: not an even spread: {spread}"
                # Round robin: every window of len(gateways) consecutive new connections hits each gateway once.
                order = [reply.name for reply in first]
                for i in range(0, count, len(topo.gateways)):
                    assert sorted(order[i : i + len(topo.gateways)]) == sorted(names), order
                # Each connection stays where it landed.
                assert [conn.ask().name for conn in conns] == order
            finally:
                for conn in conns:
                    conn.close()


@pytest.mark.timeout(60)
def test_the_gateways_own_traffic_is_never_redirected(topo: Topology) -> None:
    """A gateway Envoy that connects to the ClusterIP itself must reach the old backend, not itself (no loop)."""
    dataplane(topo).apply(rules(*(topo.rule(topo.gateways, family) for family in families(topo))))
    for family in families(topo):
        for gateway in topo.gateways:
            reply = topo.ask(gateway.ns, topo.cluster(family))
            assert_lands(reply, topo.old_backend, family)
            assert reply.peer == gateway.address(family)
        reply = topo.ask(topo.client.ns, topo.cluster(family))
        assert any(lands_on(reply, g, family) for g in topo.gateways), reply


@pytest.mark.timeout(60)
def test_dual_stack_rules_live_in_their_own_family_table(topo: Topology) -> None:
    if not topo.ipv6:
        pytest.skip("no IPv6 in this kernel")
    before = foreign_snapshot(topo)
    v4, v6 = topo.gateways[0], topo.gateways[1]
    agent = dataplane(topo)
    agent.apply(rules(topo.rule([v4], 4)))
    assert canal_tables(topo) == [("ip", TABLE)]  # no IPv6 rule: no ip6 table
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip6), topo.old_backend, 6)

    ruleset = rules(topo.rule([v4], 4), topo.rule([v6], 6))
    agent.apply(ruleset)
    assert sorted(canal_tables(topo)) == [("ip", TABLE), ("ip6", TABLE)]
    for ns in (topo.client.ns, topo.node):
        assert_lands(topo.ask(ns, topo.cluster_ip), v4, 4)
        assert_lands(topo.ask(ns, topo.cluster_ip6), v6, 6)
    assert_lands(topo.ask(v6.ns, topo.cluster_ip6), topo.old_backend, 6)  # the gateway's own traffic, IPv6
    assert dataplane(topo).current() == installed(ruleset)

    agent.apply(rules(topo.rule([v6], 6)))
    assert canal_tables(topo) == [("ip6", TABLE)]
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), topo.old_backend, 4)
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip6), v6, 6)
    assert foreign_snapshot(topo) == before


# ------------------------------------------------------------------------------------------------ failures

# An nft stand-in: runs the real nft in the node namespace, but while the flag file exists it appends a statement
# the kernel rejects (deleting a table that does not exist) to every transaction, so the transaction fails inside
# the kernel after Canal's own statements, the hardest place for atomicity.
FAILING_NFT = textwrap.dedent(
    """
    import os, subprocess, sys
    ns, flag, log, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    stdin = sys.stdin.read() if "-f" in args else None
    if stdin is not None and os.path.exists(flag):
        stdin += "delete table ip canal-test-does-not-exist\\n"
    with open(log, "a") as out:
        out.write(" ".join(args) + (" (poisoned)" if stdin and os.path.exists(flag) else "") + "\\n")
    result = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, text=True, capture_output=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)
    """
)


@pytest.mark.timeout(60)
def test_a_failed_apply_raises_and_keeps_the_old_rules(topo: Topology, tmp_path: Path) -> None:
    script, flag, log = tmp_path / "nft.py", tmp_path / "poison", tmp_path / "nft.log"
    script.write_text(FAILING_NFT)
    command = (sys.executable, str(script), topo.node, str(flag), str(log))
    first, second = topo.gateways[0], topo.gateways[1]
    a = rules(topo.rule([first]))
    b = rules(topo.rule([second]), topo.rule([second], port=443))

    agent = dataplane(topo, command)
    agent.apply(a)  # not poisoned yet
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), first)
    table = topo.list_table("ip", TABLE, handles=True)
    foreign = foreign_snapshot(topo)

    flag.touch()
    with pytest.raises(ApplyError):
        agent.apply(b)  # a delta, then the full rebuild it falls back to: both rejected by the kernel
    assert "(poisoned)" in log.read_text()
    assert topo.list_table("ip", TABLE, handles=True) == table  # not a single object changed
    assert dataplane(topo).current() == installed(a)
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), first)
    assert_lands(topo.ask(topo.node, topo.cluster_ip), first)
    with pytest.raises(ApplyError):
        dataplane(topo, command).apply(b)  # a fresh instance: a full replacement, rejected
    with pytest.raises(ApplyError):
        dataplane(topo, command).apply({})  # removing everything, rejected too
    assert topo.list_table("ip", TABLE, handles=True) == table
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), first)

    # A broken nft command (the binary cannot be executed).
    with pytest.raises(ApplyError):
        dataplane(topo, ("ip", "netns", "exec", topo.node, "/nonexistent/nft")).apply(b)
    assert topo.list_table("ip", TABLE, handles=True) == table
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), first)

    # The failing instance recovers once the kernel accepts again: its idea of the state was not corrupted.
    on_first = topo.connect(topo.client.ns, topo.cluster_ip)
    assert_lands(on_first.ask(), first)
    flag.unlink()
    agent.apply(b)
    assert dataplane(topo).current() == installed(b)
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), second)
    assert_lands(on_first.ask(), first)  # a changed target does not move an established connection
    on_first.close()
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip, 443), second)
    assert foreign_snapshot(topo) == foreign


@pytest.mark.timeout(60)
def test_tables_changed_behind_the_agents_back_are_repaired(topo: Topology) -> None:
    """Drift: an element deleted by hand makes the next change fall back to a whole-table rebuild; a table in
    another layout (a rule added by hand) is replaced by a restarted agent and by resync()."""
    first, second = topo.gateways[0], topo.gateways[1]
    a = rules(topo.rule([first]), topo.rule([first], port=443))
    b = rules(topo.rule([second]), topo.rule([second], port=443))
    agent = dataplane(topo)
    agent.apply(a)
    key_443 = next(key for key in a if key.port == 443)
    topo.nft("delete", "element", "ip", TABLE, "redirects", f"{{ {key_443.cluster_ip} . tcp . {key_443.port} }}")
    agent.apply(b)  # its delta deletes the element that is gone: rejected, then rebuilt whole
    assert dataplane(topo).current() == installed(b)
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip, 443), second)

    topo.nft("add", "rule", "ip", TABLE, "prerouting", "counter")  # not Canal's layout any more
    with pytest.raises(ApplyError):
        dataplane(topo).current()
    dataplane(topo).apply(b)  # a restarted agent replaces it whole
    assert dataplane(topo).current() == installed(b)
    topo.nft("add", "rule", "ip", TABLE, "output", "counter")
    agent.resync(b)  # the long-lived one, when it reads the kernel back
    assert dataplane(topo).current() == installed(b)
    assert_lands(topo.ask(topo.node, topo.cluster_ip), second)

    topo.nft("delete", "table", "ip", TABLE)  # the whole table removed by hand
    agent.apply(a)
    assert dataplane(topo).current() == installed(a)
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), first)


# ------------------------------------------------------------------------------------------------ atomicity


def bulk_rules(topo: Topology, name: str) -> Rules:
    """Two large, different rule sets over partly the same keys: A sends to gateway 1, B to the others and more."""
    out: Rules = {}
    if name == "A":
        for i in range(1000):
            out.update([topo.rule(topo.gateways[:1], cluster_ip=f"10.97.{i // 200}.{i % 200 + 1}")])
        out.update([topo.rule(topo.gateways[:1])])
    else:
        for i in range(500, 1800):
            out.update([topo.rule(topo.gateways[1:], cluster_ip=f"10.97.{i // 200}.{i % 200 + 1}")])
        out.update([topo.rule(topo.gateways[1:])])
        if topo.ipv6:
            out.update([topo.rule(topo.gateways, 6)])
    return out


def write_rule_files(topo: Topology, directory: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """A.json and B.json (as `canal render --only redirects --format json` writes them), and what each installs."""
    paths, expected = {}, {}
    for name in ("A", "B"):
        ruleset = bulk_rules(topo, name)
        paths[name] = directory / f"{name}.json"
        paths[name].write_text(to_json(ruleset))
        expected[name] = installed(ruleset)
    assert expected["A"] != expected["B"]
    return paths, expected


def check_exactly_one_of(topo: Topology, expected: dict[str, dict], i: int) -> str:
    now = dataplane(topo).current()  # raises ApplyError when the table is not in Canal's layout (a torn state)
    matches = [name for name, want in expected.items() if now == want]
    if not matches:
        differ = {name: len(set((now or {}).items()) ^ set(want.items())) for name, want in expected.items()}
        raise AssertionError(f"kill {i}: the kernel holds neither A nor B ({len(now or {})} rules; differ: {differ})")
    return matches[0]


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (any of its threads)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def running_transaction(pid: int) -> int | None:
    """The pid of an `nft -f` child of ``pid`` (a transaction being sent), if one runs now."""
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if args and Path(args[0].decode()).name == "nft" and b"-f" in args:
                return child
    return None


def wait_for_transaction(process: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """Poll (1 ms) until ``process`` runs an `nft -f`; None if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child = running_transaction(process.pid)
        if child is not None:
            return child
        if process.poll() is not None:
            return None
        time.sleep(0.001)
    raise AssertionError(f"no nft transaction within {timeout}s")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its nft too): it was started in a session of its own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def transaction_seconds(process: subprocess.Popen) -> float:
    """How long the (unkilled) ``process``'s nft transaction ran, observed by polling."""
    child = wait_for_transaction(process)
    started = time.monotonic()
    while child is not None and alive(child):
        time.sleep(0.001)
    return time.monotonic() - started


def kill_somewhere(process: subprocess.Popen, rng: random.Random, i: int, whole: float, nft: float) -> bool:
    """SIGKILL ``process`` (and its nft) at a random point: every third time anywhere in a run of ``whole`` seconds,
    otherwise while its nft transaction runs (``nft`` seconds long). True when an nft transaction was still
    running just before the kill."""
    try:
        if i % 3 == 0:
            time.sleep(rng.uniform(0, whole))
            child = running_transaction(process.pid)
        else:
            child = wait_for_transaction(process)
            if child is not None:
                time.sleep(rng.uniform(0, nft))
        return child is not None and alive(child)
    finally:
        kill_group(process)


LOOPING_AGENT = textwrap.dedent(
    """
    import json, sys
    from canal.nodeagent.nftables import NftablesDataplane
    from canal.nodeagent.rules import from_json
    a, b = (from_json(open(path).read(), path) for path in sys.argv[1:3])
    agent = NftablesDataplane(table=sys.argv[3], command=json.loads(sys.argv[4]))
    print("ready", flush=True)
    while True:
        agent.apply(a)
        agent.apply(b)
    """
)


@pytest.mark.timeout(180)
def test_a_dataplane_killed_mid_apply_leaves_exactly_a_or_b(topo: Topology, tmp_path: Path) -> None:
    """A process alternating between rule sets A and B through NftablesDataplane, SIGKILLed with its nft at random
    points (many of them while a transaction is being sent): every time, the kernel holds exactly A or exactly B,
    in the layout a restarted agent reads back."""
    paths, expected = write_rule_files(topo, tmp_path)
    dataplane(topo).apply(bulk_rules(topo, "A"))
    args = [str(paths["A"]), str(paths["B"]), TABLE, json.dumps(topo.nft_command)]

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", LOOPING_AGENT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            kill_group(process)
            raise AssertionError("the looping agent did not start")
        return process

    calibrating = start()
    try:
        nft = transaction_seconds(calibrating)
    finally:
        kill_group(calibrating)
    rng = random.Random(os.getpid())
    seen: Counter[str] = Counter()
    mid_transaction = 0
    for i in range(30):
        process = start()
        mid_transaction += kill_somewhere(process, rng, i, 0.5, nft * 1.5)
        seen[check_exactly_one_of(topo, expected, i)] += 1
    assert mid_transaction > 0, "no kill landed while a transaction was running"
    assert set(seen) == {"A", "B"}, f"the kills never landed between the two states: {seen}"
    # The state left is usable: a fresh agent converges from it.
    dataplane(topo).apply(bulk_rules(topo, "A"))
    assert dataplane(topo).current() == expected["A"]
    assert_lands(topo.ask(topo.client.ns, topo.cluster_ip), topo.gateways[0])


def node_agent_cli() -> str | None:
    """Why `canal node-agent --rules-file` cannot be used, or None."""
    if not CANAL.exists():
        return f"no {CANAL}"
    result = subprocess.run(
        [str(CANAL), "node-agent", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0 or "--rules-file" not in result.stdout:
        return f"`canal node-agent --help` does not offer --rules-file: {result.stderr.strip()[:300]}"
    return None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nft_binary", [True, False], ids=["nft-binary", "libnftables"])
def test_the_cli_killed_mid_apply_leaves_exactly_a_or_b(topo: Topology, tmp_path: Path, nft_binary: bool) -> None:
    """`canal node-agent --rules-file F --once` under `ip netns exec <node>`, rule files A and B alternating, the
    agent SIGKILLed (with its nft) at random points; after each kill the kernel holds exactly A's or B's rules.
    With libnftables the transaction runs inside the agent, so kills are spread over the whole run instead."""
    problem = node_agent_cli()
    assert problem is None, problem
    paths, expected = write_rule_files(topo, tmp_path)
    binary = ["--nft-binary"] if nft_binary else []

    def run(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*topo.exec_prefix(), str(CANAL), "node-agent", "--rules-file", str(paths[name]), "--once", *binary],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=tmp_path,
        )

    # Unkilled runs first: the CLI installs each file; how long a run and its transaction take.
    durations, transactions = [], []
    for name in ("A", "B", "A"):
        started = time.monotonic()
        process = run(name)
        try:
            transactions.append(transaction_seconds(process) if nft_binary else 0.0)
            out, err = process.communicate(timeout=60)
        finally:
            kill_group(process)
        durations.append(time.monotonic() - started)
        assert process.returncode == 0, err.decode()
        assert dataplane(topo).current() == expected[name], out.decode()

    rng = random.Random(os.getpid())
    seen: Counter[str] = Counter()
    mid_transaction = 0
    for i in range(30):
        process = run("B" if i % 2 == 0 else "A")
        if nft_binary:
            mid_transaction += kill_somewhere(process, rng, i, max(durations) * 1.2, max(transactions) * 1.5)
        else:
            # the run's second half is where the agent reads, renders and commits: aim there half of the time
            time.sleep(rng.uniform(0, max(durations)) if i % 2 else rng.uniform(0.5, 1.1) * max(durations))
            kill_group(process)
        seen[check_exactly_one_of(topo, expected, i)] += 1
    if nft_binary:
        assert mid_transaction > 0, "no kill landed while a transaction was running"
    assert len(seen) == 2, f"the kills never straddled a commit (outcomes: {dict(seen)})"
    # Unkilled again: the CLI converges from whatever the kills left.
    process = run("B")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert dataplane(topo).current() == expected["B"]
    assert any(lands_on(topo.ask(topo.client.ns, topo.cluster_ip), g) for g in topo.gateways[1:])


@pytest.mark.timeout(120)
def test_the_cli_applies_a_rules_file_a_rerun_changes_nothing_and_cleanup_removes_it(
    topo: Topology, tmp_path: Path
) -> None:
    problem = node_agent_cli()
    assert problem is None, problem
    ruleset = rules(*(topo.rule(topo.gateways[1:], family) for family in families(topo)))
    path = tmp_path / "rules.json"
    path.write_text(to_json(ruleset))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*topo.exec_prefix(), str(CANAL), "node-agent", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )

    old_path = topo.connect(topo.client.ns, topo.cluster_ip)
    assert_lands(old_path.ask(), topo.old_backend)
    done = cli("--rules-file", str(path), "--once")
    assert done.returncode == 0, done.stderr
    assert dataplane(topo).current() == installed(ruleset)
    new_path = topo.connect(topo.client.ns, topo.cluster_ip)
    landed = new_path.ask()
    assert any(lands_on(landed, g) for g in topo.gateways[1:]), landed
    tables = topo.nft("-a", "list", "ruleset").stdout

    with NftMonitor(topo) as monitor:
        again, events = monitor.between_marks(lambda: cli("--rules-file", str(path), "--once"))
    assert again.returncode == 0, again.stderr
    assert events == [], f"re-running the agent changed the ruleset: {events}"
    assert topo.nft("-a", "list", "ruleset").stdout == tables
    assert_lands(old_path.ask(), topo.old_backend)
    assert new_path.ask().name == landed.name

    done = cli("--cleanup")
    assert done.returncode == 0, done.stderr
    assert canal_tables(topo) == []
    for family in families(topo):
        assert_lands(topo.ask(topo.client.ns, topo.cluster(family)), topo.old_backend, family)
    assert new_path.ask().name == landed.name  # still established
    old_path.close()
    new_path.close()
