"""Operator benchmark rounds: the median round is published, ratios are paired per round."""

from __future__ import annotations

from typing import Any

import pytest

from bench import tables
from bench.operator_scale import median_round

pytestmark = pytest.mark.unit


def phase(jobs_s: float, status_s: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs_s": jobs_s, "job_latency_s": {"p50": 1.0, "p99": 2.0}}
    if status_s is not None:
        out["status_s"] = status_s
    return out


def test_the_median_round_is_kept_with_every_rounds_times() -> None:
    kept = median_round([phase(30.0, 31.0), phase(10.0, 11.0), phase(20.0, 21.0)])
    assert kept["jobs_s"] == 20.0
    assert kept["rounds"] == [
        {"jobs_s": 30.0, "status_s": 31.0},
        {"jobs_s": 10.0, "status_s": 11.0},
        {"jobs_s": 20.0, "status_s": 21.0},
    ]
    # an even count keeps the lower middle round
    assert median_round([phase(40.0), phase(10.0)])["jobs_s"] == 10.0


def test_ratios_pair_the_rounds_that_ran_side_by_side() -> None:
    # The machine got busy in round 2: both phases slowed down, their ratio did not.
    operator = median_round([phase(12.0), phase(36.0)])
    full = median_round([phase(10.0), phase(30.0)])
    assert tables.ratio_to(operator, full) == pytest.approx(1.2)
    # the medians' ratio would have mixed rounds: 12 / 10 here only by luck of the lower middle
    assert tables._per_round(operator, full) == "1.20x, 1.20x"


def test_ratio_of_single_round_results_and_of_missing_figures() -> None:
    assert tables.ratio_to(phase(15.0), phase(10.0)) == pytest.approx(1.5)
    assert tables.ratio_to(phase(15.0), {}) is None
    assert tables.ratio_to(phase(15.0), phase(10.0), "status_s") is None
    # rounds of different counts (e.g. an experiment added later) are not paired
    two = median_round([phase(12.0), phase(36.0)])
    three = median_round([phase(10.0), phase(30.0), phase(20.0)])
    assert tables.ratio_to(two, three) == pytest.approx(12.0 / 20.0)
    assert tables._per_round(two, three) == "n/a"
