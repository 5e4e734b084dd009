"""The `canal` command as users run it: output, exit codes 0/1/2, and no tracebacks for bad input."""

from __future__ import annotations

import json

import yaml

from canal import __version__
from tests.conftest import run_canal


def test_render_helloworld_shows_listener_route_endpoints_dns_and_redirect(helloworld_dir):
    result = run_canal("render", "-f", str(helloworld_dir))
    assert result.returncode == 0, result.stderr
    out = yaml.safe_load(result.stdout)
    gateway = out["envoy"]["istio-system/canal"]
    assert [(lst["name"], lst["port"], lst["protocol"]) for lst in gateway["listeners"]] == [
        ("0.0.0.0_5000", 5000, "HTTP")
    ]
    (route_config,) = gateway["route_configs"]
    vhost = route_config["virtual_hosts"]["helloworld.default.svc.cluster.local"]
    assert "helloworld:5000" in vhost["domains"]
    (route,) = vhost["routes"]
    assert route["match"]["path"] == {"kind": "exact", "value": "/hello"}
    assert route["action"]["clusters"] == [
        {"cluster": "outbound|5000||helloworld.default.svc.cluster.local", "weight": 100}
    ]
    (endpoints,) = gateway["endpoints"]
    assert sorted(e["address"] for e in endpoints["endpoints"]) == ["10.244.1.21", "10.244.2.34"]
    assert out["dns"] == [
        {
            "fqdn": "helloworld.default.svc.cluster.local",
            "addresses": ["10.96.0.50"],
            "ttl": 5,
            "gateway": "istio-system/canal",
            "mode": "coredns",
            "target": "canal-gateway.istio-system.svc.cluster.local",
        }
    ]
    (redirect,) = out["redirects"]
    assert redirect["key"] == "10.96.120.15:5000/tcp"
    assert redirect["backends"] == [{"address": "10.244.9.5", "port": 5000}]


def test_render_json_and_only_section(helloworld_dir):
    result = run_canal("render", "-f", str(helloworld_dir), "--format", "json", "--only", "dns")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["dns"]


def test_validate_clean_example_exits_zero(helloworld_dir):
    result = run_canal("validate", "-f", str(helloworld_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_version_and_help_on_every_command():
    version = run_canal("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    for args in ([], ["render"], ["validate"]):
        result = run_canal(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout


def test_usage_errors_exit_two():
    assert run_canal("render").returncode == 2  # -f is required
    assert run_canal("render", "-f", "x.yaml", "--format", "xml").returncode == 2
    assert run_canal("no-such-command").returncode == 2


def test_unreadable_input_exits_one_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n")
    for command in ("render", "validate"):
        result = run_canal(command, "-f", str(bad))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "invalid YAML" in result.stderr and "bad.yaml" in result.stderr
    missing = run_canal("validate", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_stdin_input(helloworld_dir):
    text = "\n---\n".join(p.read_text() for p in sorted(helloworld_dir.glob("*.yaml")))
    result = run_canal("render", "-f", "-", "--only", "redirects", stdin=text)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["redirects"][0]["service"] == "default/helloworld"


def test_drain_grace_reaches_the_publisher():
    """--drain-grace is how long withdrawn Services stay routed beyond their TTL: the flag, the options, the
    publisher that applies it."""
    from canal.cli import cli as group
    from canal.run import ControlPlane, RunOptions

    for command, args in (("run", ["-f", "examples/helloworld"]), ("controller", [])):
        ctx = group.commands[command].make_context(command, [*args, "--drain-grace", "30"])
        assert ctx.params["drain_grace"] == 30.0
    plane = ControlPlane(RunOptions(["examples/helloworld"], "127.0.0.1:0", "127.0.0.1:0", drain_grace=30.0))
    assert plane.serving.publisher.drain_grace == 30.0
