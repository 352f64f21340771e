"""``ev-gateway keys`` and ``ev-gateway command``: key files on disk, and signed commands
sent through a private mosquitto to an in-process gateway driving the simulated vehicle
on a python-can virtual bus."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.app import Gateway
from gateway.cli import build_parser, command, main
from gateway.clock import SystemClock
from gateway.commands.envelope import (
    Result,
    b64url,
    key_id,
    open_result,
    parse_command,
    raw_public_key,
    request_digest,
    unwrap,
)
from gateway.commands.keys import ROLES, load_keyring, load_private_key
from gateway.config import load_profile
from gateway.config.settings import default_settings, with_overrides
from gateway.safety.verdicts import Motion
from hil.broker import Mosquitto, free_port
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle
from tests.conftest import REF_PROFILE

VEHICLE = "car-1"
READY_TIMEOUT = 20.0


def kid_of(path: Path) -> str:
    return key_id(load_private_key(path).public_key())


def _b64(private: Path) -> str:
    return b64url(raw_public_key(load_private_key(private).public_key()))


def new_key(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / f"{name}.key"
    assert main(["keys", "generate", str(path), "--name", name]) == 0
    capsys.readouterr()
    return path


# ---- keys ---------------------------------------------------------------------------


def test_generate_writes_a_private_and_a_public_file_and_never_overwrites(tmp_path, capsys):
    key = tmp_path / "alice.key"
    assert main(["keys", "generate", str(key), "--name", "alice phone"]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "alice.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    kid = kid_of(key)
    assert f"key id      {kid}" in out
    assert "--name 'alice phone' --keys" in out
    before = key.read_bytes()
    assert main(["keys", "generate", str(key)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key.read_bytes() == before
    # A lone FILE.pub is protected too: it may be the only copy someone kept.
    (tmp_path / "bob.key.pub").write_text("keep me")
    assert main(["keys", "generate", str(tmp_path / "bob.key")]) == 2
    assert not (tmp_path / "bob.key").exists()
    assert (tmp_path / "bob.key.pub").read_text() == "keep me"


def test_the_printed_add_line_authorises_the_key(tmp_path, capsys):
    key = tmp_path / "alice.key"
    assert main(["keys", "generate", str(key)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "keys add" in x).split()
    keys = tmp_path / "keys.toml"
    argv = line[1:]  # without the program name
    argv[argv.index("--keys") + 1] = str(keys)
    assert main(argv) == 0
    ring = load_keyring(keys)
    assert ring.keys[kid_of(key)].name == "alice"
    assert ring.keys[kid_of(key)].role == "owner"


def test_add_list_remove_round_trip(tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    alice, bob, carol = (new_key(tmp_path, n, capsys) for n in ("alice", "bob", "carol"))
    assert main(["keys", "add", f"{alice}.pub", "--role", "owner", "--name", "alice",
                 "--keys", str(keys)]) == 0
    assert stat.S_IMODE(keys.stat().st_mode) == 0o644
    assert keys.read_text().startswith("#")
    # The base64url text itself is accepted as well as a file.
    # (after "--", since base64url text may begin with "-")
    assert main(["keys", "add", "--role", "service", "--name", "bob", "--keys", str(keys),
                 "--", _b64(bob)]) == 0
    keys.write_text(keys.read_text() + "\n# carol's tablet\n")
    keys.chmod(0o640)  # an administrator's choice survives the rewrite
    assert main(["keys", "add", f"{carol}.pub", "--role", "driver", "--keys", str(keys)]) == 0
    assert stat.S_IMODE(keys.stat().st_mode) == 0o640
    capsys.readouterr()

    assert main(["keys", "list", "--keys", str(keys)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    by_kid = {line.split()[0]: line for line in lines}
    assert by_kid[kid_of(alice)].split()[1:3] == ["owner", "alice"]
    assert by_kid[kid_of(bob)].endswith(", ".join(ROLES["service"]))
    assert "reset-latches" not in by_kid[kid_of(alice)]
    assert by_kid[kid_of(carol)].split()[1:3] == ["driver", kid_of(carol)]

    assert main(["keys", "remove", kid_of(bob), "--keys", str(keys)]) == 0
    ring = load_keyring(keys)
    assert set(ring.keys) == {kid_of(alice), kid_of(carol)}
    text = keys.read_text()
    assert "# carol's tablet" in text
    assert text.startswith("# Authorized keys")
    assert "\n\n\n" not in text
    assert not list(tmp_path.glob(".keys.toml.*"))  # no temporary file left behind

    assert main(["keys", "remove", kid_of(bob), "--keys", str(keys)]) == 2
    assert "no key" in capsys.readouterr().err
    assert keys.read_text() == text


def test_remove_keeps_roles_and_comments_of_a_hand_written_file(tmp_path, capsys):
    alice, bob = new_key(tmp_path, "alice", capsys), new_key(tmp_path, "bob", capsys)
    keys = tmp_path / "keys.toml"
    pem = Path(f"{alice}.pub").read_text()
    keys.write_text(
        "# fleet 7\n\n[roles]\ndriver = [\n  \"lock\",\n]\n\n"
        f"# Alice\n[[key]]\nrole = \"driver\"\npublic_key = '''\n{pem}'''\n"
        f"\n# Bob\n[[ key ]]  # the mechanic\nname = \"bob\"\nrole = \"service\"\n"
        f"public_key = \"{_b64(bob)}\"\n")
    assert main(["keys", "remove", kid_of(alice), "--keys", str(keys)]) == 0
    ring = load_keyring(keys)
    assert set(ring.keys) == {kid_of(bob)}
    assert ring.roles["driver"] == ("lock",)
    text = keys.read_text()
    assert "# fleet 7" in text and "# Bob" in text and "# the mechanic" in text
    assert "# Alice" not in text and "BEGIN PUBLIC KEY" not in text


def test_add_refuses_duplicates_unknown_roles_bad_names_and_private_keys(tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    alice = new_key(tmp_path, "alice", capsys)
    assert main(["keys", "add", f"{alice}.pub", "--role", "owner", "--keys", str(keys)]) == 0
    before = keys.read_text()
    capsys.readouterr()
    refusals = {
        "already there": ["--role", "driver"],
        "unknown role 'pilot'": ["--role", "pilot"],
        "no control characters or quotes": ["--role", "owner", "--name", "al\"ice"],
    }
    bob = new_key(tmp_path, "bob", capsys)
    for expected, extra in refusals.items():
        public = f"{alice}.pub" if expected == "already there" else f"{bob}.pub"
        assert main(["keys", "add", public, *extra, "--keys", str(keys)]) == 2, expected
        assert expected in capsys.readouterr().err
    assert main(["keys", "add", f"{bob}.pub", "--role", "owner", "--name", "b\x1bob",
                 "--keys", str(keys)]) == 2
    assert main(["keys", "add", str(bob), "--role", "owner", "--keys", str(keys)]) == 2
    assert "is a private key" in capsys.readouterr().err
    assert main(["keys", "add", "not-a-key", "--role", "owner", "--keys", str(keys)]) == 2
    assert keys.read_text() == before
    # A role the file defines is a role.
    keys.write_text(before + "\n[roles]\nvalet = [\"lock\"]\n")
    assert main(["keys", "add", f"{bob}.pub", "--role", "valet", "--keys", str(keys)]) == 0
    assert load_keyring(keys).keys[kid_of(bob)].role == "valet"


def test_add_with_not_after_writes_it_in_utc_and_list_shows_it(tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    renter, alice = new_key(tmp_path, "renter", capsys), new_key(tmp_path, "alice", capsys)
    # A car-sharing booking that ends at 19:00 Central European Time.
    assert main(["keys", "add", f"{renter}.pub", "--role", "driver", "--name", "booking 4711",
                 "--not-after", "2027-01-31T19:00:00+01:00", "--keys", str(keys)]) == 0
    assert "as driver until 2027-01-31T19:00:00+01:00" in capsys.readouterr().out
    assert main(["keys", "add", f"{alice}.pub", "--role", "owner", "--keys", str(keys)]) == 0
    text = keys.read_text()
    assert text.count("not_after") == 1
    assert "\nnot_after = 2027-01-31T18:00:00Z\n" in text
    ring = load_keyring(keys)
    end = datetime.datetime(2027, 1, 31, 18, tzinfo=datetime.UTC).timestamp()
    assert ring.keys[kid_of(renter)].not_after == end
    assert ring.keys[kid_of(alice)].not_after is None
    capsys.readouterr()
    assert main(["keys", "list", "--keys", str(keys)]) == 0
    by_kid = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert by_kid[kid_of(renter)].endswith(
        f"{', '.join(ROLES['driver'])}  until 2027-01-31T18:00:00Z")
    assert "until" not in by_kid[kid_of(alice)]


@pytest.mark.parametrize("value", ["2027-01-31T18:00:00", "2027-01-31", "tomorrow", "",
                                   "31.01.2027 18:00 UTC"])
def test_add_refuses_a_not_after_without_an_offset(tmp_path, capsys, value):
    keys = tmp_path / "keys.toml"
    alice, renter = new_key(tmp_path, "alice", capsys), new_key(tmp_path, "renter", capsys)
    assert main(["keys", "add", f"{renter}.pub", "--role", "driver", "--not-after", value,
                 "--keys", str(keys)]) == 2
    assert "--not-after" in capsys.readouterr().err
    assert not keys.exists()  # a refused first key creates no file
    assert main(["keys", "add", f"{alice}.pub", "--role", "owner", "--keys", str(keys)]) == 0
    before = keys.read_text()
    assert main(["keys", "add", f"{renter}.pub", "--role", "driver", "--not-after", value,
                 "--keys", str(keys)]) == 2
    assert "expected an ISO 8601 time with an offset" in capsys.readouterr().err
    assert keys.read_text() == before


def test_an_invalid_keys_file_is_never_edited(tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    keys.write_text("[[key]]\nrole = \"owner\"\npublic_key = \"nope\"\n")
    alice = new_key(tmp_path, "alice", capsys)
    assert main(["keys", "add", f"{alice}.pub", "--role", "owner", "--keys", str(keys)]) == 2
    assert "public_key" in capsys.readouterr().err
    assert keys.read_text() == "[[key]]\nrole = \"owner\"\npublic_key = \"nope\"\n"


def test_gateway_key_is_created_once_and_printed(tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["keys", "gateway", "--state-dir", str(state)]) == 0
    first = capsys.readouterr().out
    assert stat.S_IMODE((state / "gateway.key").stat().st_mode) == 0o600
    assert f"key id: {kid_of(state / 'gateway.key')}" in first
    assert first.startswith("-----BEGIN PUBLIC KEY-----")
    settings = tmp_path / "gateway.toml"
    settings.write_text(f'[gateway]\nvehicle_id = "{VEHICLE}"\nprofile = "{REF_PROFILE}"\n'
                        f'state_dir = "{state}"\n')
    assert main(["keys", "gateway", "--config", str(settings)]) == 0
    assert capsys.readouterr().out == first
    assert main(["keys", "gateway"]) == 2
    (tmp_path / "junk.key").write_text("junk")
    assert main(["keys", "gateway", "--key", str(tmp_path / "junk.key")]) == 2
    assert "junk.key" in capsys.readouterr().err


# ---- command: options ---------------------------------------------------------------


def test_command_arguments_become_the_envelope_args():
    parse = build_parser().parse_args
    base = ["--vehicle", VEHICLE, "--key", "k"]
    cases = {
        ("lock",): {}, ("locate",): {}, ("locate", "--mode", "horn"): {"mode": "horn"},
        ("charge-limit", "80"): {"soc": 80}, ("speed-profile", "none"): {"profile": "none"},
        ("reset-latches", "--alert", "bms.fault"): {"key": "bms.fault"},
    }
    for argv, expected in cases.items():
        args = parse(["command", *argv, *base])
        assert (args.action, command.command_args(args)) == (argv[0], expected)


async def test_usage_errors_exit_2_before_anything_is_sent(tmp_path, capsys):
    key = tmp_path / "k.key"
    bad = {
        "--key": ["--key", str(tmp_path / "missing.key")],
        "--vehicle": ["--vehicle", "car/1", "--key", str(key)],
        "--ttl": ["--ttl", "0", "--key", str(key)],
        "--broker": ["--broker", "host:notaport", "--key", str(key)],
        "gateway key": ["--gateway-key", str(tmp_path / "missing.pub"), "--key", str(key)],
    }
    assert main(["keys", "generate", str(key)]) == 0
    capsys.readouterr()
    for expected, extra in bad.items():
        args = build_parser().parse_args(["command", "lock", "--vehicle", VEHICLE, *extra])
        assert await command.run_async(args) == 2, expected
        assert expected in capsys.readouterr().err


# ---- command: against a running gateway ---------------------------------------------


@dataclass
class Rig:
    """A running gateway for ``VEHICLE`` and the simulated car it talks to."""

    broker: Mosquitto
    ecus: VehicleEcus
    state_dir: Path

    def argv(self, action: list[str], key: Path, *extra: str) -> list[str]:
        return ["command", *action, "--vehicle", VEHICLE, "--key", str(key),
                "--broker", f"{self.broker.host}:{self.broker.port}", *extra]


@contextlib.asynccontextmanager
async def running_gateway(tmp_path: Path, broker: Mosquitto, keys: Path,
                          model: VehicleModel | None = None, vehicle: str = VEHICLE
                          ) -> AsyncIterator[Rig]:
    """The gateway of ``vehicle`` (pipeline, safety, commands, MQTT) and the simulator on a
    private virtual bus; yields once commands are subscribed and the car is seen standing
    still. :meth:`Rig.argv` commands ``VEHICLE`` whichever car the gateway is."""
    clock = SystemClock()
    profile = load_profile(REF_PROFILE)
    state = tmp_path / "state"
    state.mkdir()
    settings = with_overrides(default_settings(vehicle, profile.file, state),
                              host=broker.host, port=broker.port, keys=keys)
    gateway = Gateway.build(profile, clock, settings, state)
    assert gateway.publishing is not None
    link = gateway.publishing.link
    subscribed = asyncio.Event()
    birth = link.on_connect

    def on_connect() -> None:  # called once the command topic is subscribed
        if birth is not None:
            birth()
        subscribed.set()

    link.on_connect = on_connect
    channel = f"cli-commands-{uuid.uuid4().hex}"
    sim_bus = open_sim_bus("virtual", channel)
    ecus = VehicleEcus(model or VehicleModel(mode="park", soc=70))
    stop = asyncio.Event()
    sim = asyncio.create_task(run_vehicle(sim_bus, ecus, clock, stop))
    try:
        await gateway.start(gateway.pipeline.bus_options({"vehicle": f"virtual:{channel}"}))
        async with asyncio.timeout(READY_TIMEOUT):
            await subscribed.wait()
            while gateway.safety.monitor.verdicts.motion is not Motion.STATIONARY:
                await asyncio.sleep(0.05)
        yield Rig(broker, ecus, state)
    finally:
        stop.set()
        await sim
        close_quietly(sim_bus)
        await gateway.stop()


async def cli(argv: list[str]) -> int:
    """``ev-gateway`` with ``argv``, run in this test's event loop."""
    return await command.run_async(build_parser().parse_args(argv))


def authorised(tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str = "owner"
               ) -> tuple[Path, Path]:
    """A new key (private file) and a keys file that lists it with ``role``."""
    key = new_key(tmp_path, "alice", capsys)
    keys = tmp_path / "keys.toml"
    assert main(["keys", "add", f"{key}.pub", "--role", role, "--keys", str(keys)]) == 0
    capsys.readouterr()
    return key, keys


def body_commands(ecus: VehicleEcus) -> int:
    return sum(1 for f in ecus.received if f.arbitration_id == ecus.db.get_message_by_name(
        "GW_BodyCommand").frame_id)


async def test_lock_succeeds_and_the_car_locks(tmp_path, broker, capsys):
    key, keys = authorised(tmp_path, capsys)
    unlocked = VehicleModel(mode="park", soc=70)
    unlocked.locks = [0, 0, 0]
    async with running_gateway(tmp_path, broker, keys, unlocked) as rig:
        assert await cli(rig.argv(["lock"], key)) == 0
        assert rig.ecus.model.locks == [1, 1, 1]
        assert body_commands(rig.ecus) >= 1
    out, err = capsys.readouterr()
    statuses = [line.split()[0] for line in out.splitlines()]
    assert statuses == ["accepted", "succeeded"]
    assert "not verified" in err


async def test_unlock_over_mqtt_311(tmp_path, broker, capsys):
    key, keys = authorised(tmp_path, capsys)
    async with running_gateway(tmp_path, broker, keys) as rig:
        assert rig.ecus.model.locks == [1, 1, 1]
        assert await cli(rig.argv(["unlock"], key, "--protocol", "3.1.1")) == 0
        assert rig.ecus.model.locks == [0, 0, 0]
    assert capsys.readouterr().out.splitlines()[-1].startswith("succeeded unlock")


async def test_results_verified_with_the_gateway_key(tmp_path, broker, capsys):
    key, keys = authorised(tmp_path, capsys)
    async with running_gateway(tmp_path, broker, keys) as rig:
        assert main(["keys", "gateway", "--state-dir", str(rig.state_dir)]) == 0
        gateway_pub = tmp_path / "gateway.pub"
        gateway_pub.write_text(capsys.readouterr().out)
        assert await cli(rig.argv(["locate", "--mode", "horn"], key,
                                  "--gateway-key", str(gateway_pub), "--json")) == 0
        assert rig.ecus.model.locate_requests == [2]
        out, err = capsys.readouterr()
        bodies = [json.loads(line) for line in out.splitlines()]
        assert [b["status"] for b in bodies] == ["accepted", "succeeded"]
        assert {b["kid"] for b in bodies} == {kid_of(rig.state_dir / "gateway.key")}
        assert {b["key"] for b in bodies} == {kid_of(key)}
        assert "not verified" not in err

        # Results that do not verify with the given key are reported and ignored.
        impostor = new_key(tmp_path, "impostor", capsys)
        assert await cli(rig.argv(["locate"], key, "--gateway-key", f"{impostor}.pub",
                                  "--timeout", "2")) == 3
        out, err = capsys.readouterr()
        assert out == ""
        assert "signature does not verify" in err
        assert "no final result" in err
        assert rig.ecus.model.locate_requests == [2, 1]  # it did run; we could not trust that


async def test_refusals_exit_1_with_the_reason(tmp_path, broker, capsys):
    key, keys = authorised(tmp_path, capsys, role="driver")
    stranger = new_key(tmp_path, "stranger", capsys)
    renter = new_key(tmp_path, "renter", capsys)  # a booking that ended long ago
    assert main(["keys", "add", f"{renter}.pub", "--role", "driver", "--not-after",
                 "2024-06-01T10:00:00Z", "--keys", str(keys)]) == 0
    capsys.readouterr()
    async with running_gateway(tmp_path, broker, keys) as rig:
        assert await cli(rig.argv(["lock"], renter)) == 1
        assert "(key_expired)" in capsys.readouterr().out
        assert await cli(rig.argv(["lock"], stranger)) == 1
        out = capsys.readouterr().out
        assert out.startswith("rejected")
        assert "(unknown_key)" in out
        assert await cli(rig.argv(["charge-limit", "80"], key)) == 1
        assert "(role_not_allowed)" in capsys.readouterr().out
        assert body_commands(rig.ecus) == 0


async def test_a_result_for_another_vehicle_is_ignored(tmp_path, broker, capsys):
    key, keys = authorised(tmp_path, capsys)
    forwarded: list[bytes] = []
    answers: list[Result] = []

    async def relay(client: aiomqtt.Client) -> None:
        # Someone on the broker copies car-1's commands to car-2, asking car-2 to answer
        # on the sender's response topic. The copy is authentic (the same body and
        # signature, so the same req): only the vehicle of the answer gives it away.
        async for m in client.messages:
            assert isinstance(m.payload, bytes)
            if m.topic.matches(f"evgw/v1/{VEHICLE}/cmd/req"):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = m.properties.ResponseTopic  # type: ignore[union-attr]
                props.CorrelationData = m.properties.CorrelationData  # type: ignore[union-attr]
                forwarded.append(m.payload)
                await client.publish("evgw/v1/car-2/cmd/req", m.payload, qos=1,
                                     properties=props)
            else:
                answers.append(open_result(m.payload, None))

    async with running_gateway(tmp_path, broker, keys, vehicle="car-2") as rig, \
            aiomqtt.Client(broker.host, broker.port,
                           protocol=aiomqtt.ProtocolVersion.V5) as client:
        # Pinned: car-2's key, as when a fleet shares one gateway key, or mixes them up.
        assert main(["keys", "gateway", "--state-dir", str(rig.state_dir)]) == 0
        gateway_pub = tmp_path / "gateway.pub"
        gateway_pub.write_text(capsys.readouterr().out)
        await client.subscribe(f"evgw/v1/{VEHICLE}/cmd/req", qos=1)
        await client.subscribe("evgw-cli/#", qos=1)  # where the command line listens
        task = asyncio.create_task(relay(client))
        try:
            assert await cli(rig.argv(["lock"], key, "--gateway-key", str(gateway_pub),
                                      "--timeout", "2")) == 3
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert body_commands(rig.ecus) == 0
    [payload] = forwarded
    [answer] = answers
    sent = parse_command(unwrap(payload).body)
    assert (answer.vehicle, answer.status, answer.reason) == ("car-2", "rejected",
                                                              "wrong_vehicle")
    assert (answer.id, answer.req) == (sent.id, request_digest(payload))
    out, err = capsys.readouterr()
    assert out == ""
    assert "no final result" in err


def test_no_gateway_means_exit_3(tmp_path, broker, capsys):
    key = new_key(tmp_path, "alice", capsys)
    argv = Rig(broker, VehicleEcus(VehicleModel()), tmp_path).argv(["lock"], key, "--timeout", "1")
    assert main(argv) == 3
    assert "no final result" in capsys.readouterr().err


def test_no_broker_means_exit_3_and_nothing_sent(tmp_path, capsys):
    key = new_key(tmp_path, "alice", capsys)
    assert main(["command", "lock", "--vehicle", VEHICLE, "--key", str(key),
                 "--broker", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 3
    assert "nothing was sent" in capsys.readouterr().err
