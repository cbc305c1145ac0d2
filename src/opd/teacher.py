"""Teachers score a rollout's tokens; they never train and never generate."""

from __future__ import annotations

from typing import Protocol

import torch

from opd.rollouts import Rollouts
from opd.scoring import completion_hidden, completion_targets, gather_logprobs, scatter_completion, token_logprobs


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

    @torch.no_grad()
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        logprobs = token_logprobs(self.model, rollouts.to(self.device), self.vocab_size)
        return logprobs.to(rollouts.tokens.device, torch.float32)

    @torch.no_grad()
    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
        """``score`` plus the final hidden states (N, H) at the completion-predicting positions and the
        output head, from one forward pass: what the exact-KL loss needs."""
        rollouts = rollouts.to(self.device)
        hidden, head = completion_hidden(self.model, rollouts)
        logprobs = gather_logprobs(head, hidden, completion_targets(rollouts), self.vocab_size)
        return scatter_completion(rollouts, logprobs).float(), hidden, head
