"""RL (and opd+rl) with a reward function of your own, from Python; ``examples/rewards.py`` holds the
functions, which the command line takes by import path as well:

    .venv/bin/python examples/custom_reward.py [--steps 20] [--out runs/example-reward]
    .venv/bin/opd train method=rl reward=examples.rewards:brevity lr=1e-3 steps=20   # the same
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `examples.rewards` from anywhere

import opd  # noqa: E402
from examples.rewards import brevity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/example-reward")
    args = parser.parse_args()
    summary = opd.train(method="rl", reward=brevity, lr=1e-3, warmup_steps=1, steps=args.steps, prompts_per_step=16,
                        eval_every=args.steps, eval_examples=64, out=args.out)
    lines = Path(args.out, "metrics.jsonl").read_text().splitlines()[1:]
    rewards = [json.loads(line)["train_reward"] for line in lines]
    print(f"brevity reward per step: {rewards[0]:.2f} -> {rewards[-1]:.2f}; held-out (same reward): "
          f"{summary['student_accuracy_before']:.1%} -> {summary['student_accuracy_after']:.1%}")


if __name__ == "__main__":
    main()
