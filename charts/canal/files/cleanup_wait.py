"""Uninstall, cluster side: the post-delete hook Job waits here until every node is clean.

Helm waits for a hook Job to complete but not for a hook DaemonSet (any kind but Job and Pod counts as ready once
created), so this Job is what makes `helm uninstall` wait for the node cleanup DaemonSet (node_cleanup.py) to be
Ready on every node it targets. When that takes longer than --timeout it fails, saying how many nodes are still
missing and how to find them, and Helm reports the hook as failed. One GET of the DaemonSet per poll: its status
counts the Ready pods, so the only permission needed is `get` on that one DaemonSet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError


def progress(daemonset: dict[str, Any]) -> tuple[int, int] | None:
    """(ready, desired) once the DaemonSet controller has acted on the current spec; None before."""
    metadata, status = daemonset.get("metadata") or {}, daemonset.get("status") or {}
    if "observedGeneration" not in status or int(status["observedGeneration"]) < int(metadata.get("generation", 1)):
        return None
    return int(status.get("numberReady") or 0), int(status.get("desiredNumberScheduled") or 0)


def _api(kubeconfig: str | None) -> client.ApiClient:
    """In the cluster: the pod's service account; elsewhere (tests, a laptop): a kubeconfig."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--daemonset", required=True)
    parser.add_argument("--timeout", type=float, default=180.0, help="Seconds before giving up.")
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between polls.")
    parser.add_argument("--kubeconfig", help="Default: in-cluster, then ~/.kube/config.")
    args = parser.parse_args(argv)

    apps = client.AppsV1Api(_api(args.kubeconfig))
    deadline = time.monotonic() + args.timeout
    seen: tuple[int, int] | None = None
    problem = "the DaemonSet controller has not acted on it yet"
    while True:
        try:
            response = apps.read_namespaced_daemon_set(args.daemonset, args.namespace, _preload_content=False)
            now = progress(json.loads(response.data))
        except ApiException as error:
            now, problem = None, f"GET daemonset {args.namespace}/{args.daemonset}: HTTP {error.status} {error.reason}"
        except (HTTPError, OSError, ValueError) as error:
            now, problem = None, f"GET daemonset {args.namespace}/{args.daemonset}: {error}"
        if now is not None and now[0] >= now[1]:
            print(f"every node is clean ({now[1]} node(s))", flush=True)
            return 0
        if now is not None and now != seen:
            print(f"nodes clean: {now[0]} of {now[1]}", flush=True)
        seen = now if now is not None else seen
        if time.monotonic() >= deadline:
            done = f"{seen[0]} of {seen[1]} node(s) clean" if seen is not None else problem
            print(
                f"error: node cleanup not finished after {args.timeout:g} s: {done}; the other nodes may still "
                f"redirect migrated ClusterIPs. See `kubectl -n {args.namespace} get pods -o wide -l "
                f"app.kubernetes.io/component=node-cleanup` and the logs of the pods that are not Ready.",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
