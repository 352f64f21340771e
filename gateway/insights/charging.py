"""Charging sessions: plug-in (or first current) to unplug or a long stop.

A session opens when the BMS says it is charging, or when current flows into
the pack (a mean of more than ``FLOW_A`` over the last second, from the meter)
with the cable reported connected: regeneration flows the same way, but never
with a cable in. While the session is open, charge "flows" when the BMS says
charging, or when the mean current is above that threshold and the cable is
reported connected. Current alone is not enough, because a car that does not
report its cable (or whose cable reading went stale) could be regenerating on
the road; only a car that reports neither cable nor charging state has to be
trusted on current, and then only while nothing says it is driving. The
maximum power is the highest one-second mean while charge flowed. A stop of
``INTERRUPTION_S`` or more that ends with current flowing again is an
interruption (a charger pausing, a timer, a load-balanced wallbox); shorter
dips are not. The session ends at once when the cable is reported
disconnected or on the first fresh sign of driving (wheel speed above
standstill, or powertrain ready / ignition ON or START while no cable is
reported in: ``driven_off``), or after
``charge_end_s`` without flow; the end is then the moment flow stopped. No
session opens while the car shows signs of driving.

Energy and charge are the meter's ``in`` totals (regeneration is impossible
while plugged in) as of the last moment current flowed, so sensor noise around
zero after the end does not count. Only good data is used; stale or invalid
readings are simply not evidence of anything.

The open session lives in a small JSON file, written when its content changed.
A session found open after a restart goes on if data comes back; if neither
the cable state nor any flow is seen for ``charge_end_s`` it ends as
``gateway_restart`` at the last flow known, since what happened meanwhile was
not observed. Such a session, and one during which the pack meter counted a
gap (``insights.energy_gaps``) before its last flow, is reported with
``complete`` False: its energy is a lower bound. A finished session is handed
on before the state file is cleared, so a power cut in between repeats it
(under the same id) rather than losing it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.config.location import InsightSettings
from gateway.health import Counters, RateLimitedLog
from gateway.insights.energy import CURRENT, TB, PackMeter, Totals
from gateway.insights.sessions import ChargeEnd, ChargeSession
from gateway.insights.state_file import (
    STATE_VERSION,
    StateFile,
    checked,
    plus,
    totals_json,
)
from gateway.insights.trips import START_GRACE_S
from gateway.state import StateStore
from gateway.state.mode import IGNITION, READY, SPEED, STANDSTILL_KMH

IS_CHARGING = f"{TB}.Charging.IsCharging"
CABLE = f"{TB}.Charging.IsChargingCableConnected"
SOC = f"{TB}.StateOfCharge.Current"
FLOW_A = 0.5
"""Current into the pack (A) above which charge is flowing: above a BMS's offset noise."""
INTERRUPTION_S = 30.0
"""A stop at least this long, followed by flow again, is an interruption."""
GAPS = "insights.energy_gaps"

_log = logging.getLogger(__name__)


@dataclass
class _Open:
    """An open session. Energy so far = ``carried`` + ``at_flow`` - ``base``."""

    id: str
    start: float
    last_flow: float
    base: Totals
    at_flow: Totals
    carried: Totals = field(default_factory=Totals)
    flowing: bool = True
    blind: bool = False
    """Restored after a restart and nothing observed since."""
    blind_since: float | None = None
    restored: bool = False
    """Restored after a restart: part of the session was not observed."""
    gaps_open: int = 0
    gaps_at_flow: int = 0
    """The meter's gap counter when the session opened and at its last flow."""
    soc_start: float | None = None
    soc_end: float | None = None
    max_power_w: float = 0.0
    interruptions: int = 0

    def so_far(self) -> Totals:
        """What the session accumulated up to the last flow."""
        return plus(self.carried, self.at_flow.since(self.base))


class ChargeRecorder:
    """Opens, follows and closes charging sessions; finished ones go to ``on_session``."""

    def __init__(
        self, store: StateStore, meter: PackMeter, clock: Clock, settings: InsightSettings,
        on_session: Callable[[ChargeSession], None], state_file: Path | None = None, *,
        counters: Counters | None = None,
    ) -> None:
        self._store = store
        self._meter = meter
        self._clock = clock
        self._settings = settings
        self._on_session = on_session
        self._counters = counters or Counters()
        self._rlog = RateLimitedLog(_log, clock)
        self._file = StateFile(state_file, "charge", self._counters, self._rlog)
        self._prev: tuple[float, Totals] | None = None
        self._watts = 0.0
        self._unreported = IS_CHARGING not in store and CABLE not in store
        self._session = self._restore()

    def update(self, now: float) -> None:
        """Open, follow or close the session (about once a second)."""
        totals = self._meter.totals
        charging = self._store.good_value(IS_CHARGING, now) is True
        amps, self._watts = self._rates(now, totals)
        cable = self._store.good_value(CABLE, now)
        driving = self._driving(now, cable is True)
        current = (amps > FLOW_A and self._store.good_value(CURRENT, now) is not None
                   and (cable is True or (self._unreported and not driving)))
        flows = [self._ts(path) for path, yes in ((IS_CHARGING, charging), (CURRENT, current))
                 if yes]
        s = self._session
        if s is None:
            # Current alone may be regeneration: only the BMS's word or a cable in opens one.
            if flows and not driving and (charging or cable is True):
                self._open(min(flows), max(flows), now, totals)
        elif driving:
            # The cable must be out: a car without a cable signal says so only by driving.
            self._close(s, s.last_flow, "driven_off")
        else:
            self._follow(s, now, totals, flows, cable)
        self._prev = (now, totals)

    def current(self) -> dict[str, Any] | None:
        """A summary of the open session for the live view, or None."""
        s = self._session
        if s is None:
            return None
        return {"id": s.id, "start": round(s.start, 3),
                "duration_s": round(max(0.0, self._clock.time() - s.start), 1),
                "energy_wh": round(s.so_far().wh_in, 2), "soc_start": s.soc_start,
                "soc_now": s.soc_end, "max_power_w": round(s.max_power_w, 1),
                "interruptions": s.interruptions, "flowing": s.flowing}

    def save(self) -> None:
        """Write the open session (or its absence) to the state file, unless the file
        already holds exactly that (every write is an fsync on the head unit's flash)."""
        s = self._session
        state = {"version": STATE_VERSION, "session": None if s is None else {
            "id": s.id, "start": s.start, "last_flow": s.last_flow,
            "so_far": totals_json(s.so_far()), "soc_start": s.soc_start,
            "soc_end": s.soc_end, "max_power_w": s.max_power_w,
            "interruptions": s.interruptions}}
        self._file.save_if_changed(state)

    # ---- internals ---------------------------------------------------------------

    def _rates(self, now: float, totals: Totals) -> tuple[float, float]:
        """Mean current (A) and power (W) into the pack since the previous update.

        One BMS sample is too noisy for the flow threshold (a sensor with 0.2 A of noise
        crosses 0.5 A every few minutes) and for the maximum power; the mean of a
        second's samples is not. Zero when unknown: nothing was measured.
        """
        prev = self._prev
        if prev is None or not 0.0 < now - prev[0] <= 2.0:
            return 0.0, 0.0
        d, dt = totals.since(prev[1]), now - prev[0]
        return (d.ah_in - d.ah_out) * 3600.0 / dt, (d.wh_in - d.wh_out) * 3600.0 / dt

    def _driving(self, now: float, plugged: bool) -> bool:
        """Fresh evidence that the car is being driven: moving, or ready / ignition on with
        no cable reported in (plugged in, those mean preconditioning, not driving)."""
        good = self._store.good_value
        speed = good(SPEED, now)
        moving = isinstance(speed, int | float) and not isinstance(speed, bool) \
            and abs(speed) > STANDSTILL_KMH
        powered = good(READY, now) is True or good(IGNITION, now) in ("ON", "START")
        return moving or (powered and not plugged)

    def _ts(self, path: str) -> float:
        ts = self._store.slot(path).timestamp
        assert ts is not None  # a good value has a timestamp
        return ts

    def _open(self, start: float, flow: float, now: float, totals: Totals) -> None:
        prev = self._prev
        # The previous update's totals hold the charge of the second in which current began.
        base = prev[1] if prev is not None and now - prev[0] <= 2.0 else totals
        gaps = self._counters.get(GAPS)
        s = _Open(uuid.uuid4().hex[:16], start, flow, base, totals, gaps_open=gaps)
        self._session = s
        self._flowed(s, now, totals)
        self.save()

    def _follow(self, s: _Open, now: float, totals: Totals, flows: list[float],
                cable: Any) -> None:
        was_blind = s.blind
        if s.blind:
            if cable is not None or flows:
                s.blind = False
            elif s.blind_since is None:
                s.blind_since = now
        if cable is False:
            # Pulled while the gateway was not looking: the last flow is all that is known.
            self._close(s, s.last_flow if was_blind else self._ts(CABLE), "unplugged")
            return
        if flows:
            flow = max(flows)
            if not s.flowing and flow - s.last_flow >= INTERRUPTION_S:
                s.interruptions += 1
            s.last_flow = max(s.last_flow, flow)
            self._flowed(s, now, totals)
        elif not s.blind:
            s.flowing = False
        end_s = self._settings.charge_end_s
        if s.blind and s.blind_since is not None and now - s.blind_since >= end_s:
            self._close(s, s.last_flow, "gateway_restart")
        elif not s.blind and not flows and now - s.last_flow >= end_s:
            self._close(s, s.last_flow, "stopped")

    def _flowed(self, s: _Open, now: float, totals: Totals) -> None:
        """Current flows now: take this moment's values as the session's latest."""
        s.flowing = True
        s.at_flow = totals
        s.gaps_at_flow = self._counters.get(GAPS)
        s.max_power_w = max(s.max_power_w, self._watts)
        soc = self._store.good_value(SOC, now)
        if isinstance(soc, int | float) and not isinstance(soc, bool):
            s.soc_end = float(soc)
            if s.soc_start is None and now - s.start <= START_GRACE_S:
                s.soc_start = float(soc)

    def _close(self, s: _Open, end: float, reason: ChargeEnd) -> None:
        totals = s.so_far()
        price = self._settings.energy_price_per_kwh
        result = ChargeSession(
            id=s.id, start=s.start, end=end, duration_s=max(0.0, end - s.start),
            soc_start=s.soc_start, soc_end=s.soc_end, energy_wh=totals.wh_in, ah=totals.ah_in,
            max_power_w=s.max_power_w, interruptions=s.interruptions, end_reason=reason,
            cost=None if price is None else totals.wh_in / 1000.0 * price,
            currency=self._settings.currency if price is not None else "",
            complete=not s.restored and s.gaps_at_flow == s.gaps_open)
        self._session = None
        try:
            self._on_session(result)
        except Exception as exc:  # the consumer's bug must not stop session recording
            self._counters.inc("insights.sink_errors")
            self._rlog.error("charge.sink", f"charge session: the consumer failed: {exc!r}")
        # Only now: the consumer's durable path has the record, or a restart repeats it.
        self.save()

    def _restore(self) -> _Open | None:
        data = self._file.load()
        if data is None or data.get("session") is None:
            return None
        try:
            f = checked(data["session"], _SESSION_KINDS)
        except ValueError as exc:
            self._file.broken(str(exc))
            return None
        now = self._meter.totals
        gaps = self._counters.get(GAPS)
        return _Open(f["id"], f["start"], f["last_flow"], base=now, at_flow=now,
                     carried=f["so_far"], blind=True, restored=True, gaps_open=gaps,
                     gaps_at_flow=gaps, soc_start=f["soc_start"], soc_end=f["soc_end"],
                     max_power_w=f["max_power_w"], interruptions=f["interruptions"])


_SESSION_KINDS = {"id": "str", "start": "num", "last_flow": "num", "so_far": "totals",
                  "soc_start": "num?", "soc_end": "num?", "max_power_w": "num",
                  "interruptions": "count"}
