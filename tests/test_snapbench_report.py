"""The snapbench table: which samples each ratio is taken from.

No benchmark runs here: a Run is filled with made-up samples and the rows
are computed from them, as ``tools/snapbench.py`` does at the end of a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfs_tools.snapbench import Row, Run, parse_args, rows


def _run(samples: dict[str, dict[str, list[float]]]) -> Run:
    r = Run(parse_args([]), Path("/nonexistent"))
    for side, figures in samples.items():
        for key, values in figures.items():
            for v in values:
                r.add(side, key, v)
    return r


def _row(table: list[Row], start: str) -> Row:
    found = [row for row in table if row.measure.startswith(start)]
    assert len(found) == 1, [row.measure for row in table]
    return found[0]


def test_cowfs_mappings_ratio_is_against_the_reference_timed_beside_it() -> None:
    # Part 2's 1 GiB clones ran on a fast stretch of the host (0.5 ms), the
    # scattered ones and their reference on a slow one (1.3 and 1.2 ms):
    # against part 2 the ratio would be 2.6 and fail.
    r = _run({
        "cowfs": {"clone_small_s": [0.0005] * 3, "clone_scattered_s": [0.0013] * 3,
                  "clone_scattered_reference_s": [0.0012, 0.0011, 0.0013]},
        "qcow2": {"clone_small_s": [0.020] * 3, "clone_scattered_s": [0.030] * 3},
    })
    table = rows(r)
    ratio = _row(table, "clone ratio 2,097,152 mappings")
    assert ratio.cowfs == pytest.approx(1.3 / 1.2)
    assert ratio.qcow2 == pytest.approx(1.5)          # qcow2 has no reference: part 2's figure
    assert ratio.met() == "met"
    refs = [row for row in table if row.measure.startswith("clone, 1 GiB written, timed in turn")]
    assert [row.cowfs for row in refs] == [pytest.approx(1.2)]
    assert not [row for row in table if "8 GiB" in row.measure]   # no samples, no row


def test_cowfs_8g_ratio_is_against_its_own_reference() -> None:
    # Each figure has its reference: the 8 GiB one 0.9 ms against 1.0 ms
    # timed in turn (0.9), while the scattered reference (2.0 ms) and part
    # 2's 1 GiB figure (0.5 ms) must not be used for it.
    r = _run({"cowfs": {"snapshot_small_s": [0.0005] * 3, "snapshot_large_s": [0.0009] * 3,
                        "snapshot_large_reference_s": [0.001] * 3,
                        "snapshot_scattered_s": [0.0011] * 3,
                        "snapshot_scattered_reference_s": [0.002] * 3}})
    table = rows(r)
    assert _row(table, "snapshot ratio 8 GiB / 1 GiB").cowfs == pytest.approx(0.9)
    assert _row(table, "snapshot ratio 2,097,152 mappings").cowfs == pytest.approx(0.55)
    refs = [row.cowfs for row in table if "timed in turn" in row.measure]
    assert refs == [pytest.approx(1.0), pytest.approx(2.0)]


def test_a_slow_scattered_clone_against_its_reference_is_not_met() -> None:
    r = _run({"cowfs": {"clone_small_s": [0.002] * 3, "clone_scattered_s": [0.0016] * 3,
                        "clone_scattered_reference_s": [0.001] * 3}})
    ratio = _row(rows(r), "clone ratio 2,097,152 mappings")
    assert ratio.cowfs == pytest.approx(1.6)
    assert ratio.met() == "**not met**"
