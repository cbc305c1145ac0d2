"""The learning-rate schedule against its formulas, point by point."""

import math

import pytest

from opd.config import load_config
from opd.errors import OpdError
from opd.schedule import lr_factor


def test_warm_up_then_each_decay_against_its_formula():
    warmup, steps, floor = 4, 14, 0.2
    for k in range(warmup):
        for schedule in ("constant", "linear", "cosine"):
            assert lr_factor(k, warmup, steps, schedule, floor) == (k + 1) / warmup
    for k in range(warmup - 1, steps):
        p = (k - warmup + 1) / (steps - warmup)
        assert lr_factor(k, warmup, steps, "constant", floor) == 1.0
        assert lr_factor(k, warmup, steps, "linear", floor) == pytest.approx(floor + (1 - floor) * (1 - p))
        assert lr_factor(k, warmup, steps, "cosine", floor) == pytest.approx(
            floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)
    for schedule in ("linear", "cosine"):  # the peak right after the warm-up, the floor at the last update
        assert lr_factor(warmup - 1, warmup, steps, schedule, floor) == 1.0
        assert lr_factor(steps - 1, warmup, steps, schedule, floor) == pytest.approx(floor)
        assert lr_factor(steps + 5, warmup, steps, schedule, floor) == pytest.approx(floor)  # past the end: held
    # cosine sits above linear in the first half of the decay, below it in the second
    assert lr_factor(6, warmup, steps, "cosine") > lr_factor(6, warmup, steps, "linear")
    assert lr_factor(11, warmup, steps, "cosine") < lr_factor(11, warmup, steps, "linear")


def test_no_warm_up_and_a_one_step_decay_stay_finite():
    assert lr_factor(0, 0, 1, "cosine", 0.5) == 1.0  # warmup 0 counts as 1: the first update at lr
    assert lr_factor(0, 1, 1, "linear") == 1.0


@pytest.mark.parametrize("override, message", [("lr_schedule=exponential", "lr_schedule='exponential' must be one of"),
                                                ("min_lr_ratio=1.5", "min_lr_ratio=1.5 must be a finite number in")])
def test_a_bad_schedule_is_refused(override, message):
    with pytest.raises(OpdError, match=message):
        load_config(None, [override])
