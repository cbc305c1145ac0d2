"""The one batch type that flows through every stage: sampler -> scorer -> advantages -> loss.

Layout: each row is ``[left padding] prompt completion [right padding]`` in one (B, T) tensor, so the
prompt ends at the same column for every row (what batched sampling with a KV cache needs) and no
stage ever re-tokenizes. Log-prob tensors are aligned with ``tokens``: ``x_logprobs[b, t]`` is the
log-probability of ``tokens[b, t]`` given ``tokens[b, :t]``; positions outside the completion hold 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch

TOKEN, ROW, BATCH = "token", "row", "batch"  # what a field is indexed by: (B, T), (B,) or the whole batch


def per(kind: str, required: bool = False):
    """A ``Rollouts`` field indexed by ``kind``: selection, trimming and joining read this, so a new field
    cannot be forgotten by any of them."""
    if required:
        return field(metadata={"per": kind})
    return field(default=None, metadata={"per": kind})


class Turn(NamedTuple):
    """One sampled assistant turn of a conversation row: its columns ``[start, end)`` in the row, and the
    conversation before it (the student's messages, the environment's answers included)."""

    start: int
    end: int
    before: list[dict]


@dataclass(frozen=True)
class OffPolicyRows:
    """GKD's off-policy part of a step: rows per prompt, and whether the teacher sampled them (else each
    prompt's reference completion). Its FLOPs depend on both."""

    rows_per_prompt: int
    teacher_sampled: bool


@dataclass
class Rollouts:
    tokens: torch.Tensor = per(TOKEN, True)  # (B, T) long
    attention_mask: torch.Tensor = per(TOKEN, True)  # (B, T) long: 1 on prompt and completion tokens, 0 on padding
    completion_mask: torch.Tensor = per(TOKEN, True)  # (B, T) float: 1 on sampled tokens (EOS included), 0 elsewhere
    prompt_index: torch.Tensor = per(ROW, True)  # (B,) long: which prompt of the batch each row answers (its group)
    sampler_logprobs: torch.Tensor | None = per(TOKEN)  # (B, T) log-prob under the sampling distribution
    teacher_logprobs: torch.Tensor | None = per(TOKEN)  # (B, T)
    rewards: torch.Tensor | None = per(ROW)  # (B,) task reward of each completion
    advantages: torch.Tensor | None = per(TOKEN)  # (B, T)
    engine_logprobs: torch.Tensor | None = per(TOKEN)  # (B, T) a rollout server's log-probs (its numerics, its weights)
    is_weights: torch.Tensor | None = per(TOKEN)  # (B, T) truncated importance weights trainer / engine (a server)
    on_policy: torch.Tensor | None = per(ROW)  # (B,) bool: the student's own samples (GKD's lmbda); None: every row
    messages: list[list[dict]] | None = per(ROW)  # the conversation each row answers, as the student reads it
    teacher_names: list[str] | None = per(ROW)  # teachers=: the teacher that grades each row ("": teacher=)
    teacher_messages: list[list[dict]] | None = per(ROW)  # what the teacher reads (privileged context), else messages
    turns: list[list[Turn]] | None = per(ROW)  # conversation rows: each sampled turn's columns and what came before
    engine: dict | None = per(BATCH)  # a rollout server's mismatch sums (``samplers.service.reweight``)
    offpolicy: OffPolicyRows | None = per(BATCH)  # GKD's off-policy part
    conversation: dict | None = per(BATCH)  # conversation figures: turns, cut conversations, tool calls

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

    def written_ids(self) -> list[list[int]]:
        """Each row's tokens from the completion column on (the first column any row's completion has a token
        in: every row's completion starts there), the attended ones: the sampled tokens and the environment's
        among them (``sample_noise``'s replacements, a conversation's turns). What a reward reads."""
        sampled = (self.completion_mask > 0).any(0).nonzero()
        if len(sampled) == 0:
            return [[] for _ in range(self.tokens.shape[0])]
        start = int(sampled[0])
        return [[tok for tok, a in zip(row, attended, strict=True) if a > 0]
                for row, attended in zip(self.tokens[:, start:].tolist(), self.attention_mask[:, start:].tolist(),
                                         strict=True)]

    def to(self, device: torch.device | str) -> Rollouts:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)

    def select(self, rows: torch.Tensor | slice | list[int]) -> Rollouts:
        """The sub-batch of ``rows`` (a slice, or indices): every per-token and per-row field, tensors and
        lists alike, cut to those rows; the batch's figures kept."""
        if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
            rows = rows.nonzero()[:, 0]
        if isinstance(rows, list):
            rows = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        positions = None  # the rows as Python ints, read off the device only when a list needs them
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.metadata["per"] == BATCH:
                continue
            if isinstance(value, torch.Tensor) or isinstance(rows, slice):
                picked[f.name] = value[rows]
            else:
                positions = rows.tolist() if positions is None else positions
                picked[f.name] = [value[i] for i in positions]
        return replace(self, **picked)

    def columns(self, span: slice) -> Rollouts:
        """Columns ``span`` of every per-token field (``micro_batches.trimmed``), the turns' columns moved
        with them; the rest unchanged."""
        cut = {f.name: getattr(self, f.name)[:, span] for f in fields(self)
               if f.metadata["per"] == TOKEN and getattr(self, f.name) is not None}
        return replace(self, **cut, turns=shifted(self.turns, -(span.start or 0)))


def shifted(turns: list[list[Turn]] | None, by: int) -> list[list[Turn]] | None:
    """``turns`` with their columns moved by ``by``."""
    if turns is None or by == 0:
        return turns
    return [[Turn(t.start + by, t.end + by, t.before) for t in row] for row in turns]


def pack_pairs(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
               trained: list[list[float]] | None = None) -> Rollouts:
    """Rollouts for given (prompt, completion) token pairs: the SFT layout, same as the sampler's. ``trained``:
    each completion token's ``completion_mask`` (0: context, not trained on; default every token 1)."""
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
        completion_mask[row, prompt_width : prompt_width + len(completion)] = (
            1.0 if trained is None else torch.tensor(trained[row], dtype=torch.float32))
    return Rollouts(tokens, attention, completion_mask, torch.arange(batch))


def concat_rollouts(first: Rollouts, second: Rollouts, pad_id: int) -> Rollouts:
    """``first``'s rows, then ``second``'s, in one batch: each part shifted so that every prompt ends at the
    same column (the wider prompt's) and padded on the right to the longer completion. Per-token tensors a
    part lacks are zeros there (``is_weights``: ones); ``second``'s groups are numbered after ``first``'s;
    per-row values are joined (None when a part has none: a list cannot be joined with nothing); the
    batch's figures are ``first``'s, else ``second``'s."""
    widths = [int((r.completion_mask > 0).any(0).nonzero()[0]) if r.completion_mask.any() else r.tokens.shape[1]
              for r in (first, second)]
    prompt = max(widths)
    completion = max(r.tokens.shape[1] - w for r, w in zip((first, second), widths, strict=True))
    rows = first.tokens.shape[0] + second.tokens.shape[0]
    device = first.tokens.device
    fills = {"tokens": pad_id, "is_weights": 1.0}

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

    out = {}
    for f in fields(Rollouts):
        a, b = getattr(first, f.name), getattr(second, f.name)
        if f.metadata["per"] == TOKEN:
            out[f.name] = joined(f.name, fills.get(f.name, 0))
        elif f.metadata["per"] == BATCH:
            out[f.name] = a if a is not None else b
        elif a is None or b is None:
            out[f.name] = None
        elif f.name == "turns":
            out[f.name] = shifted(a, prompt - widths[0]) + shifted(b, prompt - widths[1])
        else:
            out[f.name] = torch.cat([a, b]) if isinstance(a, torch.Tensor) else list(a) + list(b)
    groups = int(first.prompt_index.max()) + 1 if first.tokens.shape[0] else 0
    out["prompt_index"] = torch.cat([first.prompt_index, second.prompt_index + groups])
    return Rollouts(**out)
