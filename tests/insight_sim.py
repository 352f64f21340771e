"""Simulated drives, parks and charges through the real decoder, for the insight tests.

:class:`InsightSim` steps a :class:`VehicleModel` and its ECUs, and feeds the
frames that fall due in each step, as one batch, into a real reference-profile
:class:`Pipeline` on a :class:`ManualClock`, then calls the pipeline's
listeners (the :class:`PackMeter` is one) as the live decode task does. The
clock follows the frame timestamps. At every whole simulated second it hands
a GNSS :class:`Fix` built from the model's position to ``fix_listeners`` and
then calls ``each_second`` hooks with the clock time: what the GNSS reader and
the once-a-second insights task do live.

The model's mode can change between runs (:meth:`drive`, :meth:`park`,
:meth:`charge`, :meth:`pause_charger`), so one simulation can hold a whole
day. A parked car's bus sleeps: with ``bus_awake=False`` no frame is sent and
every signal goes stale, while the model goes on (coarse steps: only the
quiescent draw changes). :meth:`stop_gateway` and :meth:`start_gateway` replace
pipeline, store and meter as a gateway restart would (frames sent meanwhile are
lost), keeping the car and the clock.

Ground truth: :meth:`truth` snapshots the model's battery-side energy and
charge split by direction, its distance, odometer, SoC and the highest speed
so far; tests compare what the gateway computed from the frames with the
difference of two snapshots.

Other consumers attach as the wiring does: batch listeners to
``sim.pipeline.listeners`` (after the meter), periodic ones to ``each_second``,
position ones to ``fix_listeners``. Faults go through ``sim.ecus`` (``overrides``,
``silenced``) or :meth:`not_available`.

Accuracy and cost: with the default 20 ms step (the cycle of the pack and
speed frames) the meter's integrals match the model's truth to better than
0.001 % over ten minutes of driving (0.002 % at 10 ms), and ten minutes of
driving cost about five seconds of CPU. Only the messages the insights read
are built (``INSIGHT_MESSAGES``; ``messages=None`` builds all of them).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

import can

from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import Profile, load_profile
from gateway.gnss.fix import Fix
from gateway.insights.energy import PackMeter
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel, lfp_ocv
from tests.conftest import REF_PROFILE

BUS = "vehicle"
STEP_S = 0.02
SLEEP_STEP_S = 1.0
"""Model step while the bus sleeps: nothing is sent, and only the quiescent draw changes."""
INSIGHT_MESSAGES = frozenset({
    "BMS_Pack", "BMS_Soc", "BMS_CellStats", "BMS_Temps", "BMS_Charge", "MCU_Drive",
    "BCM_Status", "BCM_Odometer",
})
"""What trips, charging sessions and battery health read; the rest only costs time."""
M_PER_DEG = 111_320.0
"""Metres per degree of latitude, as the model moves its position."""
GNSS_HDOP = 0.9


@dataclass(frozen=True)
class Truth:
    """The model's ground truth at one moment (battery side; ``in`` = into the pack)."""

    at: float
    """Gateway clock time of the snapshot."""
    energy_out_wh: float
    energy_in_wh: float
    """Regeneration while driving and charging."""
    ah_out: float
    ah_in: float
    distance_km: float
    odometer_km: float
    soc: float
    max_speed_kmh: float
    """The highest speed since the simulation started."""

    def since(self, start: Truth) -> Truth:
        """Differences from ``start`` (``soc`` goes negative when discharging); the
        maximum speed is this snapshot's."""
        return Truth(self.at - start.at, self.energy_out_wh - start.energy_out_wh,
                     self.energy_in_wh - start.energy_in_wh, self.ah_out - start.ah_out,
                     self.ah_in - start.ah_in, self.distance_km - start.distance_km,
                     self.odometer_km - start.odometer_km, self.soc - start.soc,
                     self.max_speed_kmh)


class FastModel(VehicleModel):
    """The simulator's model with each cell's open-circuit voltage worked out once per SoC
    rather than at every call: the same numbers, in a fraction of the time (the model and
    its ECUs ask for the cell voltages several times per step)."""

    _ocv_key: tuple[float, tuple[float, ...]] | None = None
    _ocv: list[float]

    def cell_voltages(self) -> list[float]:
        """Terminal voltage of each cell (V), as :meth:`VehicleModel.cell_voltages`."""
        key = (self.soc, tuple(self.cell_soc_offset))
        if key != self._ocv_key:
            self._ocv_key = key
            self._ocv = [lfp_ocv(self.soc + off) for off in self.cell_soc_offset]
        amps = self.pack_current
        return [ocv - amps * r for ocv, r in zip(self._ocv, self.cell_r, strict=True)]


class _Ecus(VehicleEcus):
    """The simulator's ECUs, building only ``messages`` (all when None)."""

    def __init__(self, model: VehicleModel, messages: Collection[str] | None) -> None:
        super().__init__(model)
        if messages is not None:
            known = {c.message.name for c in self._cyclic}
            if unknown := set(messages) - known:
                raise ValueError(f"no such cyclic messages: {sorted(unknown)}")
            self._cyclic = [c for c in self._cyclic if c.message.name in messages]
        self.nodes = {m.senders[0] for m in self.db.messages
                      if m.senders and not m.name.startswith("GW_")}


def profile_without(*paths: str) -> Profile:
    """The reference profile with ``paths`` unmapped (a car that lacks those signals)."""
    profile = load_profile(REF_PROFILE)
    return dataclasses.replace(
        profile, mappings=tuple(m for m in profile.mappings if m.path not in paths))


class InsightSim:
    """The reference car and a gateway pipeline, advanced together in simulated time."""

    def __init__(
        self, *, model: VehicleModel | None = None, profile: Profile | None = None,
        step: float = STEP_S, messages: Collection[str] | None = INSIGHT_MESSAGES,
        gnss: bool = True, gnss_noise_m: float = 0.0, seed: int = 1,
    ) -> None:
        self._step_ms = round(step * 1000)
        if self._step_ms <= 0 or 1000 % self._step_ms or abs(step * 1000 - self._step_ms) > 1e-9:
            raise ValueError("step must be a whole number of milliseconds dividing 1 s")
        self.clock = ManualClock()
        self.start = self.clock.time()
        """Clock time of simulated second 0."""
        self.model = model or FastModel(mode="park")
        self.ecus = _Ecus(self.model, messages)
        self.profile = profile or load_profile(REF_PROFILE)
        self.gnss = gnss
        """Send a fix every second (NONE while ``model.gnss_fix`` is False)."""
        self.gnss_noise_m = gnss_noise_m
        """Standard deviation of the position noise added to each fix, per axis."""
        self.hdop = GNSS_HDOP
        self._rng = random.Random(seed)
        self._ms = 0
        self._paused_limit: int | None = None
        self.max_speed_kmh = 0.0
        self.last_fix: Fix | None = None
        self.each_second: list[Callable[[float], None]] = []
        """Called with the clock time at every whole simulated second."""
        self.fix_listeners: list[Callable[[Fix], None]] = []
        """Called with each second's fix, before ``each_second``."""
        self.gateway_up = True
        """False between :meth:`stop_gateway` and :meth:`start_gateway`."""
        self._build_gateway()

    # ---- the gateway side --------------------------------------------------------

    def _build_gateway(self) -> None:
        self.pipeline = Pipeline.build(self.profile, self.clock)
        self.store = self.pipeline.store
        self.counters = self.pipeline.counters
        self.meter = PackMeter(self.store, self.counters)
        self.pipeline.listeners.append(self.meter.on_batch)
        self._decoder = self.pipeline.decoders[BUS]

    def stop_gateway(self) -> None:
        """The gateway goes off: frames are lost and hooks and fix listeners are dropped
        (they belong to the old process); the car and the clock go on."""
        self.each_second.clear()
        self.fix_listeners.clear()
        self.gateway_up = False

    def start_gateway(self) -> None:
        """A new pipeline, store and meter, as a gateway process starting."""
        self._build_gateway()
        self.gateway_up = True

    def restart_gateway(self) -> None:
        """:meth:`stop_gateway` then :meth:`start_gateway`, with no time in between."""
        self.stop_gateway()
        self.start_gateway()

    @property
    def t(self) -> float:
        """Simulated seconds since the start."""
        return self._ms / 1000.0

    @property
    def now(self) -> float:
        """The gateway clock."""
        return self.clock.time()

    # ---- the car -----------------------------------------------------------------

    @property
    def bus_awake(self) -> bool:
        """False while the ECUs send nothing (a parked car's sleeping bus)."""
        return not self.ecus.nodes <= self.ecus.silenced

    @bus_awake.setter
    def bus_awake(self, awake: bool) -> None:
        # Waking lifts any silencing of single nodes too (``ecus.silenced``): :meth:`drive`,
        # :meth:`charge` and :meth:`park` start from a whole bus; use :meth:`run` to keep one.
        if awake:
            self.ecus.silenced -= self.ecus.nodes
        else:
            self.ecus.silenced |= self.ecus.nodes

    @property
    def lap_s(self) -> float:
        """Length of one lap of the model's drive cycle."""
        return self.model.cycle.period

    def drive(self, seconds: float) -> None:
        """Drive the cycle (ready, ignition on) for ``seconds``."""
        self.model.mode = "drive"
        self.bus_awake = True
        self.run(seconds)

    def park(self, seconds: float, *, bus_awake: bool = False) -> None:
        """Park (ignition off, cable out) for ``seconds``; the bus sleeps unless told."""
        self.model.mode = "park"
        self.bus_awake = bus_awake
        self.run(seconds)

    def charge(self, seconds: float) -> None:
        """Charge on the 3.3 kW charger (cable in) for ``seconds``."""
        self.model.mode = "charge"
        self.bus_awake = True
        self.run(seconds)

    def pause_charger(self) -> None:
        """Stop the charge with the cable left in (the BMS reports its limit reached)."""
        if self._paused_limit is None:
            self._paused_limit = self.model.charge_limit
            self.model.charge_limit = math.floor(self.model.soc)

    def resume_charger(self) -> None:
        """Let the charge go on after :meth:`pause_charger`."""
        if self._paused_limit is not None:
            self.model.charge_limit, self._paused_limit = self._paused_limit, None

    def not_available(self, message: str, signal: str) -> None:
        """Send ``signal`` as its "not available" code (all ones; the minimum if signed)."""
        sig = self.ecus.db.get_message_by_name(message).get_signal_by_name(signal)
        raw = -(1 << (sig.length - 1)) if sig.is_signed else (1 << sig.length) - 1
        self.ecus.overrides.setdefault(message, {})[signal] = raw * sig.scale + sig.offset

    def truth(self) -> Truth:
        """The model's ground truth now."""
        m = self.model
        return Truth(self.now, m.energy_out_wh, m.energy_in_wh, m.ah_out, m.ah_in,
                     m.distance_km, m.odometer_km, m.soc, self.max_speed_kmh)

    # ---- time --------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        """Advance car and gateway by ``seconds`` in the current mode."""
        end = self._ms + round(seconds * 1000)
        while self._ms < end:
            step = self._step_ms if self.bus_awake else round(SLEEP_STEP_S * 1000)
            step = min(step, 1000 - self._ms % 1000, end - self._ms)
            self.model.step(step / 1000.0)
            self._ms += step
            self.max_speed_kmh = max(self.max_speed_kmh, self.model.speed_kmh)
            frames = self.ecus.due_frames(self._ms / 1000.0)
            if frames and self.gateway_up:
                self._feed(frames)
            if self._ms % 1000 == 0:
                self._second()

    def _feed(self, frames: list[can.Message]) -> None:
        for f in frames:
            f.timestamp += self.start
        self._advance_to(max(f.timestamp for f in frames))
        self._decoder.process(frames)
        for listener in self.pipeline.listeners:
            listener(BUS)

    def _second(self) -> None:
        now = self.start + self._ms // 1000
        self._advance_to(now)
        if self.gnss and self.gateway_up:
            fix = self.last_fix = self._fix(now)
            for on_fix in self.fix_listeners:
                on_fix(fix)
        for hook in self.each_second:
            hook(now)

    def _fix(self, now: float) -> Fix:
        m = self.model
        if not m.gnss_fix:
            return Fix(now, now, "NONE", None, None, None, None, None, 3, None)
        north = self._rng.gauss(0.0, self.gnss_noise_m) if self.gnss_noise_m else 0.0
        east = self._rng.gauss(0.0, self.gnss_noise_m) if self.gnss_noise_m else 0.0
        lat = m.lat + north / M_PER_DEG
        lon = m.lon + east / (M_PER_DEG * math.cos(math.radians(m.lat)))
        return Fix(now, now, "THREE_D", lat, lon, 35.0, m.speed_kmh, m.heading_deg, 10,
                   self.hdop)

    def _advance_to(self, t: float) -> None:
        ahead = t - self.clock.time()
        if ahead > 0:
            self.clock.advance(ahead)
