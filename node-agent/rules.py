"""The node agent's input: redirect rules, parsed and validated from either source into one model.

Both sources (the JSON of `canal render --only redirects --format json`, and the xDS RedirectRule resources) end
up as ``Rules``: a mapping RedirectKey -> RedirectRule from canal.desired, the same types the translator produces.
Validation is strict and names the rule and field, because the kernel backends turn whatever they get into NAT
rules: a bad address must be an error here, never a half-applied nft transaction.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any

from canal.desired import Backend, RedirectKey, RedirectRule
from canal.serialize import key_text, to_data

Rules = Mapping[RedirectKey, RedirectRule]

PROTOCOLS = frozenset({"tcp"})
MODES = frozenset({"nftables", "ipvs"})


class RuleError(ValueError):
    """One rule (or the document) is invalid; the message names it and the field."""


def _address(value: Any, where: str, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str) or not value:
        raise RuleError(f"{where}: {field}: expected an IP address, got {value!r}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise RuleError(f"{where}: {field}: {value!r} is not an IP address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise RuleError(f"{where}: {field}: {value} cannot be redirected (unspecified, multicast or loopback)")
    return address


def _port(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RuleError(f"{where}: {field}: expected a port 1-65535, got {value!r}")
    return value


def make_rule(
    cluster_ip: Any,
    protocol: Any,
    port: Any,
    backends: Iterable[tuple[Any, Any]],
    service: Any,
    gateway: Any,
    mode: Any,
    where: str,
) -> RedirectRule:
    """One validated rule; addresses in canonical form (compressed IPv6), backends sorted and unique."""
    ip = _address(cluster_ip, where, "cluster_ip")
    if protocol not in PROTOCOLS:
        raise RuleError(f"{where}: protocol: {protocol!r} is not supported (supported: {', '.join(sorted(PROTOCOLS))})")
    key = RedirectKey(str(ip), protocol, _port(port, where, "port"))
    out: set[Backend] = set()
    for i, (address, backend_port) in enumerate(backends):
        field = f"backends[{i}]"
        backend_ip = _address(address, where, f"{field}.address")
        if backend_ip.version != ip.version:
            raise RuleError(
                f"{where}: {field}.address: {backend_ip} is IPv{backend_ip.version}, the ClusterIP is IPv{ip.version}"
            )
        if backend_ip == ip:
            raise RuleError(f"{where}: {field}.address: {backend_ip} is the ClusterIP itself (a redirect loop)")
        out.add(Backend(str(backend_ip), _port(backend_port, where, f"{field}.port")))
    if not out:
        raise RuleError(f"{where}: backends: at least one gateway backend is required")
    if mode not in MODES:
        raise RuleError(f"{where}: mode: {mode!r} is not one of {', '.join(sorted(MODES))}")
    for field, value in (("service", service), ("gateway", gateway)):
        if not isinstance(value, str):
            raise RuleError(f"{where}: {field}: expected a string, got {value!r}")
    return RedirectRule(key, tuple(sorted(out, key=_backend_order)), service, gateway, mode)


def _backend_order(backend: Backend) -> tuple[int, int, int]:
    address = ipaddress.ip_address(backend.address)
    return address.version, int(address), backend.port


def collect(rules: Iterable[RedirectRule]) -> dict[RedirectKey, RedirectRule]:
    """Key the rules; the same ClusterIP:port twice is an error (two gateways cannot both own it)."""
    out: dict[RedirectKey, RedirectRule] = {}
    for rule in rules:
        other = out.get(rule.key)
        if other is not None and other != rule:
            raise RuleError(
                f"redirect {key_text(rule.key)}: claimed twice (service {other.service} of {other.gateway}, "
                f"service {rule.service} of {rule.gateway})"
            )
        out[rule.key] = rule
    return dict(sorted(out.items()))


def parse_key(text: str, where: str) -> tuple[str, str, int]:
    """ "10.96.0.1:80/tcp" or "[fd00::1]:80/tcp" -> (ip, protocol, port)."""
    address_port, slash, protocol = text.rpartition("/")
    host, colon, port = address_port.rpartition(":")
    if not slash or not colon or not host or not port.isdigit():
        raise RuleError(f"{where}: key: {text!r} is not <cluster ip>:<port>/<protocol>")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise RuleError(f"{where}: key: {text!r}: an IPv6 ClusterIP is written in brackets")
    return host, protocol, int(port)


def from_json(text: str | bytes, source: str) -> dict[RedirectKey, RedirectRule]:
    """The output of `canal render --only redirects --format json` (or any document with a "redirects" list)."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise RuleError(f"{source}: not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("redirects", []), list):
        raise RuleError(f'{source}: expected an object with a "redirects" list')
    rules = []
    for i, item in enumerate(document.get("redirects", [])):
        where = f"{source}: redirects[{i}]"
        if not isinstance(item, dict):
            raise RuleError(f"{where}: expected an object, got {type(item).__name__}")
        key = item.get("key")
        if not isinstance(key, str):
            raise RuleError(f"{where}: key: expected a string, got {key!r}")
        where = f"{source}: redirect {key}"
        ip, protocol, port = parse_key(key, where)
        backends = item.get("backends")
        if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
            raise RuleError(f"{where}: backends: expected a list of {{address, port}} objects")
        pairs = [(b.get("address"), b.get("port")) for b in backends]
        rules.append(
            make_rule(
                ip, protocol, port, pairs, item.get("service", ""), item.get("gateway", ""), item.get("mode"), where
            )
        )
    return collect(rules)


def from_protos(messages: Iterable[Any], source: str = "xds") -> dict[RedirectKey, RedirectRule]:
    """canal.xds.v1.RedirectRule messages (as received over ADS)."""
    rules = []
    for message in messages:
        host = f"[{message.cluster_ip}]" if ":" in message.cluster_ip else message.cluster_ip
        where = f"{source}: redirect {host}:{message.port}/{message.protocol}"
        pairs = [(b.address, b.port) for b in message.backends]
        rules.append(
            make_rule(
                message.cluster_ip,
                message.protocol,
                message.port,
                pairs,
                message.service,
                message.gateway,
                message.mode,
                where,
            )
        )
    return collect(rules)


def for_mode(rules: Rules, mode: str) -> dict[RedirectKey, RedirectRule]:
    """The rules a backend installs: those whose gateway asked for its mode (redirect.mode of the gateway)."""
    return {key: rule for key, rule in rules.items() if rule.mode == mode}


def to_json(rules: Rules) -> str:
    """The same shape `canal render --only redirects --format json` prints (round-trips through from_json)."""
    return json.dumps({"redirects": [to_data(rules[k]) for k in sorted(rules)]}, indent=2, sort_keys=True) + "\n"
