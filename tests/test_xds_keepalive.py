"""An idle Envoy keeps its one ADS stream: the server accepts the keepalive pings the bootstrap makes Envoy send.

gRPC servers by default end a connection whose client pings more often than every 5 minutes without data
(GOAWAY "too_many_pings" after two strikes); Envoy pings every 30 s, so without Canal's server setting every
gateway would lose and re-open its stream every ~90 s. The test keeps production's ratio between Envoy's ping
interval (30 s) and the server's minimum (5 s), scaled down to seconds.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from canal.xds.bootstrap import KEEPALIVE_INTERVAL, bootstrap, envoy_command
from canal.xds.cache import SnapshotCache
from canal.xds.metrics import XdsMetrics
from canal.xds.publisher import Publisher
from canal.xds.server import MIN_CLIENT_PING_INTERVAL, XdsServer

from canal.snapshot import Snapshot
from canal.translate import translate
from tests.builders import app, base, route, virtual_service
from tests.envoy_harness import ENVOY, Process, free_port, need_envoy

GROUP = "istio-system/canal"
SCALE = 30  # production intervals / test intervals
PINGS = 6  # idle pings watched: two strikes end a stream under gRPC's default policy


def streams_opened(metrics: XdsMetrics) -> float:
    return metrics.registry.get_sample_value("canal_xds_streams_total", {"group": GROUP}) or 0.0


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_an_idle_envoy_keeps_its_stream_through_keepalive_pings(tmp_path, delta):
    need_envoy()
    interval = KEEPALIVE_INTERVAL / SCALE

    async def body() -> tuple[float, float, str]:
        cache = SnapshotCache()
        metrics = XdsMetrics()
        server = XdsServer(cache, metrics, min_client_ping_interval=MIN_CLIENT_PING_INTERVAL / SCALE)
        publisher = Publisher(cache, quiet=0.0, max_delay=0.0)
        publisher.submit(
            translate(
                Snapshot.from_dicts([*base(), *app("web"), virtual_service("web", http=[{"route": [route("web")]}])])
            )
        )
        publisher.flush()
        port = await server.start("127.0.0.1:0")
        admin = free_port()
        config = bootstrap(
            f"127.0.0.1:{port}", "gw-idle", GROUP, admin_port=admin, delta=delta, keepalive_interval=interval
        )
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(config))
        envoy = Process(envoy_command(ENVOY, path, base_id=admin), tmp_path / "envoy.log")
        try:
            deadline = time.monotonic() + 20
            while not (server.streams.get(GROUP) and server.status()[GROUP]["proxies"][0]["converged"]):
                assert envoy.alive() and time.monotonic() < deadline, f"Envoy never converged:\n{envoy.log()}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(interval * PINGS)  # idle: nothing changes, only pings cross the connection
            return streams_opened(metrics), len(server.streams.get(GROUP, ())), envoy.log()
        finally:
            envoy.stop()
            await server.stop(0)

    opened, connected, log = asyncio.run(asyncio.wait_for(body(), 60))
    assert "too many pings" not in log.lower(), log
    assert (opened, connected) == (1, 1), f"the stream was re-opened while idle:\n{log}"
