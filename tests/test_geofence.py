"""Geofences: signed distance against hand-computed geometry, hysteresis, confirmation,
and the state file that carries fence states across restarts."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.config.location import GeofenceSpec
from gateway.gnss.fix import Fix
from gateway.gnss.geo import EARTH_RADIUS_M, LocalFrame
from gateway.health import Counters, RateLimitedLog
from gateway.insights.geofence import Geofences, fence_frame, signed_distance

M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180.0
CENTER = (48.137, 11.575)
RADIUS = 200.0
DEPOT = GeofenceSpec("depot", "circle", center=CENTER, radius_m=RADIUS, hysteresis_m=20.0)


def from_xy(origin: tuple[float, float], east: float, north: float) -> tuple[float, float]:
    """The inverse of LocalFrame(origin).to_xy, which is linear, so exact."""
    m_lon = M_PER_DEG_LAT * math.cos(math.radians(origin[0]))
    return (origin[0] + north / M_PER_DEG_LAT, origin[1] + east / m_lon)


def polygon(name: str, xy: list[tuple[float, float]], origin: tuple[float, float] = CENTER,
            hysteresis: float = 20.0) -> GeofenceSpec:
    """A polygon whose first vertex is ``origin`` and whose shape is given in metres."""
    x0, y0 = xy[0]
    points = tuple(from_xy(origin, x - x0, y - y0) for x, y in xy)
    return GeofenceSpec(name, "polygon", points=points, hysteresis_m=hysteresis)


def depot_point(inside_m: float) -> tuple[float, float]:
    """Due north of the depot centre, ``inside_m`` metres inside its boundary."""
    return (CENTER[0] + (RADIUS - inside_m) / M_PER_DEG_LAT, CENTER[1])


def make_fix(point: tuple[float, float] | None, t: float, hdop: float | None = 1.0) -> Fix:
    return Fix(received=t, utc=t, fix_type="THREE_D" if point else "NONE",
               lat=point[0] if point else None, lon=point[1] if point else None, alt=500.0,
               speed_kmh=0.0, heading=None, satellites=9, hdop=hdop)


class Rig:
    """Real Geofences with an event list, counters and a state file."""

    def __init__(self, tmp_path: Path, specs: tuple[GeofenceSpec, ...] = (DEPOT,),
                 state_file: Path | None = None) -> None:
        self.clock = ManualClock()
        self.counters = Counters()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.state_file = state_file or tmp_path / "geofences.json"
        self.fences = Geofences(specs, self.record, self.clock, self.counters,
                                RateLimitedLog(logging.getLogger("test.geofence"), self.clock),
                                max_hdop=5.0, state_file=self.state_file, confirm=2)
        self.t = self.clock.time()

    def record(self, kind: str, data: Mapping[str, Any]) -> None:
        self.events.append((kind, dict(data)))

    def at(self, *inside_m: float, hdop: float | None = 1.0) -> None:
        """One fix per given distance inside the depot, a second apart."""
        for d in inside_m:
            self.clock.advance(1.0)
            self.t = self.clock.time()
            self.fences.on_fix(make_fix(depot_point(d), self.t, hdop))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


# -- geometry ---------------------------------------------------------------------------------

def test_circle_signed_distance() -> None:
    frame = fence_frame(DEPOT)
    assert signed_distance(DEPOT, frame, CENTER) == pytest.approx(200.0, abs=1e-6)
    assert signed_distance(DEPOT, frame, depot_point(50.0)) == pytest.approx(50.0, abs=1e-6)
    assert signed_distance(DEPOT, frame, depot_point(-30.0)) == pytest.approx(-30.0, abs=1e-6)
    east = from_xy(CENTER, 250.0, 0.0)  # 250 m east: 50 m outside
    assert signed_distance(DEPOT, frame, east) == pytest.approx(-50.0, abs=0.01)


def test_convex_polygon_signed_distance() -> None:
    square = polygon("yard", [(0, 0), (200, 0), (200, 200), (0, 200)])
    frame = fence_frame(square)
    assert frame.origin == square.points[0]

    def at(x: float, y: float) -> float:
        return signed_distance(square, frame, from_xy(CENTER, x, y))

    assert at(100, 100) == pytest.approx(100.0, abs=1e-6)
    assert at(50, 120) == pytest.approx(50.0, abs=1e-6)
    assert at(190, 10) == pytest.approx(10.0, abs=1e-6)
    assert at(-30, 100) == pytest.approx(-30.0, abs=1e-6)
    assert at(-30, -40) == pytest.approx(-50.0, abs=1e-6)  # nearest is the corner: 3-4-5
    assert at(200, 100) == pytest.approx(0.0, abs=1e-6)


def test_concave_polygon_signed_distance() -> None:
    # A U: two 100 m wide arms with a 100 x 200 m notch between them, open to the north.
    u = polygon("u", [(0, 0), (300, 0), (300, 300), (200, 300), (200, 100), (100, 100),
                      (100, 300), (0, 300)])
    frame = fence_frame(u)

    def at(x: float, y: float) -> float:
        return signed_distance(u, frame, from_xy(CENTER, x, y))

    assert at(150, 200) == pytest.approx(-50.0, abs=1e-6)  # in the notch: outside
    assert at(150, 120) == pytest.approx(-20.0, abs=1e-6)  # just above the notch floor
    assert at(150, 50) == pytest.approx(50.0, abs=1e-6)    # in the base, under the notch
    assert at(30, 200) == pytest.approx(30.0, abs=1e-6)    # left arm
    # Rays along y = 100 pass through two vertices of the notch floor.
    assert at(250, 100) == pytest.approx(50.0, abs=1e-6)
    assert at(-50, 100) == pytest.approx(-50.0, abs=1e-6)
    assert at(350, 300) == pytest.approx(-50.0, abs=1e-6)  # level with the arm tops


# -- state machine ----------------------------------------------------------------------------

def test_first_determination_is_silent_and_saved(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert rig.fences.states() == {"depot": None}
    rig.at(100.0)
    assert rig.fences.inside("depot") is None  # one fix is not confirmation
    rig.at(100.0)
    assert rig.fences.inside("depot") is True
    assert rig.events == []
    assert json.loads(rig.state_file.read_text()) == {"depot": True}


def test_enter_and_exit_with_hysteresis(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(-100.0, -100.0)
    assert rig.fences.inside("depot") is False and rig.events == []
    rig.at(15.0, 15.0, 15.0, 19.9)  # inside, but not by the hysteresis
    assert rig.events == [] and rig.fences.inside("depot") is False
    rig.at(25.0, 30.0)
    assert rig.kinds() == ["geofence_entered"]
    lat, lon = depot_point(30.0)
    assert rig.events[0][1] == {"fence": "depot", "lat": round(lat, 7), "lon": round(lon, 7),
                                "distance_m": 30.0, "ts": round(rig.t, 3)}
    assert json.loads(rig.state_file.read_text()) == {"depot": True}
    rig.at(-15.0, -15.0, -19.0)
    assert rig.kinds() == ["geofence_entered"]
    rig.at(-25.0, -22.0)
    assert rig.kinds() == ["geofence_entered", "geofence_exited"]
    assert rig.events[1][1]["distance_m"] == -22.0
    assert rig.fences.inside("depot") is False
    assert json.loads(rig.state_file.read_text()) == {"depot": False}


def test_a_band_fix_breaks_the_run(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(-100.0, -100.0)
    rig.at(50.0, 0.0, 50.0)  # 0 m is in the band: the two deep fixes are not consecutive
    assert rig.events == []
    rig.at(50.0)
    assert rig.kinds() == ["geofence_entered"]


def test_jitter_at_the_edge_does_not_flap(tmp_path: Path) -> None:
    rng = random.Random(6)
    jitter = [rng.uniform(-10.0, 10.0) for _ in range(300)]
    # Without hysteresis, confirm=2 alone would flap on this sequence: it has runs of two
    # or more fixes on each side of the line.
    runs = [a > 0 for a, b in itertools.pairwise(jitter) if (a > 0) == (b > 0)]
    assert True in runs and False in runs
    for start in (-100.0, 100.0):
        (tmp_path / str(start)).mkdir()
        rig = Rig(tmp_path / str(start))
        rig.at(start, start)
        rig.at(*jitter)
        assert rig.events == []
        assert rig.fences.inside("depot") is (start > 0)


def test_single_outliers_are_ignored(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(100.0, 100.0)
    for _ in range(5):
        rig.at(-300.0, 100.0)
    assert rig.events == [] and rig.fences.inside("depot") is True
    rig.at(-300.0, -300.0)
    assert rig.kinds() == ["geofence_exited"]


def test_poor_and_invalid_fixes_are_ignored(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(100.0, 100.0)
    rig.at(-300.0, -300.0, -300.0, hdop=9.0)  # worse than max_hdop 5
    rig.at(-300.0, -300.0, hdop=None)
    rig.clock.advance(1.0)
    rig.fences.on_fix(make_fix(None, rig.clock.time(), hdop=None))
    assert rig.events == [] and rig.fences.inside("depot") is True


def test_a_repeated_epoch_is_not_a_second_confirmation(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(100.0, 100.0)
    fix = make_fix(depot_point(-300.0), rig.clock.time() + 1.0)
    rig.fences.on_fix(fix)
    rig.fences.on_fix(fix)
    assert rig.events == [] and rig.counters.get("insights.geofence_fix_repeated") == 1


def test_a_clock_step_backwards_does_not_stop_fixes_from_counting(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.at(100.0, 100.0)
    stepped = rig.clock.time() - 3600.0  # NTP pulled the wall clock back an hour
    outside = depot_point(-300.0)
    rig.fences.on_fix(make_fix(outside, stepped))
    assert rig.events == []
    rig.fences.on_fix(make_fix(outside, stepped + 1.0))
    assert rig.kinds() == ["geofence_exited"]
    assert rig.events[0][1]["ts"] == round(stepped + 1.0, 3)
    assert rig.counters.get("insights.geofence_fix_repeated") == 0


def test_restart_with_a_state_file_reports_the_exit(tmp_path: Path) -> None:
    first = Rig(tmp_path)
    first.at(100.0, 100.0)
    assert first.events == []
    # The gateway is off while the car leaves; the next run starts from the file.
    second = Rig(tmp_path)
    assert second.fences.states() == {"depot": True}
    second.at(-500.0)
    assert second.events == []
    second.at(-500.0)
    assert second.kinds() == ["geofence_exited"]
    assert second.events[0][1]["distance_m"] == -500.0
    assert json.loads(second.state_file.read_text()) == {"depot": False}


def test_polygon_fence_and_unconfigured_states_dropped(tmp_path: Path) -> None:
    yard = polygon("yard", [(0, 0), (200, 0), (200, 200), (0, 200)])
    state_file = tmp_path / "geofences.json"
    state_file.write_text(json.dumps({"yard": False, "old_depot": True}))
    rig = Rig(tmp_path, specs=(yard,))
    assert rig.fences.states() == {"yard": False}
    with pytest.raises(KeyError):
        rig.fences.inside("old_depot")
    for t in (1.0, 2.0):
        rig.fences.on_fix(make_fix(from_xy(CENTER, 100.0, 150.0), rig.t + t))
    assert rig.kinds() == ["geofence_entered"]
    assert rig.events[0][1]["distance_m"] == 50.0
    assert json.loads(state_file.read_text()) == {"yard": True}


def test_fence_added_to_the_config_is_determined_silently(tmp_path: Path) -> None:
    yard = polygon("yard", [(0, 0), (200, 0), (200, 200), (0, 200)])
    (tmp_path / "geofences.json").write_text(json.dumps({"depot": True}))
    rig = Rig(tmp_path, specs=(DEPOT, yard))
    rig.at(-300.0, -300.0)  # far north of both
    assert rig.kinds() == ["geofence_exited"]
    assert rig.events[0][1]["fence"] == "depot"
    assert rig.fences.states() == {"depot": False, "yard": False}


@pytest.mark.parametrize("content", ["{not json", '["depot"]', '{"depot": "yes"}', "\xff"])
def test_broken_state_file_is_counted_logged_and_treated_as_absent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str) -> None:
    state_file = tmp_path / "geofences.json"
    state_file.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="test.geofence"):
        rig = Rig(tmp_path)
    assert rig.counters.get("insights.state_file_errors") == 1
    assert len([r for r in caplog.records if "geofence state file" in r.getMessage()]) == 1
    assert rig.fences.states() == {"depot": None}
    rig.at(-100.0, -100.0)
    assert rig.events == []  # unknown, so no event on first determination
    assert json.loads(state_file.read_text()) == {"depot": False}


def test_unwritable_state_file_is_counted_not_raised(tmp_path: Path) -> None:
    rig = Rig(tmp_path, state_file=tmp_path / "missing-dir" / "geofences.json")
    rig.at(-100.0, -100.0, 100.0, 100.0)
    assert rig.kinds() == ["geofence_entered"]
    assert rig.counters.get("insights.state_file_errors") >= 1


def test_local_frame_is_the_one_the_helpers_invert() -> None:
    # The polygon tests rely on from_xy inverting LocalFrame exactly.
    x, y = LocalFrame(CENTER).to_xy(from_xy(CENTER, 123.0, -45.0))
    assert x == pytest.approx(123.0, abs=1e-6)
    assert y == pytest.approx(-45.0, abs=1e-6)
