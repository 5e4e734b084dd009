"""How names meet: VirtualService hosts to Services, Services to virtual-host domains, hosts to Gateway servers."""

from __future__ import annotations

from canal.model.istio import ServerHost
from canal.model.kube import Service
from canal.model.values import is_ipv6


def host_candidates(host: str, namespace: str, domain: str) -> tuple[str, ...]:
    """FQDNs a host may mean, most specific first.

    Istio expands only dot-less short names (relative to the object's namespace). Canal also accepts the
    `svc.ns` and `svc.ns.svc` forms that clients use, because its virtual hosts answer to them too.
    """
    if host.endswith("." + domain):
        return (host,)
    dots = host.count(".")
    if dots == 0:
        return (f"{host}.{namespace}.svc.{domain}",)
    if dots == 1:
        return (host, f"{host}.svc.{domain}")
    if dots == 2 and host.endswith(".svc"):
        return (host, f"{host}.{domain}")
    return (host,)


def split_service_fqdn(fqdn: str, domain: str) -> tuple[str, str] | None:
    """(namespace, name) when the FQDN has the shape of a Service name in this cluster domain."""
    suffix = ".svc." + domain
    if not fqdn.endswith(suffix):
        return None
    parts = fqdn[: -len(suffix)].split(".")
    if len(parts) != 2:
        return None
    return parts[1], parts[0]


def short_name(service: Service) -> str:
    return service.meta.name


def service_domains(service: Service, domain: str, port: int) -> tuple[str, ...]:
    """Every Host header a client of this Service port may send, with and without the port.

    Includes the cluster IPs: clients with hard-coded IPs (redirected by the node agent) send those.
    """
    name, ns = service.meta.name, service.meta.namespace
    names = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{domain}"]
    for ip in service.cluster_ips:
        names.append(f"[{ip}]" if is_ipv6(ip) else ip)
    out = []
    for n in names:
        out.append(n)
        out.append(f"{n}:{port}")
    return tuple(out)


def contestable(domains: tuple[str, ...], is_service: bool) -> tuple[str, ...]:
    """The domains another host could also claim on the same port.

    A Service's qualified names (`svc.ns`, ...) are unique to it; only its short name and its IP forms can
    collide (with a namesake elsewhere, or a literal IP host). service_domains() puts the short name first
    and the IPs last. Any other host's names are all contestable.
    """
    return domains[:2] + domains[8:] if is_service else domains


def literal_domains(host: str, port: int) -> tuple[str, ...]:
    if host == "*":
        return ("*",)
    return (host, f"{host}:{port}")


def dns_matches(pattern: str, host: str) -> bool:
    """Istio host matching: `*` matches all, `*.x` matches names under x (and wildcards narrower than it)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return pattern == host


def server_admits(server_host: ServerHost, gateway_namespace: str, vs_namespace: str, host: str) -> bool:
    ns = server_host.namespace
    if ns == "~" or (ns == "." and vs_namespace != gateway_namespace) or ns not in ("*", ".", vs_namespace):
        return False
    if host == "*":
        return server_host.dns == "*"
    return dns_matches(server_host.dns, host)


def cluster_name(port: int, subset: str, fqdn: str) -> str:
    return f"outbound|{port}|{subset}|{fqdn}"
