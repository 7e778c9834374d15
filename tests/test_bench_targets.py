"""The targets table of ``tools/bench.py``: every target of the performance
issue that a run measured is checked against the right peer and bound, a
target whose figures are missing is left out rather than guessed, and a
figure just under its bound is "not met" and prints as such.  A saved run
prints the same tables again (``--report``).

Pure functions over synthetic samples: no fio, no mount.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cowfs_tools.bench import (ACCESSES, FILL, KINDS, MiB, PINNED_PROFILES, PROFILES, Bench,
                               BenchError, Sample, Target, Verdict, load, main, meets, pinned_medians,
                               rows, save, summary, targets_table, verdicts)


def _sample(kind: str, access: str, profile: str, value: float, metric: str,
            us: float | None = None) -> Sample:
    return Sample(kind, access, profile, 1, True, bw_bytes=value if metric == "bw" else 0.0,
                  iops=value if metric == "iops" else 0.0, ios=1000, fio={}, daemon_us_per_io=us)


def _bench(kinds: tuple[str, ...], cowfs_factor: dict[tuple[str, str], float] | None = None) -> Bench:
    """A finished run of every access and profile (one repetition) where
    every target did 1000 MiB/s or 10000 IOPS, except cowfs on the (access,
    profile) pairs of ``cowfs_factor``, which did that times the factor."""
    factors = cowfs_factor or {}

    def figure(kind: str, access: str, profile: str) -> float:
        base = 1000.0 * MiB if "1M" in profile else 10000.0
        return base * (factors.get((access, profile), 1.0) if kind == "cowfs" else 1.0)

    args = argparse.Namespace(kinds=kinds, accesses=ACCESSES, profiles=PROFILES, reps=1,
                              size=1 << 30, runtime=6, dir=Path("/nonexistent"))
    bench = Bench(args, Path("/nonexistent/run-test"))
    bench.fills = [_sample(k, "file", FILL.name, figure(k, "file", FILL.name), "bw") for k in kinds]
    bench.samples = [_sample(k, a, p.name, figure(k, a, p.name), p.metric)
                     for a in ACCESSES for p in PROFILES for k in kinds]
    return bench


def _by(found: list[Verdict]) -> dict[tuple[str, str], Verdict]:
    return {(v.target, v.measure): v for v in found}


def test_every_target_is_checked_once_with_its_bound() -> None:
    """Proves: a run of every target, access and profile yields each of the
    issue's 30 row targets once, with its peer and bound."""
    found = verdicts(rows(_bench(KINDS)), [])
    assert len(_by(found)) == len(found)
    # 19 rows against the ceiling (18 profiles + the fill), qcow2 writes and
    # reads in 3 accesses, sequential floors: 3 on the file, 2 on loop-dio.
    assert len(found) == 19 + 6 + 5
    by = _by(found)
    assert by[("cowfs/ceiling, queue depth 1", "loop rand-read-4K")].bound == 0.9
    assert by[("cowfs/ceiling, queue depth 1", "file first-fill-1M")].bound == 0.9
    assert by[("cowfs/ceiling, queue depth 16", "loop-dio rand-write-4K-QD16")].bound == 0.75
    assert by[("cowfs/qcow2, 4K random writes", "loop rand-write-4K")].bound == 1.1
    assert by[("cowfs/qcow2, 4K random reads", "file rand-read-4K")].bound == 1.0
    assert by[("cowfs/qcow2, 4K random reads", "loop-dio rand-read-4K")].bound == 0.9
    floors = {v.measure for v in found if v.target == "sequential MiB/s"}
    assert floors == {"file first-fill-1M", "file seq-write-1M", "file seq-read-1M",
                      "loop-dio seq-write-1M", "loop-dio seq-read-1M"}
    # Every peer equal to cowfs: ratios 1.0, floors 1000 MiB/s.
    assert all(v.value == 1.0 for v in found if v.target != "sequential MiB/s")
    assert all(v.value == 1000.0 for v in found if v.target == "sequential MiB/s")
    assert not by[("cowfs/qcow2, 4K random writes", "file rand-write-4K")].met
    assert by[("cowfs/qcow2, 4K random reads", "file rand-read-4K")].met


def test_a_figure_at_the_bound_meets_it_and_one_just_under_does_not() -> None:
    """Proves: the comparison is exact (at the bound: met; 0.7499 against
    0.75: not met) and the table prints the miss with enough digits."""
    by = _by(verdicts(rows(_bench(KINDS, {("file", "rand-write-4K-QD16"): 0.75,
                                          ("loop", "rand-write-4K-QD16"): 0.7499,
                                          ("file", "seq-read-1M"): 0.5,
                                          ("loop-dio", "seq-read-1M"): 0.4999})), []))
    assert by[("cowfs/ceiling, queue depth 16", "file rand-write-4K-QD16")].met
    assert not by[("cowfs/ceiling, queue depth 16", "loop rand-write-4K-QD16")].met
    assert by[("sequential MiB/s", "file seq-read-1M")].met
    assert not by[("sequential MiB/s", "loop-dio seq-read-1M")].met
    # The miss prints as a miss, not as the bound rounded.
    line = next(l for l in targets_table([by[("cowfs/ceiling, queue depth 16",
                                                 "loop rand-write-4K-QD16")]]).splitlines()
                if "loop rand-write-4K-QD16" in l)
    assert "0.7499" in line and "**not met**" in line


def test_pinned_cpu_is_an_upper_bound() -> None:
    """Proves: the pinned CPU ratio is met at or under 1.5x the ceiling's,
    not over it, and a target without a daemon figure is skipped."""
    pinned = [_sample("cowfs", "file", PINNED_PROFILES[0], 1, "iops", us=24.0),
              _sample("ceiling", "file", PINNED_PROFILES[0], 1, "iops", us=16.0),
              _sample("cowfs", "file", PINNED_PROFILES[1], 1, "iops", us=24.1),
              _sample("ceiling", "file", PINNED_PROFILES[1], 1, "iops", us=16.0),
              _sample("plain", "file", PINNED_PROFILES[1], 1, "iops", us=None)]
    found = verdicts([], pinned)
    assert [(v.measure, v.at_most, v.met) for v in found] == [
        (f"file {PINNED_PROFILES[0]}", True, True), (f"file {PINNED_PROFILES[1]}", True, False)]
    assert meets(1.5, 1.5, at_most=True) and not meets(1.51, 1.5, at_most=True)


def test_pinned_runs_are_judged_by_their_medians() -> None:
    """Proves: with several pinned runs, the verdict and the table use the
    median of each target's runs, so that one slow run does not decide."""
    pinned = []
    for rep, (mine, theirs) in enumerate(((24.0, 20.0), (60.0, 21.0), (25.0, 19.0)), 1):
        for name in PINNED_PROFILES:
            pinned += [replace(_sample("cowfs", "file", name, 10000 * rep, "iops", us=mine), rep=rep),
                       replace(_sample("ceiling", "file", name, 30000, "iops", us=theirs), rep=rep)]
    assert pinned_medians(pinned)[(PINNED_PROFILES[0], "cowfs")] == (20000, 25.0)
    found = verdicts([], pinned)
    assert [round(v.value, 3) for v in found] == [1.25, 1.25] and all(v.met for v in found)
    bench = _bench(("cowfs", "ceiling"))
    bench.pinned, bench.pin_cpu = pinned, 1
    text = summary(bench, "fio-test")
    assert "median of 3 runs" in text
    assert f"| {PINNED_PROFILES[0]} | 20000 | 25 | 30000 | 20 | 1.25 |" in text


def test_targets_without_their_peer_are_left_out() -> None:
    """Proves: a run without the ceiling and qcow2 checks only the
    sequential floors, and does not fail on the missing peers."""
    bench = _bench(("cowfs", "plain"))
    found = verdicts(rows(bench), [_sample("cowfs", "file", PINNED_PROFILES[0], 1, "iops", us=20.0)])
    # No ceiling and no qcow2: only the sequential floors remain.
    assert {v.target for v in found} == {"sequential MiB/s"}
    assert len(found) == 5


def test_summary_ends_with_the_targets_and_the_count_met() -> None:
    """Proves: the printed summary ends with the targets table and the
    count of targets met."""
    bench = _bench(KINDS, {("file", "rand-read-4K"): 0.5})
    text = summary(bench, "fio-test")
    tail = text.split("Targets of the performance issue", 1)[1]
    assert "| cowfs/ceiling, queue depth 1 | file rand-read-4K | 0.500 | >= 0.9 | **not met** |" in tail
    # Misses: file rand-read vs ceiling and vs qcow2, and the three qcow2
    # write targets (peers equal to cowfs: 1.0 < 1.1).
    assert tail.rstrip().endswith("25 of 30 targets met in this run.")


def test_a_saved_run_reports_the_same_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Proves: what save() wrote loads back into the same tables, and
    ``--report`` prints them with the targets."""
    bench = _bench(KINDS, {("loop", "rand-write-4K"): 0.8})
    bench.args.dir, bench.tmp = tmp_path, tmp_path / "run-test"
    bench.targets[("cowfs", "file")] = Target("cowfs", "file", "/mnt/bench.img", 1 << 30)
    bench.pinned = [_sample(k, "file", name, 30000, "iops", us=None if k == "plain" else us)
                    for name in PINNED_PROFILES for k, us in zip(KINDS, (25.0, 20.0, 16.0, 0.0))]
    bench.pin_cpu = 1
    path = save(bench, "2026-12-06T13:00:00+0000", "fio-test")
    loaded, fio_version = load(path)
    assert fio_version == "fio-test"
    assert summary(loaded, fio_version) == summary(bench, "fio-test")
    assert main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| cowfs/ceiling, queue depth 1 | loop rand-write-4K | 0.800 | >= 0.9 | **not met** |" in out
    assert "| pinned CPU per request, cowfs/ceiling | file rand-read-4K | 1.562 | <= 1.5 | **not met** |" in out


def test_report_refuses_a_file_that_is_not_a_run(tmp_path: Path) -> None:
    """Proves: a JSON file that is not a run, or no file, is refused with
    BenchError and exit status 1."""
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"args": {}}))
    with pytest.raises(BenchError, match="not the raw results of a bench run"):
        load(bad)
    assert main(["--report", str(bad)]) == 1
    assert main(["--report", str(tmp_path / "missing.json")]) == 1
