"""LevelMachine: boundaries, debounce, hysteresis, clearing, unknown input and latching."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.config.limits import LimitSpec
from gateway.safety.levels import NOT_APPLICABLE, LevelMachine, Measurement

# A high rule (trips above) and a low rule (trips below), resolution 0.001.
HIGH = LimitSpec("high", warning=10.0, critical=20.0, hysteresis=2.0, debounce_s=1.0,
                 clear_s=3.0)
LOW = LimitSpec("low", warning=10.0, critical=5.0, hysteresis=1.0, debounce_s=1.0, clear_s=3.0)


def at(machine: LevelMachine, t: float, value: float | None, complete: bool = True) -> int:
    """Feed ``value`` measured at ``t`` and evaluated at ``t``."""
    m = None if value is None else Measurement(value, t, complete)
    return machine.update(m, t)


def hold(machine: LevelMachine, start: float, end: float, value: float | None,
         complete: bool = True, every: float = 0.25) -> int:
    """Feed ``value`` from ``start`` to ``end`` inclusive; returns the final level."""
    t = start
    level = machine.level
    while t <= end:
        level = at(machine, t, value, complete)
        t += every
    return level


@pytest.mark.parametrize(("value", "level"), [
    (9.999, 0), (10.0, 1), (19.999, 1), (20.0, 2), (250.0, 2),
])
def test_high_rule_boundaries(value, level):
    m = LevelMachine(HIGH, high=True)
    assert at(m, 0.0, value) == 0, "nothing before the debounce"
    assert at(m, 1.0, value) == level
    assert (m.value, m.ts) == (value, 1.0)


@pytest.mark.parametrize(("value", "level"), [
    (10.001, 0), (10.0, 1), (5.001, 1), (5.0, 2), (-3.0, 2),
])
def test_low_rule_boundaries(value, level):
    m = LevelMachine(LOW, high=False)
    assert at(m, 0.0, value) == 0
    assert at(m, 1.0, value) == level


def test_raised_exactly_when_the_debounce_has_elapsed():
    m = LevelMachine(HIGH, high=True)
    assert hold(m, 0.0, 0.75, 12.0) == 0
    assert at(m, 1.0, 12.0) == 1


def test_a_dip_restarts_the_debounce():
    m = LevelMachine(HIGH, high=True)
    at(m, 0.0, 12.0)
    at(m, 0.5, 9.0)  # one reading below the level
    assert hold(m, 1.0, 1.75, 12.0) == 0, "counted from the dip, not from the first reading"
    assert at(m, 2.0, 12.0) == 1


def test_debounce_counts_from_the_source_time_of_an_old_reading():
    m = LevelMachine(HIGH, high=True)
    # Evaluated at 5.0, but the reading was taken at 4.0: it has held for a second already.
    assert m.update(Measurement(12.0, 4.0), 5.0) == 1


def test_a_reading_stamped_in_the_future_counts_from_now():
    m = LevelMachine(HIGH, high=True)
    m.update(Measurement(12.0, 10.0), 0.0)
    assert m.update(Measurement(12.0, 10.0), 0.75) == 0
    assert m.update(Measurement(12.0, 10.0), 1.0) == 1


def test_high_hysteresis_holds_until_the_value_passes_level_minus_hysteresis():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 10.0)
    assert m.level == 1
    assert hold(m, 1.25, 20.0, 8.0) == 1, "exactly at level - hysteresis is still on"
    at(m, 20.25, 7.999)
    assert hold(m, 20.5, 23.0, 7.999) == 1, "clear_s has not elapsed"
    assert at(m, 23.25, 7.999) == 0


def test_low_hysteresis_holds_until_the_value_passes_level_plus_hysteresis():
    m = LevelMachine(LOW, high=False)
    hold(m, 0.0, 1.0, 5.0)
    assert m.level == 2
    assert hold(m, 1.25, 20.0, 6.0) == 2, "exactly at level + hysteresis is still on"
    assert hold(m, 20.25, 23.25, 6.001) == 1, "critical cleared, warning still holds"
    assert hold(m, 23.5, 30.0, 11.0) == 1
    assert hold(m, 30.25, 33.25, 11.001) == 0


def test_clearing_waits_clear_s_and_a_return_restarts_it():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 12.0)
    hold(m, 1.25, 3.25, 5.0)  # clearing for 2 s of the 3 needed
    at(m, 3.5, 12.0)  # back above
    assert hold(m, 3.75, 6.5, 5.0) == 1, "the clear timer restarted at 3.75"
    assert at(m, 6.75, 5.0) == 0


def test_unknown_input_holds_a_raised_level():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 25.0)
    assert m.level == 2
    assert hold(m, 1.25, 100.0, None) == 2, "a silent sensor never looks fixed"
    assert (m.value, m.ts) == (25.0, 1.0), "the last known reading is kept"


def test_unknown_input_never_raises_and_restarts_a_pending_raise():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 0.75, 12.0)
    assert at(m, 1.0, None) == 0
    assert hold(m, 1.25, 2.0, 12.0) == 0, "the debounce restarted when data came back"
    assert at(m, 2.25, 12.0) == 1


def test_unknown_input_restarts_a_pending_clear():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 12.0)
    hold(m, 1.25, 3.75, 5.0)  # 2.5 s of the 3 s clear
    at(m, 4.0, None)
    assert hold(m, 4.25, 7.0, 5.0) == 1
    assert at(m, 7.25, 5.0) == 0


def test_a_partial_measurement_can_raise():
    m = LevelMachine(HIGH, high=True)
    assert hold(m, 0.0, 1.0, 21.0, complete=False) == 2


def test_a_partial_measurement_cannot_clear_and_restarts_pending_changes():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 21.0)
    assert hold(m, 1.25, 50.0, 0.0, complete=False) == 2, "unknown inputs might still be high"
    hold(m, 50.25, 52.25, 0.0)  # two complete seconds of the three
    at(m, 52.5, 0.0, complete=False)
    assert hold(m, 52.75, 55.5, 0.0) == 2, "the clear restarted after the partial reading"
    assert at(m, 55.75, 0.0) == 0


def test_a_partial_reading_below_the_level_restarts_a_pending_raise():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 0.75, 12.0)
    at(m, 1.0, 3.0, complete=False)
    assert hold(m, 1.25, 2.0, 12.0) == 0
    assert at(m, 2.25, 12.0) == 1


def test_not_applicable_clears_after_clear_s_and_never_raises():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 25.0)
    assert m.update(NOT_APPLICABLE, 1.25) == 2
    assert m.update(NOT_APPLICABLE, 4.0) == 2
    assert m.update(NOT_APPLICABLE, 4.25) == 0
    assert (m.value, m.ts) == (25.0, 1.0), "n/a is not a reading"
    for t in (5.0, 50.0):
        assert m.update(NOT_APPLICABLE, t) == 0


def test_without_latch_critical_falls_back_to_warning():
    m = LevelMachine(HIGH, high=True)
    hold(m, 0.0, 1.0, 25.0)
    assert hold(m, 1.25, 4.25, 15.0) == 1
    assert not m.latched


def test_clear_latch_holds_critical_until_completely_clear():
    m = LevelMachine(replace(HIGH, latch="clear"), high=True)
    hold(m, 0.0, 1.0, 25.0)
    assert m.latched
    assert hold(m, 1.25, 30.0, 15.0) == 2, "still a warning: the critical level stays"
    assert not m.waiting_for_reset
    assert hold(m, 30.25, 33.25, 5.0) == 0
    assert not m.latched
    assert not m.reset(), "nothing to reset"


def test_reset_latch_needs_a_reset_once_the_condition_is_gone():
    m = LevelMachine(replace(HIGH, latch="reset"), high=True)
    hold(m, 0.0, 1.0, 25.0)
    assert not m.reset(), "a reset cannot hide a fault that is still there"
    assert m.level == 2
    hold(m, 1.25, 4.25, 15.0)  # critical condition gone, warning still on
    assert m.level == 2
    assert not m.waiting_for_reset
    assert not m.reset(), "the warning condition is still present"
    assert m.level == 2 and m.latched
    assert hold(m, 4.5, 20.0, 5.0) == 2, "completely clear, but latched"
    assert m.waiting_for_reset
    assert m.reset()
    assert (m.level, m.latched, m.waiting_for_reset) == (0, False, False)
    assert at(m, 20.25, 5.0) == 0
    assert not m.reset()


def test_reset_latch_rearms_after_a_reset():
    m = LevelMachine(replace(HIGH, latch="reset"), high=True)
    hold(m, 0.0, 1.0, 25.0)
    hold(m, 1.25, 10.0, 0.0)
    assert m.reset()
    assert hold(m, 10.25, 11.25, 25.0) == 2
    assert m.latched and m.reset_pending


def test_warning_only_spec_never_goes_critical():
    m = LevelMachine(replace(HIGH, critical=None), high=True)
    assert hold(m, 0.0, 5.0, 1e9) == 1
    assert m.threshold(2) is None and m.threshold(1) == 10.0


def test_critical_only_spec_goes_straight_to_critical():
    m = LevelMachine(replace(HIGH, warning=None, latch="clear"), high=True)
    assert hold(m, 0.0, 0.75, 50.0) == 0
    assert at(m, 1.0, 50.0) == 2
    assert hold(m, 1.25, 4.0, 19.0) == 2, "inside the hysteresis band"
    assert hold(m, 4.25, 7.25, 17.999) == 0
    assert not m.latched


def test_unknown_from_the_start_is_level_zero_and_records_nothing():
    m = LevelMachine(HIGH, high=True)
    assert hold(m, 0.0, 5.0, None) == 0
    assert (m.value, m.ts) == (None, None)


def test_a_spec_without_levels_never_raises():
    m = LevelMachine(replace(HIGH, warning=None, critical=None), high=False)
    assert hold(m, 0.0, 5.0, -1e9) == 0
    assert m.value == -1e9
