"""What carrying out a command can end in, the interlocks, and waiting for confirmation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.safety.transmit import FrameEncoder
from gateway.safety.verdicts import Motion, Verdicts

STATIONARY_ONLY = frozenset({"unlock", "speed-profile"})
"""Commands refused unless the car is proven to stand still."""


@dataclass(frozen=True)
class Outcome:
    """A command's end: ``succeeded``, ``failed`` or ``rejected``, with a reason code."""

    status: str
    reason: str | None = None
    detail: dict[str, Any] | None = None


def rejected(reason: str, **detail: Any) -> Outcome:
    """A refusal with its reason code."""
    return Outcome("rejected", reason, detail or None)


def unconfirmed(attempts: int, refusal: Outcome) -> Outcome:
    """A retry refused after a frame already went out: the controller may have acted, so
    the command failed (outcome unknown), it was not rejected."""
    return Outcome("failed", "unconfirmed", {"attempts": attempts, "refused": refusal.reason})


def motion_refusal(verdicts: Verdicts) -> Outcome | None:
    """None when the car is proven stationary; otherwise why not.

    ``motion_unknown`` (stale or invalid speed, no speed signal) is refused
    like ``vehicle_moving``: unknown speed means moving.
    """
    if verdicts.motion is Motion.STATIONARY:
        return None
    reason = "motion_unknown" if verdicts.motion is Motion.UNKNOWN else "vehicle_moving"
    return rejected(reason, motion=list(verdicts.motion_reasons))


class Action(Protocol):
    """One command the vehicle can carry out."""

    def check(self, args: dict[str, Any]) -> Outcome | None:
        """A refusal for bad arguments or a controller that cannot answer; None if fine."""
        ...

    async def run(self, args: dict[str, Any], interlock: Callable[[], Outcome | None]
                  ) -> Outcome:
        """Carry out the command; ``interlock()`` is asked again right before each send."""
        ...


def bad_arguments(args: dict[str, Any], allowed: dict[str, str]) -> Outcome | None:
    """A refusal when ``args`` has keys outside ``allowed`` (name -> description)."""
    extra = sorted(set(args) - set(allowed))
    if extra:
        what = ", ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
        return rejected("bad_arguments", error=f"unknown argument {', '.join(extra)}; "
                                               f"arguments: {what}")
    return None


def trial_encode(encoder: FrameEncoder, values: dict[str, float]) -> None:
    """Encode ``values`` once without sending, so a profile error surfaces at start-up
    (ValueError) rather than as a failed command; the encoder's counter is left as it was."""
    count = encoder.count
    try:
        encoder.encode(values)
    except Exception as exc:  # cantools raises EncodeError, ValueError, KeyError
        raise ValueError(f"{encoder.message.name} cannot carry {values}: {exc}") from None
    finally:
        encoder.count = count


class Confirmations:
    """Waits for state to reach a condition, checked after every batch of frames."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[bool]]] = []

    def on_batch(self, bus: str) -> None:
        """Pipeline listener: resolve the waiters whose condition now holds."""
        del bus
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(True)

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True once ``predicate()`` holds after a batch; False after ``timeout`` seconds."""
        if predicate():
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            racers: set[asyncio.Future[Any]] = {future, sleeper}
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            return future.done()
        finally:
            self._waiters.remove(entry)
            sleeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sleeper
