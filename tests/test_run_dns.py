"""`canal run --dns-address`: the file-backed control plane answers `dig` for migrated names and follows edits.

Expected answers come from the manifests: a name resolves to the gateway Service's ClusterIP once a
VirtualService routes its Service through the gateway, and stops being Canal's when the VirtualService goes.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.builders import app, base, route, service, virtual_service
from tests.conftest import run_canal
from tests.envoy_harness import ControlPlane, free_port, wait_for
from tests.kube_api import KubeApiServer

pytestmark = pytest.mark.skipif(
    shutil.which("dig") is None, reason="needs dig (Debian dnsutils; scripts/test installs it)"
)

GATEWAY_IP = "10.96.0.50"
WEB = "web.default.svc.cluster.local"
API = "api.default.svc.cluster.local"


def dig(port: int, name: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *options, name],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def answers(port: int, name: str) -> list[str]:
    return dig(port, name, "+short").stdout.split()


def status_of(port: int, name: str) -> str:
    out = dig(port, name).stdout
    return out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else out


def objects(*routed: str) -> list[dict]:
    objs = [*base(service_ref="canal-gateway"), service("canal-gateway", "istio-system", ip=GATEWAY_IP)]
    for name in ("web", "api"):
        objs += app(name, ips=(f"10.244.{len(objs)}.1",))
    objs += [virtual_service(name, http=[{"route": [route(name)]}]) for name in routed]
    return objs


@pytest.fixture
def plane(tmp_path):
    port = free_port()
    plane = ControlPlane(tmp_path, extra_args=["--dns-address", f"127.0.0.1:{port}", "--no-dns-forward"])
    plane.dns_port = port
    yield plane
    plane.stop()


def test_migrated_names_resolve_to_the_gateway_and_follow_edits(plane):
    port = plane.dns_port
    plane.write("cluster", objects("web"))
    wait_for(lambda: answers(port, WEB) == [GATEWAY_IP], what="web to resolve to the gateway")
    assert status_of(port, API) == "REFUSED"  # not migrated: not Canal's, and forwarding is off
    assert answers(port, WEB.upper()) == [GATEWAY_IP]

    plane.write("cluster", objects("web", "api"))  # a second VirtualService: api moves too
    wait_for(lambda: answers(port, API) == [GATEWAY_IP], what="api to resolve after the edit")
    plane.write("cluster", objects("api"))  # web's VirtualService is gone: web is no longer rewritten
    wait_for(lambda: status_of(port, WEB) == "REFUSED", what="web to stop being rewritten")
    assert answers(port, API) == [GATEWAY_IP]
    assert plane.status()["dns"]["names"] == 1
    assert 'canal_dns_queries_total{rcode="REFUSED"' in plane.metrics()


def test_dns_apply_verifies_against_the_cluster_dns(plane, tmp_path, kube_api: KubeApiServer):
    """`canal dns apply --verify` waits until the cluster DNS answers the gateway; Canal's server plays it here."""
    plane.write("cluster", objects("web"))
    wait_for(lambda: answers(plane.dns_port, WEB) == [GATEWAY_IP], what="web to resolve")
    manifests = tmp_path / "apply"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(yaml.safe_dump_all(objects("web")))
    kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": ".:53 {\n    kubernetes cluster.local in-addr.arpa ip6.arpa\n    reload\n}\n"},
        }
    )
    config = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    result = run_canal(
        "dns", "apply", "-f", str(manifests), "--kubeconfig", str(config),
        "--verify", f"127.0.0.1:{plane.dns_port}", "--timeout", "20",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DNSProgrammed=True" in result.stdout
    assert (
        f"rewrite stop name exact {WEB} canal-gateway.istio-system.svc.cluster.local"
        in (kube_api.get("v1", "ConfigMap", "coredns", "kube-system")["data"]["Corefile"])
    )
