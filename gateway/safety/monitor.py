"""The safety monitor: evaluates every rule, keeps the verdicts, raises and clears alerts.

It runs on two triggers: after each batch of frames (event-driven, at most
once per ``MIN_GAP`` so a busy bus cannot starve the loop), and on a tick at
``tick_hz`` (10 Hz by default) whether frames arrive or not, so a node that
goes silent is noticed on time. Either way an alert fires within its
debounce plus one tick.

Besides the limit rules it watches the receive side itself: a safety-relevant
message that falls silent while the rest of its bus is awake
(``rx.<Message>.timeout``), and one whose frames fail their counter or
checksum (``rx.<Message>.integrity``). A bus that is silent as a whole is
asleep (the car is off), which is not a fault. Each message gets one full window to
speak again after the bus wakes and after the monitor itself was held up (a stalled
loop, a suspended machine): its ECU had no chance to be heard in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from gateway.alerts import AlertBook, Severity
from gateway.clock import Clock
from gateway.config.limits import LimitSpec
from gateway.config.profile import Profile
from gateway.decode import BusPlan, MessagePlan
from gateway.safety.inputs import MOTOR_SPEED, SPEED, evaluation
from gateway.safety.levels import NOT_APPLICABLE, LevelMachine, Measurement
from gateway.safety.receive import RxCheck
from gateway.safety.rules import Reading, Rule, build_rules
from gateway.safety.verdicts import (
    PACK_CORE,
    Motion,
    MotionJudge,
    Verdicts,
    charging_verdict,
    pack_verdict,
)
from gateway.state import CATALOG, SignalState, StateStore

MIN_GAP = 0.05
"""Event-driven evaluations are at least this far apart (monotonic seconds)."""
LATE_TICKS = 1.5
"""Evaluations further apart than this many ticks mean the monitor was held up."""

VERDICT_PATHS = {
    "motion": "Vehicle.Safety.Motion",
    "pack_ok": "Vehicle.Safety.PackOk",
    "charging_allowed": "Vehicle.Safety.ChargingAllowed",
}

_TIMEOUT = LimitSpec("rx_timeout", 1.0, None, 0.0, 0.0, 0.0)
# A frame or two can be hit by noise; half a second of failures is a broken sender.
_INTEGRITY = LimitSpec("rx_integrity", 1.0, None, 0.0, 0.5, 2.0)


class SafetyMonitor:
    """Rules, receive-side watches and verdicts of one vehicle."""

    def __init__(self, profile: Profile, plans: dict[str, BusPlan], store: StateStore,
                 alerts: AlertBook, clock: Clock, checks: dict[str, RxCheck]) -> None:
        self.spec = profile.safety
        self._store = store
        self._alerts = alerts
        self._clock = clock
        self.rules = build_rules(store, self.spec)
        self._motion = MotionJudge(store, self.spec)
        self._listening: float | None = None
        """Since when silence counts: the first evaluation, or the first after a hold-up."""
        self.rx_rules = self._rx_rules(plans, checks)
        self._last_eval = -math.inf
        self.watchers: list[Callable[[float], None]] = []
        """Further checks evaluated with the rules (speed cap, transmit-block expiry)."""
        self._slots = self._register_verdicts(store)
        self.verdicts = Verdicts(Motion.UNKNOWN, ("not_evaluated",), False, ("not_evaluated",),
                                 False, ("not_evaluated",), 0.0)

    @property
    def tick_s(self) -> float:
        """Seconds between ticks."""
        return 1.0 / self.spec.tick_hz

    def on_batch(self, bus: str) -> None:
        """Pipeline listener: evaluate soon after new frames, rate-limited."""
        del bus
        if self._clock.monotonic() - self._last_eval >= MIN_GAP:
            self.evaluate()

    async def run(self) -> None:
        """Evaluate every tick until cancelled."""
        while True:
            self.evaluate()
            await self._clock.sleep(self.tick_s)

    def evaluate(self, now: float | None = None) -> Verdicts:
        """Update every rule and the verdicts at ``now`` (the clock's time by default)."""
        now = self._clock.time() if now is None else now
        mono = self._clock.monotonic()
        if self._listening is None or mono - self._last_eval > LATE_TICKS * self.tick_s:
            self._listening = now
        self._last_eval = mono
        with evaluation():
            for rule in self.rules:
                self._update(rule, rule.measure(now), now)
            for rule in self.rx_rules:
                self._update(rule, rule.measure(now), now)
            motion, motion_reasons = self._motion.judge(now)
            pack = pack_verdict(self._store, self.rules, now)
            charge = charging_verdict(self._store, self.rules, self.spec, pack, now)
        self.verdicts = Verdicts(motion, motion_reasons, not pack, pack, not charge, charge, now)
        self._slots["motion"].set(motion.value, now)
        self._slots["pack_ok"].set(not pack, now)
        self._slots["charging_allowed"].set(not charge, now)
        for watcher in self.watchers:
            watcher(now)
        return self.verdicts

    def reset(self, key: str | None = None) -> list[str]:
        """Release ``reset`` latches whose condition is gone (all, or the one of ``key``).

        Returns the keys released. A latch whose fault is still present stays.
        """
        released = []
        for rule in self.rules:
            if (key is None or rule.key == key) and rule.machine.reset():
                released.append(rule.key)
                self._publish(rule)
        return released

    def _update(self, rule: Rule, reading: Reading, now: float) -> None:
        before = rule.machine.waiting_for_reset
        level = rule.machine.update(reading, now)
        if level != rule.raised or rule.machine.waiting_for_reset != before:
            self._publish(rule)

    def _publish(self, rule: Rule) -> None:
        m = rule.machine
        rule.raised = m.level
        if m.level == 0:
            self._alerts.clear(rule.key, value=m.value, source_ts=m.ts)
            return
        text, limit = rule.describe(m.level)
        severity = Severity.CRITICAL if m.level >= 2 else Severity.WARNING
        self._alerts.raise_(rule.key, severity, text, signal=rule.signal, value=m.value,
                            limit=limit, source_ts=m.ts, refresh=True)

    # ---- receive-side watches ---------------------------------------------------------

    def _rx_rules(self, plans: dict[str, BusPlan], checks: dict[str, RxCheck]) -> list[Rule]:
        watched = {id(s) for rule in self.rules for s in rule.inputs}
        watched |= {id(self._store.slot(p)) for p in (*PACK_CORE, SPEED, MOTOR_SPEED)
                    if p in self._store}
        out: list[Rule] = []
        for bus in plans.values():
            for plan in bus.mapped.values():
                slots = [d.slot for decodes in plan.signals.values() for d in decodes]
                check = checks.get(plan.name)
                if check is not None:
                    out.append(self._integrity_rule(plan, slots, check))
                if any(id(s) in watched for s in slots) or check is not None:
                    rule = self._timeout_rule(bus, plan, slots)
                    if rule is not None:
                        out.append(rule)
        return out

    def _timeout_rule(self, bus: BusPlan, plan: MessagePlan,
                      slots: Sequence[SignalState]) -> Rule | None:
        window = plan.stale_window()
        if window is None:
            return None  # event-driven: silence is normal
        samples = [p.all_samples() for p in bus.mapped.values()]
        asleep, woke = False, -math.inf

        def measure(now: float) -> Reading:
            nonlocal asleep, woke
            assert self._listening is not None  # evaluate() sets it before any rule runs
            last = max((s.timestamp for s in plan.all_samples() if s.timestamp), default=None)
            deadline = max(last or -math.inf, self._listening, woke) + window
            if now <= deadline:
                return Measurement(0.0, last or now)
            # Silent. Did anything else on this bus arrive after our deadline? If not, the
            # whole bus went quiet together: the car is off and the bus sleeps.
            latest = max((s.timestamp for group in samples for s in group if s.timestamp),
                         default=None)
            if latest is None or latest <= deadline:
                asleep = True
                return NOT_APPLICABLE
            if asleep:
                # The bus has just woken: the ECUs start one after another, not together.
                asleep, woke = False, now
                return Measurement(0.0, now)
            return Measurement(1.0, now)

        return Rule(f"rx.{plan.name}.timeout", f"{plan.name} not received", slots[0].path, "",
                    LevelMachine(_TIMEOUT, True), measure, tuple(slots), flag=True)

    def _integrity_rule(self, plan: MessagePlan, slots: Sequence[SignalState],
                        check: RxCheck) -> Rule:
        rule: Rule

        def measure(now: float) -> Reading:
            if check.failing is not None and check.failing_since is not None:
                rule.title = f"{plan.name} frames rejected ({check.failing.replace('_', ' ')})"
                return Measurement(1.0, check.failing_since)
            return Measurement(0.0, check.passing_since if check.passing_since else now)

        rule = Rule(f"rx.{plan.name}.integrity", f"{plan.name} frames rejected", slots[0].path,
                    "", LevelMachine(_INTEGRITY, True), measure, tuple(slots), flag=True)
        return rule

    @staticmethod
    def _register_verdicts(store: StateStore) -> dict[str, SignalState]:
        out = {}
        for name, path in VERDICT_PATHS.items():
            entry = CATALOG[path]
            # Stale after a second (ten ticks): a stuck safety loop shows as stale verdicts.
            out[name] = store.register(
                SignalState(path, entry.unit, entry.kind, entry.group, stale_after=1.0))
        return out

