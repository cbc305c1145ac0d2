"""Token-budget micro-batches at their own interface: a micro-batch never holds more positions than the budget,
conversations included (whose environment tokens sit among the sampled ones, masked), and the logged padding
share is the real one."""

from __future__ import annotations

import random

import torch

from opd.micro_batches import cost, padding_share, plan, row_lengths, rows_tensor, trimmed
from opd.rollouts import pack_pairs


def conversations(seed: int = 0):
    """Rows of one prompt each, with completions of several turns: sampled tokens, then long tool results
    (the environment's, completion_mask 0), then sampled again."""
    rng = random.Random(seed)
    prompts, completions, masks = [], [], []
    for _ in range(12):
        prompts.append([1] * rng.randint(3, 9))
        pieces, mask = [], []
        for turn in range(rng.randint(1, 3)):
            sampled = rng.randint(1, 6)
            pieces += [2] * sampled
            mask += [1.0] * sampled
            if turn < 2 and rng.random() < 0.7:
                tool = rng.randint(10, 40)  # a long tool result
                pieces += [3] * tool
                mask += [0.0] * tool
        completions.append(pieces)
        masks.append(mask)
    rollouts = pack_pairs(prompts, completions, pad_id=0)
    width = max(len(p) for p in prompts)
    for row, mask in enumerate(masks):
        rollouts.completion_mask[row, width: width + len(mask)] = torch.tensor(mask)
    return rollouts


def test_row_lengths_count_every_position_a_row_occupies():
    rollouts = conversations()
    prompt, completion = row_lengths(rollouts)
    width = int((rollouts.completion_mask > 0).any(0).nonzero()[0])
    assert prompt == (rollouts.attention_mask[:, :width] > 0).sum(-1).tolist()  # the prompts as packed
    assert all(0 < p <= width for p in prompt) and max(prompt) == width
    empty = pack_pairs([[1, 1, 1], [1]], [[2, 2], [2]], pad_id=0)
    empty.completion_mask.zero_()  # no sampled token at all: every position is the prompt's
    assert row_lengths(empty) == ([5, 2], [0, 0])
    assert [p + c for p, c in zip(prompt, completion, strict=True)] == rollouts.attention_mask.sum(-1).tolist()
    assert all(c > s for c, s in zip(completion, rollouts.completion_mask.sum(-1).tolist(), strict=True)
               if s < c) and sum(completion) > rollouts.completion_mask.sum()


def test_a_micro_batch_of_conversations_stays_within_its_budget_and_the_padding_share_is_real():
    for seed in range(5):
        rollouts = conversations(seed)
        prompt, completion = row_lengths(rollouts)
        for budget in (60, 100, 162, 300):
            batches = plan(rollouts.prompt_index.tolist(), prompt, completion, budget)
            assert sorted(r for b in batches for r in b) == list(range(12))
            held = [trimmed(rollouts.select(rows_tensor(b, torch.device("cpu")))) for b in batches]
            for rows, part in zip(batches, held, strict=True):
                assert part.tokens.numel() == cost(rows, prompt, completion)  # the plan's count is the layout's
                assert len(rows) == 1 or part.tokens.numel() <= budget, (seed, budget, part.tokens.shape)
            real = sum(int(p.attention_mask.sum()) for p in held) / sum(p.tokens.numel() for p in held)
            assert abs(padding_share(batches, prompt, completion) - (1 - real)) < 1e-9
