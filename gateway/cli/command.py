"""``ev-gateway command``: send one signed remote command and wait for its result.

The envelope is signed with the sender's key (``ev-gateway keys generate``)
and published once, QoS 1, to the vehicle's command topic. Over MQTT 5 the
results come back on a topic private to this client (response topic plus
correlation data); over MQTT 3.1.1 on ``cmd/res/{command id}``. Each result
is printed as it arrives (``accepted``, then the final one).

Exit status: 0 succeeded; 1 failed, rejected or expired; 2 a usage or
configuration error (nothing was sent); 3 no final result within
``--timeout`` (or no broker): whether the command ran is unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.cli.watch import split_broker
from gateway.clock import SystemClock
from gateway.commands import envelope as env
from gateway.commands.keys import load_private_key, parse_public_key
from gateway.config.errors import ConfigError
from gateway.mqtt.topics import Topics

SUCCEEDED, FAILED, USAGE, NO_RESULT = 0, 1, 2, 3
LOCATE_MODES = ("flash", "horn", "both")
ACTIONS = {
    "lock": "lock the doors",
    "unlock": "unlock the doors (only at a proven standstill)",
    "locate": "flash the lights and/or sound the horn",
    "charge-limit": "set the state of charge where charging stops",
    "speed-profile": "select a speed-cap profile, or 'none' (only at a standstill)",
    "reset-latches": "release latched safety alerts (service keys only)",
}


def add_parser(sub: Any) -> None:
    """Register the sub-command: one sub-parser per action, sharing the options."""
    p = sub.add_parser("command", help="send a signed remote command and wait for its result",
                       epilog="exit status: 0 succeeded; 1 failed, rejected or expired; "
                              "2 usage error; 3 no final result within --timeout")
    common = argparse.ArgumentParser(add_help=False)
    o = common.add_argument_group("command options")
    o.add_argument("--vehicle", required=True, help="vehicle id")
    o.add_argument("--key", required=True, metavar="FILE", help="the sender's private key")
    o.add_argument("--broker", default="localhost:1883", metavar="HOST:PORT",
                   help="MQTT broker (default localhost:1883; 8883 with TLS)")
    o.add_argument("--ttl", type=float, default=30.0,
                   help="seconds the command is valid (default 30)")
    o.add_argument("--timeout", type=float, default=15.0,
                   help="seconds to wait for the final result (default 15)")
    o.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version")
    o.add_argument("--username", help="broker user name")
    o.add_argument("--password-file", help="file whose first line is the broker password")
    o.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    o.add_argument("--ca", help="CA certificate(s) of the broker (implies TLS)")
    o.add_argument("--cert", help="client certificate (implies TLS)")
    o.add_argument("--cert-key", help="the client certificate's private key")
    o.add_argument("--gateway-key", metavar="FILE",
                   help="the gateway's public key (`ev-gateway keys gateway`) to verify results")
    o.add_argument("--json", action="store_true", help="print each result body as a JSON line")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    parsers = {name: actions.add_parser(name, parents=[common], help=text)
               for name, text in ACTIONS.items()}
    parsers["locate"].add_argument("--mode", choices=LOCATE_MODES, help="default: the vehicle's")
    parsers["charge-limit"].add_argument("soc", type=int, metavar="SOC", help="percent")
    parsers["speed-profile"].add_argument("profile", metavar="NAME",
                                          help="a profile of the vehicle, or 'none'")
    parsers["reset-latches"].add_argument("--alert", metavar="KEY",
                                          help="one alert key (default: every latched alert)")
    p.set_defaults(handler=run)


@dataclass(frozen=True)
class Broker:
    """How to reach the broker."""

    host: str
    port: int
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def command_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``args`` object of the envelope for the parsed action."""
    if args.action == "locate":
        return {"mode": args.mode} if args.mode else {}
    if args.action == "charge-limit":
        return {"soc": args.soc}
    if args.action == "speed-profile":
        return {"profile": args.profile}
    if args.action == "reset-latches":
        return {"key": args.alert} if args.alert else {}
    return {}


def build_command(vehicle: str, cmd: str, args: dict[str, Any], key: Ed25519PrivateKey,
                  ttl_s: float, now_s: float) -> env.Command:
    """A new command (fresh id) issued at ``now_s``, valid for ``ttl_s`` seconds."""
    issued = int(now_s * 1000)
    return env.Command(vehicle, env.new_command_id(), cmd, args, issued,
                       issued + int(ttl_s * 1000), env.key_id(key.public_key()))


def describe(result: env.Result) -> str:
    """One human line for a result."""
    text = f"{result.status:<9} {result.cmd or '?'} {result.id}"
    if result.reason:
        text += f" ({result.reason})"
    if result.detail:
        text += " " + json.dumps(result.detail, sort_keys=True)
    return text


def _warn(text: str) -> None:
    print(f"ev-gateway command: {text}", file=sys.stderr)


async def send(broker: Broker, command: env.Command, key: Ed25519PrivateKey, *,
               timeout: float, gateway_key: Ed25519PublicKey | None = None,
               as_json: bool = False) -> int:
    """Publish ``command`` signed with ``key``; print its results; the exit status."""
    client_id = f"evgw-cli-{secrets.token_hex(6)}"
    v5 = broker.protocol == "5"
    topics = Topics(command.vehicle)
    correlation = bytes.fromhex(command.id)
    # Outside evgw/: the gateway may answer there, and nobody else listens.
    listen = f"evgw-cli/{client_id}/res" if v5 else topics.command_result(command.id)
    props = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = listen
        props.CorrelationData = correlation
    sent = False
    try:
        async with aiomqtt.Client(
                broker.host, broker.port, identifier=client_id, username=broker.username,
                password=broker.password, tls_context=broker.tls,
                protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
                socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)) as client:
            await client.subscribe(listen, qos=1)  # first, or a fast answer is missed
            payload = env.sign_command(command, key)
            await client.publish(topics.command_request, payload, qos=1, properties=props)
            sent = True
            req = env.request_digest(payload)
            async with asyncio.timeout(timeout):
                async for message in client.messages:
                    result = _result(message, command, correlation, gateway_key, req)
                    if result is None:
                        continue
                    print(json.dumps(result.body()) if as_json else describe(result),
                          flush=True)
                    if result.final:
                        return SUCCEEDED if result.status == "succeeded" else FAILED
    except TimeoutError:
        if not sent:
            _warn(f"broker {broker.host}:{broker.port} did not answer; nothing was sent")
            return NO_RESULT
        _warn(f"no final result for {command.id} within {timeout:g} s; "
              "whether it ran is unknown")
        return NO_RESULT
    except aiomqtt.MqttError as exc:
        state = "its outcome is unknown" if sent else "nothing was sent"
        _warn(f"broker {broker.host}:{broker.port}: {exc}; {state}")
    return NO_RESULT


def _result(message: aiomqtt.Message, command: env.Command, correlation: bytes,
            gateway_key: Ed25519PublicKey | None, req: str) -> env.Result | None:
    """The result in ``message`` if it answers our own payload (and verifies); else None.

    A result for another payload with our id answers a copy someone re-sent with a
    forged signature, not our command: it says nothing about what the car did."""
    props = message.properties
    theirs = getattr(props, "CorrelationData", None) if props is not None else None
    if theirs is not None and bytes(theirs) != correlation:
        return None
    if not isinstance(message.payload, bytes):
        return None
    try:
        result = env.open_result(message.payload, gateway_key)
    except env.Malformed as exc:
        _warn(f"ignoring a result on {message.topic}: {exc}")
        return None
    if result.id != command.id or result.vehicle != command.vehicle:
        return None
    if result.req != req:
        _warn(f"ignoring a result on {message.topic} that answers another payload "
              f"with our command id ({result.status} {result.reason})")
        return None
    return result


def load_gateway_key(path: Path) -> Ed25519PublicKey:
    """The gateway's public key from a file (PEM, perhaps with text around it, or base64url)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the gateway key: {exc}") from None
    try:
        if "-----BEGIN" in text:
            key = load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            return key
        return parse_public_key(text)
    except ValueError as exc:
        raise ConfigError(str(path), f"not the gateway's public key: {exc}") from None


def broker_from_args(args: argparse.Namespace) -> Broker:
    """The broker connection the options ask for; ConfigError for bad ones."""
    tls = args.tls or bool(args.ca or args.cert)
    try:
        host, port = split_broker(args.broker)
    except SystemExit:
        raise ConfigError("--broker", f"expected HOST:PORT, got {args.broker!r}") from None
    if tls and ":" not in args.broker:
        port = 8883
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").split("\n", 1)[0]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(args.password_file, f"cannot read the password: {exc}") from None
        if args.username is None and args.protocol == "3.1.1":
            raise ConfigError("--password-file", "MQTT 3.1.1 needs --username with a password")
    if args.cert_key and not args.cert:
        raise ConfigError("--cert-key", "needs --cert")
    context = None
    if tls:
        try:
            context = ssl.create_default_context(cafile=args.ca)
            if args.cert:
                context.load_cert_chain(args.cert, args.cert_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--ca/--cert", f"cannot load TLS files: {exc}") from None
    return Broker(host, port, args.protocol, args.username, password, context)


async def run_async(args: argparse.Namespace) -> int:
    """The whole sub-command inside a running event loop; returns the exit status."""
    try:
        if not (0 < args.ttl <= 3600 and 0 < args.timeout <= 86400):
            raise ConfigError("--ttl/--timeout", "expected seconds: ttl 0-3600, timeout 0-86400")
        try:
            Topics(args.vehicle)
        except ValueError as exc:
            raise ConfigError("--vehicle", str(exc)) from None
        try:
            key = load_private_key(Path(args.key))
        except ValueError as exc:
            raise ConfigError("--key", str(exc)) from None
        gateway = load_gateway_key(Path(args.gateway_key)) if args.gateway_key else None
        broker = broker_from_args(args)
    except ConfigError as exc:
        print(f"ev-gateway command: {exc}", file=sys.stderr)
        return USAGE
    if gateway is None:
        _warn("warning: results are not verified (give --gateway-key to verify them)")
    command = build_command(args.vehicle, args.action, command_args(args), key, args.ttl,
                            SystemClock().time())
    return await send(broker, command, key, timeout=args.timeout, gateway_key=gateway,
                      as_json=args.json)


def run(args: argparse.Namespace) -> int:
    """Entry point of the sub-command."""
    return asyncio.run(run_async(args))
