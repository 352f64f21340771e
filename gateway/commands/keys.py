"""Who may command this vehicle: the authorized-keys file and the gateway's own key.

The gateway holds only public keys. Each has a role, and each role a list
of commands it may send::

    [roles]                      # optional: replaces a role's default list
    driver = ["lock", "unlock"]

    [[key]]
    name = "alice-phone"
    role = "owner"
    public_key = "<base64url of the 32 raw Ed25519 bytes>"

The file is re-read when it changes (``ev-gateway keys add`` / ``remove``
edit it while the gateway runs), so revoking a key needs no restart. A
file that became invalid is reported once and the last good keys stay in
force; a file that was deleted revokes every key.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from gateway.commands.envelope import Malformed, b64url, key_id, raw_public_key, unb64url
from gateway.config.errors import ConfigError
from gateway.config.toml_table import Table, read_toml

log = logging.getLogger(__name__)

COMMANDS = ("lock", "unlock", "locate", "charge-limit", "speed-profile", "reset-latches")
ROLES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "owner": ("lock", "unlock", "locate", "charge-limit", "speed-profile"),
    "driver": ("lock", "unlock", "locate"),
    "fleet": ("lock", "unlock", "locate", "charge-limit", "speed-profile"),
    "service": COMMANDS,
})
"""Default commands of each role. Only a service key may release latched safety alerts."""


@dataclass(frozen=True)
class AuthorizedKey:
    """One public key allowed to send commands."""

    kid: str
    name: str
    role: str
    key: Ed25519PublicKey
    not_after: float | None = None
    """Epoch seconds after which the key may no longer command (a car-sharing booking)."""

    def expired(self, now: float) -> bool:
        """Whether the key's validity ended before ``now``."""
        return self.not_after is not None and now > self.not_after


@dataclass(frozen=True)
class KeyRing:
    """The keys and role table of one authorized-keys file."""

    keys: MappingProxyType[str, AuthorizedKey]
    roles: MappingProxyType[str, tuple[str, ...]]

    def lookup(self, kid: str) -> AuthorizedKey | None:
        """The key with id ``kid``, or None."""
        return self.keys.get(kid)

    def allows(self, key: AuthorizedKey, command: str) -> bool:
        """Whether ``key``'s role may send ``command``."""
        return command in self.roles.get(key.role, ())


EMPTY = KeyRing(MappingProxyType({}), ROLES)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or base64url of its 32 raw bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = load_pem_public_key(text.encode())
        except UnsupportedAlgorithm as exc:
            raise ValueError(f"unsupported key type: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = unb64url(text)
    except Malformed:
        raise ValueError("expected PEM or base64url of 32 raw bytes") from None
    if len(raw) != 32:
        raise ValueError(f"expected 32 raw bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_keyring(path: Path) -> KeyRing:
    """Read and validate an authorized-keys file; ConfigError naming file, line and key."""
    data, source = read_toml(path, "authorized keys")
    top = Table(data, str(path), source, "")
    top.check_keys(["roles", "key"])
    roles = dict(ROLES)
    roles_t = top.sub("roles", "roles", "roles")
    if roles_t is not None:
        for role in roles_t.data:
            allowed = roles_t.str_list(role)
            unknown = sorted(set(allowed) - set(COMMANDS))
            if unknown:
                roles_t.fail(role, f"unknown command {', '.join(unknown)}; "
                                   f"commands: {', '.join(COMMANDS)}")
            roles[role] = tuple(allowed)
    raw_keys = data.get("key", [])
    if not isinstance(raw_keys, list) or not all(isinstance(k, dict) for k in raw_keys):
        top.fail("key", "expected [[key]] tables")
    keys: dict[str, AuthorizedKey] = {}
    for index, entry in enumerate(raw_keys):
        t = Table(entry, str(path), source, "key", index, f"key[{index}]")
        t.check_keys(["name", "role", "public_key", "id", "not_after"])
        role = t.req_str("role")
        if role not in roles:
            t.fail("role", f"unknown role {role!r}; roles: {', '.join(roles)}")
        try:
            public = parse_public_key(t.req_str("public_key"))
        except ValueError as exc:
            t.fail("public_key", str(exc))
        kid = key_id(public)
        stated = t.opt_str("id")
        if stated is not None and stated != kid:
            t.fail("id", f"does not match the key: its id is {kid}")
        if kid in keys:
            t.fail("public_key", f"key {kid} is listed twice")
        keys[kid] = AuthorizedKey(kid, t.opt_str("name") or kid, role, public,
                                  _not_after(t))
    return KeyRing(MappingProxyType(keys), MappingProxyType(roles))


class KeyFile:
    """An authorized-keys file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self.ring = load_keyring(path)  # a broken file at start-up is a ConfigError
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        # The inode catches an atomic replace within one coarse mtime tick.
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def current(self) -> KeyRing:
        """The keys now in force."""
        stamp = self._stat()
        if stamp == self._stamp:
            return self.ring
        self._stamp = stamp
        if stamp is None:
            log.warning("commands: %s is gone; no key may send commands", self.path)
            self.ring = EMPTY
            return self.ring
        try:
            self.ring = load_keyring(self.path)
        except ConfigError as exc:
            log.error("commands: %s; keeping the %d keys loaded before", exc, len(self.ring.keys))
            return self.ring
        log.info("commands: reloaded %s: %d keys", self.path, len(self.ring.keys))
        return self.ring


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """Create a new key at ``path`` (PKCS#8 PEM, mode 0600) and ``path``.pub (PEM)."""
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Store ``key`` at ``path`` (PKCS#8 PEM, mode 0600) and its public half at ``path``.pub;
    FileExistsError when ``path`` exists.

    Both files are written to a temporary name, flushed to the card and then linked into
    place, so a power cut leaves either no key or a whole one, never an empty file that
    would keep the gateway from starting."""
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, pem, 0o600, replace=False)
    # The public half is derived; written second, it is only ever missing, never wrong.
    _write_new(public_path(path), public_pem(key.public_key()), 0o644, replace=True)


def _write_new(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL and the final mode from the start: never chmod a key after writing it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the key exists: a key is never overwritten
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def public_path(path: Path) -> Path:
    """Where the public half of the private key at ``path`` is kept."""
    return path.with_name(path.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) text of ``key``."""
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; ValueError (with the reason) otherwise."""
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return key


def gateway_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The gateway's result-signing key and whether it is new: a missing key is made in
    memory only, so that building a gateway (``ev-gateway check``) writes nothing;
    :func:`store_gateway_key` keeps it when the gateway starts."""
    if not path.exists():
        return Ed25519PrivateKey.generate(), True
    return load_private_key(path), False


def store_gateway_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a new gateway key on first start (FileExistsError if one appeared meanwhile)."""
    write_private_key(path, key)
    log.info("commands: created the gateway key %s (id %s)", path, key_id(key.public_key()))


def key_entry(name: str, role: str, key: Ed25519PublicKey,
              not_after: datetime.datetime | None = None) -> str:
    """A ``[[key]]`` table for the authorized-keys file."""
    until = "" if not_after is None else \
        f"not_after = {not_after.astimezone(datetime.UTC).isoformat().replace('+00:00', 'Z')}\n"
    return (f'\n[[key]]\nname = "{_toml_escape(name)}"\nrole = "{role}"\n'
            f'public_key = "{b64url(raw_public_key(key))}"\nid = "{key_id(key)}"\n{until}')


def _not_after(t: Table) -> float | None:
    value = t.data.get("not_after")
    if value is None:
        return None
    # A date-time with an offset only: a local time would depend on the head unit's zone.
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        t.fail("not_after", f"expected a date-time with an offset, e.g. "
                            f"2027-01-31T18:00:00Z, got {value!r}")
    return value.timestamp()


def _toml_escape(text: str) -> str:
    # A TOML basic string: backslash, quote and every control character escaped, so any
    # name keeps the file valid (a broken file would freeze the keys in force).
    return "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
                   else "\\" + c if c in '"\\' else c for c in text)
