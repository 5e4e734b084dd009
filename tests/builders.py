"""Kubernetes-style dicts for tests, written the way users write manifests (camelCase, apiVersion, kind)."""

from __future__ import annotations

import zlib
from typing import Any

ISTIO = "networking.istio.io/v1"


def _meta(name: str, ns: str, created: str) -> dict[str, Any]:
    """metadata, with creationTimestamp only when given (objects without one sort oldest)."""
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return meta


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def service(
    name: str,
    ns: str = "default",
    ports: list[int | tuple[int, str] | dict] | None = None,
    ip: str | list[str] | None = "auto",
    created: str = "",
    **spec: Any,
) -> dict[str, Any]:
    """ports: numbers (named http-<n>), (number, name) pairs, or full port dicts."""
    out_ports = []
    for p in ports if ports is not None else [80]:
        if isinstance(p, dict):
            out_ports.append(p)
        elif isinstance(p, tuple):
            out_ports.append({"name": p[1], "port": p[0], "targetPort": p[0], "protocol": "TCP"})
        else:
            out_ports.append({"name": f"http-{p}", "port": p, "targetPort": p, "protocol": "TCP"})
    body: dict[str, Any] = {"ports": out_ports, "selector": {"app": name}, **spec}
    if ip == "auto":  # stable across processes (str hash is salted per process)
        digest = zlib.crc32(f"{ns}/{name}".encode())
        ip = f"10.96.{(digest >> 8) % 250}.{digest % 250 + 1}"
    if isinstance(ip, list):
        body["clusterIPs"] = ip
        body["clusterIP"] = ip[0]
    elif ip is not None:
        body["clusterIP"] = ip
    meta = _meta(name, ns, created)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def endpoint_slice(
    service_name: str,
    ns: str = "default",
    endpoints: list[tuple[str, str] | tuple[str, str, dict]] | None = None,
    ports: list[tuple[str, int]] | None = None,
    name: str | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """endpoints: (ip, pod name) or (ip, pod name, conditions)."""
    eps = []
    for e in endpoints or []:
        conditions = e[2] if len(e) > 2 else {"ready": True, "serving": True, "terminating": False}
        eps.append(
            {
                "addresses": [e[0]],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "name": e[1], "namespace": ns},
                "nodeName": "node-1",
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-abc12",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in (ports or [("http-80", 80)])],
    }


def pod(name: str, ns: str = "default", ip: str | list[str] = "10.244.0.1", ready: bool = True, **labels: str):
    ips = ip if isinstance(ip, list) else [ip]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": [{"ip": i} for i in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def gateway(
    name: str = "canal",
    ns: str = "istio-system",
    servers: list[tuple[int, str] | tuple[int, str, list[str]]] | None = None,
    selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """servers: (port, protocol) with hosts ["*"], or (port, protocol, hosts)."""
    out = []
    for s in servers or [(80, "HTTP")]:
        hosts = s[2] if len(s) > 2 else ["*"]
        out.append({"port": {"number": s[0], "name": f"{s[1].lower()}-{s[0]}", "protocol": s[1]}, "hosts": hosts})
    return {
        "apiVersion": ISTIO,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector or {"app": "canal-gateway"}, "servers": out},
    }


def internal_gateway(
    name: str = "canal",
    ns: str = "istio-system",
    gateway_name: str = "canal",
    ips: list[str] | None = None,
    service_ref: str | None = None,
    created: str = "",
    shards: int | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """shards: sets address.shards (with service_ref, the gateway is then reached through <service_ref>-<k>)."""
    body: dict[str, Any] = {"gatewayRef": {"name": gateway_name}, **spec}
    if service_ref:
        body["address"] = {"serviceRef": {"name": service_ref}}
    else:
        body["address"] = {"ips": ips or ["10.96.0.50"]}
    if shards is not None:
        body["address"]["shards"] = shards
    meta = _meta(name, ns, created)
    return {"apiVersion": "canal.io/v1alpha1", "kind": "InternalGateway", "metadata": meta, "spec": body}


def virtual_service(
    name: str,
    ns: str = "default",
    hosts: list[str] | None = None,
    http: list[dict] | None = None,
    tcp: list[dict] | None = None,
    gateways: list[str] | None = None,
    created: str = "",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"hosts": hosts or [name], "gateways": gateways or ["istio-system/canal"]}
    if http is not None:
        spec["http"] = http
    if tcp is not None:
        spec["tcp"] = tcp
    meta = _meta(name, ns, created)
    return {"apiVersion": ISTIO, "kind": "VirtualService", "metadata": meta, "spec": spec}


def route(host: str, port: int | None = None, subset: str = "", weight: int | None = None, **extra: Any) -> dict:
    destination: dict[str, Any] = {"host": host}
    if port is not None:
        destination["port"] = {"number": port}
    if subset:
        destination["subset"] = subset
    out: dict[str, Any] = {"destination": destination, **extra}
    if weight is not None:
        out["weight"] = weight
    return out


def destination_rule(name: str, host: str, ns: str = "default", subsets=None, policy=None, created: str = ""):
    spec: dict[str, Any] = {"host": host}
    if subsets is not None:
        spec["subsets"] = subsets
    if policy is not None:
        spec["trafficPolicy"] = policy
    meta = _meta(name, ns, created)
    return {"apiVersion": ISTIO, "kind": "DestinationRule", "metadata": meta, "spec": spec}


def shard_service(
    k: int,
    target_ports: dict[int, int | str],
    ip: str | list[str] | None = "auto",
    name: str = "canal-gateway",
    ns: str = "istio-system",
) -> dict[str, Any]:
    """Service <name>-<k> of a sharded gateway: Gateway server port -> targetPort (shard k's listener port)."""
    ports = [{"name": f"port-{p}", "port": p, "targetPort": t, "protocol": "TCP"} for p, t in target_ports.items()]
    return service(f"{name}-{k}", ns, ports, ip=ip, selector={"app": name})


def base(servers=None, **ig_spec: Any) -> list[dict[str, Any]]:
    """A Gateway with the given servers (default HTTP 80) adopted by InternalGateway istio-system/canal."""
    return [
        gateway(servers=servers),
        internal_gateway(**ig_spec),
        pod("gw-1", "istio-system", "10.244.9.1", app="canal-gateway"),
    ]


def app(name: str, ns: str = "default", port: int = 80, ips: tuple[str, ...] = ("10.244.1.1",), **svc: Any):
    """A Service with one HTTP port, its EndpointSlice and Pods (labels app=<name>, version=v<i>)."""
    pods = [pod(f"{name}-{i}", ns, ip, app=name, version=f"v{i + 1}") for i, ip in enumerate(ips)]
    return [
        service(name, ns, [port], **svc),
        endpoint_slice(name, ns, [(ip, f"{name}-{i}") for i, ip in enumerate(ips)], [(f"http-{port}", port)]),
        *pods,
    ]
