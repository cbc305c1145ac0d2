"""A teacher model in this process: it scores the token ids of a rollout (``base.InProcessTeacher``)."""

from __future__ import annotations

import torch

from opd.rollouts import Rollouts
from opd.scoring import (
    LOGITS_BUDGET,
    completion_hidden,
    completion_targets,
    gather_logprobs,
    head_logprobs,
    scatter_completion,
)


class HeadTeacher:
    """What a teacher with final hidden states and a head (``base.InProcessTeacher``) derives from its
    ``score_with_hidden``: the scores alone, the top-k, the mass of token sets."""

    head: torch.nn.Module
    vocab_size: int

    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_with_hidden(rollouts)[0]

    def score_topk(self, rollouts: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor | None]:
        """``score`` and, with ``k``, the top-k of the full distribution at every completion position."""
        logprobs, hidden = self.score_with_hidden(rollouts)
        return (logprobs, *self.topk(hidden, k)) if k else (logprobs, None, None)

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return head_topk(self.head, hidden, k, self.vocab_size)

    def cover_logprobs(self, hidden: torch.Tensor, token_sets: list[list[int]]) -> list[float]:
        return head_covers(self.head, hidden, token_sets, self.vocab_size)


class LocalTeacher(HeadTeacher):
    """A teacher model in this process: eval mode, no gradients, its own device and dtype."""

    in_process = True

    def __init__(self, model: torch.nn.Module, vocab_size: int, sharded: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.sharded = sharded  # layers sharded across ranks (teacher_parallel=fsdp): one forward per call
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.head = model.get_output_embeddings()
        self.local_model = model  # what a run evaluates and samples from (None for a served teacher)

    def close(self) -> None:
        """Nothing to release: the model goes with the session."""

    @torch.no_grad()
    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` plus the final hidden states (N, H) at the completion-predicting positions, from
        one forward pass: with ``self.head``, what the exact-KL loss needs."""
        moved = rollouts.to(self.device)
        hidden, _ = completion_hidden(self.model, moved, share_prompts=not self.sharded)
        logprobs = scatter_completion(moved, gather_logprobs(self.head, hidden, completion_targets(moved),
                                                             self.vocab_size))
        return logprobs.to(rollouts.tokens.device, torch.promote_types(logprobs.dtype, torch.float32)), hidden


@torch.no_grad()
def head_topk(head: torch.nn.Module, hidden: torch.Tensor, k: int, vocab_size: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """(N, k) the ids and log-probs of the k most likely tokens at each of ``hidden``'s rows under ``head``,
    from the full distribution, in row chunks under ``scoring.LOGITS_BUDGET``."""
    ids, lps = [], []
    step = max(1, LOGITS_BUDGET // max(vocab_size, 1))
    for start in range(0, hidden.shape[0], step):
        top = head_logprobs(head, hidden[start : start + step], vocab_size).topk(k, dim=-1)
        lps.append(top.values)
        ids.append(top.indices)
    return torch.cat(ids), torch.cat(lps)


@torch.no_grad()
def head_covers(head: torch.nn.Module, hidden: torch.Tensor, token_sets: list[list[int]],
                vocab_size: int) -> list[float]:
    """``log sum_{v in S_i} p(v)`` at each position ``i`` (final hidden states (N, H), one set of token ids
    per row), the full distribution taken in row chunks under ``scoring.LOGITS_BUDGET``."""
    out: list[float] = []
    step = max(1, LOGITS_BUDGET // max(vocab_size, 1))
    for start in range(0, len(token_sets), step):
        logprobs = head_logprobs(head, hidden[start : start + step], vocab_size)
        for row, ids in zip(logprobs, token_sets[start : start + step], strict=True):
            out.append(float(torch.logsumexp(row[ids], 0)) if ids else float("-inf"))
    return out
