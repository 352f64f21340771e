"""End to end: every refusal answers with its own reason code and puts nothing on CAN.

Each test runs the simulated car, a real mosquitto and the gateway (see
tests/command_rig.py). A refusal must be the only answer (no ``accepted``
before it), carry the exact reason, and leave the bus without a single
GW_BodyCommand frame; for unlock, the car must also stay locked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.commands import envelope as env
from gateway.commands.keys import key_entry
from gateway.safety.verdicts import Motion
from hil.broker import Mosquitto
from tests.command_rig import BODY_COMMAND, CHARGE_CONTROL, SPEED, VEHICLE, CommandRig, Sent
from tests.mqtt_helpers import retained

LOCKED = [1, 1, 1]


@pytest.fixture
async def rig(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[CommandRig]:
    """The reference car parked, with the gateway running."""
    async with CommandRig(broker, tmp_path) as r:
        yield r


def now_ms() -> int:
    """Epoch milliseconds, as a phone stamps a command."""
    return int(time.time() * 1000)


async def test_signature_of_another_key_under_the_owner_kid(rig: CommandRig) -> None:
    owner_kid = env.key_id(rig.keys["owner"].public_key())
    sent = await rig.send("unlock", signer=rig.stranger, kid=owner_kid)
    result = await rig.refused(sent, "bad_signature")
    assert result.key is None  # never authenticated: the answer names no key
    assert rig.model.locks == LOCKED
    assert rig.gateway.counter("commands.rejected.bad_signature") == 1


@pytest.mark.parametrize("part", ["sig", "body"])
async def test_one_changed_byte_breaks_the_signature(rig: CommandRig, part: str) -> None:
    good = rig.sign("unlock")
    signed = env.unwrap(good.payload)
    if part == "sig":
        sig = bytearray(signed.sig)
        sig[17] ^= 0x01
        payload = env.wrap(signed.body, bytes(sig))
    else:
        # Still a well-formed command, now aimed at another car: the owner's signature
        # over the original bytes must not carry over.
        body = signed.body.replace(f'"{VEHICLE}"'.encode(), b'"car-2"')
        assert body != signed.body
        payload = env.wrap(body, signed.sig)
    await rig.refused(await rig.publish(Sent(good.id, payload)), "bad_signature")
    assert rig.model.locks == LOCKED


async def test_command_for_another_vehicle(rig: CommandRig) -> None:
    sent = await rig.send("unlock", vehicle="car-2")
    result = await rig.refused(sent, "wrong_vehicle")
    assert result.detail == {"vehicle": "car-2"}
    assert result.key == env.key_id(rig.keys["owner"].public_key()), "signature verified"
    assert rig.model.locks == LOCKED


async def test_expired_command(rig: CommandRig) -> None:
    now = now_ms()
    sent = await rig.send("unlock", issued_at_ms=now - 120_000, expires_at_ms=now - 90_000)
    await rig.refused(sent, "expired", status="expired")
    assert rig.model.locks == LOCKED


async def test_issued_in_the_future(rig: CommandRig) -> None:
    now = now_ms()
    sent = await rig.send("unlock", issued_at_ms=now + 60_000, expires_at_ms=now + 90_000)
    result = await rig.refused(sent, "issued_in_future")
    assert result.detail == {"skew_s": 10.0}


async def test_lifetime_longer_than_allowed(rig: CommandRig) -> None:
    now = now_ms()
    sent = await rig.send("unlock", issued_at_ms=now, expires_at_ms=now + 200_000)
    result = await rig.refused(sent, "bad_validity")
    assert result.detail == {"max_lifetime_s": 120.0}


async def test_unknown_key(rig: CommandRig) -> None:
    sent = await rig.send("unlock", signer=rig.stranger)
    result = await rig.refused(sent, "unknown_key")
    assert result.detail == {"kid": env.key_id(rig.stranger.public_key())}
    assert rig.model.locks == LOCKED


async def test_role_not_allowed(rig: CommandRig) -> None:
    sent = await rig.send("charge-limit", {"soc": 80}, key="driver")
    result = await rig.refused(sent, "role_not_allowed")
    assert result.detail == {"role": "driver"}
    assert result.key == env.key_id(rig.keys["driver"].public_key())
    assert rig.sent(CHARGE_CONTROL) == []
    assert rig.model.charge_limit == 100


async def test_reused_id_with_another_envelope_is_replayed(rig: CommandRig) -> None:
    first = await rig.send("lock")
    assert (await rig.final(first)).status == "succeeded"
    assert len(rig.sent(BODY_COMMAND)) == 1
    await rig.until_motion()
    again = await rig.send("unlock", command_id=first.id)
    results = await rig.results(again.id, count=2)
    assert [(r.status, r.reason) for r in results] == [
        ("accepted", None), ("succeeded", None), ("rejected", "replayed")]
    assert len(rig.sent(BODY_COMMAND)) == 1
    assert rig.model.locks == LOCKED


async def test_retained_command_is_refused_and_cleared(rig: CommandRig, broker: Mosquitto
                                                       ) -> None:
    sent = await rig.send("unlock", retain=True)
    await rig.refused(sent, "retained")
    assert rig.model.locks == LOCKED
    # The gateway cleared it before answering: a later subscriber finds nothing to run.
    assert await retained(broker.host, broker.port, rig.topics.command_request) == {}


async def test_malformed_json_is_answered_on_the_response_topic(rig: CommandRig) -> None:
    await rig.publish(b"{not json", response_topic=rig.response_topic, correlation=b"c-1")
    [reply] = await rig.replies_on(rig.response_topic)
    result = rig.verified(reply.payload)
    assert (result.id, result.status, result.reason) == (None, "rejected", "malformed")
    assert reply.correlation == b"c-1"
    assert rig.sent(BODY_COMMAND) == []
    assert rig.gateway.counter("commands.rejected.malformed") == 1


async def test_unlock_while_driving(broker: Mosquitto, tmp_path: Path) -> None:
    async with CommandRig(broker, tmp_path, mode="drive") as rig:
        await rig.until_motion(Motion.MOVING, "moving")
        sent = await rig.send("unlock")
        result = await rig.refused(sent, "vehicle_moving")
        assert result.detail == {"motion": ["moving"]}
        assert rig.model.locks == LOCKED


async def test_unlock_while_speed_is_stale(rig: CommandRig) -> None:
    await rig.until_motion()
    rig.ecus.silenced.add("MCU")
    await rig.until_stale(SPEED)
    sent = await rig.send("unlock")
    result = await rig.refused(sent, "motion_unknown")
    assert result.detail is not None and "speed_unavailable" in result.detail["motion"]
    assert rig.model.locks == LOCKED


async def test_body_controller_silent(rig: CommandRig) -> None:
    rig.ecus.silenced.add("BCM")
    await rig.until_stale("Vehicle.Body.CommandAckSeq")
    sent = await rig.send("lock")
    result = await rig.refused(sent, "controller_unavailable")
    assert result.detail == {"signal": "Vehicle.Body.CommandAckSeq"}


async def test_key_removed_while_running_is_unknown(rig: CommandRig) -> None:
    sent = await rig.send("locate", key="driver")
    assert (await rig.final(sent)).status == "succeeded"
    kept = "".join(key_entry(role, role, k.public_key())
                   for role, k in rig.keys.items() if role != "driver")
    rig.keys_file.write_text(kept)  # as `ev-gateway keys remove` would, no restart
    sent = await rig.send("lock", key="driver")
    results = await rig.results(sent.id)
    assert [(r.status, r.reason) for r in results] == [("rejected", "unknown_key")]
    assert len(rig.sent(BODY_COMMAND)) == 1  # the locate before the removal
