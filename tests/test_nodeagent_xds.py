"""The node agent against Canal's real xDS server: rules arrive over Delta ADS, land in a real nftables table (in a
scratch network namespace), are ACKed; a rule the agent cannot apply is NACKed with the reason and the kernel keeps
the last good rules; a restarted agent converges without touching a table that is already right.

The server's cache is filled with rules the test writes (ClusterIPs and gateway addresses chosen here), and what
the kernel holds is read back with `nft -j`, independently of what the agent believes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from canal.nodeagent.agent import Agent, AgentMetrics, AgentOptions, run_agent
from canal.nodeagent.nftables import NftablesDataplane
from canal.xds.cache import SnapshotCache
from canal.xds.server import XdsServer
from canal.xds.types import NODE_AGENT_GROUP
from prometheus_client import CollectorRegistry

from canal.desired import Backend, RedirectKey, RedirectRule

GW = (Backend("10.244.9.5", 5000), Backend("10.244.9.6", 5000))
WEB = RedirectKey("10.96.0.10", "tcp", 5000)
API = RedirectKey("10.96.0.11", "tcp", 5000)
DB = RedirectKey("10.96.0.12", "tcp", 5432)
WAIT = 10.0


def rule(key: RedirectKey, backends: tuple[Backend, ...] = GW, mode: str = "nftables") -> RedirectRule:
    return RedirectRule(key, backends, f"default/svc-{key.cluster_ip}", "istio-system/canal", mode)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


class World:
    """An xDS server with the node-agent group's rules, and agents (one at a time) programming one namespace."""

    def __init__(self, nft: tuple[str, ...]) -> None:
        self.nft = nft
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache)
        self.port = 0
        self.task: asyncio.Task[int] | None = None
        self.agent: Agent | None = None

    async def __aenter__(self) -> World:
        self.port = await self.server.start("127.0.0.1:0")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop_agent()
        await self.server.stop(0)

    def publish(self, *rules: RedirectRule) -> None:
        self.cache.set_redirects(NODE_AGENT_GROUP, {r.key: r for r in rules})

    def start_agent(self) -> Agent:
        dataplane = NftablesDataplane(command=self.nft)
        self.agent = Agent(dataplane, AgentMetrics(CollectorRegistry()), "test")
        options = AgentOptions(None, f"127.0.0.1:{self.port}", "node-1", ("127.0.0.1", 0), resync=0)
        self.task = asyncio.create_task(run_agent(dataplane, options, self.agent))
        return self.agent

    async def stop_agent(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def kernel(self) -> dict[RedirectKey, tuple[Backend, ...]] | None:
        """What the table holds, read by a dataplane that has never applied anything."""
        installed = NftablesDataplane(command=self.nft).current()
        return None if installed is None else dict(installed)

    def listing(self) -> str:
        return subprocess.run(
            [*self.nft, "-a", "list", "table", "ip", "canal"], capture_output=True, text=True, check=True, timeout=10
        ).stdout

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {WAIT} s: {what}")
            await asyncio.sleep(0.05)

    async def kernel_holds(self, expected: dict[RedirectKey, tuple[Backend, ...]] | None) -> None:
        await self.until(lambda: self.kernel() == expected, f"the kernel holds {expected}")

    def nack(self) -> str | None:
        return next((m for (group, _, kind), m in self.server.errors.items() if kind == "redirect"), None)


@aio
async def test_rules_over_xds_reach_the_kernel_and_follow_changes(scratch_nft: tuple[str, ...]) -> None:
    async with World(scratch_nft) as world:
        world.publish(rule(WEB), rule(API, (GW[0],)), rule(DB, mode="ipvs"))
        agent = world.start_agent()
        # the ipvs-mode rule is for agents running the IPVS backend, not this one
        await world.kernel_holds({WEB: GW, API: (GW[0],)})
        await world.until(lambda: agent.ready, "the agent reports ready")
        ready, metrics, status = await asyncio.to_thread(
            lambda: [get(agent.metrics_port, path) for path in ("/ready", "/metrics", "/status")]
        )
        assert ready == (200, "ready\n")
        assert "canal_node_agent_rules 2.0" in metrics[1] and "canal_node_agent_xds_connected 1.0" in metrics[1]
        assert 'canal_node_agent_xds_responses_total{verdict="ack"}' in metrics[1]
        assert json.loads(status[1])["rulesOfThisBackend"] == 2
        world.publish(rule(WEB), rule(API, GW), rule(DB))  # API spreads over both; DB moves to nftables
        await world.kernel_holds({WEB: GW, API: GW, DB: GW})
        assert agent.last_result is not None and agent.last_result.mode == "delta"
        world.publish(rule(API, GW))
        await world.kernel_holds({API: GW})
        assert world.nack() is None
        world.publish()
        await world.kernel_holds(None)  # the last rule gone: no Canal table left at all


@aio
async def test_a_rule_the_agent_cannot_apply_is_nacked_and_the_kernel_keeps_the_last_good_rules(
    scratch_nft: tuple[str, ...],
) -> None:
    async with World(scratch_nft) as world:
        world.publish(rule(WEB))
        agent = world.start_agent()
        await world.kernel_holds({WEB: GW})
        broken = RedirectRule(API, (Backend("fd01::5", 5000),), "default/api", "istio-system/canal", "nftables")
        world.publish(rule(WEB), broken)
        await world.until(lambda: world.nack() is not None, "the server records a NACK")
        message = world.nack()
        assert message is not None and "10.96.0.11:5000/tcp" in message and "backends[0].address" in message
        assert world.kernel() == {WEB: GW}
        assert agent.rules.keys() == {WEB}
        world.publish(rule(WEB), rule(API))  # fixed: applied, and the error is history
        await world.kernel_holds({WEB: GW, API: GW})
        await world.until(lambda: world.nack() is None, "the NACK is cleared by the next ACK")


@aio
async def test_a_restarted_agent_changes_nothing_and_catches_up_on_what_it_missed(scratch_nft: tuple[str, ...]) -> None:
    async with World(scratch_nft) as world:
        world.publish(rule(WEB), rule(API))
        world.start_agent()
        await world.kernel_holds({WEB: GW, API: GW})
        before = world.listing()
        await world.stop_agent()
        assert world.kernel() == {WEB: GW, API: GW}  # stopping the agent leaves the redirects in place
        agent = world.start_agent()
        await world.until(lambda: agent.last_result is not None, "the restarted agent applied the first update")
        assert agent.last_result is not None and agent.last_result.mode == "none"
        assert world.listing() == before  # same rules, same handles: nothing was rewritten
        await world.stop_agent()
        world.publish(rule(API), rule(DB))  # while no agent runs: WEB goes, DB comes
        world.start_agent()
        await world.kernel_holds({API: GW, DB: GW})


@pytest.mark.parametrize("delay", [0.0])
def test_once_over_xds_exits_after_the_first_update(scratch_nft: tuple[str, ...], delay: float) -> None:
    async def main() -> int:
        async with World(scratch_nft) as world:
            world.publish(rule(WEB))
            dataplane = NftablesDataplane(command=scratch_nft)
            options = AgentOptions(None, f"127.0.0.1:{world.port}", "node-1", None, once=True, resync=0)
            status = await run_agent(dataplane, options)
            assert world.kernel() == {WEB: GW}
            return status

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 0


@aio
async def test_not_ready_until_the_control_plane_answered(scratch_nft: tuple[str, ...]) -> None:
    """No xDS server: the agent keeps retrying, /ready says 503 and the kernel is left alone."""
    dataplane = NftablesDataplane(command=scratch_nft)
    agent = Agent(dataplane, AgentMetrics(CollectorRegistry()), "test")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    options = AgentOptions(None, f"127.0.0.1:{dead}", "node-1", ("127.0.0.1", 0), resync=0)
    task = asyncio.create_task(run_agent(dataplane, options, agent))
    try:
        deadline = time.monotonic() + WAIT
        while not agent.metrics_port:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a few reconnect attempts
        assert await asyncio.to_thread(get, agent.metrics_port, "/ready") == (503, "not ready\n")
        assert await asyncio.to_thread(get, agent.metrics_port, "/healthz") == (200, "ok\n")
        assert not agent.connected and NftablesDataplane(command=scratch_nft).current() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
