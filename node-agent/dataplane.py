"""What every kernel backend of the node agent promises, so the agent shell treats nftables and IPVS alike.

A backend owns its kernel objects (an nftables table per family, or IPVS virtual services tagged as Canal's) and
nothing else. ``apply`` is all-or-nothing: on any failure it raises ``ApplyError`` and the kernel keeps the state
of the last successful apply. Established connections are never touched: both backends only change how *new*
connections are translated (conntrack keeps the NAT binding of existing ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from canal.nodeagent.rules import Rules

from canal.desired import Backend, RedirectKey, RedirectRule

# What the kernel holds, read back: the ClusterIP:port/protocol -> the gateway backends it is redirected to.
# (The Service and gateway names of a rule live only in the control plane.)
Installed = Mapping[RedirectKey, tuple[Backend, ...]]


class ApplyError(RuntimeError):
    """The kernel refused a change (the message says what and why); the previous rules are still in place."""


class UnsupportedError(RuntimeError):
    """The kernel or the machine lacks what the backend needs (names the missing module or binary)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    mode: str  # "full" (whole owned state replaced), "delta" (only the changed entries), or "none" (no change)
    added: int = 0
    removed: int = 0
    changed: int = 0


class Dataplane(Protocol):
    mode: str  # the RedirectRule.mode this backend installs: "nftables" or "ipvs"

    def current(self) -> Installed | None:
        """The rules installed now, read back from the kernel; None when Canal owns nothing there."""
        ...

    def apply(self, rules: Rules) -> ApplyResult:
        """Make the kernel redirect exactly ``rules`` (all of this backend's mode); atomic, raises ApplyError."""
        ...

    def update(self, changes: Mapping[RedirectKey, RedirectRule | None]) -> ApplyResult:
        """Apply only these changes (None removes the rule) on top of the last apply; atomic like ``apply``."""
        ...

    def resync(self, rules: Rules) -> ApplyResult:
        """Read the kernel back and make it hold exactly ``rules`` again (repairs drift); atomic."""
        ...

    def cleanup(self) -> bool:
        """Remove everything the backend owns; True when something was removed."""
        ...
