"""The exact teacher: a regime task's next-character distribution, as token log-probs over a vocabulary.

``next_char_probs`` is the task's own distribution (characters, and ``EOS`` for end of sequence).
``ExactTeacher`` turns it into what a model teacher gives: one row of log-probabilities over the whole
vocabulary per completion position, floored so that no token is impossible (a student's token the
teacher rules out costs ``log(epsilon / V)``, not ``-inf``).
"""

from __future__ import annotations

import random
import re
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from opd.errors import OpdError
from opd.regimes.tasks import OFF_SUPPORT, roll_out, sample_key
from opd.regimes.vocab import EOS
from opd.tasks import Example, Task

__all__ = ["EOS", "ExactTask", "ExactTeacher", "next_char_probs", "reference_completion"]


class ExactTask(Task, Protocol):
    def next_char_probs(self, prompt: str, prefix: str) -> dict[str, float]:
        """The exact distribution of the character after ``prefix`` (``EOS``: the end); sums to 1."""
        ...


def next_char_probs(task: ExactTask, prompt_text: str, prefix_text: str) -> dict[str, float]:
    """``p(next | prompt, prefix)`` over characters and ``EOS``, exact, summing to 1; ``prompt_text`` is the
    user message's content and ``prefix_text`` the completion so far (see ``opd.regimes.tasks``)."""
    return task.next_char_probs(prompt_text, prefix_text)


def reference_completion(task: ExactTask, example: Example, rng: random.Random | None = None) -> str:
    """The teacher's own completion of ``example`` (without EOS): greedy without ``rng`` (ties to the first
    character in sorted order), sampled from the exact distribution with it."""
    prompt = example.messages[-1]["content"]
    return roll_out(lambda prefix: task.next_char_probs(prompt, prefix), rng)


def noisy_completion(task: ExactTask, example: Example, rng: random.Random, rate: float,
                     max_chars: int = 256) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The teacher's sampled completion under ``sample_noise=rate`` (DART's data, Laskey et al. 2017): each
    character it writes is, with probability ``rate``, replaced by one of ``task.noise_tokens`` drawn
    uniformly (as ``opd.samplers.local.Noise`` does to the student's tokens; EOS never), and the teacher goes
    on from the corrupted prefix. Returns the text and the replaced characters' ``[i, i + 1)`` spans: the
    environment's, not trained on."""
    prompt = example.messages[-1]["content"]
    text, spans = "", []
    for _ in range(max_chars + 1):
        char = sample_key(sorted(task.next_char_probs(prompt, text).items()), rng.random())
        if char == EOS:
            return text, tuple(spans)
        if rng.random() < rate:
            spans.append((len(text), len(text) + 1))
            char = task.noise_tokens[rng.randrange(len(task.noise_tokens))]
        text += char
    raise RuntimeError(f"no EOS after {max_chars} characters: {text[:40]}...")


class ExactTeacher:
    """Token log-probs of the exact distribution under ``tokenizer`` (one token per character, as
    ``opd.regimes.vocab.char_tokenizer``), floored: over the V tokens of the vocabulary,

        q_t(x) = (1 - epsilon) * p(x | prompt, completion[:t]) + epsilon / V,

    where ``p`` is ``next_char_probs`` with ``EOS`` as the tokenizer's EOS token. A completion id that is not
    a character (a special token: EOS, pad, ``<unk>``...) leaves the teacher off its support from there on:
    ``p`` is EOS with probability 1, as after any prefix the task cannot continue."""

    def __init__(self, task: ExactTask, tokenizer: PreTrainedTokenizerBase, epsilon: float = 1e-3) -> None:
        if not 0 < epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        self.task, self.tokenizer, self.epsilon = task, tokenizer, epsilon
        self.vocab_size = len(tokenizer)
        specials = set(tokenizer.all_special_ids)
        self.chars = {i: tok for tok, i in tokenizer.get_vocab().items() if len(tok) == 1 and i not in specials}
        self.ids = {char: i for i, char in self.chars.items()} | {EOS: tokenizer.eos_token_id}

    def probs(self, prompt_text: str, completion_ids: list[int]) -> torch.Tensor:
        """``p`` (before the floor) as a (len(completion_ids), V) float64 tensor, row t given ids[:t]."""
        rows = torch.zeros(len(completion_ids), self.vocab_size, dtype=torch.float64)
        prefix, on_support = "", True
        for t, token in enumerate(completion_ids):
            dist = self.task.next_char_probs(prompt_text, prefix) if on_support else OFF_SUPPORT
            for key, p in dist.items():
                rows[t, self.ids[key]] += p
            if token in self.chars:
                prefix += self.chars[token]
            else:
                on_support = False
        return rows

    def logprobs(self, prompt_text: str, completion_ids: list[int]) -> torch.Tensor:
        """``log q_t`` (class docstring): (len(completion_ids), V) float32, finite, each row's logsumexp 0."""
        floored = (1 - self.epsilon) * self.probs(prompt_text, completion_ids) + self.epsilon / self.vocab_size
        return floored.log().float()


EPSILON = 1e-3  # the floor every regime table states: (1 - eps) p + eps / V
USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


class Exact:
    """``teacher=opd.regimes.exact:Exact``: the run's task's exact teacher as a program
    (``opd.teachers.programmatic``): the problem is read from the prompt's last user turn (the rendered ids
    decoded), the log-probs are ``ExactTeacher``'s, floored at ``EPSILON``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, task: ExactTask) -> None:
        if not callable(getattr(task, "next_char_probs", None)):
            raise OpdError(f"teacher=opd.regimes.exact:Exact grades a task with an exact teacher (task=chain:... or "
                           f"paths:...); task {getattr(task, 'name', task)!r} has none")
        self.tokenizer, self.teacher = tokenizer, ExactTeacher(task, tokenizer, EPSILON)

    def logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
        turns = USER_TURN.findall(self.tokenizer.decode(prompt_ids, skip_special_tokens=False))
        if not turns:
            raise OpdError("teacher=opd.regimes.exact:Exact: the prompt has no user turn in the ChatML form the regime "
                           "tasks' tokenizer renders (opd.regimes.vocab)")
        return self.teacher.logprobs(turns[-1], completion_ids)
