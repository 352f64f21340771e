"""Receive checks (rolling counter, CRC, length) through the real decoder of the reference
pipeline, the monitor's receive-side watches (integrity, timeout) and its plumbing.

Frames are encoded from the reference DBCs as the simulated ECUs encode them
(tests/safety_frames.py); time is a ManualClock moved in exact binary steps.
"""

from __future__ import annotations

import asyncio

import can
import pytest

from gateway.alerts import Severity
from gateway.app import Pipeline, Safety
from gateway.clock import ManualClock
from gateway.config import ConfigError, Profile, load_profile
from gateway.safety import SafetyMonitor
from gateway.safety.monitor import MIN_GAP
from hil.sim.ecus import generate
from hil.sim.model import VehicleModel
from tests.safety_frames import SPEED, STEP, AlertLog, RefFrames, write_profile

MCU_DRIVE_ID = 0x200
TB = "Vehicle.Powertrain.TractionBattery"


class Rig:
    """The reference pipeline, a monitor on it, and a frame source stepping the clock."""

    def __init__(self, pipeline: Pipeline, clock: ManualClock) -> None:
        self.pipeline = pipeline
        self.clock = clock
        self.frames = RefFrames()
        self.log = AlertLog()
        assert pipeline.alerts is not None
        pipeline.alerts.sink = self.log
        self.monitor = SafetyMonitor(pipeline.profile, pipeline.plans, pipeline.store,
                                     pipeline.alerts, clock, pipeline.checks)
        self.decoder = pipeline.decoders["vehicle"]

    def feed(self, *frames: can.Message) -> None:
        self.decoder.process(list(frames))

    def step(self, *names: str, corrupt: bool = False, evaluate: bool = True) -> float:
        """Advance one STEP, send one frame of each of ``names``, evaluate; returns now."""
        self.clock.advance(STEP)
        now = self.clock.time()
        if names:
            self.feed(*(self.frames.frame(n, now, corrupt=corrupt) for n in names))
        if evaluate:
            self.monitor.evaluate()
        return now

    def count(self, name: str) -> int:
        return self.pipeline.counters.get(name)


@pytest.fixture
def rig(ref_pipeline: Pipeline, clock: ManualClock) -> Rig:
    return Rig(ref_pipeline, clock)


def speed_frame(rig: Rig, kmh: float, counter: int | None = None,
                corrupt: bool = False) -> can.Message:
    return rig.frames.frame("MCU_Drive", rig.clock.time(), {"MCU_VehicleSpeed": kmh},
                            counter=counter, corrupt=corrupt)


# ---- the checks in the decoder -------------------------------------------------------


def test_a_good_stream_is_consumed(rig):
    for i in range(40):  # the 4-bit counter wraps twice
        rig.clock.advance(STEP)
        rig.feed(speed_frame(rig, 40.0 + i))
        assert rig.pipeline.store.good_value(SPEED, rig.clock.time()) == 40.0 + i
    assert rig.pipeline.counters.snapshot("rx.") == {}
    assert rig.count("decode.decoded") == 40
    check = rig.pipeline.checks["MCU_Drive"]
    assert check.failing is None and check.bucket == 0


def test_a_corrupted_checksum_is_not_consumed(rig):
    rig.feed(speed_frame(rig, 42.0))
    rig.clock.advance(STEP)
    t = rig.clock.time()
    rig.feed(speed_frame(rig, 80.0, corrupt=True))
    view = rig.pipeline.store.view(SPEED, t)
    assert view.valid is False and view.value is None
    assert view.timestamp == t  # invalid as of the bad frame, not stale-looking valid data
    assert rig.count("decode.bad_checksum") == 1
    assert rig.count("decode.vehicle.bad_checksum") == 1
    assert rig.count("rx.MCU_Drive.bad_checksum") == 1
    check = rig.pipeline.checks["MCU_Drive"]
    assert (check.failing, check.failing_since) == ("bad_checksum", t)
    # The next good frame is consumed again.
    rig.clock.advance(STEP)
    rig.feed(speed_frame(rig, 43.0))
    assert rig.pipeline.store.good_value(SPEED, rig.clock.time()) == 43.0
    assert check.failing is None


def test_a_frozen_counter_is_tolerated_then_rejected_then_recovers(rig, ref_profile):
    tolerance = ref_profile.messages["MCU_Drive"].counter_tolerance
    store, check = rig.pipeline.store, rig.pipeline.checks["MCU_Drive"]
    for counter in range(4):
        rig.clock.advance(STEP)
        rig.feed(speed_frame(rig, 30.0, counter=counter))
    # A stuck ECU repeats the same bytes: the check must run on cache hits too.
    stuck = rig.frames.payload("MCU_Drive", {"MCU_VehicleSpeed": 31.0}, counter=3)
    for n in range(1, tolerance):
        rig.clock.advance(STEP)
        rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=stuck))
        assert store.good_value(SPEED, rig.clock.time()) == 31.0, f"wrong frame {n}"
    assert rig.count("rx.MCU_Drive.bad_counter") == 0
    for n in range(tolerance, tolerance + 6):
        rig.clock.advance(STEP)
        rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=stuck))
        assert store.view(SPEED, rig.clock.time()).valid is False, f"wrong frame {n}"
        assert rig.count("rx.MCU_Drive.bad_counter") == n - tolerance + 1
    assert rig.count("decode.bad_counter") == 6
    assert check.failing == "bad_counter"
    assert check.bucket == tolerance  # full, not overflowing: recovery stays quick
    rig.clock.advance(STEP)
    rig.feed(speed_frame(rig, 32.0, counter=4))
    assert store.good_value(SPEED, rig.clock.time()) == 32.0
    assert check.failing is None


def test_lost_frames_are_tolerated(rig):
    store = rig.pipeline.store
    # One lost frame, then a loss every third frame for a long time: never invalid.
    counters = [0, 1, 2, 4, 5, 6]
    counters += [c % 16 for c in range(7, 200) if c % 3]
    for i, counter in enumerate(counters):
        rig.clock.advance(STEP)
        rig.feed(speed_frame(rig, 20.0 + i % 50, counter=counter))
        assert store.good_value(SPEED, rig.clock.time()) == 20.0 + i % 50
    assert rig.pipeline.counters.snapshot("rx.") == {}
    assert rig.pipeline.checks["MCU_Drive"].bucket <= 1


@pytest.mark.parametrize("length", [0, 7])
def test_a_wrong_length_is_not_consumed(rig, length):
    rig.feed(speed_frame(rig, 42.0))
    rig.clock.advance(STEP)
    good = rig.frames.payload("MCU_Drive", {"MCU_VehicleSpeed": 50.0})
    rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=good[:length]))
    assert rig.pipeline.store.view(SPEED, rig.clock.time()).valid is False
    assert rig.count("decode.wrong_dlc") == 1
    assert rig.count("rx.MCU_Drive.wrong_dlc") == 1
    assert rig.pipeline.checks["MCU_Drive"].failing == "wrong_dlc"


def test_the_payload_cache_never_passes_a_bad_checksum(rig):
    plan = rig.pipeline.plans["vehicle"].mapped[MCU_DRIVE_ID]
    good = rig.frames.payload("MCU_Drive", {"MCU_VehicleSpeed": 42.0}, counter=0)
    bad = bytes([*good[:7], good[7] ^ 0x01])
    rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=good))
    assert good in plan.cache
    for n in range(1, 4):
        rig.clock.advance(STEP)
        rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=bad))
        assert rig.pipeline.store.view(SPEED, rig.clock.time()).valid is False
        assert rig.count("rx.MCU_Drive.bad_checksum") == n
        assert bad not in plan.cache
    # The good payload is still served from the cache (its counter is now one step stale,
    # which the leaky bucket tolerates).
    rig.clock.advance(STEP)
    rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=good))
    assert rig.pipeline.store.good_value(SPEED, rig.clock.time()) == 42.0
    assert rig.count("decode.decoded") == 1


# ---- the monitor's receive-side watches -------------------------------------------------


def test_integrity_alert_rises_after_half_a_second_and_clears_after_two(rig):
    key = "rx.MCU_Drive.integrity"
    for _ in range(32):
        rig.step("MCU_Drive")
    # A short burst of bad frames (under half a second) raises nothing.
    for _ in range(20):
        rig.step("MCU_Drive", corrupt=True)
    for _ in range(10):
        rig.step("MCU_Drive")
    assert rig.log.of(key) == []

    first_bad = rig.step("MCU_Drive", corrupt=True)
    while rig.log.get(key) is None:
        assert rig.clock.time() - first_bad < 0.5, "not raised after 0.5 s of failures"
        rig.step("MCU_Drive", corrupt=True)
    alert = rig.log.get(key)
    assert alert is not None
    assert alert.raised_at - first_bad == 0.5
    assert alert.severity is Severity.WARNING
    assert "bad checksum" in alert.message

    first_good = rig.step("MCU_Drive")
    while rig.log.get(key) is not None:
        assert rig.clock.time() - first_good < 2.0, "not cleared after 2 s of good frames"
        rig.step("MCU_Drive")
    cleared = [a for t, a in rig.log.transitions if a.key == key and t == "cleared"]
    assert len(cleared) == 1 and cleared[0].cleared_at is not None
    assert cleared[0].cleared_at - first_good == 2.0
    assert rig.log.of(key) == ["raised", "cleared"]


def test_integrity_alert_names_a_bad_counter(rig):
    key = "rx.MCU_Drive.integrity"
    rig.step("MCU_Drive")
    stuck = rig.frames.payload("MCU_Drive", {}, counter=9)
    for _ in range(80):
        rig.clock.advance(STEP)
        rig.feed(rig.frames.frame("MCU_Drive", rig.clock.time(), data=stuck))
        rig.monitor.evaluate()
    alert = rig.log.get(key)
    assert alert is not None and "bad counter" in alert.message


def _window(rig: Rig, message: str) -> float:
    plan = next(p for p in rig.pipeline.plans["vehicle"].mapped.values() if p.name == message)
    windows = [d.slot.stale_after for ds in plan.signals.values() for d in ds]
    return max(w for w in windows if w is not None)


def test_timeout_rises_when_the_bms_goes_silent_while_the_mcu_talks(rig):
    key = "rx.BMS_Pack.timeout"
    for _ in range(64):
        rig.step("BMS_Pack", "MCU_Drive")
    last_bms = rig.clock.time()
    assert rig.log.of(key) == []
    window = _window(rig, "BMS_Pack")
    while rig.log.get(key) is None:
        assert rig.clock.time() - last_bms <= window + STEP, "BMS silence not noticed"
        rig.step("MCU_Drive")
    alert = rig.log.get(key)
    assert alert is not None and alert.severity is Severity.WARNING
    assert alert.raised_at - last_bms > window
    assert "BMS_Pack not received" in alert.message
    rig.step("BMS_Pack", "MCU_Drive")
    assert rig.log.get(key) is None
    assert rig.log.of(key) == ["raised", "cleared"]


def test_no_timeout_when_the_whole_bus_falls_silent_together(rig):
    for _ in range(64):
        rig.step("BMS_Pack", "MCU_Drive")
    before = len(rig.log.transitions)
    for _ in range(640):  # ten seconds of a sleeping bus
        rig.step()
    assert rig.log.of("rx.BMS_Pack.timeout") == []
    assert rig.log.of("rx.MCU_Drive.timeout") == []
    # Messages never heard were late while the bus was awake; sleep only clears them.
    assert [t for t, _ in rig.log.transitions[before:]] == \
        ["cleared"] * (len(rig.log.transitions) - before)


def test_after_the_bus_wakes_each_message_gets_one_window_to_speak(rig):
    for _ in range(64):
        rig.step("BMS_Pack", "MCU_Drive")
    for _ in range(640):  # the car sleeps
        rig.step()
    woke = rig.step("MCU_Drive")  # the motor controller happens to speak first
    window = _window(rig, "BMS_Pack")
    while rig.step("MCU_Drive") - woke <= window:
        assert rig.log.get("rx.BMS_Pack.timeout") is None, "timed out before it could speak"
    # A BMS that stays silent while the bus is awake is still a fault.
    for _ in range(8):
        rig.step("MCU_Drive")
    assert rig.log.get("rx.BMS_Pack.timeout") is not None
    assert rig.log.get("rx.MCU_Drive.timeout") is None


def test_a_held_up_monitor_gives_every_message_a_window_again(rig):
    for _ in range(64):
        rig.step("BMS_Pack", "MCU_Drive")
    # The whole machine stops for half a second (no evaluation, nothing sent), then the
    # BMS's frame is the first one out of the catch-up burst.
    rig.clock.advance(0.5)
    resumed = rig.step("BMS_Pack")
    window = _window(rig, "MCU_Drive")
    while rig.step("BMS_Pack") - resumed <= window:
        assert rig.log.get("rx.MCU_Drive.timeout") is None, "timed out before it could speak"
    rig.step("BMS_Pack")
    # Still silent a window after the hold-up: now it is a timeout.
    assert rig.log.get("rx.MCU_Drive.timeout") is not None


def test_no_timeout_when_simulated_traffic_stops(rig):
    frames = generate(VehicleModel(mode="park"), 3.0, start=rig.clock.time())
    rig.monitor.evaluate()
    end = frames[-1].timestamp + 3.0
    i = 0
    while rig.clock.time() < end:
        rig.clock.advance(1 / 16)
        batch = []
        while i < len(frames) and frames[i].timestamp <= rig.clock.time():
            batch.append(frames[i])
            i += 1
        if batch:
            rig.feed(*batch)
        rig.monitor.evaluate()
    assert [a.key for t, a in rig.log.transitions if a.key.endswith(".timeout")] == []


def test_no_timeout_in_the_first_stale_window_after_start(rig):
    started = rig.clock.time()
    rig.monitor.evaluate()
    # The MCU talks from the start; the BMS has not said anything yet.
    raised: dict[str, float] = {}
    for _ in range(64):
        rig.step("MCU_Drive")
        for t, a in rig.log.transitions:
            if t == "raised" and a.key.endswith(".timeout"):
                raised.setdefault(a.key, a.raised_at)
    assert "rx.BMS_Pack.timeout" in raised  # not heard within its window: late
    for key, at in raised.items():
        message = key.split(".")[1]
        assert at - started > _window(rig, message), key
    assert "rx.MCU_Drive.timeout" not in raised


def test_a_bus_that_never_wakes_raises_nothing(rig):
    rig.monitor.evaluate()
    for _ in range(320):
        rig.step()
    assert rig.log.transitions == []


# ---- profile variants and configuration errors --------------------------------------------


def _build(tmp_path, body: str) -> tuple[Profile, Pipeline, ManualClock]:
    profile = load_profile(write_profile(tmp_path, body))
    clock = ManualClock()
    return profile, Pipeline.build(profile, clock), clock


VOLTAGE = f"{TB}.CurrentVoltage"


def test_counter_only_message_skips_the_checksum(tmp_path):
    _, pipeline, clock = _build(tmp_path, """
[messages.BMS_Pack]
counter = "BMS_Pack_Counter"
counter_tolerance = 2
""")
    frames, decoder = RefFrames(), pipeline.decoders["vehicle"]
    for i in range(3):
        clock.advance(STEP)
        decoder.process([frames.frame("BMS_Pack", clock.time(), {"BMS_PackVoltage": 90 + i},
                                      corrupt=True)])
        assert pipeline.store.good_value(VOLTAGE, clock.time()) == 90 + i
    for n in (1, 2):  # tolerance 2: the second wrong counter is rejected
        clock.advance(STEP)
        decoder.process([frames.frame("BMS_Pack", clock.time(), counter=2)])
        assert pipeline.store.view(VOLTAGE, clock.time()).valid is (n == 1)
    assert pipeline.counters.get("rx.BMS_Pack.bad_counter") == 1


def test_checksum_only_message_ignores_the_counter(tmp_path):
    _, pipeline, clock = _build(tmp_path, """
[messages.BMS_Pack]
checksum = "BMS_Pack_Checksum"
""")
    frames, decoder = RefFrames(), pipeline.decoders["vehicle"]
    for i in range(20):
        clock.advance(STEP)
        decoder.process([frames.frame("BMS_Pack", clock.time(), {"BMS_PackVoltage": 90 + i},
                                      counter=7)])
        assert pipeline.store.good_value(VOLTAGE, clock.time()) == 90 + i
    decoder.process([frames.frame("BMS_Pack", clock.time(), corrupt=True)])
    assert pipeline.counters.get("rx.BMS_Pack.bad_checksum") == 1


def test_big_endian_checksum_byte_with_another_algorithm(tmp_path):
    _, pipeline, clock = _build(tmp_path, """
[messages.OBC_Status]
checksum = "OBC_Temperature"
checksum_algorithm = "xor8"

[[signal]]
path = "Vehicle.Powertrain.TractionBattery.Charging.ChargeVoltage.DC"
message = "OBC_Status"
signal = "OBC_OutputVoltage"
""")
    frames = RefFrames()
    data = bytearray(frames.payload("OBC_Status", {"OBC_OutputVoltage": 101.5}))
    # OBC_Temperature is the big-endian byte starting at bit 47: byte 5.
    data[5] = 0
    for i, b in enumerate(data):
        if i != 5:
            data[5] ^= b
    decoder, path = pipeline.decoders["vehicle"], f"{TB}.Charging.ChargeVoltage.DC"
    decoder.process([frames.frame("OBC_Status", clock.time(), data=bytes(data))])
    assert pipeline.store.good_value(path, clock.time()) == 101.5
    data[5] ^= 0x10
    decoder.process([frames.frame("OBC_Status", clock.time(), data=bytes(data))])
    assert pipeline.counters.get("rx.OBC_Status.bad_checksum") == 1


def test_messages_without_checks_and_an_explicit_dlc(tmp_path):
    profile, pipeline, clock = _build(tmp_path, """
[messages.BMS_Pack]
dlc = 8
counter = "BMS_Pack_Counter"
checksum = "BMS_Pack_Checksum"

[messages.BMS_Soc]
cycle_ms = 100

[[signal]]
path = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
message = "BMS_Soc"
signal = "BMS_SoC"

[[signal]]
path = "Vehicle.Powertrain.TractionBattery.StateOfHealth"
message = "BMS_Soc"
signal = "BMS_SoH"
""")
    assert set(pipeline.checks) == {"BMS_Pack"}
    frames = RefFrames()
    pipeline.decoders["vehicle"].process([
        frames.frame("BMS_Pack", clock.time(), {"BMS_PackVoltage": 95.0}),
        frames.frame("BMS_Soc", clock.time(), {"BMS_SoC": 55.5}),
    ])
    assert pipeline.store.good_value(VOLTAGE, clock.time()) == 95.0
    assert pipeline.store.good_value(f"{TB}.StateOfCharge.Current", clock.time()) == 55.5
    assert pipeline.alerts is not None
    monitor = SafetyMonitor(profile, pipeline.plans, pipeline.store, pipeline.alerts, clock,
                            pipeline.checks)
    keys = {r.key for r in monitor.rx_rules}
    assert "rx.BMS_Pack.integrity" in keys and "rx.BMS_Soc.integrity" not in keys


def test_an_event_driven_checked_message_has_no_timeout_watch(tmp_path):
    profile, pipeline, clock = _build(tmp_path, """
[messages.BMS_Pack]
cycle_ms = 0
checksum = "BMS_Pack_Checksum"
""")
    assert pipeline.alerts is not None
    monitor = SafetyMonitor(profile, pipeline.plans, pipeline.store, pipeline.alerts, clock,
                            pipeline.checks)
    keys = {r.key for r in monitor.rx_rules}
    assert keys == {"rx.BMS_Pack.integrity"}


@pytest.mark.parametrize(
    ("setting", "key", "words"),
    [
        ('counter = "BMS_Pack_Cnt"', "messages.BMS_Pack.counter", "no signal 'BMS_Pack_Cnt'"),
        ('checksum = "BMS_Pack_Crc"', "messages.BMS_Pack.checksum", "no signal 'BMS_Pack_Crc'"),
        ('checksum = "BMS_PackVoltage"', "messages.BMS_Pack.checksum", "one whole byte"),
        ('checksum = "BMS_State"', "messages.BMS_Pack.checksum", "one whole byte"),
        ("dlc = 6", "messages.BMS_Pack.dlc", "has 8 bytes"),
    ],
    ids=["missing-counter", "missing-checksum", "16-bit-checksum", "3-bit-checksum",
         "short-dlc"],
)
def test_config_errors_name_file_line_and_key(tmp_path, setting, key, words):
    path = write_profile(tmp_path, f"\n[messages.BMS_Pack]\ncycle_ms = 20\n{setting}\n")
    line = path.read_text().splitlines().index(setting) + 1
    with pytest.raises(ConfigError) as info:
        Pipeline.build(load_profile(path), ManualClock())
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert words in str(err)


# ---- monitor plumbing -------------------------------------------------------------------


def test_batches_trigger_an_evaluation_at_most_every_min_gap(ref_pipeline, clock):
    safety = Safety.build(ref_pipeline)
    monitor = safety.monitor
    assert monitor.on_batch in ref_pipeline.listeners
    monitor.on_batch("vehicle")
    first = monitor.verdicts.ts
    assert first == clock.time()
    clock.advance(MIN_GAP / 2)
    monitor.on_batch("vehicle")
    assert monitor.verdicts.ts == first  # too soon: skipped
    clock.advance(MIN_GAP / 2)
    monitor.on_batch("vehicle")
    assert monitor.verdicts.ts == clock.time()


async def test_the_tick_evaluates_until_cancelled(rig):
    task = asyncio.create_task(rig.monitor.run())
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(rig.clock.slept) >= 3
    assert set(rig.clock.slept) == {rig.monitor.tick_s}
    view = rig.pipeline.store.view("Vehicle.Safety.Motion", rig.clock.time())
    assert view.value == "unknown" and not view.stale
    assert rig.monitor.verdicts.ts > rig.clock.time() - rig.monitor.tick_s * 2


def test_a_reset_latch_needs_the_fault_gone_and_a_reset(rig):
    key = "battery.cell_overvoltage"

    def send(max_cell: float) -> None:
        rig.clock.advance(0.125)
        now = rig.clock.time()
        batch = [rig.frames.frame("BMS_CellStats", now, {"BMS_MaxCellVoltage": max_cell,
                                                         "BMS_MinCellVoltage": 3.3})]
        for page in range(10):
            cells = {f"BMS_Cell{page * 3 + k + 1:02d}_V": 3.3 for k in range(3)}
            batch.append(rig.frames.frame("BMS_CellVoltages", now, {"BMS_CellMux": page} | cells))
        rig.feed(*batch)
        rig.monitor.evaluate()

    for _ in range(24):  # 3 s above the critical level
        send(3.70)
    alert = rig.log.get(key)
    assert alert is not None and alert.severity is Severity.CRITICAL
    assert rig.monitor.reset(key) == []  # still over-voltage: a reset cannot hide it
    for _ in range(24):  # 3 s back to normal: latched, waiting for a reset
        send(3.30)
    assert rig.log.get(key) is not None
    assert rig.monitor.reset("battery.soc_low") == []
    assert rig.monitor.reset(key) == [key]
    assert rig.log.get(key) is None
    assert rig.log.of(key)[-1] == "cleared"
    assert rig.monitor.reset() == []
