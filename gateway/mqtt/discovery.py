"""Home Assistant MQTT discovery for the gateway's vehicle.

Home Assistant builds entities from retained config messages on
``<prefix>/<component>/evgw_<vehicle>/<object_id>/config``. The entities read
the gateway's own retained ``state/{group}`` topics, so nothing extra is
published per sample: the templates in each config pick one signal out of the
group payload.

Every value template renders the literal ``None`` when the signal is missing,
invalid or stale. Home Assistant sets sensors, binary sensors and locks to
``unknown`` on ``None``, whereas an empty result is *ignored* by numeric
sensors, which would leave an old reading on screen as if it were current.
The location tracker is the exception: its attributes template renders ``{}``
without a good fix, and Home Assistant then keeps the last known position,
which is what an owner looking for a parked car wants.

The templates use only plain Jinja2 (no Home Assistant filters), never
stringify or test the truth of an undefined value (Home Assistant logs a
warning each time), and survive payloads that are not JSON objects.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.mqtt.payloads import encode
from gateway.mqtt.topics import Topics, valid_topic_prefix

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
RANGE = "Vehicle.Powertrain.Range"
SPEED = "Vehicle.Speed"
DRIVER_LOCK = "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"
CHARGING = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging"
AUX_VOLTAGE = "Vehicle.LowVoltageBattery.CurrentVoltage"
LATITUDE = "Vehicle.CurrentLocation.Latitude"
LONGITUDE = "Vehicle.CurrentLocation.Longitude"
ACCURACY = "Vehicle.CurrentLocation.HorizontalAccuracy"

UNKNOWN = "None"
"""What a value template renders when Home Assistant should show ``unknown``."""

_NOT_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]")
_VSS_PATH = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class DiscoveryMessage:
    """One discovery config (or its removal, when ``payload`` is empty)."""

    topic: str
    payload: bytes
    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = True


@dataclass(frozen=True)
class _Entity:
    """One entity: where its config goes, what it needs mapped, and its specific keys."""

    component: str
    object_id: str
    name: str
    requires: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)


def object_id(text: str) -> str:
    """``text`` with every character Home Assistant refuses in an id level replaced by '_'."""
    return _NOT_OBJECT_ID.sub("_", text)


_PRELUDE = (
    "{%- set j = value_json if value_json is mapping else {} -%}"
    "{%- set g = j['signals'] if j['signals'] is mapping else {} -%}"
)
"""Jinja statements binding ``g`` to the payload's signals ({} when the payload has none)."""


def _pick(var: str, path: str) -> str:
    """Jinja statement binding ``var`` to the entry of ``path`` in ``g`` ({} when absent)."""
    if not _VSS_PATH.match(path):
        raise ValueError(f"{path!r} is not a VSS path")
    return f"{{%- set {var} = g['{path}'] if g['{path}'] is mapping else {{}} -%}}"


def _good(var: str, kind: str) -> str:
    """Jinja condition: ``var`` is valid, fresh, and its value has the expected kind."""
    base = f"{var}['valid'] is true and {var}['stale'] is false"
    if kind == "bool":
        return f"{base} and {var}['value'] is boolean"
    return f"{base} and {var}['value'] is number and {var}['value'] is not boolean"


def value_template(path: str, kind: str, expr: str) -> str:
    """Template rendering ``expr`` (in terms of ``s``) when ``path`` is good, else ``None``."""
    return (
        f"{_PRELUDE}{_pick('s', path)}"
        f"{{%- if {_good('s', kind)} -%}}{{{{ {expr} }}}}"
        f"{{%- else -%}}{UNKNOWN}{{%- endif -%}}"
    )


def _location_template() -> str:
    """Attributes template: latitude/longitude (and accuracy if good) as JSON, else ``{}``."""
    lat, lon = "lat['value']", "lon['value']"
    with_acc = f'{{"latitude": {lat}, "longitude": {lon}, "gps_accuracy": acc[\'value\']}}'
    without_acc = f'{{"latitude": {lat}, "longitude": {lon}}}'
    return (
        f"{_PRELUDE}{_pick('lat', LATITUDE)}{_pick('lon', LONGITUDE)}{_pick('acc', ACCURACY)}"
        f"{{%- if {_good('lat', 'number')} and {_good('lon', 'number')} -%}}"
        f"{{%- if {_good('acc', 'number')} -%}}{{{{ {with_acc} | tojson }}}}"
        f"{{%- else -%}}{{{{ {without_acc} | tojson }}}}{{%- endif -%}}"
        "{%- else -%}{}{%- endif -%}"
    )


def _entities(topics: Topics) -> list[_Entity]:
    """Every entity the gateway can offer, in publishing order."""
    measurement = {"state_class": "measurement"}
    return [
        _Entity("sensor", "battery_level", "Battery", (SOC,), {
            "state_topic": topics.state("battery"), "device_class": "battery",
            "unit_of_measurement": "%", **measurement,
            "value_template": value_template(SOC, "number", "s['value']")}),
        _Entity("sensor", "range", "Range", (RANGE,), {
            # The catalog fixes range in metres; owners read kilometres.
            "state_topic": topics.state("battery"), "device_class": "distance",
            "unit_of_measurement": "km", **measurement,
            "value_template": value_template(RANGE, "number", "(s['value'] / 1000) | round(1)")}),
        _Entity("device_tracker", "location", "Location", (), {
            # Offered even before a GNSS source is mapped, so the entity (and any
            # automation on it) exists from the start and fills in once fixes arrive.
            "json_attributes_topic": topics.state("location"),
            "json_attributes_template": _location_template(), "source_type": "gps"}),
        _Entity("lock", "lock", "Doors", (DRIVER_LOCK,), {
            "state_topic": topics.state("body"),
            "value_template": value_template(
                DRIVER_LOCK, "bool", "'LOCKED' if s['value'] else 'UNLOCKED'"),
            "state_locked": "LOCKED", "state_unlocked": "UNLOCKED", "payload_reset": UNKNOWN,
            # Commands land on the reserved cmd/ subtree; nothing acts on them until the
            # remote-command feature, which authenticates every command, subscribes there.
            "command_topic": f"{topics.base}/cmd/lock",
            "payload_lock": "LOCK", "payload_unlock": "UNLOCK", "optimistic": False}),
        _Entity("sensor", "speed", "Speed", (SPEED,), {
            "state_topic": topics.state("motion"), "device_class": "speed",
            "unit_of_measurement": "km/h", **measurement,
            "value_template": value_template(SPEED, "number", "s['value']")}),
        _Entity("binary_sensor", "charging", "Charging", (CHARGING,), {
            "state_topic": topics.state("charging"), "device_class": "battery_charging",
            "payload_on": "ON", "payload_off": "OFF",
            "value_template": value_template(CHARGING, "bool", "'ON' if s['value'] else 'OFF'")}),
        _Entity("sensor", "aux_battery_voltage", "12 V battery", (AUX_VOLTAGE,), {
            "state_topic": topics.state("health"), "device_class": "voltage",
            "unit_of_measurement": "V", **measurement,
            "value_template": value_template(AUX_VOLTAGE, "number", "s['value']")}),
    ]


def _check_prefix(prefix: str) -> str:
    """The discovery prefix without a trailing '/'; wildcards and empty prefixes are refused."""
    cleaned = prefix.rstrip("/")
    if not valid_topic_prefix(cleaned):
        raise ValueError(f"discovery prefix {prefix!r}: give a plain topic such as 'homeassistant'")
    return cleaned


def _topic(topics: Topics, prefix: str, entity: _Entity) -> str:
    node = object_id(f"evgw_{topics.vehicle_id}")
    return f"{prefix}/{entity.component}/{node}/{object_id(entity.object_id)}/config"


def discovery_messages(
    topics: Topics, prefix: str, device_name: str, profile: str, version: str,
    mapped: Collection[str],
) -> list[DiscoveryMessage]:
    """Retained configs for the entities the profile can feed (location always).

    ``mapped`` holds the VSS paths the vehicle profile maps; ``profile`` becomes
    the device model and ``version`` the gateway's software version.
    """
    prefix = _check_prefix(prefix)
    node = object_id(f"evgw_{topics.vehicle_id}")
    device = {"identifiers": [node], "name": device_name, "manufacturer": "ev-gateway",
              "model": profile, "sw_version": version}
    common = {
        "availability_topic": topics.status,
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online", "payload_not_available": "offline",
        "device": device, "origin": {"name": "ev-gateway", "sw_version": version},
    }
    out = []
    for entity in _entities(topics):
        if not all(path in mapped for path in entity.requires):
            continue
        config = {"name": entity.name,
                  "unique_id": f"{node}_{object_id(entity.object_id)}",
                  **common, **entity.config}
        out.append(DiscoveryMessage(_topic(topics, prefix, entity), encode(config)))
    return out


def removal_messages(topics: Topics, prefix: str) -> list[DiscoveryMessage]:
    """Empty retained payloads on every topic :func:`discovery_messages` can use.

    Publishing these removes the entities from Home Assistant and clears the
    retained configs from the broker, whatever profile published them.
    """
    prefix = _check_prefix(prefix)
    return [DiscoveryMessage(_topic(topics, prefix, e), b"") for e in _entities(topics)]
