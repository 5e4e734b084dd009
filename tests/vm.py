"""A throwaway qemu VM with a real Debian cloud kernel, for tests that need kernel features this host lacks (IPVS).

The VM runs one command and powers off. Its root filesystem is this machine's own, shared read-only, so the VM
sees the same Python, venv, nft, iproute2 and checkout as the host and nothing has to be copied into an image:

* the kernel is Debian's ``linux-image-cloud-amd64`` (``/boot/vmlinuz-*-cloud-amd64``); KVM does not boot stock
  kernels here, so qemu runs it under TCG (software emulation, ``-accel tcg``);
* that kernel has no 9p (``CONFIG_NET_9P`` is off), so ``-virtfs`` cannot share a folder with it; it does have
  virtiofs, so the host root is served by qemu's virtiofsd (``/usr/lib/qemu/virtiofsd``, package
  qemu-system-common) over vhost-user, which needs the guest RAM in a shared memfd;
* the initramfs is built here, in Python: a static busybox, the few modules needed to mount virtiofs, and an
  ``/init`` that mounts the host root read-only at /mnt, gives it fresh /proc, /sys, /dev and tmpfs /tmp and /run
  (``ip netns`` writes /run/netns), switch_roots into it (not chroot: the kernel's module autoloading runs
  modprobe in PID 1's root) and runs the command. Every other module (ip_vs, nf_tables, dummy, veth, ...) is
  loaded by the host's own modprobe from the host's /lib/modules.

The command's output comes back on the serial console between markers, with its exit status; kernel messages are
silenced (``quiet loglevel=1``). Everything is bounded: qemu and virtiofsd are killed on timeout and never
outlive ``run``. The base initramfs is cached per kernel version (and per contents of this file's init script).
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
BUSYBOX = Path("/bin/busybox")
PACKAGES = ("qemu-system-x86", "linux-image-cloud-amd64", "busybox-static")
# What /init needs before it can switch_root; the rest comes from the host's /lib/modules through the shared root.
BOOT_MODULES = ("virtio_pci", "virtiofs")
CACHE = Path(tempfile.gettempdir()) / "canal-vm"
BEGIN = "@@canal-vm-begin"
EXIT = "@@canal-vm-exit="

INIT = """#!/bin/busybox sh
# Canal test VM: mount the host root read-only over virtiofs, switch_root into it, run stage2.sh there.
B=/bin/busybox
$B mkdir -p /proc /sys /dev /mnt
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
fail() { $B echo "@@canal-vm-exit=125@@ init: $*"; $B poweroff -f; }
for m in $($B cat /modules.order); do $B insmod "/modules/$m" || fail "insmod $m"; done
$B mount -t virtiofs -o ro hostroot /mnt || fail "mount virtiofs hostroot"
$B mount -t proc proc /mnt/proc && $B mount -t sysfs sysfs /mnt/sys && $B mount -t devtmpfs devtmpfs /mnt/dev \\
  || fail "mount proc/sys/dev"
$B mount -t devpts devpts /mnt/dev/pts; $B mount -t tmpfs tmpfs /mnt/dev/shm
# A working directory under /tmp, /run or /var/tmp (a checkout there) would vanish under the fresh tmpfs: keep it.
keep=$($B cat /canal/keep 2>/dev/null)
if [ -n "$keep" ]; then $B mkdir -p /keep && $B mount -o bind "/mnt$keep" /keep || fail "bind $keep"; fi
for d in /tmp /run /var/tmp; do $B mount -t tmpfs -o mode=1777 tmpfs "/mnt$d" || fail "mount tmpfs $d"; done
if [ -n "$keep" ]; then $B mkdir -p "/mnt$keep" && $B mount -o move /keep "/mnt$keep" || fail "move $keep"; fi
$B mkdir -p /mnt/tmp/canal-vm && $B cp /canal/run.sh /canal/stage2.sh /mnt/tmp/canal-vm/ || fail "copy scripts"
# switch_root, not chroot: the kernel's module autoloading (request_module) runs modprobe in PID 1's root.
exec $B switch_root /mnt /bin/sh /tmp/canal-vm/stage2.sh
"""

# Runs as PID 1 in the host root (after switch_root); /bin/busybox is the host's busybox-static.
STAGE2 = """ip link set lo up
read up idle < /proc/uptime
echo "@@canal-vm-begin uptime=$up@@"
/bin/sh /tmp/canal-vm/run.sh
echo "@@canal-vm-exit=$?@@"
sync
/bin/busybox poweroff -f
echo o > /proc/sysrq-trigger
"""


class VmUnavailable(RuntimeError):
    """The VM cannot run here (the message says what is missing and how to get it)."""


@dataclass(frozen=True, slots=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path  # /lib/modules/<version>


@dataclass(frozen=True, slots=True)
class VmResult:
    returncode: int | None  # the command's exit status; None when it did not finish (timeout, crash)
    output: str  # what the command printed (stdout and stderr, interleaved as on a terminal)
    console: str  # the whole serial console, for diagnosing a VM that did not get to the command
    boot_seconds: float | None  # guest uptime when the command started
    seconds: float  # wall time of the whole run, boot to poweroff
    timed_out: bool = False


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel() -> Kernel | None:
    """The newest installed Debian cloud kernel whose modules are installed too."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-cloud-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists() and os.access(vmlinuz, os.R_OK):
            found.append(Kernel(version, vmlinuz, modules))
    return max(found, key=lambda k: _version_key(k.version), default=None)


def missing() -> list[str]:
    """What this machine lacks to run the VM; empty when it can."""
    out = []
    if shutil.which(QEMU) is None:
        out.append(f"{QEMU} (Debian package qemu-system-x86)")
    if not VIRTIOFSD.exists():
        out.append(f"{VIRTIOFSD} (Debian package qemu-system-common)")
    if not BUSYBOX.exists():
        out.append(f"{BUSYBOX} (Debian package busybox-static)")
    if find_kernel() is None:
        out.append("/boot/vmlinuz-*-cloud-amd64 with its modules (Debian package linux-image-cloud-amd64)")
    return out


def ensure_available(install: bool = True, timeout: float = 900) -> None:
    """Raise VmUnavailable unless the VM can run; as root with apt-get, install the Debian packages first."""
    lacking = missing()
    if not lacking:
        return
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise VmUnavailable(
            f"cannot run the test VM: missing {'; '.join(lacking)}; install {' '.join(PACKAGES)} "
            "(scripts/test does, as root on Debian)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=timeout, check=False)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise VmUnavailable(f"cannot run the test VM: apt-get install {' '.join(PACKAGES)} timed out") from None
    lacking = missing()
    if lacking:
        raise VmUnavailable(
            f"cannot run the test VM: missing {'; '.join(lacking)} after apt-get install "
            f"(exit {done.returncode}: {done.stderr.strip()[-500:]})"
        )


# ------------------------------------------------------------------------------------------------ initramfs


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One entry of a newc cpio archive (what the kernel unpacks as initramfs), padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    pad_name = (-(len(header) + len(encoded))) % 4
    return header + encoded + b"\0" * pad_name + data + b"\0" * ((-len(data)) % 4)


def cpio(files: Mapping[str, tuple[int, bytes]]) -> bytes:
    """A newc archive of {path: (mode, contents)}; directories (mode 0o040000) for every parent are implied."""
    entries: dict[str, tuple[int, bytes]] = {}
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (0o040755, b""))
    entries.update(files)
    out = [_cpio_entry(name, mode, data, ino) for ino, (name, (mode, data)) in enumerate(sorted(entries.items()), 1)]
    return b"".join(out) + _cpio_entry("TRAILER!!!", 0, b"", 0)


def _module_files(kernel: Kernel, names: Iterable[str]) -> list[Path]:
    """The .ko files of ``names`` and their dependencies, dependencies first (modules.dep order)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    builtin = {
        Path(p).name.split(".ko")[0].replace("-", "_") for p in (kernel.modules / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        if name in builtin:
            continue
        if name not in by_name:
            raise VmUnavailable(f"kernel {kernel.version} has no module {name}")
        visit(by_name[name])
    return [kernel.modules / p for p in order]


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise VmUnavailable(f"{path}: zstd-compressed modules are not supported by this harness")
    return data


def initramfs(kernel: Kernel) -> Path:
    """The base initramfs for ``kernel`` (busybox, boot modules, /init), built once and cached."""
    digest = hashlib.sha256((INIT + STAGE2 + repr(BOOT_MODULES)).encode()).hexdigest()[:12]
    path = CACHE / f"initramfs-{kernel.version}-{digest}.cpio"
    if path.exists():
        return path
    modules = _module_files(kernel, BOOT_MODULES)
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o100755, INIT.encode()),
        "canal/stage2.sh": (0o100755, STAGE2.encode()),
        "bin/busybox": (0o100755, BUSYBOX.read_bytes()),
        "modules.order": (0o100644, "".join(f"{p.name.split('.ko')[0]}.ko\n" for p in modules).encode()),
    }
    for module in modules:
        files[f"modules/{module.name.split('.ko')[0]}.ko"] = (0o100644, _module_bytes(module))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cpio(files))
    tmp.replace(path)
    return path


def run_script(command: Sequence[str] | str, cwd: str | os.PathLike[str], env: Mapping[str, str]) -> str:
    """The shell script the VM runs in the host root: the environment, the working directory, then the command."""
    lines = ["#!/bin/sh", "cd " + shlex.quote(str(cwd)) + " || exit 126"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines.append(command if isinstance(command, str) else " ".join(shlex.quote(a) for a in command))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    """Kill ``process`` (started in its own session) and its group, and reap it."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _parse(console: str) -> tuple[int | None, str, float | None]:
    begin = console.find(BEGIN)
    boot = None
    if begin < 0:
        return None, "", None
    header_end = console.find("\n", begin)
    match = re.match(r"@@canal-vm-begin uptime=([0-9.]+)@@", console[begin:header_end])
    if match:
        boot = float(match.group(1))
    body = console[header_end + 1 :]
    end = body.rfind(EXIT)
    if end < 0:
        return None, body, boot
    status = re.match(r"@@canal-vm-exit=(\d+)@@", body[end:])
    return (int(status.group(1)) if status else None), body[:end], boot


def run(
    command: Sequence[str] | str,
    *,
    timeout: float = 120,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 1024,
    cpus: int = 1,
) -> VmResult:
    """Boot the VM, run ``command`` (argv, or a shell line) as root in the shared host root, power off.

    ``env`` is the command's whole environment (default: a minimal one with this PATH); ``cwd`` defaults to the
    current directory. Raises VmUnavailable when qemu, virtiofsd, busybox or the kernel are missing.
    """
    lacking = missing()
    if lacking:
        raise VmUnavailable(f"cannot run the test VM: missing {'; '.join(lacking)}")
    kernel = find_kernel()
    assert kernel is not None
    base = initramfs(kernel)
    if env is None:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root", "LANG": "C.UTF-8"}
    script = run_script(command, cwd or os.getcwd(), env)
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=CACHE) as tmp:
        work = Path(tmp)
        initrd = work / "initrd.cpio"
        # The kernel unpacks concatenated archives in order: the cached base, then this run's script.
        files = {"canal/run.sh": (0o100755, script.encode())}
        workdir = Path(cwd or os.getcwd()).resolve()
        if workdir.parts[1:2] in (("tmp",), ("run",)) or workdir.parts[1:3] == ("var", "tmp"):
            files["canal/keep"] = (0o100644, str(workdir).encode())
        initrd.write_bytes(base.read_bytes() + cpio(files))
        socket_path = work / "virtiofs.sock"
        daemon: subprocess.Popen[bytes] | None = None
        qemu: subprocess.Popen[bytes] | None = None
        try:
            daemon = subprocess.Popen(
                [
                    str(VIRTIOFSD),
                    f"--socket-path={socket_path}",
                    "-o",
                    "source=/",
                    "-o",
                    "cache=always",
                    "-o",
                    "sandbox=chroot",
                    "-o",
                    "log_level=err",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while not socket_path.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    error = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
                    raise VmUnavailable(f"virtiofsd did not start: {error.strip()}")
                time.sleep(0.02)
            qemu = subprocess.Popen(
                [
                    QEMU,
                    "-accel",
                    "tcg",
                    "-cpu",
                    "max",
                    "-smp",
                    str(cpus),
                    "-m",
                    f"{memory_mb}M",
                    "-object",
                    f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
                    "-numa",
                    "node,memdev=mem",
                    "-chardev",
                    f"socket,id=vfs,path={socket_path}",
                    "-device",
                    "vhost-user-fs-pci,chardev=vfs,tag=hostroot",
                    "-kernel",
                    str(kernel.vmlinuz),
                    "-initrd",
                    str(initrd),
                    "-append",
                    "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-nic",
                    "none",
                    "-no-reboot",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timed_out = False
            try:
                raw, _ = qemu.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(qemu)
                raw, _ = qemu.communicate()
        finally:
            _kill(qemu)
            if daemon is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.wait(timeout=2)  # it exits by itself when qemu closes the socket
                _kill(daemon)
                if daemon.stderr:
                    daemon.stderr.close()
    console = raw.decode(errors="replace").replace("\r\n", "\n")
    returncode, output, boot = _parse(console)
    return VmResult(returncode, output, console, boot, time.monotonic() - started, timed_out)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tests.vm COMMAND...`: run one command in the VM (for trying things out by hand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m tests.vm COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        ensure_available(install=False)
    except VmUnavailable as error:
        print(error, file=sys.stderr)
        return 2
    result = run(args if len(args) > 1 else args[0], timeout=float(os.environ.get("CANAL_VM_TIMEOUT", "300")))
    sys.stdout.write(result.output)
    print(
        f"[vm: exit {result.returncode}, boot {result.boot_seconds}s, total {result.seconds:.1f}s"
        f"{', timed out' if result.timed_out else ''}]",
        file=sys.stderr,
    )
    if result.returncode is None:
        sys.stderr.write(result.console[-3000:])
    return 1 if result.returncode is None else result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
