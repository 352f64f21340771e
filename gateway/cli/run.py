"""``ev-gateway run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.app import Gateway, Pipeline, run_until, stop_event
from gateway.cli import view
from gateway.cli.watch import split_broker
from gateway.clock import Clock, SystemClock
from gateway.config import load_profile
from gateway.config.location import BAUD_RATES, LocationSettings
from gateway.config.settings import (
    DEFAULT_STATE_DIR,
    Settings,
    default_settings,
    load_settings,
    with_overrides,
)


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("run", help="run the gateway")
    p.add_argument("--config", help="gateway settings TOML (vehicle id, profile, MQTT, ...)")
    p.add_argument("--profile", help="vehicle profile TOML (overrides the settings' profile)")
    p.add_argument("--vehicle-id", help="vehicle id (overrides the settings)")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="publish to this MQTT broker (overrides the settings)")
    p.add_argument("--state-dir", help="where the outbox lives (overrides the settings)")
    p.add_argument("--no-mqtt", action="store_true", help="do not publish, even if configured")
    p.add_argument("--bus", action="append", default=[], metavar="NAME=INTERFACE:CHANNEL",
                   help="override a profile bus, e.g. vehicle=socketcan:vcan0 (repeatable)")
    p.add_argument("--replay", metavar="LOG", help="replay a log file instead of live buses")
    p.add_argument("--replay-bus", help="bus the replayed log belongs to (default: the first)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="replay speed factor (default 1)")
    pace.add_argument("--fast", action="store_true", help="replay as fast as possible")
    p.add_argument("--speed-cap", metavar="PROFILE",
                   help="select a speed-cap profile of the vehicle profile ('none' lifts it)")
    p.add_argument("--keys", metavar="FILE",
                   help="authorized keys for remote commands (overrides the settings)")
    p.add_argument("--gnss", metavar="DEVICE[@BAUD]",
                   help="read NMEA from this serial GNSS receiver, e.g. /dev/ttyACM0@9600 "
                        "(overrides the settings' [gnss] device)")
    p.add_argument("--view", action="store_true", help="live terminal view of the vehicle state")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(handler=run)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``NAME=INTERFACE:CHANNEL`` items as a dict."""
    out = {}
    for item in items:
        name, sep, target = item.partition("=")
        if not sep:
            raise SystemExit(f"ev-gateway: --bus {item!r}: expected NAME=INTERFACE:CHANNEL")
        out[name] = target
    return out


def settings_from_args(args: argparse.Namespace) -> Settings | None:
    """The settings the flags ask for; None when the gateway should not publish.

    Without ``--config``, publishing needs ``--broker`` (the vehicle id then
    defaults to the profile name).
    """
    if args.config:
        settings = load_settings(args.config)
    elif args.broker:
        if not args.profile:
            raise SystemExit("ev-gateway run: --profile or --config is required")
        profile = load_profile(args.profile)
        settings = default_settings(args.vehicle_id or profile.name, Path(args.profile),
                                    Path(args.state_dir or DEFAULT_STATE_DIR))
    else:
        return None
    host, port = split_broker(args.broker) if args.broker else (None, None)
    try:
        settings = with_overrides(settings, host=host, port=port, vehicle_id=args.vehicle_id,
                                  state_dir=Path(args.state_dir) if args.state_dir else None,
                                  keys=Path(args.keys) if args.keys else None)
    except ValueError as exc:
        raise SystemExit(f"ev-gateway run: {exc}") from None
    if args.no_mqtt or not settings.mqtt.enabled:
        return None
    return settings


def gnss_override(where: LocationSettings, text: str | None) -> LocationSettings:
    """``where`` with ``--gnss DEVICE[@BAUD]`` applied (GNSS enabled on that device)."""
    if not text:
        return where
    device, _, baud = text.partition("@")
    gnss = replace(where.gnss, enabled=True, device=device or where.gnss.device)
    if baud:
        if not baud.isdigit() or int(baud) not in BAUD_RATES:
            raise SystemExit(f"ev-gateway run: --gnss {text!r}: baud rate must be one of "
                             f"{', '.join(map(str, BAUD_RATES))}")
        gnss = replace(gnss, baud=int(baud))
    return replace(where, gnss=gnss)


def run(args: argparse.Namespace) -> int:
    """Build the pipeline (failing fast on bad config) and run it until stopped."""
    if not args.config and not args.profile:
        raise SystemExit("ev-gateway run: --profile or --config is required")
    settings = settings_from_args(args)
    profile_path = args.profile or (settings.profile if settings else None)
    if profile_path is None:  # --config with MQTT disabled
        profile_path = load_settings(args.config).profile
    profile = load_profile(profile_path)
    clock = SystemClock()
    state_dir = settings.state_dir if settings else (Path(args.state_dir) if args.state_dir
                                                     else None)
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
    where = gnss_override(settings.location if settings else LocationSettings(), args.gnss)
    gateway = Gateway.build(profile, clock, settings, state_dir, where)
    speed_cap = gateway.safety.speed_cap
    if args.speed_cap:
        if speed_cap is None:
            raise SystemExit(f"ev-gateway run: profile {profile.name} has no [safety.speed_cap]")
        name = None if args.speed_cap == "none" else args.speed_cap
        try:
            speed_cap.select(name)
        except KeyError:
            raise SystemExit(f"ev-gateway run: no speed-cap profile {args.speed_cap!r}; "
                             f"profiles: {', '.join(speed_cap.spec.profiles)}") from None
    names = [b.name for b in profile.buses]
    overrides = settings.bus_overrides(names) if settings is not None else {}
    try:
        options = gateway.pipeline.bus_options({**overrides, **parse_overrides(args.bus)})
    except ValueError as exc:
        raise SystemExit(f"ev-gateway run: --bus: {exc}") from None
    return asyncio.run(_main(args, gateway, options, clock))


async def _main(args: argparse.Namespace, gateway: Gateway, options: Any, clock: Clock
                ) -> int:
    stop = stop_event(args.duration)
    pipeline = gateway.pipeline
    await gateway.start(None if args.replay else options)
    if args.replay:
        bus = args.replay_bus or pipeline.profile.buses[0].name

        async def replay() -> None:
            try:
                await pipeline.replay(Path(args.replay), bus, None if args.fast else args.speed)
            finally:
                stop.set()

        pipeline.tasks.append(asyncio.create_task(replay(), name="replay"))
    screen = LiveScreen(pipeline, clock) if args.view else None
    await run_until(stop, gateway, screen.refresh if screen else None)
    if screen:
        await screen.refresh(force=True)
    return 0


class LiveScreen:
    """Redraws the state view; on a terminal in place, otherwise every few seconds."""

    def __init__(self, pipeline: Pipeline, clock: Clock, plain_every: float = 2.0) -> None:
        self._pipeline = pipeline
        self._clock = clock
        self._tty = sys.stdout.isatty()
        self._plain_every = plain_every
        self._last_plain = -1e9
        self._last_frames = 0
        self._last_t = clock.monotonic()

    def frames(self) -> int:
        """Frames received on all buses so far."""
        counters = self._pipeline.counters.snapshot("can.")
        return sum(v for k, v in counters.items() if k.endswith(".frames"))

    async def refresh(self, force: bool = False) -> None:
        """Draw the screen if it is time to (or now, with ``force``)."""
        mono = self._clock.monotonic()
        if not force and not self._tty and mono - self._last_plain < self._plain_every:
            return
        frames = self.frames()
        rate = (frames - self._last_frames) / max(1e-3, mono - self._last_t)
        self._last_frames, self._last_t, self._last_plain = frames, mono, mono
        now = self._clock.time()
        errors = self._pipeline.counters.snapshot("decode.")
        bad = sum(v for k, v in errors.items() if k.count(".") == 1
                  and k not in ("decode.decoded", "decode.unmapped", "decode.cache_resets"))
        p = self._pipeline.profile
        title = f"ev-gateway | {p.name} | {view.clock_line(now)}"
        alerts = self._pipeline.alerts.active()
        shown = ", ".join(f"{a.key} ({a.severity.value})" for a in alerts[:4])
        status = (f"frames {frames} ({rate:.0f}/s)  bad frames {bad}  "
                  f"stale {len(self._pipeline.store.stale_paths(now))}/{len(self._pipeline.store)}"
                  f"  alerts {len(alerts)}{': ' + shown if shown else ''}   Ctrl-C to quit")
        width = shutil.get_terminal_size((120, 40)).columns
        text = view.render(title, self._pipeline.store.snapshot(now), status, width)
        if self._tty:
            sys.stdout.write("\x1b[H\x1b[2J" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
