"""The signed command envelope and the signed result, byte for byte.

A command is signed by its sender's Ed25519 key; the gateway holds only
public keys, so neither the broker nor anyone with a broker password can
forge one. docs/commands.md describes the format with a worked example.

The wire payload is a small JSON wrapper around the signed bytes::

    {"v": 1, "body": "<base64url of BODY>", "sig": "<base64url of SIGNATURE>"}

``SIGNATURE = Ed25519-sign(CONTEXT + BODY)``. The signature covers the body
bytes exactly as sent, so neither side ever re-serialises JSON before
verifying (no canonical-JSON rules to get wrong). ``CONTEXT`` separates
commands from results, so a signed result can never pass as a command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FORMAT_VERSION = 1
COMMAND_CONTEXT = b"ev-gateway command v1\x00"
RESULT_CONTEXT = b"ev-gateway result v1\x00"
MAX_PAYLOAD = 4096
"""Largest command payload accepted, in bytes; real commands are about 400."""
COMMAND_ID_BYTES = 16
STATUSES = ("accepted", "succeeded", "failed", "rejected", "expired")
FINAL_STATUSES = frozenset({"succeeded", "failed", "rejected", "expired"})

_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_KID = re.compile(r"^[0-9a-f]{16}$")
_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_BODY_KEYS = frozenset({"vehicle", "id", "cmd", "args", "issued_at_ms", "expires_at_ms", "kid"})


class Malformed(ValueError):
    """A payload that is not a well-formed envelope; the message says what is wrong."""


def b64url(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Decode unpadded (or padded) base64url; Malformed for anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise Malformed("not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"not base64url text: {exc}") from None


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A key's id: the first 8 bytes of SHA-256 over its 32 raw bytes, as 16 hex digits.

    Derived from the key, so a sender cannot claim another key's id, and
    both ends compute it without coordination (like an SSH fingerprint).
    """
    return hashlib.sha256(raw_public_key(key)).hexdigest()[:16]


def request_digest(payload: bytes) -> str:
    """Which request a result answers: the first 16 bytes of SHA-256 over the body bytes
    followed by the 64 signature bytes, as 32 hex digits.

    Body and signature, not the wrapper: a copy re-wrapped with other spacing is the
    same authentic request, while a copy with a forged signature or an altered body is
    not. For a payload that is not even a wrapper, the digest covers the raw bytes.
    """
    try:
        signed = unwrap(payload)
    except Malformed:
        return hashlib.sha256(payload).hexdigest()[:32]
    return hashlib.sha256(signed.body + signed.sig).hexdigest()[:32]


def new_command_id() -> str:
    """16 random bytes as 32 lowercase hex digits."""
    return secrets.token_hex(COMMAND_ID_BYTES)


@dataclass(frozen=True)
class Command:
    """The signed content of a command envelope."""

    vehicle: str
    id: str
    cmd: str
    args: dict[str, Any]
    issued_at_ms: int
    expires_at_ms: int
    kid: str

    def body(self) -> dict[str, Any]:
        """The body as a JSON object."""
        return {"vehicle": self.vehicle, "id": self.id, "cmd": self.cmd, "args": self.args,
                "issued_at_ms": self.issued_at_ms, "expires_at_ms": self.expires_at_ms,
                "kid": self.kid}


@dataclass(frozen=True)
class SignedPayload:
    """A parsed wrapper: the exact signed bytes and the signature over them."""

    body: bytes
    sig: bytes


def wrap(body: bytes, sig: bytes) -> bytes:
    """The wire payload for ``body`` signed with ``sig``."""
    return json.dumps({"v": FORMAT_VERSION, "body": b64url(body), "sig": b64url(sig)},
                      separators=(",", ":")).encode()


def unwrap(payload: bytes) -> SignedPayload:
    """Split a wire payload into body bytes and signature; Malformed if it is not one."""
    if len(payload) > MAX_PAYLOAD:
        raise Malformed(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
    outer = _json_object(payload, "payload")
    if set(outer) != {"v", "body", "sig"}:
        raise Malformed("expected exactly the keys v, body and sig")
    if type(outer["v"]) is not int or outer["v"] != FORMAT_VERSION:
        raise Malformed(f"unsupported format version {outer['v']!r}; expected 1")
    if not isinstance(outer["body"], str) or not isinstance(outer["sig"], str):
        raise Malformed("body and sig must be base64url strings")
    sig = unb64url(outer["sig"])
    if len(sig) != 64:
        raise Malformed(f"signature of {len(sig)} bytes; Ed25519 signatures have 64")
    return SignedPayload(unb64url(outer["body"]), sig)


def sign_command(command: Command, key: Ed25519PrivateKey) -> bytes:
    """The wire payload of ``command`` signed with ``key``."""
    body = json.dumps(command.body(), separators=(",", ":")).encode()
    return wrap(body, key.sign(COMMAND_CONTEXT + body))


def parse_command(body: bytes) -> Command:
    """The command in signed body bytes (not yet verified); Malformed if it is not one."""
    data = _json_object(body, "body")
    missing = sorted(_BODY_KEYS - set(data))
    extra = sorted(set(data) - _BODY_KEYS)
    if missing or extra:
        raise Malformed("body " + "; ".join(
            part for part in (f"lacks {', '.join(missing)}" if missing else "",
                              f"has unknown {', '.join(extra)}" if extra else "") if part))
    for name in ("vehicle", "id", "cmd", "kid"):
        if not isinstance(data[name], str):
            raise Malformed(f"{name} must be a string")
    if not _HEX_ID.fullmatch(data["id"]):
        raise Malformed("id must be 16 bytes as 32 lowercase hex digits")
    if not _KID.fullmatch(data["kid"]):
        raise Malformed("kid must be 16 lowercase hex digits")
    if not _COMMAND_NAME.fullmatch(data["cmd"]):
        raise Malformed("cmd must be a lowercase command name")
    if not isinstance(data["args"], dict):
        raise Malformed("args must be an object")
    for name in ("issued_at_ms", "expires_at_ms"):
        value = data[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
            raise Malformed(f"{name} must be an integer of epoch milliseconds")
    return Command(data["vehicle"], data["id"], data["cmd"], data["args"],
                   data["issued_at_ms"], data["expires_at_ms"], data["kid"])


def verify(key: Ed25519PublicKey, context: bytes, signed: SignedPayload) -> bool:
    """True when ``signed.sig`` is ``key``'s signature over ``context + signed.body``."""
    try:
        key.verify(signed.sig, context + signed.body)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Result:
    """What the gateway answers; signed with the gateway's key."""

    vehicle: str
    id: str | None
    """The command id; None when the payload was too broken to carry one."""
    cmd: str | None
    status: str
    reason: str | None
    at_ms: int
    kid: str
    """The gateway key's id."""
    key: str | None = None
    """The id of the key that signed the command, once it was verified."""
    detail: dict[str, Any] | None = None
    req: str | None = None
    """:func:`request_digest` of the request this answers: a client accepts a result only
    for the body and signature it sent itself."""

    def body(self) -> dict[str, Any]:
        """The body as a JSON object."""
        out: dict[str, Any] = {"vehicle": self.vehicle, "id": self.id, "cmd": self.cmd,
                               "status": self.status, "reason": self.reason,
                               "at_ms": self.at_ms, "kid": self.kid, "key": self.key,
                               "req": self.req}
        if self.detail:
            out["detail"] = self.detail
        return out

    @property
    def final(self) -> bool:
        """True for every status but ``accepted``."""
        return self.status in FINAL_STATUSES


def sign_result(result: Result, key: Ed25519PrivateKey) -> bytes:
    """The wire payload of ``result`` signed with the gateway's ``key``."""
    body = json.dumps(result.body(), separators=(",", ":"), allow_nan=False).encode()
    return wrap(body, key.sign(RESULT_CONTEXT + body))


def open_result(payload: bytes, gateway_key: Ed25519PublicKey | None) -> Result:
    """Parse a result payload, verifying it when ``gateway_key`` is given.

    Raises Malformed for a broken payload or a signature that does not verify.
    """
    signed = unwrap(payload)
    if gateway_key is not None and not verify(gateway_key, RESULT_CONTEXT, signed):
        raise Malformed("the result's signature does not verify with the gateway key")
    data = _json_object(signed.body, "result body")
    try:
        return Result(data["vehicle"], data["id"], data["cmd"], data["status"], data["reason"],
                      data["at_ms"], data["kid"], data.get("key"), data.get("detail"),
                      data.get("req"))
    except KeyError as exc:
        raise Malformed(f"result body lacks {exc.args[0]}") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constants,
                           object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise Malformed(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} is not a JSON object")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins; a signed body must mean one thing.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise Malformed("duplicate key in a JSON object")
    return out


def _no_constants(name: str) -> Any:
    raise Malformed(f"{name} is not valid JSON")
