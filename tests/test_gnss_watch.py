"""The ``gnss.receiver_lost`` alert: a manual clock and a real alert book for the rule, the
settings loader for its key, and a real pty, reader, gateway and broker end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.alerts import AlertBook, Severity
from gateway.app import Pipeline
from gateway.app.location import Location
from gateway.clock import ManualClock, SystemClock
from gateway.config import ConfigError, load_profile
from gateway.config.location import GnssSettings, LocationSettings
from gateway.config.settings import default_settings, load_settings, with_overrides
from gateway.gnss.fix import Fix
from gateway.gnss.watch import ALERT_KEY, ReceiverWatch
from hil.broker import Mosquitto
from hil.sim import VehicleModel
from hil.sim.gnss import NmeaSimulator, run_receiver
from tests.command_rig import Gateway
from tests.conftest import REF_PROFILE
from tests.contract import validate
from tests.gnss_helpers import Pty, make_parser, nmea, wait_until
from tests.mqtt_helpers import Subscriber

DEVICE = "/dev/ttyACM0"
VEHICLE = "car-gnss-lost"


def epoch(quality: int, received: float) -> Fix:
    """One epoch through the real parser: GGA fix quality 0 is an epoch without a fix."""
    parser, _ = make_parser()
    assert parser.feed(nmea(f"GPGGA,120000.00,4807.038,N,01131.000,E,{quality},08,0.9,"
                            "545.4,M,46.9,M,,"), received) is None
    fix = parser.flush(received + 0.1)
    assert fix is not None
    return fix


def watch(clock: ManualClock, threshold: float = 30.0) -> tuple[ReceiverWatch, AlertBook]:
    book = AlertBook(clock)
    return ReceiverWatch(book, DEVICE, threshold, clock), book


def keys(book: AlertBook) -> list[str]:
    return [a.key for a in book.active()]


def test_raised_once_the_threshold_has_passed_and_not_before() -> None:
    clock = ManualClock()
    w, book = watch(clock)
    w.on_fix(epoch(1, clock.time()))
    clock.advance(29.0)
    w.check(clock.monotonic())
    assert not book.active() and not w.lost
    clock.advance(1.0)
    w.check(clock.monotonic())
    [alert] = book.active()
    assert (alert.key, alert.severity) == (ALERT_KEY, Severity.WARNING)
    assert alert.message.startswith(f"GNSS receiver {DEVICE}: no position data for 30 s (")
    assert (alert.value, alert.limit) == (30, 30.0)
    assert alert.source_ts is not None  # the time of the last epoch seen
    clock.advance(5.0)
    w.check(clock.monotonic())
    assert book.active() == [alert], "raised once, not re-raised or updated every check"


def test_epochs_without_a_fix_keep_it_clear() -> None:
    clock = ManualClock()
    w, book = watch(clock)
    for _ in range(10):  # five minutes in a tunnel, the receiver reporting no fix throughout
        clock.advance(29.0)
        no_fix = epoch(0, clock.time())
        assert no_fix.fix_type == "NONE"
        w.on_fix(no_fix)
        w.check(clock.monotonic())
    assert not book.active()


def test_cleared_at_the_next_epoch_with_the_length_of_the_outage() -> None:
    clock = ManualClock()
    w, book = watch(clock)
    w.on_fix(epoch(1, clock.time()))
    clock.advance(45.0)
    w.check(clock.monotonic())
    assert keys(book) == [ALERT_KEY]
    clock.advance(15.0)
    back = epoch(0, clock.time())  # alive again, even before it has a fix
    w.on_fix(back)
    assert not book.active() and not w.lost
    # Cleared at once, not at the next check; and it can be raised again later.
    clock.advance(30.0)
    w.check(clock.monotonic())
    [again] = book.active()
    assert again.raised_at == clock.time()


def test_raised_from_start_when_nothing_ever_arrives() -> None:
    clock = ManualClock()
    w, book = watch(clock, threshold=5.0)
    clock.advance(4.0)
    w.check(clock.monotonic())
    assert not book.active()
    clock.advance(1.0)
    w.check(clock.monotonic())
    [alert] = book.active()
    assert "for 5 s since start" in alert.message
    assert alert.source_ts is None  # no epoch was ever seen


def test_the_wait_between_build_and_start_does_not_count() -> None:
    clock = ManualClock()
    w, book = watch(clock, threshold=5.0)
    clock.advance(60.0)  # built, but the gateway only starts now
    w.begin()
    clock.advance(4.0)
    w.check(clock.monotonic())
    assert not book.active()


def test_the_message_says_whether_the_port_is_open() -> None:
    clock = ManualClock()
    states: list[tuple[Callable[[], bool], str]] = [
        (lambda: True, "port open, but silent"), (lambda: False, "port closed: unplugged")]
    for connected, words in states:
        book = AlertBook(clock)
        w = ReceiverWatch(book, DEVICE, 1.0, clock, connected=connected)
        clock.advance(1.0)
        w.check(clock.monotonic())
        assert words in book.active()[0].message


def test_a_threshold_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="above 0"):
        ReceiverWatch(AlertBook(ManualClock()), DEVICE, 0.0, ManualClock())


async def test_the_location_stage_watches_a_receiver_that_never_opens(
        ref_pipeline: Pipeline, tmp_path: Path) -> None:
    settings = GnssSettings(enabled=True, device=str(tmp_path / "no-such-receiver"),
                            lost_alert_s=3.0)
    location = Location.build(ref_pipeline, settings)
    location.start()
    try:
        # The manual clock runs as fast as the tasks sleep on it.
        await wait_until(lambda: bool(ref_pipeline.alerts.active()), "the alert")
    finally:
        await location.stop()
    [alert] = ref_pipeline.alerts.active()
    assert alert.key == ALERT_KEY
    assert alert.message.startswith(f"GNSS receiver {settings.device}: no position data for ")
    assert "since start (port closed: unplugged or cannot be opened)" in alert.message
    assert not location.tasks


# --- settings --------------------------------------------------------------------------------

def _settings_file(tmp_path: Path, gnss: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(f'[gateway]\nvehicle_id = "car1"\nprofile = "{REF_PROFILE}"\n\n'
                    f'[gnss]\ndevice = "/dev/serial0"\n{gnss}')
    return path


def test_lost_alert_s_defaults_to_30_and_can_be_set(tmp_path: Path) -> None:
    assert load_settings(_settings_file(tmp_path, "")).location.gnss.lost_alert_s == 30.0
    loaded = load_settings(_settings_file(tmp_path, "lost_alert_s = 3600\n"))
    assert loaded.location.gnss.lost_alert_s == 3600.0
    assert load_settings(_settings_file(tmp_path, "rate_hz = 10\nlost_alert_s = 0.5\n")) \
        .location.gnss.lost_alert_s == 0.5


def test_lost_alert_s_must_span_more_than_two_epochs(tmp_path: Path) -> None:
    # At 1 Hz a 2 s threshold would flap between two healthy epochs.
    path = _settings_file(tmp_path, "lost_alert_s = 2\n")
    with pytest.raises(ConfigError, match=r"gw.toml:7: gnss.lost_alert_s: expected more than "
                                          r"two epochs at rate_hz = 1 \(2 s\), got 2"):
        load_settings(path)
    assert load_settings(_settings_file(tmp_path, "lost_alert_s = 2.5\n")) \
        .location.gnss.lost_alert_s == 2.5


@pytest.mark.parametrize("value", ["0", "-1", "3601", "inf", "nan", '"30"', "true"])
def test_lost_alert_s_out_of_range_names_file_line_and_key(tmp_path: Path, value: str) -> None:
    path = _settings_file(tmp_path, f"lost_alert_s = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}:7: gnss.lost_alert_s: "), message
    assert ("above 0 and at most 3600" in message or "expected a number" in message), message


# --- end to end ------------------------------------------------------------------------------

async def test_alert_raised_when_the_receiver_falls_silent_and_cleared_when_it_speaks(
        broker: Mosquitto, tmp_path: Path) -> None:
    pty = Pty()
    gnss = NmeaSimulator(VehicleModel(mode="park"))
    where = LocationSettings(gnss=GnssSettings(enabled=True, device=pty.path, baud=115200,
                                               rate_hz=5.0, lost_alert_s=1.0))
    settings = with_overrides(default_settings(VEHICLE, REF_PROFILE, tmp_path / "state"),
                              host=broker.host, port=broker.port)
    settings = replace(settings, location=where)
    settings.state_dir.mkdir()
    stop = asyncio.Event()
    gateway: Gateway | None = None
    receiver: asyncio.Task[int] | None = None

    def transitions(after: int = 0) -> list[dict[str, Any]]:
        return [m.json() for m in sub.on("alerts")[after:]
                if m.json()["alert"]["key"] == ALERT_KEY]

    try:
        async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
            gateway = gw = await Gateway.open(load_profile(REF_PROFILE), settings,
                                              "gnss-watch-e2e")
            receiver = asyncio.create_task(run_receiver(pty.master, gnss, SystemClock(), stop,
                                                        rate_hz=5.0))
            await wait_until(lambda: gw.counter("gnss.fixes") > 3, "fixes from the receiver",
                             timeout=15)
            # Whatever happened while the port was opening is over once fixes flow.
            await wait_until(lambda: ALERT_KEY not in keys(gw.pipeline.alerts),
                             "no alert while fixes flow")
            start = len(sub.on("alerts"))

            gnss.silent = True
            await sub.wait_for(lambda: bool(transitions(start)), timeout=15)
            raised = transitions(start)[0]
            assert raised["transition"] == "raised"
            alert = raised["alert"]
            assert (alert["severity"], alert["limit"]) == ("warning", 1.0)
            assert alert["message"].startswith(f"GNSS receiver {pty.path}: no position data")
            assert "since start" not in alert["message"]
            assert alert["value"] >= 1

            gnss.silent = False
            await sub.wait_for(lambda: any(t["transition"] == "cleared"
                                           for t in transitions(start)), timeout=15)
            cleared = next(t for t in transitions(start) if t["transition"] == "cleared")
            assert cleared["alert"]["raised_at"] == alert["raised_at"]
            # Its value is the whole outage; its source time that of the epoch that ended it.
            assert cleared["alert"]["value"] >= alert["value"]
            assert cleared["alert"]["source_ts"] is not None
            for m in sub.on("alerts"):
                validate(m.topic, m.payload)
            assert ALERT_KEY not in keys(gw.pipeline.alerts)
    finally:
        stop.set()
        if receiver is not None:
            await asyncio.gather(receiver, return_exceptions=True)
        if gateway is not None:
            await gateway.stop()
        pty.unplug()
