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
                  "clone_reference_s": [0.0012, 0.0011, 0.0013]},
        "qcow2": {"clone_small_s": [0.020] * 3, "clone_scattered_s": [0.030] * 3},
    })
    table = rows(r)
    ratio = _row(table, "clone ratio 2,097,152 mappings")
    assert ratio.cowfs == pytest.approx(1.3 / 1.2)
    assert ratio.qcow2 == pytest.approx(1.5)          # qcow2 has no reference: part 2's figure
    assert ratio.met() == "met"
    assert _row(table, "clone, 1 GiB written, timed in turn with the line above").cowfs == pytest.approx(1.2)
    assert not [row for row in table if "8 GiB" in row.measure]   # no samples, no row


def test_a_slow_scattered_clone_against_its_reference_is_not_met() -> None:
    r = _run({"cowfs": {"clone_small_s": [0.002] * 3, "clone_scattered_s": [0.0016] * 3,
                        "clone_reference_s": [0.001] * 3}})
    ratio = _row(rows(r), "clone ratio 2,097,152 mappings")
    assert ratio.cowfs == pytest.approx(1.6)
    assert ratio.met() == "**not met**"
