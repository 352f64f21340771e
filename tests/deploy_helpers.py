"""Helpers for tests/test_deploy.py: running deploy/install.sh into a temporary root,
snapshots of the installed tree, running the installed venv, reading unit and networkd files."""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
UNIT = DEPLOY / "systemd" / "ev-gateway.service"
VENV = Path("opt/ev-gateway/venv")
BITRATE = "250000"
# Where this host's systemd keeps its units (/lib is a link to /usr/lib on bookworm).
HOST_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                   if (p / "sysinit.target").is_file()), None)

Snapshot = dict[str, tuple[str, int, int]]


def need(tool: str) -> str:
    """The tool's path; a failure (never a skip) naming the fix when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: run the tests via 'bash deploy/dev.sh test', "
                    "which installs the Debian package systemd")
    return path


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/install.sh --root ROOT ARGS; fail the test if it fails."""
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root), *args],
                          capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, f"install.sh {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def snapshot(root: Path) -> Snapshot:
    """Content hash, mtime and mode of every file outside the venv (which pip rewrites)."""
    out: Snapshot = {}
    for top, dirs, files in os.walk(root):
        if Path(top).relative_to(root) == VENV.parent:
            dirs.remove(VENV.name)
        for name in files:
            path = Path(top) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns,
                stat.S_IMODE(st.st_mode))
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def clean_env() -> dict[str, str]:
    """This environment without anything that would point Python at the developer venv."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COV_", "COVERAGE"))}


def run_venv(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an installed console script with the installed venv's interpreter.

    The script's #! line names /opt/ev-gateway/venv, where the tree will be booted,
    not the temporary root, so the interpreter is given explicitly. It runs in the
    root, as systemd runs it in /: from the checkout, ``python -c`` would import the
    checkout's code."""
    venv = root / VENV
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True,
                          text=True, check=False, env=clean_env(), cwd=root, timeout=120)


def decode_pack(root: Path, tmp_path: Path, prelude: str) -> subprocess.CompletedProcess[str]:
    """``ev-gateway decode`` of one BMS_Pack frame (0x100, 96.00 V in its first two bytes)
    with the installed script, profile and DBCs, after running ``prelude``."""
    log = tmp_path / "pack.log"
    log.write_text("(1.000000) can0 100#8025000000000000\n")
    script = root / VENV / "bin" / "ev-gateway"
    profile = root / "opt/ev-gateway/dbc/profiles/microev-ref.toml"
    argv = [str(script), "decode", "--profile", str(profile), str(log)]
    code = f"{prelude}\nimport runpy, sys\nsys.argv = {argv!r}\n" \
           "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    return run_venv(root, "-c", code)


def unit_entries(path: Path) -> dict[str, list[str]]:
    """"Section.Key" -> values of a unit file; keys such as DeviceAllow= repeat."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def add_local_files(root: Path) -> list[Path]:
    """What an operator and the running service add: keys, a drop-in, the outbox."""
    files = {
        root / "etc/ev-gateway/keys.toml": b"# operator keys\n",
        root / "etc/systemd/system/ev-gateway.service.d/override.conf":
            b"[Service]\nDeviceAllow=char-ttyXRUSB rw\n",
        root / "var/lib/ev-gateway/outbox.sqlite": b"SQLite format 3\0",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [*files, root / "etc/ev-gateway/gateway.toml"]


def copy_tree(src: Path, dst: Path) -> Path:
    """A copy keeping modes, owners and links, for tests that change the installed tree."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst
