"""Migration without broken traffic: a node in network namespaces (tests/migration_world.py), real Envoy, `canal run`
(xDS and Canal's DNS server), `canal node-agent` (nftables), under continuous HTTP load (tests/traffic.py).

The model, and why:
- The client namespace stands for application pods. One client resolves helloworld.default.svc.cluster.local at
  Canal's DNS server before every new connection (a client honoring a short TTL; stub-resolver retries); the other
  dials the Service's ClusterIP itself (a cached answer or a pinned IP), which only the node agent can move. Both
  keep some keep-alive connections, rotated after a maximum age like a connection pool's.
- The "old path" is what clients used before Canal: the ClusterIP, DNATed by kube-proxy (a foreign nft table) to
  the pod. In a cluster, kube-proxy keeps that rule; what the user removes after migrating is the sidecars, and
  with them every way for traffic that bypasses the gateway to keep its routing and policy. The test makes that
  loss observable as a hard failure: "removing the old path" is a NetworkPolicy-like filter on the node that
  resets every TCP segment to the pod unless it comes from the gateway, new or established. So a request that
  still took the old path after the removal cannot pass unnoticed, and neither can an old keep-alive connection
  that was still open (a direct connection attempt is checked to be refused then).
- "Through the gateway" is read off the backend: it answers the peer it saw (x-peer). The gateway's address means
  Envoy proxied it; the client's address means DNAT only, the old path.

The steps, in the order a user must take them today:
1. Migrate: apply the Gateway, InternalGateway and VirtualService with the InternalGateway's DNS rewriting and
   redirect off, wait until the gateway serves the route, then turn both on: DNS flips to the gateway's Service
   address and the node agent redirects the ClusterIP. Applying everything in one step, as the README's
   `kubectl apply` does, drops nothing either (the one-shot tests below): Canal gives DNS and the node agents a
   Service only once every connected gateway Envoy has ACKed the routes that serve it.
2. Wait until the keep-alive connections opened before the flip have ended: they stay on the old path (conntrack
   keeps their translation) and must finish cleanly there.
3. Remove the old path (the sidecars go). Traffic continues, all through the gateway.
Rollback, the reverse: restore the old path first (sidecars back), then turn DNS rewriting and redirects off (the
routes stay), wait for the gateway's connections to end and cached answers to expire (the DNS TTL), and only then
delete the objects. Deleting them in one step drops nothing either: the answers and redirects are withdrawn at
once, and the gateway keeps its previous routes for the TTL plus a grace period before it removes them.

Asserted per client: zero failed requests, zero connections reset or left open; every request on a connection
opened after the flip went through the gateway, every one after the flip back did not; connections from before
the migration stayed direct, and some of them kept serving after the flip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.envoy_harness import need_envoy
from tests.migration_world import (
    MigrationNode,
    Run,
    Timings,
    migration_node,
    phases,
    run_scenario,
    violations,
)
from tests.netns import need_netns


@pytest.fixture(scope="module")
def node() -> Iterator[MigrationNode]:
    """One node for the module (its setup is most of a test's cost); each test starts from the pre-Canal state."""
    need_netns()
    need_envoy()
    with migration_node() as built:
        yield built


@pytest.fixture
def fresh(node: MigrationNode) -> MigrationNode:
    """The node as before any migration: old path in place, no migration objects, DNS and kernel direct."""
    node.reset()
    return node


def explain(node: MigrationNode, run: Run) -> str:
    lines = [f"{name}: {report.summary()}" for name, report in run.reports.items()]
    lines += [f"{phase:>17} {seconds:6.2f} s  {counts}" for phase, seconds, counts in phases(node, run)]
    lines.append(f"timings: { {k: round(v, 3) for k, v in run.marks.durations().items()} }")
    return "\n".join(lines)


@pytest.mark.timeout(120)
def test_one_shot_apply_drops_nothing(fresh: MigrationNode) -> None:
    """`kubectl apply -f examples/helloworld/` under load: Gateway, InternalGateway and VirtualService at once.
    First in the module, so the gateway gets its first configuration, as on a new install; new connections come
    every few milliseconds, so the window is hit reliably."""
    run = run_scenario(
        fresh, Timings(before=1.0, end=0.5), resolving={"new_per_second": 150}, pinned={"new_per_second": 50},
        apply="at-once", rollback="none",
    )  # fmt: skip
    problems = violations(fresh, run)
    assert not problems, "\n".join([*problems, explain(fresh, run)])


@pytest.mark.timeout(150)
def test_migration_and_rollback_under_load_drop_nothing(fresh: MigrationNode) -> None:
    """The steps of the module docstring under load: nothing fails, every request is on the path it should be."""
    started = time.monotonic()
    run = run_scenario(fresh)
    summary = explain(fresh, run)
    print(f"\n{summary}\nscenario: {time.monotonic() - started:.1f} s")
    problems = violations(fresh, run)
    assert not problems, "\n".join([*problems, summary, fresh.logs()])
    counted = {name: dict(counts) for name, _, counts in phases(fresh, run)}
    assert counted["migrated"].get("gateway", 0) >= 50 and counted["old path removed"].get("gateway", 0) >= 50
    assert counted["before"].get("direct", 0) >= 50 and counted["rolled back"].get("direct", 0) >= 50
    assert all(set(counts) <= {"gateway", "direct"} for counts in counted.values()), summary


@pytest.mark.timeout(150)
def test_one_shot_delete_drops_nothing(fresh: MigrationNode) -> None:
    """Rolling back by deleting the Gateway, InternalGateway and VirtualService in one step (old path restored)."""
    run = run_scenario(fresh, Timings(before=1.0, removed=0.5, end=0.5), rollback="remove")
    problems = violations(fresh, run)
    assert not problems, "\n".join([*problems, explain(fresh, run)])
