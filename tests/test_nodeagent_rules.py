"""The node agent's rule model: both sources parse into the same validated rules, and bad input names the rule and
field. Expected rules are written out from the example manifests (examples/helloworld: Service default/helloworld,
ClusterIP 10.96.120.15, port 5000, one gateway pod 10.244.9.5), not taken from the parser's output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from canal.nodeagent.rules import RuleError, for_mode, from_json, from_protos, to_json
from canal.xds.canal_redirect_pb2 import Backend as BackendProto
from canal.xds.canal_redirect_pb2 import RedirectRule as RuleProto

from canal.desired import Backend, RedirectKey, RedirectRule

ROOT = Path(__file__).resolve().parent.parent
HELLO = RedirectKey("10.96.120.15", "tcp", 5000)
HELLO_BACKENDS = (Backend("10.244.9.5", 5000),)
REDIRECTS_JSON = ("--only", "redirects", "--format", "json")
V4, V6 = {"address": "10.244.9.5", "port": 80}, {"address": "fd01::5", "port": 80}


def document(*items: dict) -> str:
    return json.dumps({"redirects": list(items)})


def item(key: str = "10.96.0.1:80/tcp", backends: list | None = None, mode: str = "nftables", **extra) -> dict:
    out = {
        "key": key,
        "backends": backends if backends is not None else [{"address": "10.244.9.5", "port": 80}],
        "service": "default/web",
        "gateway": "istio-system/canal",
        "mode": mode,
    }
    out.update(extra)
    return out


def test_the_render_output_of_the_example_is_the_agents_input() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "canal", "render", "-f", str(ROOT / "examples/helloworld"), *REDIRECTS_JSON],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = from_json(text, "render")
    assert rules == {
        HELLO: RedirectRule(
            HELLO, (Backend("10.244.9.5", 5000),), "default/helloworld", "istio-system/canal", "nftables"
        )
    }
    assert from_json(to_json(rules), "again") == rules


def test_protos_and_json_give_the_same_rules() -> None:
    proto = RuleProto(
        cluster_ip="fd00:0:0::1",
        protocol="tcp",
        port=80,
        backends=[BackendProto(address="fd01::6", port=8080), BackendProto(address="fd01::5", port=8080)],
        service="default/web",
        gateway="istio-system/canal",
        mode="nftables",
    )
    from_xds = from_protos([proto])
    from_file = from_json(
        document(
            item(
                "[fd00::1]:80/tcp",
                [{"address": "fd01::6", "port": 8080}, {"address": "fd01:0::5", "port": 8080}],
            )
        ),
        "f",
    )
    key = RedirectKey("fd00::1", "tcp", 80)  # canonical (compressed) addresses, backends sorted
    assert from_xds == from_file
    assert from_xds[key].backends == (Backend("fd01::5", 8080), Backend("fd01::6", 8080))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (item("10.96.0.1/tcp"), "redirect 10.96.0.1/tcp: key: '10.96.0.1/tcp' is not <cluster ip>:<port>/<protocol>"),
        (item("fd00::1:80/tcp"), "an IPv6 ClusterIP is written in brackets"),
        (item("10.96.0.300:80/tcp"), "redirect 10.96.0.300:80/tcp: cluster_ip: '10.96.0.300' is not an IP address"),
        (item("10.96.0.1:0/tcp"), "redirect 10.96.0.1:0/tcp: port: expected a port 1-65535, got 0"),
        (item("10.96.0.1:80/udp"), "redirect 10.96.0.1:80/udp: protocol: 'udp' is not supported"),
        (item("127.0.0.1:80/tcp"), "cluster_ip: 127.0.0.1 cannot be redirected"),
        (item(backends=[]), "redirect 10.96.0.1:80/tcp: backends: at least one gateway backend is required"),
        (
            item(backends=[{"address": "fd01::5", "port": 80}]),
            "backends[0].address: fd01::5 is IPv6, the ClusterIP is IPv4",
        ),
        (
            item(backends=[{"address": "10.96.0.1", "port": 80}]),
            "backends[0].address: 10.96.0.1 is the ClusterIP itself",
        ),
        (item(backends=[{"address": "10.244.9.5", "port": 70000}]), "backends[0].port: expected a port 1-65535"),
        (item(backends=[{"address": "gw", "port": 80}]), "backends[0].address: 'gw' is not an IP address"),
        (item(mode="iptables"), "redirect 10.96.0.1:80/tcp: mode: 'iptables' is not one of ipvs, nftables"),
        (item(service=7), "service: expected a string, got 7"),
        ("[1]", 'expected an object with a "redirects" list'),
        ("{", "src: not JSON"),
    ],
)
def test_bad_input_names_the_rule_and_the_field(entry: dict | str, message: str) -> None:
    text = entry if isinstance(entry, str) else document(entry)
    with pytest.raises(RuleError) as error:
        from_json(text, "src")
    assert message in str(error.value)
    assert str(error.value).startswith("src")


def test_a_clusterip_claimed_twice_is_refused_and_an_exact_repeat_is_not() -> None:
    same = item()
    assert len(from_json(document(same, same), "f")) == 1
    other = item(gateway="other/gw")
    with pytest.raises(RuleError, match=r"redirect 10.96.0.1:80/tcp: claimed twice .* of other/gw"):
        from_json(document(same, other), "f")


def test_each_backend_installs_only_the_rules_of_its_mode() -> None:
    rules = from_json(document(item("10.96.0.1:80/tcp"), item("10.96.0.2:80/tcp", mode="ipvs")), "f")
    assert list(for_mode(rules, "nftables")) == [RedirectKey("10.96.0.1", "tcp", 80)]
    assert list(for_mode(rules, "ipvs")) == [RedirectKey("10.96.0.2", "tcp", 80)]
