"""Keeping Python's cyclic garbage collector off Canal's data.

Parsing and translation build millions of small, acyclic, long-lived objects. Letting the cyclic collector
walk them repeatedly doubled a full build, so batch work runs with it paused, and after a large batch
everything alive moves to the permanent generation (gc.freeze): otherwise the first collection afterwards
walks it all anyway. Reference counting still frees these objects when they are replaced.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

FREEZE_AFTER = 100_000  # objects allocated by one batch


@contextmanager
def paused_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_count()[0] > FREEZE_AFTER:
            gc.freeze()
        if enabled:
            gc.enable()
