"""End to end: charge limit, speed profile and latch reset on the simulated car.

The charge limit and the speed cap are values the gateway keeps on the bus:
the controllers fall back to their defaults when the frames stop, so these
tests watch the car itself (the simulated BMS and MCU), not only the answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.commands import envelope as env
from gateway.safety.verdicts import Motion
from hil.broker import Mosquitto
from hil.sim.ecus import CHARGE_LIMIT_TIMEOUT_S
from tests.command_rig import (
    BODY_COMMAND,
    CHARGE_CONTROL,
    SPEED_LIMIT,
    CommandRig,
    eventually,
)

NO_CAP = 255
CHARGE_LIMIT = "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit"


@pytest.fixture
async def rig(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[CommandRig]:
    """The reference car parked, with the gateway running."""
    async with CommandRig(broker, tmp_path) as r:
        yield r


def statuses(results: list[env.Result]) -> list[tuple[str, str | None]]:
    """(status, reason) of each result, in arrival order."""
    return [(r.status, r.reason) for r in results]


def limits(rig: CommandRig) -> list[int]:
    """GW_ChargeLimitSoc of every GW_ChargeControl frame the gateway sent so far."""
    return [rig.decode(f)["GW_ChargeLimitSoc"] for f in rig.sent(CHARGE_CONTROL)]


async def test_charge_limit_is_applied_and_kept_past_the_bms_fallback(rig: CommandRig) -> None:
    assert rig.model.charge_limit == 100
    sent = await rig.send("charge-limit", {"soc": 80})
    results = await rig.results(sent)
    assert statuses(results) == [("accepted", None), ("succeeded", None)]
    assert rig.model.charge_limit == 80
    assert rig.gateway.slot(CHARGE_LIMIT).reading() == (80, True)
    sent_before = len(limits(rig))
    # The BMS drops an unrefreshed limit after 5 s: hold on well past that and watch
    # the car's own value at every step.
    hold_until = time.monotonic() + CHARGE_LIMIT_TIMEOUT_S + 1.5
    while time.monotonic() < hold_until:
        assert rig.model.charge_limit == 80
        await asyncio.sleep(0.1)
    assert len(limits(rig)) > sent_before
    assert set(limits(rig)) == {80}
    assert rig.gateway.slot(CHARGE_LIMIT).reading() == (80, True)
    assert rig.sent(BODY_COMMAND) == []


async def test_charge_limit_out_of_range_is_refused(rig: CommandRig) -> None:
    sent = await rig.send("charge-limit", {"soc": 30})
    result = await rig.refused(sent, "bad_arguments")
    assert result.detail is not None and "50" in result.detail["error"]
    assert rig.sent(CHARGE_CONTROL) == []
    assert rig.model.charge_limit == 100


def cap_requests(rig: CommandRig) -> list[int]:
    """GW_SpeedLimitRequest of every GW_SpeedLimit frame so far (255: no cap)."""
    return [rig.decode(f)["GW_SpeedLimitRequest"] for f in rig.sent(SPEED_LIMIT)]


async def test_speed_profile_while_parked(rig: CommandRig) -> None:
    await rig.until_motion()
    before = len(cap_requests(rig))
    assert set(cap_requests(rig)) <= {NO_CAP}  # the gateway keeps saying "no cap"
    sent = await rig.send("speed-profile", {"profile": "valet"})
    assert statuses(await rig.results(sent)) == [("accepted", None), ("succeeded", None)]
    assert rig.model.speed_cap_kmh == 20
    requests = cap_requests(rig)
    assert 20 not in requests[:before]
    assert set(requests[requests.index(20):]) == {20}
    lifted = await rig.send("speed-profile", {"profile": "none"})
    assert (await rig.final(lifted)).status == "succeeded"
    assert rig.model.speed_cap_kmh is None
    assert cap_requests(rig)[-1] == NO_CAP
    assert rig.sent(BODY_COMMAND) == []


async def test_speed_profile_while_driving_is_refused(broker: Mosquitto, tmp_path: Path
                                                      ) -> None:
    async with CommandRig(broker, tmp_path, mode="drive") as rig:
        await rig.until_motion(Motion.MOVING, "moving")
        sent = await rig.send("speed-profile", {"profile": "valet"})
        result = await rig.refused(sent, "vehicle_moving")
        assert result.detail == {"motion": ["moving"]}
        assert set(cap_requests(rig)) == {NO_CAP}
        assert rig.model.speed_cap_kmh is None


async def test_reset_latches_needs_the_service_role(rig: CommandRig) -> None:
    denied = await rig.send("reset-latches", key="owner")
    result = await rig.refused(denied, "role_not_allowed")
    assert result.detail == {"role": "owner"}
    sent = await rig.send("reset-latches", key="service")
    results = await rig.results(sent)
    assert statuses(results) == [("accepted", None), ("succeeded", None)]
    assert results[-1].key == env.key_id(rig.keys["service"].public_key())
    assert results[-1].detail == {"released": []}
    assert rig.sent(BODY_COMMAND) == []


async def test_setpoints_are_sent_again_after_a_restart(rig: CommandRig) -> None:
    await rig.until_motion()
    for cmd, args in (("charge-limit", {"soc": 80}), ("speed-profile", {"profile": "valet"})):
        sent = await rig.send(cmd, args)
        assert (await rig.final(sent)).status == "succeeded"
    await rig.restart()
    charge, caps = len(limits(rig)), len(cap_requests(rig))
    # Nobody tells the new run anything: it reads both values from its state directory.
    await eventually(lambda: len(limits(rig)) > charge, "a GW_ChargeControl after restart")
    await eventually(lambda: len(cap_requests(rig)) > caps, "a GW_SpeedLimit after restart")
    assert set(limits(rig)[charge:]) == {80}
    assert set(cap_requests(rig)[caps:]) == {20}
    assert rig.gateway.slot(CHARGE_LIMIT).reading() == (80, True)
    await eventually(lambda: rig.model.speed_cap_kmh == 20, "the MCU applying the cap")
    assert rig.model.charge_limit == 80
