#!/usr/bin/env python3
"""Translation at scale: full and incremental translation of a large synthetic cluster, with time and memory.

The workload is the one the scale requirement names: 10,000 VirtualServices, 10,000 Services and 50,000
endpoints (10,000 EndpointSlices of 5 ready endpoints, each backed by a Pod), plus a few hundred
DestinationRules, one Istio Gateway and one InternalGateway. The cluster is generated deterministically from a
seed, so every run translates the same input.

    python bench/translate.py                      # full size; prints a Markdown table
    python bench/translate.py --services 1000      # quicker (endpoints and DestinationRules scale with it)

Measured in one run: parse (`Snapshot.from_dicts`), full translation (`translate(snapshot)`), both together,
and single-object incremental updates through a `Translator` that already holds the full state. Memory is
measured in fresh subprocesses (peak RSS from /proc/self/status VmHWM, and a tracemalloc peak of `translate()`
alone) so that the timing runs do not distort it.

Targets (from the scale requirement): full translation < 2 s, incremental update < 5 ms, memory < 500 MB.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import ipaddress
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from canal.model.base import ObjectRef
from canal.snapshot import Snapshot, parse_object
from canal.translate import Translator, translate
from canal.translate.engine import snapshot_items

TARGET_FULL_S = 2.0
TARGET_INCREMENTAL_MS = 5.0
TARGET_MEMORY_MB = 500.0

GATEWAY_NS = "istio-system"
GATEWAY_PORTS = (80, 8080)
SHARD_PORT_BASE = 20000  # --shards: shard k's listener for GATEWAY_PORTS[i] is 20000 + 1000 * i + k
DOMAIN = "cluster.local"
ISTIO = "networking.istio.io/v1"

# ============================================================================================== generator

_WORDS = (
    "cart", "checkout", "payments", "orders", "inventory", "search", "catalog", "auth", "users", "profile",
    "reviews", "ratings", "shipping", "notify", "email", "recommend", "ads", "currency", "frontend", "billing",
    "ledger", "fraud", "pricing", "session", "media", "thumbs", "geo", "flags", "audit", "quotes",
)  # fmt: skip
# Regexes repeat across services in real clusters (copied from one template), with a few bespoke ones.
_COMMON_REGEXES = (
    r"^/api/v[0-9]+/items/[0-9]+$",
    r"^/users/[a-z0-9-]+/profile$",
    r"^/orders/[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$",
    r"/static/.*\.(js|css|png)",
    r"^/v[12]/search(/.*)?$",
    r"^/healthz?$",
)


class _Clock:
    """creationTimestamps in creation order, one second apart: "the oldest wins" stays deterministic."""

    def __init__(self) -> None:
        self.t = 1_700_000_000

    def next(self) -> str:
        self.t += 1
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t))


def _meta(name: str, ns: str, clock: _Clock, rng: random.Random, **extra: Any) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": ns,
        "uid": f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-"
        f"{rng.getrandbits(16):04x}-{rng.getrandbits(48):012x}",
        "resourceVersion": str(rng.randrange(10**6, 10**8)),
        "generation": 1,
        "creationTimestamp": clock.next(),
    }
    meta.update(extra)
    return meta


def _suffix(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


def _ip(base: str, offset: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(base)) + offset))


class Cluster:
    """The generated objects (Kubernetes-style dicts) and the handles the incremental cases need."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.services: list[dict[str, Any]] = []  # application Services, in creation order
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, service) -> EndpointSlice
        self.virtual_services: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, service) -> VirtualService
        self.rules: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, service) -> DestinationRule
        self.counts: dict[str, int] = {}
        self.features: dict[str, int] = {}


def generate(
    services: int = 10_000,
    namespaces: int = 100,
    endpoints_per_service: int = 5,
    rule_fraction: float = 0.04,
    seed: int = 20240601,
    reuse_names: bool = False,
    shards: int = 1,
) -> Cluster:
    """A deterministic synthetic cluster of `services` Services, each with a VirtualService on the gateway.

    Service names are unique cluster-wide by default, so no two Services claim the same short-name Host header
    (`api`, `api:80`) on the shared gateway. With `reuse_names`, names are unique only within a namespace, as in
    real clusters: the input stays valid, but the gateway drops the shared short names with a caveat each.

    With `shards` > 1 the InternalGateway sets address.shards and the shard Services canal-gateway-<k> are added
    (targetPort of each gateway port: its shard's listener port, see SHARD_PORT_BASE). They are generated last,
    from their own random stream, so every other object is the same as with one shard.
    """
    rng = random.Random(seed)
    clock = _Clock()
    out = Cluster()
    features: dict[str, int] = {}

    def feature(name: str) -> None:
        features[name] = features.get(name, 0) + 1

    def add(obj: dict[str, Any]) -> dict[str, Any]:
        out.objects.append(obj)
        return obj

    # --- gateway side: Gateway, InternalGateway, its Service and two pods
    add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": GATEWAY_NS, "labels": {}}})
    add(
        {
            "apiVersion": ISTIO,
            "kind": "Gateway",
            "metadata": _meta("canal", GATEWAY_NS, clock, rng),
            "spec": {
                "selector": {"app": "canal-gateway"},
                "servers": [
                    {"port": {"number": p, "name": f"http-{p}", "protocol": "HTTP"}, "hosts": ["*"]}
                    for p in GATEWAY_PORTS
                ],
            },
        }
    )
    add(
        {
            "apiVersion": "canal.io/v1alpha1",
            "kind": "InternalGateway",
            "metadata": _meta("canal", GATEWAY_NS, clock, rng),
            "spec": {
                "gatewayRef": {"name": "canal", "namespace": GATEWAY_NS},
                "workloadSelector": {"app": "canal-gateway"},
                "address": {"serviceRef": {"name": "canal-gateway", "namespace": GATEWAY_NS}},
                "clusterDomain": DOMAIN,
                "dns": {"mode": "coredns", "ttl": 5},
                "redirect": {"mode": "nftables"},
            },
        }
    )
    add(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("canal-gateway", GATEWAY_NS, clock, rng),
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.50",
                "clusterIPs": ["10.96.0.50"],
                "selector": {"app": "canal-gateway"},
                "ports": [{"name": f"http-{p}", "port": p, "targetPort": p, "protocol": "TCP"} for p in GATEWAY_PORTS],
            },
        }
    )
    for i in range(2):
        ip = _ip("10.250.0.10", i)
        add(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": _meta(
                    f"canal-gateway-7d9f8b6c5-{_suffix(rng)}", GATEWAY_NS, clock, rng, labels={"app": "canal-gateway"}
                ),
                "spec": {"nodeName": f"gateway-{i + 1}"},
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )

    # --- namespaces: team sizes are uneven (a few big teams, a long tail), as in real clusters
    ns_names = [f"team-{k:03d}" for k in range(namespaces)]
    for k, ns in enumerate(ns_names):
        add(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "labels": {"kubernetes.io/metadata.name": ns, "team": f"t{k % 17}", "istio-injection": "disabled"},
                },
            }
        )
    weights = [1.0 / (k + 1) ** 0.5 for k in range(namespaces)]
    placement = rng.choices(range(namespaces), weights=weights, k=services)

    pod_ip = 0
    nodes = [f"worker-{n:03d}" for n in range(max(3, services // 50))]
    zones = ("zone-a", "zone-b", "zone-c")
    plans = []
    per_namespace: dict[str, int] = {}
    for i in range(services):
        ns = ns_names[placement[i]]
        word = rng.choice(_WORDS)
        if reuse_names:
            k = per_namespace[ns] = per_namespace.get(ns, -1) + 1
            name = f"{_WORDS[k % len(_WORDS)]}-{k // len(_WORDS)}"  # checkout-0 in many namespaces
        else:
            name = f"{word}-{i}"  # unique cluster-wide: short names never collide across namespaces
        r = rng.random()
        if r < 0.60:
            ports = [("http", 80, 8080)]
        elif r < 0.75:
            ports = [("http-web", 8080, 8080)]
        else:
            ports = [("http", 80, 8080), ("http-admin", 8080, 9090)]
        plans.append((i, ns, name, ports))

    # --- Services, EndpointSlices, Pods
    for i, ns, name, ports in plans:
        cluster_ip = _ip("10.96.16.0", i)
        svc = add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(name, ns, clock, rng, labels={"app": name}),
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": cluster_ip,
                    "clusterIPs": [cluster_ip],
                    "ipFamilies": ["IPv4"],
                    "selector": {"app": name},
                    "sessionAffinity": "None",
                    "ports": [
                        {"name": pn, "port": port, "targetPort": target, "protocol": "TCP", "appProtocol": "http"}
                        if rng.random() < 0.2
                        else {"name": pn, "port": port, "targetPort": target, "protocol": "TCP"}
                        for pn, port, target in ports
                    ],
                },
            }
        )
        out.services.append(svc)
        endpoints, pods = [], []
        v1_hash, v2_hash = f"{rng.getrandbits(40):010x}"[:10], f"{rng.getrandbits(40):010x}"[:10]
        for e in range(endpoints_per_service):
            version = "v1" if e < (endpoints_per_service + 1) // 2 else "v2"  # 5 -> 3 x v1, 2 x v2
            pod_name = f"{name}-{version}-{v1_hash if version == 'v1' else v2_hash}-{_suffix(rng)}"
            ip = _ip("10.128.0.2", pod_ip)
            pod_ip += 1
            node = rng.choice(nodes)
            endpoints.append(
                {
                    "addresses": [ip],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": node,
                    "zone": zones[int(node[-3:]) % 3],
                    "targetRef": {"kind": "Pod", "name": pod_name, "namespace": ns, "uid": _suffix(rng, 12)},
                }
            )
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": _meta(
                        pod_name,
                        ns,
                        clock,
                        rng,
                        labels={"app": name, "version": version, "pod-template-hash": pod_name.rsplit("-", 2)[1]},
                    ),
                    "spec": {
                        "nodeName": node,
                        "containers": [{"name": "app", "image": f"registry.example.com/{ns}/{name}:1.{i % 40}.0"}],
                    },
                    "status": {
                        "phase": "Running",
                        "podIP": ip,
                        "podIPs": [{"ip": ip}],
                        "hostIP": _ip("10.0.0.10", int(node[-3:])),
                        "conditions": [
                            {"type": "Initialized", "status": "True"},
                            {"type": "Ready", "status": "True"},
                            {"type": "ContainersReady", "status": "True"},
                            {"type": "PodScheduled", "status": "True"},
                        ],
                    },
                }
            )
        slc = add(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": _meta(
                    f"{name}-{_suffix(rng)}",
                    ns,
                    clock,
                    rng,
                    labels={"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "x"},
                ),
                "addressType": "IPv4",
                "ports": [{"name": pn, "port": target, "protocol": "TCP"} for pn, _, target in ports],
                "endpoints": endpoints,
            }
        )
        out.slices[(ns, name)] = slc
        out.objects.extend(pods)

    # --- DestinationRules: subsets v1/v2 for some Services, traffic policies for some of those
    with_rules = set(rng.sample(range(services), max(1, round(services * rule_fraction)))) if services else set()
    for i, ns, name, _ports in plans:
        if i not in with_rules:
            continue
        r = rng.random()
        spec: dict[str, Any] = {"host": name if r < 0.5 else f"{name}.{ns}.svc.{DOMAIN}"}
        subsets = rng.random() < 0.8
        if subsets:
            spec["subsets"] = [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ]
            feature("DestinationRule with subsets")
        kind = rng.random()
        if kind < 0.35:
            spec["trafficPolicy"] = {
                "connectionPool": {
                    "tcp": {"maxConnections": 200, "connectTimeout": "2s"},
                    "http": {"http1MaxPendingRequests": 64, "maxRequestsPerConnection": 100, "idleTimeout": "60s"},
                },
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "interval": "10s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 50,
                },
            }
            feature("DestinationRule connectionPool+outlierDetection")
        elif kind < 0.55:
            spec["trafficPolicy"] = {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user-id"}}}
            feature("DestinationRule consistentHash")
        elif kind < 0.7:
            spec["trafficPolicy"] = {"loadBalancer": {"simple": "ROUND_ROBIN"}}
            if subsets:
                spec["subsets"][1]["trafficPolicy"] = {"loadBalancer": {"simple": "RANDOM"}}
        elif not subsets:
            spec["trafficPolicy"] = {"loadBalancer": {"simple": "LEAST_REQUEST"}}
        rule = add(
            {
                "apiVersion": ISTIO,
                "kind": "DestinationRule",
                "metadata": _meta(name, ns, clock, rng),
                "spec": spec,
            }
        )
        out.rules[(ns, name)] = rule

    # --- VirtualServices: one per Service, hosts = the Service FQDN, on the shared gateway
    for _i, ns, name, ports in plans:
        rule = out.rules.get((ns, name))
        subsets = rule is not None and "subsets" in rule["spec"]
        vs = add(_virtual_service(rng, clock, ns, name, ports, subsets, plans, feature))
        out.virtual_services[(ns, name)] = vs

    if shards > 1:
        _add_shards(out, shards, random.Random(seed + 1), clock)

    out.features = dict(sorted(features.items()))
    for obj in out.objects:
        out.counts[obj["kind"]] = out.counts.get(obj["kind"], 0) + 1
    return out


def _add_shards(out: Cluster, shards: int, rng: random.Random, clock: _Clock) -> None:
    """address.shards on the InternalGateway, and the Services canal-gateway-<k> the Helm chart would create."""
    ig = next(o for o in out.objects if o["kind"] == "InternalGateway")
    ig["spec"]["address"]["shards"] = shards
    for k in range(shards):
        ip = _ip("10.96.2.0", k)
        out.objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(f"canal-gateway-{k}", GATEWAY_NS, clock, rng),
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": ip,
                    "clusterIPs": [ip],
                    "selector": {"app": "canal-gateway"},
                    "ports": [
                        {
                            "name": f"http-{p}",
                            "port": p,
                            "targetPort": SHARD_PORT_BASE + 1000 * i + k,
                            "protocol": "TCP",
                        }
                        for i, p in enumerate(GATEWAY_PORTS)
                    ],
                },
            }
        )


def _dest(rng: random.Random, ns: str, name: str, **extra: Any) -> dict[str, Any]:
    r = rng.random()
    host = name if r < 0.5 else (f"{name}.{ns}" if r < 0.6 else f"{name}.{ns}.svc.{DOMAIN}")
    return {"host": host, **extra}


def _route_extras(rng: random.Random, route: dict[str, Any], feature: Callable[[str], None]) -> dict[str, Any]:
    r = rng.random()
    if r < 0.4:
        route["timeout"] = rng.choice(("3s", "5s", "15s", "30s"))
        feature("timeout")
    r = rng.random()
    if r < 0.3:
        route["retries"] = {
            "attempts": rng.choice((1, 2, 3)),
            "perTryTimeout": rng.choice(("500ms", "1s", "2s")),
            "retryOn": rng.choice(("5xx,reset,connect-failure", "gateway-error,connect-failure", "503,reset")),
        }
        feature("retries")
    elif r < 0.33:
        route["retries"] = {"attempts": 0}
        feature("retries disabled")
    return route


def _virtual_service(
    rng: random.Random,
    clock: _Clock,
    ns: str,
    name: str,
    ports: list[tuple[str, int, int]],
    subsets: bool,
    plans: list[tuple[int, str, str, list]],
    feature: Callable[[str], None],
) -> dict[str, Any]:
    fqdn = f"{name}.{ns}.svc.{DOMAIN}"
    http: list[dict[str, Any]] = []
    shape = rng.random()
    if subsets:
        # Canary by header, then a weighted split between the subsets.
        w = rng.choice((90, 80, 95, 50))
        http.append(
            _route_extras(
                rng,
                {
                    "name": "canary",
                    "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                    "route": [{"destination": _dest(rng, ns, name, subset="v2")}],
                },
                feature,
            )
        )
        http.append(
            _route_extras(
                rng,
                {
                    "name": "split",
                    "route": [
                        {"destination": _dest(rng, ns, name, subset="v1"), "weight": w},
                        {"destination": _dest(rng, ns, name, subset="v2"), "weight": 100 - w},
                    ],
                },
                feature,
            )
        )
        feature("weighted subsets + header canary")
    elif shape < 0.50:
        # The common case: everything to the Service, perhaps with a timeout or retries.
        route: dict[str, Any] = {"route": [{"destination": _dest(rng, ns, name)}]}
        if rng.random() < 0.5:
            route["match"] = [{"uri": {"prefix": "/"}}]
        http.append(_route_extras(rng, route, feature))
        feature("single catch-all route")
    else:
        # An API: exact health check, versioned prefixes (one behind a header), a regex, then a catch-all.
        http.append({"match": [{"uri": {"exact": "/healthz"}}], "route": [{"destination": _dest(rng, ns, name)}]})
        http.append(
            _route_extras(
                rng,
                {
                    "name": "v2-api",
                    "match": [
                        {"uri": {"prefix": "/api/v2"}, "headers": {"x-api-version": {"exact": "2"}}},
                        {"uri": {"prefix": "/api/v2/"}, "method": {"exact": "GET"}},
                    ],
                    "route": [{"destination": _dest(rng, ns, name)}],
                },
                feature,
            )
        )
        regex = rng.choice(_COMMON_REGEXES) if rng.random() < 0.8 else rf"^/{name}/[0-9]+(/.*)?$"
        http.append(
            _route_extras(
                rng,
                {
                    "match": [{"uri": {"regex": regex}, "ignoreUriCase": rng.random() < 0.2}],
                    "route": [{"destination": _dest(rng, ns, name)}],
                },
                feature,
            )
        )
        http.append(
            _route_extras(
                rng,
                {"match": [{"uri": {"prefix": "/api/"}}], "route": [{"destination": _dest(rng, ns, name)}]},
                feature,
            )
        )
        http.append({"route": [{"destination": _dest(rng, ns, name)}]})
        feature("API: exact + prefix + header + regex")
    # The rarer features, each on a few percent of VirtualServices, placed in front of the catch-all.
    extras: list[dict[str, Any]] = []
    if rng.random() < 0.03:
        extras.append(
            {
                "match": [{"uri": {"prefix": "/legacy/"}}],
                "rewrite": {"uri": "/"},
                "route": [{"destination": _dest(rng, ns, name)}],
            }
        )
        feature("rewrite")
    if rng.random() < 0.01:
        extras.append({"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 302}})
        feature("redirect")
    if rng.random() < 0.02:
        http[-1]["corsPolicy"] = {
            "allowOrigins": [{"exact": "https://app.example.com"}, {"regex": r"https://.*\.example\.com"}],
            "allowMethods": ["GET", "POST"],
            "allowHeaders": ["content-type", "authorization"],
            "maxAge": "24h",
        }
        feature("CORS")
    if rng.random() < 0.01:
        http[-1]["fault"] = (
            {"delay": {"fixedDelay": "2s", "percentage": {"value": 1.0}}}
            if rng.random() < 0.5
            else {"abort": {"httpStatus": 503, "percentage": {"value": 0.5}}}
        )
        feature("fault")
    if rng.random() < 0.01:
        _, other_ns, other, _ = rng.choice(plans)
        http[-1]["mirror"] = {"host": f"{other}.{other_ns}.svc.{DOMAIN}"}
        http[-1]["mirrorPercentage"] = {"value": 10.0}
        feature("mirror")
    if rng.random() < 0.05:
        http[-1].setdefault("headers", {})["request"] = {"set": {"x-forwarded-team": ns}}
        feature("header set")
    http[-1:-1] = extras
    return {
        "apiVersion": ISTIO,
        "kind": "VirtualService",
        "metadata": _meta(name, ns, clock, rng),
        "spec": {"hosts": [fqdn], "gateways": [f"{GATEWAY_NS}/canal"], "http": http},
    }


# ============================================================================================ measurement


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-3 else f"{seconds * 1000:,.2f} ms"


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _time(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    samples, result = [], None
    for _ in range(repeat):
        result = None
        gc.collect()  # every repetition starts from the same heap; collections *during* fn still count
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return samples, result


def _largest_namespace(cluster: Cluster) -> str:
    sizes: dict[str, int] = {}
    for svc in cluster.services:
        ns = svc["metadata"]["namespace"]
        sizes[ns] = sizes.get(ns, 0) + 1
    return max(sorted(sizes), key=lambda ns: sizes[ns])


def _pick(cluster: Cluster, ns: str, *, with_subsets: bool) -> tuple[str, str]:
    """The first Service in `ns` (or anywhere, if none there) with / without a DestinationRule with subsets."""

    def ok(key: tuple[str, str]) -> bool:
        rule = cluster.rules.get(key)
        return (rule is not None and "subsets" in rule["spec"]) == with_subsets

    keys = [(s["metadata"]["namespace"], s["metadata"]["name"]) for s in cluster.services]
    return next((k for k in keys if k[0] == ns and ok(k)), None) or next((k for k in keys if ok(k)), keys[0])


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(obj))


def incremental_cases(cluster: Cluster) -> list[tuple[str, str, list[Any], list[Any]]]:
    """(label, target, forward items, reverse items): each apply alternates forward/reverse, a real change."""
    ns = _largest_namespace(cluster)
    cases = []

    # (a) one VirtualService gets a new prefix route in front of its others.
    key = _pick(cluster, ns, with_subsets=False)
    vs = cluster.virtual_services[key]
    changed = _copy(vs)
    changed["metadata"]["generation"] = 2
    changed["spec"]["http"].insert(
        0, {"name": "bench", "match": [{"uri": {"prefix": "/bench/"}}], "route": [{"destination": {"host": key[1]}}]}
    )
    cases.append(("(a) change one VirtualService (add a prefix route)", f"{key[0]}/{key[1]}", [changed], [vs]))

    # (b) one endpoint of one EndpointSlice becomes not ready (a Service with subsets: more clusters to redo).
    key = _pick(cluster, ns, with_subsets=True)
    slc = cluster.slices[key]
    changed = _copy(slc)
    changed["endpoints"][0]["conditions"] = {"ready": False, "serving": False, "terminating": False}
    cases.append(("(b) change one EndpointSlice (one endpoint not ready)", f"{ns}/{slc['metadata']['name']}",
                  [changed], [slc]))  # fmt: skip

    # (c) a brand-new Service, its EndpointSlice and its VirtualService, in one batch (and removed again).
    name = "bench-new"
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": "bench-svc", "creationTimestamp": "2030-01-01T00:00:00Z"},
        "spec": {
            "clusterIP": "10.111.222.33",
            "clusterIPs": ["10.111.222.33"],
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }
    new_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-abcde", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"10.200.0.{k + 1}"], "conditions": {"ready": True}, "nodeName": "worker-001"}
            for k in range(5)
        ],
    }
    new_vs = {
        "apiVersion": ISTIO,
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2030-01-01T00:00:00Z"},
        "spec": {
            "hosts": [f"{name}.{ns}.svc.{DOMAIN}"],
            "gateways": [f"{GATEWAY_NS}/canal"],
            "http": [
                {"match": [{"uri": {"prefix": "/api/"}}], "route": [{"destination": {"host": name}}], "timeout": "5s"},
                {"route": [{"destination": {"host": name}}]},
            ],
        },
    }
    refs = [ObjectRef("Service", ns, name), ObjectRef("EndpointSlice", ns, f"{name}-abcde"),
            ObjectRef("VirtualService", ns, name)]  # fmt: skip
    cases.append(("(c) add a new Service + EndpointSlice + VirtualService", f"{ns}/{name}",
                  [svc, new_slice, new_vs], refs))  # fmt: skip

    # (d) delete one VirtualService (and create it again).
    key = _pick(cluster, ns, with_subsets=False)
    vs = cluster.virtual_services[key]
    cases.append(("(d) delete one VirtualService", f"{key[0]}/{key[1]}",
                  [ObjectRef("VirtualService", *key)], [vs]))  # fmt: skip
    return cases


def _apply_raw(translator: Translator, batch: list[Any]) -> Any:
    """What a watch event costs end to end: parse the changed objects, then translate incrementally."""
    return translator.apply([item if isinstance(item, ObjectRef) else parse_object(item) for item in batch])


def run_incremental(translator: Translator, cluster: Cluster, repeat: int) -> list[dict[str, Any]]:
    cases = incremental_cases(cluster)
    # Age the Translator first, as a running controller is: one delete and re-create of each kind of change.
    # Deleting a key leaves a hole in a dict until it next resizes, and a dict with holes is copied entry by
    # entry instead of cloned; measured on a Translator that never saw a delete, (a) and (b) look ~3x faster.
    for _label, _target, forward, reverse in cases:
        _apply_raw(translator, forward)
        _apply_raw(translator, reverse)
    rows = []
    for label, target, forward, reverse in cases:
        fwd, rev = [], []
        for i in range(repeat):
            batch, samples = (forward, fwd) if i % 2 == 0 else (reverse, rev)
            start = time.perf_counter()
            _apply_raw(translator, batch)
            samples.append(time.perf_counter() - start)
        if len(fwd) > len(rev):  # always end where we started
            _apply_raw(translator, reverse)
        rows.append({"label": label, "target": target, "forward": fwd, "reverse": rev})
    return rows


# ============================================================================================== memory


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process.

    VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss survives fork + exec, so a child started by a large
    parent (this benchmark, after generating the input) reports the parent's size, not its own.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _stream(path: str) -> Iterator[Any]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)


def memory_child(mode: str, path: str) -> dict[str, Any]:
    """Runs in a fresh interpreter: `python bench/translate.py --memory-child MODE PATH`."""
    out: dict[str, Any] = {}
    if mode == "baseline":
        translate(Snapshot.from_dicts([]))
        out["rss_mb"] = _rss_now_mb()
        out["peak_mb"] = _peak_rss_mb()
    elif mode == "stream":
        # The input is read one document at a time, as a controller sees watch events: only the parsed
        # snapshot and the translation are held, never the whole input as dicts.
        out["rss_start_mb"] = _rss_now_mb()
        snapshot = Snapshot.from_dicts(_stream(path))
        gc.collect()
        out["rss_parsed_mb"] = _rss_now_mb()
        out["peak_parsed_mb"] = _peak_rss_mb()
        state = translate(snapshot)
        gc.collect()
        out["rss_translated_mb"] = _rss_now_mb()
        out["peak_mb"] = _peak_rss_mb()
        out["dns"] = len(state.dns)
    elif mode == "translator":
        # A controller's steady state: a Translator holding the snapshot, its indexes and the desired state.
        snapshot = Snapshot.from_dicts(_stream(path))
        translator = Translator()
        translator.apply(snapshot_items(snapshot))
        del snapshot
        gc.collect()
        out["rss_mb"] = _rss_now_mb()
        out["peak_mb"] = _peak_rss_mb()
        out["dns"] = len(translator.desired.dns)
    elif mode == "dicts":
        # As `canal render -f` does: every document in memory as a dict, then parse and translate.
        raws = list(_stream(path))
        gc.collect()
        out["rss_dicts_mb"] = _rss_now_mb()
        state = translate(Snapshot.from_dicts(raws))
        out["peak_mb"] = _peak_rss_mb()
        out["dns"] = len(state.dns)
    elif mode == "tracemalloc":
        snapshot = Snapshot.from_dicts(_stream(path))
        gc.collect()
        tracemalloc.start()
        state = translate(snapshot)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["translate_peak_mb"] = peak / 2**20
        out["translate_retained_mb"] = current / 2**20
        out["dns"] = len(state.dns)
    else:
        raise SystemExit(f"unknown memory mode {mode}")
    return out


def run_memory(cluster: Cluster, modes: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="canal-bench-") as tmp:
        path = os.path.join(tmp, "cluster.jsonl")
        with open(path, "w") as f:
            for obj in cluster.objects:
                f.write(json.dumps(obj, separators=(",", ":")))
                f.write("\n")
        for mode in modes:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--memory-child", mode, path],
                check=True,
                capture_output=True,
                text=True,
            )
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ============================================================================================== machine


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        ram = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        ram = "?"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "date": time.strftime("%Y-%m-%d"),
    }


# ================================================================================================ main


def _describe(state: Any) -> dict[str, int]:
    envoy = next(iter(state.envoy.values()))
    vhosts = [vh for rc in envoy.route_configs.values() for vh in rc.virtual_hosts.values()]
    return {
        "virtual hosts": len(vhosts),
        "routes": sum(len(vh.routes) for vh in vhosts),
        "clusters": len(envoy.clusters),
        "endpoints": sum(len(cla.endpoints) for cla in envoy.endpoints.values()),
        "DNS records": len(state.dns),
        "redirect rules": len(state.redirects),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000, help="Services = VirtualServices (default 10000)")
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--endpoints", type=int, default=5, help="ready endpoints (Pods) per Service (default 5)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument(
        "--reuse-names",
        action="store_true",
        help="Service names unique per namespace only (short names collide across namespaces)",
    )
    ap.add_argument(
        "--shards",
        type=int,
        default=1,
        help="gateway shards (address.shards, plus the shard Services); default 1: the unsharded input",
    )
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of parse / full translation (default 3)")
    ap.add_argument("--incremental", type=int, default=200, help="applies per incremental case (default 200)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--verify", action="store_true", help="check incremental state == full translation at the end")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="write cProfile stats to DIR: full.prof (one full translation) and incremental-<case>.prof;\n"
        "taken with the cyclic GC off, whose pauses cProfile charges to whichever function allocates",
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    log(f"generating {args.services} Services in {args.namespaces} namespaces (seed {args.seed})")
    cluster = generate(
        args.services, args.namespaces, args.endpoints, seed=args.seed, reuse_names=args.reuse_names, shards=args.shards
    )

    log(f"parse x{args.repeat}")
    parse_s, snapshot = _time(lambda: Snapshot.from_dicts(cluster.objects), args.repeat)
    problems = sum(len(p.rejections) for p in snapshot.problems.values())
    log(f"full translation x{args.repeat}")
    full_s, state = _time(lambda: translate(snapshot), args.repeat)
    log(f"parse + full translation x{args.repeat}")
    both_s, _ = _time(lambda: translate(Snapshot.from_dicts(cluster.objects)), args.repeat)
    log(f"full translation with the cyclic GC off (diagnostic) x{args.repeat}")
    gc.disable()
    try:
        nogc_s, _ = _time(lambda: translate(snapshot), args.repeat)
    finally:
        gc.enable()

    rejections = state.rejections()
    caveats = sum(len(s.caveats) for s in state.status.values())
    output = _describe(state)
    valid = problems == 0 and not rejections and output["DNS records"] == args.services
    if not valid:
        log(f"INVALID INPUT: {problems} parse rejections, {len(rejections)} rejections, {len(state.dns)} DNS records")
        for r in rejections[:10]:
            log(f"  {r}")
    del state

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        log(f"profiling one full translation -> {args.profile}/full.prof")
        gc.collect()
        gc.disable()
        try:
            cProfile.runctx("translate(snapshot)", globals(), {"snapshot": snapshot}, f"{args.profile}/full.prof")
        finally:
            gc.enable()

    log("building the Translator for incremental updates")
    translator = Translator()
    translator.apply(snapshot_items(snapshot))
    log(f"incremental updates x{args.incremental} per case")
    incremental = run_incremental(translator, cluster, args.incremental)
    if args.profile:
        gc.disable()
        try:
            for label, _target, forward, reverse in incremental_cases(cluster):
                profile = cProfile.Profile()
                for i in range(args.incremental):
                    batch = forward if i % 2 == 0 else reverse
                    profile.enable()
                    _apply_raw(translator, batch)
                    profile.disable()
                if args.incremental % 2:
                    _apply_raw(translator, reverse)
                profile.dump_stats(f"{args.profile}/incremental-{label[1]}.prof")
        finally:
            gc.enable()
    verified = None
    if args.verify:
        log("verifying incremental == full")
        verified = translator.desired == translate(translator.snapshot)

    memory = {}
    if not args.no_memory:
        log("memory (fresh subprocesses)")
        memory = run_memory(cluster, ["baseline", "stream", "translator", "tracemalloc", "dicts"])
    elapsed = time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ report
    m = machine()
    endpoints = sum(len(s["endpoints"]) for s in cluster.slices.values())
    print(f"Input: {cluster.counts.get('VirtualService', 0):,} VirtualServices, {args.services:,} Services "
          f"(+{1 + args.shards if args.shards > 1 else 1} gateway Service{'s' if args.shards > 1 else ''}), "
          f"{len(cluster.slices):,} EndpointSlices with {endpoints:,} endpoints, "
          f"{cluster.counts.get('Pod', 0):,} Pods, {cluster.counts.get('DestinationRule', 0):,} DestinationRules, "
          f"{args.namespaces} namespaces (+ istio-system); {len(cluster.objects):,} objects; "
          f"seed {args.seed}"
          f"{'; Service names reused across namespaces' if args.reuse_names else ''}"
          f"{f'; {args.shards} gateway shards' if args.shards > 1 else ''}.")  # fmt: skip
    print("Output: " + ", ".join(f"{v:,} {k}" for k, v in output.items()) + ".")
    print(f"Valid input: {'yes' if valid else 'NO'} ({problems} parse rejections, {len(rejections)} translation "
          f"rejections, {output['DNS records']:,} of {args.services:,} Services migrated; "
          f"{caveats:,} caveats).")  # fmt: skip
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['python']}, {m['os']}, {m['date']}.")
    print()
    print("| measurement | n | median | min | p95 | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, samples in (
        ("parse (`Snapshot.from_dicts`)", parse_s),
        ("full translation (`translate(snapshot)`)", full_s),
        ("parse + full translation", both_s),
        ("full translation, cyclic GC off (diagnostic only)", nogc_s),
    ):
        print(f"| {label} | {len(samples)} | {_ms(statistics.median(samples))} | {_ms(min(samples))} | | "
              f"{_ms(max(samples))} |")  # fmt: skip
    reverse_labels = {
        "(a": "(a) reverse: remove the route again",
        "(b": "(b) reverse: the endpoint is ready again",
        "(c": "(c) reverse: delete the three",
        "(d": "(d) reverse: re-create it",
    }
    for row in incremental:
        for label, samples in ((row["label"], row["forward"]), (reverse_labels[row["label"][:2]], row["reverse"])):
            if samples:
                print(f"| incremental {label} | {len(samples)} | {_us(statistics.median(samples))} | "
                      f"{_us(min(samples))} | {_us(_p95(samples))} | {_us(max(samples))} |")  # fmt: skip
    if memory:
        base, stream, held, traced, dicts = (
            memory[k] for k in ("baseline", "stream", "translator", "tracemalloc", "dicts")
        )
        mem_rows = (
            ("RSS after import, empty input (baseline)", base["rss_mb"]),
            ("peak RSS, input streamed, parse + `translate()`", stream["peak_mb"]),
            ("… of which the parsed snapshot (RSS after parse - baseline)", stream["rss_parsed_mb"] - base["rss_mb"]),
            ("… of which `translate()` (RSS after it - RSS after parse)",
             stream["rss_translated_mb"] - stream["rss_parsed_mb"]),
            ("RSS holding a `Translator` with the full state (controller), input streamed", held["rss_mb"]),
            ("peak RSS of the same", held["peak_mb"]),
            ("tracemalloc peak of `translate()` alone", traced["translate_peak_mb"]),
            ("tracemalloc: still allocated after `translate()` (the DesiredState)", traced["translate_retained_mb"]),
            ("peak RSS, whole input held as dicts first (like `canal render -f`)", dicts["peak_mb"]),
        )  # fmt: skip
        for label, mb in mem_rows:
            print(f"| memory: {label} | 1 | {mb:,.0f} MB | | | |")
    print()
    full_med = statistics.median(full_s)
    medians = [(statistics.median(r[d]), r["label"][:3] + (" reverse" if d == "reverse" else ""))
               for r in incremental for d in ("forward", "reverse") if r[d]]  # fmt: skip
    worst_med, worst_label = max(medians)
    print("| target | measured | result |")
    print("|---|---:|---|")
    print(f"| full translation < {TARGET_FULL_S:g} s | {_ms(full_med)} (median) | "
          f"{'pass' if full_med < TARGET_FULL_S else 'FAIL'} |")  # fmt: skip
    print(f"| incremental update < {TARGET_INCREMENTAL_MS:g} ms | {_us(worst_med)} (median of the slowest case, "
          f"{worst_label}) | {'pass' if worst_med * 1000 < TARGET_INCREMENTAL_MS else 'FAIL'} |")  # fmt: skip
    if memory:
        peak = max(memory["stream"]["peak_mb"], memory["translator"]["peak_mb"])
        print(f"| memory < {TARGET_MEMORY_MB:g} MB | {peak:,.0f} MB (peak RSS, input streamed) | "
              f"{'pass' if peak < TARGET_MEMORY_MB else 'FAIL'} |")  # fmt: skip
    print()
    details = ", ".join(f"{r['label'][:3]} {r['target']}" for r in incremental)
    print(f"Incremental targets: {details}. Each apply parses the changed objects and calls `Translator.apply`; "
          "applies alternate between the change and its reverse, so every one is a real change. The Translator "
          "is aged first by one round of every case.")  # fmt: skip
    if verified is not None:
        print(f"Incremental state equals a fresh full translation afterwards: {'yes' if verified else 'NO'}.")
    print("Features in the input: " + ", ".join(f"{k} {v:,}" for k, v in cluster.features.items()) + ".")
    log(f"done in {elapsed:.0f} s")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
