"""Checking what came out over MQTT against a scenario's expectations.

The rig records every message under the vehicle's topics with its scenario time;
:func:`evaluate` decides pass or fail and writes the report: each expectation with
when it was met, and for each one that failed, what was expected and what came out
on that topic instead.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hil.scenario.spec import Expectation, Scenario, lookup, topic_matches

SHOWN = 8
"""At most this many messages are quoted under a failed expectation."""


@dataclass(frozen=True)
class Record:
    """One message the gateway published."""

    t: float
    """Scenario seconds; negative while the gateway was starting, before the timeline."""
    topic: str
    """The topic below ``evgw/v1/{vehicle}/``."""
    payload: dict[str, Any]


@dataclass
class Verdict:
    """The outcome of one scenario run."""

    scenario: Scenario
    passed: bool
    ran_s: float
    lines: list[str] = field(default_factory=list)
    rerun_because: str | None = None
    """Set on a failed run when the rig may have caused every failure in it (the car
    stalled before each missing expectation was due, and nothing else failed): why."""

    def report(self) -> str:
        """The report: a PASS/FAIL headline, then one line per finding."""
        head = "PASS" if self.passed else "FAIL"
        return "\n".join([f"{head} {self.scenario.name} ({self.scenario.file}) after "
                          f"{self.ran_s:.1f} s", *self.lines])


def first_match(expectation: Expectation, records: list[Record]) -> Record | None:
    """The earliest record that meets ``expectation`` inside its time window."""
    for r in records:
        if expectation.in_window(r.t) and expectation.matches(r.topic, r.payload):
            return r
    return None


class Progress:
    """Which expectations have been met so far, fed the records in arrival order.

    The rig asks after every poll whether it may stop; feeding only the new records keeps
    that cheap on a single-CPU User-Mode Linux, where the car and the daemon need the CPU.
    """

    def __init__(self, scenario: Scenario) -> None:
        self._expect = scenario.expect
        self._met: list[float | None] = [None] * len(scenario.expect)

    def feed(self, records: Iterable[Record]) -> None:
        """Take records newer than any fed before; the first match of each counts."""
        for r in records:
            for i, e in enumerate(self._expect):
                if self._met[i] is None and e.in_window(r.t) and e.matches(r.topic, r.payload):
                    self._met[i] = r.t

    @property
    def met_at(self) -> float | None:
        """When the last expectation was met; None while any is unmet."""
        if any(t is None for t in self._met):
            return None
        return max((t for t in self._met if t is not None), default=0.0)


def all_met_at(scenario: Scenario, records: list[Record]) -> float | None:
    """When the last expectation was met; None while any is unmet."""
    progress = Progress(scenario)
    progress.feed(records)
    return progress.met_at


class RigEffects(Protocol):
    """What the rig itself did to a run (:mod:`hil.scenario.stalls`: the car's stalls)."""

    def excuse(self, record: Record, records: list[Record]) -> str | None:
        """Why an unexpected alert is the rig's doing, not the gateway's; None if it is not."""
        ...

    def disturbed_before(self, t: float) -> bool:
        """Whether the rig disturbed the run before scenario time ``t``."""
        ...

    def summary(self) -> str | None:
        """One line on the disturbances for the report, or None when there were none."""
        ...


def evaluate(scenario: Scenario, records: list[Record], ran_s: float,
             problems: list[str], rig: RigEffects | None = None) -> Verdict:
    """Judge a run. ``problems`` are failures found by the rig itself (a gateway that
    crashed or logged a traceback, a broker that went away). ``rig`` excuses alerts it
    caused, and decides whether a failed run may have been its doing."""
    verdict = Verdict(scenario, True, ran_s)
    out = verdict.lines
    # Only a run whose every failure the rig may have caused is worth another try.
    rigs_doing = rig is not None and not problems
    for text in problems:
        verdict.passed = False
        out.append(f"  PROBLEM    {text}")
    for e in scenario.expect:
        hit = first_match(e, records)
        if hit is not None:
            out.append(f"  ok         {e.text}: at {hit.t:.1f} s")
            continue
        verdict.passed = False
        due = e.by if e.by is not None else ran_s
        rigs_doing = rigs_doing and rig is not None and rig.disturbed_before(due)
        out.append(f"  MISSING    {e.text}{_window(e)}{_line(e)}")
        out.extend(_what_came_out(e, records))
    def excused(r: Record) -> bool:
        why = rig.excuse(r, records) if rig is not None else None
        if why is not None:
            out.append(f"  excused    {summary(r)}: {why}")
        return why is not None

    for f in scenario.forbid:
        hits = [r for r in records if f.in_window(r.t) and f.matches(r.topic, r.payload)
                and not excused(r)]
        if hits:
            verdict.passed = rigs_doing = False
            out.append(f"  FORBIDDEN  {f.text}{_window(f)}{_line(f)} came out "
                       f"{len(hits)} time(s):")
            out.extend(f"             {summary(r, _detail_paths(f))}" for r in hits[:SHOWN])
    for r in unexpected_alerts(scenario, records):
        if excused(r):
            continue
        verdict.passed = rigs_doing = False
        out.append(f"  UNEXPECTED {summary(r)} (not expected by the scenario, nor in "
                   "allow_alerts)")
    disturbed = rig.summary() if rig is not None else None
    if disturbed is not None:
        out.append(f"  RIG        {disturbed}")
        if not verdict.passed and rigs_doing:
            verdict.rerun_because = disturbed
    return verdict


def unexpected_alerts(scenario: Scenario, records: list[Record]) -> list[Record]:
    """Raised alerts that no expectation and no ``allow_alerts`` pattern accounts for: a
    fault must show up as what the scenario says, and as nothing else."""
    patterns = [*scenario.allow_alerts]
    for e in (*scenario.expect, *scenario.forbid):
        patterns += [str(c.value) for c in e.where if c.path == "alert.key" and c.op == "=="]
    out = []
    for r in records:
        if r.topic != "alerts" or r.payload.get("transition") != "raised":
            continue
        key = str(r.payload.get("alert", {}).get("key", ""))
        if not any(fnmatch.fnmatchcase(key, p) for p in patterns):
            out.append(r)
    return out


def _window(e: Expectation) -> str:
    if e.not_before is None and e.by is None:
        return ""
    if e.not_before is None:
        return f", by {e.by:g} s"
    if e.by is None:
        return f", not before {e.not_before:g} s"
    return f", between {e.not_before:g} and {e.by:g} s"


def _line(e: Expectation) -> str:
    return f" (line {e.line})" if e.line else ""


def _what_came_out(e: Expectation, records: list[Record]) -> list[str]:
    on_topic = [r for r in records if topic_matches(e.topic, r.topic)]
    # Narrow to the same alert key, event type or command when there are such messages:
    # "the alert came, but late / at the wrong severity" is the useful answer.
    subject = [c for c in e.where[:e.subject] if c.path != "transition"]
    same = [r for r in on_topic if all(c.holds(r.payload) for c in subject)] \
        if subject else []
    shown = same or on_topic
    # The messages inside the window are the interesting ones, when there are any.
    shown = [r for r in shown if e.in_window(r.t)] or shown
    if not shown:
        return [f"             got: nothing on '{e.topic}'"]
    what = "got (same subject)" if same else f"got (on '{e.topic}')"
    lines = [f"             {what}, {len(shown)} message(s):"]
    lines += [f"               {summary(r, _detail_paths(e))}" for r in shown[:SHOWN]]
    if len(shown) > SHOWN:
        lines.append(f"               ... and {len(shown) - SHOWN} more")
    return lines


def _detail_paths(e: Expectation) -> list[str]:
    """The fields a topic expectation looks at: quoting them beats a truncated payload.
    Alerts, events and command results have their own one-line form."""
    return [] if e.topic in _NAMED else [c.path for c in e.where[e.subject:]]


def summary(r: Record, paths: list[str] | None = None) -> str:
    """One line for a recorded message; with ``paths``, only the values found there."""
    p = r.payload
    if paths:
        found = [(path, lookup(p, path)) for path in paths]
        body = f"{r.topic} " + ", ".join(
            f"{path} = {json.dumps(value) if ok else '(absent)'}" for path, (ok, value) in found)
    elif r.topic == "alerts":
        a = p.get("alert", {})
        body = (f"alert {a.get('key')} {p.get('transition')} {a.get('severity')}: "
                f"{a.get('message', '')}")
    elif r.topic == "events":
        body = f"event {p.get('type')} {_short(p.get('data'))}"
    elif r.topic.startswith("cmd/res/"):
        reason = f" ({p.get('reason')})" if p.get("reason") else ""
        # The detail says why (e.g. motion ["stopping"]): what a failure report needs.
        detail = f" {_short(p['detail'])}" if p.get("detail") else ""
        body = f"command {p.get('cmd')} {p.get('status')}{reason}{detail}"
    else:
        body = f"{r.topic} {_short({k: v for k, v in p.items() if k not in _ENVELOPE})}"
    return f"{r.t:7.1f} s  {body}"


_ENVELOPE = ("v", "vehicle", "boot", "seq", "ts")
_NAMED = ("alerts", "events", "cmd/res/+")


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."
