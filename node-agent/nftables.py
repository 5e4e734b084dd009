"""The default node-agent backend: DNAT of migrated ClusterIP:ports to the gateway, in Canal's own nftables tables.

Layout (one table per address family, ``ip <table>`` and ``ip6 <table>``, created only for a family with rules):

    set gateways   { every gateway backend address }            # their traffic is never redirected (no loops)
    map redirects  { ClusterIP . l4proto . port : goto to_<h> }  # one element per rule
    chain to_<h>   { meta l4proto tcp dnat to <backend> }       # one chain per distinct backend set, content-named;
                                                                 # several backends: numgen inc (round robin)
    chain prerouting / output  (nat, priority -110: before kube-proxy's -100, so our DNAT wins)

Why this shape: a rule change is one map element (a delete and an add in one transaction), so a change costs the
same at 10 rules as at 10,000; and backend chains are named by a hash of their content, so a chain never changes
in place and reading the table back after a restart gives exactly the model it was built from. Only the first
packet of a connection passes nat chains; conntrack keeps the translation of connections that already exist, which
is why changing or removing rules never moves or resets an established connection.

Everything goes through the ``nft`` binary as text (``nft -f -``, one transaction, all or nothing), like
kube-proxy's nftables mode: libnftables' JSON input turns concatenated map values into sets and crashed on a
dnat-map rule (REFERENCE.md). Reading back uses ``nft -j``, whose output is reliable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from canal.nodeagent.dataplane import ApplyError, ApplyResult, Installed
from canal.nodeagent.nftexec import Runner, default_runner
from canal.nodeagent.rules import Rules

from canal.desired import Backend, RedirectKey, RedirectRule
from canal.model.values import is_ipv6

FAMILIES = ("ip", "ip6")
LAYOUT = "canal node-agent layout 1"  # rule comment: a table built by another layout is replaced, not patched
DEFAULT_PRIORITY = -110
REDIRECTS = "redirects"
GATEWAYS = "gateways"
BASE_CHAINS = (("prerouting", "prerouting"), ("output", "output"))  # (chain, hook)
_ADDRESS_TYPE = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True, slots=True)
class FamilyState:
    """One family's table as Canal built it: enough to compute the next transaction without reading it back.
    ``refs`` counts the elements jumping to each backend chain, so a change touches only what it changes."""

    elements: Mapping[RedirectKey, str] = field(default_factory=dict)  # key -> backend chain
    chains: Mapping[str, tuple[str, tuple[Backend, ...]]] = field(default_factory=dict)  # name -> (proto, backends)
    refs: Mapping[str, int] = field(default_factory=dict)  # chain -> elements using it
    gateways: frozenset[str] = frozenset()

    def installed(self) -> dict[RedirectKey, tuple[Backend, ...]]:
        return {key: self.chains[chain][1] for key, chain in self.elements.items()}


Changes = Mapping[RedirectKey, "tuple[Backend, ...] | None"]  # None: the rule is gone


def family_of(address: str) -> str:
    return "ip6" if is_ipv6(address) else "ip"


@lru_cache(maxsize=4096)
def chain_name(protocol: str, backends: tuple[Backend, ...]) -> str:
    """Content-addressed: the same backends always get the same chain, different ones never share one."""
    text = protocol + "|" + ",".join(f"{b.address}:{b.port}" for b in backends)
    return "to_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _gateways(chains: Mapping[str, tuple[str, tuple[Backend, ...]]]) -> frozenset[str]:
    return frozenset(b.address for _, backends in chains.values() for b in backends)


def build_state(rules: Mapping[RedirectKey, tuple[Backend, ...]]) -> FamilyState:
    """The state of a table holding exactly ``rules`` (all of one family)."""
    elements: dict[RedirectKey, str] = {}
    chains: dict[str, tuple[str, tuple[Backend, ...]]] = {}
    refs: dict[str, int] = {}
    names: dict[tuple[int, str], str] = {}  # by id(): rules share their backends tuple, hashing it is not free
    for key, backends in rules.items():
        name = names.get((id(backends), key.protocol))
        if name is None:
            name = names[(id(backends), key.protocol)] = chain_name(key.protocol, backends)
        elements[key] = name
        chains[name] = (key.protocol, backends)
        refs[name] = refs.get(name, 0) + 1
    return FamilyState(elements, chains, refs, _gateways(chains))


def backends_of(rules: Rules) -> dict[str, dict[RedirectKey, tuple[Backend, ...]]]:
    """Per family, the backends of each rule: what the kernel is to hold (one pass over the rules)."""
    out: dict[str, dict[RedirectKey, tuple[Backend, ...]]] = {family: {} for family in FAMILIES}
    v4, v6 = out["ip"], out["ip6"]
    for key, rule in rules.items():
        (v6 if ":" in key.cluster_ip else v4)[key] = rule.backends
    return out


def split_families(rules: Mapping[RedirectKey, Any]) -> dict[str, dict[RedirectKey, Any]]:
    out: dict[str, dict[RedirectKey, Any]] = {family: {} for family in FAMILIES}
    for key, value in rules.items():
        out[family_of(key.cluster_ip)][key] = value
    return out


def diff(old: FamilyState, wanted: Mapping[RedirectKey, tuple[Backend, ...]]) -> dict[RedirectKey, Any]:
    """The changes that take ``old`` to exactly ``wanted``: what a whole-state apply turns into."""
    changes: dict[RedirectKey, tuple[Backend, ...] | None] = {}
    chains = old.chains
    for key, backends in wanted.items():
        chain = old.elements.get(key)
        if chain is None or chains[chain][1] != backends:
            changes[key] = backends
    for key in old.elements.keys() - wanted.keys():
        changes[key] = None
    return changes


# ------------------------------------------------------------------------------------------------ rendering


def _sorted_addresses(addresses: Iterable[str]) -> list[str]:
    return sorted(addresses, key=lambda a: int(ipaddress.ip_address(a)))


def _element(key: RedirectKey) -> str:
    return f"{key.cluster_ip} . {key.protocol} . {key.port}"


def _dnat(family: str, protocol: str, backends: tuple[Backend, ...]) -> str:
    if len(backends) == 1:
        b = backends[0]
        target = f"[{b.address}]:{b.port}" if family == "ip6" else f"{b.address}:{b.port}"
        return f"meta l4proto {protocol} dnat {family} to {target}"
    pairs = ", ".join(f"{i} : {b.address} . {b.port}" for i, b in enumerate(backends))
    return f"meta l4proto {protocol} dnat {family} to numgen inc mod {len(backends)} map {{ {pairs} }}"


def render_table(table: str, family: str, state: FamilyState, priority: int = DEFAULT_PRIORITY) -> str:
    """The whole table, replacing whatever is there in the same transaction (add+delete: no error if absent)."""
    address = "ip" if family == "ip" else "ip6"
    lines = [
        f"add table {family} {table}",
        f"delete table {family} {table}",
        f"table {family} {table} {{",
        '\tcomment "owned by the Canal node agent: redirects migrated Services to the gateway"',
        f"\tset {GATEWAYS} {{",
        f"\t\ttype {_ADDRESS_TYPE[family]}",
    ]
    if state.gateways:
        lines.append(f"\t\telements = {{ {', '.join(_sorted_addresses(state.gateways))} }}")
    lines += ["\t}", f"\tmap {REDIRECTS} {{", f"\t\ttype {_ADDRESS_TYPE[family]} . inet_proto . inet_service : verdict"]
    if state.elements:
        elements = ",\n\t\t\t".join(sorted(f"{_element(k)} : goto {c}" for k, c in state.elements.items()))
        lines.append(f"\t\telements = {{ {elements} }}")
    lines.append("\t}")
    for name in sorted(state.chains):
        protocol, backends = state.chains[name]
        lines += [f"\tchain {name} {{", f"\t\t{_dnat(family, protocol, backends)}", "\t}"]
    for chain, hook in BASE_CHAINS:
        lines += [
            f"\tchain {chain} {{",
            f"\t\ttype nat hook {hook} priority {priority}; policy accept;",
            f'\t\t{address} saddr @{GATEWAYS} return comment "{LAYOUT}"',
            f"\t\t{address} daddr . meta l4proto . th dport vmap @{REDIRECTS}",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_delete(table: str, family: str) -> str:
    return f"add table {family} {table}\ndelete table {family} {table}\n"


@dataclass(frozen=True, slots=True)
class Delta:
    text: str  # the nft transaction ("" when nothing changes)
    state: FamilyState  # the table after it
    added: int = 0
    removed: int = 0
    changed: int = 0


def render_changes(table: str, family: str, old: FamilyState, changes: Changes) -> Delta:
    """Element-level transaction for ``changes`` (keys of this family), costing O(changes), not O(table).

    New chains are created before the elements that jump to them, and chains nobody uses any more are deleted
    after the elements that used them, all in one transaction, so no packet ever sees a half-made change.
    """
    elements = dict(old.elements)
    refs = dict(old.refs)
    chains = dict(old.chains)
    gone: list[RedirectKey] = []
    fresh: list[RedirectKey] = []
    added = removed = changed = 0
    for key, backends in changes.items():
        before = elements.get(key)
        after = chain_name(key.protocol, backends) if backends else None
        if before == after:
            continue
        if before is not None:
            gone.append(key)
            refs[before] -= 1
            if after is None:
                del elements[key]
                removed += 1
        if after is not None:
            assert backends is not None
            fresh.append(key)
            elements[key] = after
            refs[after] = refs.get(after, 0) + 1
            chains.setdefault(after, (key.protocol, backends))
            if before is None:
                added += 1
            else:
                changed += 1
    created = sorted(name for name in chains.keys() - old.chains.keys() if refs.get(name))
    dropped = sorted(name for name, count in refs.items() if count == 0)
    for name in dropped:
        del refs[name]
        del chains[name]
    gateways = _gateways(chains) if created or dropped else old.gateways
    out: list[str] = []
    for name in created:
        protocol, backends = chains[name]
        out.append(f"add chain {family} {table} {name}")
        out.append(f"add rule {family} {table} {name} {_dnat(family, protocol, backends)}")
    if gone:
        out.append(f"delete element {family} {table} {REDIRECTS} {{ {', '.join(_element(k) for k in sorted(gone))} }}")
    if fresh:
        entries = ", ".join(f"{_element(k)} : goto {elements[k]}" for k in sorted(fresh))
        out.append(f"add element {family} {table} {REDIRECTS} {{ {entries} }}")
    if gateways - old.gateways:
        items = ", ".join(_sorted_addresses(gateways - old.gateways))
        out.append(f"add element {family} {table} {GATEWAYS} {{ {items} }}")
    if old.gateways - gateways:
        items = ", ".join(_sorted_addresses(old.gateways - gateways))
        out.append(f"delete element {family} {table} {GATEWAYS} {{ {items} }}")
    out.extend(f"delete chain {family} {table} {name}" for name in dropped if name in old.chains)
    state = FamilyState(elements, chains, refs, gateways)
    return Delta("".join(line + "\n" for line in out), state, added, removed, changed)


# ------------------------------------------------------------------------------------------------ reading back


class LayoutMismatch(ValueError):
    """The table exists but is not what this version of Canal builds (it is then replaced as a whole)."""


def _expr_backends(family: str, expr: list[dict[str, Any]]) -> tuple[str, tuple[Backend, ...]]:
    """(protocol, backends) from the JSON of `meta l4proto P dnat ...` as nft -j prints it."""
    if len(expr) != 2 or "match" not in expr[0] or "dnat" not in expr[1]:
        raise LayoutMismatch("unexpected rule in a backend chain")
    protocol = expr[0]["match"].get("right")
    dnat = expr[1]["dnat"]
    addr = dnat.get("addr")
    if isinstance(addr, str) and isinstance(dnat.get("port"), int):
        return protocol, (Backend(str(ipaddress.ip_address(addr)), dnat["port"]),)
    try:
        mapping = addr["map"]
        numgen = mapping["key"]["numgen"]
        pairs = sorted(mapping["data"]["set"], key=lambda p: p[0])
        backends = tuple(Backend(str(ipaddress.ip_address(v["concat"][0])), int(v["concat"][1])) for _, v in pairs)
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise LayoutMismatch(f"unexpected dnat in a backend chain: {error}") from None
    if (
        numgen.get("mode") != "inc"
        or numgen.get("mod") != len(backends)
        or [p[0] for p in pairs] != list(range(len(backends)))
    ):
        raise LayoutMismatch("unexpected numgen spread in a backend chain")
    return protocol, backends


def _element_key(value: Any) -> RedirectKey:
    ip, protocol, port = value["concat"]
    if ":" in ip:  # nft prints IPv4 as Python does; IPv6 is made canonical the way the rule model has it
        ip = str(ipaddress.ip_address(ip))
    return RedirectKey(ip, protocol, int(port))


def parse_listing(text: str, table: str, family: str, priority: int = DEFAULT_PRIORITY) -> FamilyState:
    """`nft -j list table <family> <table>` -> the model; LayoutMismatch when it is not a table Canal built."""
    items = json.loads(text).get("nftables", [])
    chains: dict[str, list[list[dict[str, Any]]]] = {}
    base: dict[str, tuple[Any, Any]] = {}
    elements: dict[RedirectKey, str] = {}
    gateways: frozenset[str] | None = None
    layout_marks = 0
    for item in items:
        if "chain" in item:
            chain = item["chain"]
            chains.setdefault(chain["name"], [])
            if "hook" in chain:
                base[chain["name"]] = (chain.get("hook"), chain.get("prio"))
        elif "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(rule["expr"])
            layout_marks += rule.get("comment") == LAYOUT
        elif "set" in item and item["set"]["name"] == GATEWAYS:
            gateways = frozenset(str(ipaddress.ip_address(a)) for a in item["set"].get("elem", []))
        elif "map" in item and item["map"]["name"] == REDIRECTS:
            try:
                for key, verdict in item["map"].get("elem", []):
                    elements[_element_key(key)] = verdict["goto"]["target"]
            except (KeyError, TypeError, ValueError) as error:
                raise LayoutMismatch(f"unexpected element in the {REDIRECTS} map: {error}") from None
    expected_base = {chain: (hook, priority) for chain, hook in BASE_CHAINS}
    if base != expected_base or layout_marks != len(BASE_CHAINS) or gateways is None:
        raise LayoutMismatch(f"table {family} {table} is not in {LAYOUT!r} with priority {priority}")
    backend_chains: dict[str, tuple[str, tuple[Backend, ...]]] = {}
    for name, rules in chains.items():
        if name in expected_base:
            if len(rules) != 2:
                raise LayoutMismatch(f"chain {name} has {len(rules)} rules")
            continue
        if len(rules) != 1:
            raise LayoutMismatch(f"backend chain {name} has {len(rules)} rules")
        protocol, backends = _expr_backends(family, rules[0])
        if chain_name(protocol, backends) != name:
            raise LayoutMismatch(f"backend chain {name} does not hold what its name says")
        backend_chains[name] = (protocol, backends)
    for key, chain in elements.items():
        if chain not in backend_chains or backend_chains[chain][0] != key.protocol:
            raise LayoutMismatch(f"element {_element(key)} jumps to {chain}, which is not a backend chain")
    refs: dict[str, int] = {}
    for chain in elements.values():
        refs[chain] = refs.get(chain, 0) + 1
    if backend_chains.keys() - refs.keys():
        raise LayoutMismatch("a backend chain nobody jumps to")
    if gateways != _gateways(backend_chains):
        raise LayoutMismatch(f"the {GATEWAYS} set is not the backends' addresses")
    return FamilyState(elements, backend_chains, refs, gateways)


# ------------------------------------------------------------------------------------------------ the shell

_FOREIGN = FamilyState(gateways=frozenset({"(a table in another layout)"}))  # identity-compared marker


class NftablesDataplane:
    """Runs the transactions. Remembers what it applied, so a change costs one small transaction; reads the kernel
    back only at start (a restarted agent converges without touching a table that is already right) and after a
    failed transaction (someone else changed the table)."""

    mode = "nftables"

    def __init__(
        self,
        table: str = "canal",
        command: Sequence[str] | None = None,
        priority: int = DEFAULT_PRIORITY,
        timeout: float = 30.0,
        *,
        netns: str | None = None,
        runner: Runner | None = None,
    ) -> None:
        """``command``: run this nft binary prefix per script (e.g. ``ip netns exec NS nft``); by default
        libnftables in-process (in network namespace ``netns`` if given), see nftexec.py."""
        self.table = table
        self.priority = priority
        self.runner = runner or default_runner(command, netns, timeout)
        self._state: dict[str, FamilyState | None] | None = None  # None: not read yet; family None: no table

    # -------------------------------------------------------------------------------- kernel I/O

    def _transaction(self, text: str) -> None:
        result = self.runner.run(text)
        if result.returncode != 0:
            raise ApplyError(f"nft rejected the transaction (no rule changed): {_first_lines(result.stderr)}")

    def _read_family(self, family: str) -> FamilyState | None:
        """None when the table does not exist; LayoutMismatch when it exists in another shape."""
        result = self.runner.run(f"list table {family} {self.table}\n", json_output=True)
        if result.returncode != 0:
            if _missing(result.stderr):
                return None
            raise ApplyError(f"nft list table {family} {self.table} failed: {_first_lines(result.stderr)}")
        return parse_listing(result.stdout, self.table, family, self.priority)

    def _exists(self, family: str) -> bool:
        result = self.runner.run(f"list table {family} {self.table}\n")
        if result.returncode == 0:
            return True
        if _missing(result.stderr):
            return False
        raise ApplyError(f"nft list table {family} {self.table} failed: {_first_lines(result.stderr)}")

    def _read(self) -> dict[str, FamilyState | None]:
        """family -> state; a table in another layout is marked _FOREIGN, to be replaced whole."""
        out: dict[str, FamilyState | None] = {}
        for family in FAMILIES:
            try:
                out[family] = self._read_family(family)
            except LayoutMismatch:
                out[family] = _FOREIGN
        return out

    # -------------------------------------------------------------------------------- Dataplane

    def current(self) -> Installed | None:
        found: dict[RedirectKey, tuple[Backend, ...]] = {}
        present = False
        for family in FAMILIES:
            try:
                state = self._read_family(family)
            except LayoutMismatch as error:
                raise ApplyError(f"table {family} {self.table}: {error}") from None
            if state is not None:
                present = True
                found.update(state.installed())
        return found if present else None

    def _plan(self, changes: Mapping[str, Changes], wanted: Mapping[str, Any] | None) -> tuple[str, ApplyResult, dict]:
        """The transaction from the remembered state: per family, a whole table where there is none (or one in
        another layout), a delete where the last rule goes, element changes otherwise. Pure given the state."""
        assert self._state is not None
        parts: list[str] = []
        after: dict[str, FamilyState | None] = {}
        added = removed = changed = 0
        full = False
        for family in FAMILIES:
            old = self._state[family]
            family_changes = changes[family]
            if old is None or old is _FOREIGN:
                if wanted is not None:
                    rules = wanted[family]
                elif old is None:  # a change batch on a family with no table (yet): every non-removal is new
                    rules = {k: b for k, b in family_changes.items() if b is not None}
                else:
                    raise ApplyError(
                        f"table {family} {self.table} is in another layout: it is replaced by a whole rule set"
                    )
                if not rules:
                    after[family] = None
                    if old is _FOREIGN:
                        parts.append(render_delete(self.table, family))
                    continue
                state = build_state(rules)
                parts.append(render_table(self.table, family, state, self.priority))
                after[family] = state
                added += len(rules)
                full = True
                continue
            delta = render_changes(self.table, family, old, family_changes)
            added, removed, changed = added + delta.added, removed + delta.removed, changed + delta.changed
            if not delta.state.elements:
                parts.append(render_delete(self.table, family))
                after[family] = None
            else:
                parts.append(delta.text)
                after[family] = delta.state
        text = "".join(parts)
        mode = "none" if not text else "full" if full else "delta"
        return text, ApplyResult(mode, added, removed, changed), after

    def _execute(self, text: str, result: ApplyResult, after: dict[str, FamilyState | None]) -> ApplyResult:
        if not text:
            return result
        try:
            self._transaction(text)
        except ApplyError:
            if result.mode != "delta":
                raise
            # The table changed under us (a delete met a missing element): rebuild it whole. If that fails too,
            # the kernel keeps what it had, so remember the kernel's truth rather than our assumption.
            self._state = self._read()
            self._transaction(_as_full(self.table, after, self.priority))
            result = ApplyResult("full", result.added, result.removed, result.changed)
        self._state = after
        return result

    def _ensure_state(self) -> dict[str, FamilyState | None]:
        if self._state is None:
            self._state = self._read()
        return self._state

    def apply(self, rules: Rules) -> ApplyResult:
        state = self._ensure_state()
        wanted = backends_of(rules)
        changes = {
            family: diff(state[family], wanted[family]) if state[family] not in (None, _FOREIGN) else {}
            for family in FAMILIES
        }
        return self._execute(*self._plan(changes, wanted))

    def update(self, changes: Mapping[RedirectKey, RedirectRule | None]) -> ApplyResult:
        """Apply only these changes (None removes a rule): O(changes), for streams that deliver deltas."""
        self._ensure_state()
        split = split_families({k: (r.backends if r is not None else None) for k, r in changes.items()})
        return self._execute(*self._plan(split, None))

    def resync(self, rules: Rules) -> ApplyResult:
        self._state = None  # forget what we think we applied: the kernel's table is the truth
        return self.apply(rules)

    def cleanup(self) -> bool:
        present = [f for f in FAMILIES if self._exists(f)]
        if present:
            self._transaction("".join(render_delete(self.table, f) for f in present))
        self._state = dict.fromkeys(FAMILIES)
        return bool(present)


def _as_full(table: str, after: Mapping[str, FamilyState | None], priority: int) -> str:
    """Every family rebuilt whole: the fallback when a delta met a table that is not what we remembered."""
    return "".join(
        render_table(table, family, state, priority) if state is not None else render_delete(table, family)
        for family, state in after.items()
    )


# nft's own "no such table", with or without the "/dev/stdin:1:15-19: " location of a script; not a failure to run
# nft at all (`ip netns exec` into a missing namespace also ends in "No such file or directory", without "Error:")
_MISSING_TABLE = re.compile(r"(?:^|: )Error: (?:Could not process rule: )?No such file or directory", re.MULTILINE)


def _missing(stderr: str) -> bool:
    return _MISSING_TABLE.search(stderr) is not None


def _first_lines(text: str, limit: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    more = f" (+{len(lines) - limit} more lines)" if len(lines) > limit else ""
    return " | ".join(lines[:limit]) + more
