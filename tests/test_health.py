"""The health report from real stages, its settings, and its topic on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import pytest

from gateway.alerts import Severity
from gateway.app import Pipeline, Publishing, Safety
from gateway.app.health import Health
from gateway.clock import ManualClock, SystemClock
from gateway.config import ConfigError, Profile
from gateway.config.health import HealthSettings, parse_health
from gateway.config.settings import default_settings, with_overrides
from gateway.config.toml_table import Table, read_toml
from gateway.gnss.fix import Fix
from gateway.health.lag import LoopLag
from gateway.health.report import STALE_PATHS_SHOWN, HealthReporter, Sources
from gateway.mqtt import payloads
from gateway.outbox import Entry, Kind, Limits, Outbox
from hil.broker import Mosquitto
from tests.conftest import REF_PROFILE
from tests.contract import validator
from tests.mqtt_helpers import Subscriber
from tests.safety_frames import RefFrames

VEHICLE = "car-health"
Blocker = Callable[[], None]
"""Makes the transmit guard refuse one frame."""


@dataclass
class Receiver:
    """A GNSS receiver's state as the report reads it (what GnssReader exposes)."""

    connected: bool
    last_fix: Fix | None


def fix_at(received: float) -> Fix:
    return Fix(received=received, utc=received - 0.2, fix_type="THREE_D", lat=48.85, lon=2.29,
               alt=35.0, speed_kmh=0.0, heading=None, satellites=9, hdop=0.8)


def decode_some(pipeline: Pipeline, at: float, good: int, unknown: int, short: int) -> None:
    """Feed the reference decoder good BMS frames, frames of an unknown ID and frames of a
    mapped message with a wrong length."""
    ref = RefFrames()
    batch = [ref.frame("BMS_Pack", at) for _ in range(good)]
    batch += [can.Message(arbitration_id=0x7AB, data=bytes(8), timestamp=at)] * unknown
    batch += [ref.frame("BMS_Pack", at, data=bytes(3))] * short
    pipeline.decoders["vehicle"].process(batch)


@contextlib.asynccontextmanager
async def stocked(pipeline: Pipeline, clock: ManualClock, tmp_path: Path, *,
                  version: str = "0.1.0") -> AsyncIterator[tuple[HealthReporter, Blocker]]:
    """A reporter over the reference pipeline with a real outbox holding one event, a
    transmit guard that refused one frame, a critical alert and a receiver with a fix."""
    counters = pipeline.counters
    outbox = Outbox(tmp_path / "outbox.sqlite", Limits(), clock, counters, pipeline.rlog)
    await outbox.open()
    try:
        await outbox.put([Entry(Kind.EVENT, f"evgw/v1/{VEHICLE}/events", b"{}", clock.time())])
        guard = Safety.build(pipeline).guard

        def block() -> None:
            assert not guard.send("vehicle", can.Message(arbitration_id=0x7AB, data=bytes(8)))

        block()
        pipeline.alerts.raise_("bms.cell_overvoltage", Severity.CRITICAL, "cell 3 at 3.71 V")
        sources = Sources(counters, ["vehicle"], pipeline.store, pipeline.alerts.active,
                          LoopLag(), mqtt_connected=lambda: True, outbox_stats=outbox.stats,
                          outbox_pending=lambda: 2, outbox_oldest=lambda: clock.time() - 42.0,
                          gnss=Receiver(True, fix_at(clock.time() - 0.5)))
        yield HealthReporter(sources, clock, version=version), block
    finally:
        await outbox.close()


def stamped(report: dict[str, Any], clock: ManualClock) -> dict[str, Any]:
    """``report`` as the health topic carries it, checked against docs/schemas/health.json."""
    topic = f"evgw/v1/{VEHICLE}/health"
    env = payloads.Envelope(VEHICLE, payloads.new_boot_id())
    message = env.stamp(topic, clock.time(), payloads.health_body(report))
    validator("health.json").validate(message)
    return message


async def test_the_report_reads_every_stage(ref_pipeline, clock, tmp_path):
    async with stocked(ref_pipeline, clock, tmp_path) as (reporter, block):
        clock.advance(10.0)
        decode_some(ref_pipeline, clock.time(), good=100, unknown=3, short=2)
        first = stamped(reporter.build(), clock)
        assert first["period_s"] == 10.0
        assert first["buses"] == {"vehicle": {"frames": 105, "frames_per_s": 10.5,
                                              "dropped": 0, "decode_errors": 5}}
        # Normal work (decoded, unmapped, cache resets) is not an error.
        assert first["decode_errors"] == {"unknown_id": {"total": 3, "recent": 3},
                                          "wrong_dlc": {"total": 2, "recent": 2}}
        # Refused before the reporter started: in the total, not in the first period.
        assert first["transmit_blocked"] == {"not_allowed": {"total": 1, "recent": 0}}
        assert first["alerts"] == [{"key": "tx.blocked", "severity": "warning"},
                                   {"key": "bms.cell_overvoltage", "severity": "critical"}]
        assert first["mqtt"] == {"connected": True}
        assert first["outbox"] == {"depth": 1, "bytes": first["outbox"]["bytes"], "pending": 2,
                                   "by_kind": {"alert": 0, "event": 1, "retained": 0,
                                               "backfill": 0},
                                   "oldest_age_s": 42.0}
        assert first["outbox"]["bytes"] > 0
        assert first["gnss"] == {"connected": True, "fix": "THREE_D", "satellites": 9,
                                 "hdop": 0.8, "fix_age_s": 10.5}
        assert first["loop_lag_s"] == {"latest": 0.0, "max": 0.0}
        assert first["uptime_s"] == 10.0
        # The wrong-length frame invalidated BMS_Pack; most signals were never received.
        stale = ref_pipeline.store.stale_paths(clock.time())
        assert first["stale_signals"] == {"count": len(stale),
                                          "paths": stale[:STALE_PATHS_SHOWN]}
        assert len(stale) > STALE_PATHS_SHOWN

        clock.advance(5.0)
        decode_some(ref_pipeline, clock.time(), good=0, unknown=1, short=0)
        block()
        second = stamped(reporter.build(), clock)
        assert second["period_s"] == 5.0
        assert second["buses"]["vehicle"]["frames_per_s"] == 0.2
        assert second["decode_errors"]["unknown_id"] == {"total": 4, "recent": 1}
        assert second["decode_errors"]["wrong_dlc"] == {"total": 2, "recent": 0}
        assert second["transmit_blocked"]["not_allowed"] == {"total": 2, "recent": 1}
        assert second["uptime_s"] == 15.0
        assert reporter.latest is not None
        assert reporter.latest["buses"] == second["buses"]


async def test_parts_the_gateway_runs_without_are_null(ref_pipeline, clock):
    sources = Sources(ref_pipeline.counters, ["vehicle"], ref_pipeline.store,
                      ref_pipeline.alerts.active, LoopLag(),
                      gnss=Receiver(connected=False, last_fix=None))
    report = HealthReporter(sources, clock).build()
    assert (report["mqtt"], report["outbox"]) == (None, None)
    assert report["gnss"] == {"connected": False, "fix": None, "satellites": None,
                              "hdop": None, "fix_age_s": None}
    assert report["buses"]["vehicle"]["frames_per_s"] == 0.0  # no time has passed
    with pytest.raises(ValueError, match="envelope"):
        payloads.health_body({**report, "seq": 3})


async def test_the_loop_lag_of_a_blocked_loop_is_reported_once_per_reader():
    lag = LoopLag(interval=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.05)
        blocked = 0.3
        time.sleep(blocked)  # nothing can sample now; the overdue wake-up counts anyway
        assert lag.latest >= blocked - 0.01
        assert lag.take_max("watchdog") >= blocked - 0.01
        await asyncio.sleep(0.1)
        assert lag.latest < blocked - 0.01  # later samples are punctual again
        assert lag.take_max() >= blocked - 0.01  # the report's reader still has the peak
        assert lag.take_max("watchdog") < blocked - 0.01  # the watchdog's was taken
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- [health] settings -----------------------------------------------------------------------

def health_table(tmp_path: Path, body: str) -> Table:
    file = tmp_path / "gateway.toml"
    file.write_text(f'[gateway]\nvehicle_id = "x"\n\n[health]\n{body}')
    data, source = read_toml(file, "settings")
    return Table(data["health"], str(file), source, "health")


def test_health_settings_defaults_and_values(tmp_path):
    assert parse_health(health_table(tmp_path, "")) == HealthSettings()
    got = parse_health(health_table(tmp_path, "interval_s = 10\nprometheus_port = 9108\n"
                                              'prometheus_host = "::1"\nmax_loop_lag_s = 0.5\n'
                                              "stall_after_s = 20\n"))
    assert got == HealthSettings(10.0, 9108, "::1", 0.5, 20.0)


@pytest.mark.parametrize(("body", "key", "line", "words"), [
    ("interval = 5", "health.interval", 5, "unknown key"),
    ("interval_s = 0.1", "health.interval_s", 5, "from 1 to 3600"),
    ("prometheus_port = 70000", "health.prometheus_port", 5, "1 to 65535"),
    ("prometheus_port = 0", "health.prometheus_port", 5, ">= 1"),
    ('prometheus_host = "0.0.0.0"', "health.prometheus_host", 5, "loopback"),
    ('prometheus_host = "localhost"', "health.prometheus_host", 5, "loopback"),
    ("\nmax_loop_lag_s = true", "health.max_loop_lag_s", 6, "a number"),
    ("stall_after_s = 0", "health.stall_after_s", 5, "from 1 to 3600"),
])
def test_health_settings_errors_name_file_line_and_key(tmp_path, body, key, line, words):
    with pytest.raises(ConfigError) as caught:
        parse_health(health_table(tmp_path, body))
    err = caught.value
    assert (err.file, err.key, err.line) == (str(tmp_path / "gateway.toml"), key, line)
    assert words in err.detail


# --- the health topic on a real broker --------------------------------------------------------

async def test_health_reports_arrive_on_the_broker_and_follow_the_contract(
        broker: Mosquitto, tmp_path: Path, ref_profile: Profile) -> None:
    clock = SystemClock()
    (tmp_path / "state").mkdir()
    settings = with_overrides(default_settings(VEHICLE, REF_PROFILE, tmp_path / "state"),
                              host=broker.host, port=broker.port)
    pipeline = Pipeline.build(ref_profile, clock)
    publishing = Publishing.build(pipeline, settings)
    health = Health.build(pipeline, publishing, None, HealthSettings(interval_s=0.2), clock,
                          environ={})
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        await publishing.launch()
        await health.start()
        try:
            decode_some(pipeline, clock.time(), good=7, unknown=1, short=0)
            await sub.wait_for(lambda: any(m.json()["buses"]["vehicle"]["frames"] == 8
                                           for m in sub.on("health")))
        finally:
            await health.stop()
            await publishing.stop()
    reports = sub.on("health")
    for m in reports:
        assert not m.retain
        data = m.json()
        validator("health.json").validate(data)
        assert data["vehicle"] == VEHICLE
        assert data["mqtt"] == {"connected": True}
        assert data["gnss"] is None
    seqs = [m.json()["seq"] for m in reports]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    last = next(m.json() for m in reports if m.json()["buses"]["vehicle"]["frames"] == 8)
    assert last["decode_errors"]["unknown_id"]["total"] == 1
    assert pipeline.counters.get("health.published") >= len(reports)
