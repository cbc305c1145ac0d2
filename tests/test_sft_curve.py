"""SFT's data curve: the weighted log-linear fit, its uncertainty and its extrapolation, on synthetic
curves whose truth is known."""

import math
import random

import pytest

from opd.experiments.sft_curve import extrapolate, fit_summary, log_linear_fit, sft_steps
from opd.models import OpdError

SIZES = [4096, 8192, 16384, 32768]


def test_an_exact_line_is_recovered_and_extrapolated_to_its_target():
    a, b = -0.5, 0.25  # 25 points per tenfold data
    fit = log_linear_fit(SIZES, [a + b * math.log10(d) for d in SIZES], [0.03] * 4)
    assert fit.intercept == pytest.approx(a) and fit.slope == pytest.approx(b) and fit.points == 4
    reach = extrapolate(fit, 0.9)
    assert reach["examples"] == pytest.approx(10 ** ((0.9 - a) / b))
    assert reach["low"] < reach["examples"] < reach["high"]
    assert fit.predict(reach["examples"]) == pytest.approx(0.9)


def test_a_point_with_a_large_error_barely_moves_the_fit():
    ys = [0.4 + 0.2 * math.log10(d / 4096) for d in SIZES]
    outlier = ys[:3] + [0.0]
    weighted = log_linear_fit(SIZES, outlier, [0.01, 0.01, 0.01, 10.0])
    assert weighted.slope == pytest.approx(0.2, abs=1e-3)
    unweighted = log_linear_fit(SIZES, outlier, [0.01] * 4)
    assert unweighted.slope < 0.1


def test_the_extrapolation_range_covers_the_truth_about_one_standard_error_of_the_time():
    """Binomial noise on a known log-linear curve, 300 replicates: the fitted slope's standard error
    matches the slope's spread, and the one-SE range of the extrapolated size holds the true size in
    about 68% of replicates."""
    a, b, n, target = 0.3, 0.15, 256, 0.85
    truth = 10 ** ((target - a) / b)
    rng = random.Random(0)
    slopes, ses, covered = [], [], 0
    for _ in range(300):
        ys = [sum(rng.random() < a + b * math.log10(d) for _ in range(n)) / n for d in SIZES]
        errors = [math.sqrt(y * (1 - y) / n) for y in ys]
        fit = log_linear_fit(SIZES, ys, errors)
        slopes.append(fit.slope)
        ses.append(math.sqrt(fit.covariance[1][1]))
        reach = extrapolate(fit, target)
        covered += reach is not None and reach["low"] <= truth <= reach["high"]
    mean = sum(slopes) / len(slopes)
    spread = math.sqrt(sum((s - mean) ** 2 for s in slopes) / (len(slopes) - 1))
    assert mean == pytest.approx(b, abs=0.01)
    assert 0.75 < (sum(ses) / len(ses)) / spread < 1.6  # the covariance is scaled up, never down
    assert 0.55 < covered / 300 < 0.85


def test_a_flat_or_falling_curve_has_no_extrapolation_and_one_size_no_fit():
    assert extrapolate(log_linear_fit(SIZES, [0.5, 0.49, 0.48, 0.47], [0.03] * 4), 0.9) is None
    with pytest.raises(OpdError, match="two different"):
        log_linear_fit([4096, 4096], [0.5, 0.6], [0.03, 0.03])


def test_fit_summary_scales_flops_with_the_data_and_marks_extrapolation():
    points = [{"examples": d, "accuracy": 0.4 + 0.1 * math.log2(d / 4096), "student_flops": 3.0 * d,
               "teacher_sampling_flops": 2.0 * d} for d in SIZES]
    summary = fit_summary(points, [("inside", 0.55), ("beyond", 0.9), ("below", 0.3)], n=256)
    inside, beyond, below = summary["levels"]
    assert not inside["extrapolated"] and beyond["extrapolated"] and below["extrapolated"]
    assert below["examples"] == pytest.approx(4096 / 2, rel=1e-6)
    assert beyond["examples"] == pytest.approx(4096 * 2 ** 5, rel=1e-6)  # 0.1 per doubling, 0.5 more
    assert beyond["student_flops"] == pytest.approx(3.0 * beyond["examples"])
    assert beyond["teacher_flops"] == pytest.approx(2.0 * beyond["examples"])


def test_sft_steps_covers_the_epochs():
    assert sft_steps(4096, 2, 128) == 64 and sft_steps(100, 1, 128) == 1 and sft_steps(129, 1, 128) == 2
