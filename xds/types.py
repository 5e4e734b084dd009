"""The xDS resource types Canal serves, and how a connecting client is assigned to a node group.

Node-group convention (the bootstrap from `canal bootstrap` sets it; document any change in the chart):

- A gateway Envoy carries node metadata ``canal.io/group: <namespace>/<name>`` naming its InternalGateway. As a
  fallback, a ``node.cluster`` of the form ``<namespace>/<name>`` is accepted too.
- A node agent carries ``canal.io/role: node-agent`` and receives the redirect rules of every gateway (group
  ``NODE_AGENT_GROUP``); gateways never receive redirect rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
REDIRECT = "type.googleapis.com/canal.xds.v1.RedirectRule"

ENVOY_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)  # make-before-break order: CDS, EDS, LDS, RDS
SHORT = {LISTENER: "lds", ROUTE: "rds", CLUSTER: "cds", ENDPOINT: "eds", REDIRECT: "redirect"}
# SotW: a response for these carries the full set; a missing name is a deletion. RDS/EDS are per name.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER, REDIRECT})

GROUP_METADATA_KEY = "canal.io/group"
ROLE_METADATA_KEY = "canal.io/role"
NODE_AGENT_ROLE = "node-agent"
NODE_AGENT_GROUP = "canal.io/node-agents"


def group_of(cluster: str, metadata: Mapping[str, Any]) -> str | None:
    """The node group a client belongs to, or None when it names none (it is refused)."""
    if metadata.get(ROLE_METADATA_KEY) == NODE_AGENT_ROLE:
        return NODE_AGENT_GROUP
    group = metadata.get(GROUP_METADATA_KEY)
    if isinstance(group, str) and group.count("/") == 1 and all(group.split("/")):
        return group
    if cluster.count("/") == 1 and all(cluster.split("/")):
        return cluster
    return None
