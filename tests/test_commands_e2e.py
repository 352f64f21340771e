"""End to end: signed lock, unlock and locate reach the simulated body controller.

The simulated car, a real mosquitto and the gateway run together (see
tests/command_rig.py); a separate listener on the CAN bus counts the
GW_BodyCommand frames, so "acts once" is checked on the wire, not in a log.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest

from gateway.commands import envelope as env
from gateway.commands.service import UNSTORED_ANSWER_RATE
from hil.broker import Mosquitto
from tests.command_rig import BODY_COMMAND, LOCK_PATHS, WAIT_S, CommandRig, eventually

NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@pytest.fixture
async def rig(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[CommandRig]:
    """The reference car parked, with the gateway running."""
    async with CommandRig(broker, tmp_path) as r:
        yield r


def statuses(results: list[env.Result]) -> list[tuple[str, str | None]]:
    """(status, reason) of each result, in arrival order."""
    return [(r.status, r.reason) for r in results]


async def test_unlock_lock_and_locate_act_once_each(rig: CommandRig) -> None:
    owner = env.key_id(rig.keys["owner"].public_key())
    await rig.until_motion()
    cases: list[tuple[str, list[int], int]] = [("unlock", [0, 0, 0], 2), ("lock", [1, 1, 1], 1)]
    for cmd, locks, request in cases:
        before = len(rig.sent(BODY_COMMAND))
        sent = await rig.send(cmd)
        results = await rig.results(sent)
        assert statuses(results) == [("accepted", None), ("succeeded", None)]
        final = results[-1]
        assert (final.vehicle, final.id, final.cmd, final.key) == ("car-1", sent.id, cmd, owner)
        assert final.kid == env.key_id(rig.gateway_key)
        assert final.detail == {"attempts": 1}
        assert rig.model.locks == locks
        assert [rig.gateway.slot(p).reading() for p in LOCK_PATHS] == [(locks[0] == 1, True)] * 2
        frames = rig.sent(BODY_COMMAND)[before:]
        assert len(frames) == 1
        assert rig.decode(frames[0])["GW_LockRequest"] == request
    sent = await rig.send("locate", {"mode": "horn"})
    assert statuses(await rig.results(sent)) == [("accepted", None), ("succeeded", None)]
    assert rig.model.locate_requests == [2]
    decoded = [rig.decode(f) for f in rig.sent(BODY_COMMAND)]
    assert decoded[-1]["GW_LocateRequest"] == 2
    # One past the BCM's last acknowledgement each time (the model starts at 0).
    assert [d["GW_CommandSeq"] for d in decoded] == [1, 2, 3]
    assert rig.gateway.counter("commands.succeeded") == 3


async def test_unconfirmed_command_is_sent_twice_then_times_out(rig: CommandRig) -> None:
    rig.ecus.ignore_body_commands = True
    sent = await rig.send("lock")
    results = await rig.results(sent)
    assert statuses(results) == [("accepted", None), ("failed", "timeout")]
    assert results[-1].detail == {"attempts": 2}
    frames = rig.sent(BODY_COMMAND)
    assert len(frames) == 2
    seqs = {rig.decode(f)["GW_CommandSeq"] for f in frames}
    assert len(seqs) == 1  # the retry repeats the sequence: a slow BCM cannot act twice
    assert rig.model.cmd_ack_seq not in seqs


async def test_same_envelope_twice_acts_once_and_gets_the_same_bytes(rig: CommandRig) -> None:
    sent = rig.sign("lock")
    await rig.publish(sent)
    await rig.publish(sent)  # while the first is still running
    await rig.results(sent)
    await eventually(lambda: len(rig.answers(sent)) == 3, "three answers")
    payloads = [r.payload for r in rig.answers(sent)]
    # The copy is whichever result was stored when it came: the same signed bytes.
    by_status = {rig.verified(p).status: p for p in payloads}
    assert sorted(by_status) == ["accepted", "succeeded"]
    assert payloads[0] == by_status["accepted"]
    await rig.publish(sent)  # after it finished: the stored final result, byte for byte
    await eventually(lambda: len(rig.answers(sent)) == 4, "a fourth answer")
    assert rig.answers(sent)[3].payload == by_status["succeeded"]
    assert len(rig.sent(BODY_COMMAND)) == 1
    assert rig.gateway.counter("commands.duplicate") == 2


async def test_mqtt5_response_topic_gets_results_with_correlation(rig: CommandRig) -> None:
    sent = await rig.send("lock", response_topic=rig.response_topic, correlation=b"\x00corr-7")
    await rig.results(sent)
    results = await rig.results(sent, topic=rig.response_topic)
    assert [r.status for r in results] == ["accepted", "succeeded"]
    replies = rig.on(rig.response_topic)
    assert [r.correlation for r in replies] == [b"\x00corr-7"] * 2
    # The same signed bytes as on cmd/res/{id}.
    assert [r.payload for r in replies] == [r.payload for r in rig.answers(sent)]


async def test_mqtt311_client_gets_the_result_on_its_id_topic(rig: CommandRig) -> None:
    command_id = env.new_command_id()
    topic = rig.topics.command_result(command_id)
    async with aiomqtt.Client(rig.broker.host, rig.broker.port, socket_options=NODELAY,
                              protocol=aiomqtt.ProtocolVersion.V311) as old:
        await old.subscribe(topic, qos=1)
        await rig.send("lock", command_id=command_id)
        got = []
        async with asyncio.timeout(WAIT_S):
            async for m in old.messages:
                assert str(m.topic) == topic
                assert isinstance(m.payload, bytes)
                got.append(rig.verified(m.payload))
                if got[-1].final:
                    break
    assert statuses(got) == [("accepted", None), ("succeeded", None)]


async def test_response_topic_of_another_vehicle_is_not_used(rig: CommandRig) -> None:
    foreign = "evgw/v1/car-2/cmd/res/mine"
    await rig.subscribe("evgw/v1/car-2/#")
    sent = await rig.send("lock", response_topic=foreign)
    assert statuses(await rig.results(sent)) == [("accepted", None), ("succeeded", None)]
    assert rig.gateway.counter("commands.bad_response_topic") == 2
    # A later command's answer arrives after anything the first could have sent there.
    later = await rig.send("locate", key="fleet")
    await rig.results(later)
    assert rig.on(foreign) == []


async def test_key_over_its_burst_is_rate_limited(rig: CommandRig) -> None:
    burst = rig.settings.commands.burst
    sent = [await rig.send("reset-latches", key="service") for _ in range(burst + 2)]
    reasons = [(await rig.final(s)).reason for s in sent]
    assert reasons == [None] * burst + ["rate_limited"] * 2
    assert rig.gateway.counter("commands.rejected.rate_limited") == 2
    # A retransmission takes no token: it still gets its stored result.
    await rig.publish(sent[0])
    results = await rig.results(sent[0], count=2)
    assert [r.status for r in results if r.final] == ["succeeded", "succeeded"]
    # The limit is per key: the owner is not held back by the service key's burst.
    lock = await rig.send("lock")
    assert (await rig.final(lock)).status == "succeeded"
    assert len(rig.sent(BODY_COMMAND)) == 1


async def test_rate_limited_envelope_never_runs_later(broker: Mosquitto, tmp_path: Path
                                                     ) -> None:
    rig = CommandRig(broker, tmp_path)
    # One command, then a token a minute: only a restart refills the bucket in time.
    rig.settings = replace(rig.settings, commands=replace(
        rig.settings.commands, burst=1, rate_per_minute=1.0))
    async with rig:
        await rig.until_motion()
        assert (await rig.final(await rig.send("lock"))).status == "succeeded"
        unlock = await rig.send("unlock")
        await rig.refused(unlock, "rate_limited")
        stored = rig.answers(unlock)[0].payload
        await rig.restart()  # a full bucket again, and the answer read back from disk
        await rig.until_motion()  # so that, were it run, this unlock would go through
        await rig.publish(unlock)
        await eventually(lambda: len(rig.answers(unlock)) == 2, "the stored answer")
        assert rig.answers(unlock)[1].payload == stored
        assert len(rig.sent(BODY_COMMAND)) == 1
        assert rig.model.locks == [1, 1, 1]
        assert rig.gateway.counter("commands.duplicate") == 1
        # A new unlock goes through: the bucket had refilled.
        assert (await rig.final(await rig.send("unlock"))).status == "succeeded"
        assert rig.model.locks == [0, 0, 0]


async def test_resent_envelope_is_answered_within_a_budget(rig: CommandRig) -> None:
    sent = await rig.send("lock")
    await rig.final(sent)
    stored = rig.answers(sent)[-1].payload
    started = time.monotonic()
    await asyncio.gather(*(rig.publish(sent) for _ in range(20)))
    await eventually(lambda: rig.gateway.counter("commands.duplicate") == 20, "20 duplicates")
    elapsed = time.monotonic() - started
    suppressed = rig.gateway.counter("commands.answers_suppressed")
    assert suppressed > 0
    answered = 20 - suppressed
    await eventually(lambda: len(rig.answers(sent)) == 2 + answered, f"{answered} answers")
    # A burst of 5, then 5 a second for as long as the re-sends took at most.
    assert UNSTORED_ANSWER_RATE <= answered <= UNSTORED_ANSWER_RATE * (1 + elapsed), elapsed
    assert {r.payload for r in rig.answers(sent)[2:]} == {stored}
    assert len(rig.sent(BODY_COMMAND)) == 1


async def test_authenticated_commands_are_audited(rig: CommandRig) -> None:
    forged = await rig.send("lock", signer=rig.stranger,
                            kid=env.key_id(rig.keys["owner"].public_key()))
    await rig.refused(forged, "bad_signature")
    denied = await rig.send("charge-limit", {"soc": 80}, key="driver")
    await rig.refused(denied, "role_not_allowed")
    lock = await rig.send("lock")
    await rig.final(lock)
    reuse = await rig.send("locate", key="fleet", command_id=lock.id)
    await rig.results(reuse, count=2)
    await eventually(lambda: len(rig.events("command")) >= 3, "three audit events")
    # Events leave in order, so anything for the forged command would be here by now.
    audit = [e["data"] for e in rig.events("command")]
    assert [(a["id"], a["cmd"], a["role"], a["status"], a["reason"]) for a in audit] == [
        (denied.id, "charge-limit", "driver", "rejected", "role_not_allowed"),
        (lock.id, "lock", "owner", "succeeded", None),
        (lock.id, "locate", "fleet", "rejected", "replayed")]
    assert audit[1]["key"] == env.key_id(rig.keys["owner"].public_key())
    assert audit[1]["name"] == "owner"
    raw = rig.on(rig.topics.events)
    assert all(json.loads(r.payload)["vehicle"] == "car-1" for r in raw)
