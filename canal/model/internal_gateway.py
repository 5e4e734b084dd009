"""Canal's own API: InternalGateway (canal.io/v1alpha1), which adopts exactly one Istio Gateway."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from canal.model.base import FieldError, Issues, Meta, Node, ObjectRef, parse_meta
from canal.model.values import (
    LabelSelector,
    check_dns_name,
    check_ip,
    check_labels,
    check_namespace_name,
    check_service_name,
    is_dns1035_label,
    is_dns_subdomain,
    parse_label_selector,
)

GROUP = "canal.io"
VERSION = "v1alpha1"
DNS_MODES = ("coredns", "server", "none")
REDIRECT_MODES = ("nftables", "ipvs", "none")
DEFAULT_TTL = 5
MAX_TTL = 86400
MAX_SHARDS = 256  # each shard is a Service and a listener per server port; more is a mistake, not a plan


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class InternalGateway:
    meta: Meta
    gateway: NamespacedName
    workload_selector: tuple[tuple[str, str], ...]  # empty: use the Istio Gateway's own selector
    address_service: NamespacedName | None
    address_ips: tuple[str, ...]
    cluster_domain: str = "cluster.local"
    dns_mode: str = "coredns"
    dns_ttl: int = DEFAULT_TTL
    redirect_mode: str = "nftables"
    namespace_selector: LabelSelector | None = None  # None selects no namespace; an empty selector all
    shards: int = 1  # address.shards: > 1 spreads Services over the Services <serviceRef.name>-<k>

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("InternalGateway", self.meta.namespace, self.meta.name)

    @property
    def shard_services(self) -> tuple[NamespacedName, ...]:
        """The Services that reach shard k (index k); empty when the gateway is not sharded."""
        if self.shards <= 1 or self.address_service is None:
            return ()
        ref = self.address_service
        return tuple(NamespacedName(ref.namespace, f"{ref.name}-{k}") for k in range(self.shards))

    @property
    def key(self) -> str:
        """The xDS node group of the gateway Envoys this InternalGateway programs."""
        return f"{self.meta.namespace}/{self.meta.name}"


def _check_gateway_name(name: str, path: str) -> str:
    """Istio's Gateway is a custom resource: its names are DNS subdomains, as for every custom resource."""
    if not is_dns_subdomain(name):
        raise FieldError(
            path,
            f"is not a valid Gateway name (a lower-case RFC 1123 DNS subdomain of at most 253 characters): {name!r}",
        )
    return name


def _ref(node: Node, default_namespace: str, check_name: Callable[[str, str], str]) -> NamespacedName:
    """A reference checked by the rule Kubernetes applies to the named kind, so a typo is not a silent miss."""
    name = check_name(node.str("name", required=True), node.at("name"))
    namespace = check_namespace_name(node.str("namespace", default=default_namespace), node.at("namespace"))
    node.done()
    return NamespacedName(namespace, name)


def _cluster_domain(spec: Node) -> str:
    """One trailing dot (an absolute name) is allowed; the rest must be a DNS name."""
    domain = spec.str("clusterDomain", default="cluster.local")
    bare = domain[:-1] if domain.endswith(".") else domain
    if bare.endswith("."):
        raise spec.fail("clusterDomain", f"may end with one dot, not more: {domain!r}")
    return check_dns_name(bare, spec.at("clusterDomain"))


def parse_internal_gateway(obj: Mapping[str, Any], issues: Issues) -> InternalGateway:
    meta = parse_meta(obj, issues)
    spec = Node(obj.get("spec") or {}, "spec", issues)
    gateway_node = spec.node("gatewayRef")
    if gateway_node is None:
        raise spec.fail("gatewayRef", "is required: an InternalGateway names exactly one Istio Gateway")
    gateway = _ref(gateway_node, meta.namespace, _check_gateway_name)
    workload = check_labels(spec.str_map("workloadSelector"), spec.at("workloadSelector"))

    address_service, address_ips, shards = None, (), 1
    address = spec.node("address")
    if address is not None:
        service_node = address.node("serviceRef")
        ips = address.str_list("ips")
        if service_node is not None and ips:
            raise FieldError(address.path, "set either serviceRef or ips, not both")
        if service_node is not None:
            address_service = _ref(service_node, meta.namespace, check_service_name)
        shards = address.int("shards", default=1, lo=1, hi=MAX_SHARDS) or 1
        if shards > 1 and address_service is None:
            raise address.fail("shards", "needs serviceRef: shard k is reached through the Service <name>-<k>")
        if shards > 1 and address_service is not None:
            last = f"{address_service.name}-{shards - 1}"
            if not is_dns1035_label(last):
                raise address.fail("shards", f"shard Service name {last!r} is not a valid Service name")
        address_ips = tuple(check_ip(ip, f"{address.at('ips')}[{i}]") for i, ip in enumerate(ips))
        if len(set(address_ips)) != len(address_ips):
            raise address.fail("ips", "lists an address twice")
        if address_service is None and not address_ips:
            raise FieldError(address.path, "must set serviceRef or ips")
        address.done()

    domain = _cluster_domain(spec)
    dns_mode, dns_ttl = "coredns", DEFAULT_TTL
    dns = spec.node("dns")
    if dns is not None:
        dns_mode = dns.str("mode", default="coredns")
        if dns_mode not in DNS_MODES:
            raise dns.fail("mode", f"must be one of {', '.join(DNS_MODES)}, got {dns_mode!r}")
        dns_ttl = dns.int("ttl", default=DEFAULT_TTL, lo=0, hi=MAX_TTL)
        dns.done()
    redirect_mode = "nftables"
    redirect = spec.node("redirect")
    if redirect is not None:
        redirect_mode = redirect.str("mode", default="nftables")
        if redirect_mode not in REDIRECT_MODES:
            raise redirect.fail("mode", f"must be one of {', '.join(REDIRECT_MODES)}, got {redirect_mode!r}")
        redirect.done()
    if dns_mode != "none" and address is None:
        raise spec.fail("address", f"is required when dns.mode is {dns_mode}: rewritten names must point somewhere")
    selector_node = spec.node("namespaceSelector")
    selector = parse_label_selector(selector_node) if selector_node is not None else None
    spec.done()
    return InternalGateway(
        meta=meta,
        gateway=gateway,
        workload_selector=workload,
        address_service=address_service,
        address_ips=address_ips,
        cluster_domain=domain,
        dns_mode=dns_mode,
        dns_ttl=dns_ttl if dns_ttl is not None else DEFAULT_TTL,
        redirect_mode=redirect_mode,
        namespace_selector=selector,
        shards=shards,
    )
