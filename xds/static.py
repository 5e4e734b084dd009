"""The same Envoy configuration as a static bootstrap: no control plane, everything inlined.

Used to check the resource builders with ``envoy --mode validate`` and as the benchmark floor (Envoy loading
the same configuration from a file). It is built from the xDS resources themselves, changing only how they are
delivered: listeners get their route configuration inlined (``route_config`` instead of ``rds``) and clusters
become STATIC with their load assignment inlined (instead of EDS). No feature is mapped a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canal.xds import resources
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format, struct_pb2

from canal.desired import ClusterLoadAssignment, EnvoyConfig
from canal.model.values import MAX_REGEX_PROGRAM_SIZE

# Envoy's default limit is 100, far below what VirtualServices may use; the xDS bootstrap raises it the same way.
REGEX_PROGRAM_SIZE_KEY = "re2.max_program_size.error_level"


def static_bootstrap(config: EnvoyConfig, *, admin_port: int | None = None) -> dict[str, Any]:
    """A JSON-able Envoy bootstrap serving `config` statically; an admin interface on 127.0.0.1 if asked.

    Deterministic down to key order: equal configs give byte-identical ``json.dumps`` output."""
    bootstrap = bootstrap_pb2.Bootstrap()
    routes = {name: resources.route_configuration(value) for name, value in config.route_configs.items()}
    for name in sorted(config.listeners):
        bootstrap.static_resources.listeners.append(
            _with_inline_routes(resources.listener(config.listeners[name]), routes)
        )
    for name in sorted(config.clusters):
        assignment = config.endpoints.get(name) or ClusterLoadAssignment(name, ())
        bootstrap.static_resources.clusters.append(
            _static_cluster(resources.cluster(config.clusters[name]), assignment)
        )
    layer = bootstrap.layered_runtime.layers.add(name="static")
    layer.static_layer.CopyFrom(_struct({REGEX_PROGRAM_SIZE_KEY: MAX_REGEX_PROGRAM_SIZE}))
    if admin_port is not None:
        address = bootstrap.admin.address.socket_address
        address.address, address.port_value = "127.0.0.1", admin_port
    return _sorted_keys(json_format.MessageToDict(bootstrap, preserving_proto_field_name=True))


def _with_inline_routes(
    listener: listener_pb2.Listener, routes: Mapping[str, route_pb2.RouteConfiguration]
) -> listener_pb2.Listener:
    """Replace each connection manager's RDS subscription by the route configuration it names."""
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if network_filter.name != resources.HTTP_CONNECTION_MANAGER:
                continue
            manager = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            name = manager.rds.route_config_name
            manager.route_config.CopyFrom(routes.get(name) or route_pb2.RouteConfiguration(name=name))
            network_filter.typed_config.Pack(manager, deterministic=True)
    return listener


def _static_cluster(cluster: cluster_pb2.Cluster, assignment: ClusterLoadAssignment) -> cluster_pb2.Cluster:
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.ClearField("eds_cluster_config")
    cluster.load_assignment.CopyFrom(resources.load_assignment(assignment))
    return cluster


def _sorted_keys(value: Any) -> Any:
    """Keys sorted at every level, so the written file is byte-stable: json_format emits map entries (such as
    typed_per_filter_config) in hash-table order. Lists keep their order, which carries meaning."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


__all__ = ["static_bootstrap"]
