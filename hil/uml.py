"""Run one command inside User-Mode Linux, where real SocketCAN ``vcan`` links exist.

The development and CI machines run a kernel without ``AF_CAN``; User-Mode Linux
is a real Linux kernel (with SocketCAN as modules) that runs as an ordinary,
unprivileged process. The guest boots with the host's own ``/`` as its root
filesystem (hostfs), so the project, its virtualenv and ``/tmp`` are the same
files inside and out, and the generated init script can hand results back through
files in a private temp dir: the command's output (tailed live by the host) and
its exit status (the kernel's own exit status says nothing about the command).

Only the standard library is used, so any Python (e.g. a non-root user's system
python) can import this module.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

UML_PACKAGES: tuple[str, ...] = ("user-mode-linux", "kmod", "can-utils", "iproute2")

MODULES_ROOT = Path("/usr/lib/uml/modules")
# Order matters: each module needs symbols from the ones before it.
CAN_MODULES = ("net/can/can.ko", "net/can/can-raw.ko", "drivers/net/can/dev/can-dev.ko",
               "drivers/net/can/vcan.ko")
STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Host binaries the guest runs during setup (it sees the host's filesystem), and
# the package each comes from.
GUEST_TOOLS = {"insmod": "kmod", "ip": "iproute2", "candump": "can-utils"}
TIMEOUT_STATUS = 124
CONSOLE_TAIL_LINES = 20
POLL_S = 0.05
REAP_WAIT_S = 5.0
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UmlError(RuntimeError):
    """User-Mode Linux could not run the command (missing, failed to boot, or lost it)."""


def has_af_can() -> bool:
    """True when this kernel can open a SocketCAN socket (socket.AF_CAN, SOCK_RAW, CAN_RAW)
    — e.g. a Pi or laptop."""
    family = getattr(socket, "AF_CAN", None)
    proto = getattr(socket, "CAN_RAW", None)
    if family is None or proto is None:
        return False
    try:
        socket.socket(family, socket.SOCK_RAW, proto).close()
    except OSError:
        return False
    return True


def interface_exists(name: str) -> bool:
    """True when the host has a network interface called ``name``."""
    if not name or "/" in name or name in {".", ".."}:
        return False
    return (Path("/sys/class/net") / name).exists()


def find_uml() -> str | None:
    """Path of the ``linux.uml`` kernel binary, or None."""
    return _find_tool("linux.uml")


def _find_tool(name: str) -> str | None:
    """A host binary by name, also looking in sbin dirs a non-root PATH often lacks."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(STANDARD_PATH))


def uml_problem() -> str | None:
    """None when UML can run here, else one line naming what is missing and how to install
    it (apt-get install ...)."""
    missing: list[str] = []
    if find_uml() is None:
        missing.append("linux.uml")
    if not any((d / "kernel" / CAN_MODULES[-1]).is_file()
               for d in (MODULES_ROOT.iterdir() if MODULES_ROOT.is_dir() else ())):
        missing.append(f"the vcan module under {MODULES_ROOT}")
    missing.extend(tool for tool in GUEST_TOOLS if _find_tool(tool) is None)
    if not missing:
        return None
    return (f"User-Mode Linux with vcan is not usable here (missing {', '.join(missing)}): "
            f"install it with 'apt-get install {' '.join(UML_PACKAGES)}'")


def _valid_ifname(name: str) -> bool:
    """Linux's own rule: 1-15 bytes, no slash, no whitespace, not '.' or '..'."""
    return (0 < len(name.encode()) <= 15 and "/" not in name and name not in {".", ".."}
            and not any(c.isspace() for c in name))


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the command sees inside: the caller's essentials plus ``extra``.

    The guest's init starts with an almost empty environment, so the parts a
    command usually relies on are carried over explicitly.
    """
    host = os.environ
    path = [p for p in host.get("PATH", "").split(os.pathsep) if p]
    path += [p for p in STANDARD_PATH if p not in path]
    env = {
        "PATH": os.pathsep.join(path),
        "HOME": host.get("HOME", "/root"),
        "LANG": host.get("LANG", "C.UTF-8"),
        "TERM": host.get("TERM", "dumb"),
        "TMPDIR": host.get("TMPDIR", "/tmp"),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("LC_ALL", "PYTHONPATH", "VIRTUAL_ENV"):
        if name in host:
            env[name] = host[name]
    env.update(extra or {})
    bad = [name for name in env if not ENV_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"not valid environment variable names: {bad}")
    return env


def init_script(argv: Sequence[str], cwd: Path, vcan: Sequence[str], env: Mapping[str, str],
                workdir: Path) -> str:
    """The guest's init: mount, load CAN, create vcan links, run ``argv``, record, halt."""
    q = shlex.quote
    output, status = q(str(workdir / "output")), q(str(workdir / "status"))
    modules = " ".join(q(m) for m in CAN_MODULES)
    links = " ".join(q(name) for name in vcan)
    exports = "\n".join(f"export {name}={q(value)}" for name, value in env.items())
    # Setup failures leave no status file on purpose: the host then reports the
    # console, where the failing step's message was printed.
    return f"""#!/bin/sh
# Generated by hil/uml.py as init of a throwaway User-Mode Linux guest.
PATH={q(os.pathsep.join(STANDARD_PATH))}; export PATH
stop() {{
    sync
    halt -f || poweroff -f
    [ -w /proc/sysrq-trigger ] && echo o > /proc/sysrq-trigger && sleep 10
    exit 1
}}
fail() {{ echo "hil-uml: setup failed: $*" >&2; stop; }}
mount -t proc proc /proc || fail mount proc
mount -t sysfs sys /sys || fail mount sysfs
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=666 devpts /dev/pts || fail mount devpts
ip link set lo up || fail lo up
mods={q(str(MODULES_ROOT))}/$(uname -r)/kernel
for m in {modules}; do insmod "$mods/$m" || fail insmod "$m"; done
for dev in {links}; do
    ip link add dev "$dev" type vcan && ip link set "$dev" up || fail vcan "$dev"
done
# The kernel hands its unrecognised command-line words to init as variables.
unset mem uml_dir
{exports}
cd {q(str(cwd))} || fail cd {q(str(cwd))}
( {shlex.join(argv)} ) > {output} 2>&1 < /dev/null
echo $? > {status}.new && mv {status}.new {status}
stop
"""


class _Tail:
    """Copies what the guest appends to a file into a text stream, as it appears."""

    def __init__(self, path: Path, sink: TextIO) -> None:
        self.path = path
        self.sink = sink
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self, final: bool = False) -> None:
        """Forward new bytes (``final`` flushes a trailing partial character too)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""  # the command has not started yet
        self.offset += len(data)
        text = self.decoder.decode(data, final=final)
        if text:
            self.sink.write(text)
            self.sink.flush()


def _kill_vm(proc: subprocess.Popen[bytes]) -> None:
    """Kill the kernel and its helper processes (one process group), and wait for them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # UML runs guest processes as host children in the same group; they are
    # reaped by init once the kernel is gone, which can lag slightly.
    deadline = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL_S)


def _console_tail(console: Path) -> str:
    lines = console.read_text(errors="replace").splitlines()[-CONSOLE_TAIL_LINES:]
    return "\n".join(lines) if lines else "(console is empty)"


def run_in_uml(argv: Sequence[str], *, cwd: Path | None = None,
               vcan: Sequence[str] = ("vcan0",), mem_mb: int = 1024,
               timeout_s: float | None = None, env: Mapping[str, str] | None = None,
               out: TextIO | None = None) -> int:
    """Boot UML, create and raise the ``vcan`` interfaces, run ``argv`` inside as (guest)
    root in ``cwd`` (default: the current directory), stream its stdout+stderr to ``out``
    (default sys.stdout) while it runs, and return its exit status.

    Returns 124 after killing the VM when ``timeout_s`` (counted from boot) runs out.
    Raises UmlError when UML is unusable or fails to boot, or when the command's exit
    status never appears (the message then ends with the console's last lines).
    """
    if not argv:
        raise ValueError("run_in_uml needs a command")
    bad = [name for name in vcan if not _valid_ifname(name)]
    if bad:
        raise ValueError(f"not valid interface names: {bad}")
    problem = uml_problem()
    if problem is not None:
        raise UmlError(problem)
    workdir_cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if not workdir_cwd.is_dir():
        raise UmlError(f"working directory {workdir_cwd} does not exist")
    script_env = guest_env(env)
    workdir = Path(tempfile.mkdtemp(prefix="ev-gateway-uml-"))
    try:
        if any(c.isspace() for c in str(workdir)):
            raise UmlError(f"temp dir {workdir} contains whitespace, which the kernel command "
                           "line cannot carry: point TMPDIR elsewhere")
        script = workdir / "init.sh"
        script.write_text(init_script(argv, workdir_cwd, vcan, script_env, workdir))
        script.chmod(0o755)
        return _boot(script, workdir, mem_mb, timeout_s, out if out is not None else sys.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _boot(script: Path, workdir: Path, mem_mb: int, timeout_s: float | None,
          sink: TextIO) -> int:
    binary = find_uml() or "linux.uml"
    console = workdir / "console.log"
    command = [binary, f"mem={mem_mb}M", "quiet", "rootfstype=hostfs", "rootflags=/", "rw",
               f"init={script}", "con=null", "con0=fd:0,fd:1",
               f"uml_dir={workdir}", f"umid={workdir.name}"]
    # The guest's memory is a file in TMPDIR: keep it in the private dir, which is
    # writable by whoever runs this and removed afterwards.
    host_env = {**os.environ, "TMPDIR": str(workdir)}
    tail = _Tail(workdir / "output", sink)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with console.open("wb") as console_file:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console_file,
                                    stderr=subprocess.STDOUT, env=host_env,
                                    start_new_session=True)
        except OSError as exc:
            raise UmlError(f"cannot start {binary}: {exc}") from exc
    try:
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                tail.pump()
            if deadline is not None and time.monotonic() >= deadline:
                _kill_vm(proc)
                tail.pump(final=True)
                return TIMEOUT_STATUS
        tail.pump(final=True)
    finally:
        if proc.returncode is None:
            _kill_vm(proc)
    try:
        return int((workdir / "status").read_text().strip())
    except (FileNotFoundError, ValueError):
        raise UmlError(
            f"User-Mode Linux (exit {proc.returncode}) ended without the command's exit "
            f"status; last console lines:\n{_console_tail(console)}") from None


def main_uml(argv: Sequence[str]) -> int:
    """CLI hook for ``python -m hil uml -- CMD...``: run CMD in UML, return its status
    (125 when UML itself failed)."""
    command = list(argv)
    if command[:1] == ["--"]:
        del command[0]
    if not command:
        print("hil uml: no command given (usage: python -m hil uml -- CMD...)",
              file=sys.stderr)
        return 125
    try:
        return run_in_uml(command)
    except UmlError as exc:
        print(f"hil uml: {exc}", file=sys.stderr)
        return 125
