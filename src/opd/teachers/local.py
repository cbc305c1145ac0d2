"""A teacher model in this process: it scores the token ids of a rollout."""

from __future__ import annotations

from typing import Protocol

import torch

from opd.rollouts import Rollouts
from opd.scoring import completion_hidden, completion_targets, gather_logprobs, scatter_completion


class Teacher(Protocol):
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) teacher log-prob of every completion token in its context; 0 elsewhere."""
        ...


class LocalTeacher:
    """A teacher model in this process: eval mode, no gradients, its own device and dtype."""

    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.head = model.get_output_embeddings()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_with_hidden(rollouts)[0]

    @torch.no_grad()
    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` plus the final hidden states (N, H) at the completion-predicting positions, from
        one forward pass: with ``self.head``, what the exact-KL loss needs."""
        moved = rollouts.to(self.device)
        hidden, _ = completion_hidden(self.model, moved)
        logprobs = scatter_completion(moved, gather_logprobs(self.head, hidden, completion_targets(moved),
                                                             self.vocab_size))
        return logprobs.to(rollouts.tokens.device, torch.promote_types(logprobs.dtype, torch.float32)), hidden
