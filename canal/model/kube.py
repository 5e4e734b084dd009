"""The Kubernetes objects translation reads: Service, EndpointSlice, Pod, Namespace."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from canal.model.base import API_TIMESTAMP, FieldError, Issues, Meta, Node, ObjectRef, parse_meta
from canal.model.values import check_ip, check_namespace_name, check_service_name, is_ipv6

# Istio's protocol selection: appProtocol wins, else the port name prefix `<protocol>[-<suffix>]`.
_KNOWN_APP_PROTOCOLS = {
    "http": "http",
    "http2": "http2",
    "https": "https",
    "grpc": "grpc",
    "grpc-web": "grpc-web",
    "tcp": "tcp",
    "tls": "tls",
    "mongo": "tcp",
    "mysql": "tcp",
    "redis": "tcp",
    "udp": "udp",
    "kubernetes.io/h2c": "http2",
    "kubernetes.io/ws": "http",
    "kubernetes.io/wss": "https",
}
HTTP2_APP_PROTOCOLS = frozenset({"http2", "grpc", "grpc-web"})
OPAQUE_APP_PROTOCOLS = frozenset({"tcp", "tls", "https"})  # must not pass through an HTTP listener


def app_protocol(declared: str, port_name: str) -> str:
    """Normalised application protocol of a port; "" means undeclared (Istio would sniff it)."""
    if declared:
        return _KNOWN_APP_PROTOCOLS.get(declared.lower(), "")
    prefix = port_name.lower().split("-", 1)[0]
    if port_name.lower().startswith("grpc-web"):
        return "grpc-web"
    return _KNOWN_APP_PROTOCOLS.get(prefix, "")


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    protocol: str  # TCP, UDP or SCTP
    app_protocol: str  # normalised, see app_protocol()


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    type: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName Services
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    external_name: str = ""

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Service", self.meta.namespace, self.meta.name)

    def fqdn(self, domain: str) -> str:
        return f"{self.meta.name}.{self.meta.namespace}.svc.{domain}"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    serving: bool
    terminating: bool
    pod: str = ""  # targetRef name when it names a Pod in the slice's namespace
    node_name: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    meta: Meta
    service_name: str  # label kubernetes.io/service-name; "" when the slice belongs to no Service
    address_type: str  # IPv4, IPv6 or FQDN
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[SlicePort, ...]

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("EndpointSlice", self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class Pod:
    meta: Meta
    ips: tuple[str, ...]
    node_name: str
    ready: bool  # Running, Ready condition true, not being deleted

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Pod", self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: Meta

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Namespace", "", self.meta.name)


def _cluster_ips(spec: Node) -> list[str]:
    """spec.clusterIP and spec.clusterIPs, checked as the API server does (one may be left out, as kubectl allows).

    Empty for headless Services. The primary comes first; dual stack means one address per family, no more.
    """
    listed = list(spec.str_list("clusterIPs"))
    primary = spec.str("clusterIP")
    if "None" in listed and listed != ["None"]:
        raise spec.fail("clusterIPs", f"'None' (headless) must be the first and only value, got {listed!r}")
    if primary == "None" or listed == ["None"]:
        if primary not in ("None", "") or listed not in (["None"], []):
            raise spec.fail(
                "clusterIPs",
                f"disagrees with spec.clusterIP {primary!r}: a headless Service has None in both, got {listed!r}",
            )
        return []
    cluster_ips = [check_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(listed) if ip]
    if primary:
        primary = check_ip(primary, "spec.clusterIP")
        if cluster_ips and cluster_ips[0] != primary:
            raise spec.fail("clusterIPs", f"must start with spec.clusterIP {primary!r}, got {listed[0]!r}")
        if not cluster_ips:
            cluster_ips.append(primary)
    if len(cluster_ips) > 2 or len({is_ipv6(ip) for ip in cluster_ips}) != len(cluster_ips):
        raise spec.fail("clusterIPs", f"may hold one address per IP family (IPv4, IPv6), got {listed!r}")
    return cluster_ips


def parse_service(obj: Mapping[str, Any], issues: Issues) -> Service:
    meta = parse_meta(obj, issues)
    # The name is a label of every DNS name and virtual-host domain of the Service: a dot in it would make
    # <name>.<namespace> ambiguous with another Service's names.
    check_service_name(meta.name, "metadata.name")
    check_namespace_name(meta.namespace, "metadata.namespace")
    spec = Node(obj.get("spec") or {}, "spec", issues)
    svc_type = spec.str("type", default="ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise spec.fail("type", f"must be ClusterIP, NodePort, LoadBalancer or ExternalName, got {svc_type!r}")
    cluster_ips = _cluster_ips(spec)
    ports = []
    seen_ports: set[tuple[int, str]] = set()
    for p in spec.nodes("ports"):
        number = p.int("port", lo=1, hi=65535)
        if number is None:
            raise p.fail("port", "is required")
        protocol = p.str("protocol", default="TCP").upper()
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise p.fail("protocol", f"must be TCP, UDP or SCTP, got {protocol!r}")
        if (number, protocol) in seen_ports:
            raise p.fail("port", f"duplicate port {number}/{protocol}")
        seen_ports.add((number, protocol))
        target = p.raw("targetPort")
        if target is None:
            target = number
        elif isinstance(target, bool) or not isinstance(target, int | str):
            raise p.fail("targetPort", "must be a port number or a port name")
        elif isinstance(target, str) and target.isdigit():
            target = int(target)
        name = p.str("name")
        ports.append(ServicePort(name, number, target, protocol, app_protocol(p.str("appProtocol"), name)))
    return Service(
        meta=meta,
        type=svc_type,
        cluster_ips=tuple(cluster_ips),
        ports=tuple(ports),
        selector=spec.str_map("selector"),
        external_name=spec.str("externalName"),
    )


def _condition(conditions: Node, key: str, default: bool) -> bool:
    value = conditions.raw(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise conditions.fail(key, "must be true or false")
    return value


def _slice_address(text: str, path: str, address_type: str) -> str:
    """An endpoint address of the slice's own family: the API server refuses an IPv6 address in an IPv4 slice."""
    address = check_ip(text, path)
    if is_ipv6(address) != (address_type == "IPv6"):
        raise FieldError(path, f"is not an {address_type} address, as the slice's addressType requires: {text!r}")
    return address


def parse_endpoint_slice(obj: Mapping[str, Any], issues: Issues) -> EndpointSlice:
    meta = parse_meta(obj, issues)
    root = Node(obj, "", issues)
    address_type = root.str("addressType", default="IPv4")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise root.fail("addressType", f"must be IPv4, IPv6 or FQDN, got {address_type!r}")
    endpoints = []
    for ep in root.nodes("endpoints"):
        addresses = ep.str_list("addresses")
        if address_type != "FQDN":
            addresses = tuple(
                _slice_address(a, f"{ep.at('addresses')}[{i}]", address_type) for i, a in enumerate(addresses)
            )
        cond = ep.node_or_empty("conditions")
        # API semantics: an unknown (nil) ready condition means ready; serving defaults to ready.
        ready = _condition(cond, "ready", True)
        serving = _condition(cond, "serving", ready)
        terminating = _condition(cond, "terminating", False)
        target = ep.node("targetRef")
        pod = ""
        if target is not None and target.str("kind") == "Pod":
            pod = target.str("name")
        endpoints.append(
            SliceEndpoint(
                addresses=addresses,
                ready=ready,
                serving=serving,
                terminating=terminating,
                pod=pod,
                node_name=ep.str("nodeName"),
                zone=ep.str("zone"),
            )
        )
    ports = []
    for p in root.nodes("ports"):
        number = p.int("port", lo=1, hi=65535)
        if number is None:
            continue  # a nil port means "all ports"; only meaningful for selector-less services
        ports.append(SlicePort(p.str("name"), number, p.str("protocol", default="TCP").upper()))
    return EndpointSlice(
        meta=meta,
        service_name=meta.labels.get("kubernetes.io/service-name", ""),
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
    )


def parse_pod(obj: Mapping[str, Any], issues: Issues) -> Pod:
    """Pods outnumber every other kind; well-formed ones take a direct path, anything odd the checked one."""
    try:
        fast = _pod_fast(obj)
    except (AttributeError, KeyError, TypeError, ValueError, OSError):
        fast = None
    return fast if fast is not None else _pod_checked(obj, issues)


def _pod_fast(obj: Mapping[str, Any]) -> Pod | None:
    metadata, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    name, namespace = metadata["name"], metadata.get("namespace", "default")
    labels = metadata.get("labels") or {}
    creation = metadata.get("creationTimestamp") or ""
    node_name = spec.get("nodeName", "")
    if not (
        isinstance(name, str)
        and name
        and isinstance(namespace, str)
        and isinstance(node_name, str)
        and all(type(k) is str and type(v) is str for k, v in labels.items())
        and (creation == "" or API_TIMESTAMP.fullmatch(creation))
        and type(metadata.get("generation", 0)) is int
        and metadata.get("generation", 0) >= 0
        and isinstance(metadata.get("uid", ""), str)
    ):
        return None
    ips = []
    for entry in status.get("podIPs") or ():
        ip = entry["ip"]
        socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
        if ":" in ip and str(ipaddress.ip_address(ip)) != ip:
            return None  # not canonical: let the checked path normalise it
        ips.append(ip)
    primary = status.get("podIP")
    if primary and primary not in ips:
        return None
    ready = status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()
    )
    meta = Meta(
        name=name,
        namespace=namespace,
        labels=labels,
        generation=metadata.get("generation", 0),
        creation=creation[:-1] + ".000000Z" if creation else "",
        uid=metadata.get("uid", ""),
        resource_version=str(metadata.get("resourceVersion") or ""),
    )
    deleting = metadata.get("deletionTimestamp") is not None
    return Pod(meta=meta, ips=tuple(ips), node_name=node_name, ready=ready and not deleting)


def _pod_checked(obj: Mapping[str, Any], issues: Issues) -> Pod:
    meta = parse_meta(obj, issues)
    spec = Node(obj.get("spec") or {}, "spec", issues)
    status = Node(obj.get("status") or {}, "status", issues)
    ips = [item.str("ip") for item in status.nodes("podIPs")]
    primary = status.str("podIP")
    if primary and primary not in ips:
        ips.insert(0, primary)
    ips = [check_ip(ip, "status.podIPs") for ip in ips if ip]  # reported as a whole: podIP mirrors podIPs[0]
    ready = status.str("phase") == "Running" and any(
        c.str("type") == "Ready" and c.str("status") == "True" for c in status.nodes("conditions")
    )
    deleting = (obj.get("metadata") or {}).get("deletionTimestamp") is not None
    return Pod(meta=meta, ips=tuple(ips), node_name=spec.str("nodeName"), ready=ready and not deleting)


def parse_namespace(obj: Mapping[str, Any], issues: Issues) -> Namespace:
    return Namespace(parse_meta(obj, issues, namespaced=False))


__all__ = [
    "HTTP2_APP_PROTOCOLS",
    "OPAQUE_APP_PROTOCOLS",
    "EndpointSlice",
    "FieldError",
    "Namespace",
    "Pod",
    "Service",
    "ServicePort",
    "SliceEndpoint",
    "SlicePort",
    "app_protocol",
    "parse_endpoint_slice",
    "parse_namespace",
    "parse_pod",
    "parse_service",
]
