"""The one batch type that flows through every stage: sampler -> scorer -> advantages -> loss.

Layout: each row is ``[left padding] prompt completion [right padding]`` in one (B, T) tensor, so the
prompt ends at the same column for every row (what batched sampling with a KV cache needs) and no
stage ever re-tokenizes. Log-prob tensors are aligned with ``tokens``: ``x_logprobs[b, t]`` is the
log-probability of ``tokens[b, t]`` given ``tokens[b, :t]``; positions outside the completion hold 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Rollouts:
    tokens: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long: 1 on prompt and completion tokens, 0 on padding
    completion_mask: torch.Tensor  # (B, T) float: 1 on sampled tokens (EOS included), 0 elsewhere
    prompt_index: torch.Tensor  # (B,) long: which prompt of the batch each row answers (its group)
    sampler_logprobs: torch.Tensor | None = None  # (B, T) log-prob under the sampling distribution
    teacher_logprobs: torch.Tensor | None = None  # (B, T)
    rewards: torch.Tensor | None = None  # (B,) task reward of each completion
    advantages: torch.Tensor | None = None  # (B, T)
    engine_logprobs: torch.Tensor | None = None  # (B, T) a rollout server's log-probs (its numerics, its weights)
    is_weights: torch.Tensor | None = None  # (B, T) truncated importance weights trainer / engine (remote sampler)
    extras: dict = field(default_factory=dict)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions that skip left padding, so padded and unpadded rows see the same positions."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    def prompt_groups(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Rows that answer the same prompt, for computing that prompt once: ``(first, group, width)``
        with ``first`` (G,) the first row of each run of consecutive rows with one ``prompt_index``,
        ``group`` (B,) each row's run and ``width`` the column where completions start. None when no
        two rows share a prompt, or when a run's rows differ anywhere before ``width``."""
        columns = (self.completion_mask > 0).any(0).nonzero()
        if len(columns) == 0 or int(columns[0]) == 0:
            return None
        width = int(columns[0])
        starts = torch.ones_like(self.prompt_index, dtype=torch.bool)
        starts[1:] = self.prompt_index[1:] != self.prompt_index[:-1]
        first = starts.nonzero()[:, 0]
        if len(first) == len(starts):
            return None
        group = starts.cumsum(0) - 1
        for tensor in (self.tokens, self.attention_mask):
            prompt = tensor[:, :width]
            if not torch.equal(prompt, prompt[first][group]):
                return None
        return first, group, width

    def completion_ids(self) -> list[list[int]]:
        """Each row's completion tokens (EOS included when it was sampled)."""
        out = []
        for row, mask in zip(self.tokens.tolist(), self.completion_mask.tolist(), strict=True):
            out.append([tok for tok, m in zip(row, mask, strict=True) if m > 0])
        return out

    def to(self, device: torch.device | str) -> Rollouts:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)

    def select(self, rows: torch.Tensor | slice) -> Rollouts:
        """The sub-batch of ``rows`` (used for gradient accumulation micro-batches)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[rows] if isinstance(value, torch.Tensor) else value
        return replace(self, **picked)


def pack_pairs(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Rollouts:
    """Rollouts for given (prompt, completion) token pairs: the SFT layout, same as the sampler's."""
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(max(len(c) for c in completions), 1)
    batch = len(prompts)
    tokens = torch.full((batch, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(tokens)
    completion_mask = torch.zeros(tokens.shape, dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start = prompt_width - len(prompt)
        tokens[row, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        tokens[row, prompt_width : prompt_width + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention[row, start : prompt_width + len(completion)] = 1
        completion_mask[row, prompt_width : prompt_width + len(completion)] = 1.0
    return Rollouts(tokens, attention, completion_mask, torch.arange(batch))


def concat_rollouts(first: Rollouts, second: Rollouts, pad_id: int) -> Rollouts:
    """``first``'s rows, then ``second``'s, in one batch: each part shifted so that every prompt ends at the
    same column (the wider prompt's) and padded on the right to the longer completion. Per-token tensors a
    part lacks are zeros there (``is_weights``: ones); ``second``'s groups are numbered after ``first``'s;
    list-valued extras are joined, the others kept (``first``'s where both have one)."""
    widths = [int((r.completion_mask > 0).any(0).nonzero()[0]) if r.completion_mask.any() else r.tokens.shape[1]
              for r in (first, second)]
    prompt = max(widths)
    completion = max(r.tokens.shape[1] - w for r, w in zip((first, second), widths, strict=True))
    rows = first.tokens.shape[0] + second.tokens.shape[0]
    device = first.tokens.device

    def joined(name: str, fill: float) -> torch.Tensor | None:
        parts = [getattr(r, name) for r in (first, second)]
        if all(p is None for p in parts):
            return None
        like = next(p for p in parts if p is not None)
        out = torch.full((rows, prompt + completion), fill, dtype=like.dtype, device=device)
        start = 0
        for r, w, part in zip((first, second), widths, parts, strict=True):
            count = r.tokens.shape[0]
            if part is not None:
                out[start : start + count, prompt - w : prompt - w + part.shape[1]] = part
            start += count
        return out

    extras = {**second.extras, **first.extras}  # other extras: ``first``'s, else ``second``'s
    extras.update({key: first.extras[key] + second.extras[key] for key in first.extras
                   if isinstance(first.extras[key], list) and isinstance(second.extras.get(key), list)})
    groups = int(first.prompt_index.max()) + 1 if first.tokens.shape[0] else 0
    rewards = None if first.rewards is None or second.rewards is None else torch.cat([first.rewards, second.rewards])
    return Rollouts(
        tokens=joined("tokens", pad_id), attention_mask=joined("attention_mask", 0),
        completion_mask=joined("completion_mask", 0.0),
        prompt_index=torch.cat([first.prompt_index, second.prompt_index + groups]),
        sampler_logprobs=joined("sampler_logprobs", 0.0), teacher_logprobs=joined("teacher_logprobs", 0.0),
        rewards=rewards, advantages=joined("advantages", 0.0), engine_logprobs=joined("engine_logprobs", 0.0),
        is_weights=joined("is_weights", 1.0), extras=extras)
