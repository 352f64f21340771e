"""Running scenario files, and the whole HIL suite on real SocketCAN vcan.

:func:`run_files` runs scenarios on whatever buses it is given (vcan0, can0,
udp_multicast), against one private mosquitto, and prints each report.
:func:`run_suite` is the HIL suite: every scenario plus the can-utils checks on a
real ``vcan0``, directly where the kernel has SocketCAN, else inside User-Mode
Linux (hil/uml.py), which boots a real kernel with vcan as an ordinary process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import can

from gateway.config.errors import ConfigError
from hil.broker import INSTALL_HINT, Mosquitto, find_mosquitto
from hil.scenario.check import Verdict
from hil.scenario.rig import REFERENCE_PROFILE, RigOptions, run_scenario
from hil.scenario.spec import Scenario, load_scenario

SCENARIO_DIR = Path(__file__).resolve().parents[1] / "scenarios"
VCAN = "vcan0"
PASSED, FAILED, USAGE, NOT_RUN = 0, 1, 2, 125


def scenario_files(paths: Sequence[str]) -> list[Path]:
    """The given files, directories expanded to their ``*.toml``; default: hil/scenarios."""
    out: list[Path] = []
    for raw in paths or [str(SCENARIO_DIR)]:
        p = Path(raw)
        out += sorted(p.glob("*.toml")) if p.is_dir() else [p]
    return out


def load_all(files: Sequence[Path]) -> list[Scenario]:
    """Parse every file first: a typo in the last one should not cost a whole run."""
    scenarios = [load_scenario(f) for f in files]
    seen: dict[str, Path] = {}
    for s in scenarios:
        if s.name in seen:
            raise ConfigError(str(s.file), f"scenario name {s.name!r} is also used by "
                              f"{seen[s.name]}", key="scenario.name")
        seen[s.name] = s.file
    return scenarios


def run_files(files: Sequence[Path], sim_bus: str, gateway_bus: str | None = None, *,
              workdir: Path | None = None, profile: Path = REFERENCE_PROFILE,
              out: TextIO = sys.stdout) -> int:
    """Run the scenarios one after the other; 0 when all pass, 1 when any fails.

    A scenario whose every failure the simulated car may have caused (it stalled long
    enough for a message to look silent before each failed expectation was due, and
    nothing else failed; :mod:`hil.scenario.stalls`) runs once more, in its own work
    directory, and that second run decides. Both reports are printed.
    """
    try:
        scenarios = load_all(files)
    except ConfigError as exc:
        print(f"hil: {exc}", file=out)
        return USAGE
    if find_mosquitto() is None:
        print(f"hil: {INSTALL_HINT}", file=out)
        return NOT_RUN
    verdicts: list[Verdict] = []
    rerun: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ev-gateway-hil-") as tmp:
        base = workdir or Path(tmp)
        shutil.rmtree(base / "broker", ignore_errors=True)  # no retained leftovers
        with Mosquitto(base / "broker") as broker:
            for scenario in scenarios:
                print(f"--- {scenario.name}: {scenario.description} "
                      f"(car on {sim_bus}, gateway on {gateway_bus or sim_bus})",
                      file=out, flush=True)
                options = RigOptions(sim_bus, gateway_bus or sim_bus, base,
                                     (broker.host, broker.port), profile)
                try:
                    verdict, again = run_twice_if_disturbed(
                        functools.partial(_run_one, scenario, options), out)
                except ConfigError as exc:
                    print(f"hil: {exc}", file=out)
                    return USAGE
                if again:
                    rerun.append(scenario.name)
                verdicts.append(verdict)
                print(verdict.report(), file=out, flush=True)
    failed = [v.scenario.name for v in verdicts if not v.passed]
    print(f"hil: {len(verdicts) - len(failed)} of {len(verdicts)} scenarios passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; run twice after the car stalled: {', '.join(rerun)}" if rerun else ""),
          file=out, flush=True)
    return FAILED if failed else PASSED


def run_twice_if_disturbed(run: Callable[[int], Verdict], out: TextIO,
                           ) -> tuple[Verdict, bool]:
    """``run(1)``, and ``run(2)`` when the first failed in a way the rig may have caused
    (its report is printed first). Returns the deciding verdict and whether there was a
    second run."""
    verdict = run(1)
    if verdict.passed or verdict.rerun_because is None:
        return verdict, False
    print(verdict.report(), file=out, flush=True)
    print(f"--- {verdict.scenario.name} again: the car stalled before each failed "
          "expectation was due, so this run may have been the rig's doing", file=out,
          flush=True)
    return run(2), True


def _run_one(scenario: Scenario, options: RigOptions, attempt: int) -> Verdict:
    try:
        return asyncio.run(run_scenario(scenario, dataclasses.replace(options,
                                                                      attempt=attempt)))
    except (OSError, can.CanError, ValueError) as exc:
        # A bus that is down or a typo in --bus: this scenario cannot run, the others may.
        return Verdict(scenario, False, 0.0, [f"  PROBLEM    {exc}"])


def run_on_vcan(files: Sequence[Path], *, with_tools: bool = True,
                out: TextIO = sys.stdout) -> int:
    """The suite on this machine's own ``vcan0``: can-utils checks, then the scenarios."""
    status = PASSED
    if with_tools:
        from hil.tools_check import check_can_utils

        status = check_can_utils(VCAN, out=out)
    return max(status, run_files(files, f"socketcan:{VCAN}", out=out))


def run_suite(files: Sequence[Path], rig: str = "auto", *, with_tools: bool = True,
              out: TextIO = sys.stdout) -> int:
    """The HIL suite on real vcan: here when the kernel has it, else inside UML."""
    from hil import uml

    try:
        scenarios = load_all(files)
    except ConfigError as exc:  # before booting anything
        print(f"hil: {exc}", file=out)
        return USAGE
    direct = uml.has_af_can() and uml.interface_exists(VCAN)
    if rig == "host" or (rig == "auto" and direct):
        if not direct:
            print(f"hil: no {VCAN} here; create it (docs/hil.md) or use --rig uml", file=out)
            return NOT_RUN
        return run_on_vcan(files, with_tools=with_tools, out=out)
    problem = uml.uml_problem()
    if problem is not None:
        print(f"hil: {problem}", file=out)
        return NOT_RUN
    argv = [sys.executable, "-m", "hil", "suite", "--rig", "host",
            *([] if with_tools else ["--no-tools"]), *(str(f.resolve()) for f in files)]
    started = time.monotonic()
    print(f"hil: booting User-Mode Linux for a real SocketCAN {VCAN}", file=out, flush=True)
    try:
        status = uml.run_in_uml(argv, vcan=(VCAN,), out=out, timeout_s=_budget(scenarios))
    except uml.UmlError as exc:
        print(f"hil: {exc}", file=out)
        return NOT_RUN
    print(f"hil: User-Mode Linux run finished with status {status} in "
          f"{time.monotonic() - started:.0f} s", file=out, flush=True)
    return status


def _budget(scenarios: Sequence[Scenario]) -> float:
    """How long the whole run may take before it counts as hung: every scenario at its
    full duration plus a slow gateway start, and the can-utils checks."""
    return 300.0 + sum(s.duration_s + 120.0 for s in scenarios)
