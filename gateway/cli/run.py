"""``ev-gateway run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from gateway.app import Pipeline, run_until, stop_event
from gateway.cli import view
from gateway.clock import Clock, SystemClock
from gateway.config import load_profile


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("run", help="run the gateway")
    p.add_argument("--profile", required=True, help="vehicle profile TOML")
    p.add_argument("--bus", action="append", default=[], metavar="NAME=INTERFACE:CHANNEL",
                   help="override a profile bus, e.g. vehicle=socketcan:vcan0 (repeatable)")
    p.add_argument("--replay", metavar="LOG", help="replay a log file instead of live buses")
    p.add_argument("--replay-bus", help="bus the replayed log belongs to (default: the first)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="replay speed factor (default 1)")
    pace.add_argument("--fast", action="store_true", help="replay as fast as possible")
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


def run(args: argparse.Namespace) -> int:
    """Build the pipeline (failing fast on bad config) and run it until stopped."""
    profile = load_profile(args.profile)
    clock = SystemClock()
    pipeline = Pipeline.build(profile, clock)
    options = pipeline.bus_options(parse_overrides(args.bus))
    return asyncio.run(_main(args, pipeline, options, clock))


async def _main(args: argparse.Namespace, pipeline: Pipeline, options: Any, clock: Clock) -> int:
    stop = stop_event(args.duration)
    if args.replay:
        bus = args.replay_bus or pipeline.profile.buses[0].name

        async def replay() -> None:
            try:
                await pipeline.replay(Path(args.replay), bus, None if args.fast else args.speed)
            finally:
                stop.set()

        pipeline.tasks.append(asyncio.create_task(replay(), name="replay"))
    else:
        pipeline.start_live(options)
    screen = LiveScreen(pipeline, clock) if args.view else None
    await run_until(stop, pipeline, screen.refresh if screen else None)
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
        status = (f"frames {frames} ({rate:.0f}/s)  bad frames {bad}  "
                  f"stale {len(self._pipeline.store.stale_paths(now))}/{len(self._pipeline.store)}"
                  "   Ctrl-C to quit")
        width = shutil.get_terminal_size((120, 40)).columns
        text = view.render(title, self._pipeline.store.snapshot(now), status, width)
        if self._tty:
            sys.stdout.write("\x1b[H\x1b[2J" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
