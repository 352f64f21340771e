"""A private mosquitto for tests, benchmarks and the demo.

Each instance gets its own directory, generated config and free port, so
runs never touch a system broker or each other. Persistence is on, so a
restart keeps retained messages and sessions, as a production broker would.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
INSTALL_HINT = "mosquitto not found: install it with 'apt-get install mosquitto'"


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def stop_process(process: subprocess.Popen[Any], timeout: float,
                 sig: int = signal.SIGTERM) -> bool:
    """Send ``sig``, wait up to ``timeout`` seconds, then kill. True when the process
    ended by itself (or had already ended)."""
    if process.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with a generated config."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = "",
                 nodelay: bool = False) -> None:
        """``nodelay`` turns Nagle off on the broker's sockets (latency benchmarks); off by
        default, as in mosquitto."""
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.nodelay = nodelay
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def _write_config(self) -> None:
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # Let one client have a deep QoS 1 backlog: the outbox replays fast.
            "max_queued_messages 100000\n"
            f"{'set_tcp_nodelay true' if self.nodelay else ''}\n"
            f"{self.extra_config}\n"
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        self._write_config()
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited at start: {err.strip()} {log[-500:]}")
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.host, self.port), 0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def _signal(self, sig: int) -> None:
        if self.process is None:
            return
        stop_process(self.process, 10, sig)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def stop(self) -> None:
        """Stop cleanly (SIGTERM: persistence is written)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash or power cut would."""
        self._signal(signal.SIGKILL)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
