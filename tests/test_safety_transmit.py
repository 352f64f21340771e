"""TransmitGuard and FrameEncoder on real python-can buses (interface "virtual").

Each test opens its own channel: the guard sends on one bus, a second bus on
the same channel receives what really left. Time for the rate limits and the
alert hold is a ManualClock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import can
import pytest

from gateway.alerts import Severity
from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import ConfigError, load_profile
from gateway.safety import TransmitGuard
from gateway.safety.transmit import BLOCK_ALERT_HOLD
from tests.safety_frames import AlertLog, RefFrames, crc8, write_profile

BUS = "vehicle"
SPEED_LIMIT_ID = 0x210


@dataclass
class Wire:
    """The gateway's side of a virtual channel and a listener on the same channel."""

    tx: can.BusABC
    rx: can.BusABC

    def received(self) -> list[can.Message]:
        out = []
        while (msg := self.rx.recv(timeout=0)) is not None:
            out.append(msg)
        return out


@pytest.fixture
def wire() -> Iterator[Wire]:
    channel = f"tx-test-{uuid.uuid4().hex}"
    tx = can.Bus(interface="virtual", channel=channel)
    rx = can.Bus(interface="virtual", channel=channel)
    try:
        yield Wire(tx, rx)
    finally:
        tx.shutdown()
        rx.shutdown()


@dataclass
class Guarded:
    guard: TransmitGuard
    pipeline: Pipeline
    log: AlertLog

    def count(self, name: str) -> int:
        return self.pipeline.counters.get(name)


def make_guard(pipeline: Pipeline, clock: ManualClock) -> Guarded:
    log = AlertLog()
    assert pipeline.alerts is not None
    pipeline.alerts.sink = log
    guard = TransmitGuard(pipeline.profile, pipeline.plans, clock, pipeline.counters,
                          pipeline.rlog, pipeline.alerts)
    return Guarded(guard, pipeline, log)


@pytest.fixture
def g(ref_pipeline: Pipeline, clock: ManualClock, wire: Wire) -> Guarded:
    guarded = make_guard(ref_pipeline, clock)
    guarded.guard.attach(BUS, lambda: wire.tx)
    return guarded


def test_an_allow_listed_frame_arrives_with_counter_and_crc(g, wire, clock):
    encoder = g.guard.encoder("GW_SpeedLimit")
    frames = RefFrames()
    for _ in range(18):  # the 4-bit counter wraps
        clock.advance(0.1)
        frame = encoder.encode({"GW_SpeedLimitRequest": 45, "GW_TorqueLimitRequest": 100})
        assert g.guard.send(BUS, frame) is True
    got = wire.received()
    assert len(got) == 18
    for i, f in enumerate(got):
        assert (f.arbitration_id, f.is_extended_id, f.dlc) == (SPEED_LIMIT_ID, False, 8)
        assert f.data[7] == crc8(bytes(f.data[:7]))
        assert f.data[6] & 0x0F == i % 16
        values = frames.decode("GW_SpeedLimit", bytes(f.data))
        assert values["GW_SpeedLimitRequest"] == 45 and values["GW_TorqueLimitRequest"] == 100
    assert g.count("tx.vehicle.sent") == 18
    assert g.pipeline.counters.snapshot("tx.blocked") == {}


def test_a_checksum_only_message_gets_its_crc(g, wire):
    encoder = g.guard.encoder("GW_BodyCommand")
    assert g.guard.send(BUS, encoder.encode({"GW_LockRequest": 1, "GW_CommandSeq": 5}))
    [f] = wire.received()
    assert f.data[7] == crc8(bytes(f.data[:7]))
    values = RefFrames().decode("GW_BodyCommand", bytes(f.data))
    assert (values["GW_LockRequest"], values["GW_CommandSeq"]) == (1, 5)


def _speed_limit(length: int = 8) -> bytes:
    return RefFrames().payload("GW_SpeedLimit", {"GW_SpeedLimitRequest": 45})[:length]


@pytest.mark.parametrize(
    ("frame", "reason", "ident"),
    [
        (can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False), "not_allowed",
         "0x123"),
        (can.Message(arbitration_id=0x200, data=bytes(8), is_extended_id=False), "not_allowed",
         "0x200"),
        (can.Message(arbitration_id=SPEED_LIMIT_ID, data=_speed_limit(7), is_extended_id=False),
         "wrong_dlc", "0x210"),
        (can.Message(arbitration_id=SPEED_LIMIT_ID, data=_speed_limit(), is_extended_id=True),
         "not_allowed", "0x00000210"),
        (can.Message(arbitration_id=SPEED_LIMIT_ID, data=_speed_limit(), is_extended_id=False,
                     is_error_frame=True), "not_allowed", "0x210"),
        (can.Message(arbitration_id=SPEED_LIMIT_ID, is_extended_id=False, is_remote_frame=True,
                     dlc=8), "not_allowed", "0x210"),
    ],
    ids=["unlisted-id", "dbc-message-not-listed", "wrong-dlc", "extended-twin", "error-frame",
         "remote-frame"],
)
def test_frames_outside_the_allow_list_are_blocked(g, wire, caplog, frame, reason, ident):
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert g.guard.send(BUS, frame) is False
        assert g.guard.send(BUS, frame) is False
    assert wire.received() == []
    assert g.count(f"tx.blocked.{reason}") == 2
    assert g.count("tx.vehicle.blocked") == 2
    assert g.count("tx.vehicle.sent") == 0
    alert = g.log.get("tx.blocked")
    assert alert is not None and alert.severity is Severity.WARNING
    assert (alert.value, alert.limit) == (ident, reason)
    assert g.log.of("tx.blocked") == ["raised"]
    lines = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert len(lines) == 1 and ident in lines[0]  # rate-limited: one line, not one per frame


def test_the_blocked_alert_clears_a_minute_after_the_last_block(g, clock):
    g.guard.evaluate(clock.time())  # nothing blocked yet: nothing to clear
    stray = can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False)
    g.guard.send(BUS, stray)
    clock.advance(30.0)
    g.guard.send(BUS, stray)  # the hold restarts from here
    last = clock.time()
    clock.advance(BLOCK_ALERT_HOLD - 1.0)
    g.guard.evaluate(clock.time())
    assert g.log.get("tx.blocked") is not None
    clock.advance(1.0)
    g.guard.evaluate(clock.time())
    assert g.log.get("tx.blocked") is None
    assert clock.time() - last == BLOCK_ALERT_HOLD
    g.guard.evaluate(clock.time() + 100)
    assert g.log.of("tx.blocked") == ["raised", "cleared"]
    g.guard.send(BUS, stray)  # a new block raises it again
    assert g.log.of("tx.blocked") == ["raised", "cleared", "raised"]


def test_the_rate_limit_allows_a_burst_then_refills(g, wire, clock):
    encoder = g.guard.encoder("GW_BodyCommand")  # max_rate_hz = 10, burst = 3

    def attempts(n: int) -> list[bool]:
        return [g.guard.send(BUS, encoder.encode({"GW_CommandSeq": 1})) for _ in range(n)]

    assert attempts(4) == [True, True, True, False]
    assert g.count("tx.blocked.rate_limited") == 1
    clock.advance(0.1)  # one token
    assert attempts(2) == [True, False]
    clock.advance(60.0)  # refills to the burst size, no further
    assert attempts(4) == [True, True, True, False]
    assert len(wire.received()) == 7
    assert g.count("tx.vehicle.sent") == 7
    assert g.count("tx.blocked.rate_limited") == 3


def test_a_cyclic_message_may_go_at_twice_its_cycle_rate(g, wire, clock):
    encoder = g.guard.encoder("GW_SpeedLimit")  # 100 ms cycle: 20 per second, burst 2
    frame = encoder.encode({"GW_SpeedLimitRequest": 20})
    assert [g.guard.send(BUS, frame) for _ in range(3)] == [True, True, False]
    clock.advance(0.05)
    assert [g.guard.send(BUS, frame) for _ in range(2)] == [True, False]
    assert len(wire.received()) == 3


def test_a_closed_bus_counts_not_open(ref_pipeline, clock, wire):
    g = make_guard(ref_pipeline, clock)
    frame = g.guard.encoder("GW_SpeedLimit").encode({"GW_SpeedLimitRequest": 20})
    assert g.guard.send(BUS, frame) is False  # nothing attached yet
    g.guard.attach(BUS, lambda: None)  # attached, but the source has no open bus
    assert g.guard.send(BUS, frame) is False
    assert g.count("tx.vehicle.not_open") == 2
    assert g.pipeline.counters.snapshot("tx.blocked") == {}
    # Attempts on a closed bus use no tokens: the full burst is there once it opens.
    g.guard.attach(BUS, lambda: wire.tx)
    assert [g.guard.send(BUS, frame) for _ in range(2)] == [True, True]
    assert len(wire.received()) == 2


def test_a_send_error_counts_send_failed(g, wire, caplog):
    wire.tx.shutdown()
    frame = g.guard.encoder("GW_SpeedLimit").encode({"GW_SpeedLimitRequest": 20})
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert g.guard.send(BUS, frame) is False
    assert g.count("tx.vehicle.send_failed") == 1
    assert g.count("tx.vehicle.sent") == 0
    assert any("send of GW_SpeedLimit failed" in r.getMessage() for r in caplog.records)
    assert wire.received() == []


def test_encoders_only_for_allow_listed_messages(g):
    assert g.guard.allowed(BUS, "GW_SpeedLimit")
    assert not g.guard.allowed(BUS, "MCU_Drive")
    assert not g.guard.allowed("other", "GW_SpeedLimit")
    with pytest.raises(KeyError, match="MCU_Drive"):
        g.guard.encoder("MCU_Drive")
    with pytest.raises(KeyError):
        g.guard.encoder("GW_SpeedLimit", bus="other")


def test_send_periods_come_from_the_profile_or_the_dbc(g, tmp_path, clock):
    assert g.guard.cycle_s("GW_SpeedLimit") == 0.1
    assert g.guard.cycle_s("GW_BodyCommand", BUS) is None  # event message
    # A profile's cycle_ms gives an event message a period and so a default rate limit.
    guard, _ = _guard_for(tmp_path, """
[messages.GW_BodyCommand]
cycle_ms = 50

[[transmit]]
message = "GW_BodyCommand"
""", clock)
    assert guard.cycle_s("GW_BodyCommand") == 0.05
    assert guard.allow_list() == ["vehicle GW_BodyCommand [8 B] at most 40/s, burst 2"]


def test_allow_list_lines(g):
    lines = g.guard.allow_list()
    assert len(lines) == 3
    assert "vehicle GW_SpeedLimit [8 B] at most 20/s, burst 2" in lines
    assert "vehicle GW_BodyCommand [8 B] at most 10/s, burst 3" in lines


def test_a_guard_without_an_alert_book_still_blocks_and_counts(ref_pipeline, clock):
    guard = TransmitGuard(ref_pipeline.profile, ref_pipeline.plans, clock,
                          ref_pipeline.counters, ref_pipeline.rlog)
    stray = can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False)
    assert guard.send(BUS, stray) is False
    assert ref_pipeline.counters.get("tx.blocked.not_allowed") == 1
    clock.advance(BLOCK_ALERT_HOLD)
    guard.evaluate(clock.time())  # the hold expires without a book to clear


# ---- profile variants -------------------------------------------------------------------


def _guard_for(tmp_path, body: str, clock: ManualClock) -> tuple[TransmitGuard, Pipeline]:
    pipeline = Pipeline.build(load_profile(write_profile(tmp_path, body)), clock)
    return TransmitGuard(pipeline.profile, pipeline.plans, clock, pipeline.counters,
                         pipeline.rlog, pipeline.alerts), pipeline


def test_a_message_without_a_receive_spec_is_sent_as_given(tmp_path, clock, wire):
    guard, _ = _guard_for(tmp_path, """
[[transmit]]
message = "GW_ChargeControl"
bus = "vehicle"
""", clock)
    guard.attach(BUS, lambda: wire.tx)
    frame = guard.encoder("GW_ChargeControl", BUS).encode({"GW_ChargeLimitSoc": 80})
    assert guard.send(BUS, frame)
    [f] = wire.received()
    assert f.data[0] == 80 and bytes(f.data[1:]) == bytes(7)  # no counter, no checksum


def test_a_counter_without_a_checksum(tmp_path, clock):
    guard, _ = _guard_for(tmp_path, """
[messages.GW_SpeedLimit]
counter = "GW_SpeedLimit_Counter"

[[transmit]]
message = "GW_SpeedLimit"
""", clock)
    encoder = guard.encoder("GW_SpeedLimit")
    frames = [encoder.encode({"GW_SpeedLimitRequest": 30}) for _ in range(3)]
    assert [f.data[6] & 0x0F for f in frames] == [0, 1, 2]
    assert {f.data[7] for f in frames} == {0}


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('[[transmit]]\nmessage = "GW_Nope"\n', "transmit.message", "no message 'GW_Nope'"),
        ('[[transmit]]\nmessage = "GW_BodyCommand"\n', "transmit.max_rate_hz",
         "no cycle time"),
    ],
    ids=["not-in-dbc", "event-without-rate"],
)
def test_allow_list_config_errors(tmp_path, clock, body, key, words):
    path = write_profile(tmp_path, "\n" + body)
    profile = load_profile(path)
    pipeline = Pipeline.build(profile, clock)
    with pytest.raises(ConfigError) as info:
        TransmitGuard(profile, pipeline.plans, clock, pipeline.counters, pipeline.rlog)
    err = info.value
    assert (err.file, err.key) == (str(path), key)
    assert err.line == path.read_text().splitlines().index("[[transmit]]") + 1
    assert words in str(err)


def test_a_counter_signal_the_dbc_lacks(tmp_path, clock):
    guard, _ = _guard_for(tmp_path, """
[messages.GW_SpeedLimit]
counter = "GW_SpeedLimit_Cnt"

[[transmit]]
message = "GW_SpeedLimit"
""", clock)
    with pytest.raises(ConfigError) as info:
        guard.encoder("GW_SpeedLimit")
    assert info.value.key == "messages.GW_SpeedLimit.counter"
    assert "GW_SpeedLimit_Cnt" in str(info.value)
