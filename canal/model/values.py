"""Scalar value types shared by the Istio, Kubernetes and Canal parsers: durations, regexes, IPs, selectors."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import re2

from canal.model.base import FieldError, Node

# Envoy refuses regexes whose RE2 program size exceeds the runtime key re2.max_program_size.error_level
# (Envoy's own default is 100; Istio's bootstrap raises it to 32768 and so does Canal's). Checked here so a
# VirtualService is rejected with a reason instead of the whole route configuration being NACKed.
MAX_REGEX_PROGRAM_SIZE = 32768

_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
# Envoy converts durations to int64 nanoseconds and refuses 9223372036 s and up (about 292 years), well inside
# protobuf's own 10,000-year limit.
_MAX_DURATION_MS = 9_223_372_035_999


def parse_duration_ms(text: str, path: str, *, minimum_ms: int = 1) -> int:
    """Istio durations: Go syntax ("1h30m", "250ms") or protobuf JSON ("1.5s"), millisecond precision.

    Istio itself rejects sub-millisecond precision and durations under 1 ms for timeouts and intervals.
    """
    raw = text.strip()
    if raw == "0":
        total_ns = 0
    else:
        if raw.startswith("-"):
            raise FieldError(path, f"must not be negative, got {text!r}")
        pos, total_ns = 0, 0
        for part in _DURATION_PART.finditer(raw):
            if part.start() != pos:
                break
            pos = part.end()
            number, unit = part.groups()
            whole, _, frac = number.partition(".")
            scale = _DURATION_UNITS_NS[unit]
            total_ns += int(whole or 0) * scale + (int(frac) * scale // 10 ** len(frac) if frac else 0)
        if pos != len(raw) or not raw:
            raise FieldError(path, f"is not a duration like 10s, 250ms or 1h30m: {text!r}")
    if total_ns % 1_000_000:
        raise FieldError(path, f"only millisecond precision is supported, got {text!r}")
    ms = total_ns // 1_000_000
    if ms < minimum_ms:
        raise FieldError(path, f"must be at least {minimum_ms}ms, got {text!r}")
    if ms > _MAX_DURATION_MS:
        raise FieldError(path, f"is out of range (Envoy's limit is just under 292 years): {text!r}")
    return ms


def read_duration_ms(node: Node, key: str, *, minimum_ms: int = 1) -> int | None:
    value = node.raw(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise node.fail(key, f"must be a duration string such as '5s', not {value!r}")
    return parse_duration_ms(value, node.at(key), minimum_ms=minimum_ms)


def format_duration_ms(ms: int) -> str:
    """The shortest exact rendering: 1500 -> '1.5s', 120000 -> '120s', 5 -> '0.005s' (protobuf JSON form)."""
    seconds, millis = divmod(ms, 1000)
    return f"{seconds}s" if not millis else f"{seconds}.{millis:03d}".rstrip("0") + "s"


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=4096)
def _regex_problem(pattern: str) -> str | None:
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as err:
        detail = err.args[0] if err.args else err
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return f"invalid RE2 regex: {detail}"
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        return (
            f"regex program size {compiled.programsize} exceeds Envoy's limit of {MAX_REGEX_PROGRAM_SIZE}; simplify it"
        )
    return None


def check_regex(pattern: str, path: str) -> str:
    """Validate with RE2, the engine Envoy uses: Python's `re` accepts lookaheads that Envoy rejects."""
    problem = _regex_problem(pattern)
    if problem:
        raise FieldError(path, problem)
    return pattern


def check_ip(text: str, path: str) -> str:
    """Validate a cluster address; returns its canonical text (IPv6 compressed).

    Python's ipaddress accepts IPv6 zones ("fe80::1%eth0"); Kubernetes (Go's net.ParseIP) does not, and a zone
    names a link of one host, so it cannot be part of an address published in DNS or redirected to on every node.
    """
    if isinstance(text, str) and text.count(".") == 3:
        try:  # the common case, in C; like ipaddress, glibc rejects leading zeros
            socket.inet_pton(socket.AF_INET, text)
            return text
        except OSError:
            pass
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise FieldError(path, f"is not a valid IPv4 or IPv6 address: {text!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise FieldError(
            path,
            f"must not have an IPv6 zone ('%{address.scope_id}'): a zone is local to one host and means nothing "
            f"for a cluster address: {text!r}",
        )
    return str(address)


def is_ipv6(address: str) -> bool:
    return ":" in address


# Kubernetes' name rules (k8s.io/apimachinery/pkg/util/validation); a subdomain's 253 is checked apart.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label: Namespaces
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035 label: Services
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # most kinds
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")  # labels <= 63
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL_SYNTAX = "at most 63 characters, alphanumeric at both ends, only '-', '_', '.' and alphanumerics inside"
_DNS_LABEL_SYNTAX = "at most 63 lower-case alphanumerics or '-'"


def is_dns_label(text: str) -> bool:
    """RFC 1123 label, as Kubernetes checks Namespace names (and Istio subset names)."""
    return bool(_DNS_LABEL.fullmatch(text))


def is_dns1035_label(text: str) -> bool:
    """RFC 1035 label, as Kubernetes checks Service names: like RFC 1123 but starting with a letter."""
    return bool(_DNS_1035_LABEL.fullmatch(text))


def is_dns_subdomain(text: str) -> bool:
    return len(text) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(text))


def check_dns_subdomain(text: str, path: str) -> str:
    if not is_dns_subdomain(text):
        raise FieldError(path, f"must be a lower-case DNS name (RFC 1123), got {text!r}")
    return text


def check_dns_name(text: str, path: str) -> str:
    """A name that goes on the wire (cluster domain, hosts): a DNS subdomain whose labels fit DNS's 63 octets.

    Kubernetes object names (check_dns_subdomain) have no per-label bound; a DNS name does (RFC 1035), and so
    does Istio's host validation.
    """
    check_dns_subdomain(text, path)
    if not _DNS_NAME.fullmatch(text):
        label = max(text.split("."), key=len)
        raise FieldError(
            path, f"must be a lower-case DNS name (RFC 1123): label {label!r} is longer than 63 characters"
        )
    return text


def check_namespace_name(text: str, path: str) -> str:
    if not is_dns_label(text):
        raise FieldError(
            path,
            f"is not a valid namespace name (an RFC 1123 DNS label: {_DNS_LABEL_SYNTAX}, alphanumeric at both "
            f"ends): {text!r}",
        )
    return text


def check_service_name(text: str, path: str) -> str:
    if not is_dns1035_label(text):
        raise FieldError(
            path,
            f"is not a valid Service name (an RFC 1035 DNS label: {_DNS_LABEL_SYNTAX}, starting with a letter, "
            f"ending with a letter or digit): {text!r}",
        )
    return text


def check_header_name(name: str, path: str, *, allow_pseudo: bool = False) -> str:
    """HTTP token characters only; Envoy lower-cases names and rejects anything else."""
    bare = name[1:] if allow_pseudo and name.startswith(":") else name
    if not _HTTP_TOKEN.fullmatch(bare):
        raise FieldError(path, f"is not a valid HTTP header name: {name!r}")
    return name.lower()


# Envoy's HeaderValue.value limit (proto validation); a longer value NACKs the whole route configuration.
MAX_HEADER_VALUE_BYTES = 16384


def check_header_value(value: str, path: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise FieldError(path, "header values must not contain CR, LF or NUL")
    if len(value.encode()) > MAX_HEADER_VALUE_BYTES:
        raise FieldError(path, f"header values are limited to {MAX_HEADER_VALUE_BYTES} bytes")
    return value


# Envoy expands headers_to_add values with its access-log formatter, as Istio passes them through: "%%" is a
# literal percent sign and "%COMMAND%" or "%COMMAND(arg)%" is substituted. Envoy NACKs the whole route
# configuration for a lone "%" or an unknown command, so they are rejected here, per object. The list is the
# commonly used subset of Envoy's commands; tests/test_xds_resources.py has the real Envoy accept every entry.
# Commands that need an argument map to True.
ENVOY_FORMAT_COMMANDS: dict[str, bool] = {
    **dict.fromkeys(("REQ", "RESP", "TRAILER", "DYNAMIC_METADATA", "CLUSTER_METADATA"), True),
    **dict.fromkeys(("UPSTREAM_METADATA", "FILTER_STATE", "UPSTREAM_FILTER_STATE", "ENVIRONMENT"), True),
    **dict.fromkeys(
        (
            "START_TIME",
            "PROTOCOL",
            "UPSTREAM_PROTOCOL",
            "HOSTNAME",
            "REQUESTED_SERVER_NAME",
            "ROUTE_NAME",
            "UPSTREAM_HOST",
            "UPSTREAM_CLUSTER",
            "UPSTREAM_LOCAL_ADDRESS",
            "UPSTREAM_REMOTE_ADDRESS",
            "UPSTREAM_TRANSPORT_FAILURE_REASON",
            "DOWNSTREAM_REMOTE_ADDRESS",
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
            "DOWNSTREAM_REMOTE_PORT",
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
            "DOWNSTREAM_LOCAL_ADDRESS",
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
            "DOWNSTREAM_LOCAL_PORT",
            "DOWNSTREAM_PEER_URI_SAN",
            "DOWNSTREAM_LOCAL_URI_SAN",
            "DOWNSTREAM_PEER_SUBJECT",
            "DOWNSTREAM_TLS_VERSION",
            "CONNECTION_ID",
            "STREAM_ID",
            "RESPONSE_CODE",
            "RESPONSE_CODE_DETAILS",
            "RESPONSE_FLAGS",
            "BYTES_RECEIVED",
            "BYTES_SENT",
            "DURATION",
            "REQUEST_DURATION",
            "RESPONSE_DURATION",
        ),
        False,
    ),
}
_FORMAT_COMMAND = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")


def check_header_format(value: str, path: str) -> str:
    """A header value Envoy will expand: plain text, "%%", or a known "%COMMAND(arg)%"."""
    check_header_value(value, path)
    pos = value.find("%")
    while pos != -1:
        if value.startswith("%%", pos):
            pos = value.find("%", pos + 2)
            continue
        command = _FORMAT_COMMAND.match(value, pos)
        if command is None:
            raise FieldError(
                path, f"'%' at offset {pos} starts an Envoy format command; write '%%' for a literal percent sign"
            )
        name, argument = command.group(1), command.group(2)
        if name not in ENVOY_FORMAT_COMMANDS:
            raise FieldError(path, f"%{name}% is not an Envoy format command Canal supports")
        if ENVOY_FORMAT_COMMANDS[name] and not argument:
            raise FieldError(path, f"%{name}(...)% needs an argument")
        pos = value.find("%", command.end())
    return value


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes LabelSelector semantics: an empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.expressions)


def _label_key_problem(key: str) -> str | None:
    """Kubernetes' qualified name: [prefix/]name, the prefix a DNS subdomain (<= 253), the name a label name."""
    parts = key.split("/")
    if len(parts) > 2:
        return "has more than one '/'"
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return "the prefix before '/' must not be empty"
        if not is_dns_subdomain(prefix):
            return "the prefix before '/' must be a lower-case DNS subdomain (RFC 1123) of at most 253 characters"
    which = "the name after the prefix" if len(parts) == 2 else "the name"
    if not name:
        return f"{which} must not be empty"
    if not _LABEL_NAME.fullmatch(name):
        return f"{which} must be {_LABEL_SYNTAX}"
    return None


def check_label_key(key: str, path: str) -> str:
    problem = _label_key_problem(key)
    if problem:
        raise FieldError(path, f"is not a valid label key: {key!r}: {problem}")
    return key


def check_label_value(value: str, path: str) -> str:
    """Empty, or a label name: the same charset and bound as the name part of a key."""
    if value and not _LABEL_NAME.fullmatch(value):
        raise FieldError(path, f"is not a valid label value: {value!r}: must be empty or {_LABEL_SYNTAX}")
    return value


def check_labels(labels: Mapping[str, str], path: str) -> tuple[tuple[str, str], ...]:
    for key, value in labels.items():
        check_label_key(key, path)  # at the map: a key is not a field of its own
        check_label_value(value, f"{path}.{key}")
    return tuple(sorted(labels.items()))


def parse_label_selector(node: Node) -> LabelSelector:
    match_labels = check_labels(node.str_map("matchLabels"), node.at("matchLabels"))
    expressions = []
    for expr in node.nodes("matchExpressions"):
        key = check_label_key(expr.str("key", required=True), expr.at("key"))
        operator = expr.str("operator", required=True)
        values = expr.str_list("values")
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise expr.fail("operator", f"must be In, NotIn, Exists or DoesNotExist, got {operator!r}")
        if operator in ("In", "NotIn") and not values:
            raise expr.fail("values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise expr.fail("values", f"must be empty for operator {operator}")
        for i, value in enumerate(values):
            check_label_value(value, f"{expr.at('values')}[{i}]")
        expr.done()
        expressions.append(Requirement(key, operator, tuple(sorted(values))))
    node.done()
    return LabelSelector(match_labels, tuple(expressions))
