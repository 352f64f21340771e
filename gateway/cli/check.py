"""``ev-gateway check``: validate the settings and the vehicle profile, show what they say.

``check --config FILE`` loads the settings, then the profile they name, and
builds the whole gateway as ``run`` would, offline, so every cross-check
runs (DBC names, commands, safety, TLS files, geofences...). ``check PROFILE``
checks a profile alone. Secrets are never printed: the password read from
``password_file`` is shown as "set", private keys by their path only.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.app import Commands, Gateway, Safety
from gateway.can import BusOptions
from gateway.cli.run import parse_overrides
from gateway.clock import SystemClock
from gateway.commands.keys import generate_private_key
from gateway.commands.outcome import STATIONARY_ONLY
from gateway.commands.pulse import Pulse
from gateway.commands.setpoint import Setpoint
from gateway.config import Profile, load_profile
from gateway.config.limits import LimitSpec
from gateway.config.settings import Settings, load_settings


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("check", help="validate the gateway settings and the vehicle profile",
                       description="Validate a settings file and the profile it names "
                                   "(--config), or a profile alone, without opening anything.")
    p.add_argument("profile", nargs="?",
                   help="profile TOML file (with --config: instead of the settings' profile)")
    p.add_argument("--config", metavar="FILE", help="gateway settings TOML")
    p.add_argument("--bus", action="append", default=[], metavar="NAME=INTERFACE:CHANNEL",
                   help="a bus override, as given to `run` (repeatable)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load everything the daemon would load at start-up and print a summary."""
    if not args.config and not args.profile:
        raise SystemExit("ev-gateway check: give a PROFILE, or --config FILE")
    settings = load_settings(args.config) if args.config else None
    profile = load_profile(args.profile or (settings.profile if settings else ""))
    with tempfile.TemporaryDirectory(prefix="ev-gateway-check-") as scratch:
        gateway = build_offline(profile, settings, Path(scratch))
    overrides = (settings.bus_overrides(b.name for b in profile.buses)
                 if settings is not None else {})
    try:
        buses = gateway.pipeline.bus_options({**overrides, **parse_overrides(args.bus)})
    except ValueError as exc:
        raise SystemExit(f"ev-gateway check: --bus: {exc}") from None
    if settings is not None:
        print_settings(settings, buses, profile)
    _print_profile(profile, gateway)
    _print_safety(profile.safety.limits, gateway.safety)
    _print_commands(gateway.commands)
    print(f"ok: {len(gateway.pipeline.store)} canonical signals")
    return 0


def build_offline(profile: Profile, settings: Settings | None, scratch: Path) -> Gateway:
    """The gateway ``run`` would build, every cross-check included, touching nothing
    outside ``scratch``.

    Building opens and writes nothing (a missing gateway key is made in memory and
    stored only at start). A key this user may not read (it belongs to the service
    user) is left to ``run``: a throwaway one in ``scratch`` stands in for it, so the
    rest of the configuration is still checked.
    """
    if settings is not None and settings.commands.keys is not None \
            and _present(settings.gateway_key_path) is None:
        key = scratch / "gateway.key"
        generate_private_key(key)
        settings = replace(settings, commands=replace(settings.commands, gateway_key=key))
    return Gateway.build(profile, SystemClock(), settings, None)


def _certificate_names(path: Path) -> list[str]:
    """The common names in the PEM certificate at ``path`` ([] when unreadable; the TLS
    loader reports that)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return []
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def print_settings(settings: Settings, buses: list[BusOptions], profile: Profile) -> None:
    """A short summary of ``settings``; the password and key contents are never shown."""
    mqtt, tls, cmd, where = (settings.mqtt, settings.mqtt.tls, settings.commands,
                             settings.location)
    print(f"settings {settings.file}")
    print(f"  vehicle id: {settings.vehicle_id}")
    instead = (f" (checked instead: {profile.file})"
               if Path(profile.file).resolve() != settings.profile else "")
    print(f"  profile: {settings.profile}{instead}")
    print(f"  state dir: {_exists(settings.state_dir, 'created at start')}")
    if mqtt.enabled:
        login = f", user {mqtt.username}" if mqtt.username else ""
        if mqtt.password is not None:
            login += ", password set"
        print(f"  mqtt: {mqtt.host}:{mqtt.port}, protocol {mqtt.protocol}, "
              f"client id {mqtt.client_id}{login}")
    else:
        print("  mqtt: off (enabled = false)")
    if tls is None:
        print("  tls: off")
    else:
        client = f", client cert {tls.cert}, key {tls.key}" if tls.cert else ", no client cert"
        insecure = ", insecure (host name not verified)" if tls.insecure else ""
        print(f"  tls: on, ca {tls.ca or 'system CAs'}{client}{insecure}")
        if tls.cert is not None:
            cns = _certificate_names(tls.cert)
            if cns and settings.vehicle_id not in cns:
                # A fleet broker makes the certificate's name the MQTT user its ACL checks:
                # every publish would be refused without a word to the gateway.
                print(f"  WARNING: the client certificate is for {', '.join(cns)}, not "
                      f"vehicle {settings.vehicle_id}: a fleet broker (docs/fleet-broker.md) "
                      f"will refuse its publishes")
    specs = {spec.name: spec for spec in profile.buses}
    for bus in buses:
        spec = specs[bus.name]
        rate = f" {bus.bitrate} bit/s" if bus.bitrate else ""
        moved = ((bus.interface, bus.channel) != (spec.interface, spec.channel))
        note = f" ([can] or --bus; profile: {spec.interface}:{spec.channel})" if moved else ""
        print(f"  can {bus.name}: {bus.interface}:{bus.channel}{rate}{note}")
    gnss = where.gnss
    print(f"  gnss: {gnss.device} at {gnss.baud} baud" if gnss.enabled else "  gnss: off")
    if where.geofences:
        names = ", ".join(fence.name for fence in where.geofences)
        off = "; not evaluated: gnss is off" if not gnss.enabled else ""
        print(f"  geofences: {len(where.geofences)} ({names}){off}")
    else:
        print("  geofences: 0")
    if cmd.keys is None:
        print("  commands: off (no [commands] keys file)")
    else:
        print(f"  commands: on, keys {cmd.keys}, gateway key "
              f"{_exists(settings.gateway_key_path, 'created at first start')}")
    ha = settings.homeassistant
    print(f"  home assistant: {'on, prefix ' + ha.prefix if ha.enabled else 'off'}")


def _present(path: Path) -> bool | None:
    """Whether ``path`` exists; None when this user may not look (a 0700 state dir)."""
    try:
        return path.exists()
    except OSError:
        return None


def _exists(path: Path, otherwise: str) -> str:
    present = _present(path)
    if present is None:
        return f"{path} (not readable by this user; not checked)"
    return f"{path}" if present else f"{path} (not there yet; {otherwise})"


def _print_profile(profile: Profile, gateway: Gateway) -> None:
    print(f"profile {profile.name}: {profile.description}")
    print(f"  file: {profile.file}")
    for name, plan in gateway.pipeline.plans.items():
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
