"""``step_record`` at its own interface: a rank's figures from a hand-made batch, and the step's line from
every rank's, computed here apart (the KL of the student's own rows only, the FLOPs of the step's kind)."""

from __future__ import annotations

import pytest
import torch

from opd.config import load_config
from opd.flops import ModelShape, StepKind, mixed_step_flops, step_flops
from opd.rollouts import OffPolicyRows, pack_pairs
from opd.step_record import rank_figures, step_record

STUDENT, TEACHER = ModelShape(1000, 16, 16, 2, 50), ModelShape(8000, 32, 32, 4, 50)
SECONDS = {"sample": 1.0, "score": 0.5, "train": 2.0}


class View:
    """What ``step_record`` reads of the teacher view: its shape, one teacher."""

    shape, several = TEACHER, False


def rows(on_policy: list[bool] | None = None):
    batch = pack_pairs([[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]], [[6, 7], [8], [9, 9, 9], [6]], 0)
    batch.prompt_index = torch.tensor([0, 0, 1, 1])
    mask = batch.completion_mask
    batch.sampler_logprobs = -0.5 * mask
    batch.teacher_logprobs = -torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None] * mask
    batch.rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    batch.teacher_names = ["", "", "", ""]
    if on_policy is not None:
        batch.on_policy = torch.tensor(on_policy)
    return batch


def test_a_ranks_figures_of_its_rows():
    figures = rank_figures(rows(), None, several=False)
    assert figures["completion_lengths"] == [2, 1, 3, 1] and figures["prompt_lengths"] == [2, 2, 3, 3]
    assert figures["on_policy"] == [True] * 4  # no on_policy field: every row is the student's
    kl = [(-0.5 + t) * n for t, n in zip([1, 2, 3, 4], [2, 1, 3, 1], strict=True)]  # sum of (s - t) per row
    assert figures["kl_sum"] == pytest.approx(sum(kl)) and figures["kl_tokens"] == 7


def test_the_logged_kl_and_reward_are_the_students_own_rows():
    config = load_config(None, ["samples_per_prompt=2", "kl=full", "lmbda=0.5"])
    batch = rows([True, True, False, False])
    batch.offpolicy = OffPolicyRows(1, False)
    ranks = [rank_figures(batch, None, several=False)]
    record = step_record(ranks, config, STUDENT, View(), StepKind.DISTIL, 0, 1.0, 0.1, 1e-3, {}, SECONDS)
    assert record["teacher_kl"] == pytest.approx(((-0.5 + 1) * 2 + (-0.5 + 2) * 1) / 3)
    assert record["train_reward"] == 0.5 and record["offpolicy_rows"] == 2
    want = mixed_step_flops(STUDENT, TEACHER, [2, 2, 3, 3], [2, 1, 3, 1], [True, True, False, False], 2, 1, False)
    assert record["student_flops"] == want["student_flops"] and record["teacher_flops"] == want["teacher_flops"]


@pytest.mark.parametrize("kind", list(StepKind))
def test_the_flops_follow_the_kind_of_step(kind):
    config = load_config(None, ["samples_per_prompt=2", "kl=sampled"])
    ranks = [rank_figures(rows(), None, several=False)]
    record = step_record(ranks, config, STUDENT, View(), kind, 0, 1.0, 0.1, 1e-3, {}, SECONDS)
    group = 1 if kind == StepKind.GIVEN else 2  # given pairs share no prompt
    want = step_flops(STUDENT, TEACHER, [2, 2, 3, 3], [2, 1, 3, 1], kind, group)
    assert (record["student_flops"], record["teacher_flops"]) == (want["student_flops"], want["teacher_flops"])
    assert record["step"] == 1 and record["completion_tokens"] == 7 and record["sample_seconds"] == 1.0


def test_two_ranks_make_one_record():
    config = load_config(None, ["samples_per_prompt=2", "kl=sampled"])
    whole = rows()
    halves = [rank_figures(whole.select(slice(0, 2)), None, False), rank_figures(whole.select(slice(2, 4)), None,
                                                                                  False)]
    one = step_record([rank_figures(whole, None, False)], config, STUDENT, View(), StepKind.DISTIL, 0, 1.0, 0.1,
                      1e-3, {}, SECONDS)
    two = step_record(halves, config, STUDENT, View(), StepKind.DISTIL, 0, 1.0, 0.1, 1e-3, {}, SECONDS)
    assert one == two


@pytest.mark.parametrize("kind", [StepKind.DISTIL, StepKind.RL, StepKind.TEACHER_SAMPLES])
def test_the_environments_tokens_are_counted_in_their_own_row(kind):
    """A token after the prompt that is not trained (a tool's result, ``sample_noise``'s replacement) is read by
    every pass as part of its own row, whichever row of the prompt's group it is in; only the logits skip it."""
    config = load_config(None, ["samples_per_prompt=2", "kl=sampled"])

    def record_with_env_token(row: int, column: int):
        batch = rows()
        batch.completion_mask[row, column] = 0  # the environment's token: attended, not trained
        figures = rank_figures(batch, None, several=False)
        return figures, step_record([figures], config, STUDENT, View(), kind, 0, 1.0, 0.1, 1e-3, {}, SECONDS)

    first, in_first = record_with_env_token(2, 4)  # the middle 9 of the group's first row
    second, in_second = record_with_env_token(3, 3)  # a 6 written by the environment in the group's second row
    assert first["completion_lengths"] == [2, 1, 2, 1] and first["written_lengths"] == [2, 1, 3, 1]
    assert first["prompt_lengths"] == second["prompt_lengths"] == [2, 2, 3, 3]
    want = step_flops(STUDENT, TEACHER, [2, 2, 3, 3], [2, 1, 3, 1], kind, 2, trained_tokens=6)
    assert (in_first["student_flops"], in_first["teacher_flops"]) == (want["student_flops"], want["teacher_flops"])
    assert in_first["completion_tokens"] == 6
    # the same token count after each prompt, so the same compute to within the attention's lengths
    assert in_second["student_flops"] == pytest.approx(in_first["student_flops"], rel=0.05)
    trained_all = step_flops(STUDENT, TEACHER, [2, 2, 3, 3], [2, 1, 3, 1], kind, 2)
    assert in_first["student_flops"] < trained_all["student_flops"]  # fewer logits, nothing else
