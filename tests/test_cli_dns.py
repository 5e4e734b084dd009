"""`canal dns corefile|apply|restore` as a user runs them: the installed command, a kubeconfig, a real HTTP API.

The cluster is the test API server (tests/kube_api.py) that the official kubernetes client talks to; the Corefile
is the kubeadm default from tests/corefiles. Expected rules follow from the helloworld example: one migrated
Service, renamed to the gateway Service canal-gateway.istio-system, TTL 5 (the InternalGateway's dns.ttl).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ROOT, run_canal
from tests.kube_api import KubeApiServer

KUBEADM = (ROOT / "tests" / "corefiles" / "kubeadm.Corefile").read_text()
NAME = "helloworld.default.svc.cluster.local"
GATEWAY = "canal-gateway.istio-system.svc.cluster.local"
RULE = f"rewrite stop name exact {NAME} {GATEWAY}"
TTL_RULE = f"rewrite continue ttl exact {NAME} 5"


def kubeconfig(tmp_path: Path, server: KubeApiServer) -> str:
    return str(server.write_kubeconfig(tmp_path / "kubeconfig"))


def seed(server: KubeApiServer, corefile: str = KUBEADM) -> None:
    server.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile},
        }
    )


def corefile_in(server: KubeApiServer) -> tuple[str, dict]:
    configmap = server.get("v1", "ConfigMap", "coredns", "kube-system")
    return configmap["data"]["Corefile"], configmap["metadata"].get("annotations") or {}


def test_corefile_prints_the_edited_file_and_the_diff(helloworld_dir, tmp_path):
    source = tmp_path / "Corefile"
    source.write_text(KUBEADM)
    printed = run_canal("dns", "corefile", "--corefile", str(source), "-f", str(helloworld_dir))
    assert printed.returncode == 0, printed.stderr
    assert TTL_RULE in printed.stdout and RULE in printed.stdout
    # everything Canal adds is its block: dropping the block's lines gives back the input
    kept = [line for line in printed.stdout.splitlines(keepends=True) if "canal:" not in line and "rewrite" not in line]
    assert "".join(kept) == KUBEADM
    diff = run_canal("dns", "corefile", "--corefile", str(source), "-f", str(helloworld_dir), "--diff")
    assert diff.returncode == 0, diff.stderr
    lines = diff.stdout.splitlines()
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("++")]
    assert TTL_RULE in added and RULE in added
    assert not [line for line in lines if line.startswith("-") and not line.startswith("--")]


def test_corefile_refuses_what_it_cannot_edit_and_names_the_line(helloworld_dir, tmp_path):
    source = tmp_path / "Corefile"
    source.write_text(".:53 {\n    errors\n    kubernetes cluster.local {\n        pods insecure\n\n}\n")  # unbalanced
    result = run_canal("dns", "corefile", "--corefile", str(source), "-f", str(helloworld_dir))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "line " in result.stderr and "Traceback" not in result.stderr


def test_apply_writes_once_keeps_the_original_and_restore_puts_it_back(helloworld_dir, tmp_path, kube_api):
    seed(kube_api)
    config = kubeconfig(tmp_path, kube_api)

    first = run_canal("dns", "apply", "-f", str(helloworld_dir), "--kubeconfig", config)
    assert first.returncode == 0, first.stderr
    assert "written" in first.stdout and "1 rewritten name" in first.stdout
    text, annotations = corefile_in(kube_api)
    assert RULE in text and TTL_RULE in text
    assert annotations["canal.io/original-corefile"] == KUBEADM

    puts = len(kube_api.requests_of("PUT", kind="ConfigMap"))
    again = run_canal("dns", "apply", "-f", str(helloworld_dir), "--kubeconfig", config)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    assert len(kube_api.requests_of("PUT", kind="ConfigMap")) == puts  # idempotent: not even a write

    restored = run_canal("dns", "restore", "--kubeconfig", config)
    assert restored.returncode == 0, restored.stderr
    text, annotations = corefile_in(kube_api)
    assert text == KUBEADM
    assert "canal.io/original-corefile" not in annotations


def test_restore_without_a_saved_original_fails_unless_told_to_strip(helloworld_dir, tmp_path, kube_api):
    config = kubeconfig(tmp_path, kube_api)
    source = tmp_path / "Corefile"
    source.write_text(KUBEADM)
    edited = run_canal("dns", "corefile", "--corefile", str(source), "-f", str(helloworld_dir)).stdout
    seed(kube_api, edited)  # Canal's block, but the saved original was lost

    refused = run_canal("dns", "restore", "--kubeconfig", config)
    assert refused.returncode == 1
    assert "kube-system/coredns" in refused.stderr and "Traceback" not in refused.stderr
    assert corefile_in(kube_api)[0] == edited

    stripped = run_canal("dns", "restore", "--kubeconfig", config, "--strip-if-unsaved")
    assert stripped.returncode == 0, stripped.stderr
    assert corefile_in(kube_api)[0] == KUBEADM


def test_cluster_errors_are_named_without_a_traceback(helloworld_dir, tmp_path, kube_api):
    config = kubeconfig(tmp_path, kube_api)
    missing = run_canal("dns", "apply", "-f", str(helloworld_dir), "--kubeconfig", config)
    assert missing.returncode == 1
    assert "kube-system/coredns" in missing.stderr and "Traceback" not in missing.stderr
    bad_ref = run_canal("dns", "restore", "--kubeconfig", config, "--configmap", "coredns")
    assert bad_ref.returncode == 2 and "NAMESPACE/NAME" in bad_ref.stderr
    no_config = run_canal("dns", "restore", "--kubeconfig", str(tmp_path / "absent"))
    assert no_config.returncode == 1 and "Kubernetes configuration" in no_config.stderr
