"""The node agent from a rules file (`canal node-agent --rules-file`): follows edits, keeps the last good rules when
the file breaks, and says why in /status and the metrics. The kernel side is a real nftables table in a scratch
network namespace; the CLI is run as a user would, as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from canal.nodeagent.agent import Agent, AgentMetrics, AgentOptions, run_agent
from canal.nodeagent.nftables import NftablesDataplane
from prometheus_client import CollectorRegistry, generate_latest

from canal.desired import Backend, RedirectKey
from tests.conftest import CANAL, run_canal

WEB = RedirectKey("10.96.0.10", "tcp", 80)
API = RedirectKey("10.96.0.11", "tcp", 80)
GW = (Backend("10.244.9.5", 80),)


def rules_json(*keys: RedirectKey, address: str = "10.244.9.5", mode: str = "nftables") -> str:
    items = [
        {
            "key": f"{k.cluster_ip}:{k.port}/{k.protocol}",
            "backends": [{"address": address, "port": k.port}],
            "service": "default/x",
            "gateway": "istio-system/canal",
            "mode": mode,
        }
        for k in keys
    ]
    return json.dumps({"redirects": items})


def write(path: Path, text: str) -> None:
    """Replace the file the way a ConfigMap volume does: a new inode, renamed into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_the_agent_follows_the_file_and_keeps_the_last_good_rules(scratch_nft: tuple[str, ...], tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    write(path, rules_json(WEB))
    registry = CollectorRegistry()
    dataplane = NftablesDataplane(command=scratch_nft)
    agent = Agent(dataplane, AgentMetrics(registry), str(path))

    def kernel() -> dict | None:
        installed = NftablesDataplane(command=scratch_nft).current()
        return None if installed is None else dict(installed)

    async def until(check, what: str) -> None:
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline, f"not within 10 s: {what}"
            await asyncio.sleep(0.05)

    async def main() -> None:
        task = asyncio.create_task(run_agent(dataplane, AgentOptions(str(path), None, "n", None, poll=0.05), agent))
        try:
            await until(lambda: kernel() == {WEB: GW}, "the first rules")
            assert agent.ready
            write(path, rules_json(WEB, API))
            await until(lambda: kernel() == {WEB: GW, API: GW}, "the edit")
            write(path, rules_json(WEB, API).replace('"port": 80}', '"port": 0}', 1))  # a broken backend port
            await until(lambda: agent.last_error != "", "the error")
            assert "redirect 10.96.0.10:80/tcp: backends[0].port: expected a port 1-65535, got 0" in agent.last_error
            assert agent.status()["lastError"] == agent.last_error
            assert kernel() == {WEB: GW, API: GW}  # the last good rules stay
            write(path, "{not json")
            await until(lambda: "not JSON" in agent.last_error, "the parse error")
            write(path, rules_json(API, mode="ipvs"))  # only ipvs rules: nothing for this backend
            await until(lambda: kernel() is None, "the table removed")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 60))
    metrics = generate_latest(registry).decode()
    assert "canal_node_agent_source_errors_total 2.0" in metrics
    assert 'canal_node_agent_applies_total{kind="full",result="ok"} 1.0' in metrics
    assert 'canal_node_agent_applies_total{kind="delta",result="ok"} 2.0' in metrics  # the edit; the removal
    assert "canal_node_agent_rules 0.0" in metrics


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --rules-file and --xds-address"),
        (["--rules-file", "r.json", "--xds-address", "127.0.0.1:1"], "give exactly one of"),
        (["--xds-address", "nowhere"], "expected HOST:PORT"),
        (["--backend", "iptables", "--rules-file", "r.json"], "'iptables' is not one of 'nftables', 'ipvs'"),
        (["--priority", "-90", "--rules-file", "r.json"], "-90 is not in the range -400<=x<=-101"),
        (["--backend", "ipvs", "--ipvs-marks", "0x4000/0xfffff000", "--rules-file", "r.json"], "kube-proxy's mark"),
        (["--backend", "ipvs", "--ipvs-marks", "4096", "--rules-file", "r.json"], "Invalid value for --ipvs-marks"),
    ],
)
def test_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    # r.json never exists: even if an option slipped through, nothing could be applied to this machine's kernel
    args = [str(tmp_path / "absent" / a) if a == "r.json" else a for a in args]
    result = run_canal("node-agent", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_bad_rules_file_exits_1_naming_the_field_and_changes_nothing(
    scratch_nft: tuple[str, ...], tmp_path: Path
) -> None:
    """(The good path of --once and --cleanup, with kill tests, is in test_nodeagent_nft.py.)"""
    namespace = scratch_nft[3]
    path = tmp_path / "rules.json"

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", namespace, str(CANAL), "node-agent", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    path.write_text(rules_json(WEB, API).replace("10.244.9.5", "10.96.0.11"))  # API redirected to itself
    bad = agent("--rules-file", str(path), "--once")
    assert bad.returncode == 1
    assert "redirect 10.96.0.11:80/tcp: backends[0].address: 10.96.0.11 is the ClusterIP itself" in bad.stderr
    assert NftablesDataplane(command=scratch_nft).current() is None  # not even the good rule: all or nothing
    assert agent("--rules-file", str(tmp_path / "missing.json"), "--once").returncode == 1
    assert "nothing of Canal was installed" in agent("--cleanup").stdout
