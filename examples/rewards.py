"""Reward functions of your own: ``reward(completion, example) -> float``, called once per sampled completion.

Use one from Python (``opd.train(method="rl", reward=brevity)``) or by import path on the command line
(``opd train method=rl reward=examples.rewards:brevity``, run from the repository's root).
"""

from __future__ import annotations

from opd import Example


def brevity(completion: str, example: Example) -> float:
    """1 for a completion of at most 30 characters (about two of the embedded task's three rewriting steps
    skipped), 0 otherwise: a reward RL can raise in a few dozen steps, to see it work."""
    return 1.0 if len(completion) <= 30 else 0.0


def correct_and_short(completion: str, example: Example) -> float:
    """Partial credit: 1 for the right final answer, minus 0.01 per character past 40."""
    said = completion.rsplit("Answer:", 1)[-1].strip()
    return float(said == example.answer) - 0.01 * max(0, len(completion) - 40)
