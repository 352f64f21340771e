"""deploy/: the installer, the systemd unit and the networkd files, installed into a temporary root.

The installer really runs: it creates the system user with systemd-sysusers in the
temporary root's /etc/passwd, builds a venv and pip-installs this repository with its
pinned dependencies (from the package index pip is configured with: about 40 s). That
happens once per module, followed by a second run whose effect is compared file by file.
Tests that uninstall work on copies of the installed tree.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import gateway
from tests.deploy_helpers import (
    BITRATE,
    DEPLOY,
    HOST_UNITS,
    INSTALL,
    REPO,
    UNIT,
    VENV,
    Snapshot,
    add_local_files,
    copy_tree,
    decode_pack,
    ini,
    install,
    mode,
    need,
    run_venv,
    snapshot,
    unit_entries,
)


@dataclass(frozen=True)
class Installed:
    root: Path
    first: Snapshot
    second: Snapshot
    second_log: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A tree installed twice with the same arguments, with a snapshot after each run."""
    need("systemd-sysusers")
    root = tmp_path_factory.mktemp("deploy") / "root"
    args = ("--can", BITRATE, "--vcan")
    install(root, *args)
    first = snapshot(root)
    second = install(root, *args)
    return Installed(root, first, snapshot(root), second.stderr)


def test_files_users_and_modes(installed: Installed) -> None:
    root = installed.root
    unit = root / "etc/systemd/system/ev-gateway.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    assert mode(unit) == 0o644
    etc = root / "etc/ev-gateway"
    assert mode(etc) == 0o750
    assert mode(etc / "gateway.toml") == 0o640
    for rel in ("dbc/profiles/microev-ref.toml", "dbc/reference/microev_bms.dbc",
                "dbc/citroen-ami/Ami_Rocks-e.dbc"):
        shipped = root / "opt/ev-gateway" / rel
        assert shipped.read_bytes() == (REPO / rel).read_bytes()
        assert mode(shipped) == 0o644
    # The state directory is left to the unit's StateDirectory=, which creates it
    # owned by the service user; the installer would create it owned by root.
    assert not (root / "var/lib/ev-gateway").exists()

    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("ev-gateway:"))
    assert int(user[2]) < 1000, "a system user"
    assert user[5:7] == ["/var/lib/ev-gateway", "/usr/sbin/nologin"]
    assert f"ev-gateway:x:{user[3]}:" in (root / "etc/group").read_text()
    if os.geteuid() == 0:  # only root can give files to another group
        for path in (etc, etc / "gateway.toml"):
            assert (path.stat().st_uid, path.stat().st_gid) == (0, int(user[3])), path


def test_config_names_the_installed_profile_and_the_unit_paths(installed: Installed) -> None:
    root = installed.root
    conf = root / "etc/ev-gateway/gateway.toml"
    settings = tomllib.loads(conf.read_text())["gateway"]
    assert settings["profile"] == "/opt/ev-gateway/dbc/profiles/microev-ref.toml"
    assert (root / settings["profile"].lstrip("/")).is_file()
    # Only the profile line differs from the example.
    example = (DEPLOY / "gateway.example.toml").read_text().splitlines()
    differ = [a for a, b in zip(example, conf.read_text().splitlines(), strict=True) if a != b]
    assert [line.split("=")[0].strip() for line in differ] == ["profile"]

    unit = unit_entries(root / "etc/systemd/system/ev-gateway.service")
    exec_start = unit["Service.ExecStart"][0].split()
    assert exec_start[1:] == ["run", "--config", "/etc/ev-gateway/gateway.toml"]
    assert os.access(root / exec_start[0].lstrip("/"), os.X_OK)
    assert unit["Service.StateDirectory"] == ["ev-gateway"]
    assert settings["state_dir"] == "/var/lib/ev-gateway"
    assert unit["Service.ConfigurationDirectory"] == ["ev-gateway"]


def test_unit_declares_the_service_contract(installed: Installed) -> None:
    unit = unit_entries(installed.root / "etc/systemd/system/ev-gateway.service")
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
        "Restart": "on-failure", "RestartSec": "5", "User": "ev-gateway",
        "Group": "ev-gateway", "SupplementaryGroups": "dialout",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
    }
    assert {k: unit[f"Service.{k}"] for k in expected} == {k: [v] for k, v in expected.items()}
    assert unit["Service.Environment"] == ["PYTHONUNBUFFERED=1", "PYTHONFAULTHANDLER=1"]
    assert unit["Service.RestrictAddressFamilies"][0].split() == [
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN", "AF_NETLINK"]
    assert "char-ttyACM rw" in unit["Service.DeviceAllow"]
    assert "Unit.StartLimitBurst" in unit
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_installed_gateway_runs_from_its_venv(installed: Installed, tmp_path: Path) -> None:
    root = installed.root
    script = root / VENV / "bin" / "ev-gateway"
    assert script.read_text().splitlines()[0] == "#!/opt/ev-gateway/venv/bin/python"
    version = run_venv(root, str(script), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ev-gateway {gateway.__version__}"
    where = run_venv(root, "-c", "import gateway, can, cryptography; print(gateway.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(root / VENV), "not the checkout's code"

    # The installed code decodes a frame with the installed profile and DBCs.
    decoded = decode_pack(root, tmp_path, "")
    assert decoded.returncode == 0, decoded.stderr
    assert '"BMS_PackVoltage": 96.0' in decoded.stdout


def test_gateway_needs_no_writable_executable_memory(installed: Installed,
                                                     tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes: the installed gateway and its libraries work without W+X."""
    # PR_GET_MDWE (Linux 6.3+) fails on older kernels, which cannot enforce it outside systemd.
    if ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) < 0:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): cannot deny W+X memory here")
    # PR_SET_MDWE with PR_MDWE_REFUSE_EXEC_GAIN, then proof that it is enforced and a
    # signature with cryptography's compiled code, before the decode.
    prelude = """
import ctypes, mmap
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W+X memory was not refused")
except PermissionError:
    pass
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"x"), b"x")
"""
    decoded = decode_pack(installed.root, tmp_path, prelude)
    assert decoded.returncode == 0, decoded.stderr
    assert '"BMS_PackVoltage": 96.0' in decoded.stdout


def test_second_run_changes_nothing(installed: Installed) -> None:
    assert installed.second == installed.first
    assert "etc/ev-gateway/gateway.toml" in installed.second
    assert "kept /etc/ev-gateway/gateway.toml" in installed.second_log


def test_systemd_analyze_verify_passes(installed: Installed, tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    assert HOST_UNITS is not None, "this host's systemd has no sysinit.target"
    # --root resolves ExecStart= inside the tree, and the default dependencies
    # (sysinit.target, ...) in it too, so the tree gets a copy of this host's units.
    root = copy_tree(installed.root, tmp_path / "root")
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    verify = [analyze, "verify", "--man=no", f"--root={root}", "ev-gateway.service"]
    proc = subprocess.run(verify, capture_output=True, text=True, check=False)
    # systemd-analyze only warns, with status 0, about unknown keys or bad values.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")

    exposure = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", f"--root={root}",
         "ev-gateway.service"], capture_output=True, text=True, check=False)
    assert exposure.returncode == 0, exposure.stdout[-400:]

    # The check sees the tree: without an executable ExecStart= it fails.
    (root / VENV / "bin" / "ev-gateway").chmod(0o644)
    proc = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "/opt/ev-gateway/venv/bin/ev-gateway is not executable" in proc.stderr


def test_networkd_files(installed: Installed) -> None:
    net = installed.root / "etc/systemd/network"
    can0 = ini(net / "80-can0.network")
    assert can0["Match"]["Name"] == "can0"
    assert can0["CAN"]["BitRate"] == BITRATE
    assert can0["CAN"]["RestartSec"] == "100ms"
    assert can0["Link"]["RequiredForOnline"] == "no"
    template = ini(DEPLOY / "network/80-can0.network")
    template["CAN"]["BitRate"] = BITRATE
    assert {s: dict(template[s]) for s in template} == {s: dict(can0[s]) for s in can0}
    netdev = ini(net / "vcan0.netdev")
    assert dict(netdev["NetDev"]) == {"Name": "vcan0", "Kind": "vcan"}
    vcan = ini(net / "vcan0.network")
    assert vcan["Match"]["Name"] == "vcan0"
    assert vcan["Link"]["RequiredForOnline"] == "no"
    for path in net.iterdir():
        assert mode(path) == 0o644, path


def test_uninstall_keeps_config_and_state(installed: Installed, tmp_path: Path) -> None:
    root = copy_tree(installed.root, tmp_path / "root")
    kept_before = {p: p.read_bytes() for p in add_local_files(root)}
    install(root, "--uninstall")
    for gone in ("opt/ev-gateway", "etc/systemd/system/ev-gateway.service",
                 "etc/systemd/network/80-can0.network", "etc/systemd/network/vcan0.netdev",
                 "etc/systemd/network/vcan0.network", "etc/sysusers.d/ev-gateway.conf"):
        assert not (root / gone).exists(), gone
    assert {p: p.read_bytes() for p in kept_before} == kept_before
    assert "ev-gateway:" in (root / "etc/passwd").read_text()


def test_purge_removes_everything_but_the_user(installed: Installed, tmp_path: Path) -> None:
    root = copy_tree(installed.root, tmp_path / "root")
    add_local_files(root)
    install(root, "--uninstall", "--purge")
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    # A removed system user's uid could be handed to a new user, who would then
    # own whatever the old one left behind: the user database keeps it.
    assert left == ["etc/.pwd.lock", "etc/group", "etc/gshadow", "etc/passwd", "etc/shadow"]


def test_upgrade_from_a_wheel_of_the_same_version(installed: Installed, tmp_path: Path) -> None:
    """--from WHEEL --no-deps replaces the code even when the version did not change."""
    root = copy_tree(installed.root, tmp_path / "root")
    src = tmp_path / "src"
    shutil.copytree(REPO / "gateway", src / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "hil", src / "hil", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    with (src / "gateway/__init__.py").open("a") as f:
        f.write("UPGRADED = True\n")
    wheels = tmp_path / "wheels"
    built = run_venv(root, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src))
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob(f"ev_gateway-{gateway.__version__}-*.whl")
    install(root, "--from", str(wheel), "--no-deps")
    upgraded = run_venv(root, "-c", "import gateway.cli; print(gateway.UPGRADED)")
    assert (upgraded.returncode, upgraded.stdout) == (0, "True\n"), upgraded.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--can", "fast"), "--can wants a bitrate"),
    (("--purge",), "--purge goes with --uninstall"),
    (("--bogus",), "unknown argument"),
])
def test_bad_arguments_change_nothing(tmp_path: Path, args: tuple[str, ...],
                                      message: str) -> None:
    root = tmp_path / "root"
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root), *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not root.exists() or not any(root.iterdir())

