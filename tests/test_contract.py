"""The MQTT contract: docs/asyncapi.yaml and docs/schemas agree with the code that builds topics
and payloads, and the schemas reject payloads that break it."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from gateway.alerts.model import Alert, Severity
from gateway.decode import load_dbc
from gateway.mqtt import payloads as p
from gateway.mqtt.topics import GROUPS, Topics
from gateway.state import SignalView
from tests.conftest import DBC, ROOT, frame
from tests.contract import asyncapi, delivery, deref, schema_name_for, schemas, validate

DOC = asyncapi()
DOCS = ROOT / "docs"
PLACEHOLDER = "vehicle-id-placeholder"
T = Topics("car-1")
NOW = 1_700_000_000.0
TB = "Vehicle.Powertrain.TractionBattery"
KINDS = ["status", "telemetry", "backfill", "state", "alerts", "alerts_active", "events"]
GOOD = [
    SignalView("Vehicle.Speed", 42.5, "km/h", NOW - 0.02, True, False, "motion"),
    SignalView("Vehicle.Body.CommandAckSeq", 7, "", NOW - 5, True, False, "body"),
    SignalView("Vehicle.Body.Trunk.Rear.IsLocked", True, "", NOW - 9, True, True, "body"),
    SignalView("Vehicle.LowVoltageSystemState", "ON", "", NOW - 0.1, True, False, "body"),
    SignalView(f"{TB}.InsulationResistance", None, "kOhm", NOW - 0.3, False, False, "battery"),
    SignalView("Vehicle.Powertrain.Range", None, "m", None, False, True, "battery"),
]
ALERT = Alert("bms.cell_overvoltage", Severity.CRITICAL, "Cell voltage high", NOW,
              signal=f"{TB}.CellVoltage.Max", value=3.71, limit=3.65, source_ts=NOW - 0.01)


def _placeholder_address(topic: str) -> str:
    return topic.replace(PLACEHOLDER, "{vehicle_id}")


def built(kind: str) -> tuple[str, dict[str, Any]]:
    """A topic of ``kind`` and a payload for it made by the real builders."""
    env = p.Envelope("car-1", p.new_boot_id())
    bodies = {
        "status": (T.status, p.status_body(True, 3, "0.1.0", "microev-ref")),
        "telemetry": (T.telemetry, p.telemetry_body("drive", GOOD)),
        "backfill": (T.backfill, p.telemetry_body("park", GOOD)),
        "state": (T.state("body"), p.state_body("body", [v for v in GOOD if v.group == "body"])),
        "alerts": (T.alerts, p.alert_body("raised", ALERT.as_dict())),
        "alerts_active": (T.alerts_active, p.active_alerts_body([ALERT.as_dict()])),
        "events": (T.events, p.event_body("mode_changed", {"from": None, "to": "park"})),
    }
    topic, body = bodies[kind]
    return topic, env.stamp(topic, NOW, body)


# --- the AsyncAPI document against the code -------------------------------------------------

def test_channel_addresses_are_exactly_the_topics_the_code_builds():
    assert DOC["asyncapi"] == "3.0.0"
    assert DOC["defaultContentType"] == "application/json"
    t = Topics(PLACEHOLDER)
    # Every topic property counts, so a topic added to Topics fails here until it is documented.
    # base is not a topic; commands is a subscription filter for the reserved cmd/ levels.
    names = [n for n, a in vars(Topics).items()
             if isinstance(a, property) and n not in {"base", "commands"}]
    expected = {_placeholder_address(getattr(t, n)) for n in names}
    expected.add(_placeholder_address(t.state("{group}")))
    assert {c["address"] for c in DOC["channels"].values()} == expected
    assert t.commands == f"evgw/v1/{PLACEHOLDER}/cmd/#"
    assert "cmd/" in DOC["info"]["description"]


def test_channel_parameters_match_the_address_and_the_groups():
    params = DOC["components"]["parameters"]
    assert params["group"]["enum"] == list(GROUPS)
    for channel in DOC["channels"].values():
        assert set(channel["parameters"]) == set(re.findall(r"\{(\w+)\}", channel["address"]))


def test_operations_publish_each_channel_with_the_documented_delivery():
    for op in DOC["operations"].values():
        assert op["action"] == "send"
        assert op["messages"][0]["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
    assert {op["channel"]["$ref"] for op in DOC["operations"].values()} == {
        f"#/channels/{name}" for name in DOC["channels"]}
    topics = [T.status, T.telemetry, T.backfill, T.alerts, T.alerts_active, T.events,
              *(T.state(g) for g in GROUPS)]
    # The retained topics are exactly those the gateway owns and re-asserts.
    assert {t for t in topics if delivery(t)[1]} == set(T.owned_retained())
    assert delivery(T.telemetry) == (0, False)
    assert {delivery(t)[0] for t in topics if t != T.telemetry} == {1}


def test_message_payloads_reference_existing_schemas_that_the_helper_uses():
    for name, channel in DOC["channels"].items():
        topic = channel["address"].format(vehicle_id="car-1", group="battery")
        for ref in channel["messages"].values():
            message = deref(ref)
            payload = message["payload"]
            assert payload["schemaFormat"] == "application/schema+json;version=draft-2020-12"
            path = DOCS / payload["schema"]["$ref"]
            assert path.is_file(), f"{name}: {path} missing"
            assert path.parent == DOCS / "schemas"
            assert schema_name_for(topic) == path.name


def test_every_schema_file_is_a_valid_draft_2020_12_schema():
    assert {"envelope.json", "status.json", "state.json", "events.json"} <= set(schemas())
    for name, schema in schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(schema)


def test_examples_in_the_asyncapi_document_are_valid():
    count = 0
    for channel in DOC["channels"].values():
        for ref in channel["messages"].values():
            message = deref(ref)
            for example in message["examples"]:
                payload = example["payload"]
                topic = channel["address"].format(
                    vehicle_id=payload["vehicle"], group=payload.get("group", ""))
                validate(topic, payload)
                count += 1
    assert count >= len(DOC["channels"])


def test_the_guide_topic_table_matches_the_asyncapi_document():
    rows = re.findall(r"^\| `([^`]+)` \| (\d) \| (yes|no) \| \[([\w.-]+)\]\(schemas/",
                      (DOCS / "mqtt.md").read_text(encoding="utf-8"), re.MULTILINE)
    table = {(f"evgw/v1/{{vehicle_id}}/{t}", int(q), r == "yes", s) for t, q, r, s in rows}
    documented = set()
    for op in DOC["operations"].values():
        channel = deref(op["channel"])
        mqtt = op["bindings"]["mqtt"]
        message = deref(op["messages"][0])
        schema = message["payload"]["schema"]["$ref"].rsplit("/", 1)[1]
        documented.add((channel["address"], mqtt["qos"], mqtt["retain"], schema))
    assert table == documented


# --- payloads made by the real builders ----------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_built_payloads_validate_as_dicts_and_as_wire_bytes(kind):
    topic, payload = built(kind)
    assert validate(topic, payload) == payload
    assert validate(topic, p.encode(payload)) == payload


def test_status_birth_will_and_goodbye():
    env = p.Envelope("car-1", p.new_boot_id())
    for body in (p.status_body(True, 1, "0.1.0", "microev-ref"),
                 p.status_body(False, 1, "0.1.0", "microev-ref", reason="lost"),
                 p.status_body(False, 2, "0.1.0", "microev-ref", reason="shutdown")):
        assert validate(T.status, env.stamp(T.status, NOW, body))["seq"] >= 1


def test_reference_pipeline_signals_before_during_and_after_frames(ref_pipeline, clock):
    store = ref_pipeline.store
    env = p.Envelope("car-1", p.new_boot_id())
    before = store.snapshot(clock.time())
    assert all(not v.valid for v in before)
    bms = load_dbc(DBC / "reference" / "microev_bms.dbc")
    t0 = clock.time()
    for i, name in enumerate(("BMS_Pack", "BMS_Soc", "BMS_CellStats", "BMS_Temps")):
        msg = bms.get_message_by_name(name)
        data = msg.encode({s.name: s.minimum or 0 for s in msg.signals})
        ref_pipeline.decoders["vehicle"].process([frame(msg.frame_id, data, t0 + i * 0.001)])
    fresh = store.snapshot(t0 + 0.01)
    assert any(v.good for v in fresh)
    for now, views in ((t0, before), (t0 + 0.01, fresh), (t0 + 100, store.snapshot(t0 + 100))):
        for topic, mode in ((T.telemetry, "charge"), (T.backfill, "park")):
            sent = validate(topic, env.stamp(topic, now, p.telemetry_body(mode, views)))
            assert len(sent["signals"]) == len(store)
        for group in GROUPS:
            mine = [v for v in views if v.group == group]
            topic = T.state(group)
            assert validate(topic, env.stamp(topic, now, p.state_body(group, mine)))


def test_alert_lifecycle_and_active_set():
    env = p.Envelope("car-1", p.new_boot_id())
    bare = Alert("gateway.can_silent", Severity.WARNING, "No CAN frames", NOW)
    flag = Alert("bms.fault", Severity.INFO, "Fault flag", NOW, signal=f"{TB}.Fault.1",
                 value=True, limit="x", source_ts=None)
    updated = Alert("bms.cell_overvoltage", Severity.CRITICAL, "Higher still", NOW,
                    value=3, limit=3.65, source_ts=NOW + 1)
    for transition, alert in (("raised", ALERT), ("raised", bare), ("raised", flag),
                              ("updated", updated), ("cleared", ALERT.cleared(NOW + 5, 3.6)),
                              ("cleared", bare.cleared(NOW + 6))):
        validate(T.alerts, env.stamp(T.alerts, NOW, p.alert_body(transition, alert.as_dict())))
    for active in ([], [ALERT, bare, flag]):
        body = p.active_alerts_body(a.as_dict() for a in active)
        assert len(validate(T.alerts_active, env.stamp(T.alerts_active, NOW, body))["alerts"]) \
            == len(active)


@pytest.mark.parametrize(("kind", "data"), [
    ("mode_changed", {"from": None, "to": "drive"}),
    ("mode_changed", {"from": "drive", "to": "charge"}),
    ("gateway_started", {"version": "0.1.0", "profile": "microev-ref"}),
    ("gateway_started", {"version": "0.1.0", "profile": "x", "extra": [1, 2]}),
    ("something_new", {"any": {"shape": None}}),
    ("something_new", {}),
])
def test_events_known_and_unknown(kind, data):
    env = p.Envelope("car-1", p.new_boot_id())
    assert validate(T.events, env.stamp(T.events, NOW, p.event_body(kind, data)))["type"] == kind


# --- what the schemas must reject ----------------------------------------------------------

def mutated(kind: str, change: Any) -> tuple[str, dict[str, Any]]:
    """A valid payload of ``kind`` after ``change(payload)`` altered a copy of it."""
    topic, payload = built(kind)
    payload = copy.deepcopy(payload)
    change(payload)
    return topic, payload


def _first_signal(payload: dict[str, Any]) -> dict[str, Any]:
    return next(iter(payload["signals"].values()))


def _set(path: str, value: Any) -> Any:
    """A change that sets the field at a dotted ``path`` (list items by index) to ``value``."""
    *parents, leaf = path.split(".")

    def change(payload: dict[str, Any]) -> None:
        node: Any = payload
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    return change


@pytest.mark.parametrize("field", ["v", "vehicle", "boot", "seq", "ts"])
@pytest.mark.parametrize("kind", KINDS)
def test_missing_envelope_field_is_rejected(kind, field):
    with pytest.raises(ValidationError, match=f"'{field}' is a required property"):
        validate(*mutated(kind, lambda pl: pl.pop(field)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("field", "value"), [
    ("v", 2), ("v", True), ("vehicle", "car/1"), ("vehicle", ""), ("boot", "3F9A0C1E7B2D4A65"),
    ("boot", "3f9a0c1e7b2d4a6"), ("seq", 0), ("seq", 1.5), ("ts", "1700000000"), ("ts", None),
])
def test_bad_envelope_value_is_rejected(kind, field, value):
    with pytest.raises(ValidationError):
        validate(*mutated(kind, _set(field, value)))


@pytest.mark.parametrize("kind", KINDS)
def test_unexpected_top_level_field_is_rejected(kind):
    with pytest.raises(ValidationError, match="'extra' was unexpected"):
        validate(*mutated(kind, _set("extra", 1)))


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("status", "state", "sleeping"), ("status", "connection", 0), ("telemetry", "mode", "tow"),
    ("backfill", "mode", "Drive"), ("state", "group", "engine"),
    ("alerts", "transition", "acknowledged"), ("alerts", "alert.severity", "fatal"),
    ("alerts_active", "alerts.0.severity", "error"), ("events", "data.to", "tow"),
    ("events", "data.from", "reverse"),
])
def test_wrong_enum_value_is_rejected(kind, path, value):
    with pytest.raises(ValidationError):
        validate(*mutated(kind, _set(path, value)))


@pytest.mark.parametrize("kind", ["telemetry", "backfill", "state"])
def test_signal_with_an_extra_key_is_rejected(kind):
    with pytest.raises(ValidationError, match="'path' was unexpected"):
        validate(*mutated(kind, lambda pl: _first_signal(pl).update(path="Vehicle.Speed")))


@pytest.mark.parametrize("kind", ["telemetry", "backfill", "state"])
@pytest.mark.parametrize("key", ["Speed", "Vehicle", "Vehicle.", "vehicle.Speed",
                                 "Vehicle/Speed", "Vehicle..Speed", "Vehicle.Cabin.Door 1"])
def test_signal_keyed_by_a_non_vss_path_is_rejected(kind, key):
    with pytest.raises(ValidationError, match="does not match"):
        validate(*mutated(kind, lambda pl: pl["signals"].update({key: _first_signal(pl)})))


@pytest.mark.parametrize(("kind", "change"), [
    ("telemetry", lambda pl: pl["signals"]["Vehicle.Speed"].pop("ts")),
    ("telemetry", lambda pl: pl["signals"]["Vehicle.Speed"].update(quality="bad")),
    ("telemetry", lambda pl: pl["signals"]["Vehicle.Speed"].update(quality="invalid")),
    ("telemetry", lambda pl: pl["signals"]["Vehicle.Speed"].update(value=[1])),
    ("state", lambda pl: pl["signals"]["Vehicle.Body.CommandAckSeq"].update(valid=False)),
    ("state", lambda pl: _first_signal(pl).pop("unit")),
    ("state", lambda pl: _first_signal(pl).update(stale="no")),
    ("alerts", lambda pl: pl["alert"].pop("signal")),
    ("alerts", lambda pl: pl["alert"].update(acked=True)),
    ("alerts", lambda pl: pl["alert"].update(cleared_at=NOW)),
    ("alerts", lambda pl: pl.update(transition="cleared")),
    ("alerts_active", lambda pl: pl["alerts"][0].update(cleared_at=NOW)),
    ("alerts_active", lambda pl: pl.update(alerts={})),
    ("events", lambda pl: pl["data"].pop("from")),
    ("events", lambda pl: pl.update(data=None)),
    ("events", lambda pl: pl.update(type="gateway_started")),
])
def test_broken_bodies_are_rejected(kind, change):
    with pytest.raises(ValidationError):
        validate(*mutated(kind, change))


def test_payload_must_agree_with_its_topic():
    topic, payload = built("state")
    with pytest.raises(ValidationError, match="group"):
        validate(T.state("battery"), payload)
    with pytest.raises(ValidationError, match="vehicle"):
        validate(Topics("car-2").status, built("status")[1])
    assert validate(topic, payload)["group"] == "body"


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"[]", b'{"v":NaN}', {"v": float("nan")}])
def test_payload_that_is_not_a_json_object_is_rejected(raw):
    with pytest.raises(ValidationError, match=r"JSON|object"):
        validate(T.status, raw)


@pytest.mark.parametrize("topic", [
    "evgw/v1/car-1/cmd/lock", "homeassistant/sensor/evgw_car-1/battery/config",
    "evgw/v2/car-1/status", "evgw/v1/car 1/status", "evgw/v1/car-1/state/engine",
    "evgw/v1/car-1/state", "evgw/v1/car-1/alerts/active/x", "evgw/v1/car-1", "evgw/v1/+/status",
])
def test_topics_outside_the_contract_are_refused(topic):
    with pytest.raises(AssertionError):
        schema_name_for(topic)
    with pytest.raises(AssertionError):
        validate(topic, built("status")[1])
