"""Home Assistant discovery: which entities, where, and what their templates render.

Templates are rendered with a sandboxed Jinja2 environment like Home Assistant's
(``value`` = raw payload text, ``value_json`` = parsed payload when it is JSON)
against payloads built by the real envelope and state_body. StrictUndefined makes
any use of an undefined value an error, which Home Assistant would log.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.mqtt import discovery as d
from gateway.mqtt.payloads import Envelope, encode, state_body, status_body
from gateway.mqtt.topics import Topics
from gateway.state import CATALOG, SignalView

VID = "car.1"
TOPICS = Topics(VID)
PREFIX = "homeassistant"
ALL_MAPPED = (d.SOC, d.RANGE, d.SPEED, d.DRIVER_LOCK, d.CHARGING, d.AUX_VOLTAGE)
ALL_IDS = {"battery_level", "range", "location", "lock", "speed", "charging",
           "aux_battery_voltage"}
# Home Assistant's own discovery-topic pattern (component / node id / object id).
HA_TOPIC = re.compile(
    r"^homeassistant/(?P<component>\w+)/(?P<node>[a-zA-Z0-9_-]+)/(?P<obj>[a-zA-Z0-9_-]+)/config$")
ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
T0 = 1_700_000_000.0
UNITS = {d.LATITUDE: "deg", d.LONGITUDE: "deg", d.ACCURACY: "m"}


def messages(mapped: tuple[str, ...] = ALL_MAPPED) -> list[d.DiscoveryMessage]:
    return d.discovery_messages(TOPICS, PREFIX, "My Ami", "citroen-ami", "1.2.3", mapped)


def configs(mapped: tuple[str, ...] = ALL_MAPPED) -> dict[str, dict[str, Any]]:
    """Decoded configs by object id (the fourth topic level)."""
    return {m.topic.split("/")[3]: json.loads(m.payload) for m in messages(mapped)}


def view(path: str, value: Any, *, valid: bool = True, stale: bool = False) -> SignalView:
    entry = CATALOG.get(path)
    unit = entry.unit if entry else UNITS[path]
    group = entry.group if entry else "location"
    return SignalView(path, value, unit, T0 - 1.0, valid, stale, group)


def state_payload(group: str, *views: SignalView) -> bytes:
    """A retained state/{group} message exactly as the gateway builds it."""
    topic = TOPICS.state(group)
    return encode(Envelope(VID, "0123456789abcdef").stamp(topic, T0, state_body(group, views)))


def render(template: str, payload: bytes) -> str:
    text = payload.decode()
    variables: dict[str, Any] = {"value": text}
    # Home Assistant leaves value_json undefined for non-JSON payloads.
    with contextlib.suppress(ValueError):
        variables["value_json"] = json.loads(text)
    # Not stripped, so stray whitespace in a template shows up as a failure.
    return ENV.from_string(template).render(**variables)


def value_of(object_id: str, payload: bytes) -> str:
    return render(configs()[object_id]["value_template"], payload)


# --- which entities, and where -------------------------------------------------------------

def test_entities_follow_the_profile_mapping() -> None:
    assert set(configs()) == ALL_IDS
    assert set(configs((d.SOC,))) == {"battery_level", "location"}
    assert set(configs((d.SOC, d.DRIVER_LOCK))) == {"battery_level", "location", "lock"}
    assert "range" not in configs((d.SOC, d.SPEED))
    # Location is offered before any GNSS source is mapped.
    assert set(configs(())) == {"location"}


def test_topics_match_home_assistant_pattern_and_component() -> None:
    expected = {"battery_level": "sensor", "range": "sensor", "speed": "sensor",
                "aux_battery_voltage": "sensor", "charging": "binary_sensor",
                "location": "device_tracker", "lock": "lock"}
    for msg in messages():
        match = HA_TOPIC.match(msg.topic)
        assert match, msg.topic
        assert match["node"] == "evgw_car_1"  # '.' of the vehicle id is not allowed there
        assert expected[match["obj"]] == match["component"]
    assert d.DiscoveryMessage.QOS == 1
    assert d.DiscoveryMessage.RETAIN is True


def test_prefix_is_normalised_and_wildcards_refused() -> None:
    slash = d.discovery_messages(TOPICS, "ha/", "n", "p", "v", ALL_MAPPED)
    assert [m.topic for m in slash] == [m.topic.replace(PREFIX, "ha", 1) for m in messages()]
    for bad in ("", "/", "ha/#", "a/+/b", "/ha"):
        with pytest.raises(ValueError, match="discovery prefix"):
            d.discovery_messages(TOPICS, bad, "n", "p", "v", ALL_MAPPED)


def test_unique_ids_are_unique_and_stable() -> None:
    cfgs = configs()
    ids = [c["unique_id"] for c in cfgs.values()]
    assert len(ids) == len(set(ids)) == len(ALL_IDS)
    for obj, cfg in cfgs.items():
        assert cfg["unique_id"] == f"evgw_car_1_{obj}"
    # Same inputs, same bytes: re-publishing retained configs must not churn entities.
    assert messages() == messages()


def test_device_availability_and_compact_payload() -> None:
    for msg in messages():
        cfg = json.loads(msg.payload)
        assert msg.payload == encode(cfg)  # compact JSON, as every gateway payload
        assert cfg["device"] == {"identifiers": ["evgw_car_1"], "name": "My Ami",
                                 "manufacturer": "ev-gateway", "model": "citroen-ami",
                                 "sw_version": "1.2.3"}
        assert cfg["availability_topic"] == "evgw/v1/car.1/status"
        assert (cfg["payload_available"], cfg["payload_not_available"]) == ("online", "offline")
        # The availability template needs its own key: value_template is the state's.
        assert "value_template" not in cfg or cfg["value_template"] != cfg["availability_template"]
        for online, expected in ((True, "online"), (False, "offline")):
            status = encode(Envelope(VID, "b").stamp(TOPICS.status, T0, status_body(
                online, 1, "1.2.3", "citroen-ami", None if online else "lost")))
            assert render(cfg["availability_template"], status) == expected


def test_state_topics_are_the_groups_that_carry_the_signals() -> None:
    cfgs = configs()
    by_object = {"battery_level": d.SOC, "range": d.RANGE, "speed": d.SPEED, "lock": d.DRIVER_LOCK,
                 "charging": d.CHARGING, "aux_battery_voltage": d.AUX_VOLTAGE}
    for obj, path in by_object.items():
        assert cfgs[obj]["state_topic"] == TOPICS.state(CATALOG[path].group), obj
    assert cfgs["location"]["json_attributes_topic"] == TOPICS.state("location")
    assert cfgs["location"]["source_type"] == "gps"


def test_removal_clears_every_topic_discovery_can_use() -> None:
    removal = d.removal_messages(TOPICS, PREFIX)
    assert all(m.payload == b"" for m in removal)
    assert [m.topic for m in removal] == [m.topic for m in messages()]
    assert len({m.topic for m in removal}) == len(ALL_IDS)
    for subset in ((), (d.SOC,), (d.RANGE, d.CHARGING)):
        assert {m.topic for m in messages(subset)} <= {m.topic for m in removal}


# --- what the templates render -------------------------------------------------------------

def test_sensor_values_render_from_real_state_payloads() -> None:
    battery = state_payload("battery", view(d.SOC, 81.2), view(d.RANGE, 123456))
    assert value_of("battery_level", battery) == "81.2"
    assert value_of("range", battery) == "123.5"
    assert value_of("speed", state_payload("motion", view(d.SPEED, 42.5))) == "42.5"
    assert value_of("aux_battery_voltage",
                    state_payload("health", view(d.AUX_VOLTAGE, 12.6))) == "12.6"
    assert value_of("range", state_payload("battery", view(d.RANGE, 0))) == "0.0"


@pytest.mark.parametrize("object_id, group, path, good", [
    ("battery_level", "battery", d.SOC, 81.2),
    ("range", "battery", d.RANGE, 123456),
    ("speed", "motion", d.SPEED, 30.0),
    ("aux_battery_voltage", "health", d.AUX_VOLTAGE, 12.4),
    ("lock", "body", d.DRIVER_LOCK, True),
    ("charging", "charging", d.CHARGING, False),
])
def test_bad_or_missing_signals_render_none(object_id: str, group: str, path: str,
                                            good: Any) -> None:
    """Home Assistant turns exactly "None" into unknown; "" would keep the old value."""
    assert value_of(object_id, state_payload(group, view(path, good))) != d.UNKNOWN
    cases = {
        "stale": state_payload(group, view(path, good, stale=True)),
        "invalid": state_payload(group, view(path, good, valid=False)),
        "missing": state_payload(group),
        "wrong kind": state_payload(group, view(path, "text")),
        "not json": b"garbage",
        "json but not an object": b"[1, 2]",
        "no signals object": b'{"v": 1, "signals": 7}',
    }
    for case, payload in cases.items():
        assert value_of(object_id, payload) == "None", case


def test_lock_states_and_commands() -> None:
    cfg = configs()["lock"]
    locked = value_of("lock", state_payload("body", view(d.DRIVER_LOCK, True)))
    unlocked = value_of("lock", state_payload("body", view(d.DRIVER_LOCK, False)))
    assert (locked, unlocked) == ("LOCKED", "UNLOCKED")
    assert (cfg["state_locked"], cfg["state_unlocked"]) == (locked, unlocked)
    assert cfg["payload_reset"] == d.UNKNOWN
    assert cfg["command_topic"] == "evgw/v1/car.1/cmd/lock"
    assert (cfg["payload_lock"], cfg["payload_unlock"]) == ("LOCK", "UNLOCK")
    assert cfg["optimistic"] is False
    # Another signal of the body group must not leak into the lock state.
    other = state_payload("body", view("Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked", True))
    assert value_of("lock", other) == "None"


def test_charging_binary_sensor_uses_its_payloads() -> None:
    cfg = configs()["charging"]
    assert cfg["device_class"] == "battery_charging"
    on = value_of("charging", state_payload("charging", view(d.CHARGING, True)))
    off = value_of("charging", state_payload("charging", view(d.CHARGING, False)))
    assert (on, off) == (cfg["payload_on"], cfg["payload_off"]) == ("ON", "OFF")


def test_sensor_classes_and_units() -> None:
    cfgs = configs()
    got = {obj: (cfgs[obj]["device_class"], cfgs[obj]["unit_of_measurement"],
                 cfgs[obj]["state_class"])
           for obj in ("battery_level", "range", "speed", "aux_battery_voltage")}
    assert got == {"battery_level": ("battery", "%", "measurement"),
                   "range": ("distance", "km", "measurement"),
                   "speed": ("speed", "km/h", "measurement"),
                   "aux_battery_voltage": ("voltage", "V", "measurement")}


def location(*views: SignalView) -> Any:
    text = render(configs(())["location"]["json_attributes_template"],
                  state_payload("location", *views))
    return json.loads(text)


def test_location_attributes_render_json_only_for_a_good_fix() -> None:
    lat, lon, acc = view(d.LATITUDE, 48.8566), view(d.LONGITUDE, 2.3522), view(d.ACCURACY, 4.5)
    assert location(lat, lon, acc) == {"latitude": 48.8566, "longitude": 2.3522,
                                       "gps_accuracy": 4.5}
    # Without a usable accuracy the fix is still a fix; Home Assistant assumes 0.
    assert location(lat, lon, view(d.ACCURACY, 4.5, stale=True)) == {
        "latitude": 48.8566, "longitude": 2.3522}
    assert location(lat, lon) == {"latitude": 48.8566, "longitude": 2.3522}
    # No good fix: {} so Home Assistant keeps the last known position.
    assert location(view(d.LATITUDE, 48.8566, stale=True), lon, acc) == {}
    assert location(lat, view(d.LONGITUDE, 2.3522, valid=False), acc) == {}
    assert location(lat) == {}
    assert location() == {}
    template = configs(())["location"]["json_attributes_template"]
    assert render(template, b"not json") == "{}"


@settings(deadline=None)  # Jinja compiles templates: slow on a loaded machine
@given(st.integers(min_value=0, max_value=2_000_000))
def test_range_is_kilometres_with_one_decimal(metres: int) -> None:
    rendered = value_of("range", state_payload("battery", view(d.RANGE, metres)))
    assert rendered == str(round(metres / 1000, 1))


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=100, allow_nan=False))
def test_soc_renders_the_published_value(soc: float) -> None:
    payload = state_payload("battery", view(d.SOC, soc))
    published = json.loads(payload)["signals"][d.SOC]["value"]
    assert float(value_of("battery_level", payload)) == published
