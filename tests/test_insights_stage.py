"""The insights stage as the gateway wires it: one estimator's bug costs only its own figure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import ManualClock
from gateway.config import Profile
from gateway.insights.battery import CYCLES


def _boom(_: object) -> None:
    raise ZeroDivisionError("estimator bug")


@pytest.fixture
def gateway(ref_profile: Profile, tmp_path: Path) -> Gateway:
    """A gateway without MQTT or buses, on a manual clock, with a state directory."""
    return Gateway.build(ref_profile, ManualClock(), None, tmp_path)


def test_a_failing_estimator_is_counted_and_the_others_still_run(gateway: Gateway) -> None:
    insights = gateway.insights
    assert insights is not None
    insights.trips.update = _boom  # type: ignore[method-assign,assignment]
    store, counters = gateway.pipeline.store, gateway.pipeline.counters
    insights.tick(gateway.pipeline.clock.time())
    insights.tick(gateway.pipeline.clock.time())
    assert counters.get("insights.errors.trips") == 2
    # Battery health comes after the trips in the tick and still published its count.
    assert store.slot(CYCLES).timestamp is not None


def test_a_failing_batch_listener_does_not_reach_the_decoder(gateway: Gateway) -> None:
    insights = gateway.insights
    assert insights is not None
    guarded = insights.guarded("meter", _boom)
    guarded("vehicle")  # would raise into Pipeline._consume and end the decode task
    assert gateway.pipeline.counters.get("insights.errors.meter") == 1


async def test_the_gateway_stops_cleanly_after_estimator_failures(gateway: Gateway) -> None:
    insights = gateway.insights
    assert insights is not None
    insights.charges.update = _boom  # type: ignore[method-assign,assignment]
    await gateway.start(None)
    for _ in range(5):
        await asyncio.sleep(0)  # the manual clock lets the insights task tick each time
    assert gateway.pipeline.counters.get("insights.errors.charges") >= 1
    assert not insights.tasks[0].done()
    safety_tasks = list(gateway.safety.tasks)
    assert safety_tasks
    await gateway.stop()  # used to re-raise the estimator's exception and skip the rest
    assert all(t.done() for t in safety_tasks)
    assert not gateway.safety.tasks and not insights.tasks
