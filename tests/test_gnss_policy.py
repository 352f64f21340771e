"""Where a fix goes: the store's location slots, and the policy for the MQTT location topic."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.config.location import GnssSettings
from gateway.gnss.fix import Fix
from gateway.gnss.policy import PublishPolicy
from gateway.gnss.slots import PATHS, LocationSlots
from gateway.state.store import StateStore

LOC = "Vehicle.CurrentLocation"
ORIGIN = (48.1173, 11.5166667)
METRE_LAT = 1 / 111_195.0  # degrees of latitude per metre on the mean-radius sphere


def fix(received: float = 100.0, *, north_m: float = 0.0, heading: float | None = 90.0,
        speed: float | None = 30.0, valid: bool = True) -> Fix:
    if not valid:
        return Fix(received, 1_700_000_000.5, "NONE", None, None, None, None, None, 4, None)
    return Fix(received, 1_700_000_000.5, "THREE_D", ORIGIN[0] + north_m * METRE_LAT,
               ORIGIN[1], 520.0, speed, heading, 9, 0.9)


# ---- slots ---------------------------------------------------------------------------------


def test_slots_take_every_value_with_one_timestamp() -> None:
    store = StateStore()
    slots = LocationSlots.register(store, stale_after=3.0)
    assert sorted(s.path for s in store) == sorted(PATHS.values()) and len(store) == 10
    slots.record(fix(received=100.0))
    views = {v.path: v for v in store.snapshot(now=101.0)}
    assert {p: v.value for p, v in views.items()} == {
        f"{LOC}.Latitude": ORIGIN[0], f"{LOC}.Longitude": ORIGIN[1],
        f"{LOC}.Altitude": 520.0, f"{LOC}.Heading": 90.0, f"{LOC}.Speed": 30.0,
        f"{LOC}.HorizontalAccuracy": 4.5, f"{LOC}.Timestamp": "2023-11-14T22:13:20.500Z",
        f"{LOC}.GNSSReceiver.FixType": "THREE_D", f"{LOC}.GNSSReceiver.SatellitesUsed": 9,
        f"{LOC}.GNSSReceiver.HDOP": 0.9}
    assert {v.timestamp for v in views.values()} == {100.0}
    assert all(v.good for v in views.values())
    assert views[f"{LOC}.Speed"].unit == "km/h" and views[f"{LOC}.Latitude"].group == "location"
    # One shared sample: the whole branch goes stale together.
    assert store.stale_paths(now=103.5) == list(PATHS.values())
    assert store.good_value(f"{LOC}.Latitude", now=103.5) is None


def test_slots_without_a_fix_keep_what_is_still_known() -> None:
    store = StateStore()
    slots = LocationSlots.register(store, stale_after=3.0)
    slots.record(fix(received=100.0))
    slots.record(fix(received=101.0, valid=False))
    good = {p: store.good_value(p, now=101.5) for p in PATHS.values()}
    assert {p: v for p, v in good.items() if v is not None} == {
        f"{LOC}.GNSSReceiver.FixType": "NONE", f"{LOC}.GNSSReceiver.SatellitesUsed": 4,
        f"{LOC}.Timestamp": "2023-11-14T22:13:20.500Z"}
    assert not store.view(f"{LOC}.Latitude", now=101.5).valid
    assert store.slot(f"{LOC}.Latitude").timestamp == 101.0


def test_slots_cannot_be_registered_twice() -> None:
    store = StateStore()
    LocationSlots.register(store, stale_after=3.0)
    with pytest.raises(ValueError, match="mapped twice"):
        LocationSlots.register(store, stale_after=3.0)


# ---- publish policy ------------------------------------------------------------------------

SETTINGS = GnssSettings(min_distance_m=25.0, min_interval_s=1.0, max_interval_s=30.0,
                        parked_interval_s=300.0, heading_change_deg=20.0)


def published(policy: PublishPolicy, f: Fix, mono: float, parked: bool = False) -> bool:
    if policy.due(f, mono, parked):
        policy.commit(f, mono)
        return True
    return False


def test_first_fix_is_due_valid_or_not() -> None:
    assert PublishPolicy(SETTINGS).due(fix(), 0.0, parked=False)
    assert PublishPolicy(SETTINGS).due(fix(valid=False), 0.0, parked=True)


def test_distance_triggers_but_not_faster_than_min_interval() -> None:
    policy = PublishPolicy(SETTINGS)
    assert published(policy, fix(), 0.0)
    assert not policy.due(fix(north_m=24.0), 5.0, parked=False)
    assert not policy.due(fix(north_m=100.0), 0.5, parked=False)  # too soon
    assert published(policy, fix(north_m=26.0), 5.0)
    assert not policy.due(fix(north_m=40.0), 6.0, parked=False)  # 14 m from the last one
    assert policy.due(fix(north_m=51.5), 6.0, parked=False)


def test_heading_change_counts_only_while_moving() -> None:
    policy = PublishPolicy(SETTINGS)
    assert published(policy, fix(heading=90.0), 0.0)
    assert not policy.due(fix(heading=105.0), 2.0, parked=False)
    assert policy.due(fix(heading=111.0), 2.0, parked=False)
    assert policy.due(fix(heading=70.0), 2.0, parked=False)
    assert not policy.due(fix(heading=180.0, speed=4.0), 2.0, parked=False)
    assert not policy.due(fix(heading=None), 2.0, parked=False)
    assert not policy.due(fix(heading=180.0, speed=None), 2.0, parked=False)


def test_heading_wraps_around_north() -> None:
    policy = PublishPolicy(SETTINGS)
    assert published(policy, fix(heading=355.0), 0.0)
    assert not policy.due(fix(heading=10.0), 2.0, parked=False)
    assert policy.due(fix(heading=16.0), 2.0, parked=False)


def test_max_interval_and_parked_interval() -> None:
    policy = PublishPolicy(SETTINGS)
    assert published(policy, fix(), 0.0)
    assert not policy.due(fix(), 29.9, parked=False)
    assert policy.due(fix(), 30.0, parked=False)
    assert not policy.due(fix(), 299.0, parked=True)
    assert policy.due(fix(), 300.0, parked=True)


def test_validity_change_is_due_at_once() -> None:
    policy = PublishPolicy(SETTINGS)
    assert published(policy, fix(), 0.0)
    assert published(policy, fix(valid=False), 0.2)  # inside min_interval: still at once
    assert not policy.due(fix(valid=False), 20.0, parked=False)  # lost is lost: no repeats
    assert policy.due(fix(valid=False), 30.2, parked=False)
    assert not policy.due(fix(valid=False), 100.0, parked=True)
    assert published(policy, fix(), 0.3)  # regained


def test_zero_distance_setting_publishes_at_min_interval() -> None:
    policy = PublishPolicy(dataclasses.replace(SETTINGS, min_distance_m=0.0))
    assert published(policy, fix(), 0.0)
    assert not policy.due(fix(), 0.9, parked=False)
    assert policy.due(fix(), 1.0, parked=False)
