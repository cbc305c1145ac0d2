"""A teacher that is a program (``teacher=module.path:Name``): rule-based teachers, test oracles, the exact
teachers of ``opd.regimes``. It is read like any teacher in this process (``base.InProcessTeacher``), on the
same paths (``kl=sampled``, ``full``, ``topk``), and its log-probs enter the loss as a model's would.

The program: an object (or a class or factory, called with the keyword arguments it accepts of
``tokenizer`` — the student's — and ``task`` — the run's) with

    logprobs(prompt_ids: list[int], completion_ids: list[int]) -> Tensor (len(completion_ids), V)

whose row ``t`` is ``log p(. | prompt, completion[:t])`` over the student's vocabulary (``V`` its tokenizer's
length). Every value must be finite: a program that gives a token probability 0 must floor it (mix with
the uniform distribution, ``(1 - eps) p + eps / V``), or the reverse KL is infinite; a row that is not
finite stops the run, naming the program.

How it fits the scorer: the program's log-prob rows are the "hidden states" at the completion-predicting
positions and its "head" is the identity, so ``log_softmax(head(h)) = h`` gives back the same rows, and
the exact KL, the top-k and the aligned path's covers are computed from them as from a model's head. It
has no architecture, so its FLOPs are not counted (``teacher_flops`` is None, as for a server): an
experiment charges it a stated nominal size itself.
"""

from __future__ import annotations

import inspect

import torch

from opd.errors import OpdError
from opd.rollouts import Rollouts
from opd.scoring import completion_targets, head_logprobs, scatter_completion
from opd.teachers.local import HeadTeacher


def load_program(spec: str, tokenizer, task):
    """``teacher=module.path:Name`` as a program: an instance with ``logprobs``, else the class or factory
    called with what it accepts of ``tokenizer`` and ``task``."""
    from opd.tasks.custom import load_object

    target = load_object(spec, "teacher")
    if not callable(getattr(target, "logprobs", None)) or isinstance(target, type):
        try:
            accepted = inspect.signature(target).parameters
        except (TypeError, ValueError) as err:
            raise OpdError(f"teacher={spec} is neither an object with logprobs(prompt_ids, completion_ids) nor a "
                           "class or factory that makes one") from err
        given = {"tokenizer": tokenizer, "task": task}
        target = target(**{name: value for name, value in given.items() if name in accepted})
    if not callable(getattr(target, "logprobs", None)):
        raise OpdError(f"teacher={spec}: {type(target).__name__} has no logprobs(prompt_ids, completion_ids) method "
                       "returning (len(completion_ids), V) log-probs")
    return target


class ProgrammaticTeacher(HeadTeacher):
    """A program as a teacher in this process (``base.InProcessTeacher``)."""

    in_process = True
    sharded = False
    local_model = None  # nothing to evaluate or sample from: the program only grades

    def __init__(self, program, vocab_size: int, name: str, device: torch.device | str = "cpu") -> None:
        self.program, self.vocab_size, self.name, self.device = program, vocab_size, name, torch.device(device)
        self.head = torch.nn.Identity()

    def close(self) -> None:
        """Nothing to release."""

    def rows(self, rollouts: Rollouts) -> torch.Tensor:
        """(N, V) the program's log-probs at every completion position, in ``scoring.completion_hidden``'s
        order (row by row): each row's prompt is its tokens before the completion column (the first any row
        has a completion token in), and every token after it (a conversation's environment tokens, a replaced
        token of ``sample_noise``, too) is the completion the program reads."""
        tokens, attention = rollouts.tokens.tolist(), rollouts.attention_mask.tolist()
        masks = (rollouts.completion_mask > 0).tolist()
        any_row = (rollouts.completion_mask > 0).any(0).nonzero()
        start = int(any_row[0]) if len(any_row) else 0  # every row's completion begins in this column
        out = []
        for row, (ids, attended, mask) in enumerate(zip(tokens, attention, masks, strict=True)):
            columns = [t for t, m in enumerate(mask) if m]
            if not columns:
                continue
            first = attended.index(1)
            last = max(t for t, a in enumerate(attended) if a) + 1
            given = self.program.logprobs(ids[first:start], ids[start:last])
            values = torch.as_tensor(given, dtype=torch.float32)
            if values.shape != (last - start, self.vocab_size):
                raise OpdError(f"teacher={self.name}: logprobs() gave shape {tuple(values.shape)} for a completion of "
                               f"{last - start} tokens; it must be ({last - start}, {self.vocab_size}): one row per "
                               "completion token, over the student's vocabulary")
            if not torch.isfinite(values).all():
                raise OpdError(f"teacher={self.name}: logprobs() gave a value that is not finite (row {row}); a token "
                               "of probability 0 makes the reverse KL infinite: floor the distribution, e.g. "
                               "(1 - eps) * p + eps / V")
            out.append(values[[t - start for t in columns]])
        if not out:
            return torch.zeros(0, self.vocab_size, device=self.device)
        return torch.cat(out).to(self.device)

    @torch.no_grad()
    def score_with_hidden(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) the log-prob of each completion token, and the (N, V) rows as the hidden states."""
        hidden = self.rows(rollouts)
        moved = rollouts.to(self.device)
        # the rows' own log-softmax: they are log-probs already, this only renormalises rounding
        picked = head_logprobs(self.head, hidden, self.vocab_size).gather(-1, completion_targets(moved)[:, None])[:, 0]
        return scatter_completion(moved, picked).to(rollouts.tokens.device), hidden
