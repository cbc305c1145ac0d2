"""A task of your own: any object with ``train_examples``, ``eval_examples`` and ``reward`` (the ``opd.Task``
protocol). This one asks for sums of two digits, a skill the embedded student half has, and grades the
number after ``Answer:``.

    .venv/bin/python examples/custom_task.py [--steps 100] [--out runs/example-sums]
    .venv/bin/opd train task=examples.custom_task:ShortSums steps=100     # the same, by import path
"""

from __future__ import annotations

import argparse
import random

import opd


class ShortSums:
    """``Compute a+b`` for digits a, b: training prompts drawn afresh per (seed, step), a fixed held-out set."""

    name = "short-sums"

    def train_examples(self, step: int, count: int, seed: int) -> list[opd.Example]:
        rng = random.Random(f"{seed}/{step}")  # a pure function of (seed, step): a resumed run sees the same
        return [self.example(rng.randrange(10), rng.randrange(10)) for _ in range(count)]

    def eval_examples(self, count: int) -> list[opd.Example]:
        rng = random.Random("held-out")
        return [self.example(rng.randrange(10), rng.randrange(10)) for _ in range(count)]

    def reward(self, completion: str, example: opd.Example) -> float:
        said = completion.rsplit("Answer:", 1)[-1].strip()
        return 1.0 if said == example.answer else 0.0

    @staticmethod
    def example(a: int, b: int) -> opd.Example:
        return opd.Example([{"role": "user", "content": f"Compute {a}+{b}"}], str(a + b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/example-sums")
    args = parser.parse_args()
    summary = opd.train(task=ShortSums(), steps=args.steps, eval_every=args.steps, eval_examples=64, out=args.out)
    print(f"short sums: {summary['student_accuracy_before']:.1%} -> {summary['student_accuracy_after']:.1%} "
          f"(teacher {summary['teacher_accuracy']:.1%}); the student is in {summary['final']}")


if __name__ == "__main__":
    main()
