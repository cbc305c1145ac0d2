"""Tasks supply prompts (train and held-out splits) and a verifier; they know nothing of models."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from opd.tasks import arithmetic


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # chat messages; the last one is the user's
    answer: str | None  # what the verifier expects; None when the task has no verifier
    constraints: tuple = ()  # instruction-following constraints (see opd.tasks.ifeval), checked instead of an answer
    completion: str | None = None  # a reference completion, when the data has one (GKD's off-policy part)
    teacher: str | None = None  # the teacher this prompt is distilled from, by its name in teachers= (None: teacher=)
    teacher_messages: list[dict] | None = None  # privileged context: what the teacher reads in place of messages

    @property
    def teacher_conversation(self) -> list[dict]:
        """The conversation the teacher grades the student's reply to: ``teacher_messages``, else ``messages``."""
        return self.teacher_messages or self.messages

    @property
    def verifiable(self) -> bool:
        return self.answer is not None or bool(self.constraints)


class Task(Protocol):
    name: str

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        """The ``count`` training prompts of ``step``: a pure function of (seed, step)."""
        ...

    def eval_examples(self, count: int) -> list[Example]:
        """The first ``count`` prompts of the held-out split, always the same ones."""
        ...

    def reward(self, completion: str, example: Example) -> float:
        """1.0 for a correct completion of ``example``, 0.0 otherwise."""
        ...


def step_rng(seed: int, step: int, salt: int = 0) -> random.Random:
    """A random stream that depends only on (seed, step): data order survives a resume."""
    return random.Random(f"{seed}/{step}/{salt}")


class ArithmeticTask:
    """Multi-step integer arithmetic with a chain of thought (see ``tasks/arithmetic.py``)."""

    name = "arithmetic"
    EVAL_SEED = 1234
    VALIDATION_SEED = 4321

    def __init__(self, operators: int = 3) -> None:
        self.operators = operators
        if operators != 3:
            self.name = f"arithmetic:{operators}"

    def problems(self, rng: random.Random, count: int, split: str) -> list[arithmetic.Problem]:
        return [arithmetic.make_problem(rng, self.operators, split) for _ in range(count)]

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        return [self.example(p) for p in self.problems(step_rng(seed, step), count, "train")]

    def eval_examples(self, count: int) -> list[Example]:
        rng = random.Random(self.EVAL_SEED)
        return [self.example(p) for p in self.problems(rng, count, "eval")]

    def validation_examples(self, count: int, exclude: list[Example]) -> list[Example]:
        """Held-out prompts for choosing hyperparameters: from the held-out split (never trained on)
        but disjoint from ``exclude`` (the prompts a result is reported on), so that a choice made
        on them does not leak into the reported figure."""
        taken = {ex.messages[-1]["content"] for ex in exclude}
        rng, out = random.Random(self.VALIDATION_SEED), []
        while len(out) < count:
            problem = arithmetic.make_problem(rng, self.operators, "eval")
            if problem.prompt not in taken:
                taken.add(problem.prompt)
                out.append(self.example(problem))
        return out

    @staticmethod
    def example(problem: arithmetic.Problem) -> Example:
        return Example([{"role": "user", "content": problem.prompt}], problem.answer, completion=problem.solution)

    def reward(self, completion: str, example: Example) -> float:
        return arithmetic.reward(completion, example.answer or "")
