"""Evaluate a saved student (a run's ``final/``, any model directory, a hub id, or ``embedded:student``):
greedy and sampled accuracy on the held-out split, and the per-token reverse KL to a teacher.

    .venv/bin/python examples/evaluate_saved.py [MODEL] [--teacher embedded:teacher] [--examples 128]
"""

from __future__ import annotations

import argparse

import opd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="embedded:student")
    parser.add_argument("--teacher", default="embedded:teacher")
    parser.add_argument("--examples", type=int, default=128)
    args = parser.parse_args()
    result = opd.evaluate(args.model, examples=args.examples, samples=4, teacher=args.teacher)
    print(f"{args.model}: greedy {result.accuracy:.1%}, sampled {result.sampled_accuracy:.1%} (4 draws at T=1), "
          f"reverse KL to {args.teacher} {result.teacher_kl:.3f} on {args.examples} held-out problems")


if __name__ == "__main__":
    main()
