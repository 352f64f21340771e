"""``ev-gateway check PROFILE``: validate a profile and its DBCs, show what it maps."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.app import Commands, Pipeline, Safety
from gateway.clock import SystemClock
from gateway.commands.outcome import STATIONARY_ONLY
from gateway.commands.pulse import Pulse
from gateway.commands.setpoint import Setpoint
from gateway.config import load_profile
from gateway.config.limits import LimitSpec


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("check", help="validate a vehicle profile and its DBC files")
    p.add_argument("profile", help="profile TOML file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load everything the daemon would load at start-up and print a summary."""
    profile = load_profile(args.profile)
    pipeline = Pipeline.build(profile, SystemClock())
    safety = Safety.build(pipeline)
    commands = Commands.build(pipeline, safety, None)
    store, plans = pipeline.store, pipeline.plans
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
            spec_m = profile.messages.get(mp.name)
            checks = ""
            if mp.check is not None and spec_m is not None:
                parts = [f"counter {spec_m.counter}"] if spec_m.counter else []
                if spec_m.checksum:
                    parts.append(f"{spec_m.checksum_algorithm} in {spec_m.checksum}")
                checks = f" checks: {', '.join(parts)}"
            print(f"  0x{mp.message.frame_id:X}{ext} {mp.name} [{mp.length} B, {cycle}]{checks}")
            for decodes in mp.signals.values():
                for sd in decodes:
                    slot = sd.slot
                    stale = f"{slot.stale_after:.2f} s" if slot.stale_after else "never"
                    unit = f" [{slot.unit}]" if slot.unit else ""
                    note = f"  ({sd.note})" if sd.note else ""
                    print(f"    {sd.dbc_signal} -> {slot.path}{unit} stale after {stale}{note}")
        ignored = len(plan.messages) - len(plan.mapped)
        print(f"  {len(plan.mapped)} messages mapped, {ignored} in the DBCs but not mapped")
    _print_safety(profile.safety.limits, safety)
    _print_commands(commands)
    print(f"ok: {len(store)} canonical signals")
    return 0


def _print_safety(limits: dict[str, LimitSpec], safety: Safety) -> None:
    rules = safety.monitor.rules
    print(f"safety: {len(rules)} rules, {len(safety.monitor.rx_rules)} receive watches")
    for rule in rules:
        spec = rule.machine.spec
        unit = f" {rule.unit}" if rule.unit else ""
        side = ">=" if rule.machine.high else "<="
        levels = ", ".join(f"{name} {side} {value:g}{unit}" for name, value in
                           (("warning", spec.warning), ("critical", spec.critical))
                           if value is not None)
        print(f"  {rule.key}: {levels}; debounce {spec.debounce_s:g} s, latch {spec.latch}")
    used = {r.machine.spec.name for r in rules}
    for name, spec in limits.items():
        if name not in used:
            why = "disabled" if not spec.enabled else "its signals are not mapped"
            if spec.scale is not None:
                why = f"needs {spec.scale} in [safety]"
            print(f"  ({name}: off, {why})")
    if safety.speed_cap is not None:
        cap = safety.speed_cap.spec
        caps = ", ".join(f"{k} {v:g} km/h" for k, v in cap.profiles.items())
        print(f"speed cap via {cap.message}: {caps}")
    for spec_t in safety.guard.allow_list():
        print(f"transmit allowed: {spec_t}")


def _print_commands(commands: Commands) -> None:
    print(f"remote commands: {', '.join(commands.actions)}")
    for name, action in commands.actions.items():
        how = "no frame"
        if isinstance(action, Pulse):
            spec = action.spec
            confirm = f"ack {spec.ack}" if spec.ack else ""
            if spec.confirm:
                confirm += (", " if confirm else "") + ", ".join(
                    f"{path} = {value}" for path, value in spec.confirm.items())
            how = f"{spec.message}, confirmed by {confirm} within {spec.timeout_s:g} s"
        elif isinstance(action, Setpoint):
            sp = action.spec
            how = (f"{sp.message}.{sp.signal} {sp.minimum:g}-{sp.maximum:g}, kept on the bus, "
                   f"confirmed by {sp.report} within {sp.timeout_s:g} s")
        elif name == "speed-profile":
            how = "the speed cap above"
        lock = "; only at a proven standstill" if name in STATIONARY_ONLY else ""
        print(f"  {name}: {how}{lock}")
