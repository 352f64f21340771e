"""``ev-gateway check PROFILE``: validate a profile and its DBCs, show what it maps."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config import load_profile
from gateway.decode import build_plans
from gateway.state import StateStore


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("check", help="validate a vehicle profile and its DBC files")
    p.add_argument("profile", help="profile TOML file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load everything the daemon would load at start-up and print a summary."""
    profile = load_profile(args.profile)
    store = StateStore()
    plans = build_plans(profile, store)
    print(f"profile {profile.name}: {profile.description}")
    print(f"  file: {profile.file}")
    for name, plan in plans.items():
        spec = plan.spec
        print(f"bus {name}: {spec.interface}:{spec.channel}"
              f"{f' {spec.bitrate} bit/s' if spec.bitrate else ''}{' CAN FD' if spec.fd else ''}")
        for path, db in plan.databases:
            print(f"  dbc {path.name}: {len(db.messages)} messages")
        for mp in sorted(plan.mapped.values(), key=lambda m: m.key):
            cycle = f"{mp.cycle_s * 1000:.0f} ms" if mp.cycle_s else "event"
            ext = " (29-bit)" if mp.message.is_extended_frame else ""
            print(f"  0x{mp.message.frame_id:X}{ext} {mp.name} [{mp.length} B, {cycle}]")
            for decodes in mp.signals.values():
                for sd in decodes:
                    slot = sd.slot
                    stale = f"{slot.stale_after:.2f} s" if slot.stale_after else "never"
                    unit = f" [{slot.unit}]" if slot.unit else ""
                    note = f"  ({sd.note})" if sd.note else ""
                    print(f"    {sd.dbc_signal} -> {slot.path}{unit} stale after {stale}{note}")
        ignored = len(plan.messages) - len(plan.mapped)
        print(f"  {len(plan.mapped)} messages mapped, {ignored} in the DBCs but not mapped")
    print(f"ok: {len(store)} canonical signals")
    return 0
