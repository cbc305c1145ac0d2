"""``objective`` at its own interface: what a run asks of the teacher, the kind of step its FLOPs count,
the resolution of ``kl=auto``, and the advantages and loss of a hand-made batch (computed here apart)."""

from __future__ import annotations

import pytest
import torch

from opd.config import load_config
from opd.flops import StepKind
from opd.losses import group_centred_rewards
from opd.objective import Grading, Objective, kl_of, step_kind
from opd.rollouts import pack_pairs
from opd.scoring import token_logprobs
from opd.teachers import LocalTeacher, TeacherView


def config(**values):
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.parametrize(("values", "asked"), [
    ({"kl": "sampled"}, Grading()),
    ({"kl": "full"}, Grading(hidden=True)),
    ({"kl": "topk", "teacher_topk": 7}, Grading(topk=7)),
    ({"kl": "sampled", "sample_batch": 5, "samples_per_prompt": 2}, Grading(rows=4)),  # whole prompts' samples
    ({"kl": "full", "method": "opd+rl"}, Grading(hidden=True)),
    ({"method": "rl", "kl": "sampled"}, None),
    ({"method": "sft", "kl": "sampled"}, None),
])
def test_what_a_step_asks_of_the_teacher(values, asked):
    assert Objective.of(config(**values), 100).grading == asked


@pytest.mark.parametrize(("values", "kind"), [
    ({"method": "opd"}, StepKind.DISTIL), ({"method": "opd+rl"}, StepKind.DISTIL), ({"method": "rl"}, StepKind.RL),
    ({"method": "sft"}, StepKind.TEACHER_SAMPLES), ({"method": "midtrain", "docs": "x.jsonl"}, StepKind.GIVEN),
])
def test_the_kind_of_step_its_flops_count(values, kind):
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()] + ["kl=sampled"])
    assert step_kind(cfg) == kind and Objective.of(cfg, 10).kind == kind


def test_given_sft_data_is_a_step_on_given_tokens():
    cfg = config(method="sft", kl="sampled")
    cfg.sft_data = "pairs.jsonl"
    assert step_kind(cfg) == StepKind.GIVEN


def test_kl_auto_resolved_from_the_config_and_the_tokenizers():
    assert kl_of(config(), aligned=False) == "full"
    assert kl_of(config(), aligned=True) == "sampled"
    assert kl_of(config(teacher="http://127.0.0.1:9"), aligned=False) == "topk"
    assert kl_of(config(teachers="a=embedded:teacher,b=embedded:teacher"), aligned=False) == "topk"
    assert kl_of(config(kl="sampled", teacher="http://127.0.0.1:9"), aligned=False) == "sampled"  # asked: kept


def batch(tokenizer):
    rows = pack_pairs([[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], [[10, 11, 12], [13], [14, 15], [16, 17, 18]],
                      tokenizer.pad_token_id)
    rows.prompt_index = torch.tensor([0, 0, 1, 1])
    mask = rows.completion_mask
    generator = torch.Generator().manual_seed(3)
    rows.sampler_logprobs = -torch.rand(mask.shape, generator=generator, dtype=torch.float32) * mask
    rows.teacher_logprobs = -torch.rand(mask.shape, generator=generator, dtype=torch.float32) * mask
    rows.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return rows


def test_advantages_of_each_method_on_a_hand_made_batch(tokenizer):
    rows = batch(tokenizer)
    mask = rows.completion_mask
    kl = -(rows.sampler_logprobs - rows.teacher_logprobs) * mask  # the negative sampled reverse KL, per token
    reward = torch.tensor([0.5, -0.5, 0.0, 0.0])[:, None] * mask  # each group's reward less its mean
    torch.testing.assert_close(Objective.of(config(kl="sampled", kl_coef=2.0), 99).advantages(rows), 2.0 * kl)
    torch.testing.assert_close(Objective.of(config(method="rl", kl="sampled"), 99).advantages(rows),
                               group_centred_rewards(rows.rewards, rows.prompt_index)[:, None] * mask)
    torch.testing.assert_close(Objective.of(config(method="rl", kl="sampled"), 99).advantages(rows), reward)
    torch.testing.assert_close(Objective.of(config(method="opd+rl", kl="sampled", reward_coef=3.0), 99)
                               .advantages(rows), kl + 3.0 * reward)
    assert not Objective.of(config(kl="full"), 99).advantages(rows).any()  # the divergence is the loss itself


def test_the_loss_at_the_sampling_policy_is_minus_the_mean_advantage(tokenizer, tiny_model):
    """At the sampling policy the importance ratio is 1, so the IS loss is ``-sum(A) / N``; SFT's loss is
    the mean negative log-likelihood of the given tokens."""
    rows = batch(tokenizer)
    vocab = len(tokenizer)
    objective = Objective.of(config(kl="sampled"), vocab)
    with torch.no_grad():
        rows.sampler_logprobs = token_logprobs(tiny_model, rows, vocab) * rows.completion_mask
    rows.advantages = objective.advantages(rows)
    count = float(rows.completion_mask.sum())
    loss = objective.loss(tiny_model, rows, count)
    torch.testing.assert_close(loss, -(rows.advantages * rows.completion_mask).sum() / count)
    sft = Objective.of(config(method="sft", kl="sampled"), vocab).loss(tiny_model, rows, count)
    torch.testing.assert_close(sft, -rows.sampler_logprobs.sum() / count)


def test_the_teacher_signal_takes_what_the_loss_needs(tokenizer, tiny_model):
    view = TeacherView(LocalTeacher(tiny_model, len(tokenizer)), tokenizer)
    rows = batch(tokenizer)
    messages = [[{"role": "user", "content": "x"}]] * 4
    scored = view.score(rows, messages, hidden=True, topk=3)
    full = Objective.of(config(kl="full"), len(tokenizer)).signal(scored, view)
    assert full.head is view.head and full.hidden is scored.hidden and full.topk_ids is None
    top = Objective.of(config(kl="topk"), len(tokenizer)).signal(scored, view)
    assert top.head is None and top.topk_ids is scored.topk[0] and top.topk_logprobs is scored.topk[1]
    assert Objective.of(config(kl="sampled"), len(tokenizer)).signal(scored, view) is None
