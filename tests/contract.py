"""Check MQTT payloads against the contract in docs/ (asyncapi.yaml and schemas/*.json).

Other tests import this to check what the gateway publishes::

    from tests.contract import delivery, validate
    data = validate(topic, payload)          # the parsed payload, or ValidationError
    assert delivery(topic) == (qos, retain)  # as the AsyncAPI operations say

The schemas are loaded once, and references between them resolve from the
files alone (no network).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.mqtt.payloads import encode
from gateway.mqtt.topics import GROUPS, PREFIX, Topics, valid_vehicle_id

DOCS = Path(__file__).resolve().parents[1] / "docs"
ASYNCAPI = DOCS / "asyncapi.yaml"
SCHEMA_DIR = DOCS / "schemas"


@functools.cache
def asyncapi() -> dict[str, Any]:
    """The parsed AsyncAPI document (shared: do not modify it)."""
    doc: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    return doc


def deref(node: Any) -> Any:
    """``node``, or what its local ``$ref`` (``#/channels/...``) names in the AsyncAPI document."""
    while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
        target: Any = asyncapi()
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def delivery(topic: str) -> tuple[int, bool]:
    """(QoS, retain) that the AsyncAPI document gives a concrete topic."""
    schema_name_for(topic)  # refuses topics outside the contract
    for operation in asyncapi()["operations"].values():
        address = deref(operation["channel"])["address"]
        pattern = "/".join("[^/]+" if level.startswith("{") else re.escape(level)
                           for level in address.split("/"))
        if re.fullmatch(pattern, topic):
            mqtt = operation["bindings"]["mqtt"]
            return int(mqtt["qos"]), bool(mqtt["retain"])
    raise AssertionError(f"no operation in {ASYNCAPI.name} publishes {topic!r}")


@functools.cache
def schemas() -> dict[str, dict[str, Any]]:
    """Every schema file in docs/schemas, by file name (``status.json``)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        out[path.name] = json.loads(path.read_text(encoding="utf-8"))
    return out


@functools.cache
def registry() -> Registry[Any]:
    """The schemas registered under their file names, which is what relative $refs resolve to
    when the validated schema has no ``$id``."""
    resources = [
        (name, Resource.from_contents(contents, default_specification=DRAFT202012))
        for name, contents in schemas().items()
    ]
    return Registry().with_resources(resources)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator for schema file ``name``; KeyError if there is no such file."""
    return Draft202012Validator(schemas()[name], registry=registry())


def schema_name_for(topic: str) -> str:
    """The schema file for a concrete topic (``evgw/v1/car-1/state/battery`` -> ``state.json``).

    Raises AssertionError for a topic outside the contract, including the reserved
    ``cmd/...`` topics, which have no schema yet.
    """
    levels = topic.split("/")
    prefix_levels = len(PREFIX.split("/"))
    if len(levels) <= prefix_levels or not valid_vehicle_id(levels[prefix_levels]):
        raise AssertionError(f"not a topic of the contract: {topic!r}")
    # The topics come from the real builders, so a renamed topic fails here too.
    t = Topics(levels[prefix_levels])
    names = {
        t.status: "status.json",
        t.telemetry: "telemetry.json",
        t.backfill: "backfill.json",
        t.alerts: "alerts.json",
        t.alerts_active: "alerts-active.json",
        t.events: "events.json",
        t.location: "location.json",
        t.last_trip: "trips-last.json",
        t.last_charge: "charging-last.json",
        t.health: "health.json",
        **{t.state(group): "state.json" for group in GROUPS},
    }
    try:
        return names[topic]
    except KeyError:
        raise AssertionError(f"not a topic of the contract: {topic!r}") from None


def validate(topic: str, payload: bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Check ``payload`` (wire bytes or a built dict) against the schema of ``topic``.

    A dict is sent through the gateway's own encoder first, so what is checked is
    what would go on the wire. Returns the parsed payload; raises ValidationError
    for a payload that breaks the contract (including one that is not JSON, or
    whose vehicle or group disagrees with the topic) and AssertionError for an
    unknown topic.
    """
    name = schema_name_for(topic)
    data = _parse(payload if isinstance(payload, bytes) else _wire(payload))
    validator(name).validate(data)
    if not isinstance(data, dict):  # the schemas require an object; this narrows the type
        raise ValidationError("payload is not a JSON object")
    levels = topic.split("/")
    vehicle = levels[len(PREFIX.split("/"))]
    if data["vehicle"] != vehicle:
        raise ValidationError(f"payload vehicle {data['vehicle']!r} on the topic of {vehicle!r}")
    if name == "state.json" and data["group"] != levels[-1]:
        raise ValidationError(f"payload group {data['group']!r} on topic {topic!r}")
    return data


def _wire(payload: Mapping[str, Any]) -> bytes:
    try:
        return encode(payload)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"payload cannot be encoded as JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    # Python's json module accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"payload is not UTF-8 JSON: {exc}") from None
