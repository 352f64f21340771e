"""The MQTT contract: docs/asyncapi.yaml and docs/schemas agree with the code that builds topics
and payloads, and the schemas reject payloads that break it."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError

from gateway.alerts import AlertBook
from gateway.alerts.model import Alert, Severity
from gateway.clock import ManualClock
from gateway.commands import envelope as cmd_env
from gateway.config.location import GeofenceSpec, InsightSettings
from gateway.decode import load_dbc
from gateway.gnss.fix import Fix
from gateway.gnss.geo import EARTH_RADIUS_M
from gateway.health import Counters, RateLimitedLog
from gateway.insights.charging import ChargeRecorder
from gateway.insights.geofence import Geofences
from gateway.insights.parked import ALERT_KEY, IGNITION, LATITUDE, MovedWhileParked
from gateway.insights.sessions import ChargeSession, Trip
from gateway.insights.trips import TripRecorder
from gateway.mqtt import payloads as p
from gateway.mqtt.link import MAX_INBOUND_PACKET, RESULT_EXPIRY
from gateway.mqtt.topics import GROUPS, Topics
from gateway.state import CATALOG, SignalState, SignalView, StateStore, lookup
from tests.conftest import DBC, ROOT, frame
from tests.contract import (
    asyncapi,
    delivery,
    deref,
    schema_name_for,
    schemas,
    validate,
    validator,
)
from tests.insight_sim import InsightSim

DOC = asyncapi()
DOCS = ROOT / "docs"
PLACEHOLDER = "vehicle-id-placeholder"
T = Topics("car-1")
NOW = 1_700_000_000.0
TB = "Vehicle.Powertrain.TractionBattery"
KINDS = ["status", "telemetry", "backfill", "state", "alerts", "alerts_active", "events",
         "location", "trips_last", "charging_last"]
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
FIX = Fix(NOW - 0.2, NOW - 1, "THREE_D", 48.858370123, 2.294481349, 35.24, 31.477, 87.53, 11,
          0.93)
TRIP = Trip("trip-1", NOW - 1800.1234, NOW - 45.5, 1754.6234, 14.2, "odometer", 1391.6123,
            1588.14, 196.53, 98.001, 81.0, 68.9, 12.1, 72.5, 10234.5, 10248.7,
            (48.858370123, 2.294481349), (48.8462218, 2.3371605), 0.4175, "EUR")
SESSION = ChargeSession("charge-1", NOW - 15800, NOW - 0.25, 15799.75, 68.9, 100.0, 3612.449,
                        37.3111, 1650.23, 1, "unplugged", 1.0837, "EUR")


COMMAND_SCHEMAS = {"commandRequest": "command-request.json",
                   "commandResult": "command-result.json",
                   "commandResponse": "command-result.json"}
"""Command channels carry signed wrappers; tests/contract.py validates the enveloped topics."""
BODY_SCHEMAS = {"command-request.json": "command-body.json",
                "command-result.json": "command-result-body.json"}
SENDER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def _placeholder_address(topic: str) -> str:
    return topic.replace(PLACEHOLDER, "{vehicle_id}")


def validate_signed(wrapper: str, payload: bytes) -> dict[str, Any]:
    """Check a command or result payload against its wrapper schema and its decoded body
    against the body schema; returns the body."""
    validator(wrapper).validate(json.loads(payload))
    body: dict[str, Any] = json.loads(cmd_env.unwrap(payload).body)
    validator(BODY_SCHEMAS[wrapper]).validate(body)
    return body


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
        "location": (T.location, p.location_body(FIX.as_dict())),
        "trips_last": (T.last_trip, p.record_body("trip", TRIP.as_dict())),
        "charging_last": (T.last_charge, p.record_body("session", SESSION.as_dict())),
    }
    topic, body = bodies[kind]
    return topic, env.stamp(topic, NOW, body)


# --- the AsyncAPI document against the code -------------------------------------------------

def test_channel_addresses_are_exactly_the_topics_the_code_builds():
    assert DOC["asyncapi"] == "3.0.0"
    assert DOC["defaultContentType"] == "application/json"
    t = Topics(PLACEHOLDER)
    # Every topic property counts, so a topic added to Topics fails here until it is documented.
    names = [n for n, a in vars(Topics).items() if isinstance(a, property) and n != "base"]
    expected = {_placeholder_address(getattr(t, n)) for n in names}
    # So does every method; these two build topics from a parameter.
    assert {n for n, a in vars(Topics).items() if inspect.isfunction(a)
            and not n.startswith("_")} == {"state", "command_result", "valid_response_topic",
                                           "owned_retained"}
    expected.add(_placeholder_address(t.state("{group}")))
    expected.add(_placeholder_address(t.command_result("{command_id}")))
    addresses = [c["address"] for c in DOC["channels"].values()]
    assert {a for a in addresses if a is not None} == expected
    assert t.command_request == f"evgw/v1/{PLACEHOLDER}/cmd/req"
    # The one channel without an address is the requester's MQTT 5 response topic.
    assert [n for n, c in DOC["channels"].items() if c["address"] is None] == ["commandResponse"]
    assert "cmd/req" in DOC["info"]["description"]


def test_channel_parameters_match_the_address_and_the_groups():
    params = DOC["components"]["parameters"]
    assert params["group"]["enum"] == list(GROUPS)
    for channel in DOC["channels"].values():
        assert set(channel.get("parameters", {})) == set(
            re.findall(r"\{(\w+)\}", channel["address"] or ""))
    assert re.fullmatch(r"[0-9a-f]{32}", params["command_id"]["examples"][0])


def test_operations_publish_each_channel_with_the_documented_delivery():
    for name, op in DOC["operations"].items():
        assert op["action"] == ("receive" if name == "receiveCommand" else "send")
        assert op["messages"][0]["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
    reply = DOC["operations"]["receiveCommand"]["reply"]
    assert reply["messages"][0]["$ref"].startswith(reply["channel"]["$ref"] + "/messages/")
    assert reply["address"]["location"].startswith("$message.header#/")
    used = {op["channel"]["$ref"] for op in DOC["operations"].values()} | {reply["channel"]["$ref"]}
    assert used == {f"#/channels/{name}" for name in DOC["channels"]}
    for name in ("receiveCommand", "publishCommandResult"):
        mqtt = DOC["operations"][name]["bindings"]["mqtt"]
        assert (mqtt["qos"], mqtt["retain"]) == (1, False)
    assert DOC["operations"]["publishCommandResult"]["bindings"]["mqtt"][
        "messageExpiryInterval"] == RESULT_EXPIRY
    # The MQTT 5 Maximum Packet Size the gateway asks for when it connects.
    assert DOC["servers"]["broker"]["bindings"]["mqtt"]["maximumPacketSize"] \
        == MAX_INBOUND_PACKET
    topics = [T.status, T.telemetry, T.backfill, T.alerts, T.alerts_active, T.events,
              T.location, T.last_trip, T.last_charge, *(T.state(g) for g in GROUPS)]
    # The retained topics are exactly those the gateway owns and re-asserts.
    assert {t for t in topics if delivery(t)[1]} == set(T.owned_retained())
    # Only the live topics may lose messages; everything else goes through the outbox.
    live = {T.telemetry, T.location}
    assert {delivery(t) for t in live} == {(0, False)}
    assert {delivery(t)[0] for t in topics if t not in live} == {1}


def test_message_payloads_reference_existing_schemas_that_the_helper_uses():
    for name, channel in DOC["channels"].items():
        for ref in channel["messages"].values():
            message = deref(ref)
            payload = message["payload"]
            assert payload["schemaFormat"] == "application/schema+json;version=draft-2020-12"
            path = DOCS / payload["schema"]["$ref"]
            assert path.is_file(), f"{name}: {path} missing"
            assert path.parent == DOCS / "schemas"
            if name in COMMAND_SCHEMAS:
                assert path.name == COMMAND_SCHEMAS[name]
                continue
            topic = channel["address"].format(vehicle_id="car-1", group="battery")
            assert schema_name_for(topic) == path.name
    assert set(COMMAND_SCHEMAS.values()) | set(BODY_SCHEMAS.values()) <= set(schemas())


def test_every_schema_file_is_a_valid_draft_2020_12_schema():
    assert {"envelope.json", "status.json", "state.json", "events.json"} <= set(schemas())
    for name, schema in schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(schema)


def test_examples_in_the_asyncapi_document_are_valid():
    count = 0
    for name, channel in DOC["channels"].items():
        for ref in channel["messages"].values():
            message = deref(ref)
            for example in message["examples"]:
                payload = example["payload"]
                if name in COMMAND_SCHEMAS:
                    validate_signed(COMMAND_SCHEMAS[name], json.dumps(payload).encode())
                    count += 1
                    continue
                topic = channel["address"].format(
                    vehicle_id=payload["vehicle"], group=payload.get("group", ""))
                validate(topic, payload)
                count += 1
    assert count >= len(DOC["channels"])


def test_the_signal_catalog_in_the_profile_guide_matches_the_code():
    # The state topics carry catalog signals: every one is listed with its unit, kind and group.
    rows = re.findall(r"^\| `(Vehicle\.[^`]+)` \| ([^|]+) \| (\w+) \| (\w+) \|",
                      (DOCS / "profiles.md").read_text(encoding="utf-8"), re.MULTILINE)
    documented = {path: (unit.strip(), kind, group) for path, unit, kind, group in rows}
    no_unit = "\N{EN DASH}"
    assert documented == {e.path: (e.unit or no_unit, e.kind, e.group) for e in CATALOG.values()}


@pytest.mark.parametrize("guide", ["mqtt.md", "insights.md", "configuration.md", "profiles.md"])
def test_the_guides_links_resolve(guide):
    links = re.findall(r"\]\(([\w./-]*)(?:#([\w-]+))?\)",
                       (DOCS / guide).read_text(encoding="utf-8"))
    assert links
    for target, anchor in links:
        path = DOCS / (target or guide)
        assert path.exists(), f"{guide}: {target}"
        if anchor:
            heads = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {re.sub(r"[^\w -]", "", h.lower()).replace(" ", "-") for h in heads}
            assert anchor in slugs, f"{guide}: {target}#{anchor}"


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


# --- position, trips, charging sessions, geofences --------------------------------------------

def _fix(fix_type: str = "THREE_D", **fields: Any) -> Fix:
    """FIX with some fields replaced; without a fix, every position field is None."""
    values: dict[str, Any] = {"fix_type": fix_type}
    if fix_type == "NONE":
        values.update(lat=None, lon=None, alt=None, speed_kmh=None, heading=None, hdop=None)
    return replace(FIX, **values, **fields)


@pytest.mark.parametrize("fix", [
    FIX,
    _fix("TWO_D", alt=None, satellites=4, hdop=4.2),
    _fix("NONE", satellites=2),
    _fix("NONE", satellites=None, utc=None),
    _fix(utc=None, heading=None, speed_kmh=0.0),
    _fix(lat=-33.8567844, lon=-151.2152967, alt=-12.0, heading=359.99),
    _fix(lat=90.0, lon=-180.0, hdop=0.0),
])
def test_location_bodies_from_real_fixes(fix):
    env = p.Envelope("car-1", p.new_boot_id())
    sent = validate(T.location, env.stamp(T.location, NOW, p.location_body(fix.as_dict())))
    position = sent["position"]
    assert position == fix.as_dict()
    assert (position["lat"] is None) == (position["lon"] is None) == (not fix.valid)
    assert position["accuracy"] == fix.accuracy_m


@given(st.sampled_from(["TWO_D", "THREE_D"]), st.floats(-90, 90), st.floats(-180, 180),
       st.none() | st.floats(-500, 9000), st.none() | st.floats(0, 400),
       st.none() | st.floats(0, 359.999), st.none() | st.integers(0, 99),
       st.none() | st.floats(0, 99.9))
def test_any_fix_in_range_makes_a_valid_location(fix_type, lat, lon, alt, speed, heading,
                                                 satellites, hdop):
    fix = Fix(NOW, None, fix_type, lat, lon, alt, speed, heading, satellites, hdop)
    env = p.Envelope("car-1", "0123456789abcdef")
    assert validate(T.location, env.stamp(T.location, NOW, p.location_body(fix.as_dict())))


UNMEASURED = Trip("trip-2", NOW - 60, NOW, 60.0, 0.0, None, 0.0, 0.0, 0.0, None, None, None,
                  None, None, None, None, None, None)


@pytest.mark.parametrize("trip", [TRIP, UNMEASURED])
def test_a_trip_as_retained_record_and_as_event(trip):
    env = p.Envelope("car-1", p.new_boot_id())
    record = validate(T.last_trip, env.stamp(T.last_trip, NOW, p.record_body("trip",
                                                                              trip.as_dict())))
    event = validate(T.events, env.stamp(T.events, NOW, p.event_body("trip", trip.as_dict())))
    # The two carry the same object, as the guide promises.
    assert record["trip"] == event["data"] == trip.as_dict()
    assert record["trip"]["start_position"] in ([48.8583701, 2.2944813], None)


@pytest.mark.parametrize("session", [
    SESSION,
    ChargeSession("charge-2", NOW - 400, NOW, 400.0, None, None, 0.0, 0.0, 0.0, 0, "stopped"),
    ChargeSession("charge-3", NOW - 9, NOW, 9.0, 55.0, 55.5, 12.5, 0.13, 1400.0, 3,
                  "gateway_restart", None, ""),
])
def test_a_charging_session_as_retained_record_and_as_event(session):
    env = p.Envelope("car-1", p.new_boot_id())
    body = p.record_body("session", session.as_dict())
    record = validate(T.last_charge, env.stamp(T.last_charge, NOW, body))
    event = validate(T.events, env.stamp(T.events, NOW,
                                         p.event_body("charge_session", session.as_dict())))
    assert record["session"] == event["data"] == session.as_dict()


def test_a_simulated_drive_and_charge_publish_records_that_follow_the_contract():
    # The real recorders on a simulated car, published as the wiring does: event + record.
    sim = InsightSim()
    env = p.Envelope("car-1", p.new_boot_id())
    sent: list[tuple[str, dict[str, Any]]] = []

    def publish(kind: str, topic: str, key: str, data: Mapping[str, Any]) -> None:
        for where, body in ((T.events, p.event_body(kind, data)),
                            (topic, p.record_body(key, data))):
            sent.append((where, validate(where, env.stamp(where, sim.now, body))))

    settings = InsightSettings(trip_end_park_s=60.0, charge_end_s=60.0,
                               energy_price_per_kwh=0.3, currency="EUR")
    trips = TripRecorder(sim.store, sim.meter, sim.clock, settings,
                         lambda t: publish("trip", T.last_trip, "trip", t.as_dict()))
    charges = ChargeRecorder(sim.store, sim.meter, sim.clock, settings,
                             lambda c: publish("charge_session", T.last_charge, "session",
                                               c.as_dict()))
    sim.each_second += [trips.update, charges.update]
    sim.fix_listeners.append(trips.on_fix)
    sim.drive(60)
    sim.park(70)
    sim.charge(30)
    sim.park(2, bus_awake=True)
    assert [topic for topic, _ in sent] == [T.events, T.last_trip, T.events, T.last_charge]
    (_, trip_event), (_, last_trip), (_, charge_event), (_, last_charge) = sent
    assert trip_event["data"] == last_trip["trip"]
    assert charge_event["data"] == last_charge["session"]
    assert last_trip["trip"]["distance_source"] == "gnss"  # a 60 s hop: under 2 km
    assert last_trip["trip"]["currency"] == last_charge["session"]["currency"] == "EUR"
    assert last_charge["session"]["end_reason"] == "unplugged"


def test_event_data_may_grow_but_retained_records_may_not():
    env = p.Envelope("car-1", p.new_boot_id())
    grown = {**TRIP.as_dict(), "added_later": 1}
    assert validate(T.events, env.stamp(T.events, NOW, p.event_body("trip", grown)))
    with pytest.raises(ValidationError, match="added_later"):
        validate(T.last_trip, env.stamp(T.last_trip, NOW, p.record_body("trip", grown)))


M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180.0


def test_geofence_events_of_the_real_tracker_follow_the_contract():
    clock = ManualClock()
    sent: list[dict[str, Any]] = []
    env = p.Envelope("car-1", p.new_boot_id())

    def sink(kind: str, data: Mapping[str, Any]) -> None:
        sent.append(validate(T.events, env.stamp(T.events, clock.time(),
                                                 p.event_body(kind, data))))

    depot = GeofenceSpec("depot", "circle", center=FIX.position, radius_m=200.0)
    fences = Geofences([depot], sink, clock, Counters(),
                       RateLimitedLog(logging.getLogger("test.contract"), clock), max_hdop=5.0)
    for inside_m in (150, 150, -60, -60, 100, 100):  # known inside, exited, entered
        clock.advance(1.0)
        north = (200.0 - inside_m) / M_PER_DEG_LAT
        assert FIX.lat is not None
        fences.on_fix(_fix(received=clock.time(), lat=FIX.lat + north))
    assert [(e["type"], e["data"]["fence"]) for e in sent] == [
        ("geofence_exited", "depot"), ("geofence_entered", "depot")]
    exited, entered = (e["data"] for e in sent)
    assert exited["distance_m"] == pytest.approx(-60.0, abs=0.2)
    assert entered["distance_m"] == pytest.approx(100.0, abs=0.2)
    # The sign is part of the contract: an "entered" outside the fence is refused.
    wrong = env.stamp(T.events, NOW, p.event_body("geofence_entered", exited))
    with pytest.raises(ValidationError):
        validate(T.events, wrong)


class _AlertPayloads:
    """An AlertSink that builds and checks what the durable path would publish."""

    def __init__(self) -> None:
        self.env = p.Envelope("car-1", p.new_boot_id())
        self.sent: list[dict[str, Any]] = []

    def alert(self, transition: str, alert: Alert) -> None:
        body = p.alert_body(transition, alert.as_dict())
        self.sent.append(validate(T.alerts, self.env.stamp(T.alerts, NOW, body)))

    def active_alerts(self, alerts: Any) -> None:
        body = p.active_alerts_body(a.as_dict() for a in alerts)
        validate(T.alerts_active, self.env.stamp(T.alerts_active, NOW, body))


def test_the_moved_while_parked_alert_follows_the_contract():
    clock = ManualClock()
    store = StateStore()
    for path in (IGNITION, LATITUDE):
        entry = lookup(path)
        assert entry is not None
        store.register(SignalState(path, entry.unit, entry.kind, entry.group, 2.0))
    payloads = _AlertPayloads()
    parked = MovedWhileParked(store, AlertBook(clock, payloads), clock, 100.0, max_hdop=5.0)
    store.slot(IGNITION).set("OFF", clock.time())
    parked.update(clock.time())
    assert FIX.lat is not None
    for north_m in (0.0, 400.0, 420.0):  # the anchor, then towed away
        clock.advance(1.0)
        parked.on_fix(_fix(received=clock.time(), lat=FIX.lat + north_m / M_PER_DEG_LAT))
    store.slot(IGNITION).set("ON", clock.time())
    parked.update(clock.time())
    assert [(a["transition"], a["alert"]["key"], a["alert"]["severity"])
            for a in payloads.sent] == [("raised", ALERT_KEY, "critical"),
                                        ("cleared", ALERT_KEY, "critical")]


GATEWAY_SIGNALS = {
    "Vehicle.CurrentLocation.Latitude": FIX.lat,
    "Vehicle.CurrentLocation.Longitude": FIX.lon,
    "Vehicle.CurrentLocation.Altitude": FIX.alt,
    "Vehicle.CurrentLocation.Heading": FIX.heading,
    "Vehicle.CurrentLocation.Speed": FIX.speed_kmh,
    "Vehicle.CurrentLocation.HorizontalAccuracy": FIX.accuracy_m,
    "Vehicle.CurrentLocation.Timestamp": FIX.utc_iso(),
    "Vehicle.CurrentLocation.GNSSReceiver.FixType": FIX.fix_type,
    "Vehicle.CurrentLocation.GNSSReceiver.SatellitesUsed": FIX.satellites,
    "Vehicle.CurrentLocation.GNSSReceiver.HDOP": FIX.hdop,
    f"{TB}.EquivalentFullCycles": 12.37,
    f"{TB}.Estimate.Capacity": 116.9,
    f"{TB}.Estimate.StateOfHealth": 97.4,
    f"{TB}.Estimate.Consumption": 101.2,
    f"{TB}.Estimate.Range": 83.5,
    f"{TB}.CellVoltage.Spread": 14.0,
    f"{TB}.CellVoltage.SpreadTrend": -0.6,
}


def test_gateway_computed_signals_in_state_and_backfill():
    store = StateStore()
    for path in GATEWAY_SIGNALS:
        entry = CATALOG[path]
        store.register(SignalState(path, entry.unit, entry.kind, entry.group, 3.0))
    env = p.Envelope("car-1", p.new_boot_id())

    def check(now: float) -> list[dict[str, Any]]:
        views = store.snapshot(now)
        validate(T.backfill, env.stamp(T.backfill, now, p.telemetry_body("park", views)))
        return [validate(T.state(g), env.stamp(T.state(g), now,
                                               p.state_body(g, [v for v in views if v.group == g])))
                for g in ("location", "battery")]

    assert all(not e["valid"] for sent in check(NOW) for e in sent["signals"].values())
    for path, value in GATEWAY_SIGNALS.items():
        store.slot(path).set(value, FIX.received)
    location, battery = check(NOW)
    assert {k: e["value"] for k, e in {**location["signals"], **battery["signals"]}.items()} \
        == GATEWAY_SIGNALS
    assert location["signals"]["Vehicle.CurrentLocation.Timestamp"]["value"].endswith("Z")
    assert all(e["stale"] for e in check(NOW + 10)[0]["signals"].values())


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
    ("events", "data.from", "reverse"), ("location", "position.fix", "3D"),
    ("location", "position.fix", "DGPS"), ("trips_last", "trip.distance_source", "gps"),
    ("charging_last", "session.end_reason", "timeout"),
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
    ("events", lambda pl: pl.update(type="trip")),
    ("events", lambda pl: pl.update(type="charge_session")),
    ("events", lambda pl: pl.update(type="geofence_exited")),
    # Latitude and longitude never travel apart, and without a fix there is no position.
    ("location", lambda pl: pl["position"].update(lon=None)),
    ("location", lambda pl: pl["position"].update(lat=None)),
    ("location", lambda pl: pl["position"].update(fix="NONE")),
    ("location", lambda pl: pl["position"].update(lat=90.5)),
    ("location", lambda pl: pl["position"].update(lon=-180.01)),
    ("location", lambda pl: pl["position"].update(heading=-1)),
    ("location", lambda pl: pl["position"].update(satellites=7.5)),
    ("location", lambda pl: pl["position"].update(ts=None)),
    ("location", lambda pl: pl["position"].pop("accuracy")),
    ("location", lambda pl: pl["position"].update(course=87.5)),
    ("location", lambda pl: pl.update(position=None)),
    ("location", lambda pl: pl.update(signals={})),
    ("trips_last", lambda pl: pl["trip"].pop("energy_wh")),
    ("trips_last", lambda pl: pl["trip"].update(extra=1)),
    ("trips_last", lambda pl: pl["trip"].update(distance_km=-0.1)),
    ("trips_last", lambda pl: pl["trip"].update(start_position=[48.8, 2.3, 35.0])),
    ("trips_last", lambda pl: pl["trip"].update(end_position=[2.3])),
    ("trips_last", lambda pl: pl["trip"].update(end_position={"lat": 48.8, "lon": 2.3})),
    ("trips_last", lambda pl: pl["trip"].update(currency=None)),
    ("trips_last", lambda pl: pl.update(session=pl.pop("trip"))),
    ("charging_last", lambda pl: pl["session"].update(interruptions=1.5)),
    ("charging_last", lambda pl: pl["session"].update(energy_wh=-1)),
    ("charging_last", lambda pl: pl["session"].pop("ah")),
    ("charging_last", lambda pl: pl["session"].update(extra=1)),
    ("charging_last", lambda pl: pl.update(trip=pl.pop("session"))),
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
    "evgw/v1/car-1/trips", "evgw/v1/car-1/charging/last/x", "evgw/v1/car-1/location/live",
])
def test_topics_outside_the_contract_are_refused(topic):
    with pytest.raises(AssertionError):
        schema_name_for(topic)
    with pytest.raises(AssertionError):
        validate(topic, built("status")[1])


# --- signed commands and their results -----------------------------------------------------

def command(cmd: str = "lock", args: dict[str, Any] | None = None) -> cmd_env.Command:
    """A command of the reference car, as an app would make it."""
    return cmd_env.Command("car-1", "0123456789abcdef0123456789abcdef", cmd, args or {},
                           1_700_000_000_000, 1_700_000_030_000,
                           cmd_env.key_id(SENDER.public_key()))


REQ = cmd_env.request_digest(cmd_env.sign_command(command(), SENDER))


@pytest.mark.parametrize(("cmd", "args"), [
    ("lock", {}), ("unlock", {}), ("locate", {}), ("locate", {"mode": "horn"}),
    ("charge-limit", {"soc": 80}), ("charge-limit", {"soc": 50.0}),
    ("speed-profile", {"profile": "none"}), ("reset-latches", {}),
    ("reset-latches", {"key": "battery.cell_overvoltage"}),
])
def test_signed_commands_validate_and_parse_back(cmd, args):
    payload = cmd_env.sign_command(command(cmd, args), SENDER)
    assert validate_signed("command-request.json", payload)["cmd"] == cmd
    assert cmd_env.parse_command(cmd_env.unwrap(payload).body) == command(cmd, args)


@pytest.mark.parametrize(("status", "reason", "detail"), [
    ("accepted", None, None), ("succeeded", None, {"attempts": 1}),
    ("succeeded", None, {"released": []}), ("failed", "timeout", {"attempts": 2, "reported": None}),
    ("failed", "interrupted", None), ("rejected", "vehicle_moving", {"motion": ["moving"]}),
    ("rejected", "malformed", {"error": "not JSON"}), ("expired", "expired", None),
    ("failed", "unconfirmed", {"attempts": 1, "refused": "vehicle_moving"}),
    ("rejected", "rate_limited", None),
])
def test_signed_results_validate_and_open(status, reason, detail):
    broken = reason == "malformed"
    result = cmd_env.Result("car-1", None if broken else command().id,
                            None if broken else "lock", status, reason,
                            1_700_000_000_412, cmd_env.key_id(GATEWAY.public_key()),
                            None if broken else command().kid, detail, REQ)
    payload = cmd_env.sign_result(result, GATEWAY)
    assert validate_signed("command-result.json", payload)["status"] == status
    assert cmd_env.open_result(payload, GATEWAY.public_key()) == result


def _body(change: Any) -> bytes:
    body = command().body()
    change(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize("change", [
    lambda b: b.pop("kid"), lambda b: b.update(extra=1), lambda b: b.update(id=b["id"].upper()),
    lambda b: b.update(id=b["id"][:30]), lambda b: b.update(issued_at_ms=1.7e12 + 0.5),
    lambda b: b.update(expires_at_ms="1700000030000"), lambda b: b.update(issued_at_ms=True),
    lambda b: b.update(issued_at_ms=-1), lambda b: b.update(kid="0" * 17),
    lambda b: b.update(args=[]), lambda b: b.update(cmd="Lock"), lambda b: b.update(vehicle=7),
])
def test_bodies_the_gateway_refuses_break_the_schema_too(change):
    raw = _body(change)
    with pytest.raises(cmd_env.Malformed):
        cmd_env.parse_command(raw)
    with pytest.raises(ValidationError):
        validator("command-body.json").validate(json.loads(raw))


@pytest.mark.parametrize(("cmd", "args"), [
    ("open-trunk", {}), ("charge-limit", {}), ("charge-limit", {"soc": "80"}),
    ("lock", {"force": True}), ("speed-profile", {}), ("reset-latches", {"key": 3}),
])
def test_commands_the_gateway_would_refuse_later_break_the_schema(cmd, args):
    # Well formed, so they parse; the gateway refuses them as not_supported / bad_arguments.
    raw = _body(lambda b: b.update(cmd=cmd, args=args))
    assert cmd_env.parse_command(raw).cmd == cmd
    with pytest.raises(ValidationError):
        validator("command-body.json").validate(json.loads(raw))


@pytest.mark.parametrize("wrapper", ["command-request.json", "command-result.json"])
@pytest.mark.parametrize("change", [
    lambda w: w.update(v=2), lambda w: w.update(extra=1), lambda w: w.pop("sig"),
    lambda w: w.update(sig=w["sig"][:80]), lambda w: w.update(body=w["body"] + "+"),
    lambda w: w.update(body=None),
])
def test_wrappers_the_gateway_refuses_break_the_schemas(wrapper, change):
    payload = cmd_env.sign_command(command(), SENDER)
    outer = json.loads(payload)
    change(outer)
    with pytest.raises(cmd_env.Malformed):
        cmd_env.unwrap(json.dumps(outer).encode())
    with pytest.raises(ValidationError):
        validator(wrapper).validate(outer)


@pytest.mark.parametrize("change", [
    lambda r: r.update(reason="timeout"), lambda r: r.update(status="failed"),
    lambda r: r.update(status="failed", reason="vehicle_moving"),
    lambda r: r.update(status="rejected"), lambda r: r.update(status="expired", reason="timeout"),
    lambda r: r.update(status="rejected", reason="oops"), lambda r: r.update(id=None),
    lambda r: r.update(detail={}), lambda r: r.update(key="ABCDEF0123456789"),
    lambda r: r.pop("at_ms"), lambda r: r.update(status="done"), lambda r: r.update(extra=1),
    lambda r: r.pop("req"), lambda r: r.update(req=None), lambda r: r.update(req=REQ.upper()),
    lambda r: r.update(req=REQ[:31]), lambda r: r.update(req=REQ + "0"),
    lambda r: r.update(status="rejected", reason="unconfirmed"),
])
def test_broken_result_bodies_are_rejected(change):
    result = cmd_env.Result("car-1", command().id, "lock", "succeeded", None, 1_700_000_000_412,
                            cmd_env.key_id(GATEWAY.public_key()), command().kid,
                            {"attempts": 1}, REQ).body()
    validator("command-result-body.json").validate(result)
    change(result)
    with pytest.raises(ValidationError):
        validator("command-result-body.json").validate(result)


def test_req_is_the_truncated_sha256_of_body_then_signature():
    payload = cmd_env.sign_command(command(), SENDER)
    signed = cmd_env.unwrap(payload)
    assert re.fullmatch(r"[0-9a-f]{32}", REQ)
    assert hashlib.sha256(signed.body + signed.sig).hexdigest()[:32] == REQ
    assert hashlib.sha256(payload).hexdigest()[:32] != REQ
    # The same body and signature in another wrapper are the same request...
    outer = json.loads(payload)
    spaced = json.dumps(outer, indent=1).encode()
    padded = json.dumps({**outer, "sig": outer["sig"] + "=="}).encode()
    for rewrapped in (spaced, padded, b" " + payload):
        assert rewrapped != payload and cmd_env.unwrap(rewrapped) == signed
        assert cmd_env.request_digest(rewrapped) == REQ
    # ...another signature or another body is not.
    forged = cmd_env.wrap(signed.body, bytes(64))
    other = cmd_env.sign_command(command("unlock"), SENDER)
    assert len({REQ, cmd_env.request_digest(forged), cmd_env.request_digest(other)}) == 3


@pytest.mark.parametrize("payload", [b"{not json", b"", b'{"v":1,"body":"e30","sig":"x"}',
                                     b"x" * (cmd_env.MAX_PAYLOAD + 1)])
def test_req_of_a_payload_that_is_no_wrapper_digests_its_raw_bytes(payload):
    with pytest.raises(cmd_env.Malformed):
        cmd_env.unwrap(payload)
    assert cmd_env.request_digest(payload) == hashlib.sha256(payload).hexdigest()[:32]


def test_req_of_a_wrapper_around_a_broken_body_still_digests_body_and_signature():
    wire = cmd_env.wrap(b"not a command", bytes(range(64)))
    assert cmd_env.request_digest(wire) == hashlib.sha256(
        b"not a command" + bytes(range(64))).hexdigest()[:32]


def test_a_result_without_req_still_opens_but_breaks_the_schema():
    result = cmd_env.Result("car-1", command().id, "lock", "succeeded", None, 1_700_000_000_412,
                            cmd_env.key_id(GATEWAY.public_key()), command().kid)
    body = result.body()
    body.pop("req")
    raw = json.dumps(body).encode()
    payload = cmd_env.wrap(raw, GATEWAY.sign(cmd_env.RESULT_CONTEXT + raw))
    assert cmd_env.open_result(payload, GATEWAY.public_key()).req is None
    with pytest.raises(ValidationError, match="'req' is a required property"):
        validator("command-result-body.json").validate(body)
