"""Authorized keys and the gateway key: parsing, roles, reloading, files on disk."""

from __future__ import annotations

import datetime
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.commands.envelope import b64url, key_id, raw_public_key
from gateway.commands.keys import (
    COMMANDS,
    ROLES,
    AuthorizedKey,
    KeyFile,
    gateway_key,
    generate_private_key,
    key_entry,
    load_keyring,
    load_private_key,
    parse_public_key,
    public_path,
    public_pem,
    store_gateway_key,
)
from gateway.config import ConfigError

ALICE = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
BOB = Ed25519PrivateKey.from_private_bytes(bytes(range(5, 37))).public_key()
CAROL = Ed25519PrivateKey.from_private_bytes(bytes(range(9, 41))).public_key()


def b64(key: Ed25519PublicKey) -> str:
    return b64url(raw_public_key(key))


def entry(role: str, key: Ed25519PublicKey, name: str | None = None, kid: str | None = None
          ) -> str:
    lines = ["[[key]]", *([f'name = "{name}"'] if name else []), f'role = "{role}"',
             f'public_key = "{b64(key)}"', *([f'id = "{kid}"'] if kid else [])]
    return "\n".join(lines) + "\n\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def line_of(text: str, needle: str, nth: int = 0) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return lines[nth]


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_keyring(path)
    return info.value


def test_keyring_with_default_roles(tmp_path):
    text = entry("owner", ALICE, "alice-phone") + entry("driver", BOB, kid=key_id(BOB))
    ring = load_keyring(write(tmp_path / "keys.toml", text))
    assert dict(ring.roles) == dict(ROLES)
    assert set(ring.keys) == {key_id(ALICE), key_id(BOB)}
    alice, bob = ring.lookup(key_id(ALICE)), ring.lookup(key_id(BOB))
    assert alice is not None and bob is not None
    assert (alice.name, alice.role, alice.kid) == ("alice-phone", "owner", key_id(ALICE))
    assert raw_public_key(alice.key) == raw_public_key(ALICE)
    assert bob.name == key_id(BOB)  # unnamed keys go by their id
    assert ring.lookup(key_id(CAROL)) is None
    assert [c for c in COMMANDS if ring.allows(alice, c)] == list(ROLES["owner"])
    assert ring.allows(bob, "unlock")
    assert not ring.allows(bob, "charge-limit")
    assert not ring.allows(alice, "reset-latches")
    assert not ring.allows(alice, "self-destruct")


def test_roles_table_overrides_and_adds_roles(tmp_path):
    text = ('[roles]\ndriver = ["lock"]\nvalet = "locate"\nowner = []\n\n'
            + entry("driver", ALICE) + entry("valet", BOB) + entry("owner", CAROL)
            + entry("service", Ed25519PrivateKey.generate().public_key(), "svc"))
    ring = load_keyring(write(tmp_path / "keys.toml", text))
    assert ring.roles["driver"] == ("lock",)
    assert ring.roles["valet"] == ("locate",)
    assert ring.roles["fleet"] == ROLES["fleet"]
    driver, valet, owner = (ring.lookup(key_id(k)) for k in (ALICE, BOB, CAROL))
    assert driver is not None and valet is not None and owner is not None
    assert ring.allows(driver, "lock") and not ring.allows(driver, "unlock")
    assert ring.allows(valet, "locate") and not ring.allows(valet, "lock")
    assert not any(ring.allows(owner, c) for c in COMMANDS)
    service = next(k for k in ring.keys.values() if k.name == "svc")
    assert all(ring.allows(service, c) for c in COMMANDS)


def test_an_empty_file_has_no_keys(tmp_path):
    ring = load_keyring(write(tmp_path / "keys.toml", "# nobody yet\n"))
    assert not ring.keys
    assert dict(ring.roles) == dict(ROLES)


@pytest.mark.parametrize(("text", "needle", "nth", "key", "words"), [
    ("colour = 1\n" + entry("owner", ALICE), "colour", 0, "colour", "unknown key"),
    (entry("owner", ALICE) + entry("pilot", BOB), 'role = "pilot"', 0, "key[1].role",
     "unknown role 'pilot'"),
    ('[roles]\ndriver = ["lock", "launch"]\n', "driver", 0, "roles.driver",
     "unknown command launch"),
    ("[roles]\ndriver = 3\n", "driver", 0, "roles.driver", "list of strings"),
    ('[[key]]\nrole = "owner"\npublic_key = "AAAA"\n', "public_key", 0, "key[0].public_key",
     "expected 32 raw bytes, got 3"),
    ('[[key]]\nrole = "owner"\npublic_key = "not base64!"\n', "public_key", 0,
     "key[0].public_key", "expected PEM or base64url"),
    (entry("owner", ALICE, kid=key_id(BOB)), "id =", 0, "key[0].id", key_id(ALICE)),
    (entry("owner", ALICE) + entry("driver", ALICE), "public_key", 1, "key[1].public_key",
     "listed twice"),
    (f'[[key]]\npublic_key = "{b64(ALICE)}"\n', "[[key]]", 0, "key[0].role", "missing"),
    ('[[key]]\nrole = "owner"\n', "[[key]]", 0, "key[0].public_key", "missing"),
    (entry("owner", ALICE) + '[[key]]\nrole = "owner"\nhue = 2\n', "hue", 0, "key[1].hue",
     "unknown key"),
    (entry("owner", ALICE) + '[[key]]\nrole = 5\n', "role = 5", 0, "key[1].role",
     "expected a string"),
    # A booking's end must be a moment, not a wall-clock reading in some unknown zone.
    (entry("owner", ALICE) + entry("driver", BOB) + "not_after = 2027-01-31T18:00:00\n",
     "not_after", 0, "key[1].not_after", "expected a date-time with an offset"),
    (entry("driver", BOB) + 'not_after = "2027-01-31T18:00:00Z"\n', "not_after", 0,
     "key[0].not_after", "expected a date-time with an offset"),
    (entry("driver", BOB) + "not_after = 2027-01-31\n", "not_after", 0, "key[0].not_after",
     "expected a date-time with an offset"),
])
def test_errors_name_file_line_and_key(tmp_path, text, needle, nth, key, words):
    path = write(tmp_path / "keys.toml", text)
    err = config_error(path)
    line = line_of(text, needle, nth)
    assert (err.file, err.line) == (str(path), line)
    assert err.key is not None and err.key.endswith(key)
    assert str(err).startswith(f"{path}:{line}: ")
    assert words in str(err)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path):
    err = config_error(write(tmp_path / "keys.toml", "[[key]\n"))
    assert err.line == 1 and "invalid TOML" in str(err)
    assert "cannot read" in str(config_error(tmp_path / "absent.toml"))


def test_top_level_key_is_named_without_a_leading_dot(tmp_path):
    assert config_error(write(tmp_path / "keys.toml", "colour = 1\n")).key == "colour"


def test_key_array_of_non_tables_is_a_config_error(tmp_path):
    config_error(write(tmp_path / "keys.toml", "key = [1]\n"))


def test_parse_public_key_formats():
    raw = raw_public_key(ALICE)
    pem = public_pem(ALICE).decode()
    for text in (pem, f"\n  {pem}  \n", b64(ALICE), b64(ALICE) + "=", f"  {b64(ALICE)}\n"):
        assert raw_public_key(parse_public_key(text)) == raw
    for size in (0, 31, 33, 64):
        with pytest.raises(ValueError, match=f"got {size}"):
            parse_public_key(b64url(bytes(size)))
    with pytest.raises(ValueError, match="PEM or base64url"):
        parse_public_key("ssh-ed25519 AAAA")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        parse_public_key(ec_pem)
    with pytest.raises(ValueError):
        parse_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_pem_public_key_in_the_file(tmp_path):
    pem = public_pem(BOB).decode()
    text = f'[[key]]\nrole = "fleet"\npublic_key = """\n{pem}"""\n'
    ring = load_keyring(write(tmp_path / "keys.toml", text))
    assert list(ring.keys) == [key_id(BOB)]


def _bump(path: Path, seconds: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_key_file_reloads_when_the_file_changes(tmp_path):
    path = write(tmp_path / "keys.toml", entry("owner", ALICE))
    keys = KeyFile(path)
    first = keys.current()
    assert list(first.keys) == [key_id(ALICE)]
    assert keys.current() is first  # unchanged file: not re-read
    write(path, entry("owner", ALICE) + entry("driver", BOB))
    _bump(path, 5)
    assert set(keys.current().keys) == {key_id(ALICE), key_id(BOB)}
    # Same size, only the modification time moves: still re-read.
    write(path, entry("owner", ALICE) + entry("driver", CAROL))
    _bump(path, 10)
    assert set(keys.current().keys) == {key_id(ALICE), key_id(CAROL)}


def test_key_file_keeps_the_old_ring_when_the_new_file_is_broken(tmp_path, caplog):
    path = write(tmp_path / "keys.toml", entry("owner", ALICE))
    keys = KeyFile(path)
    good = keys.current()
    write(path, entry("owner", ALICE) + '[[key]]\nrole = "pilot"\n')
    _bump(path, 5)
    with caplog.at_level(logging.ERROR, logger="gateway.commands.keys"):
        assert keys.current() is good
        assert keys.current() is good
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert "pilot" in caplog.text
    write(path, entry("owner", BOB))
    _bump(path, 10)
    assert list(keys.current().keys) == [key_id(BOB)]


def test_key_file_keeps_the_old_ring_for_a_non_table_key_array(tmp_path):
    path = write(tmp_path / "keys.toml", entry("owner", ALICE))
    keys = KeyFile(path)
    good = keys.current()
    write(path, "key = [1]\n")
    _bump(path, 5)
    assert keys.current() is good


def test_deleted_key_file_revokes_every_key(tmp_path):
    path = write(tmp_path / "keys.toml", entry("owner", ALICE))
    keys = KeyFile(path)
    path.unlink()
    ring = keys.current()
    assert not ring.keys
    assert ring.lookup(key_id(ALICE)) is None
    write(path, entry("driver", BOB))
    assert list(keys.current().keys) == [key_id(BOB)]


def test_key_file_must_be_valid_at_start(tmp_path):
    with pytest.raises(ConfigError):
        KeyFile(write(tmp_path / "keys.toml", "[[key]]\n"))
    with pytest.raises(ConfigError):
        KeyFile(tmp_path / "absent.toml")


def test_generate_private_key_writes_0600_and_a_public_half(tmp_path):
    path = tmp_path / "deep" / "dir" / "alice.key"
    key = generate_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_path(path) == tmp_path / "deep" / "dir" / "alice.key.pub"
    assert public_path(path).read_bytes() == public_pem(key.public_key())
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert raw_public_key(loaded.public_key()) == raw_public_key(key.public_key())


def test_generate_private_key_never_overwrites(tmp_path):
    path = tmp_path / "alice.key"
    generate_private_key(path)
    before, pub_before = path.read_bytes(), public_path(path).read_bytes()
    with pytest.raises(FileExistsError):
        generate_private_key(path)
    assert path.read_bytes() == before
    assert public_path(path).read_bytes() == pub_before


def test_gateway_key_is_made_in_memory_stored_once_then_loaded(tmp_path):
    path = tmp_path / "state" / "gateway.key"
    first, new = gateway_key(path)
    assert new and not path.parent.exists()  # building a gateway writes nothing
    store_gateway_key(path, first)
    assert path.is_file() and public_path(path).is_file()
    with pytest.raises(FileExistsError):
        store_gateway_key(path, Ed25519PrivateKey.generate())
    mtime = path.stat().st_mtime_ns
    second, new = gateway_key(path)
    assert not new
    assert raw_public_key(second.public_key()) == raw_public_key(first.public_key())
    assert path.stat().st_mtime_ns == mtime


def test_load_private_key_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_private_key(write(tmp_path / "garbage.key", "hello\n"))
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "ec.key").write_bytes(ec_pem)
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "ec.key")
    locked = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "locked.key").write_bytes(locked)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "locked.key")
    with pytest.raises(ValueError):
        gateway_key(write(tmp_path / "gw.key", "not a key"))


def test_key_entry_round_trips_through_the_file(tmp_path):
    path = write(tmp_path / "keys.toml", entry("owner", ALICE))
    with path.open("a") as f:
        f.write(key_entry('bob "the" \\ phone', "driver", BOB))
    ring = load_keyring(path)
    bob = ring.lookup(key_id(BOB))
    assert bob is not None
    assert (bob.name, bob.role) == ('bob "the" \\ phone', "driver")


def test_key_entry_with_a_newline_in_the_name(tmp_path):
    path = write(tmp_path / "keys.toml", key_entry("two\nlines", "owner", ALICE))
    assert load_keyring(path).keys[key_id(ALICE)].name == "two\nlines"


END = datetime.datetime(2027, 1, 31, 18, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize("written", ["2027-01-31T18:00:00Z", "2027-01-31T19:00:00+01:00",
                                     "2027-01-31 18:00:00Z", "2027-01-31T13:00:00-05:00"])
def test_not_after_is_an_offset_date_time(tmp_path, written):
    text = entry("owner", ALICE) + entry("driver", BOB) + f"not_after = {written}\n"
    ring = load_keyring(write(tmp_path / "keys.toml", text))
    alice, bob = ring.keys[key_id(ALICE)], ring.keys[key_id(BOB)]
    assert alice.not_after is None
    assert bob.not_after == END.timestamp()


def test_key_entry_round_trips_not_after_in_utc(tmp_path):
    local = END.astimezone(datetime.timezone(datetime.timedelta(hours=1)))
    fraction = END + datetime.timedelta(milliseconds=250)
    text = (key_entry("booking 4711", "driver", BOB, not_after=local)
            + key_entry("late", "driver", CAROL, not_after=fraction)
            + key_entry("alice", "owner", ALICE))
    assert "not_after = 2027-01-31T18:00:00Z\n" in text  # UTC, whatever the offset given
    assert text.count("not_after") == 2
    ring = load_keyring(write(tmp_path / "keys.toml", text))
    assert ring.keys[key_id(BOB)].not_after == END.timestamp()
    assert ring.keys[key_id(CAROL)].not_after == fraction.timestamp()
    assert ring.keys[key_id(ALICE)].not_after is None


def test_a_key_expires_only_after_its_not_after():
    end = END.timestamp()
    booking = AuthorizedKey(key_id(BOB), "booking", "driver", BOB, not_after=end)
    assert not booking.expired(end - 3600)
    assert not booking.expired(end)  # still valid at the very moment named
    assert booking.expired(end + 0.001)
    assert booking.expired(end + 86400 * 365)
    forever = AuthorizedKey(key_id(ALICE), "alice", "owner", ALICE)
    assert not forever.expired(end * 10)
