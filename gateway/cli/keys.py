"""``ev-gateway keys``: sender keys and the authorized-keys file of remote commands.

``generate`` makes a sender's key pair; ``add``, ``list`` and ``remove`` edit
the authorized-keys file (docs/commands.md) by text, so comments survive;
``gateway`` prints the public half of the key that signs results. Every edit
is validated with the gateway's own loader and swapped in with one rename, so
a running gateway, which re-reads the file when it changes, never sees half of
it. Problems are ConfigErrors: one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.commands.envelope import b64url, key_id, raw_public_key
from gateway.commands.keys import (
    ROLES,
    KeyRing,
    gateway_key,
    generate_private_key,
    key_entry,
    load_keyring,
    parse_public_key,
    public_path,
    public_pem,
    store_gateway_key,
)
from gateway.config.errors import ConfigError
from gateway.config.settings import load_settings
from gateway.config.toml_table import read_toml

HEADER = ("# Authorized keys for ev-gateway remote commands (docs/commands.md).\n"
          "# Edit with `ev-gateway keys add` / `keys remove`; the gateway re-reads it on change.\n")
NEW_FILE_MODE = 0o644
EXAMPLE_KEYS = "/etc/ev-gateway/keys.toml"
MAX_NAME = 64
_TABLE = re.compile(r"^\s*\[")
_KEY_TABLE = re.compile(r"^\s*\[\[\s*key\s*\]\]\s*(#.*)?$")


def add_parser(sub: Any) -> None:
    """Register the sub-command and its own sub-commands."""
    p = sub.add_parser("keys", help="manage the keys of remote commands")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = keys.add_parser("generate", help="create a sender key pair (FILE and FILE.pub)")
    g.add_argument("file", metavar="FILE", help="private key file to create")
    g.add_argument("--name", help="name to suggest for the key (default: from FILE)")
    g.set_defaults(handler=generate)
    a = keys.add_parser("add", help="authorise a public key in the authorized-keys file")
    a.add_argument("public", metavar="PUBLIC",
                   help="public key file (PEM or base64url), or the base64url text itself "
                        "(after --, as it may begin with -)")
    a.add_argument("--role", required=True, help="owner, driver, fleet, service, or a [roles] one")
    a.add_argument("--name", help="a name for people (default: the key id)")
    a.add_argument("--not-after", metavar="DATETIME",
                   help="the key stops working after this ISO 8601 time with an offset, "
                        "e.g. 2027-01-31T18:00:00Z (a car-sharing booking)")
    a.add_argument("--keys", required=True, metavar="KEYSFILE", help="authorized-keys TOML")
    a.set_defaults(handler=add)
    ls = keys.add_parser("list", help="show the authorised keys and what each may do")
    ls.add_argument("--keys", required=True, metavar="KEYSFILE", help="authorized-keys TOML")
    ls.set_defaults(handler=list_keys)
    r = keys.add_parser("remove", help="revoke a key (a running gateway follows at once)")
    r.add_argument("kid", metavar="KID", help="key id, as `keys list` shows it")
    r.add_argument("--keys", required=True, metavar="KEYSFILE", help="authorized-keys TOML")
    r.set_defaults(handler=remove)
    gw = keys.add_parser("gateway", help="print the public key that signs command results")
    where = gw.add_mutually_exclusive_group()
    where.add_argument("--config", help="gateway settings TOML ([commands] gateway_key)")
    where.add_argument("--state-dir", help="the gateway's state directory (gateway.key)")
    gw.add_argument("--key", metavar="FILE", help="the gateway's private key file itself")
    gw.set_defaults(handler=show_gateway_key)


# ---- generate -----------------------------------------------------------------------


def default_name(path: Path) -> str:
    """``alice.key`` -> ``alice``."""
    return path.stem if path.suffix == ".key" and path.stem else path.name


def generate(args: argparse.Namespace) -> int:
    """Create FILE and FILE.pub; print the key and the line that authorises it."""
    path = Path(args.file)
    name = check_name(args.name if args.name is not None else default_name(path))
    for target in (path, public_path(path)):
        if target.exists() or target.is_symlink():
            raise ConfigError(str(target), "already exists; refusing to overwrite a key")
    try:
        key = generate_private_key(path)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot create the key: {exc.strerror or exc}") from None
    public = key.public_key()
    print(f"key id      {key_id(public)}")
    print(f"public key  {b64url(raw_public_key(public))}")
    print(f"wrote       {path} (private: keep it secret) and {public_path(path)}")
    print("authorise it on the gateway with (role: " + ", ".join(ROLES) + "):")
    print("  " + shlex.join(["ev-gateway", "keys", "add", str(public_path(path)), "--role",
                             "owner", "--name", name, "--keys", EXAMPLE_KEYS]))
    return 0


# ---- add / list / remove ------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it can be a key's name; ConfigError otherwise."""
    if not name.strip() or len(name) > MAX_NAME:
        raise ConfigError("--name", f"expected 1-{MAX_NAME} characters, got {name!r}")
    # Names land in log lines and a hand-edited file: nothing that hides or breaks either.
    if any(unicodedata.category(c).startswith("C") or c in "\"'" for c in name):
        raise ConfigError("--name", f"{name!r}: no control characters or quotes, please")
    return name


def read_public(arg: str) -> Ed25519PublicKey:
    """The key in file ``arg`` (PEM or base64url), or ``arg`` itself as base64url."""
    path = Path(arg)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(arg, f"cannot read the public key: {exc}") from None
        if "PRIVATE KEY" in text:
            raise ConfigError(arg, f"is a private key; give its public half, {public_path(path)}")
        where = arg
    else:
        text, where = arg, "PUBLIC"
    try:
        return parse_public_key(text)
    except ValueError as exc:
        hint = "" if where == arg else " (and there is no such file)"
        raise ConfigError(where, f"not an Ed25519 public key: {exc}{hint}") from None


def current(path: Path) -> tuple[str, KeyRing | None]:
    """The text and keys of the authorized-keys file; ("", None) when it does not exist."""
    if not path.exists():
        return "", None
    ring = load_keyring(path)
    return path.read_text(encoding="utf-8"), ring


def add(args: argparse.Namespace) -> int:
    """Append a ``[[key]]`` table to the keys file (created if missing)."""
    path = Path(args.keys)
    public = read_public(args.public)
    kid = key_id(public)
    name = check_name(args.name if args.name is not None else kid)
    text, ring = current(path)
    roles = ring.roles if ring is not None else ROLES
    if args.role not in roles:
        raise ConfigError(str(path), f"unknown role {args.role!r}; roles: {', '.join(roles)}",
                          key="role")
    if ring is not None and (known := ring.lookup(kid)) is not None:
        raise ConfigError(str(path), f"key {kid} is already there, as {known.name!r} "
                                     f"({known.role}); remove it first to change it")
    if not text:
        text = HEADER
    elif not text.endswith("\n"):
        text += "\n"
    new = replace_file(path, text + key_entry(name, args.role, public,
                                              _until(args.not_after)))
    added = new.keys[kid]
    until = "" if added.not_after is None else f" until {args.not_after}"
    print(f"added {kid} {added.name!r} as {added.role}{until}: "
          f"{', '.join(new.roles[added.role])}")
    return 0


def _until(text: str | None) -> datetime.datetime | None:
    if text is None:
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ConfigError("--not-after", f"expected an ISO 8601 time with an offset, e.g. "
                                         f"2027-01-31T18:00:00Z, got {text!r}")
    return value


def list_keys(args: argparse.Namespace) -> int:
    """One line per key: id, role, name and the commands the role allows."""
    path = Path(args.keys)
    ring = load_keyring(path)
    if not ring.keys:
        print(f"no keys in {path}")
    for key in ring.keys.values():
        until = "" if key.not_after is None else "  until " + datetime.datetime.fromtimestamp(
            key.not_after, datetime.UTC).isoformat().replace("+00:00", "Z")
        print(f"{key.kid}  {key.role:<8}  {key.name:<20}  {', '.join(ring.roles[key.role])}"
              f"{until}")
    return 0


def remove(args: argparse.Namespace) -> int:
    """Delete one ``[[key]]`` table by text, keeping every other line."""
    path = Path(args.keys)
    ring = load_keyring(path)
    text = path.read_text(encoding="utf-8")
    key = ring.lookup(args.kid)
    if key is None:
        raise ConfigError(str(path), f"no key {args.kid!r}; `ev-gateway keys list` shows them")
    data, _ = read_toml(path, "authorized keys")
    ids = [key_id(parse_public_key(entry["public_key"])) for entry in data.get("key", [])]
    new_text = without_block(text, ids.index(key.kid), len(ids), str(path))

    def unchanged_but_one(new: KeyRing) -> None:
        if set(new.keys) != set(ring.keys) - {key.kid} or dict(new.roles) != dict(ring.roles):
            raise ConfigError(str(path), f"cannot remove {key.kid} by text (unusual layout); "
                                         "edit the file by hand")

    replace_file(path, new_text, unchanged_but_one)
    print(f"removed {key.kid} {key.name!r} ({key.role}) from {path}; "
          "a running gateway refuses it from its next command")
    return 0


def without_block(text: str, index: int, count: int, file: str) -> str:
    """``text`` without its ``index``-th ``[[key]]`` table (of ``count``)."""
    lines = text.splitlines(keepends=True)
    tables = [i for i, line in enumerate(lines) if _TABLE.match(line)]
    starts = [i for i in tables if _KEY_TABLE.match(lines[i])]
    if len(starts) != count:
        raise ConfigError(file, "keys are not all written as [[key]] tables; edit it by hand")
    start = starts[index]
    end = next((i for i in tables if i > start), len(lines))
    # Comments right above the next table describe that table, not this one.
    while end > start + 1 and _blank_or_comment(lines[end - 1]):
        end -= 1
    # A comment right above a table (no blank line between) is about that table.
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    # key_entry() puts a blank line before each table: drop one, not leave two.
    if start > 0 and not lines[start - 1].strip() \
            and (end == len(lines) or not lines[end].strip()):
        start -= 1
    return "".join(lines[:start] + lines[end:])


def _blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def replace_file(path: Path, text: str,
                 check: Callable[[KeyRing], None] | None = None) -> KeyRing:
    """Write ``text`` to ``path`` if it is a valid keys file: via a temporary file in the
    same directory and one rename, so a reader sees the old file or the new, never half."""
    try:
        return _replace(path, text, check)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot write: {exc.strerror or exc}") from None


def _replace(path: Path, text: str, check: Callable[[KeyRing], None] | None) -> KeyRing:
    mode = path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE
    directory = path.parent
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        try:
            ring = load_keyring(tmp)
        except ConfigError as exc:  # report it against the real file, not the temporary one
            raise ConfigError(str(path), exc.detail, line=exc.line, key=exc.key) from None
        if check is not None:
            check(ring)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)
    return ring


# ---- the gateway's key --------------------------------------------------------------


def _owned_like_its_directory(path: Path) -> None:
    """Run with sudo, a new key would belong to root and the service (its own user) could
    not read it: give it, and its public half, to the owner of the state directory."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    for p in (path, public_path(path)):
        if p.exists():
            os.chown(p, st.st_uid, st.st_gid)


def show_gateway_key(args: argparse.Namespace) -> int:
    """Print the public half (PEM) and id of the gateway's result-signing key."""
    if args.key:
        path = Path(args.key)
    elif args.config:
        path = load_settings(args.config).gateway_key_path
    elif args.state_dir:
        path = Path(args.state_dir) / "gateway.key"
    else:
        raise ConfigError("keys gateway", "give --config SETTINGS, --state-dir DIR or --key FILE")
    try:
        key, new = gateway_key(path)
        if new:  # operators pin the key before the first start, so make it now
            store_gateway_key(path, key)
            _owned_like_its_directory(path)
        public = key.public_key()
    except (ValueError, OSError) as exc:
        raise ConfigError(str(path), str(exc)) from None
    print(public_pem(public).decode("ascii"), end="")
    print(f"key id: {key_id(public)}")
    return 0
