"""``ev-gateway decode``: a log file as JSON lines, one line per frame.

For HIL engineers: pipe a candump/ASC/BLF/TRC capture through it, then grep
or jq. Frames that cannot be decoded still get a line, with an ``error``
field, so the output lines up with the input frame for frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import can
from cantools.database.can import Message

from gateway.config import ConfigError, load_profile
from gateway.decode import MessagePlan, build_plans, frame_key, load_dbc
from gateway.decode.plan import index_messages
from gateway.state import StateStore


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("decode", help="print the frames of a CAN log as JSON lines")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="vehicle profile: its DBCs, plus canonical values")
    src.add_argument("--dbc", action="append", help="DBC file (repeatable)")
    p.add_argument("--bus", help="profile bus the log was recorded on (default: the first)")
    p.add_argument("--no-strict", action="store_true",
                   help="accept DBCs with overlapping signals (--dbc only)")
    p.add_argument("log", help="log file: candump -L .log, .asc, .blf, .trc, .csv")
    p.set_defaults(handler=run)


def _tables(args: argparse.Namespace) -> tuple[dict[int, Message], dict[int, MessagePlan]]:
    if args.profile:
        profile = load_profile(args.profile)
        bus_plans = build_plans(profile, StateStore())
        bus = args.bus or profile.buses[0].name
        if bus not in bus_plans:
            raise ConfigError(str(profile.file), f"no bus named {bus!r}", key="bus")
        return bus_plans[bus].messages, bus_plans[bus].mapped
    dbs = [(Path(f), load_dbc(Path(f), strict=not args.no_strict)) for f in args.dbc]
    return index_messages("--dbc", dbs), {}


def run(args: argparse.Namespace) -> int:
    """Decode every frame of the log and print one JSON object per line."""
    from gateway.can import read_log

    messages, plans = _tables(args)
    try:
        frames = read_log(Path(args.log))
    except ValueError as exc:
        print(f"ev-gateway: {exc}", file=sys.stderr)
        return 2
    outcome: Counter[str] = Counter()
    out = sys.stdout
    for frame in frames:
        record = describe(frame, messages, plans)
        outcome[record.get("error", "decoded")] += 1
        out.write(json.dumps(record, default=str) + "\n")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcome.items()))
    print(f"ev-gateway decode: {sum(outcome.values())} frames: {summary or 'none'}",
          file=sys.stderr)
    return 0


def describe(
    frame: can.Message, messages: dict[int, Message], plans: dict[int, MessagePlan]
) -> dict[str, Any]:
    """The JSON record for one frame."""
    record: dict[str, Any] = {
        "t": frame.timestamp,
        "channel": frame.channel,
        "id": f"0x{frame.arbitration_id:X}",
        "ext": frame.is_extended_id,
        "dlc": len(frame.data),
    }
    if frame.is_fd:
        record["fd"] = True
    if frame.is_error_frame or frame.is_remote_frame:
        record["error"] = "error_frame" if frame.is_error_frame else "remote_frame"
        return record
    key = frame_key(frame.arbitration_id, frame.is_extended_id)
    message = messages.get(key)
    if message is None:
        record["error"] = "unknown_id"
        return record
    record["name"] = message.name
    data = bytes(frame.data)
    if len(data) != message.length:
        record["error"] = "wrong_dlc"
        return record
    try:
        record["signals"] = dict(message.decode(data, decode_containers=False))
    except Exception as exc:  # cantools raises assorted types for bad payloads
        record["error"] = "undecodable"
        record["detail"] = str(exc)
        return record
    plan = plans.get(key)
    if plan is not None:
        raw = cast(
            "dict[str, Any]",
            message.decode(data, decode_choices=False, scaling=False, decode_containers=False),
        )
        canonical: dict[str, Any] = {}
        for name, value in raw.items():
            for sd in plan.signals.get(name, ()):
                converted, valid = sd.convert(value)
                canonical[sd.slot.path] = converted if valid else None
        record["vss"] = canonical
    return record
