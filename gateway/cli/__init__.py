"""The ``ev-gateway`` command.

Sub-commands:

- ``run``: the daemon (live buses, or a log replay), optionally with a live view;
- ``decode``: print the frames of a log as JSON lines;
- ``check``: validate a profile and its DBCs and show what it maps;
- ``watch``: follow a vehicle over MQTT, as a fleet operator would;
- ``keys`` / ``command``: keys of remote commands, and sending one signed command;
- ``trips``: the finished trips and charging sessions kept on the head unit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from gateway.cli import check, command, decode, keys, run, trips, watch

    parser = argparse.ArgumentParser(
        prog="ev-gateway", description="Companion gateway for micro electric cars."
    )
    parser.add_argument("--version", action="version", version=f"ev-gateway {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    decode.add_parser(sub)
    check.add_parser(sub)
    watch.add_parser(sub)
    keys.add_parser(sub)
    command.add_parser(sub)
    trips.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.handler(args)
    except ConfigError as exc:
        print(f"ev-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ev-gateway decode log | head` is normal use
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
