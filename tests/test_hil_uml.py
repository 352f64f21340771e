"""hil.uml against a real User-Mode Linux kernel: every test boots a guest (~3 s each)."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.uml import UmlError, run_in_uml, uml_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _needs_uml() -> None:
    problem = uml_problem()
    if problem is not None:
        pytest.skip(problem)


def test_inner_exit_status_propagates() -> None:
    out = io.StringIO()
    assert run_in_uml(["sh", "-c", "echo failing on purpose; exit 7"], out=out) == 7
    assert "failing on purpose" in out.getvalue()


SOCKETCAN_CHECK = textwrap.dedent("""\
    import subprocess
    import can
    from hil.uml import has_af_can, interface_exists

    print("af_can", has_af_can(), "vcan0", interface_exists("vcan0"))
    with can.Bus(interface="socketcan", channel="vcan0") as tx, \\
            can.Bus(interface="socketcan", channel="vcan0") as rx:
        tx.send(can.Message(arbitration_id=0x321, data=b"\\x01\\x02\\x03", is_extended_id=False))
        msg = rx.recv(timeout=10)
        print("python-can", "none" if msg is None else f"{msg.arbitration_id:X}#{msg.data.hex()}")
    # candump needs a moment to bind; resend until it has logged one frame.
    dump = subprocess.Popen(["candump", "-L", "-n", "1", "vcan0"], stdout=subprocess.PIPE,
                            text=True)
    for _ in range(100):
        subprocess.run(["cansend", "vcan0", "123#DEADBEEF"], check=True)
        try:
            print("candump", dump.communicate(timeout=0.2)[0].strip())
            break
        except subprocess.TimeoutExpired:
            pass
    else:
        dump.kill()
        print("candump saw nothing")
""")


def test_vcan0_is_real_socketcan(tmp_path: Path) -> None:
    script = tmp_path / "socketcan_check.py"
    script.write_text(SOCKETCAN_CHECK)
    out = io.StringIO()
    status = run_in_uml([sys.executable, str(script)], cwd=ROOT, out=out, timeout_s=120)
    text = out.getvalue()
    assert status == 0, text
    assert "af_can True vcan0 True" in text
    assert "python-can 321#010203" in text
    lines = [line for line in text.splitlines() if line.startswith("candump ")]
    assert len(lines) == 1, text
    # candump -L: "(timestamp) interface id#data"
    assert lines[0].endswith(" vcan0 123#DEADBEEF"), text


class _GoWhenSeen(io.StringIO):
    """An output sink that creates ``go`` as soon as ``first`` has been written to it."""

    def __init__(self, go: Path) -> None:
        super().__init__()
        self.go = go

    def write(self, s: str) -> int:
        n = super().write(s)
        if "first" in self.getvalue() and not self.go.exists():
            self.go.touch()
        return n


def test_output_is_streamed_while_the_command_runs(tmp_path: Path) -> None:
    # The guest waits for a file the sink creates only after receiving "first": that
    # can happen in time only if output reaches `out` while the command is running.
    go = tmp_path / "go"
    waiter = (f"echo first; i=0; while [ ! -e {go} ] && [ $i -lt 300 ]; do sleep 0.1; "
              f"i=$((i+1)); done; if [ -e {go} ]; then echo saw go; else echo no go; fi")
    out = _GoWhenSeen(go)
    status = run_in_uml(["sh", "-c", waiter], cwd=tmp_path, out=out, timeout_s=120)
    assert status == 0
    assert out.getvalue().splitlines() == ["first", "saw go"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_timeout_kills_the_vm_and_returns_124(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Every UML process of this run has the private temp dir on its command line.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    status = run_in_uml(["sleep", "600"], out=io.StringIO(), timeout_s=6)
    assert status == 124
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_setup_failure_raises_with_the_console_tail() -> None:
    # "lo" exists already, so creating a vcan link with that name fails inside the guest.
    with pytest.raises(UmlError, match="ended without the command's exit status") as caught:
        run_in_uml(["true"], vcan=("lo",), out=io.StringIO(), timeout_s=120)
    assert "hil-uml: setup failed: vcan lo" in str(caught.value)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable directory directly under /tmp, so an unprivileged user can use it."""
    path = Path(tempfile.mkdtemp(prefix="ev-gateway-uml-test-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_non_root_caller(shared_dir: Path) -> None:
    runuser = shutil.which("runuser")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or runuser is None or python is None:
        pytest.skip("needs root with runuser and a system python3 to become 'nobody'")
    nobody = ["runuser", "-u", "nobody", "--"]
    if subprocess.run([*nobody, python, "-c", "pass"], check=False).returncode != 0:
        pytest.skip("'nobody' cannot run the system python3")
    cli = ("import sys; sys.path.insert(0, sys.argv[1]); from hil.uml import main_uml; "
           "sys.exit(main_uml(sys.argv[2:]))")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(shared_dir),
           "TMPDIR": str(shared_dir), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [*nobody, python, "-B", "-c", cli, str(ROOT), "--",
         "sh", "-c", "id -u > made-inside; echo hello from guest; exit 3"],
        cwd=shared_dir, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 3, done.stderr
    assert "hello from guest" in done.stdout
    made = shared_dir / "made-inside"
    # Root of the guest, but the host file belongs to the unprivileged caller.
    assert made.read_text().strip() == "0"
    assert made.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert sorted(p.name for p in shared_dir.iterdir()) == ["made-inside"]
