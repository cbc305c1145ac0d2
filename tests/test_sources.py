"""``samplers.sources`` at its own interface: each source's rows for a step, built from plain arguments (no
session, no trainer): which conversation each row answers, its reward, GKD's on-/off-policy split, the
data pairs' epochs, and the same rows again for the same (seed, step)."""

from __future__ import annotations

import torch

from opd import distributed
from opd.evaluation import completions_text
from opd.rollouts import OffPolicyRows
from opd.samplers.sources import (
    DataPairs,
    Draw,
    InProcess,
    Mixed,
    OffPolicy,
    Prompter,
    Rewards,
    RolloutSource,
    Sampled,
    StepPrompts,
)
from opd.tasks import ArithmeticTask

CPU = torch.device("cpu")
ONE = distributed.Dist()


def parts(tokenizer, model, share: float = 1.0, per_prompt: int = 2, seed: int = 0):
    task = ArithmeticTask(operators=2)
    prompter = Prompter(tokenizer, max_prompt_tokens=200)
    draw = Draw(samples_per_prompt=per_prompt, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=seed)
    prompts = StepPrompts(task, prompts_per_step=4, train_prompts=0, seed=seed, dist=ONE, on_policy_share=share)
    rewards = Rewards(tokenizer, task)
    return task, prompter, draw, prompts, rewards, InProcess(model, prompter, draw, len(tokenizer), CPU, 0)


def test_sampled_rows_answer_their_prompts_in_order_with_their_rewards(tokenizer, tiny_model):
    task, prompter, draw, prompts, rewards, sampler = parts(tokenizer, tiny_model)
    rows = Sampled(prompts, sampler, rewards).rollouts(3)
    examples = prompts.split(3)[0]
    assert rows.tokens.shape[0] == 8 and rows.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rows.messages == [ex.messages for ex in examples for _ in range(2)]
    assert rows.teacher_messages == rows.messages and rows.teacher_names == [""] * 8
    for row, ex in enumerate(rows.messages):  # each row's prompt is its conversation's rendering
        ids = rows.tokens[row][rows.attention_mask[row] > 0].tolist()
        assert ids[: len(prompter.ids(ex))] == prompter.ids(ex)
    texts = completions_text(tokenizer, rows.completion_ids())
    assert rows.rewards.tolist() == [task.reward(t, examples[i // 2]) for i, t in enumerate(texts)]
    assert rows.on_policy is None and rows.offpolicy is None and rows.turns is None


def test_the_same_seed_and_step_give_the_same_rows(tokenizer, tiny_model):
    def source():
        _, _, _, prompts, rewards, sampler = parts(tokenizer, tiny_model)
        return Sampled(prompts, sampler, rewards)

    first, again, other = source().rollouts(2), source().rollouts(2), source().rollouts(3)
    assert torch.equal(first.tokens, again.tokens) and first.messages == again.messages
    assert first.messages != other.messages


def test_gkd_mix_puts_the_students_rows_first_and_says_which_are_which(tokenizer, tiny_model):
    task, prompter, draw, prompts, rewards, sampler = parts(tokenizer, tiny_model, share=0.5)
    off = OffPolicy(prompts, InProcess(tiny_model, prompter, draw, len(tokenizer), CPU, 0, seed_offset=9), prompter,
                    rewards, seq_kd=False)
    rows = Mixed(Sampled(prompts, sampler, rewards), off, tokenizer.pad_token_id, CPU).rollouts(0)
    on, rest = prompts.split(0)
    assert rows.on_policy.tolist() == [True] * 4 + [False] * 2  # 2 prompts x 2 samples, then each reference
    assert rows.messages == [ex.messages for ex in on for _ in range(2)] + [ex.messages for ex in rest]
    assert rows.offpolicy == OffPolicyRows(1, False)  # arithmetic prompts have a reference: the teacher never samples
    assert rows.completion_ids()[4:] == [prompter.completion(ex.completion, draw.max_new_tokens) for ex in rest]
    starts = {int(row.nonzero()[0]) for row in rows.completion_mask}
    assert len(starts) == 1  # one prompt column for both parts


def test_data_pairs_visit_every_pair_once_an_epoch(tokenizer):
    task = ArithmeticTask(operators=2)
    examples = task.train_examples(0, 6, 0)
    pairs = [(ex, f"= {i}") for i, ex in enumerate(examples)]
    prompter = Prompter(tokenizer, max_prompt_tokens=200)
    source = DataPairs(pairs, prompts_per_step=3, prompter=prompter, max_new_tokens=8, seed=1,
                       rewards=Rewards(tokenizer, task), dist=ONE, device=CPU)
    seen = []
    for step in (0, 1):
        rows = source.rollouts(step)
        texts = completions_text(tokenizer, rows.completion_ids())
        seen += texts
        for text, messages in zip(texts, rows.messages, strict=True):
            assert pairs[[ex.messages for ex, _ in pairs].index(messages)][1] == text  # the pair's own completion
        assert all(ids[-1] == tokenizer.eos_token_id for ids in rows.completion_ids())
    assert sorted(seen) == sorted(text for _, text in pairs)


def test_a_source_with_no_server_has_nothing_to_push_or_release(tokenizer, tiny_model):
    source = Sampled(*parts(tokenizer, tiny_model)[3:5], parts(tokenizer, tiny_model)[5])
    assert isinstance(source, RolloutSource) and source.server is None
    assert source.where == "" and source.push_seconds() is None
    source.finish(3), source.release(), source.close()  # nothing to do, nothing raised
