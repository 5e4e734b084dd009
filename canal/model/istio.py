"""Istio networking objects (v1, v1beta1 and v1alpha3 share one schema): Gateway, VirtualService, DestinationRule.

Validation follows Istio's own validator where it is stricter than the CRD schema, plus what Envoy would NACK
(RE2 program size, pseudo-header edits, redirect codes), and rejects match conditions a gateway cannot evaluate
(source labels, source namespace) rather than silently widening a route.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from canal.model.base import INT32_MAX, UINT32_MAX, FieldError, Issues, Meta, Node, ObjectRef, parse_meta
from canal.model.values import (
    check_dns_name,
    check_header_format,
    check_header_name,
    check_header_value,
    check_labels,
    check_regex,
    is_dns_label,
    read_duration_ms,
)

MESH_GATEWAY = "mesh"

# Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on conditions (Istio validates against the same list).
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
GRPC_STATUS = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
REDIRECT_CODES = (301, 302, 303, 307, 308)  # the only codes Envoy's RedirectAction can send
CORS_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"})
GATEWAY_PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS")
HTTP_SERVER_PROTOCOLS = frozenset({"HTTP", "GRPC", "GRPC-WEB", "HTTP2"})
TCP_SERVER_PROTOCOLS = frozenset({"TCP", "MONGO"})
_DIRECT_RESPONSE_MAX_BYTES = 1024 * 1024
MAGLEV_MAX_TABLE_SIZE = 5000011  # Envoy's validation bound on MaglevLbConfig.table_size


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


# --------------------------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # "exact", "prefix" or "regex"
    value: str


def parse_string_match(node: Node, *, allow_empty: bool = False) -> StringMatch | None:
    """Exactly one of exact/prefix/regex; `{}` means "present" where Istio allows it (headers)."""
    kinds = [k for k in ("exact", "prefix", "regex") if node.has(k)]
    node.seen.update(("exact", "prefix", "regex"))
    node.done()
    if not kinds:
        if allow_empty:
            return None
        raise FieldError(node.path, "must set one of exact, prefix or regex")
    if len(kinds) > 1:
        raise FieldError(node.path, f"sets {' and '.join(kinds)}; only one match kind is allowed")
    kind = kinds[0]
    value = node.str(kind)
    if kind == "regex":
        if not value:
            raise node.fail(kind, "regex must not be empty")
        check_regex(value, node.at(kind))
    elif kind == "prefix" and not value:
        raise node.fail(kind, "prefix must not be empty")
    return StringMatch(kind, value)


@dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()
    authority: str = ""  # request.set of host/:authority, which Envoy can only express as a host rewrite


_HOST_HEADERS = frozenset({"host", ":authority"})


def _parse_header_ops(node: Node | None, *, request: bool) -> tuple[HeaderOps, str]:
    if node is None:
        return HeaderOps(), ""
    authority = ""
    out: dict[str, tuple] = {}
    for op in ("set", "add"):
        pairs = []
        for name, value in sorted(node.str_map(op).items()):
            path = f"{node.at(op)}.{name}"
            lowered = name.lower()
            if lowered in _HOST_HEADERS and request and op == "set":
                authority = check_header_value(value, path)
                continue
            if lowered.startswith(":") or lowered in _HOST_HEADERS:
                raise FieldError(
                    path, "pseudo-headers and Host cannot be set or added (use rewrite.uri or rewrite.authority)"
                )
            pairs.append((check_header_name(name, path), check_header_format(value, path)))
        out[op] = tuple(pairs)
    removes = []
    for path, name in node.items("remove"):
        if not isinstance(name, str):
            raise FieldError(path, "must be a header name")
        if name.startswith(":") or name.lower() in _HOST_HEADERS:
            raise FieldError(path, "pseudo-headers and Host cannot be removed")
        removes.append(check_header_name(name, path))
    node.done()
    return HeaderOps(out["set"], out["add"], tuple(sorted(set(removes)))), authority


def parse_headers(node: Node | None) -> Headers:
    if node is None:
        return Headers()
    request, authority = _parse_header_ops(node.node("request"), request=True)
    response, _ = _parse_header_ops(node.node("response"), request=False)
    node.done()
    return Headers(request, response, authority)


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None
    path: str = ""  # where it was written, for rejections found later (unknown subset, missing Service)


def parse_destination(node: Node) -> Destination:
    host = node.str("host", required=True).strip().lower()
    if host == "*" or "*" in host:
        raise node.fail("host", f"a destination must name one host, not a wildcard: {host!r}")
    check_dns_name(host, node.at("host"))
    subset = node.str("subset")
    if subset and not is_dns_label(subset):
        raise node.fail("subset", f"is not a valid subset name (DNS label): {subset!r}")
    port = None
    port_node = node.node("port")
    if port_node is not None:
        port = port_node.int("number", lo=1, hi=65535)
        port_node.done()
    node.done()
    return Destination(host, subset, port, node.path)


def _percentage(node: Node, key: str) -> float | None:
    """Istio Percent message {value: 0..100}."""
    pct = node.node(key)
    if pct is None:
        return None
    value = pct.number("value", lo=0.0, hi=100.0)
    pct.done()
    return 0.0 if value is None else value


# ----------------------------------------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class ServerHost:
    namespace: str  # "*", "." (the Gateway's namespace), "~" (none) or a namespace name
    dns: str  # "*", "*.suffix" or an exact name


@dataclass(frozen=True, slots=True)
class Server:
    port: int
    protocol: str
    port_name: str
    hosts: tuple[ServerHost, ...]
    tls: bool
    path: str


@dataclass(frozen=True, slots=True)
class Gateway:
    meta: Meta
    selector: Mapping[str, str]
    servers: tuple[Server, ...]

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Gateway", self.meta.namespace, self.meta.name)


def _parse_server_host(text: str, path: str) -> ServerHost:
    namespace, sep, dns = text.partition("/")
    if not sep:
        namespace, dns = "*", text
    if not namespace or not dns:
        raise FieldError(path, f"must be <namespace>/<dns name> or <dns name>, got {text!r}")
    if namespace not in ("*", ".", "~") and not is_dns_label(namespace):
        raise FieldError(path, f"namespace part must be *, ., ~ or a namespace name, got {namespace!r}")
    dns = dns.lower()
    if dns != "*":
        bare = dns[2:] if dns.startswith("*.") else dns
        check_dns_name(bare, path)
    return ServerHost(namespace, dns)


def parse_gateway(obj: Mapping[str, Any], issues: Issues) -> Gateway:
    meta = parse_meta(obj, issues)
    spec = Node(obj.get("spec") or {}, "spec", issues)
    selector = spec.str_map("selector")
    check_labels(selector, spec.at("selector"))

    def server(path: str, raw: Any) -> Server:
        node = Node(raw, path, issues)
        port_node = node.node("port")
        if port_node is None:
            raise node.fail("port", "is required")
        number = port_node.int("number", lo=1, hi=65535)
        if number is None:
            raise port_node.fail("number", "is required")
        protocol = port_node.enum("protocol", GATEWAY_PROTOCOLS, default="")
        port_node.unsupported("targetPort", "the gateway listens on the port number")
        name = port_node.str("name")
        port_node.done()
        hosts = tuple(_parse_server_host(h, f"{node.at('hosts')}[{i}]") for i, h in enumerate(node.str_list("hosts")))
        if not hosts:
            raise node.fail("hosts", "at least one host is required")
        tls = node.has("tls")
        node.unsupported("bind", "gateway listeners bind all addresses")
        node.unsupported("defaultEndpoint", "only used by sidecars")
        node.str("name")
        node.done(ignored=("tls",))
        return Server(number, protocol, name, hosts, tls, path)

    servers = issues.each(spec.items("servers"), server)
    if not spec.items("servers"):
        issues.errors.append(FieldError("spec.servers", "at least one server is required"))
    protocols: dict[int, tuple[str, str]] = {}
    for s in servers:
        seen = protocols.setdefault(s.port, (s.protocol, s.path))
        if _listener_kind(seen[0]) != _listener_kind(s.protocol):
            issues.errors.append(
                FieldError(f"{s.path}.port.protocol", f"port {s.port} is already {seen[0]} at {seen[1]}")
            )
    spec.done()
    return Gateway(meta, selector, tuple(servers))


def _listener_kind(protocol: str) -> str:
    if protocol in HTTP_SERVER_PROTOCOLS:
        return "http"
    if protocol in TCP_SERVER_PROTOCOLS:
        return "tcp"
    return protocol.lower()


def listener_kind(protocol: str) -> str:
    """ "http", "tcp", or the protocol name for kinds Canal does not serve (https, tls)."""
    return _listener_kind(protocol)


# ---------------------------------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    name: str
    match: StringMatch | None  # None: the header must be present (or absent, when inverted)
    invert: bool = False


@dataclass(frozen=True, slots=True)
class HttpMatch:
    path: str
    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[HeaderCondition, ...] = ()
    query_params: tuple[tuple[str, StringMatch | None], ...] = ()
    port: int | None = None
    gateways: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True, slots=True)
class WeightedDestination:
    destination: Destination
    weight: int
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: str = ""  # FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT
    scheme: str = ""
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None  # replaces the matched prefix (or the whole path for exact/regex matches)
    authority: str = ""
    regex_match: str = ""
    regex_substitution: str = ""


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout_ms: int | None = None
    retry_on: tuple[str, ...] = ()
    retriable_status_codes: tuple[int, ...] = ()
    retry_remote_localities: bool = False
    backoff_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    delay_ms: int | None = None
    delay_percent: float = 100.0
    abort_http_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_s: int | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str = "FORWARD"


@dataclass(frozen=True, slots=True)
class HttpRoute:
    path: str
    name: str
    matches: tuple[HttpMatch, ...]
    destinations: tuple[WeightedDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout_ms: int | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: CorsPolicy | None = None
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class TcpMatch:
    path: str
    port: int | None = None
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TcpRoute:
    path: str
    matches: tuple[TcpMatch, ...]
    destinations: tuple[WeightedDestination, ...]


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]
    http: tuple[HttpRoute, ...] = ()
    tcp: tuple[TcpRoute, ...] = ()

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("VirtualService", self.meta.namespace, self.meta.name)


def _reject_unevaluable(node: Node, keys: tuple[str, ...]) -> None:
    for key in keys:
        if node.has(key):
            raise node.fail(
                key,
                "cannot be evaluated at a shared gateway (the client has no sidecar identity); "
                "ignoring it would widen the route",
            )


def _parse_http_match(node: Node) -> HttpMatch:
    _reject_unevaluable(node, ("sourceLabels", "sourceNamespace"))
    node.unsupported("statPrefix", "per-route stats are not generated")
    uri_node = node.node("uri")
    uri = parse_string_match(uri_node) if uri_node is not None else None
    scheme = _optional_match(node, "scheme")
    method = _optional_match(node, "method")
    authority = _optional_match(node, "authority")
    headers = []
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        raw = node.raw(key)
        if raw is None:
            continue
        if not isinstance(raw, Mapping):
            raise node.fail(key, "must be a mapping of header name to match")
        for name, spec in sorted(raw.items(), key=lambda kv: str(kv[0])):
            path = f"{node.at(key)}.{name}"
            lowered = check_header_name(str(name), path, allow_pseudo=True)
            headers.append(
                HeaderCondition(
                    lowered, parse_string_match(Node(spec or {}, path, node.issues), allow_empty=True), invert
                )
            )
    query = []
    raw_query = node.raw("queryParams")
    if raw_query is not None:
        if not isinstance(raw_query, Mapping):
            raise node.fail("queryParams", "must be a mapping of parameter name to match")
        for name, spec in sorted(raw_query.items(), key=lambda kv: str(kv[0])):
            path = f"{node.at('queryParams')}.{name}"
            if not str(name):
                raise FieldError(node.at("queryParams"), "query parameter names must not be empty")
            query.append((str(name), parse_string_match(Node(spec or {}, path, node.issues), allow_empty=True)))
    match = HttpMatch(
        path=node.path,
        uri=uri,
        ignore_uri_case=node.bool("ignoreUriCase"),
        scheme=scheme,
        method=method,
        authority=authority,
        headers=tuple(headers),
        query_params=tuple(query),
        port=node.int("port", lo=1, hi=65535),
        gateways=node.str_list("gateways"),
        name=node.str("name"),
    )
    node.done()
    return match


def _optional_match(node: Node, key: str) -> StringMatch | None:
    sub = node.node(key)
    return parse_string_match(sub) if sub is not None else None


def _parse_weighted(items: list[tuple[str, Any]], issues: Issues, *, http: bool) -> tuple[WeightedDestination, ...]:
    out = []
    for path, raw in items:
        node = Node(raw, path, issues)
        dest_node = node.node("destination")
        if dest_node is None:
            raise node.fail("destination", "is required")
        weight = node.int("weight", default=0, lo=0, hi=INT32_MAX) or 0
        headers = parse_headers(node.node("headers")) if http else Headers()
        if headers.authority:
            raise FieldError(f"{path}.headers.request.set", "Host cannot be set per destination")
        out.append(WeightedDestination(parse_destination(dest_node), weight, headers))
        node.done()
    if len(out) == 1:
        only = out[0]
        if only.weight not in (0, 100):  # Istio ignores it too; say so rather than reject a working route
            issues.caveats.append(
                (f"{items[0][0]}.weight", f"ignored: a single destination takes all traffic (weight {only.weight})")
            )
        out[0] = WeightedDestination(only.destination, 100, only.headers)
    elif len(out) > 1:
        total = sum(d.weight for d in out)
        if total != 100:
            base = items[0][0].rsplit("[", 1)[0]
            raise FieldError(base, f"destination weights must sum to 100, got {total}")
    return tuple(out)


def _parse_retries(node: Node) -> Retries:
    attempts = node.int("attempts", default=0, lo=0, hi=INT32_MAX) or 0
    per_try = read_duration_ms(node, "perTryTimeout")
    retry_on_text = node.str("retryOn")
    backoff = read_duration_ms(node, "backoff")
    remote = node.raw("retryRemoteLocalities")
    if remote is not None and not isinstance(remote, bool):
        raise node.fail("retryRemoteLocalities", "must be true or false")
    if attempts == 0 and (per_try is not None or retry_on_text or backoff is not None):
        raise node.fail("attempts", "is 0 (retries disabled) but other retry settings are given")
    conditions, codes = [], []
    for part in (p.strip() for p in retry_on_text.split(",") if p.strip()):
        if part.isdigit():
            code = int(part)
            if not 100 <= code <= 599:
                raise node.fail("retryOn", f"{part!r} is not an HTTP status code")
            codes.append(code)
        elif part in RETRY_ON:
            conditions.append(part)
        else:
            raise node.fail("retryOn", f"{part!r} is not a retry condition Envoy knows")
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    node.done()
    return Retries(
        attempts=attempts,
        per_try_timeout_ms=per_try,
        retry_on=tuple(conditions),
        retriable_status_codes=tuple(sorted(set(codes))),
        retry_remote_localities=bool(remote),
        backoff_ms=backoff,
    )


def _parse_fault(node: Node) -> Fault:
    delay_node, abort_node = node.node("delay"), node.node("abort")
    if delay_node is None and abort_node is None:
        raise FieldError(node.path, "must have a delay and/or an abort")
    fault: dict[str, Any] = {}
    if delay_node is not None:
        if delay_node.has("exponentialDelay"):
            raise delay_node.fail("exponentialDelay", "is not supported by Envoy; use fixedDelay")
        fixed = read_duration_ms(delay_node, "fixedDelay")
        if fixed is None:
            raise delay_node.fail("fixedDelay", "is required")
        fault["delay_ms"] = fixed
        fault["delay_percent"] = _fault_percent(delay_node)
        delay_node.done()
    if abort_node is not None:
        if abort_node.has("http2Error"):
            raise abort_node.fail("http2Error", "HTTP/2 error aborts are not supported; use httpStatus or grpcStatus")
        status = abort_node.int("httpStatus", lo=200, hi=599)
        grpc = abort_node.str("grpcStatus")
        if (status is None) == (not grpc):
            raise FieldError(abort_node.path, "must set exactly one of httpStatus or grpcStatus")
        if grpc:
            code = GRPC_STATUS.get(grpc.upper())
            if code is None:
                raise abort_node.fail("grpcStatus", f"unknown gRPC status {grpc!r} (use a name such as UNAVAILABLE)")
            fault["abort_grpc_status"] = code
        else:
            fault["abort_http_status"] = status
        fault["abort_percent"] = _fault_percent(abort_node)
        abort_node.done()
    node.done()
    return Fault(**fault)


def _fault_percent(node: Node) -> float:
    pct = _percentage(node, "percentage")
    legacy = node.int("percent", lo=0, hi=100)
    if pct is not None and legacy is not None:
        raise node.fail("percent", "set either percentage or the deprecated percent, not both")
    if pct is not None:
        return pct
    return 100.0 if legacy is None else float(legacy)


def _parse_cors(node: Node) -> CorsPolicy:
    origins = [parse_string_match(Node(raw, path, node.issues)) for path, raw in node.items("allowOrigins")]
    origins += [StringMatch("exact", o) for o in node.str_list("allowOrigin")]
    methods = node.str_list("allowMethods")
    for i, method in enumerate(methods):
        if method not in CORS_METHODS:
            raise FieldError(f"{node.at('allowMethods')}[{i}]", f"{method!r} is not an HTTP method")
    allow_headers = node.str_list("allowHeaders")
    expose_headers = node.str_list("exposeHeaders")
    for key, names in (("allowHeaders", allow_headers), ("exposeHeaders", expose_headers)):
        for i, name in enumerate(names):
            if name != "*":
                check_header_name(name, f"{node.at(key)}[{i}]")
    max_age = read_duration_ms(node, "maxAge", minimum_ms=0)
    if max_age is not None and max_age % 1000:
        raise node.fail("maxAge", "is accurate only to whole seconds")
    credentials = node.raw("allowCredentials")
    if credentials is not None and not isinstance(credentials, bool):
        raise node.fail("allowCredentials", "must be true or false")
    unmatched = node.enum("unmatchedPreflights", ("UNSPECIFIED", "FORWARD", "IGNORE"), default="FORWARD")
    node.done()
    return CorsPolicy(
        allow_origins=tuple(o for o in origins if o is not None),
        allow_methods=methods,
        allow_headers=allow_headers,
        expose_headers=expose_headers,
        max_age_s=None if max_age is None else max_age // 1000,
        allow_credentials=credentials,
        unmatched_preflights="FORWARD" if unmatched == "UNSPECIFIED" else unmatched,
    )


def _parse_redirect(node: Node) -> Redirect:
    port = node.int("port", lo=1, hi=65535)
    derive = node.enum("derivePort", ("", "FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"), default="")
    if port is not None and derive:
        raise node.fail("derivePort", "set either port or derivePort, not both")
    scheme = node.str("scheme")
    if scheme not in ("", "http", "https"):
        raise node.fail("scheme", f"must be http or https, got {scheme!r}")
    code = node.int("redirectCode", default=301) or 301
    if code not in REDIRECT_CODES:
        raise node.fail("redirectCode", f"Envoy can only send {', '.join(map(str, REDIRECT_CODES))}, got {code}")
    redirect = Redirect(
        uri=_header_safe(node, "uri"),
        authority=_header_safe(node, "authority"),
        port=port,
        derive_port=derive,
        scheme=scheme,
        code=code,
    )
    if not (redirect.uri or redirect.authority or redirect.port or redirect.derive_port or redirect.scheme):
        raise FieldError(node.path, "must set at least one of uri, authority, port, derivePort or scheme")
    node.done()
    return redirect


def _parse_direct_response(node: Node) -> DirectResponse:
    status = node.int("status", lo=200, hi=599)
    if status is None:
        raise node.fail("status", "is required")
    body = None
    body_node = node.node("body")
    if body_node is not None:
        text, encoded = body_node.raw("string"), body_node.raw("bytes")
        if (text is None) == (encoded is None):
            raise FieldError(body_node.path, "must set exactly one of string or bytes")
        if text is not None:
            body = body_node.str("string").encode()
        else:
            try:
                body = base64.b64decode(body_node.str("bytes"), validate=True)
            except (binascii.Error, ValueError):
                raise body_node.fail("bytes", "must be base64") from None
        if len(body) > _DIRECT_RESPONSE_MAX_BYTES:
            raise FieldError(body_node.path, "direct response bodies are limited to 1 MiB")
        body_node.done()
    node.done()
    return DirectResponse(status, body)


def _header_safe(node: Node, key: str) -> str:
    """Paths and authorities end up in HTTP headers; Envoy rejects CR, LF and NUL in them."""
    return check_header_value(node.str(key), node.at(key))


def _parse_rewrite(node: Node) -> Rewrite:
    uri = node.raw("uri")
    if uri is not None:
        uri = _header_safe(node, "uri")
    regex_node = node.node("uriRegexRewrite")
    authority = _header_safe(node, "authority")
    if uri is not None and regex_node is not None:
        raise node.fail("uriRegexRewrite", "set either uri or uriRegexRewrite, not both")
    regex_match = regex_sub = ""
    if regex_node is not None:
        regex_match = check_regex(regex_node.str("match", required=True), regex_node.at("match"))
        regex_sub = check_header_value(regex_node.str("rewrite", required=True), regex_node.at("rewrite"))
        regex_node.done()
    if uri is None and regex_node is None and not authority:
        raise FieldError(node.path, "must set at least one of uri, uriRegexRewrite or authority")
    node.done()
    return Rewrite(uri=uri, authority=authority, regex_match=regex_match, regex_substitution=regex_sub)


def _parse_mirrors(node: Node) -> tuple[Mirror, ...]:
    single, many = node.node("mirror"), node.items("mirrors")
    if single is not None and many:
        raise node.fail("mirrors", "set either mirror or mirrors, not both")
    if single is not None:
        pct = _percentage(node, "mirrorPercentage")
        legacy = node.int("mirrorPercent", lo=0, hi=100)
        if pct is None and legacy is not None:
            pct = float(legacy)
        return (Mirror(parse_destination(single), 100.0 if pct is None else pct),)
    for key in ("mirrorPercentage", "mirrorPercent"):
        if node.has(key):
            raise node.fail(key, "needs mirror (with mirrors, set percentage on each entry)")
    out = []
    for path, raw in many:
        entry = Node(raw, path, node.issues)
        dest = entry.node("destination")
        if dest is None:
            raise entry.fail("destination", "is required")
        pct = _percentage(entry, "percentage")
        entry.done()
        out.append(Mirror(parse_destination(dest), 100.0 if pct is None else pct))
    return tuple(out)


def _parse_http_route(node: Node) -> HttpRoute:
    if node.has("delegate"):
        raise node.fail("delegate", "delegate VirtualServices are not supported by Canal")
    matches = tuple(_parse_http_match(Node(raw, path, node.issues)) for path, raw in node.items("match"))
    destinations = _parse_weighted(node.items("route"), node.issues, http=True)
    redirect_node, direct_node = node.node("redirect"), node.node("directResponse")
    actions = [
        k
        for k, present in (
            ("route", destinations),
            ("redirect", redirect_node),
            ("directResponse", direct_node),
        )
        if present
    ]
    if not actions:
        raise FieldError(node.path, "must have one of route, redirect or directResponse")
    if len(actions) > 1:
        raise FieldError(node.path, f"has {' and '.join(actions)}; only one is allowed")
    rewrite_node = node.node("rewrite")
    if rewrite_node is not None and not destinations:
        raise node.fail("rewrite", f"cannot be used with {actions[0]}")
    headers = parse_headers(node.node("headers"))
    rewrite = _parse_rewrite(rewrite_node) if rewrite_node is not None else None
    if headers.authority and rewrite is not None and rewrite.authority:
        raise node.fail("headers", "sets Host while rewrite.authority is also set")
    retries_node, fault_node, cors_node = node.node("retries"), node.node("fault"), node.node("corsPolicy")
    mirrors = _parse_mirrors(node)
    if mirrors and not destinations:
        raise node.fail("mirror", "mirroring needs a route destination")
    route = HttpRoute(
        path=node.path,
        name=node.str("name"),
        matches=matches,
        destinations=destinations,
        redirect=_parse_redirect(redirect_node) if redirect_node is not None else None,
        direct_response=_parse_direct_response(direct_node) if direct_node is not None else None,
        rewrite=rewrite,
        timeout_ms=read_duration_ms(node, "timeout", minimum_ms=0),
        retries=_parse_retries(retries_node) if retries_node is not None else None,
        fault=_parse_fault(fault_node) if fault_node is not None else None,
        mirrors=mirrors,
        cors=_parse_cors(cors_node) if cors_node is not None else None,
        headers=headers,
    )
    node.done(ignored=("mirror", "mirrors", "mirrorPercentage", "mirrorPercent"))
    return route


def _parse_tcp_route(node: Node) -> TcpRoute:
    matches = []
    for m in node.nodes("match"):
        _reject_unevaluable(m, ("sourceLabels", "sourceNamespace", "destinationSubnets", "sourceSubnet"))
        matches.append(TcpMatch(m.path, m.int("port", lo=1, hi=65535), m.str_list("gateways")))
        m.done()
    items = node.items("route")
    if not items:
        raise node.fail("route", "at least one destination is required")
    destinations = _parse_weighted(items, node.issues, http=False)
    node.done()
    return TcpRoute(node.path, tuple(matches), destinations)


def _check_vs_host(host: str, path: str) -> str:
    host = host.strip().lower()
    if host == "*":
        return host
    bare = host[2:] if host.startswith("*.") else host
    if "*" in bare:
        raise FieldError(path, f"wildcards are only allowed as a leading '*.', got {host!r}")
    check_dns_name(bare, path)
    return host


def parse_virtual_service(obj: Mapping[str, Any], issues: Issues) -> VirtualService:
    meta = parse_meta(obj, issues)
    spec = Node(obj.get("spec") or {}, "spec", issues)
    hosts = tuple(_check_vs_host(h, f"spec.hosts[{i}]") for i, h in enumerate(spec.str_list("hosts")))
    if not hosts:
        raise spec.fail("hosts", "at least one host is required (delegate VirtualServices are not supported)")
    if len(set(hosts)) != len(hosts):
        raise spec.fail("hosts", "lists a host twice")
    gateways = spec.str_list("gateways")
    if spec.items("tls"):
        issues.errors.append(
            FieldError("spec.tls", "TLS routes are not supported by Canal (plain-text east-west only)")
        )
    spec.raw("exportTo")  # visibility only; the gateway sees every namespace it is bound to
    http = issues.each(spec.items("http"), lambda p, raw: _parse_http_route(Node(raw, p, issues)))
    tcp = issues.each(spec.items("tcp"), lambda p, raw: _parse_tcp_route(Node(raw, p, issues)))
    if not spec.items("http") and not spec.items("tcp") and not spec.items("tls"):
        issues.errors.append(FieldError("spec", "needs http or tcp routes"))
    spec.done()
    return VirtualService(meta, hosts, gateways, tuple(http), tuple(tcp))


# --------------------------------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    key: str  # "header", "cookie", "source_ip" or "query"
    name: str = ""
    cookie_path: str = ""
    cookie_ttl_ms: int | None = None
    table: str = "ring_hash"  # or "maglev"
    size: int | None = None  # minimum ring size or maglev table size


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: str = ""  # ROUND_ROBIN, LEAST_REQUEST, RANDOM
    consistent_hash: ConsistentHash | None = None
    warmup_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time_s: int | None = None
    interval_s: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout_ms: int | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration_ms: int | None = None
    tcp_idle_timeout_ms: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout_ms: int | None = None
    h2_upgrade_policy: str = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval_ms: int | None = None
    base_ejection_ms: int | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()

    def for_port(self, port: int) -> TrafficPolicy:
        """Port-level settings replace the top-level field they set (Istio's merge rule)."""
        for number, override in self.port_level:
            if number == port:
                return TrafficPolicy(
                    load_balancer=override.load_balancer or self.load_balancer,
                    connection_pool=override.connection_pool or self.connection_pool,
                    outlier_detection=override.outlier_detection or self.outlier_detection,
                )
        return TrafficPolicy(self.load_balancer, self.connection_pool, self.outlier_detection)


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy | None
    path: str


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str
    policy: TrafficPolicy | None
    subsets: tuple[Subset, ...] = ()
    has_workload_selector: bool = False

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("DestinationRule", self.meta.namespace, self.meta.name)

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None

    def effective_policy(self, subset: str, port: int) -> TrafficPolicy:
        """Top level, then its port-level settings, then the subset's policy and its port-level settings."""
        merged = self.policy.for_port(port) if self.policy else TrafficPolicy()
        sub = self.subset(subset) if subset else None
        if sub is not None and sub.policy is not None:
            own = sub.policy.for_port(port)
            merged = TrafficPolicy(
                load_balancer=own.load_balancer or merged.load_balancer,
                connection_pool=own.connection_pool or merged.connection_pool,
                outlier_detection=own.outlier_detection or merged.outlier_detection,
            )
        return merged


def _positive(node: Node, key: str, hi: int = INT32_MAX) -> int | None:
    value = node.int(key, lo=0, hi=hi)
    return value or None  # proto3: 0 means unset


def _parse_load_balancer(node: Node) -> LoadBalancer:
    simple_raw = node.raw("simple")
    hash_node = node.node("consistentHash")
    if simple_raw is not None and hash_node is not None:
        raise FieldError(node.path, "set either simple or consistentHash, not both")
    node.unsupported("localityLbSetting", "the gateway does not do locality-aware load balancing yet")
    warmup = read_duration_ms(node, "warmupDurationSecs")
    simple = ""
    if simple_raw is not None:
        simple = node.enum(
            "simple",
            ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"),
            default="",
        )
        if simple == "PASSTHROUGH":
            raise node.fail("simple", "PASSTHROUGH needs the original destination, which a shared gateway does not see")
        simple = {"UNSPECIFIED": "", "LEAST_CONN": "LEAST_REQUEST"}.get(simple, simple)
    consistent = _parse_consistent_hash(hash_node) if hash_node is not None else None
    node.done()
    return LoadBalancer(simple, consistent, warmup)


def _parse_consistent_hash(node: Node) -> ConsistentHash:
    keys = [k for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName") if node.has(k)]
    if len(keys) != 1:
        raise FieldError(
            node.path,
            "must set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
        )
    key, fields = keys[0], {}
    if key == "httpHeaderName":
        fields = {"key": "header", "name": check_header_name(node.str(key, required=True), node.at(key))}
    elif key == "httpQueryParameterName":
        fields = {"key": "query", "name": node.str(key, required=True)}
    elif key == "useSourceIp":
        if not node.bool(key):
            raise node.fail(key, "must be true when it is the hash key")
        fields = {"key": "source_ip"}
    else:
        cookie = node.node(key)
        assert cookie is not None
        fields = {
            "key": "cookie",
            "name": cookie.str("name", required=True),
            "cookie_path": cookie.str("path"),
            "cookie_ttl_ms": read_duration_ms(cookie, "ttl", minimum_ms=0),
        }
        cookie.done(ignored=("attributes",))
    ring, maglev, legacy = (
        node.node("ringHash"),
        node.node("maglev"),
        node.int("minimumRingSize", lo=0, hi=2**23),
    )
    if ring is not None and maglev is not None:
        raise FieldError(node.path, "set either ringHash or maglev, not both")
    if maglev is not None:
        size = maglev.int("tableSize", lo=0, hi=MAGLEV_MAX_TABLE_SIZE)
        if size and not _is_prime(size):
            raise maglev.fail("tableSize", f"must be a prime number (Envoy requirement), got {size}")
        maglev.done()
        fields.update(table="maglev", size=size or None)
    else:
        size = ring.int("minimumRingSize", lo=0, hi=2**23) if ring is not None else legacy
        if ring is not None:
            ring.done()
        fields.update(table="ring_hash", size=size or None)
    node.done()
    return ConsistentHash(**fields)


def _parse_connection_pool(node: Node) -> ConnectionPool:
    fields: dict[str, Any] = {}
    tcp = node.node("tcp")
    if tcp is not None:
        fields["max_connections"] = _positive(tcp, "maxConnections")
        fields["connect_timeout_ms"] = read_duration_ms(tcp, "connectTimeout")
        fields["max_connection_duration_ms"] = read_duration_ms(tcp, "maxConnectionDuration")
        fields["tcp_idle_timeout_ms"] = read_duration_ms(tcp, "idleTimeout")
        ka = tcp.node("tcpKeepalive")
        if ka is not None:
            time_ms, interval_ms = (
                read_duration_ms(ka, "time", minimum_ms=1000),
                read_duration_ms(ka, "interval", minimum_ms=1000),
            )
            fields["tcp_keepalive"] = TcpKeepalive(
                probes=_positive(ka, "probes", UINT32_MAX),
                time_s=None if time_ms is None else time_ms // 1000,
                interval_s=None if interval_ms is None else interval_ms // 1000,
            )
            ka.done()
        tcp.done()
    http = node.node("http")
    if http is not None:
        fields["http1_max_pending_requests"] = _positive(http, "http1MaxPendingRequests")
        fields["http2_max_requests"] = _positive(http, "http2MaxRequests")
        fields["max_requests_per_connection"] = _positive(http, "maxRequestsPerConnection")
        fields["max_retries"] = _positive(http, "maxRetries")
        fields["idle_timeout_ms"] = read_duration_ms(http, "idleTimeout")
        fields["h2_upgrade_policy"] = http.enum(
            "h2UpgradePolicy", ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"), default="DEFAULT"
        )
        fields["use_client_protocol"] = http.bool("useClientProtocol")
        fields["max_concurrent_streams"] = _positive(http, "maxConcurrentStreams")
        http.done()
    node.done()
    return ConnectionPool(**fields)


def _parse_outlier(node: Node) -> OutlierDetection:
    legacy = node.int("consecutiveErrors", lo=0, hi=INT32_MAX)
    five_xx = node.int("consecutive5xxErrors", lo=0, hi=UINT32_MAX)
    if legacy is not None and five_xx is None:
        five_xx = legacy  # the deprecated field counted 5xx responses
    outlier = OutlierDetection(
        consecutive_5xx=five_xx,
        consecutive_gateway_errors=node.int("consecutiveGatewayErrors", lo=0, hi=UINT32_MAX),
        consecutive_local_origin_failures=node.int("consecutiveLocalOriginFailures", lo=0, hi=UINT32_MAX),
        split_external_local_origin_errors=node.bool("splitExternalLocalOriginErrors"),
        interval_ms=read_duration_ms(node, "interval"),
        base_ejection_ms=read_duration_ms(node, "baseEjectionTime"),
        max_ejection_percent=node.int("maxEjectionPercent", lo=0, hi=100),
        min_health_percent=node.int("minHealthPercent", lo=0, hi=100),
    )
    if outlier.consecutive_local_origin_failures and not outlier.split_external_local_origin_errors:
        raise node.fail("consecutiveLocalOriginFailures", "needs splitExternalLocalOriginErrors: true")
    node.done()
    return outlier


def _parse_policy(node: Node, *, port_level_allowed: bool = True) -> TrafficPolicy:
    lb = node.node("loadBalancer")
    pool = node.node("connectionPool")
    outlier = node.node("outlierDetection")
    node.unsupported("tls", "gateway-to-pod traffic is plain text once sidecars are removed")
    node.unsupported("tunnel", "no tunnelling through the gateway")
    node.unsupported("proxyProtocol", "not sent to pods")
    node.unsupported("retryBudget", "use VirtualService retries")
    port_level = []
    if port_level_allowed:
        seen: set[int] = set()
        for entry in node.nodes("portLevelSettings"):
            port_node = entry.node("port")
            number = port_node.int("number", lo=1, hi=65535) if port_node is not None else None
            if number is None:
                raise entry.fail("port", "port.number is required")
            if number in seen:
                raise entry.fail("port", f"port {number} has two portLevelSettings")
            seen.add(number)
            assert port_node is not None
            port_node.done()
            port_level.append((number, _parse_policy(entry, port_level_allowed=False)))
    elif node.has("portLevelSettings"):
        raise node.fail("portLevelSettings", "cannot be nested")
    policy = TrafficPolicy(
        load_balancer=_parse_load_balancer(lb) if lb is not None else None,
        connection_pool=_parse_connection_pool(pool) if pool is not None else None,
        outlier_detection=_parse_outlier(outlier) if outlier is not None else None,
        port_level=tuple(sorted(port_level, key=lambda p: p[0])),
    )
    node.done(ignored=("port",))
    return policy


def parse_destination_rule(obj: Mapping[str, Any], issues: Issues) -> DestinationRule:
    meta = parse_meta(obj, issues)
    spec = Node(obj.get("spec") or {}, "spec", issues)
    host = spec.str("host", required=True).strip().lower()
    if "*" in host:
        raise spec.fail("host", "wildcard hosts are not supported for gateway destinations")
    check_dns_name(host, spec.at("host"))
    policy_node = spec.node("trafficPolicy")
    policy = _parse_policy(policy_node) if policy_node is not None else None

    def subset(path: str, raw: Any) -> Subset:
        node = Node(raw, path, issues)
        name = node.str("name", required=True)
        if not is_dns_label(name):
            raise node.fail("name", f"is not a valid subset name (DNS label): {name!r}")
        labels = check_labels(node.str_map("labels"), node.at("labels"))
        sub_policy = node.node("trafficPolicy")
        result = Subset(name, labels, _parse_policy(sub_policy) if sub_policy is not None else None, path)
        node.done()
        return result

    subsets = issues.each(spec.items("subsets"), subset)
    seen: dict[str, str] = {}
    for s in subsets:
        if s.name in seen:
            issues.errors.append(
                FieldError(f"{s.path}.name", f"duplicate subset name {s.name!r} (first at {seen[s.name]})")
            )
        seen.setdefault(s.name, s.path)
    has_selector = spec.has("workloadSelector")
    spec.raw("workloadSelector")
    spec.raw("exportTo")
    spec.done()
    return DestinationRule(meta, host, policy, tuple(subsets), has_selector)


__all__ = [
    "MESH_GATEWAY",
    "ConnectionPool",
    "ConsistentHash",
    "CorsPolicy",
    "Destination",
    "DestinationRule",
    "DirectResponse",
    "Fault",
    "Gateway",
    "HeaderCondition",
    "HeaderOps",
    "Headers",
    "HttpMatch",
    "HttpRoute",
    "LoadBalancer",
    "Mirror",
    "OutlierDetection",
    "Redirect",
    "Retries",
    "Rewrite",
    "Server",
    "ServerHost",
    "StringMatch",
    "Subset",
    "TcpMatch",
    "TcpRoute",
    "TrafficPolicy",
    "VirtualService",
    "WeightedDestination",
    "listener_kind",
    "parse_destination_rule",
    "parse_gateway",
    "parse_virtual_service",
]
