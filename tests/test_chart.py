"""The Helm chart charts/canal, rendered by Helm's own code (helm-python-sdk: lint, and install with
dry_run="client", so no cluster and no helm binary) for the defaults and the overrides users reach for.

What is checked, and against what:
- lint (strict) and the values schema: bad values fail with a message naming the key and the rule;
- every container: probes, resources and a restrictive securityContext (the exceptions are listed with why);
- RBAC: no wildcard anywhere, and exactly what the code uses: the real `canal controller` runs with the chart's
  arguments against the test API server (tests/kube_api.py), and every request it makes must be allowed by the
  rendered Roles, and every rule must have been used;
- the gateway: the ConfigMap is `canal bootstrap`'s output (canal.xds.bootstrap.bootstrap) for the controller's xDS
  Service, the real Envoy accepts the pod's exact command line (`--mode validate`), and a gateway started with it
  connects to `canal run` under its pod name and answers the kubelet's probes;
- the InternalGateway the chart creates: accepted by the CRD schema and by Canal's translator, its
  workloadSelector on the gateway pods, its shards matching the listener ports of the pods;
- the node agent: off the gateway nodes, and the uninstall cleanup hooks (their scripts run here too).
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from canal.xds.bootstrap import bootstrap as envoy_bootstrap

from canal import __version__
from canal.cli import cli
from canal.kube import informer
from canal.snapshot import Snapshot
from canal.translate import translate
from tests.conftest import CANAL, EXAMPLES, ROOT, run_canal
from tests.envoy_harness import ENVOY, ControlPlane, Process, envoy_validate, free_port, need_envoy, wait_for
from tests.kube_api import KubeApiServer, ResourceType, custom_resource

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra")

CHART = ROOT / "charts" / "canal"
RELEASE, NAMESPACE = "canal", "istio-system"
TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoExecute"}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "ipvs": {"nodeAgent": {"backend": "ipvs"}},
    "dns-server": {"dns": {"mode": "server", "server": {"clusterIP": "10.96.0.53"}}},
    "dns-none-no-agent": {"dns": {"mode": "none"}, "nodeAgent": {"enabled": False}},
    "create-gateway": {"createGateway": True},
    "hpa": {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 6}}},
    "tolerations": {
        "controller": {"tolerations": [TOLERATION]},
        "gateway": {"tolerations": [TOLERATION]},
        "nodeAgent": {"tolerations": [TOLERATION]},
    },
    "sharded": {
        "createGateway": True,
        "internalGateway": {"shards": 4},
        "gateway": {
            "servers": [
                {"name": "http", "port": 80, "protocol": "HTTP", "hosts": ["*"]},
                {"name": "mysql", "port": 3306, "protocol": "TCP", "hosts": ["*"]},
            ]
        },
    },
    "required-nodes": {
        "gatewayNodes": {
            "placement": "required",
            "labelKey": "node-role.example.com/mesh-gateway",
            "labelValue": "yes",
        },
        "gateway": {"podAntiAffinity": "required"},
    },
    "ipv6": {
        "controller": {"listenHost": "::"},
        "nodeAgent": {"listenHost": "::"},
        "gateway": {"xdsAddress": "[fd00::12]:18000"},
    },
    "xds-ip-delta": {
        "createGateway": True,
        "gateway": {
            "xdsAddress": "10.96.0.18:18000",
            "delta": True,
            "adminPort": 15500,
            "servers": [{"name": "http", "port": 80, "protocol": "HTTP"}],
        },
        "controller": {"namespaces": ["default", "shop"], "logLevel": "debug"},
    },
}
ALL = pytest.mark.parametrize("scenario", sorted(SCENARIOS))
HOOK = "helm.sh/hook"
# Containers that need NET_ADMIN in the node's network namespace, and run as root for it (_helpers.tpl says why).
NET_ADMIN_CONTAINERS = {("DaemonSet", "node-agent"), ("DaemonSet", "node-cleanup")}
# Run-to-completion containers: nothing routes to them and activeDeadlineSeconds ends a hung one, so readiness and
# liveness probes would only add noise. Init containers would be exceptions too (the API forbids their probes);
# the chart has none.
NO_PROBES = {"Job"}


# --------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Render:
    objects: tuple[dict[str, Any], ...]  # what `helm install` applies (CRDs and hooks aside)
    hooks: tuple[dict[str, Any], ...]
    notes: str
    namespace: str

    def everything(self) -> tuple[dict[str, Any], ...]:
        return self.objects + self.hooks

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.everything() if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.everything() if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
        return found[0]

    def maybe(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.everything() if o["kind"] == kind and o["metadata"]["name"] == name]
        return found[0] if found else None


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def _render(values_json: str, release: str, namespace: str) -> Render:
    values = json.loads(values_json)
    with helm.Config(namespace=namespace) as config:
        installed = config.install(str(CHART), release, values, dry_run="client", namespace=namespace)
    with helm.Chart.load(CHART) as chart:  # hooks are not in the release manifest: the plain render has them
        templates = chart.render(values, name=release, namespace=namespace, is_install=True)
    hooks = [
        d
        for path, text in sorted(templates.items())
        if path.endswith(".yaml")
        for d in _documents(text)
        if HOOK in (d["metadata"].get("annotations") or {})
    ]
    objects = _documents(installed["manifest"])
    assert not [o for o in objects if HOOK in (o["metadata"].get("annotations") or {})]
    return Render(tuple(objects), tuple(hooks), installed.get("notes", ""), namespace)


def render(values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE) -> Render:
    return _render(json.dumps(values or {}, sort_keys=True), release, namespace)


def rejected(values: dict[str, Any]) -> str:
    """The message Helm fails an install with."""
    with helm.Config(namespace=NAMESPACE) as config, pytest.raises(helm.HelmError) as failure:
        config.install(str(CHART), RELEASE, values, dry_run="client", namespace=NAMESPACE)
    return str(failure.value)


def pods(r: Render) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in r.everything():
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def container(r: Render, kind: str, name: str, container_name: str) -> dict[str, Any]:
    spec = r.one(kind, name)["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] if c["name"] == container_name]
    return found


def flag(args: list[str], name: str) -> list[str]:
    """Every value given to --name, in `--name=value` or `--name value` form."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            out.append(arg.split("=", 1)[1])
        elif arg == name and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def parses(args: list[str], env: dict[str, str]) -> click.Context:
    """Click's verdict on a container's `canal` arguments: every flag exists and its value passes its checks."""
    resolved = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]
    while resolved and resolved[0].startswith("-v"):
        resolved = resolved[1:]
    name, rest = resolved[0], resolved[1:]
    command = cli.commands[name]
    while isinstance(command, click.Group):
        name, rest = rest[0], rest[1:]
        command = command.commands[name]
    return command.make_context(name, rest)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------------ lint, schema


@ALL
def test_lint_strict_passes(scenario):
    report = helm.lint(str(CHART), SCENARIOS[scenario], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    # what is left is informational; today only the absent icon (Canal has no logo to point at)
    assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__, "image.tag defaults to appVersion: the Canal release it runs"
    # the one file in crds/ is the CRD; tests/test_crd.py checks it is the packaged copy, byte for byte
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["internalgateways.canal.io.yaml"]


BAD_VALUES = [
    ({"dns": {"mode": "hosts"}}, "at '/dns/mode': value must be one of 'coredns', 'server', 'none'"),
    ({"dns": {"ttl": -1}}, "at '/dns/ttl': minimum: got -1, want 0"),
    ({"controller": {"xdsPort": 70000}}, "at '/controller/xdsPort': maximum: got 70,000, want 65,535"),
    ({"controller": {"xdsPort": "18000"}}, "at '/controller/xdsPort': got string, want integer"),
    ({"controller": {"replicas": 0}}, "at '/controller/replicas': minimum: got 0, want 1"),
    ({"gateway": {"statusPort": 0}}, "at '/gateway/statusPort': minimum: got 0, want 1"),
    ({"nodeAgent": {"backend": "iptables"}}, "at '/nodeAgent/backend': value must be one of 'nftables', 'ipvs'"),
    ({"nodeAgent": {"priority": -90}}, "at '/nodeAgent/priority': maximum: got -90, want -101"),
    ({"dns-mode": "coredns"}, "at '': additional properties 'dns-mode' not allowed"),
    ({"gateway": {"replica": 3}}, "at '/gateway': additional properties 'replica' not allowed"),
    (
        {"gateway": {"servers": [{"name": "web", "port": 443, "protocol": "HTTPS"}]}},
        "at '/gateway/servers/0/protocol': value must be one of 'HTTP', 'HTTP2', 'GRPC', 'GRPC-WEB', 'TCP', 'MONGO'",
    ),
    ({"gateway": {"servers": []}}, "at '/gateway/servers': minItems: got 0, want 1"),
    ({"gateway": {"xdsAddress": "canal:xds"}}, "at '/gateway/xdsAddress': 'anyOf' failed"),
    ({"gatewayNodes": {"placement": "anywhere"}}, "value must be one of 'required', 'preferred', 'none'"),
    ({"internalGateway": {"shards": 300}}, "at '/internalGateway/shards': maximum: got 300, want 256"),
    ({"createGateway": "yes"}, "at '/createGateway': got string, want boolean"),
    ({"gateway": {"tolerations": [{"key": "a", "operator": "In"}]}}, "value must be one of 'Exists', 'Equal'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m.split(":")[0] for _, m in BAD_VALUES])
def test_schema_rejects_bad_values_with_the_key_and_the_rule(values, message):
    text = rejected(values)
    assert "values don't meet the specifications of the schema" in text
    assert message in text, text


CROSS_FIELD = [
    (
        {
            "gateway": {
                "servers": [{"name": "a", "port": 80, "protocol": "HTTP"}, {"name": "b", "port": 80, "protocol": "TCP"}]
            }
        },
        "gateway.servers: port 80 is listed twice (a and b)",
    ),
    (
        {
            "gateway": {
                "servers": [
                    {"name": "a", "port": 80, "protocol": "HTTP"},
                    {"name": "a", "port": 81, "protocol": "HTTP"},
                ]
            }
        },
        'gateway.servers: name "a" is used by more than one server',
    ),
    ({"gateway": {"statusPort": 5000}}, "gateway: listener port 5000 (server http) is also gateway.statusPort"),
    (
        {"internalGateway": {"shards": 256}, "gateway": {"shardTargetPortBase": 65500}},
        "shard 36 of server http would listen on port 65536 (> 65535)",
    ),
    ({"controller": {"leaderElection": {"renewDeadline": 15}}}, "renewDeadline must be shorter than leaseDuration"),
    ({"controller": {"quietPeriod": 2, "maxDelay": 1}}, "controller.maxDelay must be at least controller.quietPeriod"),
    ({"gateway": {"preStopSleepSeconds": 30}}, "preStopSleepSeconds must be shorter than"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "minReplicas must not"),
]


@pytest.mark.parametrize(("values", "message"), CROSS_FIELD, ids=[m[:40] for _, m in CROSS_FIELD])
def test_templates_reject_inconsistent_values_with_the_reason(values, message):
    assert message in rejected(values)


# -------------------------------------------------------------------------------------------------- containers


@ALL
def test_every_container_has_probes_resources_and_a_restrictive_security_context(scenario):
    r = render(SCENARIOS[scenario])
    checked = 0
    for obj, spec in pods(r):
        kind = obj["kind"]
        pod_security = spec.get("securityContext") or {}
        assert not spec.get("initContainers"), "no init containers: they cannot have probes"
        assert not spec.get("hostPID") and not spec.get("hostIPC")
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], "nothing of the node is mounted"
        for c in spec["containers"]:
            where = f"{kind} {obj['metadata']['name']} container {c['name']}"
            checked += 1
            if kind not in NO_PROBES:
                assert "readinessProbe" in c and "livenessProbe" in c, where
            requests = c["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), where
            assert "memory" in c["resources"].get("limits", {}), where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("privileged") is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            seccomp = (sc.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get("type")
            assert seccomp == "RuntimeDefault", where
            if (kind, c["name"]) in NET_ADMIN_CONTAINERS:
                assert sc["capabilities"]["add"] == ["NET_ADMIN"], where
                assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False, where
                assert spec["hostNetwork"] is True, where
            else:
                assert "add" not in sc["capabilities"], where
                assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
                assert sc.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, where
                assert not spec.get("hostNetwork"), where
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1], where
    assert checked >= 2


@ALL
def test_only_the_controller_and_the_cleanup_job_mount_an_api_token(scenario):
    r = render(SCENARIOS[scenario])
    for obj, spec in pods(r):
        wanted = obj["metadata"]["name"] in (f"{RELEASE}-controller", f"{RELEASE}-cleanup")
        assert spec["automountServiceAccountToken"] is wanted, obj["metadata"]["name"]
    for account in r.all("ServiceAccount"):
        expected = account["metadata"]["name"] == f"{RELEASE}-controller"
        assert account["automountServiceAccountToken"] is expected, account["metadata"]["name"]


def test_gateway_envoy_image_is_the_release_the_tests_validate_with():
    r = render()
    envoy = container(r, "Deployment", f"{RELEASE}-gateway", "envoy")
    assert re.fullmatch(r"envoyproxy/envoy:distroless-v\d+\.\d+\.\d+", envoy["image"])
    if not ENVOY.exists():
        pytest.skip("no Envoy binary to compare the version with")
    version = re.search(
        r"/(\d+\.\d+\.\d+)/",
        subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout,
    )
    assert version is not None
    assert envoy["image"].endswith(f"-v{version[1]}"), (
        "the chart runs the Envoy release its bootstrap is validated with"
    )


# ------------------------------------------------------------------------------------------------------- RBAC


def _rules(r: Render) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']} {o['metadata']['name']}", rule)
        for o in r.everything()
        if o["kind"] in ("Role", "ClusterRole")
        for rule in o.get("rules", [])
    ]


@ALL
def test_rbac_has_no_wildcards(scenario):
    for where, rule in _rules(render(SCENARIOS[scenario])):
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not [v for v in rule.get(key, []) if "*" in v], f"{where}: {key} {rule[key]}"
        assert rule.get("verbs"), where
        assert "nonResourceURLs" not in rule, f"{where}: discovery is granted by system:discovery already"


@dataclass(frozen=True)
class Grant:
    namespace: str | None  # None: every namespace (a ClusterRole through a ClusterRoleBinding)
    group: str
    resource: str
    verb: str
    names: frozenset[str]  # empty: any name

    def allows(self, request: Access) -> bool:
        return (
            self.namespace in (None, request.namespace)
            and (self.group, self.resource, self.verb) == (request.group, request.resource, request.verb)
            and (not self.names or request.name in self.names)
        )


@dataclass(frozen=True)
class Access:
    namespace: str
    group: str
    resource: str  # with the subresource: internalgateways/status
    verb: str
    name: str  # "" for collections and creates, as the authorizer sees them


def grants(r: Render, account: str) -> set[Grant]:
    """Everything bound to the ServiceAccount `account` (of the release namespace)."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in r.everything()}
    out: set[Grant] = set()
    for binding in r.everything():
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = {(s["kind"], s.get("namespace"), s["name"]) for s in binding["subjects"]}
        if ("ServiceAccount", r.namespace, account) not in subjects:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_namespace = scope if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add(Grant(scope, group, resource, verb, frozenset(rule.get("resourceNames", ()))))
    return out


_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def accesses(server: KubeApiServer) -> set[Access]:
    """The requests the server saw, as the RBAC authorizer would judge them (discovery is not RBAC-checked here)."""
    out = set()
    for request in server.requests:
        if request.verb in ("discovery", ""):
            continue
        match = _PATH.match(request.path)
        assert match, request.path
        resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
        name = match["name"] or ""
        out.add(Access(match["namespace"] or "", match["group"] or "", resource, request.verb, name))
    return out


def expected_controller_grants(r: Render) -> set[tuple[str, str, str]]:
    """What the code needs, from the code: list+watch of every informer resource, plus the writers' calls."""
    needed = {(res.group, res.plural, verb) for res in informer.RESOURCES for verb in ("list", "watch")}
    needed |= {
        ("canal.io", "internalgateways", "get"),  # StatusWriter reads before it writes
        ("canal.io", "internalgateways/status", "update"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
    }
    if r.maybe("Role", f"{RELEASE}-controller-coredns"):
        needed |= {("", "configmaps", "get"), ("", "configmaps", "update")}
    return needed


@ALL
def test_controller_rbac_is_what_the_code_uses_and_scoped(scenario):
    r = render(SCENARIOS[scenario])
    granted = grants(r, f"{RELEASE}-controller")
    assert {(g.group, g.resource, g.verb) for g in granted} == expected_controller_grants(r)
    args = container(r, "Deployment", f"{RELEASE}-controller", "controller")["args"]
    lease_ns, lease = flag(args, "--lease")[0].split("/")
    for g in granted:
        if g.resource == "leases":
            assert g.namespace == lease_ns == NAMESPACE
            assert g.names == (frozenset() if g.verb == "create" else {lease})
        elif g.resource == "configmaps":
            namespace, name = flag(args, "--configmap")[0].split("/")
            assert (g.namespace, g.names) == (namespace, {name})
        else:
            assert g.namespace is None and not g.names
    assert bool(flag(args, "--configmap")) == (SCENARIOS[scenario].get("dns", {}).get("mode", "coredns") == "coredns")


@ALL
def test_gateway_and_node_agent_have_no_api_access(scenario):
    r = render(SCENARIOS[scenario])
    assert grants(r, f"{RELEASE}-gateway") == set()
    assert grants(r, f"{RELEASE}-node-agent") == set()
    # and the agent's code never talks to the API: it has no client to talk with
    for source in (ROOT / "node-agent").glob("*.py"):
        assert not re.search(r"^\s*(from|import) kubernetes", source.read_text(), re.MULTILINE), source


CONTROLLER_RESOURCES = (
    custom_resource("canal.io/v1alpha1", "InternalGateway", "internalgateways"),
    custom_resource("networking.istio.io/v1", "Gateway", "gateways"),
    custom_resource("networking.istio.io/v1", "VirtualService", "virtualservices"),
    custom_resource("networking.istio.io/v1", "DestinationRule", "destinationrules"),
    ResourceType("", "v1", "events", "Event"),
)
KUBEADM_COREFILE = (ROOT / "tests" / "corefiles" / "kubeadm.Corefile").read_text()


def _example_objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted((EXAMPLES / "helloworld").glob("*.yaml")):
        out += _documents(path.read_text())
    broken = copy.deepcopy(next(o for o in out if o["kind"] == "VirtualService"))
    broken["metadata"]["name"] = "broken"
    broken["spec"]["http"][0]["match"] = [{"sourceLabels": {"app": "x"}}]  # rejected: a Warning Event
    return [*out, broken]


def test_the_real_controller_needs_exactly_the_rendered_rbac(tmp_path):
    """`canal controller` with the chart's arguments (listen addresses moved to loopback, a kubeconfig added), run
    until it has led, written status, an Event and the Corefile, and renewed its Lease."""
    r = render({"controller": {"leaderElection": {"leaseDuration": 4, "renewDeadline": 3, "retryPeriod": 0.3}}})
    c = container(r, "Deployment", f"{RELEASE}-controller", "controller")
    with KubeApiServer(CONTROLLER_RESOURCES) as server:
        for obj in _example_objects():
            server.create(obj)
        server.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "coredns", "namespace": "kube-system"},
                "data": {"Corefile": KUBEADM_COREFILE},
            }
        )
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        metrics = free_port()
        loopback = {
            "--xds-address": f"--xds-address=127.0.0.1:{free_port()}",
            "--metrics-address": f"--metrics-address=127.0.0.1:{metrics}",
        }
        args = [
            loopback.get(a.split("=", 1)[0], a).replace("$(POD_NAME)", "canal-controller-7c9d-x2x4k") for a in c["args"]
        ]
        process = Process([str(CANAL), *args, "--kubeconfig", str(kubeconfig)], tmp_path / "controller.log")
        try:

            def done() -> bool:
                assert process.alive(), process.log()
                ig = server.get("canal.io/v1alpha1", "InternalGateway", "canal", NAMESPACE) or {}
                corefile = server.get("v1", "ConfigMap", "coredns", "kube-system")["data"]["Corefile"]
                renewed = server.requests_of("update", kind="Lease")
                return (
                    bool(ig.get("status"))
                    and "canal" in corefile
                    and bool(server.requests_of("create", kind="Event"))
                    and bool(renewed)
                )

            wait_for(done, timeout=60, what="status, an Event, the Corefile and a Lease renewal")
        finally:
            process.stop()
        used = accesses(server)
    granted = grants(r, f"{RELEASE}-controller")
    denied = sorted(str(a) for a in used if not any(g.allows(a) for g in granted))
    assert denied == [], denied
    unused = sorted(str(g) for g in granted if not any(g.allows(a) for a in used))
    assert unused == [], f"granted but never used: {unused}"


# -------------------------------------------------------------------------------------------- the controller


@ALL
def test_controller_arguments_parse_and_follow_the_values(scenario):
    values = SCENARIOS[scenario]
    r = render(values)
    deployment = r.one("Deployment", f"{RELEASE}-controller")
    assert deployment["spec"]["replicas"] == 2
    c = container(r, "Deployment", f"{RELEASE}-controller", "controller")
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert flag(c["args"], "--identity") == ["$(POD_NAME)"], "each replica campaigns under its own name"
    ctx = parses(c["args"], {"POD_NAME": "canal-controller-5f6d7-abcde"})
    assert ctx.params["leader_election"] is True
    assert ctx.params["lease"] == f"{NAMESPACE}/{RELEASE}-controller"
    assert ctx.params["identity"] == "canal-controller-5f6d7-abcde"
    assert list(ctx.params["namespaces"]) == values.get("controller", {}).get("namespaces", [])
    mode = values.get("dns", {}).get("mode", "coredns")
    assert ctx.params["manage_coredns"] is (mode == "coredns")
    assert (ctx.params["dns_address"] is not None) is (mode == "server")
    # probes on the metrics port, the paths the server serves
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ctx.params["metrics_address"].endswith(f":{ports['http-metrics']}")
    assert ctx.params["xds_address"].endswith(f":{ports['grpc-xds']}")
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    # the xDS Service reaches these pods on that port
    service = r.one("Service", f"{RELEASE}-controller")
    assert labels_match(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    (xds,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc-xds"]
    assert xds["targetPort"] == "grpc-xds" and xds["port"] == 18000


def test_dns_server_mode_serves_canal_dns_on_port_53():
    r = render(SCENARIOS["dns-server"])
    c = container(r, "Deployment", f"{RELEASE}-controller", "controller")
    ports = {(p["name"], p["protocol"]): p["containerPort"] for p in c["ports"]}
    service = r.one("Service", f"{RELEASE}-dns")
    assert service["spec"]["clusterIP"] == "10.96.0.53"
    assert {(p["protocol"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("UDP", 53, "dns-udp"),
        ("TCP", 53, "dns-tcp"),
    }
    assert ports[("dns-udp", "UDP")] == ports[("dns-tcp", "TCP")] == 5353
    assert flag(c["args"], "--dns-address") == ["0.0.0.0:5353"]
    assert "--no-coredns" in c["args"]
    assert r.maybe("Role", f"{RELEASE}-controller-coredns") is None
    assert "dig +short @canal-dns.istio-system.svc.cluster.local" in r.notes


# ---------------------------------------------------------------------------------------------- the gateway


def gateway_bootstrap(r: Render, release: str = RELEASE) -> dict[str, Any]:
    configmap = r.one("ConfigMap", f"{release}-gateway-bootstrap")
    return yaml.safe_load(configmap["data"]["envoy.yaml"])


def xds_service_address(r: Render) -> str:
    """Where the controller's xDS Service is, read from the rendered Service (not from the bootstrap)."""
    service = r.one("Service", f"{RELEASE}-controller")
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-xds"]
    return f"{service['metadata']['name']}.{r.namespace}.svc.cluster.local:{port}"


@ALL
def test_bootstrap_is_canal_bootstrap_for_the_controller_service(scenario):
    values = SCENARIOS[scenario]
    r = render(values)
    gateway = values.get("gateway", {})
    address = gateway.get("xdsAddress") or xds_service_address(r)
    group = f"{NAMESPACE}/canal"
    rendered = gateway_bootstrap(r)
    expected = envoy_bootstrap(
        address,
        rendered["node"]["id"],
        group,
        admin_port=gateway.get("adminPort", 15000),
        delta=gateway.get("delta", False),
    )
    assert rendered == expected
    # and the same as the command prints, through its YAML
    printed = run_canal(
        "bootstrap",
        "--xds-address",
        address,
        "--node-id",
        rendered["node"]["id"],
        "--group",
        group,
        "--admin-port",
        str(gateway.get("adminPort", 15000)),
        *(["--delta"] if gateway.get("delta") else []),
    )
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == rendered
    # the node agents dial the same xDS server
    if r.maybe("DaemonSet", f"{RELEASE}-node-agent"):
        agent = container(r, "DaemonSet", f"{RELEASE}-node-agent", "node-agent")
        assert flag(agent["args"], "--xds-address") == [address]


def test_bootstrap_follows_release_name_and_namespace():
    r = render({}, release="east-west", namespace="mesh-system")
    bootstrap = gateway_bootstrap(r, "east-west-canal")
    assert bootstrap["node"]["cluster"] == "mesh-system/canal"
    assert bootstrap["node"]["metadata"] == {"canal.io/group": "mesh-system/canal"}
    (cluster,) = bootstrap["static_resources"]["clusters"]
    socket_address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert socket_address["socket_address"] == {
        "address": "east-west-canal-controller.mesh-system.svc.cluster.local",
        "port_value": 18000,
    }
    args = container(r, "Deployment", "east-west-canal-controller", "controller")["args"]
    assert flag(args, "--lease") == ["mesh-system/east-west-canal-controller"]


def envoy_command_line(r: Render, config: Path, pod: str) -> list[str]:
    """The gateway container's command line, as the kubelet runs it: $(POD_NAME) expanded, the ConfigMap's file at
    `config` instead of /etc/canal/envoy.yaml, this machine's Envoy."""
    c = container(r, "Deployment", f"{RELEASE}-gateway", "envoy")
    (mount,) = c["volumeMounts"]
    assert c["command"] == ["envoy"]
    args = [a.replace("$(POD_NAME)", pod) for a in c["args"]]
    path = f"{mount['mountPath']}/envoy.yaml"
    assert flag(args, "--config-path") == [path]
    return [str(ENVOY), *[str(config) if a == path else a for a in args]]


@ALL
def test_gateway_pod_gets_its_node_id_from_its_name(scenario):
    r = render(SCENARIOS[scenario])
    deployment = r.one("Deployment", f"{RELEASE}-gateway")
    c = container(r, "Deployment", f"{RELEASE}-gateway", "envoy")
    assert flag(c["args"], "--service-node") == ["$(POD_NAME)"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == f"{RELEASE}-gateway-bootstrap"
    status = {p.get("name"): p["containerPort"] for p in c["ports"]}["http-status"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-status"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-status"}
    listener = json.loads(flag(c["args"], "--config-yaml")[0])["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == status


@pytest.mark.parametrize("scenario", ["default", "xds-ip-delta", "ipv6", "sharded"])
def test_envoy_accepts_the_rendered_bootstrap_and_command_line(scenario, tmp_path):
    need_envoy()
    r = render(SCENARIOS[scenario])
    config = tmp_path / "envoy.yaml"
    config.write_text(r.one("ConfigMap", f"{RELEASE}-gateway-bootstrap")["data"]["envoy.yaml"])
    alone = envoy_validate(config)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    command = envoy_command_line(r, config, "canal-gateway-6b7c8d9f4-q8w2e")
    full = subprocess.run([*command, "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False)
    assert full.returncode == 0, full.stdout + full.stderr


def test_a_gateway_started_as_the_pod_connects_under_its_pod_name_and_answers_the_probes(tmp_path):
    """The chart's Gateway, InternalGateway and gateway Service served by `canal run`, and an Envoy started with the
    gateway container's exact command line; only ports (free ones) and the status listener's bind address
    (loopback: tests bind nothing else) differ from a cluster."""
    need_envoy()
    plane = ControlPlane(tmp_path)
    envoy: Process | None = None
    try:
        port, status_port, admin_port = free_port(), free_port(), free_port()
        r = render(
            {
                "createGateway": True,
                "gateway": {
                    "xdsAddress": f"127.0.0.1:{plane.xds_port}",
                    "servers": [{"name": "http", "port": port, "protocol": "HTTP"}],
                    "statusPort": status_port,
                    "adminPort": admin_port,
                    "concurrency": 1,
                    "service": {"name": "canal-gateway", "type": "ClusterIP", "clusterIP": "10.96.0.50"},
                },
            }
        )
        gateway_objects = [
            r.one("Gateway", "canal"),
            r.one("InternalGateway", "canal"),
            r.one("Service", "canal-gateway"),
        ]
        gateway_objects[2]["spec"]["clusterIPs"] = ["10.96.0.50"]
        plane.write("gateway", gateway_objects)
        config = tmp_path / "envoy.yaml"
        config.write_text(r.one("ConfigMap", f"{RELEASE}-gateway-bootstrap")["data"]["envoy.yaml"])
        pod = "canal-gateway-7d9f8b6c5-k2m4n"
        command = envoy_command_line(r, config, pod)
        index = command.index("--config-yaml") + 1
        assert '"address":"0.0.0.0"' in command[index], "the status listener binds every address of the pod"
        command[index] = command[index].replace('"address":"0.0.0.0"', '"address":"127.0.0.1"')
        envoy = Process(command, tmp_path / "envoy.log")

        def ready() -> bool:
            assert envoy is not None and envoy.alive(), envoy.log() if envoy else ""
            return _get(status_port, "/ready")[0] == 200

        wait_for(ready, timeout=60, what="the gateway's /ready")
        wait_for(lambda: plane.converged("istio-system/canal"), what="the gateway to ACK its config")
        (proxy,) = plane.status()["xds"]["istio-system/canal"]["proxies"]
        assert proxy["node"] == pod
        assert _get(status_port, "/healthz") == (200, b"ok\n")
        code, body = _get(status_port, "/stats/prometheus")
        assert code == 200 and b"envoy_server_live" in body
        assert _get(status_port, "/clusters")[0] == 404, "only the Prometheus stats of the admin are exposed"
    finally:
        if envoy is not None:
            envoy.stop()
        plane.stop()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@ALL
def test_gateway_service_and_pods_are_what_the_internal_gateway_points_at(scenario):
    values = SCENARIOS[scenario]
    r = render(values)
    deployment = r.one("Deployment", f"{RELEASE}-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], labels)
    service = r.one("Service", "canal-gateway")
    assert service["spec"]["type"] == "ClusterIP"
    assert labels_match(service["spec"]["selector"], labels)
    servers = values.get("gateway", {}).get("servers") or [{"name": "http", "port": 5000}]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [(s["name"], s["port"]) for s in servers]
    ig = r.maybe("InternalGateway", "canal")
    assert (ig is not None) is bool(values.get("createGateway"))
    if ig is None:
        assert r.maybe("Gateway", "canal") is None
        return
    spec = ig["spec"]
    assert labels_match(spec["workloadSelector"], labels), "the gateway pods are the InternalGateway's workloads"
    assert spec["workloadSelector"] == service["spec"]["selector"]
    assert spec["address"]["serviceRef"] == {"name": "canal-gateway", "namespace": NAMESPACE}
    gateway = r.one("Gateway", spec["gatewayRef"]["name"])
    assert spec["gatewayRef"]["namespace"] == gateway["metadata"]["namespace"] == NAMESPACE
    assert gateway["spec"]["selector"] == spec["workloadSelector"]
    assert [s["port"]["number"] for s in gateway["spec"]["servers"]] == [s["port"] for s in servers]
    assert gateway_bootstrap(r)["node"]["cluster"] == f"{ig['metadata']['namespace']}/{ig['metadata']['name']}"
    agent = r.maybe("DaemonSet", f"{RELEASE}-node-agent")
    expected_mode = (
        flag(container(r, "DaemonSet", f"{RELEASE}-node-agent", "node-agent")["args"], "--backend")[0]
        if agent
        else "none"
    )
    assert spec["redirect"]["mode"] == expected_mode, "the InternalGateway asks for the agents' backend"
    assert spec["dns"]["mode"] == values.get("dns", {}).get("mode", "coredns")


@pytest.mark.parametrize("scenario", ["create-gateway", "sharded", "xds-ip-delta"])
def test_created_internal_gateway_is_accepted_by_the_crd_and_by_canal(scenario):
    from tests.test_crd import admit

    r = render(SCENARIOS[scenario])
    ig = r.one("InternalGateway", "canal")
    _, errors = admit(copy.deepcopy(ig))
    assert errors == []
    services = [copy.deepcopy(s) for s in r.all("Service") if s["metadata"]["name"].startswith("canal-gateway")]
    for i, service in enumerate(services):  # what the API server would have assigned
        service["spec"]["clusterIP"] = f"10.96.1.{i + 1}"
        service["spec"]["clusterIPs"] = [service["spec"]["clusterIP"]]
    state = translate(Snapshot.from_dicts([ig, r.one("Gateway", "canal"), *services]))
    assert state.rejections() == []
    listeners = {listener.port for listener in state.envoy[f"{NAMESPACE}/canal"].listeners.values()}
    # without a bound route Canal opens only the HTTP servers' listeners (a TCP port needs its route first)
    http = {
        s["port"]["number"] for s in r.one("Gateway", "canal")["spec"]["servers"] if s["port"]["protocol"] == "HTTP"
    }
    shard_services = [s for s in services if s["metadata"]["name"] != "canal-gateway"]
    expected = {p["targetPort"] for s in shard_services or services for p in s["spec"]["ports"] if p["port"] in http}
    pod_ports = {
        p["containerPort"]
        for p in container(r, "Deployment", f"{RELEASE}-gateway", "envoy")["ports"]
        if p.get("name") != "http-status"
    }
    assert listeners == expected, "each listener binds the port its (shard) Service targets"
    assert listeners <= pod_ports, "and the pods declare it"


def test_shards_get_their_services_and_distinct_listener_ports():
    r = render(SCENARIOS["sharded"])
    shards = sorted(
        (s for s in r.all("Service") if re.fullmatch(r"canal-gateway-\d+", s["metadata"]["name"])),
        key=lambda s: s["metadata"]["name"],
    )
    assert [s["metadata"]["name"] for s in shards] == [f"canal-gateway-{k}" for k in range(4)]
    targets = [p["targetPort"] for s in shards for p in s["spec"]["ports"]]
    assert len(set(targets)) == len(targets) == 8 and all(isinstance(t, int) and t >= 1024 for t in targets)
    assert r.one("InternalGateway", "canal")["spec"]["address"]["shards"] == 4
    pod = r.one("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    assert "sysctls" not in pod["securityContext"], "port 80 is served on the shard ports (>= 20000) only"
    ports = [p["containerPort"] for p in pod["containers"][0]["ports"] if p.get("name") != "http-status"]
    assert sorted(ports) == sorted(targets), "the pods declare every shard listener port"


def test_low_listener_ports_are_allowed_by_a_sysctl_not_a_capability():
    pod = render(SCENARIOS["xds-ip-delta"]).one("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}]
    default = render().one("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    assert "sysctls" not in default["securityContext"], "port 5000 needs nothing"


def test_hpa_owns_the_gateway_replicas_and_the_pdb_covers_the_pods():
    r = render(SCENARIOS["hpa"])
    hpa = r.one("HorizontalPodAutoscaler", f"{RELEASE}-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    deployment = r.one("Deployment", f"{RELEASE}-gateway")
    assert "replicas" not in deployment["spec"], "the HPA sets the replicas; a fixed count would fight it"
    assert render().maybe("HorizontalPodAutoscaler", f"{RELEASE}-gateway") is None
    assert render().one("Deployment", f"{RELEASE}-gateway")["spec"]["replicas"] == 2
    pdb = r.one("PodDisruptionBudget", f"{RELEASE}-gateway")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] == 1


# ------------------------------------------------------------------------------------------- node placement


def _node_terms(affinity: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    node = affinity.get("nodeAffinity", {})
    if required:
        return node.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    return [p["preference"] for p in node.get("preferredDuringSchedulingIgnoredDuringExecution", [])]


@ALL
def test_node_agent_avoids_the_gateway_nodes_and_the_gateway_seeks_them(scenario):
    values = SCENARIOS[scenario]
    r = render(values)
    nodes = {"labelKey": "canal.io/gateway", "labelValue": "true", "placement": "preferred"} | values.get(
        "gatewayNodes", {}
    )
    expression = {"key": nodes["labelKey"], "values": [nodes["labelValue"]]}
    gateway = r.one("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    (term,) = _node_terms(gateway["affinity"], nodes["placement"] == "required")
    assert term["matchExpressions"] == [{**expression, "operator": "In"}]
    anti = gateway["affinity"]["podAntiAffinity"]
    style = values.get("gateway", {}).get("podAntiAffinity", "preferred")
    assert list(anti) == [f"{style}DuringSchedulingIgnoredDuringExecution"]
    agent = r.maybe("DaemonSet", f"{RELEASE}-node-agent")
    if agent is None:
        assert not r.maybe("DaemonSet", f"{RELEASE}-node-cleanup")
        return
    spec = agent["spec"]["template"]["spec"]
    (term,) = _node_terms(spec["affinity"], required=True)
    assert term["matchExpressions"] == [{**expression, "operator": "NotIn"}], "never on a gateway node"
    cleanup = r.one("DaemonSet", f"{RELEASE}-node-cleanup")["spec"]["template"]["spec"]
    assert (cleanup["affinity"], cleanup.get("tolerations")) == (spec["affinity"], spec.get("tolerations")), (
        "the cleanup reaches exactly the agent's nodes"
    )


def test_custom_tolerations_reach_every_component():
    r = render(SCENARIOS["tolerations"])
    for kind, name in (
        ("Deployment", f"{RELEASE}-controller"),
        ("Deployment", f"{RELEASE}-gateway"),
        ("DaemonSet", f"{RELEASE}-node-agent"),
        ("DaemonSet", f"{RELEASE}-node-cleanup"),
    ):
        assert r.one(kind, name)["spec"]["template"]["spec"]["tolerations"] == [TOLERATION], name
    defaults = render()
    agent = defaults.one("DaemonSet", f"{RELEASE}-node-agent")["spec"]["template"]["spec"]
    assert agent["tolerations"] == [{"operator": "Exists"}], "by default on every application node, tainted or not"


@ALL
def test_node_agent_arguments_parse_and_follow_the_values(scenario):
    values = SCENARIOS[scenario]
    r = render(values)
    agent = r.maybe("DaemonSet", f"{RELEASE}-node-agent")
    if not values.get("nodeAgent", {}).get("enabled", True):
        assert agent is None
        return
    assert agent is not None
    spec = agent["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    c = container(r, "DaemonSet", f"{RELEASE}-node-agent", "node-agent")
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ctx = parses(c["args"], {"NODE_NAME": "worker-1"})
    assert ctx.params["node_name"] == "worker-1"
    assert ctx.params["backend"] == values.get("nodeAgent", {}).get("backend", "nftables")
    listen = values.get("nodeAgent", {}).get("listenHost", "0.0.0.0")
    assert ctx.params["metrics_address"] == ("[::]:15100" if listen == "::" else "0.0.0.0:15100")
    assert not ctx.params["cleanup"], "stopping the agent keeps the rules; only the uninstall hook removes them"
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-metrics"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http-metrics"] == 15100


# -------------------------------------------------------------------------------------------- uninstall hooks


def test_cleanup_hooks_run_after_the_delete_in_order_and_are_removed_when_done():
    r = render()
    assert r.hooks, "post-delete hooks exist by default"
    weights = {}
    for hook in r.hooks:
        annotations = hook["metadata"]["annotations"]
        assert annotations[HOOK] == "post-delete"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        weights[(hook["kind"], hook["metadata"]["name"])] = int(annotations["helm.sh/hook-weight"])
    cleanup_ds = weights.pop(("DaemonSet", f"{RELEASE}-node-cleanup"))
    job = weights.pop(("Job", f"{RELEASE}-cleanup"))
    assert max(weights.values()) < cleanup_ds < job, "accounts, RBAC and scripts, then the DaemonSet, then the Job"
    scripts = r.one("ConfigMap", f"{RELEASE}-cleanup-scripts")["data"]
    for name, text in scripts.items():
        assert text == (CHART / "files" / name).read_text(), name
    spec = r.one("Job", f"{RELEASE}-cleanup")["spec"]
    waits = {c["name"]: c for c in spec["template"]["spec"]["containers"]}
    assert flag(waits["wait-for-nodes"]["command"], "--daemonset") == [f"{RELEASE}-node-cleanup"]
    assert spec["activeDeadlineSeconds"] > int(flag(waits["wait-for-nodes"]["command"], "--timeout")[0])
    restore = parses(waits["restore-coredns"]["args"], {})
    assert restore.params["configmap"] == "kube-system/coredns" and restore.params["strip_if_unsaved"]
    assert grants(r, f"{RELEASE}-cleanup") == {
        Grant(NAMESPACE, "apps", "daemonsets", "get", frozenset({f"{RELEASE}-node-cleanup"})),
        Grant("kube-system", "", "configmaps", "get", frozenset({"coredns"})),
        Grant("kube-system", "", "configmaps", "update", frozenset({"coredns"})),
    }


def test_no_cleanup_hooks_when_there_is_nothing_to_undo():
    assert render(SCENARIOS["dns-none-no-agent"]).hooks == ()
    only_dns = render({"nodeAgent": {"enabled": False}})
    assert {h["kind"] for h in only_dns.hooks} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}
    (job,) = only_dns.all("Job")
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["restore-coredns"]


def test_node_cleanup_waits_for_the_agent_then_cleans_and_reports_ready(tmp_path):
    """files/node_cleanup.py as the cleanup DaemonSet runs it, with a stand-in `canal` that records its calls and
    a listening socket as the still-running agent."""
    r = render(SCENARIOS["ipvs"])
    c = container(r, "DaemonSet", f"{RELEASE}-node-cleanup", "node-cleanup")
    log = tmp_path / "calls"
    fake = tmp_path / "canal"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho cleaned\n')
    fake.chmod(0o755)
    agent = socket.create_server(("127.0.0.1", 0))
    port = agent.getsockname()[1]
    marker = tmp_path / "done"
    command = [
        sys.executable,
        str(CHART / "files" / "node_cleanup.py"),
        *[a for a in c["command"][2:] if not a.startswith(("--agent-port=", "--marker="))],
        "--agent-host=127.0.0.1",
        f"--agent-port={port}",
        f"--marker={marker}",
        f"--canal={fake}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)
        assert not log.exists() and not marker.exists(), "nothing is touched while the agent still answers"
        agent.close()
        wait_for(marker.exists, timeout=20, what="the cleanup to finish")
        assert log.read_text().splitlines() == [
            "node-agent --cleanup --backend nftables --table-name canal",
            "node-agent --cleanup --backend ipvs --ipvs-marks 0x1000/0xfffff000",
        ]
        assert process.poll() is None, "it idles once done (a DaemonSet pod that exits is restarted)"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        agent.close()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_node_cleanup_refuses_to_clean_under_a_running_agent(tmp_path):
    agent = socket.create_server(("127.0.0.1", 0))
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(CHART / "files" / "node_cleanup.py"),
                f"--agent-port={agent.getsockname()[1]}",
                "--agent-timeout=1",
                f"--marker={tmp_path / 'done'}",
                "--canal=/bin/false",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        agent.close()
    assert result.returncode == 1
    assert "the node agent still answers" in result.stderr
    assert not (tmp_path / "done").exists()


DAEMONSETS = ResourceType("apps", "v1", "daemonsets", "DaemonSet", status=True, generation=True)


def _daemonset(ready: int, desired: int, observed: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": f"{RELEASE}-node-cleanup", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}},
        "status": {
            "observedGeneration": observed,
            "desiredNumberScheduled": desired,
            "numberReady": ready,
            "currentNumberScheduled": desired,
            "numberMisscheduled": 0,
        },
    }


def _wait_command(r: Render, kubeconfig: Path, timeout: float) -> list[str]:
    job = r.one("Job", f"{RELEASE}-cleanup")
    (wait,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "wait-for-nodes"]
    args = [a for a in wait["command"][2:] if not a.startswith("--timeout=")]
    script = str(CHART / "files" / "cleanup_wait.py")
    return [sys.executable, script, *args, f"--timeout={timeout}", "--interval=0.1", f"--kubeconfig={kubeconfig}"]


def test_cleanup_job_waits_for_every_node_with_only_its_rbac(tmp_path):
    r = render()
    with KubeApiServer([DAEMONSETS]) as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        server.create(_daemonset(ready=1, desired=3))
        process = subprocess.Popen(
            _wait_command(r, kubeconfig, 30), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: server.requests_of("get", kind="DaemonSet"), what="the first poll")
            time.sleep(0.5)
            assert process.poll() is None, "2 of 3 nodes still dirty: it keeps waiting"
            server.modify(
                "apps/v1",
                "DaemonSet",
                f"{RELEASE}-node-cleanup",
                NAMESPACE,
                lambda ds: ds["status"].update(numberReady=3),
            )
            out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, err
        assert "nodes clean: 1 of 3" in out and "every node is clean (3 node(s))" in out
        used = accesses(server)
    granted = grants(r, f"{RELEASE}-cleanup")
    assert used and all(any(g.allows(a) for g in granted) for a in used), used


def test_cleanup_job_fails_with_the_count_when_nodes_stay_dirty(tmp_path):
    r = render()
    with KubeApiServer([DAEMONSETS]) as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        server.create(_daemonset(ready=2, desired=5))
        result = subprocess.run(
            _wait_command(r, kubeconfig, 1), capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 1
    assert "node cleanup not finished after 1 s: 2 of 5 node(s) clean" in result.stderr
    assert "app.kubernetes.io/component=node-cleanup" in result.stderr


def test_cleanup_job_restores_the_corefile_with_only_its_rbac(tmp_path):
    r = render()
    job = r.one("Job", f"{RELEASE}-cleanup")
    (restore,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "restore-coredns"]
    with KubeApiServer() as server:
        server.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "coredns", "namespace": "kube-system"},
                "data": {"Corefile": KUBEADM_COREFILE},
            }
        )
        kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
        applied = run_canal("dns", "apply", "-f", str(EXAMPLES / "helloworld"), "--kubeconfig", kubeconfig)
        assert applied.returncode == 0, applied.stderr
        assert server.get("v1", "ConfigMap", "coredns", "kube-system")["data"]["Corefile"] != KUBEADM_COREFILE
        server.clear_requests()
        restored = run_canal(*restore["args"], "--kubeconfig", kubeconfig)
        assert restored.returncode == 0, restored.stderr
        assert server.get("v1", "ConfigMap", "coredns", "kube-system")["data"]["Corefile"] == KUBEADM_COREFILE
        used = accesses(server)
    granted = grants(r, f"{RELEASE}-cleanup")
    assert used and all(any(g.allows(a) for g in granted) for a in used), used


# -------------------------------------------------------------------------------------------------------- notes


def test_notes_tell_the_dns_check_and_the_namespace_step():
    notes = render().notes
    assert "kubectl run -it --rm dig" in notes and "dig +short helloworld.default.svc.cluster.local" in notes
    assert "kubectl -n istio-system get service canal-gateway -o jsonpath='{.spec.clusterIP}'" in notes
    assert "canal migrate namespace NAMESPACE --restart" in notes
    assert "canal migrate rollback NAMESPACE --restart" in notes
    assert "istio-system/canal" in notes
    created = render(SCENARIOS["create-gateway"]).notes
    assert "were created" in created and "--set createGateway=true" not in created
    assert "kubectl label node NODE node-role.example.com/mesh-gateway=yes" in render(SCENARIOS["required-nodes"]).notes


def test_values_file_is_what_the_chart_defaults_to():
    """The defaults that make `helm install canal charts/canal -n istio-system` work out of the box."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["dns"]["mode"] == "coredns"
    assert values["createGateway"] is False
    assert values["controller"]["replicas"] == 2
    assert values["nodeAgent"]["metricsPort"] == 15100 and values["controller"]["xdsPort"] == 18000
    assert values["gateway"]["labels"] == {"app": "canal-gateway"}, "the examples' workloadSelector"
    assert values["gateway"]["service"]["name"] == "canal-gateway", "the examples' address.serviceRef"
    assert values["internalGateway"]["name"] == "canal", "the examples' InternalGateway: the gateways' xDS group"
    for key in values:
        assert key in json.loads((CHART / "values.schema.json").read_text())["properties"], key


def _example(folder: str) -> list[dict[str, Any]]:
    return [d for path in sorted((ROOT / "examples" / folder).glob("*.yaml")) for d in _documents(path.read_text())]


def test_the_cluster_example_applies_next_to_the_chart_and_binds():
    """What the README tells a user to apply: only objects a user creates (the cluster makes Pods and
    EndpointSlices; the chart makes the gateway Service), the same Gateway and InternalGateway the chart's
    createGateway would make, and the VirtualService binds to it once the chart's gateway Service is there."""
    user = _example("cluster")
    assert {o["kind"] for o in user} == {"Service", "Deployment", "Gateway", "InternalGateway", "VirtualService"}
    assert (ROOT / "examples/cluster/30-virtualservice.yaml").read_bytes() == (
        ROOT / "examples/helloworld/30-virtualservice.yaml"
    ).read_bytes()
    created = {(o["kind"], o["metadata"]["name"]): o for o in render({"createGateway": True}).objects}
    for obj in user:
        if obj["kind"] in ("Gateway", "InternalGateway"):
            assert created[(obj["kind"], obj["metadata"]["name"])]["spec"] == obj["spec"], obj["kind"]
    chart_service = copy.deepcopy(created[("Service", "canal-gateway")])
    chart_service["spec"]["clusterIP"] = "10.96.0.50"  # what the API server would assign
    helloworld = next(o for o in user if o["kind"] == "Service")
    helloworld["spec"]["clusterIP"] = "10.96.120.15"
    state = translate(Snapshot.from_dicts([*user, chart_service]))
    assert not state.rejections()
    assert "helloworld.default.svc.cluster.local" in state.dns
