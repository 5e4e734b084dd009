"""`canal node-agent`: keeps this node's kernel redirecting migrated ClusterIPs to the gateway.

The shell around the pure parts (rules.py validates, nftables.py/ipvs.py plan): rules come from Canal's xDS
server (Delta, see xds_client.py) or from a file (`canal render --only redirects --format json`, polled), the
rules of this agent's backend mode go to the kernel, and the outcome is ACKed or NACKed, counted and shown on
/status. Whatever fails, the kernel keeps the last rules that applied.

Stopping the agent (SIGTERM, a rolling update) leaves the rules in place on purpose: conntrack and the kernel keep
redirecting while no agent runs, and the next agent reads them back and converges without a change. Only
``--cleanup`` (the chart's pre-delete hook) removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canal.nodeagent.dataplane import ApplyError, ApplyResult, Dataplane
from canal.nodeagent.rules import RuleError, for_mode, from_json, from_protos, parse_key
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canal.desired import RedirectKey, RedirectRule
from canal.observe import Endpoints
from canal.serialize import key_text

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.applies = Counter(
            "canal_node_agent_applies",
            "Rule applies by result (ok, error) and kind (full, delta, none).",
            ["result", "kind"],
            registry=registry,
        )
        self.apply_seconds = Histogram(
            "canal_node_agent_apply_seconds",
            "Time to put a rule change into the kernel.",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.rules = Gauge("canal_node_agent_rules", "Redirect rules installed by this agent.", registry=registry)
        self.last_success = Gauge(
            "canal_node_agent_last_success_timestamp_seconds",
            "When the kernel last took a change (unix time).",
            registry=registry,
        )
        self.connected = Gauge("canal_node_agent_xds_connected", "1 while the xDS stream is up.", registry=registry)
        self.responses = Counter(
            "canal_node_agent_xds_responses", "xDS responses by verdict (ack, nack).", ["verdict"], registry=registry
        )
        self.source_errors = Counter(
            "canal_node_agent_source_errors", "Rule documents that did not parse or validate.", registry=registry
        )


class Agent:
    """The rules the control plane wants (all modes) and what this node's backend made of them."""

    def __init__(self, dataplane: Dataplane, metrics: AgentMetrics, source: str) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.source = source
        self.rules: dict[RedirectKey, RedirectRule] = {}
        self.ready = False  # the control plane's (or the file's) rules are in the kernel
        self.connected = False
        self.last_error = ""
        self.last_result: ApplyResult | None = None
        self.last_success = 0.0
        self.metrics_port = 0  # where /metrics, /ready, /healthz and /status are served (0: not)

    def _run(self, apply: Any) -> ApplyResult:
        started = time.perf_counter()
        try:
            result: ApplyResult = apply()
        except ApplyError as error:
            self.metrics.applies.labels("error", "").inc()
            self.last_error = str(error)
            raise
        self.metrics.apply_seconds.observe(time.perf_counter() - started)
        self.metrics.applies.labels("ok", result.mode).inc()
        self.last_result, self.last_error = result, ""
        self.last_success = time.time()
        self.metrics.last_success.set(self.last_success)
        self.ready = True
        return result

    def replace(self, rules: Mapping[RedirectKey, RedirectRule]) -> ApplyResult:
        """A whole rule set (a file, a resync): the kernel ends up holding exactly its rules of our mode."""
        mine = for_mode(rules, self.dataplane.mode)
        result = self._run(lambda: self.dataplane.apply(mine))
        self.rules = dict(rules)
        self.metrics.rules.set(len(mine))
        return result

    def change(self, changes: Mapping[RedirectKey, RedirectRule | None]) -> ApplyResult:
        """Some rules changed (None: removed). A rule that moved to another mode leaves this backend."""
        mode = self.dataplane.mode
        mine = {k: (r if r is not None and r.mode == mode else None) for k, r in changes.items()}
        result = self._run(lambda: self.dataplane.update(mine))
        for key, rule in changes.items():
            if rule is None:
                self.rules.pop(key, None)
            else:
                self.rules[key] = rule
        self.metrics.rules.set(sum(1 for r in self.rules.values() if r.mode == mode))
        return result

    def resync(self) -> ApplyResult:
        """Read the kernel back and repair whatever drifted (someone flushed the table, a module reload)."""
        mine = for_mode(self.rules, self.dataplane.mode)
        return self._run(lambda: self.dataplane.resync(mine))

    def status(self) -> dict[str, Any]:
        result = self.last_result
        return {
            "backend": self.dataplane.mode,
            "source": self.source,
            "ready": self.ready,
            "xdsConnected": self.connected,
            "rules": len(self.rules),
            "rulesOfThisBackend": sum(1 for r in self.rules.values() if r.mode == self.dataplane.mode),
            "lastApply": {
                "kind": result.mode,
                "added": result.added,
                "removed": result.removed,
                "changed": result.changed,
            }
            if result
            else None,
            "lastSuccess": self.last_success or None,
            "lastError": self.last_error or None,
        }


def describe(result: ApplyResult | None) -> dict[str, Any]:
    if result is None:
        return {"kind": "none"}
    return {"kind": result.mode, "added": result.added, "removed": result.removed, "changed": result.changed}


def changes_from_update(changes: Mapping[str, Any]) -> dict[RedirectKey, RedirectRule | None]:
    """xDS resources (by name) -> validated rule changes; a resource whose name is not its key is refused."""
    out: dict[RedirectKey, RedirectRule | None] = {}
    present = {name: message for name, message in changes.items() if message is not None}
    for name, message in present.items():
        (rule,) = from_protos([message], source=f"xds resource {name}").values()
        if key_of(name, f"xds resource {name}") != rule.key:
            raise RuleError(f"xds resource {name}: holds the rule for {key_text(rule.key)}")
        out[rule.key] = rule
    for name in changes.keys() - present.keys():
        out[key_of(name, f"xds removed resource {name}")] = None
    return out


def key_of(name: str, where: str) -> RedirectKey:
    """A resource name ("10.96.0.1:80/tcp", "[fd00::1]:80/tcp") as the key the rule model uses."""
    ip, protocol, port = parse_key(name, where)
    try:
        canonical = str(ipaddress.ip_address(ip))
    except ValueError:
        raise RuleError(f"{where}: {ip!r} is not an IP address") from None
    return RedirectKey(canonical, protocol, port)


# ---------------------------------------------------------------------------------------------------- running


@dataclass(frozen=True, slots=True)
class AgentOptions:
    rules_file: str | None
    xds_address: str | None
    node_name: str
    metrics_address: tuple[str, int] | None
    once: bool = False
    poll: float = 1.0
    resync: float = 60.0
    once_timeout: float = 10.0


class RulesFile:
    """The rules file, re-read when its stat changes (a ConfigMap volume swaps a symlink: stat follows it)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def read(self) -> dict[RedirectKey, RedirectRule]:
        try:
            text = self.path.read_bytes()
        except OSError as error:
            raise RuleError(f"{self.path}: {error.strerror}") from None
        return from_json(text, str(self.path))


async def _follow_file(agent: Agent, source: RulesFile, lock: asyncio.Lock, options: AgentOptions) -> None:
    while True:
        if source.changed():
            try:
                rules = source.read()
                async with lock:
                    result = await asyncio.to_thread(agent.replace, rules)
                log.info("%s: %d rule(s) for %s: %s", source.path, len(rules), agent.dataplane.mode, result)
            except RuleError as error:
                agent.metrics.source_errors.inc()
                agent.last_error = str(error)
                log.error("%s (the rules in the kernel stay as they are)", error)
            except ApplyError as error:
                log.error("%s", error)
        await asyncio.sleep(options.poll)


async def _follow_xds(agent: Agent, lock: asyncio.Lock, options: AgentOptions, first: asyncio.Event) -> None:
    from canal.nodeagent.xds_client import DeltaClient, Update  # noqa: PLC0415 - grpc only for this source

    installed = await asyncio.to_thread(agent.dataplane.current) or {}

    async def on_changes(update: Update) -> None:
        try:
            changes = changes_from_update(update.changes)
            async with lock:
                result = await asyncio.to_thread(agent.change, changes)
        except (RuleError, ApplyError):
            agent.metrics.responses.labels("nack").inc()
            raise
        agent.metrics.responses.labels("ack").inc()
        log.info("xDS: %d rule change(s): %s", len(changes), result)

    def on_connected(up: bool) -> None:
        agent.connected = up
        agent.metrics.connected.set(1 if up else 0)

    assert options.xds_address is not None
    client = DeltaClient(
        options.xds_address,
        options.node_name,
        on_changes,
        initial_names={key_text(key): "" for key in installed},  # "held, version unknown": resent or removed
        on_connected=on_connected,
        on_replied=lambda acked: first.set() if acked else None,
    )
    await client.run()


async def _resync(agent: Agent, lock: asyncio.Lock, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        if not agent.ready:
            continue
        try:
            async with lock:
                result = await asyncio.to_thread(agent.resync)
            if result.mode != "none":
                log.warning("resync repaired the kernel rules: %s", result)
        except ApplyError as error:
            log.error("resync: %s", error)


async def run_agent(dataplane: Dataplane, options: AgentOptions, agent: Agent | None = None) -> int:
    """Runs until SIGTERM/SIGINT (or, with --once, until the first apply). Returns the exit status.
    ``agent``: one built by the caller (tests read its state); by default a new one with its own registry."""
    if agent is None:
        source = options.rules_file or f"xds://{options.xds_address}"
        agent = Agent(dataplane, AgentMetrics(CollectorRegistry()), source)
    endpoints = Endpoints(agent.metrics.registry, lambda: agent.ready, agent.status)
    if options.metrics_address is not None:
        agent.metrics_port = await endpoints.start(*options.metrics_address)
    lock = asyncio.Lock()
    first = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    if options.rules_file is not None:
        source = RulesFile(options.rules_file)
        if options.once:
            source.changed()
            try:
                result = await asyncio.to_thread(agent.replace, source.read())
            except (RuleError, ApplyError) as error:
                log.error("%s", error)
                return 1
            print(f"{len(agent.rules)} rule(s) read; kernel: {describe(result)}")
            return 0
        tasks.append(asyncio.create_task(_follow_file(agent, source, lock, options)))
    else:
        tasks.append(asyncio.create_task(_follow_xds(agent, lock, options, first)))
    if options.resync > 0:
        tasks.append(asyncio.create_task(_resync(agent, lock, options.resync)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiters = [asyncio.create_task(stop.wait())]
    if options.once:
        waiters.append(asyncio.create_task(first.wait()))
    try:
        if options.once:
            done, _ = await asyncio.wait(
                [*waiters, *tasks], timeout=options.once_timeout, return_when="FIRST_COMPLETED"
            )
            if not done:
                if not agent.connected:
                    log.error("no xDS connection to %s within %g s", options.xds_address, options.once_timeout)
                    return 1
                print(f"connected; no rule changes within {options.once_timeout:g} s (the kernel already matches)")
                return 0
        else:
            await asyncio.wait([*waiters, *tasks], return_when="FIRST_COMPLETED")
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if options.once:
            print(f"{len(agent.rules)} rule(s) from xDS; kernel: {describe(agent.last_result)}")
        return 0
    finally:
        for task in [*tasks, *waiters]:
            task.cancel()
        for task in [*tasks, *waiters]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await endpoints.stop()
