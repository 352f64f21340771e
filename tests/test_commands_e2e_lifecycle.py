"""End to end: commands across gateway restarts, and interlocks checked again mid-command.

The broker and the simulated car keep running while the gateway stops and
starts on the same state directory, as after a crash or an update. Where a
command must still be running at a given moment, the profile's timeout is
raised for that test, so the moment is not a race.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.commands import envelope as env
from gateway.config import Profile, load_profile
from gateway.safety.verdicts import Motion
from hil.broker import Mosquitto
from tests.command_rig import BODY_COMMAND, CommandRig, Sent, eventually
from tests.conftest import REF_PROFILE
from tests.mqtt_helpers import retained

LONG_TIMEOUT_S = 30.0
"""Longer than any test here: a lock given it is still waiting when the gateway stops."""
RETRY_AFTER_S = 3.0
"""Time for the car to start moving between an unlock's first frame and its retry."""


@pytest.fixture
async def rig(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[CommandRig]:
    """The reference car parked, with the gateway running."""
    async with CommandRig(broker, tmp_path) as r:
        yield r


def slow_to_confirm(command: str, timeout_s: float) -> Profile:
    """The reference profile with ``command`` waiting ``timeout_s`` for confirmation."""
    profile = load_profile(REF_PROFILE)
    pulses = {name: replace(spec, timeout_s=timeout_s) if name == command else spec
              for name, spec in profile.commands.pulses.items()}
    return replace(profile, commands=replace(profile.commands, pulses=pulses))


def slow_speed_profile(timeout_s: float) -> Profile:
    """The reference profile with speed-profile waiting ``timeout_s`` for the MCU."""
    profile = load_profile(REF_PROFILE)
    return replace(profile, commands=replace(profile.commands,
                                             speed_profile_timeout_s=timeout_s))


def statuses(results: list[env.Result]) -> list[tuple[str, str | None]]:
    """(status, reason) of each result, in arrival order."""
    return [(r.status, r.reason) for r in results]


async def test_replay_cache_survives_a_restart(rig: CommandRig) -> None:
    first = await rig.send("lock")
    assert (await rig.final(first)).status == "succeeded"
    stored = rig.answers(first)[-1].payload
    await rig.restart()
    reuse = await rig.send("unlock", command_id=first.id)
    assert statuses(await rig.results(reuse, count=2))[-1] == ("rejected", "replayed")
    await rig.publish(first)  # the very same envelope: the first run's result, verbatim
    await rig.results(first, count=3)
    assert rig.answers(first)[-1].payload == stored
    assert len(rig.sent(BODY_COMMAND)) == 1
    assert rig.model.locks == [1, 1, 1]


async def test_lost_replay_cache_refuses_commands_issued_before_it(rig: CommandRig) -> None:
    first = await rig.send("lock")
    assert (await rig.final(first)).status == "succeeded"
    await rig.stop_gateway()
    for path in rig.settings.state_dir.glob("commands.sqlite*"):
        path.unlink()
    await rig.start_gateway()
    await rig.publish(first)  # still within its lifetime, but the new cache never saw it
    results = await rig.results(first, count=2)
    assert statuses(results)[-1] == ("rejected", "predates_replay_cache")
    assert len(rig.sent(BODY_COMMAND)) == 1


async def test_command_retained_while_the_gateway_was_away(rig: CommandRig, broker: Mosquitto
                                                            ) -> None:
    await rig.stop_gateway()
    sent = await rig.send("lock", retain=True)
    await rig.start_gateway()
    # It may come twice, queued in the gateway's session and again as the retained
    # copy on subscribe: each time it is refused, and it never acts.
    # Its signature is never checked, so the answers come only on the response topic.
    results = await rig.results(sent, topic=rig.response_topic)
    assert set(statuses(results)) == {("rejected", "retained")}
    assert rig.answers(sent) == []
    assert rig.sent(BODY_COMMAND) == []
    assert await retained(broker.host, broker.port, rig.topics.command_request) == {}


async def interrupted_lock(rig: CommandRig) -> tuple[Sent, env.Result]:
    """Cut a lock short with a restart and send it again; the final result it gets."""
    rig.ecus.ignore_body_commands = True
    sent = await rig.send("lock")
    assert statuses(await rig.results(sent, final=False)) == [("accepted", None)]
    await eventually(lambda: len(rig.sent(BODY_COMMAND)) == 1, "the lock frame")
    await rig.restart()
    assert rig.gateway.counter("commands.failed.interrupted") == 1
    # Not published by itself: the app learns it by sending the same envelope again.
    await rig.publish(sent)
    return sent, await rig.final(sent)


async def test_command_cut_short_by_a_restart_is_interrupted(broker: Mosquitto, tmp_path: Path
                                                             ) -> None:
    async with CommandRig(broker, tmp_path, profile=slow_to_confirm("lock", LONG_TIMEOUT_S)) as rig:
        sent, final = await interrupted_lock(rig)
        # It names the command and the request, so a client that insists on its own
        # req (as `ev-gateway command` does) believes it.
        assert (final.id, final.status, final.reason, final.cmd, final.req) == (
            sent.id, "failed", "interrupted", "lock", sent.req)
        assert final.key == env.key_id(rig.keys["owner"].public_key())
        assert len(rig.sent(BODY_COMMAND)) == 1  # the retry never went out
        rig.ecus.ignore_body_commands = False
        again = await rig.send("lock")
        assert (await rig.final(again)).status == "succeeded"


async def test_unlock_retry_is_refused_once_the_car_moves(broker: Mosquitto, tmp_path: Path
                                                          ) -> None:
    profile = slow_to_confirm("unlock", RETRY_AFTER_S)
    async with CommandRig(broker, tmp_path, profile=profile) as rig:
        await rig.until_motion()
        rig.ecus.ignore_body_commands = True
        sent = await rig.send("unlock")
        await eventually(lambda: len(rig.sent(BODY_COMMAND)) == 1, "the first unlock frame")
        rig.model.mode = "drive"
        await rig.until_motion(Motion.MOVING, "moving")
        # The retry comes after the timeout; its interlock sees a moving car by then.
        results = await rig.results(sent)
        # The first frame may have acted: not a refusal but an unknown outcome.
        assert statuses(results) == [("accepted", None), ("failed", "unconfirmed")]
        assert results[-1].detail == {"attempts": 1, "refused": "vehicle_moving"}
        assert len(rig.sent(BODY_COMMAND)) == 1
        assert rig.model.locks == [1, 1, 1]


async def test_speed_profile_retry_is_refused_once_the_car_moves(broker: Mosquitto,
                                                                 tmp_path: Path) -> None:
    async with CommandRig(broker, tmp_path, profile=slow_speed_profile(RETRY_AFTER_S)) as rig:
        await rig.until_motion()
        rig.ecus.ignore_speed_cap = True  # no confirmation: the command must try again
        sent = await rig.send("speed-profile", {"profile": "valet"})
        assert statuses(await rig.results(sent, final=False)) == [("accepted", None)]
        rig.model.mode = "drive"
        await rig.until_motion(Motion.MOVING, "moving")
        results = await rig.results(sent)
        # The first frame may have acted: not a refusal but an unknown outcome.
        assert statuses(results) == [("accepted", None), ("failed", "unconfirmed")]
        assert results[-1].detail == {"attempts": 1, "refused": "vehicle_moving"}

