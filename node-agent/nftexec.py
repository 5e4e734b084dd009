"""How nft scripts reach the kernel: libnftables in-process (default) or the nft binary, the same text either way.

Why in-process: the kernel makes the process that committed a deletion (an element, a rule, a chain) wait for the
deferred release of the old objects when it closes its netlink socket, about 10-20 ms on this machine. A short-
lived `nft` pays that on every change that deletes anything; an agent that keeps one libnftables context (and so
one socket) open for its lifetime never does, and a one-rule change costs about 0.1 ms instead of 15 ms
(BENCHMARKS.md). The input is always nft's text syntax, never libnftables' JSON input (which turned concatenated
map values into sets and crashed on a dnat map, REFERENCE.md); JSON is only read, for `list table`.

The binary stays available (``--nft-binary``, and wherever libnftables.so.1 is missing); tests also use it to
drive nft inside a network namespace through `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from canal.nodeagent.dataplane import ApplyError, UnsupportedError

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    description: str

    def run(self, script: str, json_output: bool = False) -> Result:
        """Run one nft script: a transaction of changes, or (json_output) one `list ...` command."""
        ...


class NftBinary:
    """`nft -f -` per script; ``command`` is the invocation prefix (e.g. ``ip netns exec NS nft``)."""

    def __init__(self, command: Sequence[str] = ("nft",), timeout: float = 30.0) -> None:
        self.command = tuple(command)
        self.timeout = timeout
        self.description = " ".join(self.command)
        if shutil.which(self.command[0]) is None:
            raise UnsupportedError(
                f"{self.command[0]!r} not found: the nftables backend needs the nft binary (Debian: nftables)"
            )

    def run(self, script: str, json_output: bool = False) -> Result:
        # `nft -j -f -` reads its input as JSON and prints nothing for a text `list`: JSON output goes by arguments
        args = [*self.command, "-j", *script.split()] if json_output else [*self.command, "-f", "-"]
        try:
            done = subprocess.run(args, input=script, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{self.description} did not finish within {self.timeout:g} s") from None
        return Result(done.returncode, done.stdout, done.stderr)


class LibNftables:
    """One libnftables context for the process's lifetime; calls are serialized (a context is not thread-safe)."""

    def __init__(self, netns: str | None = None) -> None:
        self.description = "libnftables" + (f" in netns {netns}" if netns else "")
        self._lock = threading.Lock()
        self._lib = _load()
        self._ctx = _in_netns(netns, self._new_context) if netns else self._new_context()

    def _new_context(self) -> int:
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise UnsupportedError("libnftables: nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        # opens the netlink socket now, in the namespace of the calling thread (a no-op script)
        self._lib.nft_run_cmd_from_buffer(ctx, b"")
        return int(ctx)

    def run(self, script: str, json_output: bool = False) -> Result:
        lib, ctx = self._lib, self._ctx
        with self._lock:
            flags = lib.nft_ctx_output_get_flags(ctx)
            lib.nft_ctx_output_set_flags(ctx, flags | _OUTPUT_JSON if json_output else flags & ~_OUTPUT_JSON)
            try:
                code = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            finally:
                lib.nft_ctx_output_set_flags(ctx, flags)
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return Result(0 if code == 0 else 1, out.decode(errors="replace"), err.decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown: the process exit frees it anyway
            self.close()


_LIBRARY: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _LIBRARY  # noqa: PLW0603 - one handle per process
    if _LIBRARY is not None:
        return _LIBRARY
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as error:
        raise UnsupportedError(f"libnftables not found ({error}); Debian: libnftables1, or use --nft-binary") from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_int
    for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    _LIBRARY = lib
    return lib


def _in_netns(name: str, make: Callable[[], int]) -> int:
    """Run ``make`` in a thread that entered network namespace ``name``: sockets keep the namespace they were
    created in, and setns() only moves the calling thread, so the rest of the process stays where it is."""
    result: list[int] = []
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=enter, name=f"netns-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def default_runner(command: Sequence[str] | None = None, netns: str | None = None, timeout: float = 30.0) -> Runner:
    """The binary when a command is given; else libnftables (in ``netns`` if named), else the binary."""
    if command is not None:
        return NftBinary(command, timeout)
    try:
        return LibNftables(netns)
    except UnsupportedError:
        prefix = ("ip", "netns", "exec", netns, "nft") if netns else ("nft",)
        return NftBinary(prefix, timeout)
