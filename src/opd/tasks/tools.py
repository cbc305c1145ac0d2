"""The tool task (``task=tools``): products the embedded models cannot do in their heads, and a calculator.

A problem multiplies a three-digit number by a two-digit one, ``Compute 347*86``. The embedded student's
arithmetic works one digit at a time on values up to 99, so it cannot carry such a product; with the
calculator it needs one call and one copy::

    assistant: [calc 347*86]
    tool:      29842
    assistant: Answer: 29842

``[NAME ARGUMENT]`` is the embedded family's own tool-call format (``tool_format=compact``: short, so the
small models' context holds a conversation); real models use their family's own (``tool_format=auto``).
The verifier reads the last reply's ``Answer:``. The train and evaluation splits are disjoint: a problem
is held out exactly when a hash of its text falls in the evaluation bucket.
"""

from __future__ import annotations

import hashlib
import random

from opd.tasks import Example, step_rng
from opd.tasks.arithmetic import reward as answer_reward

EVAL_BUCKETS = 10
ALLOWED = set("0123456789+-*() ")


def calc(expression: str) -> str:
    """A calculator: the value of an integer expression.

    Args:
        expression: digits with + - * and parentheses, e.g. 347*86
    """
    if not expression.strip() or set(expression) - ALLOWED:
        raise ValueError("digits, + - * and parentheses only")
    return str(eval(expression, {"__builtins__": {}}, {}))  # noqa: S307 - the characters are checked above


def held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % EVAL_BUCKETS == 0


class ToolTask:
    """``Compute A*B`` with A of three digits and B of two; the answer is the product."""

    name = "tools"
    EVAL_SEED = 2345

    def problem(self, rng: random.Random, split: str) -> Example:
        while True:
            a, b = rng.randint(100, 999), rng.randint(10, 99)
            prompt = f"Compute {a}*{b}"
            if held_out(prompt) == (split == "eval"):
                return Example([{"role": "user", "content": prompt}], str(a * b))

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        rng = step_rng(seed, step, salt=7)
        return [self.problem(rng, "train") for _ in range(count)]

    def eval_examples(self, count: int) -> list[Example]:
        rng = random.Random(self.EVAL_SEED)
        return [self.problem(rng, "eval") for _ in range(count)]

    def reward(self, completion: str, example: Example) -> float:
        return answer_reward(completion, example.answer)

    @staticmethod
    def transcript(example: Example) -> list[dict]:
        """The conversation a tool user has: the call, the calculator's result, the answer."""
        expression = example.messages[-1]["content"].removeprefix("Compute ")
        return [{"role": "assistant", "content": f"[calc {expression}]"},
                {"role": "tool", "name": "calc", "content": calc(expression)},
                {"role": "assistant", "content": f"Answer: {example.answer}"}]
