"""Gateway shards: which shard a Service goes to, and which listener port serves each shard.

Envoy rebuilds a whole RouteConfiguration on any change to it, and it picks the configuration by listener, so the
only way to make one change cheap is to spread a port's virtual hosts over several listeners. A client reaches a
listener by port only (the Host header is L7), so each shard k has its own Service `<serviceRef.name>-<k>` whose
targetPort for Gateway server port P is the listener port of (P, k); DNS and the node agent send a Service's
clients to the Service of its shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from canal.desired import EMPTY, frozen_map


def service_key(namespace: str, name: str) -> str:
    """What a Service is sharded by: the Service itself, so shards stay even however uneven the namespaces are."""
    return f"{namespace}/{name}"


@lru_cache(maxsize=65536)
def shard_of(key: str, shards: int) -> int:
    """The shard of a Service (`service_key`): rendezvous (highest-random-weight) hashing of (key, k).

    A pure function of its arguments (blake2b, never the per-process salted hash()), and growing from N to N + 1
    shards moves only the Services whose new shard N outweighs their old one: about 1 / (N + 1) of them.

    Per Service rather than per namespace: a namespace can hold a tenth of a cluster (and its shard then holds that
    tenth), while Services spread evenly. Short names keep working either way: a client's `web` resolves (through
    its search path) to the FQDN of its own namespace's `web`, whose DNS answer is that Service's shard, and that
    shard's route configuration gives the name `web` to that Service. Two Services sharing a short name contest it
    only when they land on the same shard (the older one keeps it, as on an unsharded gateway).
    """
    if shards <= 1:
        return 0
    best, best_weight = 0, -1
    for k in range(shards):
        weight = int.from_bytes(hashlib.blake2b(f"{key}/{k}".encode(), digest_size=8).digest(), "big")
        if weight > best_weight:  # ties (never seen in practice) go to the lower shard
            best, best_weight = k, weight
    return best


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The listeners of one gateway: per Gateway server port P, the listener port of each shard.

    Unsharded (and the fallback of a broken sharded setup) is one shard whose listener port is P itself, which is
    exactly the layout Canal had before shards existed.
    """

    shards: int = 1
    listeners: Mapping[int, tuple[int, ...]] = field(default_factory=lambda: EMPTY)  # P -> listener port per shard
    server_ports: Mapping[int, int] = field(default_factory=lambda: EMPTY)  # listener port -> P
    shard_index: Mapping[int, int] = field(default_factory=lambda: EMPTY)  # listener port -> k
    problem: str = ""  # why the configured shards cannot be used ("" when they can); Services then stay direct

    @classmethod
    def unsharded(cls, ports: list[int], problem: str = "") -> ShardLayout:
        return cls(
            1,
            frozen_map({p: (p,) for p in ports}),
            frozen_map({p: p for p in ports}),
            frozen_map(dict.fromkeys(ports, 0)),
            problem,
        )

    @classmethod
    def sharded(cls, shards: int, listeners: dict[int, tuple[int, ...]]) -> ShardLayout:
        server_ports = {lp: p for p, lps in listeners.items() for lp in lps}
        index = {lp: k for lps in listeners.values() for k, lp in enumerate(lps)}
        return cls(
            shards,
            frozen_map(dict(sorted(listeners.items()))),
            frozen_map(dict(sorted(server_ports.items()))),
            frozen_map(dict(sorted(index.items()))),
        )

    def listener(self, port: int, key: str) -> int:
        """The listener port serving port P to a Service (`service_key`)."""
        ports = self.listeners[port]
        return ports[0] if len(ports) == 1 else ports[shard_of(key, len(ports))]


__all__ = ["ShardLayout", "service_key", "shard_of"]
