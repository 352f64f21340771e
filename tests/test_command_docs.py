"""docs/commands.md cannot drift from the code.

The worked examples are read out of the guide's labelled blocks
(``<!-- example:NAME -->`` before a fence) and checked byte for byte against
gateway.commands.envelope; the reason-code, status, role and command tables,
the settings and profile key tables and the CLI synopsis are compared with
the source; and every result the real command service publishes is checked
against the JSON Schemas, the reason-code table (including its "Stored"
column) and what the guide says about topics, ``req`` and answer limits.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import datetime
import hashlib
import json
import re
import textwrap
from collections.abc import Callable
from typing import Any

import can
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.app import Commands, Safety
from gateway.cli import build_parser
from gateway.clock import ManualClock
from gateway.commands import envelope as env
from gateway.commands.keys import COMMANDS, ROLES, KeyFile, key_entry, load_keyring
from gateway.commands.outcome import STATIONARY_ONLY
from gateway.commands.replay import Record, ReplayCache
from gateway.commands.service import UNSTORED_ANSWER_RATE, CommandService, Incoming, Policy
from gateway.config.settings import CommandSettings
from gateway.health import Counters
from gateway.mqtt.link import LIVE_QUEUE, MAX_INBOUND_PACKET, RESULT_EXPIRY
from gateway.mqtt.payloads import Envelope, event_body, new_boot_id
from gateway.mqtt.topics import Topics
from tests.conftest import ROOT
from tests.contract import asyncapi, schemas, validate, validator

DOCS = ROOT / "docs"
TEXT = (DOCS / "commands.md").read_text(encoding="utf-8")
SOURCES = sorted((ROOT / "gateway" / "commands").glob("*.py"))
RFC8032_PUBLIC_1 = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_PUBLIC_2 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"


def blocks() -> dict[str, str]:
    """The labelled fenced blocks of the guide, by label, without their indentation."""
    found = re.findall(r"^( *)<!-- example:([\w-]+) -->\n *```\w*\n(.*?)\n *```$", TEXT,
                       re.MULTILINE | re.DOTALL)
    out = {name: "\n".join(line[len(indent):] for line in body.split("\n"))
           for indent, name, body in found}
    assert len(out) == len(found), "a label is used twice"
    return out


EX = blocks()


def key(seed_hex: str) -> Ed25519PrivateKey:
    """The private key with this RFC 8032 seed."""
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def table(text: str, marker: str) -> list[list[str]]:
    """The cells of the rows of the table between ``<!-- marker:start/end -->``."""
    part = text.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    rows = [line.strip() for line in part.splitlines() if line.strip().startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def ticked(cell: str) -> list[str]:
    """The `code` spans of a table cell."""
    return re.findall(r"`([^`]+)`", cell)


# --- the worked examples -----------------------------------------------------------------

def test_the_example_keys_are_the_rfc_8032_test_vectors_with_their_ids():
    for seed, public, kid, rfc in (("seed", "public-key", "kid", RFC8032_PUBLIC_1),
                                   ("gateway-seed", "gateway-public-key", "gateway-kid",
                                    RFC8032_PUBLIC_2)):
        pub = key(EX[seed]).public_key()
        assert env.raw_public_key(pub).hex() == rfc
        assert env.b64url(env.raw_public_key(pub)) == EX[public]
        assert env.key_id(pub) == EX[kid] == env.key_id(
            Ed25519PrivateKey.from_private_bytes(bytes.fromhex(EX[seed])).public_key())
    assert RFC8032_PUBLIC_1 in TEXT


def test_the_contexts_and_the_signed_input_are_shown_byte_for_byte():
    assert env.COMMAND_CONTEXT.hex(" ") in TEXT
    assert env.RESULT_CONTEXT.hex(" ") in TEXT
    signed = bytes.fromhex("".join(EX["signed-input"].split()))
    assert signed == env.COMMAND_CONTEXT + EX["body"].encode()
    assert f"{len(EX['body'])} bytes" in TEXT and f"{len(signed)} bytes" in TEXT


def test_the_shown_payload_unwraps_parses_and_verifies_with_the_shown_key():
    payload = EX["payload"].encode()
    assert f"{len(payload)} bytes" in TEXT
    signed = env.unwrap(payload)
    assert signed.body == EX["body"].encode()
    assert signed.sig == env.unb64url(EX["signature"])
    command = env.parse_command(signed.body)
    assert (command.vehicle, command.cmd, command.args, command.kid) == (
        "car-1", "charge-limit", {"soc": 80}, EX["kid"])
    assert command.expires_at_ms - command.issued_at_ms == 30_000
    pub = key(EX["seed"]).public_key()
    assert env.verify(pub, env.COMMAND_CONTEXT, signed)
    assert not env.verify(key(EX["gateway-seed"]).public_key(), env.COMMAND_CONTEXT, signed)
    assert not env.verify(pub, env.RESULT_CONTEXT, signed)
    tampered = env.SignedPayload(signed.body.replace(b":80", b":81"), signed.sig)
    assert not env.verify(pub, env.COMMAND_CONTEXT, tampered)


def test_signing_the_shown_body_reproduces_the_signature_and_the_payload():
    sender = key(EX["seed"])
    body = EX["body"].encode()
    assert env.b64url(sender.sign(env.COMMAND_CONTEXT + body)) == EX["signature"]
    assert env.sign_command(env.parse_command(body), sender) == EX["payload"].encode()


def test_any_serialization_verifies_but_duplicate_keys_are_refused():
    sender = key(EX["seed"])
    data = json.loads(EX["body"])
    other = json.dumps(dict(reversed(list(data.items()))), indent=2).encode()
    wire = env.wrap(other, sender.sign(env.COMMAND_CONTEXT + other))
    signed = env.unwrap(wire)
    assert env.verify(sender.public_key(), env.COMMAND_CONTEXT, signed)
    assert env.parse_command(signed.body) == env.parse_command(EX["body"].encode())
    # The shown signature covers the shown bytes only.
    assert not env.verify(sender.public_key(), env.COMMAND_CONTEXT,
                          env.SignedPayload(other, env.unb64url(EX["signature"])))
    doubled = EX["body"].replace('"cmd":"charge-limit"', '"cmd":"lock","cmd":"charge-limit"')
    try:
        env.parse_command(doubled.encode())
    except env.Malformed as exc:
        assert "duplicate" in str(exc)
    else:
        raise AssertionError("a body with a duplicate key was accepted")


def test_the_result_example_verifies_and_is_reproduced_by_the_gateway_key():
    gateway = key(EX["gateway-seed"])
    payload = EX["result-payload"].encode()
    result = env.open_result(payload, gateway.public_key())
    assert env.unwrap(payload).body == EX["result-body"].encode()
    assert result.body() == json.loads(EX["result-body"])
    assert (result.status, result.reason, result.kid, result.key) == (
        "succeeded", None, EX["gateway-kid"], EX["kid"])
    assert result.id == env.parse_command(EX["body"].encode()).id
    # It answers the worked command: req digests its body bytes, then its signature bytes.
    command = EX["payload"].encode()
    request = env.unwrap(command)
    assert result.req == EX["req"] == env.request_digest(command)
    assert hashlib.sha256(request.body + request.sig).hexdigest() in TEXT
    assert f"{len(request.body) + len(request.sig)} bytes" in TEXT
    # The wrapper does not enter it: the same body and signature spaced out are the same.
    assert env.request_digest(json.dumps(json.loads(command), indent=2).encode()) == EX["req"]
    assert f"{len(payload)} bytes" in TEXT
    assert f"{len(EX['result-body'])} bytes" in " ".join(TEXT.split())
    assert env.sign_result(result, gateway) == payload
    assert env.unwrap(payload).sig == env.unb64url(EX["result-signature"])
    try:
        env.open_result(payload, key(EX["seed"]).public_key())
    except env.Malformed:
        pass
    else:
        raise AssertionError("a result verified with the sender's key")


def test_the_examples_follow_the_schemas_and_the_asyncapi_examples_are_them():
    validator("command-request.json").validate(json.loads(EX["payload"]))
    validator("command-body.json").validate(json.loads(EX["body"]))
    validator("command-result.json").validate(json.loads(EX["result-payload"]))
    validator("command-result-body.json").validate(json.loads(EX["result-body"]))
    validate("evgw/v1/car-1/events", json.loads(EX["audit-event"]))
    messages = asyncapi()["components"]["messages"]
    assert messages["commandRequest"]["examples"][0]["payload"] == json.loads(EX["payload"])
    assert messages["commandResult"]["examples"][0]["payload"] == json.loads(
        EX["result-payload"])


# --- the tables against the source ---------------------------------------------------------

def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def _strings(node: ast.AST | None, names: dict[str, set[str]]) -> set[str]:
    """The string literals ``node`` can evaluate to (constants, names bound to them, ifs)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name):
        return names.get(node.id, set())
    if isinstance(node, ast.IfExp):
        return _strings(node.body, names) | _strings(node.orelse, names)
    return set()


def _reason_args(call: ast.Call) -> list[tuple[set[str], ast.AST]]:
    """(possible statuses, reason node) of a call that makes an outcome or a result."""
    args, name = call.args, _callee(call)
    if name == "rejected" and args:
        return [({"rejected"}, args[0])]
    keyword = {k.arg: k.value for k in call.keywords}
    if name == "Outcome" and args:
        reason = args[1] if len(args) > 1 else keyword.get("reason")
        return [(_strings(args[0], {}), reason)] if reason is not None else []
    if name == "Result" and len(args) > 4:
        return [(_strings(args[3], {}), args[4])]
    return []


def source_reasons() -> dict[str, set[str]]:
    """Every reason code the command sources can produce, with the statuses it comes with."""
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            names: dict[str, set[str]] = {}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                        and isinstance(node.targets[0], ast.Name):
                    names.setdefault(node.targets[0].id, set()).update(_strings(node.value, {}))
            for node in ast.walk(func):
                if isinstance(node, ast.Call):
                    for statuses, arg in _reason_args(node):
                        for reason in _strings(arg, names):
                            found.setdefault(reason, set()).update(statuses)
    return found


def doc_reasons() -> dict[str, set[str]]:
    """The reason-code table: reason -> {status}."""
    rows = table(TEXT, "reason-codes")
    out = {ticked(row[0])[0]: {row[1]} for row in rows}
    assert len(out) == len(rows), "a reason is listed twice"
    return out


def test_the_reason_code_table_lists_exactly_the_codes_in_the_source():
    source = source_reasons()
    # The extraction must see codes made every way the sources make them.
    assert {"malformed", "motion_unknown", "vehicle_moving", "expired", "timeout",
            "transmit_failed", "interrupted", "bad_arguments"} <= set(source)
    assert doc_reasons() == source
    assert all(row[2] in ("yes", "no") for row in table(TEXT, "reason-codes"))


def test_the_result_schema_allows_exactly_the_reasons_of_each_status():
    defs = schemas()["command-result-body.json"]["$defs"]
    source = source_reasons()
    assert set(defs["rejectedReason"]["enum"]) == {r for r, s in source.items() if "rejected" in s}
    assert set(defs["failedReason"]["enum"]) == {r for r, s in source.items() if "failed" in s}
    assert {r for r, s in source.items() if "expired" in s} == {"expired"}


def test_the_status_table_matches_the_code():
    rows = table(TEXT, "statuses")
    assert [ticked(row[0])[0] for row in rows] == list(env.STATUSES)
    assert {ticked(row[0])[0] for row in rows if row[1] == "yes"} == env.FINAL_STATUSES
    assert set(schemas()["command-result-body.json"]["properties"]["status"]["enum"]) \
        == set(env.STATUSES)


def test_the_roles_table_matches_the_default_roles():
    assert {ticked(r[0])[0]: tuple(ticked(r[1])) for r in table(TEXT, "roles")} == dict(ROLES)


def test_the_command_table_covers_every_command_and_interlock():
    rows = table(TEXT, "commands")
    assert [ticked(row[0])[0] for row in rows] == list(COMMANDS)
    assert {ticked(row[0])[0] for row in rows if row[4] == "proven standstill"} \
        == STATIONARY_ONLY
    assert schemas()["command-body.json"]["properties"]["cmd"]["enum"] == list(COMMANDS)


def _section(text: str, heading: str) -> str:
    return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def test_the_configuration_guide_lists_every_commands_setting_with_its_default():
    part = _section((DOCS / "configuration.md").read_text(encoding="utf-8"), "## `[commands]`")
    rows = {ticked(cells[0])[0]: cells[1] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()
        if line.startswith("| `"))}
    fields = {f.name: f.default for f in dataclasses.fields(CommandSettings)}
    assert set(rows) == set(fields)
    for name, default in fields.items():
        if isinstance(default, int | float):
            assert float(ticked(rows[name])[0]) == default, name


def _checked_keys(function: str) -> set[str]:
    tree = ast.parse((ROOT / "gateway" / "config" / "commands.py").read_text(encoding="utf-8"))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    call = next(n for n in ast.walk(func) if isinstance(n, ast.Call)
                and _callee(n) == "check_keys")
    assert isinstance(call.args[0], ast.List)
    return {e.value for e in call.args[0].elts
            if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def test_the_profile_guide_lists_every_key_of_the_commands_tables():
    part = _section((DOCS / "profiles.md").read_text(encoding="utf-8"), "## Remote commands")
    tables = re.split(r"^### ", part, flags=re.MULTILINE)

    def keys(title_start: str) -> set[str]:
        body = next(t for t in tables if t.startswith(title_start))
        return {k for line in body.splitlines() if line.startswith("| `")
                for k in ticked(line.split("|")[1])}
    assert keys("`[commands.lock]`") == _checked_keys("_pulse")
    assert keys("`[commands.charge-limit]`") == _checked_keys("_setpoint")
    assert keys("`[commands.speed-profile]`") == {"timeout_s"}


def test_the_cli_synopsis_names_every_action_of_the_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = getattr(sub, "choices", {})
    synopsis = TEXT.split("## Command line", 1)[1].split("```", 2)[1]
    for group in ("keys", "command"):
        inner = next(a for a in choices[group]._actions if a.choices)
        for action in inner.choices:
            assert re.search(rf"ev-gateway {group} (\S+\|)*{re.escape(action)}\b", synopsis), \
                f"{group} {action}"


def test_the_cli_synopsis_shows_every_option_of_keys_add():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    keys = next(a for a in getattr(sub, "choices", {})["keys"]._actions if a.choices)
    options = {o for a in keys.choices["add"]._actions for o in a.option_strings
               if o.startswith("--") and o != "--help"}
    assert "--not-after" in options
    synopsis = TEXT.split("## Command line", 1)[1].split("```", 2)[1]
    [line] = [x for x in synopsis.splitlines() if x.startswith("ev-gateway keys add")]
    assert set(re.findall(r"--[\w-]+", line)) == options


def test_the_keys_file_example_loads_with_its_booking_end(tmp_path):
    part = TEXT.split("**The authorized-keys file**", 1)[1]
    example = re.search(r"```toml\n(.*?)\n *```", part, re.DOTALL)
    assert example is not None
    path = tmp_path / "keys.toml"
    path.write_text(textwrap.dedent(example.group(1)))
    ring = load_keyring(path)
    assert [(k.name, k.role) for k in ring.keys.values()] == [
        ("alice-phone", "owner"), ("booking 4711", "driver")]
    booking = next(k for k in ring.keys.values() if k.not_after is not None)
    end = datetime.datetime(2027, 1, 31, 18, tzinfo=datetime.UTC).timestamp()
    assert booking.not_after == end
    assert "--not-after 2027-01-31T18:00:00Z" in TEXT
    assert ring.roles["driver"] == ("lock", "unlock")


def test_the_guide_links_resolve():
    links = re.findall(r"\]\(([\w./-]*)(?:#([\w-]+))?\)", TEXT)
    assert len(links) > 20
    for target, anchor in links:
        path = DOCS / target if target else DOCS / "commands.md"
        assert path.exists(), target
        if anchor:
            heads = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {re.sub(r"[^\w -]", "", h.lower()).replace(" ", "-") for h in heads}
            assert anchor in slugs, f"{target}#{anchor}"


# --- every result of the real command service ---------------------------------------------

UNVERIFIED = {"retained", "malformed", "unknown_key", "bad_signature"}
"""Refusals made before a signature verified: answered on the response topic only."""
RESPONSE = "app/alice/res"


class Published:
    """Where the service's results go: kept, as the MQTT link would have sent them."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], bytes, bytes | None]] = []

    async def publish_result(self, topics: list[str], payload: bytes,
                             correlation: bytes | None) -> bool:
        """Keep one result."""
        self.sent.append((topics, payload, correlation))
        return True


def signed(sender: Ed25519PrivateKey, cmd: str, args: dict[str, Any], issued_ms: int, *,
           lifetime_ms: int = 30_000, vehicle: str = "car-1", kid: str | None = None,
           command_id: str | None = None) -> bytes:
    """A command payload, checked against the request schemas first."""
    command = env.Command(vehicle, command_id or env.new_command_id(), cmd, args, issued_ms,
                          issued_ms + lifetime_ms, kid or env.key_id(sender.public_key()))
    payload = env.sign_command(command, sender)
    validator("command-request.json").validate(json.loads(payload))
    validator("command-body.json").validate(json.loads(env.unwrap(payload).body))
    return payload


def command_id(payload: bytes) -> str:
    """The id in a command payload."""
    return env.parse_command(env.unwrap(payload).body).id


@dataclasses.dataclass
class Harness:
    """A real command service for the reference car, and what it answered to what."""

    svc: CommandService
    sink: Published
    clock: ManualClock
    counters: Counters
    audit: list[dict[str, Any]]
    owner: Ed25519PrivateKey
    service: Ed25519PrivateKey
    renter: Ed25519PrivateKey
    """A driver key whose ``not_after`` passed an hour before the harness started."""
    gateway: Ed25519PrivateKey
    created_ms: int
    attach_bus: Callable[[], None]
    answers: dict[bytes, list[tuple[list[str], bytes, bytes | None]]] = dataclasses.field(
        default_factory=dict)
    retained: set[bytes] = dataclasses.field(default_factory=set)

    def now(self) -> int:
        """The gateway's clock in epoch milliseconds."""
        return int(self.clock.time() * 1000)

    async def send(self, payload: bytes, retain: bool = False, advance: float = 1.0,
                   response: str | None = RESPONSE) -> list[bytes]:
        """Hand one message to the service and wait for its command; its new answers."""
        self.clock.advance(advance)  # refills the key's bucket and the answer budget
        before = len(self.sink.sent)
        await self.svc.handle(Incoming(payload, retain, response, b"corr"))
        await asyncio.gather(*self.svc.running)
        new = self.sink.sent[before:]
        self.answers.setdefault(payload, []).extend(new)
        if retain:
            self.retained.add(payload)
        return [wire for _, wire, _ in new]

    def open(self, wire: bytes) -> env.Result:
        """A published result, verified with the gateway key."""
        return env.open_result(wire, self.gateway.public_key())


@pytest.fixture
async def harness(ref_pipeline, clock, tmp_path):
    """The owner (the worked example's key), a service key and an expired driver key are
    authorised; the bus is attached only when the test says so."""
    safety = Safety.build(ref_pipeline, tmp_path)
    actions = Commands.build(ref_pipeline, safety, tmp_path).actions
    owner, service, renter = (key(EX["seed"]), Ed25519PrivateKey.generate(),
                              Ed25519PrivateKey.generate())
    ended = datetime.datetime.fromtimestamp(clock.time() - 3600, datetime.UTC)
    keys = tmp_path / "keys.toml"
    keys.write_text(key_entry("alice", "owner", owner.public_key())
                    + key_entry("workshop", "service", service.public_key())
                    + key_entry("booking", "driver", renter.public_key(), not_after=ended))
    gateway = key(EX["gateway-seed"])
    cache = ReplayCache(tmp_path / "commands.sqlite")
    await cache.open(clock.time())
    sink = Published()
    audit: list[dict[str, Any]] = []
    svc = CommandService(Topics("car-1"), KeyFile(keys), gateway, cache, actions,
                         safety.monitor.evaluate, sink, clock, ref_pipeline.counters,
                         ref_pipeline.rlog, Policy(burst=2, rate_per_minute=60),
                         audit=audit.append)
    bus = can.Bus(interface="virtual", channel=f"docs-{id(svc)}")
    yield Harness(svc, sink, clock, ref_pipeline.counters, audit, owner, service, renter,
                  gateway, int(clock.time() * 1000),
                  lambda: safety.guard.attach("vehicle", lambda: bus))
    await svc.stop()
    await cache.close()
    bus.shutdown()


async def run_until_answered(h: Harness, messages: list[Incoming], command: str | None
                             ) -> None:
    """Let ``svc.run()`` take ``messages`` from its queue until a result for ``command``
    (any result when None) is published."""
    runner = asyncio.create_task(h.svc.run())
    for msg in messages:
        h.svc.submit(msg)
    try:
        async with asyncio.timeout(10):
            while not any(command is None or h.open(wire).id == command
                          for _, wire, _ in h.sink.sent):
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_every_result_the_service_publishes_follows_the_contract(harness):
    h = harness
    owner, service, stranger = h.owner, h.service, Ed25519PrivateKey.generate()
    first = signed(owner, "charge-limit", {"soc": 80}, h.now())
    await h.send(first)  # no bus attached yet: transmit_failed
    await h.send(first)  # the same envelope: the stored result again
    await h.send(signed(owner, "charge-limit", {"soc": 90}, h.now(),
                        command_id=command_id(first)))
    h.attach_bus()
    await h.send(signed(owner, "charge-limit", {"soc": 70}, h.now()))  # nobody reports: timeout
    for cmd, args in (("lock", {}), ("speed-profile", {"profile": "valet"}),
                      ("charge-limit", {"soc": 20}), ("reset-latches", {})):
        await h.send(signed(owner, cmd, args, h.now()))
    await h.send(signed(service, "reset-latches", {}, h.now()))
    await h.send(signed(h.renter, "lock", {}, h.now()))  # the booking is over
    await h.send(signed(stranger, "lock", {}, h.now()))
    await h.send(signed(stranger, "lock", {}, h.now(), kid=env.key_id(owner.public_key())))
    await h.send(signed(owner, "lock", {}, h.now(), vehicle="car-2"))
    await h.send(b'{"v":1,"body":"e30","sig":"x"}')
    await h.send(signed(owner, "lock", {}, h.now()), retain=True)
    await h.send(signed(owner, "lock", {}, h.now() - 600_000))
    await h.send(signed(owner, "lock", {}, h.now() + 3_600_000))
    await h.send(signed(owner, "lock", {}, h.now(), lifetime_ms=7_200_000))
    await h.send(signed(owner, "lock", {}, h.created_ms - 5_000, lifetime_ms=120_000))
    for _ in range(3):
        await h.send(signed(service, "locate", {}, h.now()), advance=0.0)
    # Valid (with the skew allowance) for 1.5 s after it arrives: the first frame goes
    # out, the 3 s confirmation timeout passes, and the retry is refused as expired.
    h.clock.advance(60.0)
    await h.send(signed(owner, "charge-limit", {"soc": 60}, h.now() + 1_000 - 38_500))
    # A command accepted just before a crash: the next start answers it "interrupted".
    lost = signed(owner, "locate", {}, h.now())
    body = env.unwrap(lost).body
    accepted = env.Result("car-1", command_id(lost), "locate", "accepted", None, h.now(),
                          env.key_id(h.gateway.public_key()), env.key_id(owner.public_key()),
                          None, env.request_digest(lost))
    await h.svc.cache.record(Record(command_id(lost), hashlib.sha256(body).digest(),
                                    env.key_id(owner.public_key()), False,
                                    env.sign_result(accepted, h.gateway)),
                             h.now() + 30_000, h.clock.time())
    h.clock.advance(1.0)
    before = len(h.sink.sent)
    await run_until_answered(h, [Incoming(lost, False, RESPONSE, b"corr")], command_id(lost))
    h.answers[lost] = h.sink.sent[before:]

    seen = set()
    documented = doc_reasons()
    owner_kid = env.key_id(owner.public_key())
    for payload, answers in h.answers.items():
        for topics, wire, correlation in answers:
            result = h.open(wire)
            what = (result.status, result.reason)
            # Every result names the payload it answers, also one stored long before.
            assert result.req == env.request_digest(payload), f"{what}: req={result.req}"
            validator("command-result.json").validate(json.loads(wire))
            validator("command-result-body.json").validate(json.loads(env.unwrap(wire).body))
            assert result.vehicle == "car-1" and correlation == b"corr", what
            verified = result.reason not in UNVERIFIED
            assert (result.key is not None) == verified, what
            assert topics == ([Topics("car-1").command_result(result.id)] if verified
                              else []) + [RESPONSE], what
            if result.reason is not None:
                assert documented[result.reason] == {result.status}, result.reason
            if result.reason == "wrong_vehicle":
                assert result.key == owner_kid
            if result.reason == "unconfirmed":
                assert result.detail == {"attempts": 1, "refused": "expired"}
            seen.add(what)
    assert h.answers[first][-2][1] == h.answers[first][-1][1]  # the duplicate: the stored bytes
    assert seen == {("accepted", None), ("succeeded", None), ("expired", "expired"),
                    ("failed", "transmit_failed"), ("failed", "timeout"),
                    ("failed", "unconfirmed"), ("failed", "interrupted")} | {
                        ("rejected", r) for r in (
                            "replayed", "controller_unavailable", "motion_unknown",
                            "bad_arguments", "role_not_allowed", "unknown_key",
                            "bad_signature", "wrong_vehicle", "malformed", "retained",
                            "issued_in_future", "bad_validity", "predates_replay_cache",
                            "rate_limited", "key_expired")}
    envelope = Envelope("car-1", new_boot_id())
    events = Topics("car-1").events
    for data in h.audit:
        validate(events, envelope.stamp(events, h.clock.time(), event_body("command", data)))
    assert {d["status"] for d in h.audit} == {"succeeded", "failed", "rejected", "expired"}
    assert {"reason": "wrong_vehicle", "key": owner_kid} in (
        {"reason": d["reason"], "key": d["key"]} for d in h.audit)

    # The "Stored" column: sent again, a stored result comes back byte for byte; an
    # unstored answer is made anew (and signed at a later time).
    stored = {ticked(row[0])[0]: row[2] == "yes" for row in table(TEXT, "reason-codes")}
    for payload, answers in list(h.answers.items()):
        last = answers[-1][1]
        reason = h.open(last).reason
        again = await h.send(payload, retain=payload in h.retained)
        assert len(again) == 1, reason
        if reason is None or stored[reason]:
            assert again[0] == last, reason
        else:
            assert again[0] != last and h.open(again[0]).reason == reason, reason


async def test_a_forged_copy_is_answered_with_its_own_req_and_never_on_cmd_res(harness):
    h = harness
    genuine = signed(h.owner, "reset-latches", {}, h.now())  # owner may not: stored refusal
    mine = env.request_digest(genuine)
    await h.send(genuine)
    outer = json.loads(genuine)
    outer["sig"] = env.b64url(bytes(64))
    forged = json.dumps(outer).encode()
    copied = signed(h.service, "reset-latches", {}, h.now(), command_id=command_id(genuine))
    await h.send(forged)  # to the victim's response topic, as anyone reading cmd/req could
    await h.send(copied)  # signed with another trusted key
    counted = h.counters.get("commands.unanswerable")
    assert await h.send(forged, response=None) == []  # MQTT 3.1.1: nowhere to answer
    assert h.counters.get("commands.unanswerable") == counted + 1
    results = {p: [(topics, h.open(w)) for topics, w, _ in a] for p, a in h.answers.items()}
    [(topics, bad)] = results[forged]
    assert (bad.id, bad.reason, bad.key, topics) == (
        command_id(genuine), "bad_signature", None, [RESPONSE])
    (topics, replayed), = results[copied]
    assert (replayed.id, replayed.reason, topics[0]) == (
        command_id(genuine), "replayed", Topics("car-1").command_result(command_id(genuine)))
    # Every one of them is signed by the gateway and names the id; only req tells them apart.
    answers_to_mine = [r for rs in results.values() for _, r in rs if r.req == mine]
    assert [(r.status, r.reason) for r in answers_to_mine] == [("rejected", "role_not_allowed")]
    assert bad.req == env.request_digest(forged) != mine
    assert replayed.req == env.request_digest(copied) != mine
    # Only a re-wrapped copy (the same body and signature, spaced out) is the same request:
    # it gets the stored answer byte for byte, and that answer names the genuine payload.
    rewrapped = json.dumps(json.loads(genuine), indent=1).encode()
    assert rewrapped != genuine
    assert await h.send(rewrapped) == [h.answers[genuine][0][1]]
    assert h.open(h.answers[rewrapped][0][1]).req == mine


async def test_unstored_answers_and_duplicates_share_one_budget(harness):
    h = harness
    stored = signed(h.owner, "reset-latches", {}, h.now())  # refused and stored
    await h.send(stored)
    budget = int(UNSTORED_ANSWER_RATE)
    assert f"limited to {budget} answers per second" in " ".join(TEXT.split())
    suppressed = h.counters.get("commands.answers_suppressed")
    h.clock.advance(1.0)
    burst = [b"junk"] * 3 + [stored] * budget
    answered = [await h.send(payload, advance=0.0) for payload in burst]
    assert [len(a) for a in answered] == [1] * budget + [0] * 3
    assert h.counters.get("commands.answers_suppressed") == suppressed + 3
    assert len(await h.send(stored, advance=1.0)) == 1  # the budget refills


async def test_messages_over_the_size_limit_are_dropped_before_queueing(harness):
    h = harness
    largest, oversized = b"x" * env.MAX_PAYLOAD, b"x" * (env.MAX_PAYLOAD + 1)
    await run_until_answered(h, [Incoming(oversized, False, RESPONSE, b"corr"),
                                 Incoming(largest, False, RESPONSE, b"corr")], None)
    # The queue is first in, first out: had the oversized one been queued, it would
    # have been answered first.
    first = h.open(h.sink.sent[0][1])
    assert (first.reason, first.req) == ("malformed", env.request_digest(largest))
    assert h.counters.get("commands.rejected.too_large") == 1


def test_the_documented_limits_are_the_code_s():
    flat = " ".join(TEXT.split())
    assert f"The whole MQTT payload may be at most {env.MAX_PAYLOAD} bytes" in flat
    assert f"over {env.MAX_PAYLOAD} bytes" in flat and "commands.rejected.too_large" in flat
    assert MAX_INBOUND_PACKET == 1 << 20
    assert f"at most 1 MiB (*Maximum Packet Size* {MAX_INBOUND_PACKET})" in flat
    assert f"at most {LIVE_QUEUE} received messages" in flat
    assert f"at most {Policy().queue} wait" in flat
    assert f"*Message Expiry Interval* of {RESULT_EXPIRY} s" in flat
