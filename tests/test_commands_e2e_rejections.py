"""End to end: every refusal answers with its own reason code and puts nothing on CAN.

Each test runs the simulated car, a real mosquitto and the gateway (see
tests/command_rig.py). A refusal must be the only answer (no ``accepted``
before it), carry the exact reason, and leave the bus without a single
GW_BodyCommand frame; for unlock, the car must also stay locked.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.commands import envelope as env
from gateway.commands.keys import generate_private_key, key_entry
from gateway.safety.verdicts import Motion
from hil.broker import Mosquitto
from tests.command_rig import (
    BODY_COMMAND,
    CHARGE_CONTROL,
    SPEED,
    VEHICLE,
    CommandRig,
    Sent,
    eventually,
)
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
    owner = env.key_id(rig.keys["owner"].public_key())
    assert result.key == owner, "signature verified"
    assert rig.model.locks == LOCKED
    await eventually(lambda: rig.events("command") != [], "the audit event")
    [audit] = [e["data"] for e in rig.events("command")]
    assert (audit["id"], audit["key"], audit["reason"]) == (sent.id, owner, "wrong_vehicle")


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
    results = await rig.results(again, count=2)
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
    sent = await rig.publish(b"{not json", correlation=b"c-1")
    result = await rig.refused(sent, "malformed")
    assert result.id is None
    assert [r.correlation for r in rig.on(rig.response_topic)] == [b"c-1"]
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
    await rig.refused(sent, "unknown_key")
    assert len(rig.sent(BODY_COMMAND)) == 1  # the locate before the removal


async def test_forged_copy_cannot_answer_for_the_real_command(rig: CommandRig) -> None:
    forger = "forger/res"
    await rig.subscribe(forger)
    real = rig.sign("lock")
    # Anyone on the broker can copy a command off cmd/req and send it on first, with the
    # same id and a signature of their own: its refusal must not pass for the real result.
    forged = await rig.publish(Sent(real.id, env.wrap(env.unwrap(real.payload).body,
                                                      bytes(64))), response_topic=forger)
    [answer] = await rig.results(forged, topic=forger)
    assert (answer.status, answer.reason, answer.key) == ("rejected", "bad_signature", None)
    assert answer.req == forged.req != real.req
    assert rig.answers(real) == []
    await rig.publish(real)
    results = await rig.results(real)
    assert [(r.status, r.reason, r.req) for r in results] == [
        ("accepted", None, real.req), ("succeeded", None, real.req)]
    # The response topic is a second delivery of the same results: it may trail cmd/res.
    await eventually(lambda: len(rig.responses(real)) >= len(rig.answers(real)),
                     "both results on the response topic")
    assert [r.payload for r in rig.responses(real)] == [r.payload for r in rig.answers(real)]
    assert rig.responses(forged) == []
    assert len(rig.on(forger)) == 1
    assert len(rig.sent(BODY_COMMAND)) == 1


async def test_oversized_message_is_dropped_unanswered(rig: CommandRig) -> None:
    good = rig.sign("lock")
    # A valid envelope padded with JSON whitespace: were it read, it would lock the car.
    big = await rig.publish(Sent(good.id, good.payload + b" " * (5000 - len(good.payload))))
    await eventually(lambda: rig.gateway.counter("commands.rejected.too_large") == 1,
                     "the oversized message dropped")
    lock = await rig.send("lock")
    assert (await rig.final(lock)).status == "succeeded"
    # Answers leave in order: one for the big message would have come before these.
    assert rig.responses(big) == []
    assert rig.answers(big) == []
    assert len(rig.sent(BODY_COMMAND)) == 1


async def test_arguments_of_the_wrong_type_do_not_stop_the_service(rig: CommandRig) -> None:
    modes: list[object] = [[], 5]  # a list cannot be hashed, a number is no mode name
    for mode in modes:
        sent = await rig.send("locate", {"mode": mode})
        result = await rig.refused(sent, "bad_arguments")
        assert result.detail is not None and "horn" in result.detail["error"]
    lock = await rig.send("lock")
    assert (await rig.final(lock)).status == "succeeded"
    assert rig.gateway.counter("commands.internal_error") == 0


async def test_rewrapped_copy_sent_first_leaves_the_real_sender_its_answer(rig: CommandRig
                                                                          ) -> None:
    real = rig.sign("lock")
    # Same body and signature, one more space: authentic, the same request as the real one.
    rewrapped = Sent(real.id, b" " + real.payload)
    assert rewrapped.payload != real.payload and rewrapped.req == real.req
    copy = await rig.publish(rewrapped, response_topic=False)
    final = await rig.final(copy)
    assert final.status == "succeeded"
    stored = rig.answers(copy)[-1].payload
    await rig.publish(real)
    await eventually(lambda: rig.responses(real) != [], "the answer to the real bytes")
    # The real sender gets the stored result, and it names the real sender's own request,
    # so a client that insists on its req (as `ev-gateway command` does) believes it.
    [reply] = rig.responses(real)
    assert reply.payload == stored
    answer = rig.verified(reply.payload)
    assert (answer.id, answer.status, answer.req) == (real.id, "succeeded", real.req)
    assert len(rig.sent(BODY_COMMAND)) == 1  # the copy ran the lock; the real bytes did not
    assert rig.gateway.counter("commands.duplicate") == 1


async def test_key_past_its_not_after_is_refused_while_a_current_one_works(
        rig: CommandRig, tmp_path: Path) -> None:
    # Two car-sharing bookings, both driver keys: one ended an hour ago, one runs on.
    now = datetime.datetime.now(datetime.UTC)
    ended = generate_private_key(tmp_path / "ended.key")
    current = generate_private_key(tmp_path / "current.key")
    with rig.keys_file.open("a") as keys:  # as `ev-gateway keys add --not-after` would
        keys.write(key_entry("booking-ended", "driver", ended.public_key(),
                             not_after=now - datetime.timedelta(hours=1)))
        keys.write(key_entry("booking-current", "driver", current.public_key(),
                             not_after=now + datetime.timedelta(hours=1)))
    await rig.until_motion()  # so that nothing but the key's end can refuse the unlock
    sent = await rig.send("unlock", signer=ended)
    result = await rig.refused(sent, "key_expired")
    assert (result.key, result.detail) == (env.key_id(ended.public_key()), None)
    assert rig.model.locks == LOCKED
    assert rig.gateway.counter("commands.rejected.key_expired") == 1
    ok = await rig.send("unlock", signer=current)
    assert (await rig.final(ok)).status == "succeeded"
    assert rig.model.locks == [0, 0, 0]
    assert len(rig.sent(BODY_COMMAND)) == 1
    await eventually(lambda: len(rig.events("command")) == 2, "two audit events")
    audit = {e["data"]["name"]: e["data"]["reason"] for e in rig.events("command")}
    assert audit == {"booking-ended": "key_expired", "booking-current": None}
