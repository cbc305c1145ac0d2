"""What a teacher offers the view that reads rollouts with it (``view.TeacherView``).

Every teacher scores token ids it is given: each completion token's log-prob in its context, and its top-k
ids and log-probs per completion position (``kl=topk``). A teacher whose weights are in this process
(``in_process``: ``local.LocalTeacher``) also gives its final hidden states and its head, from which the
view takes the whole distribution (``kl=full``), the top-k, and the mass of any set of tokens (the aligned
path's multi-token events); a teacher behind a server (``remote.RemoteTeacher``) gives only what the
server sends. The view and the objective ask ``in_process``, never the teacher's type.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opd.rollouts import Rollouts


class Teacher(Protocol):
    in_process: bool  # its hidden states and head are here (``InProcessTeacher``)
    local_model: torch.nn.Module | None  # the model a run evaluates and samples from (None: not in this process)
    sharded: bool  # layers sharded across ranks: every rank calls each forward

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) the teacher's log-prob of every completion token in its context; 0 elsewhere."""
        ...

    def score_topk(self, rollouts: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor | None]:
        """``score``, and with ``k`` the (N, k) ids and log-probs of its k most likely tokens at the
        completion positions, in ``scoring.completion_hidden``'s order (row by row)."""
        ...

    def close(self) -> None:
        """Release what it holds (a server's connections)."""
        ...


class InProcessTeacher(Teacher, Protocol):
    head: torch.nn.Module

    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` and the (N, H) final hidden states at the completion-predicting positions."""
        ...

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) ids and log-probs of the k most likely tokens at each row of ``hidden``."""
        ...

    def cover_logprobs(self, hidden: torch.Tensor, token_sets: list[list[int]]) -> list[float]:
        """``log sum_{v in S_i} p(v)`` at each row of ``hidden``."""
        ...
