"""The IPVS backend: for clusters whose kube-proxy runs in IPVS mode.

Why fwmark services, and not address services
    kube-proxy already owns an IPVS virtual service for every ClusterIP:port, so Canal cannot add a second one
    (EEXIST), and editing kube-proxy's would be reverted by its next sync. The kernel's ``ip_vs_service_find()``
    looks up *fwmark* services before address ones, so Canal marks the packets of migrated ClusterIP:ports and owns
    one IPVS fwmark service per mark, with the gateway endpoints as real servers in NAT (masq) mode
    (``fwd_method`` 0; pyroute2's ``IPVSDest`` defaults to direct routing, 3). kube-proxy's service stays as it is,
    and takes the traffic back the moment Canal's mark is gone.

One service per distinct backend set, not per rule
    The rules of one gateway share its pods and (unsharded) a port, so thousands of migrated ClusterIP:ports map to
    a handful of services: a gateway rollout is one dest update per backend set instead of one per Service, the
    mark range is hardly used, and a rule moving between sets only changes its map element. A backend set that
    changes keeps its mark (its dests are updated in place) when exactly its rules point at it.

Where the mark is set, measured in the VM (tests/test_nodeagent_ipvs.py)
    IPVS picks the service at LOCAL_IN (priority 98-99) for traffic from pods and at LOCAL_OUT (-98) for node-local
    clients, and matches ``skb->mark`` exactly. kube-proxy's KUBE-MARK-MASQ ORs 0x4000 into the mark in its nat
    PREROUTING/OUTPUT chains (priority -100) for sources outside the cluster CIDR (node-local clients, among them).
    Marking before that (e.g. prerouting -150) leaves ``mark | 0x4000``, which no fwmark service has: node-local
    clients then stay on kube-proxy's backends (seen in the VM). So Canal sets the mark *after* kube-proxy's nat and
    before IPVS: an ``input`` filter chain at priority 90 (after routing, so policy routing never sees the mark) and
    an ``output`` filter chain at -99. Overwriting the mark drops kube-proxy's masquerade bit, so Canal masquerades
    its own marked connections from local source addresses (``fib saddr type local``: a node-local client's source
    is the ClusterIP itself, bound on kube-ipvs0, which a gateway on another node would answer locally). That needs
    ``net.ipv4.vs.conntrack=1`` (kube-proxy's IPVS mode sets it too; without it IPVS connections bypass nf NAT,
    seen in the VM), so apply sets it. Pod sources are not masqueraded: their replies come back through this node.
    IPVS needs the ClusterIP routed locally; kube-proxy binds ClusterIPs to its dummy device kube-ipvs0.

The tag: a mark range
    Only IPVS services whose fwmark is in Canal's range (``mark & mark_mask == mark_base``, default base 0x1000,
    mask 0xfffff000: marks 0x1001-0x1fff, 4095 backend sets) are ever read or changed, besides Canal's own
    nftables table (``table inet canal-ipvs``). The range must leave kube-proxy's bits 0x4000 (masquerade) and
    0x8000 (drop) clear, and is configurable because other components own mark bits too: Calico 0xffff0000 by
    default, Cilium 0x0f00 (which overlaps the default's low bits: pick another range there). kube-proxy's IPVS
    sync tries to delete every virtual service it did not create (pkg/proxy/ipvs cleanLegacyService), but reads a
    fwmark service as 0.0.0.0:0 (or [::]:0) and so asks to delete an address service that does not exist: ESRCH,
    which kube-proxy logs on each sync (the VM test sends that delete: the fwmark services stay). Its
    ``ipvs.excludeCIDRs: ["0.0.0.0/32", "::/128"]`` makes it skip them (from its code, not tested here).

Reconcile and ordering
    ``plan()`` (pure) diffs the desired rules against the read-back state (our services and dests, our nft maps)
    and orders the changes make-before-break: new services and dests first, then the marks (one ``nft -f -``
    transaction, text: libnftables JSON input crashes on concatenated map values), then what is no longer needed.
    A failure undoes the steps done so far, in reverse, and raises ApplyError. A real server or service that is
    no longer needed but still has connections is set to weight 0 and deleted by the first apply that finds it
    idle: kube-proxy sets ``net.ipv4.vs.expire_nodest_conn=1``, which drops the established connections of a
    deleted real server (seen in the VM). ``cleanup()`` removes everything at once.

IPv6
    Supported and tested in the VM: the same table (family inet) has a map per family and AF_INET6 fwmark
    services with IPv6 real servers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import re
import socket
import struct
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canal.nodeagent.dataplane import ApplyError, ApplyResult, Installed, UnsupportedError
from canal.nodeagent.rules import Rules
from pyroute2 import IPVS, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from canal.desired import Backend, RedirectKey, RedirectRule

DEFAULT_TABLE = "canal-ipvs"
DEFAULT_MARK_BASE = 0x1000
DEFAULT_MARK_MASK = 0xFFFFF000
KUBE_PROXY_BITS = 0xC000  # 0x4000 KUBE-MARK-MASQ, 0x8000 KUBE-MARK-DROP: never in a Canal mark
INPUT_PRIORITY = 90  # after kube-proxy's nat prerouting (-100) and filter (0), before IPVS at LOCAL_IN (98)
OUTPUT_PRIORITY = -99  # after kube-proxy's nat output (-100), before IPVS at LOCAL_OUT (-98)
POSTROUTING_PRIORITY = 100  # srcnat
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ
PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
MISSING_IPVS = (
    "IPVS is not available in this kernel (netlink family IPVS not found: load the ip_vs and ip_vs_{scheduler} "
    "modules, or use --backend nftables)"
)
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_SCHEDULER = re.compile(r"[a-z]{1,15}")


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True, slots=True)
class MarkRange:
    """Canal's fwmarks: ``mark & mask == base``; the bits outside ``mask`` number the backend sets (never 0)."""

    base: int = DEFAULT_MARK_BASE
    mask: int = DEFAULT_MARK_MASK

    def __post_init__(self) -> None:
        if not (0 <= self.base <= 0xFFFFFFFF and 0 <= self.mask <= 0xFFFFFFFF):
            raise ValueError(f"mark base {self.base:#x} and mask {self.mask:#x} must be 32-bit values")
        if self.base & ~self.mask:
            raise ValueError(f"mark base {self.base:#x} has bits outside the mask {self.mask:#x}")
        if self.mask == 0xFFFFFFFF:
            raise ValueError(f"mark mask {self.mask:#x} leaves no bits to number the backend sets")
        if self.mask & KUBE_PROXY_BITS != KUBE_PROXY_BITS or self.base & KUBE_PROXY_BITS:
            raise ValueError(
                f"mark range {self.base:#x}/{self.mask:#x} would use kube-proxy's mark bits 0x4000 (masquerade) or "
                "0x8000 (drop): the mask must cover them and the base leave them clear"
            )

    @property
    def free_bits(self) -> int:
        return ~self.mask & 0xFFFFFFFF

    @property
    def capacity(self) -> int:
        return (1 << self.free_bits.bit_count()) - 1

    def __contains__(self, mark: object) -> bool:
        return isinstance(mark, int) and mark & self.mask == self.base and mark != self.base

    def nth(self, index: int) -> int:
        """The index-th mark (1-based): index's bits deposited into the free bits, lowest first."""
        if not 1 <= index <= self.capacity:
            raise ValueError(f"mark index {index} outside 1..{self.capacity}")
        mark, bit = self.base, 1
        while index:
            while not self.free_bits & bit:
                bit <<= 1
            if index & 1:
                mark |= bit
            index >>= 1
            bit <<= 1
        return mark

    def marks(self) -> Iterator[int]:
        return (self.nth(i) for i in range(1, self.capacity + 1))


@dataclass(frozen=True, slots=True)
class Config:
    """Everything that shapes the kernel state; part of the nft table's fingerprint."""

    table: str = DEFAULT_TABLE
    marks: MarkRange = field(default_factory=MarkRange)
    scheduler: str = "rr"
    masquerade_local: bool = True

    def __post_init__(self) -> None:
        if not _TABLE_NAME.fullmatch(self.table):
            raise ValueError(f"table name {self.table!r} is not a plain nftables identifier")
        if not _SCHEDULER.fullmatch(self.scheduler):
            raise ValueError(f"IPVS scheduler {self.scheduler!r} is not a scheduler name (rr, wrr, lc, ...)")


@dataclass(frozen=True, slots=True, order=True)
class Dest:
    """One real server of a service, as read back (connections: active + inactive) or as wanted."""

    address: str
    port: int
    weight: int = 1
    fwd_method: int = FWD_MASQ
    connections: int = field(default=0, compare=False)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.address, self.port


@dataclass(frozen=True, slots=True)
class VirtualService:
    """One of Canal's IPVS fwmark services."""

    mark: int
    family: int  # 4 or 6
    scheduler: str
    dests: tuple[Dest, ...] = ()

    @property
    def active(self) -> tuple[Backend, ...]:
        """The real servers that take new connections (weight > 0), as the rule model's backends."""
        return _sorted_backends(Backend(d.address, d.port) for d in self.dests if d.weight > 0)

    @property
    def connections(self) -> int:
        return sum(d.connections for d in self.dests)


@dataclass(frozen=True, slots=True)
class Observed:
    """What the kernel holds of Canal's: its services (by mark), its nft map elements, and the table's shape."""

    services: Mapping[int, VirtualService] = field(default_factory=dict)
    marks: Mapping[RedirectKey, int] = field(default_factory=dict)
    table: str = "absent"  # "absent", "ours" (exactly as this Config renders it) or "other" (rewritten in full)

    def installed(self) -> dict[RedirectKey, tuple[Backend, ...]]:
        """Key -> backends, for the keys whose mark leads to a service with active real servers."""
        out = {}
        for key, mark in self.marks.items():
            service = self.services.get(mark)
            if service is not None and service.active:
                out[key] = service.active
        return dict(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class Op:
    """One kernel change: one IPVS netlink request, or one nft transaction (``text``)."""

    action: str  # add-service, set-service, del-service, add-dest, set-dest, del-dest, nft
    mark: int = 0
    family: int = 4
    scheduler: str = ""
    dest: Dest | None = None
    text: str = ""

    def describe(self) -> str:
        if self.action == "nft":
            return "nft transaction"
        what = f"{self.action} fwmark {self.mark:#x} (IPv{self.family})"
        if self.dest is not None:
            host = f"[{self.dest.address}]" if ":" in self.dest.address else self.dest.address
            what += f" real server {host}:{self.dest.port} weight {self.dest.weight}"
        return what


@dataclass(frozen=True, slots=True)
class Step:
    do: Op
    undo: tuple[Op, ...] = ()  # run in this order to put back the state from before ``do``


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]
    nft: str  # "full" (table written whole), "delta" (elements only) or "none"
    added: int = 0
    removed: int = 0
    changed: int = 0

    @property
    def mode(self) -> str:
        if not self.steps:
            return "none"
        return self.nft if self.nft != "none" else "delta"

    def result(self) -> ApplyResult:
        return ApplyResult(self.mode, self.added, self.removed, self.changed)


class PlanError(ValueError):
    """The desired rules cannot be installed with this configuration (nothing was changed)."""


# ------------------------------------------------------------------------------------------------ nft text


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _backend_order(backend: Backend) -> tuple[int, int, int]:
    address = ipaddress.ip_address(backend.address)
    return address.version, int(address), backend.port


def _sorted_backends(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    return tuple(sorted(set(backends), key=_backend_order))


def _element_key(key: RedirectKey) -> str:
    return f"{ipaddress.ip_address(key.cluster_ip).compressed} . {key.protocol} . {key.port}"


def _map_name(family: int) -> str:
    return f"marks{family}"


def _skeleton(config: Config, elements: Mapping[int, str]) -> str:
    """The table; ``elements`` holds each family's element text (empty when none)."""
    comment = "canal-ipvs {fingerprint}"
    lines = [f"table inet {config.table} {{"]
    for family, addr_type in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        lines += [f"\tmap {_map_name(family)} {{", f"\t\ttype {addr_type} . inet_proto . inet_service : mark"]
        if elements.get(family):
            lines.append(f"\t\telements = {{ {elements[family]} }}")
        lines.append("\t}")
    mark_rules = [
        f'\t\tmeta mark set {proto} daddr . meta l4proto . th dport map @{_map_name(family)} comment "{comment}"'
        for family, proto in ((4, "ip"), (6, "ip6"))
    ]
    for chain, hook, priority in (("input", "input", INPUT_PRIORITY), ("output", "output", OUTPUT_PRIORITY)):
        lines += [f"\tchain {chain} {{", f"\t\ttype filter hook {hook} priority {priority}; policy accept;"]
        lines += [*mark_rules, "\t}"]
    if config.masquerade_local:
        marks = config.marks
        lines += [
            "\tchain postrouting {",
            f"\t\ttype nat hook postrouting priority {POSTROUTING_PRIORITY}; policy accept;",
            f"\t\tmeta mark & {marks.mask:#010x} == {marks.base:#010x} fib saddr type local masquerade "
            f'comment "{comment}"',
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def fingerprint(config: Config) -> str:
    """Names the table's shape (chains, rules, mark range): a read-back table with another is rewritten whole."""
    return hashlib.sha256(_skeleton(config, {}).encode()).hexdigest()[:16]


def _elements(marks: Mapping[RedirectKey, int], family: int) -> str:
    return ", ".join(
        f"{_element_key(key)} : {mark:#010x}"
        for key, mark in sorted(marks.items())
        if _family(key.cluster_ip) == family
    )


def render_table(config: Config, marks: Mapping[RedirectKey, int]) -> str:
    """One transaction that replaces the whole table (creating it first, so the delete cannot fail)."""
    table = _skeleton(config, {f: _elements(marks, f) for f in (4, 6)}).replace("{fingerprint}", fingerprint(config))
    return f"add table inet {config.table}\ndelete table inet {config.table}\n{table}"


def render_delete(config: Config) -> str:
    return f"delete table inet {config.table}\n"


def render_delta(config: Config, old: Mapping[RedirectKey, int], new: Mapping[RedirectKey, int]) -> str:
    """One transaction changing only the map elements that differ ("" when none do)."""
    lines = []
    for family in (4, 6):
        gone = [k for k in sorted(old) if _family(k.cluster_ip) == family and new.get(k) != old[k]]
        come = {k: m for k, m in new.items() if _family(k.cluster_ip) == family and old.get(k) != m}
        if gone:
            keys = ", ".join(_element_key(k) for k in gone)
            lines.append(f"delete element inet {config.table} {_map_name(family)} {{ {keys} }}")
        if come:
            lines.append(f"add element inet {config.table} {_map_name(family)} {{ {_elements(come, family)} }}")
    return "".join(line + "\n" for line in lines)


_PROTOCOL_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}


def parse_table(document: str, config: Config) -> tuple[dict[RedirectKey, int], str]:
    """``nft -j list table inet <table>`` -> (map elements with marks in our range, "ours" or "other")."""
    objects = [o for o in json.loads(document).get("nftables", []) if isinstance(o, dict)]
    comment = f"canal-ipvs {fingerprint(config)}"
    marks: dict[RedirectKey, int] = {}
    maps, chains, rules = set(), set(), []
    for obj in objects:
        if "map" in obj:
            m = obj["map"]
            maps.add((m.get("name"), tuple(m.get("type", ())), m.get("map")))
            for elem in m.get("elem", []):
                parsed = _parse_element(elem)
                if parsed is not None and parsed[1] in config.marks:
                    marks[parsed[0]] = parsed[1]
        elif "chain" in obj:
            c = obj["chain"]
            chains.add((c.get("name"), c.get("type"), c.get("hook"), c.get("prio")))
        elif "rule" in obj:
            rules.append((obj["rule"].get("chain"), obj["rule"].get("comment")))
        elif "set" in obj:
            maps.add((obj["set"].get("name"), (), None))
    want_chains = {("input", "filter", "input", INPUT_PRIORITY), ("output", "filter", "output", OUTPUT_PRIORITY)}
    want_rules = [("input", comment)] * 2 + [("output", comment)] * 2
    if config.masquerade_local:
        want_chains.add(("postrouting", "nat", "postrouting", POSTROUTING_PRIORITY))
        want_rules.append(("postrouting", comment))
    want_maps = {
        (_map_name(4), ("ipv4_addr", "inet_proto", "inet_service"), "mark"),
        (_map_name(6), ("ipv6_addr", "inet_proto", "inet_service"), "mark"),
    }
    ours = maps == want_maps and chains == want_chains and sorted(rules, key=str) == sorted(want_rules, key=str)
    return dict(sorted(marks.items())), "ours" if ours else "other"


def _parse_element(elem: Any) -> tuple[RedirectKey, int] | None:
    if isinstance(elem, dict) and "elem" in elem:  # an element with flags or a comment
        elem = elem["elem"].get("val")
    if not (isinstance(elem, list) and len(elem) == 2 and isinstance(elem[0], dict) and "concat" in elem[0]):
        return None
    parts, mark = elem[0]["concat"], elem[1]
    if not (isinstance(parts, list) and len(parts) == 3 and isinstance(mark, int)):
        return None
    address, protocol, port = parts
    if isinstance(protocol, int):
        protocol = _PROTOCOL_NUMBERS.get(protocol, str(protocol))
    try:
        address = ipaddress.ip_address(address).compressed
        port = int(port) if not isinstance(port, str) or port.isdigit() else socket.getservbyname(port)
    except (ValueError, OSError):
        return None
    return RedirectKey(address, str(protocol), port), mark


# ------------------------------------------------------------------------------------------------ the plan


Group = tuple[int, tuple[Backend, ...]]  # (family, backends): the rules that share one IPVS service


def _groups(rules: Rules) -> dict[Group, list[RedirectKey]]:
    groups: dict[Group, list[RedirectKey]] = {}
    for key, rule in sorted(rules.items()):
        if key.protocol not in PROTOCOLS:
            raise PlanError(f"redirect {key.cluster_ip}:{key.port}/{key.protocol}: protocol not supported by IPVS")
        family = _family(key.cluster_ip)
        backends = _sorted_backends(rule.backends)
        if not backends:
            raise PlanError(f"redirect {key.cluster_ip}:{key.port}/{key.protocol}: no backends")
        for backend in backends:
            if _family(backend.address) != family:
                raise PlanError(f"redirect {key.cluster_ip}:{key.port}: backend {backend.address} is another family")
        groups.setdefault((family, backends), []).append(key)
    return dict(sorted(groups.items(), key=lambda g: (g[0][0], [_backend_order(b) for b in g[0][1]])))


def assign_marks(
    groups: Mapping[Group, Sequence[RedirectKey]], observed: Observed, marks: MarkRange
) -> dict[Group, int]:
    """A mark per backend set: the service that already serves it, else the one its rules point at, else a new one.

    Reusing the service the same rules point at turns a gateway rollout into an in-place dest update (no map
    change); a service other rules point at too is not changed in place, since they would reach the new real
    servers before the marks switch. New marks never reuse one still held by a service (even a draining one) or
    named by a map element.
    """
    assigned: dict[Group, int] = {}
    taken: set[int] = set()

    def votes(keys: Sequence[RedirectKey], mark: int) -> int:
        return sum(1 for k in keys if observed.marks.get(k) == mark)

    for group, keys in groups.items():  # 1. a service with exactly these real servers (draining ones included)
        family, backends = group
        want = {(b.address, b.port) for b in backends}
        candidates = [
            s.mark
            for s in observed.services.values()
            if s.mark not in taken and s.family == family and {d.endpoint for d in s.dests} == want
        ]
        if candidates:
            mark = min(candidates, key=lambda m: (-votes(keys, m), m))
            assigned[group] = mark
            taken.add(mark)
    users: dict[int, set[RedirectKey]] = {}
    for k, m in observed.marks.items():
        users.setdefault(m, set()).add(k)
    for group, keys in groups.items():  # 2. the service its rules (and only they) point at now, updated in place
        if group in assigned:
            continue
        candidates = [
            s.mark
            for s in observed.services.values()
            if s.mark not in taken
            and s.family == group[0]
            and votes(keys, s.mark) > 0
            and users.get(s.mark, set()) <= set(keys)  # else other rules would see these backends until the switch
        ]
        if candidates:
            mark = min(candidates, key=lambda m: (-votes(keys, m), m))
            assigned[group] = mark
            taken.add(mark)
    busy = set(observed.services) | set(observed.marks.values()) | taken
    free = (m for m in marks.marks() if m not in busy)
    for group in groups:  # 3. a new service
        if group not in assigned:
            mark = next(free, None)
            if mark is None:
                raise PlanError(
                    f"{len(groups)} backend sets need more IPVS services than the mark range "
                    f"{marks.base:#x}/{marks.mask:#x} holds ({marks.capacity}, some still in use)"
                )
            assigned[group] = mark
    return assigned


def _add_service_ops(service: VirtualService) -> tuple[Op, ...]:
    ops = [Op("add-service", service.mark, service.family, service.scheduler)]
    ops += [Op("add-dest", service.mark, service.family, dest=d) for d in service.dests]
    return tuple(ops)


def _nft_steps(config: Config, observed: Observed, marks: Mapping[RedirectKey, int]) -> tuple[list[Step], str]:
    if not marks:
        if observed.table == "absent":
            return [], "none"
        return [Step(Op("nft", text=render_delete(config)), (Op("nft", text=render_table(config, observed.marks)),))], (
            "full"
        )
    if observed.table == "ours":
        text = render_delta(config, observed.marks, marks)
        if not text:
            return [], "none"
        return [Step(Op("nft", text=text), (Op("nft", text=render_delta(config, marks, observed.marks)),))], "delta"
    undo = render_delete(config) if observed.table == "absent" else render_table(config, observed.marks)
    return [Step(Op("nft", text=render_table(config, marks)), (Op("nft", text=undo),))], "full"


def _retire(service: VirtualService, wanted: set[tuple[str, int]]) -> list[Step]:
    """Steps for the real servers of ``service`` not in ``wanted``: deleted when idle, else drained (weight 0)."""
    steps = []
    for dest in service.dests:
        if dest.endpoint in wanted:
            continue
        if dest.connections == 0:
            steps.append(
                Step(
                    Op("del-dest", service.mark, service.family, dest=dest),
                    (Op("add-dest", service.mark, service.family, dest=dest),),
                )
            )
        elif dest.weight > 0:
            drained = Dest(dest.address, dest.port, 0, dest.fwd_method)
            steps.append(
                Step(
                    Op("set-dest", service.mark, service.family, dest=drained),
                    (Op("set-dest", service.mark, service.family, dest=dest),),
                )
            )
    return steps


def plan(rules: Rules, observed: Observed, config: Config) -> Plan:
    """The ordered changes that make the kernel redirect exactly ``rules``: make, switch the marks, break."""
    groups = _groups(rules)
    assigned = assign_marks(groups, observed, config.marks)
    make: list[Step] = []
    brk: list[Step] = []
    for group, mark in assigned.items():
        family, backends = group
        wanted = [Dest(b.address, b.port) for b in backends]
        current = observed.services.get(mark)
        if current is None:
            service = VirtualService(mark, family, config.scheduler, tuple(wanted))
            ops = _add_service_ops(service)
            make.append(Step(ops[0], (Op("del-service", mark, family),)))
            make += [Step(op) for op in ops[1:]]  # undone with the service
            continue
        if current.scheduler != config.scheduler:
            make.append(
                Step(
                    Op("set-service", mark, family, config.scheduler),
                    (Op("set-service", mark, family, current.scheduler),),
                )
            )
        have = {d.endpoint: d for d in current.dests}
        for dest in wanted:
            old = have.get(dest.endpoint)
            if old is None:
                make.append(Step(Op("add-dest", mark, family, dest=dest), (Op("del-dest", mark, family, dest=dest),)))
            elif (old.weight, old.fwd_method) != (dest.weight, dest.fwd_method):  # a draining or edited one
                make.append(Step(Op("set-dest", mark, family, dest=dest), (Op("set-dest", mark, family, dest=old),)))
        brk += _retire(current, {d.endpoint for d in wanted})
    in_use = set(assigned.values())
    for mark, service in sorted(observed.services.items()):
        if mark in in_use:
            continue
        if service.connections == 0:
            brk.append(Step(Op("del-service", mark, service.family), _add_service_ops(service)))
        else:
            brk += _retire(service, set())
    marks = {key: assigned[group] for group, keys in groups.items() for key in keys}
    switch, nft_mode = _nft_steps(config, observed, marks)
    before = observed.installed()
    after = {key: group[1] for group, keys in groups.items() for key in keys}
    return Plan(
        tuple(make + switch + brk),
        nft_mode,
        added=sum(1 for k in after if k not in before),
        removed=sum(1 for k in before if k not in after),
        changed=sum(1 for k in after if k in before and before[k] != after[k]),
    )


def cleanup_plan(observed: Observed, config: Config) -> Plan:
    """Everything of Canal's removed at once: the marks first, then the services (connections or not)."""
    steps = []
    if observed.table != "absent":
        steps.append(
            Step(Op("nft", text=render_delete(config)), (Op("nft", text=render_table(config, observed.marks)),))
        )
    for mark, service in sorted(observed.services.items()):
        steps.append(Step(Op("del-service", mark, service.family), _add_service_ops(service)))
    return Plan(tuple(steps), "full" if observed.table != "absent" else "none", removed=len(observed.installed()))


# ------------------------------------------------------------------------------------------------ the shell


def _attrs(message: Any, nla: str) -> dict[str, Any]:
    # The raw attributes: pyroute2's IPVSDest.from_message mixes in its defaults (fwd_method 3, direct routing).
    return dict(message.get(nla)["attrs"])


def _netmask(family: int) -> str:
    # IPVS_SVC_ATTR_NETMASK is a raw u32: 255.255.255.255 for IPv4, the prefix length 128 (host order) for IPv6.
    return "255.255.255.255" if family == 4 else socket.inet_ntoa(struct.pack("=I", 128))


class IpvsDataplane:
    """The Dataplane for ``mode: ipvs``: IPVS fwmark services plus Canal's nftables table of marks.

    ``table``: the nftables table (family inet) Canal owns; ``command``: how to run nft (a prefix such as
    ``("ip", "netns", "exec", "n", "nft")`` works); ``mark_base``/``mark_mask``: the fwmark range (see the module
    docstring); ``scheduler``: the IPVS scheduler of Canal's services; ``masquerade_local``: masquerade node-local
    clients (needs ``net.ipv4.vs.conntrack=1``, which apply sets under ``sysctl``); ``timeout``: per nft run.
    The IPVS netlink socket is opened per call, so constructing one touches no kernel state.
    """

    mode = "ipvs"

    def __init__(
        self,
        table: str = DEFAULT_TABLE,
        command: Sequence[str] = ("nft",),
        mark_base: int = DEFAULT_MARK_BASE,
        mark_mask: int = DEFAULT_MARK_MASK,
        scheduler: str = "rr",
        masquerade_local: bool = True,
        timeout: float = 30.0,
        sysctl: Path = Path("/proc/sys"),
    ) -> None:
        self.config = Config(table, MarkRange(mark_base, mark_mask), scheduler, masquerade_local)
        self.command = tuple(command)
        self.timeout = timeout
        self.sysctl = sysctl
        self._last: dict[RedirectKey, RedirectRule] | None = None  # the rules of the last successful apply

    # -- the Dataplane protocol

    def current(self) -> Installed | None:
        observed = self.observe()
        if observed.table == "absent" and not observed.services:
            return None
        return observed.installed()

    def apply(self, rules: Rules) -> ApplyResult:
        with self._ipvs() as ipvs:
            observed = self._observe(ipvs)
            try:
                todo = plan(rules, observed, self.config)
            except (PlanError, ValueError) as error:
                raise ApplyError(f"IPVS: {error}") from None
            if rules and self.config.masquerade_local:
                self._ensure_conntrack()
            self._execute(ipvs, todo)
        self._last = dict(rules)
        return todo.result()

    def update(self, changes: Mapping[RedirectKey, RedirectRule | None]) -> ApplyResult:
        """Changes on top of the last apply (or, first, of what the kernel holds): IPVS reconciles whole sets."""
        if self._last is None:
            self._last = {
                key: RedirectRule(key, backends, "", "", self.mode) for key, backends in (self.current() or {}).items()
            }
        rules = dict(self._last)
        for key, rule in changes.items():
            if rule is None:
                rules.pop(key, None)
            else:
                rules[key] = rule
        return self.apply(rules)

    def resync(self, rules: Rules) -> ApplyResult:
        """apply() reads the kernel back every time anyway; this also retires drained real servers."""
        return self.apply(rules)

    def cleanup(self) -> bool:
        with self._ipvs(required=False) as ipvs:  # without IPVS, only the table can be left
            todo = cleanup_plan(self._observe(ipvs), self.config)
            self._execute(ipvs, todo)
        return bool(todo.steps)

    # -- reading

    def observe(self) -> Observed:
        """The kernel state of Canal's, read back (raises UnsupportedError without IPVS or nft)."""
        with self._ipvs() as ipvs:
            return self._observe(ipvs)

    def _observe(self, ipvs: Any) -> Observed:
        services = {}
        for message in ipvs.service("dump") if ipvs is not None else ():
            attrs = _attrs(message, "IPVS_CMD_ATTR_SERVICE")
            mark = attrs.get("IPVS_SVC_ATTR_FWMARK")
            if mark not in self.config.marks:  # an address service (kube-proxy's) or another range: not ours
                continue
            af = int(attrs.get("IPVS_SVC_ATTR_AF", socket.AF_INET))
            dests = []
            for item in ipvs.dest("dump", service=IPVSService(fwmark=mark, af=af)):
                dest = _attrs(item, "IPVS_CMD_ATTR_DEST")
                dests.append(
                    Dest(
                        ipaddress.ip_address(dest["IPVS_DEST_ATTR_ADDR"]).compressed,
                        int(dest.get("IPVS_DEST_ATTR_PORT", 0)),
                        int(dest.get("IPVS_DEST_ATTR_WEIGHT", 0)),
                        int(dest.get("IPVS_DEST_ATTR_FWD_METHOD", 0)) & 0x7,
                        int(dest.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0))
                        + int(dest.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
                    )
                )
            family = 6 if af == socket.AF_INET6 else 4
            scheduler = str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", ""))
            services[mark] = VirtualService(mark, family, scheduler, tuple(sorted(dests)))
        marks, table = self._read_table()
        return Observed(dict(sorted(services.items())), marks, table)

    def _read_table(self) -> tuple[dict[RedirectKey, int], str]:
        done = self._nft(["-j", "list", "table", "inet", self.config.table])
        if done.returncode != 0:
            if "No such file or directory" in done.stderr:
                return {}, "absent"
            raise ApplyError(f"nft list table inet {self.config.table}: {done.stderr.strip()}")
        try:
            return parse_table(done.stdout, self.config)
        except ValueError as error:
            raise ApplyError(f"nft list table inet {self.config.table}: unreadable JSON: {error}") from None

    # -- changing

    def _execute(self, ipvs: Any, todo: Plan) -> None:
        done: list[Step] = []
        for step in todo.steps:
            try:
                self._run(ipvs, step.do)
            except ApplyError as error:
                failures = []
                for undone in reversed(done):
                    for op in undone.undo:
                        try:
                            self._run(ipvs, op)
                        except ApplyError as undo_error:
                            failures.append(str(undo_error))
                state = "the previous state is back" if not failures else "rollback failed: " + "; ".join(failures)
                raise ApplyError(f"{error} ({len(done)} earlier changes undone, {state})") from None
            done.append(step)

    def _run(self, ipvs: Any, op: Op) -> None:
        if op.action == "nft":
            done = self._nft(["-f", "-"], op.text)
            if done.returncode != 0:
                raise ApplyError(f"nft refused the transaction: {done.stderr.strip()[:2000]}")
            return
        af = socket.AF_INET6 if op.family == 6 else socket.AF_INET
        key = IPVSService(fwmark=op.mark, af=af)
        try:
            if op.action in ("add-service", "set-service"):
                full = IPVSService(
                    fwmark=op.mark, af=af, sched_name=op.scheduler, netmask=_netmask(op.family), timeout=0
                )
                ipvs.service("add" if op.action == "add-service" else "set", service=full)
            elif op.action == "del-service":
                ipvs.service("del", service=key)
            else:
                assert op.dest is not None
                dest = IPVSDest(
                    addr=op.dest.address, port=op.dest.port, weight=op.dest.weight, fwd_method=op.dest.fwd_method
                )
                ipvs.dest(op.action.removesuffix("-dest"), service=key, dest=dest)
        except NetlinkError as error:
            reason = error.args[1] if len(error.args) > 1 else str(error)
            if op.action in ("add-service", "set-service") and error.code == errno.ENOENT:
                reason += f" (is the IPVS scheduler {op.scheduler!r} available? load ip_vs_{op.scheduler})"
            raise ApplyError(f"IPVS {op.describe()}: {reason}") from None

    def _ensure_conntrack(self) -> None:
        # IPVS connections go through nf conntrack/NAT only with vs.conntrack=1 (kube-proxy's IPVS mode sets it).
        path = self.sysctl / "net/ipv4/vs/conntrack"
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        except OSError as error:
            raise ApplyError(
                f"cannot set net.ipv4.vs.conntrack=1 (needed to masquerade node-local clients): {error}"
            ) from None

    # -- kernel access

    @contextlib.contextmanager
    def _ipvs(self, required: bool = True) -> Iterator[Any]:
        """An IPVS generic netlink socket (None when IPVS is missing and not ``required``)."""
        try:
            socket_ = IPVS()
        except NetlinkError as error:
            if error.code != errno.ENOENT:
                raise UnsupportedError(f"IPVS netlink socket: {error}") from None
            if required:
                raise UnsupportedError(MISSING_IPVS.format(scheduler=self.config.scheduler)) from None
            yield None
            return
        try:
            yield socket_
        finally:
            socket_.close()

    def _nft(self, args: Sequence[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self.command, *args],
                input=text,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise UnsupportedError(f"{self.command[0]}: not found (install nftables)") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{' '.join(self.command)} {' '.join(args)}: no answer in {self.timeout:g} s") from None
