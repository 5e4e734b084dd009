"""The IPVS backend (node-agent/ipvs.py).

On this host, which has no IPVS: the clear UnsupportedError, the pure plan (diff, ordering, draining, rollback)
and the nft text against the real nft in a network namespace. Then the real thing in a qemu VM booting Debian's
cloud kernel (tests/vm.py): ``test_in_vm[vm_...]`` boots it once for the module and runs the ``vm_*`` functions
below inside it with pytest; each host test reports one of them. Inside, the VM is a node of a kube-proxy-IPVS
cluster in miniature: ClusterIPs on the dummy kube-ipvs0, kube-proxy's address services to an "old backend", its
KUBE-MARK-MASQ/KUBE-MARK-DROP marks and masquerade emulated in an nft table, a pod and the gateway stand-ins in
network namespaces behind veths (each stand-in answers with its own address and the peer it sees).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from canal.nodeagent.dataplane import ApplyError, UnsupportedError
from canal.nodeagent.ipvs import (
    Config,
    Dest,
    IpvsDataplane,
    MarkRange,
    Observed,
    Op,
    PlanError,
    VirtualService,
    assign_marks,
    cleanup_plan,
    fingerprint,
    parse_table,
    plan,
    render_delta,
    render_table,
)
from canal.nodeagent.rules import collect, make_rule, to_json

from canal.desired import Backend, RedirectKey

IN_VM = os.environ.get("CANAL_IN_VM") == "1"
ROOT = Path(__file__).resolve().parent.parent


def rule(vip: str, *backends: str | tuple[str, int], port: int = 80):
    pairs = [(b, port) if isinstance(b, str) else b for b in backends]
    return make_rule(vip, "tcp", port, pairs, f"ns/{vip}", "ns/gw", "ipvs", "test")


def rules(*items):
    return collect(items)


def key(vip: str, port: int = 80) -> RedirectKey:
    return RedirectKey(vip, "tcp", port)


def applied(desired) -> Observed:
    """The Observed state after ``plan`` ran to completion from nothing (what the kernel would read back)."""
    todo = plan(desired, Observed(), Config())
    services: dict[int, VirtualService] = {}
    for step in todo.steps:
        op = step.do
        if op.action == "add-service":
            services[op.mark] = VirtualService(op.mark, op.family, op.scheduler)
        elif op.action == "add-dest":
            service = services[op.mark]
            assert op.dest is not None
            services[op.mark] = VirtualService(op.mark, op.family, service.scheduler, (*service.dests, op.dest))
    return Observed(services, _marks_of(todo), "ours")


def _marks_of(todo) -> dict[RedirectKey, int]:
    text = next(s.do.text for s in todo.steps if s.do.action == "nft")
    out = {}
    for address, port, mark in re.findall(r"([0-9a-f.:]+) \. tcp \. (\d+) : (0x[0-9a-f]+)", text):
        out[key(address, int(port))] = int(mark, 16)
    return out


def actions(todo) -> list[str]:
    return [s.do.describe() for s in todo.steps]


# ============================================================================================ on this host


def host_has_ipvs() -> bool:
    from pyroute2 import IPVS

    try:
        IPVS().close()
    except Exception:
        return False
    return True


@pytest.mark.skipif(IN_VM, reason="host test")
def test_missing_ipvs_is_a_clear_unsupported_error():
    if host_has_ipvs():
        pytest.skip("this machine's kernel has IPVS")
    dataplane = IpvsDataplane()
    message = (
        "IPVS is not available in this kernel (netlink family IPVS not found: load the ip_vs and ip_vs_rr modules, "
        "or use --backend nftables)"
    )
    for call in (dataplane.current, lambda: dataplane.apply(rules(rule("10.96.0.10", "10.2.0.2")))):
        with pytest.raises(UnsupportedError) as error:
            call()
        assert str(error.value) == message
    with pytest.raises(UnsupportedError, match="ip_vs_wrr"):
        IpvsDataplane(scheduler="wrr").current()


def test_mark_range_default_leaves_kube_proxy_bits_alone():
    marks = MarkRange()
    assert (marks.base, marks.mask, marks.capacity) == (0x1000, 0xFFFFF000, 4095)
    all_marks = list(marks.marks())
    assert all_marks[0] == 0x1001 and all_marks[-1] == 0x1FFF and len(set(all_marks)) == 4095
    assert not any(m & 0xC000 for m in all_marks)
    assert 0x1000 not in marks and 0x2001 not in marks and 0x5001 not in marks and 0x1001 in marks


def test_mark_range_is_configurable_and_validated():
    # Calico's default mark bits are 0xffff0000; a range inside the low bits with a non-contiguous free field.
    odd = MarkRange(0x00000100, 0xFFFFFF0F)
    assert [hex(m) for m in list(odd.marks())[:3]] == ["0x110", "0x120", "0x130"]
    assert MarkRange(0x00010000, 0xFFFFC0FF).nth(1) == 0x10100
    for base, mask in ((0x4000, 0xFFFFF000), (0x1000, 0xFFFF0FFF), (0x1001, 0xFFFFF000), (0x1000, 0xFFFFFFFF)):
        with pytest.raises(ValueError):
            MarkRange(base, mask)
    with pytest.raises(ValueError, match="0x4000"):
        IpvsDataplane(mark_base=0x0, mark_mask=0xFFFF0000)
    with pytest.raises(ValueError, match="identifier"):
        IpvsDataplane(table='x"; flush ruleset; "')


def test_first_apply_one_service_per_backend_set_then_the_marks():
    desired = rules(
        rule("10.96.0.10", "10.2.0.2", "10.2.0.3"),
        rule("10.96.0.11", "10.2.0.3", "10.2.0.2"),  # the same set: the same service
        rule("10.96.0.12", ("10.2.0.2", 8080)),
        rule("fd00:96::10", "fd00:2::2"),
    )
    todo = plan(desired, Observed(), Config())
    assert actions(todo) == [
        "add-service fwmark 0x1001 (IPv4)",
        "add-dest fwmark 0x1001 (IPv4) real server 10.2.0.2:80 weight 1",
        "add-dest fwmark 0x1001 (IPv4) real server 10.2.0.3:80 weight 1",
        "add-service fwmark 0x1002 (IPv4)",
        "add-dest fwmark 0x1002 (IPv4) real server 10.2.0.2:8080 weight 1",
        "add-service fwmark 0x1003 (IPv6)",
        "add-dest fwmark 0x1003 (IPv6) real server [fd00:2::2]:80 weight 1",
        "nft transaction",  # the marks last: every mark leads to a complete service
    ]
    assert all(s.do.dest is None or s.do.dest.fwd_method == 0 for s in todo.steps)  # masq, not direct routing
    assert _marks_of(todo) == {
        key("10.96.0.10"): 0x1001,
        key("10.96.0.11"): 0x1001,
        key("10.96.0.12"): 0x1002,
        key("fd00:96::10"): 0x1003,
    }
    assert (todo.result().mode, todo.result().added) == ("full", 4)
    nft = todo.steps[-1].do.text
    assert nft.startswith("add table inet canal-ipvs\ndelete table inet canal-ipvs\ntable inet canal-ipvs {")
    assert "type filter hook input priority 90" in nft and "type filter hook output priority -99" in nft
    assert "meta mark & 0xfffff000 == 0x00001000 fib saddr type local masquerade" in nft
    assert [u.action for u in todo.steps[0].undo] == ["del-service"]  # undoing it removes its dests too


def test_same_rules_again_change_nothing():
    desired = rules(rule("10.96.0.10", "10.2.0.2"), rule("fd00:96::10", "fd00:2::2"))
    todo = plan(desired, applied(desired), Config())
    assert todo.steps == () and todo.result().mode == "none"


def test_diff_update_only_touches_what_changed():
    before = rules(
        rule("10.96.0.10", "10.2.0.2"),
        rule("10.96.0.11", "10.2.0.2"),
        rule("10.96.0.12", ("10.2.0.3", 8080)),
        rule("10.96.0.13", "10.2.0.9"),
    )
    observed = applied(before)
    assert {s.mark: s.active for s in observed.services.values()} == {
        0x1001: (Backend("10.2.0.2", 80),),
        0x1002: (Backend("10.2.0.3", 8080),),
        0x1003: (Backend("10.2.0.9", 80),),
    }
    after = rules(
        rule("10.96.0.10", "10.2.0.2", "10.2.0.4"),  # the gateway scaled out: 0x1001 updated in place
        rule("10.96.0.11", "10.2.0.2", "10.2.0.4"),
        rule("10.96.0.12", ("10.2.0.3", 8080)),  # untouched
        rule("10.96.0.14", ("10.2.0.3", 8080)),  # new, on an existing set: only a map element
    )  # 10.96.0.13 removed: its service goes, after its mark
    todo = plan(after, observed, Config())
    assert actions(todo) == [
        "add-dest fwmark 0x1001 (IPv4) real server 10.2.0.4:80 weight 1",
        "nft transaction",
        "del-service fwmark 0x1003 (IPv4)",
    ]
    assert todo.steps[1].do.text == (
        "delete element inet canal-ipvs marks4 { 10.96.0.13 . tcp . 80 }\n"
        "add element inet canal-ipvs marks4 { 10.96.0.14 . tcp . 80 : 0x00001002 }\n"
    )
    assert todo.steps[1].undo[0].text == (
        "delete element inet canal-ipvs marks4 { 10.96.0.14 . tcp . 80 }\n"
        "add element inet canal-ipvs marks4 { 10.96.0.13 . tcp . 80 : 0x00001003 }\n"
    )
    result = todo.result()
    assert (result.mode, result.added, result.removed, result.changed) == ("delta", 1, 1, 2)


def test_a_rollout_replaces_real_servers_in_place_make_before_break():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2", "10.2.0.3"), rule("10.96.0.11", "10.2.0.2", "10.2.0.3")))
    todo = plan(
        rules(rule("10.96.0.10", "10.2.0.3", "10.2.0.5"), rule("10.96.0.11", "10.2.0.3", "10.2.0.5")),
        observed,
        Config(),
    )
    assert actions(todo) == [
        "add-dest fwmark 0x1001 (IPv4) real server 10.2.0.5:80 weight 1",
        "del-dest fwmark 0x1001 (IPv4) real server 10.2.0.2:80 weight 1",
    ]


def test_a_rule_moving_to_another_set_gets_a_new_mark_and_the_old_one_stays():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2"), rule("10.96.0.11", "10.2.0.2")))
    todo = plan(rules(rule("10.96.0.10", "10.2.0.2"), rule("10.96.0.11", "10.2.0.7")), observed, Config())
    assert actions(todo) == [
        "add-service fwmark 0x1002 (IPv4)",
        "add-dest fwmark 0x1002 (IPv4) real server 10.2.0.7:80 weight 1",
        "nft transaction",
    ]
    assert "10.96.0.11 . tcp . 80 : 0x00001002" in todo.steps[-1].do.text


def test_a_shared_service_is_not_changed_in_place_under_other_rules():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2"), rule("10.96.0.11", "10.2.0.2")))
    todo = plan(rules(rule("10.96.0.10", "10.2.0.5"), rule("10.96.0.11", "10.2.0.6")), observed, Config())
    # Adding 10.2.0.5 to 0x1001 would send 10.96.0.11's new connections there until the marks switch.
    assert actions(todo) == [
        "add-service fwmark 0x1002 (IPv4)",
        "add-dest fwmark 0x1002 (IPv4) real server 10.2.0.5:80 weight 1",
        "add-service fwmark 0x1003 (IPv4)",
        "add-dest fwmark 0x1003 (IPv4) real server 10.2.0.6:80 weight 1",
        "nft transaction",
        "del-service fwmark 0x1001 (IPv4)",
    ]


def test_real_servers_with_connections_are_drained_not_deleted():
    service = VirtualService(0x1001, 4, "rr", (Dest("10.2.0.2", 80, connections=3), Dest("10.2.0.3", 80)))
    gone = VirtualService(0x1002, 4, "rr", (Dest("10.2.0.9", 80, connections=1),))
    observed = Observed({0x1001: service, 0x1002: gone}, {key("10.96.0.10"): 0x1001, key("10.96.0.13"): 0x1002}, "ours")
    todo = plan(rules(rule("10.96.0.10", "10.2.0.3")), observed, Config())
    assert actions(todo) == [
        "nft transaction",
        "set-dest fwmark 0x1001 (IPv4) real server 10.2.0.2:80 weight 0",  # no new connections; old ones live
        "set-dest fwmark 0x1002 (IPv4) real server 10.2.0.9:80 weight 0",  # the whole service drains
    ]
    # Once idle, the next apply deletes them; until then they are not "installed".
    drained = Observed(
        {
            0x1001: VirtualService(0x1001, 4, "rr", (Dest("10.2.0.2", 80, 0), Dest("10.2.0.3", 80))),
            0x1002: VirtualService(0x1002, 4, "rr", (Dest("10.2.0.9", 80, 0),)),
        },
        {key("10.96.0.10"): 0x1001},
        "ours",
    )
    assert drained.installed() == {key("10.96.0.10"): (Backend("10.2.0.3", 80),)}
    assert actions(plan(rules(rule("10.96.0.10", "10.2.0.3")), drained, Config())) == [
        "del-dest fwmark 0x1001 (IPv4) real server 10.2.0.2:80 weight 0",
        "del-service fwmark 0x1002 (IPv4)",
    ]
    # A rule coming back to a draining set takes its service back.
    back = plan(rules(rule("10.96.0.10", "10.2.0.3"), rule("10.96.0.13", "10.2.0.9")), drained, Config())
    assert actions(back)[:1] == ["set-dest fwmark 0x1002 (IPv4) real server 10.2.0.9:80 weight 1"]
    assert "10.96.0.13 . tcp . 80 : 0x00001002" in back.steps[1].do.text


def test_a_new_mark_never_reuses_one_in_use():
    observed = Observed(
        {0x1001: VirtualService(0x1001, 4, "rr", (Dest("10.2.0.9", 80, 0, connections=1),))},
        {key("10.96.0.20"): 0x1002},  # a map element whose service is gone (read back as is)
        "other",
    )
    todo = plan(rules(rule("10.96.0.10", "10.2.0.2")), observed, Config())
    assert actions(todo)[0] == "add-service fwmark 0x1003 (IPv4)"
    assert todo.nft == "full"  # a table of another shape is rewritten whole


def test_more_backend_sets_than_marks_is_an_error_before_any_change():
    small = Config(marks=MarkRange(0x1000, 0xFFFFFFFC))  # 3 marks
    desired = rules(*(rule(f"10.96.0.{i}", f"10.2.0.{i}") for i in range(1, 5)))
    with pytest.raises(PlanError, match="4 backend sets need more IPVS services than the mark range"):
        plan(desired, Observed(), small)
    groups = {(4, (Backend(f"10.2.0.{i}", 80),)): [key(f"10.96.0.{i}")] for i in range(1, 4)}
    assert sorted(assign_marks(groups, Observed(), small.marks).values()) == [0x1001, 0x1002, 0x1003]


def test_scheduler_change_is_a_set_not_an_update():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2")))
    todo = plan(rules(rule("10.96.0.10", "10.2.0.2")), observed, Config(scheduler="lc"))
    assert [(s.do.action, s.do.scheduler, s.undo[0].scheduler) for s in todo.steps] == [("set-service", "lc", "rr")]


def test_cleanup_plan_removes_the_marks_first_then_every_service():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2"), rule("fd00:96::10", "fd00:2::2")))
    todo = cleanup_plan(observed, Config())
    assert actions(todo) == ["nft transaction", "del-service fwmark 0x1001 (IPv4)", "del-service fwmark 0x1002 (IPv6)"]
    assert todo.steps[0].do.text == "delete table inet canal-ipvs\n"
    assert [op.action for op in todo.steps[1].undo] == ["add-service", "add-dest"]
    assert cleanup_plan(Observed(), Config()).steps == ()
    # Removing every rule by apply goes the same way (the table goes with the last rule).
    assert actions(plan({}, observed, Config())) == actions(todo)


def test_rules_the_backend_cannot_install_are_refused():
    bad = rules(rule("10.96.0.10", "10.2.0.2"))
    k = key("10.96.0.10")
    odd = {RedirectKey("10.96.0.10", "icmp", 80): bad[k]}
    with pytest.raises(PlanError, match="protocol not supported"):
        plan(odd, Observed(), Config())


class Scripted(IpvsDataplane):
    """The shell with the kernel replaced by a list: what it ran, failing at the n-th operation."""

    def __init__(self, observed: Observed, fail_at: int | None = None) -> None:
        super().__init__()
        self.observed, self.fail_at, self.ran = observed, fail_at, []

    @contextlib.contextmanager
    def _ipvs(self) -> Iterator[Any]:
        yield None

    def _observe(self, ipvs: Any) -> Observed:
        return self.observed

    def _ensure_conntrack(self) -> None:
        pass

    def _run(self, ipvs: Any, op: Op) -> None:
        if len(self.ran) == self.fail_at:
            self.ran.append("FAIL " + op.describe())
            raise ApplyError(f"IPVS {op.describe()}: No such file or directory")
        self.ran.append(op.describe() if op.action != "nft" else "nft " + op.text.splitlines()[0])


def test_a_failed_step_undoes_the_earlier_ones_in_reverse():
    observed = applied(rules(rule("10.96.0.10", "10.2.0.2")))
    dataplane = Scripted(observed, fail_at=3)
    with pytest.raises(ApplyError, match=r"10\.2\.0\.8:80 .*\(3 earlier changes undone, the previous state is back\)"):
        dataplane.apply(rules(rule("10.96.0.10", "10.2.0.2", "10.2.0.3"), rule("10.96.0.11", "10.2.0.7", "10.2.0.8")))
    assert dataplane.ran == [
        "add-dest fwmark 0x1001 (IPv4) real server 10.2.0.3:80 weight 1",  # make: the in-place update first
        "add-service fwmark 0x1002 (IPv4)",
        "add-dest fwmark 0x1002 (IPv4) real server 10.2.0.7:80 weight 1",
        "FAIL add-dest fwmark 0x1002 (IPv4) real server 10.2.0.8:80 weight 1",
        "del-service fwmark 0x1002 (IPv4)",  # undo, newest first
        "del-dest fwmark 0x1001 (IPv4) real server 10.2.0.3:80 weight 1",
    ]


# -------------------------------------------------------------------------------- nft, for real (netns)


NETNS = f"canal-ipvs-test-{os.getpid()}"


def nft_in_netns(*args: str, text: str | None = None) -> subprocess.CompletedProcess:
    command = ["ip", "netns", "exec", NETNS, "nft", *args]
    return subprocess.run(command, input=text, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def nft_netns():
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        pytest.skip("needs root, nft and ip (Debian nftables, iproute2; scripts/test installs them)")
    subprocess.run(["ip", "netns", "add", NETNS], check=True, timeout=30)
    try:
        yield nft_in_netns
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, timeout=30)


@pytest.mark.skipif(IN_VM, reason="host test")
def test_the_table_text_round_trips_through_the_real_nft(nft_netns):
    config = Config()
    marks = {key("10.96.0.10"): 0x1001, key("10.96.0.11", 443): 0x1002, key("fd00:96::10"): 0x1003}
    done = nft_netns("-f", "-", text=render_table(config, marks))
    assert done.returncode == 0, done.stderr
    listed = nft_netns("-j", "list", "table", "inet", "canal-ipvs")
    assert parse_table(listed.stdout, config) == (marks, "ours")
    assert parse_table(listed.stdout, Config(masquerade_local=False))[1] == "other"
    assert parse_table(listed.stdout, Config(marks=MarkRange(0x10000, 0xFFFFF000)))[1] == "other"
    # Elements with marks outside the range are not Canal's (read back as absent, so never "removed").
    done = nft_netns("add", "element", "inet", "canal-ipvs", "marks4", "{ 10.96.0.99 . tcp . 80 : 0x2001 }")
    assert done.returncode == 0, done.stderr
    assert parse_table(nft_netns("-j", "list", "table", "inet", "canal-ipvs").stdout, config) == (marks, "ours")
    # A delta that changes a value, adds and removes, in one transaction.
    new = {key("10.96.0.10"): 0x1004, key("10.96.0.12"): 0x1001, key("fd00:96::10"): 0x1003}
    done = nft_netns("-f", "-", text=render_delta(config, marks, new))
    assert done.returncode == 0, done.stderr
    listed = nft_netns("-j", "list", "table", "inet", "canal-ipvs")
    assert parse_table(listed.stdout, config) == (new, "ours")
    # Someone edits the table: its shape is no longer ours, and apply would rewrite it whole.
    nft_netns("add", "rule", "inet", "canal-ipvs", "input", "counter")
    assert parse_table(nft_netns("-j", "list", "table", "inet", "canal-ipvs").stdout, config)[1] == "other"
    assert fingerprint(config) == fingerprint(Config(scheduler="lc"))  # the scheduler is not in the table
    assert fingerprint(config) != fingerprint(Config(masquerade_local=False))


# ============================================================================================ in the VM
#
# These run inside the VM (pytest -o python_functions='vm_*'); on the host, test_in_vm reports each of them.

VIP1, VIP2, VIP3, VIP4, VIP6 = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "fd00:96::10"
OLD, OLD6 = "10.1.0.2", "fd00:1::2"  # kube-proxy's endpoints of every VIP ("the old backend")
GW1, GW2, GW3, GW6 = "10.2.0.2", "10.2.0.3", "10.2.0.4", "fd00:2::2"  # gateway stand-ins
POD, POD6 = "10.0.0.2", "fd00:10::2"
NODE, NODE6 = "10.255.0.1", "fd00:ff::1"  # the node's address towards the backends: what masquerade shows
LISTEN = [(a, p) for a in (OLD, GW1, GW2, GW3) for p in (80, 8080)] + [(OLD6, 80), (GW6, 80)]

LAB = {  # ip -batch input per network namespace (None: the node)
    None: f"""
link add kube-ipvs0 type dummy
link set kube-ipvs0 up
address add {VIP1}/32 dev kube-ipvs0
address add {VIP2}/32 dev kube-ipvs0
address add {VIP3}/32 dev kube-ipvs0
address add {VIP4}/32 dev kube-ipvs0
address add {VIP6}/128 dev kube-ipvs0 nodad
netns add pod
netns add backends
link add pod0 type veth peer name eth0 netns pod
link add be0 type veth peer name eth0 netns backends
address add 10.0.0.1/24 dev pod0
address add fd00:10::1/64 dev pod0 nodad
link set pod0 up
address add {NODE}/24 dev be0
address add {NODE6}/64 dev be0 nodad
link set be0 up
route add 10.1.0.0/16 via 10.255.0.2
route add 10.2.0.0/16 via 10.255.0.2
route add fd00:1::/64 via fd00:ff::2
route add fd00:2::/64 via fd00:ff::2
""",
    "pod": f"""
link set lo up
link set eth0 up
address add {POD}/24 dev eth0
address add {POD6}/64 dev eth0 nodad
route add default via 10.0.0.1
route add default via fd00:10::1
""",
    "backends": f"""
link set lo up
link set eth0 up
address add 10.255.0.2/24 dev eth0
address add fd00:ff::2/64 dev eth0 nodad
address add {OLD}/32 dev eth0
address add {GW1}/32 dev eth0
address add {GW2}/32 dev eth0
address add {GW3}/32 dev eth0
address add {OLD6}/128 dev eth0 nodad
address add {GW6}/128 dev eth0 nodad
route add default via 10.255.0.1
route add default via fd00:ff::1
""",
}

# kube-proxy's iptables side in IPVS mode, in nft: KUBE-MARK-MASQ for sources outside the cluster CIDR (here the
# pod network 10.0.0.0/24), masquerade by 0x4000, drop by 0x8000.
KUBE_PROXY = """
table inet kube-proxy-sim {
    chain nat-prerouting {
        type nat hook prerouting priority -100; policy accept;
        ip daddr 10.96.0.0/16 ip saddr != 10.0.0.0/24 meta mark set mark or 0x4000
        ip6 daddr fd00:96::/64 ip6 saddr != fd00:10::/64 meta mark set mark or 0x4000
    }
    chain nat-output {
        type nat hook output priority -100; policy accept;
        ip daddr 10.96.0.0/16 ip saddr != 10.0.0.0/24 meta mark set mark or 0x4000
        ip6 daddr fd00:96::/64 ip6 saddr != fd00:10::/64 meta mark set mark or 0x4000
    }
    chain nat-postrouting {
        type nat hook postrouting priority 100; policy accept;
        meta mark & 0x4000 == 0x4000 masquerade
    }
    chain filter-input {
        type filter hook input priority 0; policy accept;
        meta mark & 0x8000 == 0x8000 drop
    }
    chain filter-output {
        type filter hook output priority 0; policy accept;
        meta mark & 0x8000 == 0x8000 drop
    }
}
"""

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str | None, make: Callable[[], Any]) -> Any:
    """``make()`` run by a thread switched into network namespace ``name``: sockets it creates live there."""
    if name is None:
        return make()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            with open(f"/run/netns/{name}") as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            box["value"] = make()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def serve(listener: socket.socket, name: str) -> None:
    """A gateway stand-in: says who it is and who it sees, then echoes until the peer closes."""

    def handle(conn: socket.socket, peer: str) -> None:
        with conn:
            conn.sendall(f"{name} {peer}\n".encode())
            while data := conn.recv(1024):
                conn.sendall(data)

    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn, peer[0]), daemon=True).start()


def host(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def connect(vip: str, port: int = 80, netns: str | None = None) -> tuple[socket.socket, str, str]:
    """A new connection to vip:port from a pod (netns "pod") or the node (None): (socket, server, peer it saw)."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    sock = in_netns(netns, lambda: socket.socket(family, socket.SOCK_STREAM))
    sock.settimeout(5)
    sock.connect((vip, port))
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        line += chunk
    server, _, peer = line.decode().strip().partition(" ")
    return sock, server, peer


def ask(vip: str, port: int = 80, netns: str | None = "pod") -> tuple[str, str]:
    sock, server, peer = connect(vip, port, netns)
    sock.close()
    return server, peer


def sh(command: str, text: str | None = None) -> str:
    done = subprocess.run(command, shell=True, input=text, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def ipvs_services() -> list[tuple[Any, ...]]:
    """Every IPVS service with its real servers, as comparable tuples (fwmark, address, port, dests)."""
    from pyroute2 import IPVS, IPVSService

    out = []
    with contextlib.closing(IPVS()) as ipvs:
        for message in ipvs.service("dump"):
            svc = dict(message.get("IPVS_CMD_ATTR_SERVICE")["attrs"])
            ident = {"af": svc["IPVS_SVC_ATTR_AF"]}
            if "IPVS_SVC_ATTR_FWMARK" in svc:
                ident["fwmark"] = svc["IPVS_SVC_ATTR_FWMARK"]
            else:
                ident.update(
                    addr=svc["IPVS_SVC_ATTR_ADDR"],
                    port=svc["IPVS_SVC_ATTR_PORT"],
                    protocol=svc["IPVS_SVC_ATTR_PROTOCOL"],
                )
            dests = []
            for item in ipvs.dest("dump", service=IPVSService(**ident)):
                d = dict(item.get("IPVS_CMD_ATTR_DEST")["attrs"])
                dests.append(tuple(d[f"IPVS_DEST_ATTR_{k}"] for k in ("ADDR", "PORT", "WEIGHT", "FWD_METHOD")))
            out.append((ident.get("fwmark", 0), ident.get("addr", ""), ident.get("port", 0), tuple(sorted(dests))))
    return sorted(out)


def foreign() -> list[tuple[Any, ...]]:
    return [s for s in ipvs_services() if s[0] not in MarkRange()]


@pytest.fixture(scope="module")
def lab():
    """The node: kube-proxy's services and marks, a pod, the backends and their listeners (module-wide)."""
    if not IN_VM:
        pytest.skip("runs inside the VM")
    from pyroute2 import IPVS, IPVSDest, IPVSService

    sh("modprobe -a ip_vs ip_vs_rr dummy veth nf_tables")
    for netns, batch in LAB.items():
        sh("ip -batch -" if netns is None else f"ip -n {netns} -batch -", batch)
    sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.vs.expire_nodest_conn=1")
    sh("nft -f -", KUBE_PROXY)
    listeners = []
    for address, port in LISTEN:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET

        def make(family: int = family, address: str = address, port: int = port) -> socket.socket:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.listen(64)
            return s

        listener = in_netns("backends", make)
        listeners.append(listener)
        threading.Thread(target=serve, args=(listener, host(address, port)), daemon=True).start()
    with contextlib.closing(IPVS()) as ipvs:  # kube-proxy's address services, one old backend each
        for vip, old in ((VIP1, OLD), (VIP2, OLD), (VIP3, OLD), (VIP4, OLD), (VIP6, OLD6)):
            extra = {"af": socket.AF_INET6, "netmask": socket.inet_ntoa((128).to_bytes(4, sys.byteorder))}
            service = IPVSService(
                addr=vip, port=80, protocol=socket.IPPROTO_TCP, sched_name="rr", **(extra if ":" in vip else {})
            )
            ipvs.service("add", service=service)
            ipvs.dest("add", service=service, dest=IPVSDest(addr=old, port=80, fwd_method=0))
        # A foreign fwmark service outside Canal's range (someone else's), which Canal must never touch.
        other = IPVSService(fwmark=0x2001, af=socket.AF_INET, sched_name="rr", netmask="255.255.255.255")
        ipvs.service("add", service=other)
        ipvs.dest("add", service=other, dest=IPVSDest(addr=GW3, port=80, fwd_method=0))
    assert ask(VIP1) == (host(OLD, 80), POD)
    yield
    for listener in listeners:
        listener.close()


@pytest.fixture
def dataplane(lab):
    dataplane = IpvsDataplane()
    dataplane.cleanup()
    yield dataplane
    dataplane.cleanup()


def vm_apply_redirects_new_connections_to_the_gateway(dataplane):
    before = foreign()
    assert dataplane.current() is None
    result = dataplane.apply(rules(rule(VIP1, GW1), rule(VIP2, (GW2, 8080))))
    assert (result.mode, result.added) == ("full", 2)
    assert ask(VIP1) == (host(GW1, 80), POD)  # a pod's source address is kept
    assert ask(VIP2) == (host(GW2, 8080), POD)  # the real server's port, not the ClusterIP's
    assert ask(VIP3) == (host(OLD, 80), POD)  # not migrated: kube-proxy's service as before
    # A node-local client (source: the ClusterIP itself, on kube-ipvs0, and marked 0x4000 by kube-proxy) is
    # redirected too, and masqueraded to the node's address.
    assert ask(VIP1, netns=None) == (host(GW1, 80), NODE)
    assert dataplane.current() == {key(VIP1): (Backend(GW1, 80),), key(VIP2): (Backend(GW2, 8080),)}
    # Masquerade needs IPVS connections to go through conntrack: apply turns vs.conntrack on, as kube-proxy does.
    conntrack = Path("/proc/sys/net/ipv4/vs/conntrack")
    assert conntrack.read_text().strip() == "1"
    conntrack.write_text("0\n")
    assert ask(VIP1, netns=None) == (host(GW1, 80), VIP1)  # not masqueraded: a remote gateway would answer itself
    assert dataplane.apply(rules(rule(VIP1, GW1), rule(VIP2, (GW2, 8080)))).mode == "none"
    assert ask(VIP1, netns=None) == (host(GW1, 80), NODE)
    assert foreign() == before


def vm_diff_update_is_reflected(dataplane):
    before = foreign()
    dataplane.apply(rules(rule(VIP1, GW1), rule(VIP2, (GW2, 8080))))
    marks = dataplane.observe().marks
    result = dataplane.apply(rules(rule(VIP1, GW1, GW3), rule(VIP3, (GW2, 8080))))
    assert (result.mode, result.added, result.removed, result.changed) == ("delta", 1, 1, 1)
    observed = dataplane.observe()
    assert observed.marks == {key(VIP1): marks[key(VIP1)], key(VIP3): marks[key(VIP2)]}  # services kept
    assert {ask(VIP1)[0] for _ in range(4)} == {host(GW1, 80), host(GW3, 80)}  # rr over the new set
    assert ask(VIP3) == (host(GW2, 8080), POD)
    assert ask(VIP2) == (host(OLD, 80), POD)  # removed: back to kube-proxy's service
    assert foreign() == before


def vm_ipv6(dataplane):
    dataplane.apply(rules(rule(VIP6, GW6), rule(VIP1, GW1)))
    assert ask(VIP6) == (host(GW6, 80), POD6)
    assert ask(VIP6, netns=None) == (host(GW6, 80), NODE6)
    assert ask(VIP1) == (host(GW1, 80), POD)
    assert dataplane.current() == {key(VIP1): (Backend(GW1, 80),), key(VIP6): (Backend(GW6, 80),)}
    dataplane.apply(rules(rule(VIP1, GW1)))
    assert ask(VIP6) == (host(OLD6, 80), POD6)


def vm_established_connections_survive_a_removed_rule(dataplane):
    dataplane.apply(rules(rule(VIP1, GW1)))
    sock, server, _ = connect(VIP1, netns="pod")
    with sock:
        assert server == host(GW1, 80)
        dataplane.apply({})  # kube-proxy's expire_nodest_conn=1 is on: deleting the service would cut this
        assert ask(VIP1) == (host(OLD, 80), POD)
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"
        observed = dataplane.observe()
        assert observed.table == "absent" and [s.dests for s in observed.services.values()] == [
            (Dest(GW1, 80, 0, 0, connections=1),)
        ]
        assert dataplane.current() == {}
        # cleanup() deletes at once; with expire_nodest_conn=1 that cuts the connection (why apply drains).
        assert dataplane.cleanup() is True
        sock.settimeout(3)
        with pytest.raises(OSError):
            sock.sendall(b"gone?")
            if not sock.recv(100):
                raise ConnectionResetError("closed")
    assert dataplane.current() is None


def vm_cleanup_removes_only_canals(dataplane):
    before = foreign()
    kube_proxy = sh("nft list table inet kube-proxy-sim")
    dataplane.apply(rules(rule(VIP1, GW1), rule(VIP6, GW6)))
    assert len(ipvs_services()) == len(before) + 2
    assert dataplane.cleanup() is True
    assert foreign() == before and len(ipvs_services()) == len(before)
    assert sh("nft list tables").split("\n").count("table inet canal-ipvs") == 0
    assert sh("nft list table inet kube-proxy-sim") == kube_proxy
    assert ask(VIP1) == (host(OLD, 80), POD)
    assert dataplane.current() is None and dataplane.cleanup() is False


def vm_kube_proxy_sync_cannot_delete_fwmark_services(dataplane):
    # kube-proxy deletes the IPVS services it did not create, but reads a fwmark service as 0.0.0.0:0 and sends
    # an address delete for that (pkg/proxy/ipvs cleanLegacyService, pkg/util/ipvs toVirtualServer).
    from pyroute2 import IPVS, IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    dataplane.apply(rules(rule(VIP1, GW1)))
    with contextlib.closing(IPVS()) as ipvs:
        for protocol in (0, socket.IPPROTO_TCP):
            zero = IPVSService(addr="0.0.0.0", port=0, protocol=protocol)
            with pytest.raises(NetlinkError) as error:
                ipvs.service("del", service=zero)
            assert error.value.code == 3  # ESRCH
    assert ask(VIP1) == (host(GW1, 80), POD)


def vm_a_failed_apply_keeps_the_previous_state(dataplane):
    dataplane.apply(rules(rule(VIP1, GW1), rule(VIP2, GW2)))
    before = (dataplane.observe(), ipvs_services())
    # nft refuses the transaction after the new service and real servers were made: they are undone.
    refusing = IpvsDataplane(
        command=("sh", "-c", 'if [ "$1" = -f ]; then echo refused >&2; exit 1; fi; exec nft "$@"', "nft")
    )
    with pytest.raises(ApplyError, match=r"nft refused the transaction: refused \(3 earlier changes undone, the prev"):
        refusing.apply(rules(rule(VIP1, GW1, GW3), rule(VIP2, GW2), rule(VIP3, (GW3, 8080))))
    assert (dataplane.observe(), ipvs_services()) == before
    # The kernel refuses a scheduler it has no module for.
    with pytest.raises(ApplyError, match="ip_vs_nosuch"):
        IpvsDataplane(scheduler="nosuch").apply(rules(rule(VIP1, GW1), rule(VIP2, GW2), rule(VIP3, GW3)))
    assert (dataplane.observe(), ipvs_services()) == before
    assert ask(VIP1) == (host(GW1, 80), POD) and ask(VIP3) == (host(OLD, 80), POD)


def vm_marking_before_kube_proxy_misses_node_local_clients(dataplane):
    # Why the marks are set at input 90 / output -99: at prerouting/output -150 (before kube-proxy's nat chains),
    # KUBE-MARK-MASQ turns the mark into mark | 0x4000, which no fwmark service has.
    dataplane.apply(rules(rule(VIP1, GW1)))
    early = dataplane.observe()
    text = render_table(Config(), early.marks)
    text = text.replace("hook input priority 90", "hook prerouting priority -150")
    text = text.replace("type filter hook output priority -99", "type route hook output priority -150")
    sh("nft -f -", text)
    assert ask(VIP1) == (host(GW1, 80), POD)  # pods are not marked by kube-proxy here: still redirected
    assert ask(VIP1, netns=None)[0] == host(OLD, 80)  # but the node's own clients are not
    dataplane.apply(rules(rule(VIP1, GW1)))  # the table is not ours any more: rewritten whole
    assert dataplane.observe().table == "ours"
    assert ask(VIP1, netns=None) == (host(GW1, 80), NODE)


def vm_update_changes_on_top_of_what_the_kernel_holds(dataplane):
    # The agent's xDS path: a restarted agent's first update builds on the kernel's rules (read back).
    dataplane.apply(rules(rule(VIP1, GW1), rule(VIP2, GW2)))
    restarted = IpvsDataplane()
    result = restarted.update({key(VIP2): None, key(VIP4): rule(VIP4, GW2)})
    assert (result.added, result.removed) == (1, 1)
    assert restarted.current() == {key(VIP1): (Backend(GW1, 80),), key(VIP4): (Backend(GW2, 80),)}
    assert ask(VIP1) == (host(GW1, 80), POD) and ask(VIP4) == (host(GW2, 80), POD)
    assert ask(VIP2) == (host(OLD, 80), POD)  # back to kube-proxy's service


def vm_the_cli_applies_a_rules_file_and_cleans_up(dataplane, tmp_path):
    canal = str(Path(sys.executable).with_name("canal"))
    path = tmp_path / "rules.json"
    path.write_text(to_json(rules(rule(VIP1, GW1), rule(VIP2, (GW2, 8080)))))
    done = subprocess.run(
        [canal, "node-agent", "--backend", "ipvs", "--rules-file", str(path), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ask(VIP1) == (host(GW1, 80), POD) and ask(VIP2) == (host(GW2, 8080), POD)
    done = subprocess.run(
        [canal, "node-agent", "--backend", "ipvs", "--cleanup"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "removed" in done.stdout, done.stderr
    assert dataplane.current() is None
    assert ask(VIP1) == (host(OLD, 80), POD)


VM_TESTS = sorted(name for name in list(globals()) if name.startswith("vm_"))


# -------------------------------------------------------------------------------- the VM, from the host


@pytest.fixture(scope="module")
def vm_report() -> dict[str, Any]:
    from tests import vm

    try:
        vm.ensure_available()
    except vm.VmUnavailable as error:
        pytest.skip(str(error))
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).resolve()),
        "--noconftest",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_functions=vm_*",
        "-v",
        "--color=no",
        "--timeout=60",
        "--durations=5",
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") + ":/usr/sbin:/sbin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "CANAL_IN_VM": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        result = vm.run(command, cwd=ROOT, env=env, timeout=300)
    except vm.VmUnavailable as error:  # e.g. virtiofsd cannot serve the root filesystem (not root)
        pytest.skip(str(error))
    statuses = dict(re.findall(r"::(vm_\w+) (PASSED|FAILED|ERROR|SKIPPED)", result.output))
    print(f"VM: boot {result.boot_seconds} s, total {result.seconds:.1f} s, exit {result.returncode}")
    return {"result": result, "statuses": statuses}


@pytest.mark.skipif(IN_VM, reason="host test")
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", VM_TESTS)
def test_in_vm(vm_report, name):
    result, statuses = vm_report["result"], vm_report["statuses"]
    if result.returncode is None:
        pytest.fail(
            f"the VM did not finish (timed out: {result.timed_out}, {result.seconds:.0f} s):\n{result.console[-6000:]}"
        )
    status = statuses.get(name)
    if status != "PASSED":
        section = re.search(
            rf"_{{3,}} (?:ERROR at \w+ of )?{name} _{{3,}}\n(.*?)(?=\n_{{3,}} |\n={{3,}} )", result.output, re.S
        )
        detail = section.group(1) if section else result.output[-6000:]
        pytest.fail(f"{name} in the VM: {status}\n{detail}")
