"""Every accuracy a report prints carries its binomial standard error."""

import pytest

from opd.report import pct, standard_error


def test_standard_error_is_binomial():
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.35, 96) == pytest.approx((0.35 * 0.65 / 96) ** 0.5)
    assert standard_error(1.0, 10) == 0.0


def test_pct_shows_one_standard_error_when_the_count_is_known():
    assert pct(0.5, 100) == "50.0% ± 5.0"
    assert pct(0.527, 256) == "52.7% ± 3.1"
    assert pct(0.5) == "50.0%" and pct(None, 10) == "—"
