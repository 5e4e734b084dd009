"""Uninstall, node side: the post-delete hook DaemonSet runs this on every node the node agent ran on.

It waits until this node's agent has stopped, removes every rule and table Canal owns (`canal node-agent --cleanup`),
then marks itself done (its readiness probe) and idles until Helm deletes the hook.

Why wait for the agent: Helm deletes the agent DaemonSet just before the post-delete hooks run, and an agent still
alive would put its rules back on its next resync. Both pods use the host network, so the agent's health port on
this node going silent is the local sign that it is gone, with no API access needed. Why idle instead of exiting:
a DaemonSet pod that exits is restarted; a Ready pod per node is what the cleanup Job (cleanup_wait.py) counts.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn


def agent_alive(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something still accepts connections on the agent's metrics port on this node."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_until_gone(port: int, timeout: float, interval: float = 1.0, host: str = "127.0.0.1") -> bool:
    """True once the agent stopped answering; False if it still answers after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while agent_alive(port, host):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def cleanup_commands(canal: str, backend: str, table: str, marks: str) -> list[list[str]]:
    """The nftables table always (the default backend, and cheap to check); IPVS only when the release used it,
    because opening the IPVS netlink family can make the kernel load ip_vs on a node that never had it."""
    commands = [[canal, "node-agent", "--cleanup", "--backend", "nftables", "--table-name", table]]
    if backend == "ipvs":
        commands.append([canal, "node-agent", "--cleanup", "--backend", "ipvs", "--ipvs-marks", marks])
    return commands


def _idle() -> NoReturn:
    """Sleep until SIGTERM (PID 1 ignores it unless handled): the pod then stops at once."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-port", type=int, required=True, help="The node agent's metrics port.")
    parser.add_argument("--agent-host", default="127.0.0.1", help="Where that port answers on this node.")
    parser.add_argument("--agent-timeout", type=float, default=60.0, help="Seconds to wait for the agent to stop.")
    parser.add_argument("--backend", choices=("nftables", "ipvs"), default="nftables")
    parser.add_argument("--table-name", default="canal")
    parser.add_argument("--ipvs-marks", default="0x1000/0xfffff000")
    parser.add_argument("--marker", required=True, help="Written once the node is clean (the readiness probe).")
    parser.add_argument("--canal", default="canal", help="The canal command.")
    args = parser.parse_args(argv)

    if not wait_until_gone(args.agent_port, args.agent_timeout, host=args.agent_host):
        print(
            f"error: the node agent still answers on {args.agent_host} port {args.agent_port} after "
            f"{args.agent_timeout:g} s; "
            "not removing rules under a running agent (it would restore them)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    for command in cleanup_commands(args.canal, args.backend, args.table_name, args.ipvs_marks):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"error: {' '.join(command)}: {error}", file=sys.stderr, flush=True)
            return 1
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            print(f"error: {' '.join(command)} exited with {result.returncode}", file=sys.stderr, flush=True)
            return 1
    Path(args.marker).touch()
    print("node clean: Canal's redirect rules are removed", flush=True)
    _idle()


if __name__ == "__main__":
    sys.exit(main())
