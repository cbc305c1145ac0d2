"""SFT's data curve: the weighted log-linear fit, its uncertainty and its extrapolation, on synthetic
curves whose truth is known."""

import math
import random

import pytest

from opd.errors import OpdError
from opd.experiments.sft_curve import LogLinearFit, extrapolate, fit_summary, log_linear_fit, sft_steps

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
    with pytest.raises(OpdError, match="^a log-linear fit needs at least two different dataset sizes$"):
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
    levels = [(r["level"], r["accuracy"]) for r in summary["levels"]]
    assert levels == [("inside", 0.55), ("beyond", 0.9), ("below", 0.3)]
    assert summary["per_example_student_flops"] == 3.0 and summary["per_example_teacher_flops"] == 2.0
    assert summary["fit"]["slope"] == pytest.approx(0.1 / math.log10(2))


def test_sft_steps_covers_the_epochs():
    assert sft_steps(4096, 2, 128) == 64 and sft_steps(100, 1, 128) == 1 and sft_steps(129, 1, 128) == 2


def weighted_line(xs, ys, errors):
    """Weighted least squares of y = a + b x written out (Numerical Recipes 15.2), in pure Python."""
    w = [1 / e**2 for e in errors]
    s, sx = sum(w), sum(wi * x for wi, x in zip(w, xs, strict=True))
    sy = sum(wi * y for wi, y in zip(w, ys, strict=True))
    sxx = sum(wi * x * x for wi, x in zip(w, xs, strict=True))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys, strict=True))
    d = s * sxx - sx * sx
    a, b = (sxx * sy - sx * sxy) / d, (s * sxy - sx * sy) / d
    return a, b, sxx / d, -sx / d, s / d, sum(wi * (y - a - b * x) ** 2 for wi, x, y in zip(w, xs, ys, strict=True))


@pytest.mark.parametrize("ys, errors", [
    ([0.40, 0.52], [0.03, 0.02]),  # two points: no scatter to scale by
    ([0.40, 0.60, 0.50, 0.75], [0.03, 0.03, 0.02, 0.02]),  # scatter far beyond the errors: covariance scaled up
    ([0.40, 0.60, 0.50], [0.03, 0.03, 0.02]),  # three points, the fewest with a scatter to scale by
    ([0.400, 0.452, 0.500, 0.551], [0.03, 0.03, 0.02, 0.02]),  # scatter inside the errors: not scaled down
])
def test_the_fit_and_its_covariance_match_the_written_out_formulas(ys, errors):
    sizes = SIZES[: len(ys)]
    xs = [math.log10(d) for d in sizes]
    a, b, var_a, cov_ab, var_b, chi2 = weighted_line(xs, ys, errors)
    scale = max(chi2 / (len(xs) - 2), 1.0) if len(xs) > 2 else 1.0
    fit = log_linear_fit(sizes, ys, errors)
    assert fit.intercept == pytest.approx(a, rel=1e-9) and fit.slope == pytest.approx(b, rel=1e-9)
    assert fit.covariance[0][0] == pytest.approx(var_a * scale, rel=1e-9)
    assert fit.covariance[0][1] == pytest.approx(cov_ab * scale, rel=1e-9)
    assert fit.covariance[1][1] == pytest.approx(var_b * scale, rel=1e-9)
    assert fit.points == len(xs)


def test_the_extrapolation_range_is_the_delta_method_in_log_space():
    fit = log_linear_fit(SIZES[:3], [0.40, 0.55, 0.62], [0.03, 0.03, 0.02])
    reach = extrapolate(fit, 0.8)
    x = (0.8 - fit.intercept) / fit.slope
    (var_a, cov_ab), (_, var_b) = fit.covariance
    se = math.sqrt(var_a + 2 * x * cov_ab + x * x * var_b) / fit.slope
    assert reach["log10_se"] == pytest.approx(se, rel=1e-9)
    assert reach["low"] == pytest.approx(10 ** (x - se), rel=1e-9)
    assert reach["high"] == pytest.approx(10 ** (x + se), rel=1e-9)
    assert extrapolate(LogLinearFit(0.5, 0.0, [[1e-3, 0.0], [0.0, 1e-4]], 4), 0.9) is None  # exactly flat: never
    nearly_flat = extrapolate(log_linear_fit(SIZES, [0.5, 0.5, 0.5, 0.5001], [0.03] * 4), 0.99)
    assert nearly_flat["examples"] == math.inf  # past the float range: infinite, not an OverflowError
