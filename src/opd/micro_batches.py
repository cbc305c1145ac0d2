"""Token-budget micro-batches (``max_tokens_per_micro_batch=N``): the step's rows grouped so that a
micro-batch holds at most N positions, padding included, once its all-padding columns are cut.

A micro-batch of rows R costs ``|R| x (max prompt length + max completion length)`` positions over R (the
layout left-pads prompts to one column and right-pads completions). Rows stay with their prompt's other
samples, prompts ordered longest first, and a micro-batch takes rows in that order while the cost stays
within N (a single row over N is a micro-batch of its own). Every rank then splits into the same number
of micro-batches (the largest any rank needs, its biggest micro-batches halved), since every backward
under FSDP2 is a collective. The loss of each is normalised by the step's completion tokens on all ranks,
as with ``grad_accum``, so the gradient is the whole batch's whatever the grouping.
"""

from __future__ import annotations

import torch

from opd.rollouts import Rollouts


def row_lengths(rollouts: Rollouts) -> tuple[list[int], list[int]]:
    """Each row's positions left of the completion column (its prompt) and from it on (its completion: every
    position a row occupies there, a conversation's environment tokens included, not only the sampled ones):
    what a micro-batch of the row costs in the layout's two padded parts."""
    sampled = (rollouts.completion_mask > 0).any(0).nonzero()
    start = int(sampled[0]) if len(sampled) else rollouts.tokens.shape[1]  # where every completion begins
    attended = rollouts.attention_mask > 0
    prompt = attended[:, :start].sum(-1).tolist()
    return [int(n) for n in prompt], [int(n) for n in attended[:, start:].sum(-1).tolist()]


def cost(rows: list[int], prompt_lengths: list[int], completion_lengths: list[int]) -> int:
    """Positions of a micro-batch of ``rows`` once its all-padding columns are cut."""
    if not rows:
        return 0
    return len(rows) * (max(prompt_lengths[r] for r in rows) + max(completion_lengths[r] for r in rows))


def plan(prompt_index: list[int], prompt_lengths: list[int], completion_lengths: list[int],
         budget: int) -> list[list[int]]:
    """Rows grouped into micro-batches of at most ``budget`` positions each."""
    longest: dict[int, int] = {}
    for row, group in enumerate(prompt_index):
        longest[group] = max(longest.get(group, 0), prompt_lengths[row] + completion_lengths[row])
    order = sorted(range(len(prompt_index)), key=lambda r: (-longest[prompt_index[r]], prompt_index[r], r))
    batches: list[list[int]] = []
    for row in order:
        if batches and cost(batches[-1] + [row], prompt_lengths, completion_lengths) <= budget:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """``batches`` split into ``count`` (more, smaller ones): the one with the most rows halved each time."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        rows = batches[largest]
        if len(rows) < 2:
            raise ValueError(f"cannot split {len(batches)} micro-batches of one row into {count}")
        batches[largest:largest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    return batches


def trimmed(rollouts: Rollouts) -> Rollouts:
    """``rollouts`` without the columns that are padding in every row (left of the longest prompt, right of
    the longest completion); positions are unchanged (they count attended tokens)."""
    used = (rollouts.attention_mask > 0).any(0).nonzero()[:, 0]
    if len(used) == 0:
        return rollouts
    return rollouts.columns(slice(int(used[0]), int(used[-1]) + 1))


def padding_share(batches: list[list[int]], prompt_lengths: list[int], completion_lengths: list[int]) -> float:
    """The share of the micro-batches' positions that are padding."""
    total = sum(cost(b, prompt_lengths, completion_lengths) for b in batches)
    real = sum(prompt_lengths[r] + completion_lengths[r] for b in batches for r in b)
    return 1 - real / total if total else 0.0


def rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def completion_positions(offsets: list[int], rows: list[int], device: torch.device) -> torch.Tensor:
    """Where ``rows``' completion positions lie among the batch's (``scoring.completion_row_offsets``), in
    the order a micro-batch of those rows lists them: the teacher signal's rows for that micro-batch."""
    return torch.cat([torch.arange(offsets[r], offsets[r + 1], device=device) for r in rows])
