"""The signed command envelope: wire format, every Malformed path, signatures, key ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.commands.envelope import (
    COMMAND_CONTEXT,
    MAX_PAYLOAD,
    RESULT_CONTEXT,
    Command,
    Malformed,
    Result,
    SignedPayload,
    b64url,
    key_id,
    new_command_id,
    open_result,
    parse_command,
    sign_command,
    sign_result,
    unb64url,
    unwrap,
    verify,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KID = key_id(PUB)
CID = "0123456789abcdef0123456789abcdef"
ISSUED = 1_700_000_000_000


def command(**changes: Any) -> Command:
    fields: dict[str, Any] = {"vehicle": "car-1", "id": CID, "cmd": "charge-limit",
                              "args": {"soc": 80}, "issued_at_ms": ISSUED,
                              "expires_at_ms": ISSUED + 30_000, "kid": KID}
    return Command(**{**fields, **changes})


def body_json(drop: tuple[str, ...] = (), **changes: Any) -> bytes:
    """A command body with fields changed or dropped (no validation on the way)."""
    data = {**command().body(), **changes}
    for name in drop:
        del data[name]
    return json.dumps(data).encode()


def envelope(raw: bytes, **outer: Any) -> bytes:
    """A correctly signed wire payload around ``raw``, with outer fields overridden."""
    data = {"v": 1, "body": b64url(raw), "sig": b64url(KEY.sign(COMMAND_CONTEXT + raw))}
    return json.dumps({**data, **outer}).encode()


def malformed(fn: Any, arg: bytes, fragment: str) -> None:
    with pytest.raises(Malformed) as info:
        fn(arg)
    assert fragment in str(info.value)


def test_sign_unwrap_parse_verify_round_trip():
    cmd = command()
    signed = unwrap(sign_command(cmd, KEY))
    assert verify(PUB, COMMAND_CONTEXT, signed)
    assert parse_command(signed.body) == cmd


def test_wire_format_byte_for_byte():
    payload = sign_command(command(), KEY)
    body = (b'{"vehicle":"car-1","id":"' + CID.encode() + b'","cmd":"charge-limit",'
            b'"args":{"soc":80},"issued_at_ms":1700000000000,"expires_at_ms":1700000030000,'
            b'"kid":"' + KID.encode() + b'"}')
    sig = KEY.sign(COMMAND_CONTEXT + body)  # Ed25519 is deterministic
    assert payload == (b'{"v":1,"body":"' + b64url(body).encode() + b'","sig":"'
                       + b64url(sig).encode() + b'"}')
    assert b"=" not in payload and b"+" not in payload and b"/" not in payload


def test_payload_size_limit_is_inclusive():
    base = sign_command(command(), KEY)
    exact = base[:-1] + b" " * (MAX_PAYLOAD - len(base)) + b"}"
    assert len(exact) == MAX_PAYLOAD
    assert unwrap(exact).body == unwrap(base).body
    malformed(unwrap, exact[:-1] + b" }", f"{MAX_PAYLOAD + 1} bytes")


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"lock", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
    (b'{"v":1,"body":"e30"}', "exactly the keys"),
    (b'{"v":1,"body":"e30","sig":"","extra":0}', "exactly the keys"),
    (b'{"V":1,"body":"e30","sig":""}', "exactly the keys"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"v":NaN,"body":"","sig":""}', "NaN is not valid JSON"),
    (b'{"v":1,"v":1,"body":"","sig":""}', "duplicate key"),
    (b'{"v":' + b"[" * 2000 + b"]" * 2000 + b"}", "not JSON"),
])
def test_outer_wrapper_malformed(raw, fragment):
    malformed(unwrap, raw, fragment)


@pytest.mark.parametrize("version", [0, 2, -1, True, False, "1", None, [1], {"v": 1}])
def test_only_format_version_1_is_accepted(version):
    malformed(unwrap, envelope(body_json(), v=version), "format version")


def test_format_version_float_is_refused():
    malformed(unwrap, envelope(body_json(), v=1.0), "format version")


@pytest.mark.parametrize("field", ["body", "sig"])
@pytest.mark.parametrize("value", [1, None, ["e30"], {"a": "b"}, True])
def test_body_and_sig_must_be_strings(field, value):
    malformed(unwrap, envelope(body_json(), **{field: value}), "base64url strings")


@pytest.mark.parametrize("field", ["body", "sig"])
@pytest.mark.parametrize("text", ["ab+c", "ab/c", "a b", "ab=c", "a===", "A", "abc\n", "é"])
def test_bad_base64url_is_malformed(field, text):
    malformed(unwrap, envelope(body_json(), **{field: text}), "base64url")


def test_base64url_helpers_round_trip_with_and_without_padding():
    for size in range(8):
        data = bytes(range(250, 250 - size, -1))
        text = b64url(data)
        assert "=" not in text
        assert unb64url(text) == data
        assert unb64url(text + "=" * (-len(text) % 4)) == data


@pytest.mark.parametrize("size", [0, 32, 63, 65, 128])
def test_signature_must_be_64_bytes(size):
    malformed(unwrap, envelope(body_json(), sig=b64url(bytes(size))), f"signature of {size}")


@pytest.mark.parametrize("name", sorted(command().body()))
def test_each_body_key_is_required(name):
    malformed(parse_command, body_json(drop=(name,)), f"lacks {name}")


def test_missing_and_extra_body_keys_are_both_named():
    malformed(parse_command, body_json(extra=1), "has unknown extra")
    malformed(parse_command, body_json(drop=("kid", "args"), zz=1),
              "lacks args, kid; has unknown zz")


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"vehicle": 7}, "vehicle must be a string"),
    ({"vehicle": None}, "vehicle must be a string"),
    ({"id": 12}, "id must be a string"),
    ({"cmd": ["lock"]}, "cmd must be a string"),
    ({"kid": None}, "kid must be a string"),
    ({"id": CID[:-1]}, "32 lowercase hex"),
    ({"id": CID + "0"}, "32 lowercase hex"),
    ({"id": CID.upper()}, "32 lowercase hex"),
    ({"id": "g" + CID[1:]}, "32 lowercase hex"),
    ({"id": CID + "\n"}, "32 lowercase hex"),
    ({"kid": KID[:-1]}, "kid must be 16"),
    ({"kid": KID + "0"}, "kid must be 16"),
    ({"kid": "ABCDEF0123456789"}, "kid must be 16"),
    ({"kid": "z" * 16}, "kid must be 16"),
    ({"cmd": ""}, "lowercase command name"),
    ({"cmd": "Lock"}, "lowercase command name"),
    ({"cmd": "1lock"}, "lowercase command name"),
    ({"cmd": "lock_now"}, "lowercase command name"),
    ({"cmd": "lock "}, "lowercase command name"),
    ({"cmd": "a" * 33}, "lowercase command name"),
    ({"args": []}, "args must be an object"),
    ({"args": None}, "args must be an object"),
    ({"args": "soc=80"}, "args must be an object"),
])
def test_body_field_types_and_shapes(changes, fragment):
    malformed(parse_command, body_json(**changes), fragment)


def test_longest_command_name_is_accepted():
    assert parse_command(body_json(cmd="a" + "-9" * 15 + "z")).cmd == "a" + "-9" * 15 + "z"


@pytest.mark.parametrize("field", ["issued_at_ms", "expires_at_ms"])
@pytest.mark.parametrize("value", [True, False, -1, 1.5, 1000.0, 2**53, 2**63, "1000", None])
def test_timestamps_must_be_safe_non_negative_integers(field, value):
    malformed(parse_command, body_json(**{field: value}), f"{field} must be an integer")


@pytest.mark.parametrize("value", [0, 2**53 - 1])
def test_timestamp_bounds_that_are_accepted(value):
    cmd = parse_command(body_json(issued_at_ms=value, expires_at_ms=value))
    assert (cmd.issued_at_ms, cmd.expires_at_ms) == (value, value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants_are_refused(constant):
    raw = body_json().replace(b'"soc": 80', b'"soc": ' + constant.encode())
    assert constant.encode() in raw
    malformed(parse_command, raw, "is not valid JSON")
    malformed(unwrap, envelope(raw).replace(b'"v": 1', b'"v": ' + constant.encode()),
              "is not valid JSON")


@pytest.mark.parametrize("raw", [
    body_json().replace(b'"kid"', b'"vehicle": "car-2", "kid"'),
    body_json().replace(b'"soc": 80', b'"soc": 80, "soc": 100'),
])
def test_duplicate_keys_anywhere_in_the_body_are_refused(raw):
    malformed(parse_command, raw, "duplicate key")


def test_body_that_is_not_utf8_is_refused_even_when_signed():
    raw = b'{"vehicle": "\xff"}'
    signed = unwrap(envelope(raw))
    assert verify(PUB, COMMAND_CONTEXT, signed)
    malformed(parse_command, signed.body, "not UTF-8")


def test_deeply_nested_body_is_malformed_not_a_crash():
    malformed(parse_command, b"[" * 100_000 + b"]" * 100_000, "not JSON")


def _result(**changes: Any) -> Result:
    fields: dict[str, Any] = {"vehicle": "car-1", "id": CID, "cmd": "lock",
                              "status": "succeeded", "reason": None, "at_ms": ISSUED + 5,
                              "kid": key_id(OTHER.public_key()), "key": KID,
                              "detail": {"attempts": 1}}
    return Result(**{**fields, **changes})


def test_context_separation_between_commands_and_results():
    result_signed = unwrap(sign_result(_result(), KEY))
    assert verify(PUB, RESULT_CONTEXT, result_signed)
    assert not verify(PUB, COMMAND_CONTEXT, result_signed)
    command_payload = sign_command(command(), KEY)
    command_signed = unwrap(command_payload)
    assert not verify(PUB, RESULT_CONTEXT, command_signed)
    malformed(lambda p: open_result(p, PUB), command_payload, "does not verify")
    bare = SignedPayload(command_signed.body, KEY.sign(command_signed.body))
    assert not verify(PUB, COMMAND_CONTEXT, bare)  # no context: not a command signature


def test_one_flipped_bit_anywhere_fails_verification():
    signed = unwrap(sign_command(command(), KEY))
    for i in range(len(signed.body)):
        body = bytearray(signed.body)
        body[i] ^= 1 << (i % 8)
        assert not verify(PUB, COMMAND_CONTEXT, SignedPayload(bytes(body), signed.sig)), i
    for i in range(len(signed.sig)):
        sig = bytearray(signed.sig)
        sig[i] ^= 1 << (i % 8)
        assert not verify(PUB, COMMAND_CONTEXT, SignedPayload(signed.body, bytes(sig))), i


def test_other_key_and_zero_signature_do_not_verify():
    signed = unwrap(sign_command(command(), KEY))
    assert not verify(OTHER.public_key(), COMMAND_CONTEXT, signed)
    assert not verify(PUB, COMMAND_CONTEXT, SignedPayload(signed.body, bytes(64)))


def test_key_id_is_sha256_of_the_raw_public_key():
    raw = PUB.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert key_id(PUB) == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(Ed25519PublicKey.from_public_bytes(raw)) == KID
    assert key_id(KEY.public_key()) == KID
    assert key_id(OTHER.public_key()) != KID
    fresh = Ed25519PrivateKey.generate().public_key()
    fresh_raw = fresh.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert key_id(fresh) == hashlib.sha256(fresh_raw).hexdigest()[:16]


def test_new_command_ids_are_random_and_valid():
    ids = {new_command_id() for _ in range(50)}
    assert len(ids) == 50
    for cid in ids:
        assert parse_command(body_json(id=cid)).id == cid


def test_open_result_verifies_with_the_gateway_key():
    result = _result()
    payload = sign_result(result, OTHER)
    assert open_result(payload, OTHER.public_key()) == result
    assert open_result(payload, None) == result
    malformed(lambda p: open_result(p, PUB), payload, "does not verify")
    forged = sign_result(_result(status="failed"), KEY)
    malformed(lambda p: open_result(p, OTHER.public_key()), forged, "does not verify")
    assert open_result(forged, None).status == "failed"  # unverified: caller's choice


def test_open_result_refuses_broken_bodies():
    for name in ("vehicle", "id", "status", "at_ms", "kid"):
        data = {k: v for k, v in _result().body().items() if k != name}
        body = json.dumps(data).encode()
        payload = json.dumps({"v": 1, "body": b64url(body),
                              "sig": b64url(OTHER.sign(RESULT_CONTEXT + body))}).encode()
        malformed(lambda p: open_result(p, OTHER.public_key()), payload, f"lacks {name}")
    malformed(lambda p: open_result(p, None), b'{"v":1,"body":"W10","sig":""}',
              "signature of 0")
    body = b"[1]"
    payload = json.dumps({"v": 1, "body": b64url(body), "sig": b64url(bytes(64))}).encode()
    malformed(lambda p: open_result(p, None), payload, "not a JSON object")


def test_result_body_and_final():
    assert "detail" not in _result(detail=None).body()
    assert "detail" not in _result(detail={}).body()
    assert _result().body()["detail"] == {"attempts": 1}
    for status in ("succeeded", "failed", "rejected", "expired"):
        assert _result(status=status).final
    assert not _result(status="accepted").final
    with pytest.raises(ValueError, match="JSON"):
        sign_result(_result(detail={"x": float("nan")}), KEY)
