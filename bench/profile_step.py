"""Where one on-policy distillation step's time goes.

    .venv/bin/python bench/profile_step.py [--kl full|sampled] [--steps 10] [key=value ...]

Runs opd's own step functions (``step_rollouts``, the teacher's scoring, ``update``) on the embedded
zoo (or the models given as key=value), after two warm-up steps, and reports per phase — sampling,
teacher scoring, student forward+backward, optimizer — its wall time and the part of it spent
inside the models: in a forward of the model, its decoder or its output head (outermost call only),
in ``backward()``, or in ``optimizer.step()`` (all of it). The rest is loop overhead (Python, sampling logic,
batching, log-prob gathering, tokenization, rewards). Prints a table and writes
bench/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from opd.config import load_config
from opd.objective import TeacherSignal
from opd.setup import open_session
from opd.trainer import update

PHASES = ("sampling", "teacher scoring", "student forward+backward", "optimizer")


class ModelClock:
    """Accumulates time spent inside the given modules' forwards (outermost call only) and inside
    ``Tensor.backward``."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.inside = 0.0
        self.depth = 0
        self.started = 0.0
        for module in modules:
            module.register_forward_pre_hook(self.enter)
            module.register_forward_hook(self.leave)
        torch.Tensor.backward = self.timed(torch.Tensor.backward)

    def enter(self, *_):
        if self.depth == 0:
            self.started = time.perf_counter()
        self.depth += 1

    def leave(self, *_):
        self.depth -= 1
        if self.depth == 0:
            self.inside += time.perf_counter() - self.started

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return wrapper


@contextmanager
def phase(clock: ModelClock, totals: dict, name: str):
    inside, started = clock.inside, time.perf_counter()
    yield
    totals[name]["wall"].append(time.perf_counter() - started)
    totals[name]["inside"].append(clock.inside - inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kl", choices=("full", "sampled"), default="full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "profile_step.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"kl={args.kl}", "warmup_steps=1", *args.overrides, f"out={tmp}/run"])
        session = open_session(config)
        teacher = session.teacher_view.model
        modules = [session.student, session.student.get_decoder(), session.student.get_output_embeddings(),
                   teacher, teacher.get_decoder(), session.teacher_view.head]
        clock = ModelClock(modules)
        totals = {name: {"wall": [], "inside": []} for name in PHASES}
        tokens = []
        for step in range(args.steps + 2):
            if step == 2:  # warm-up done
                totals = {name: {"wall": [], "inside": []} for name in PHASES}
                tokens = []
            session.full_model.eval()
            with phase(clock, totals, "sampling"):
                rollouts = session.source.rollouts(step)
            with phase(clock, totals, "teacher scoring"):
                hidden = None
                if config.kl == "full":
                    rollouts.teacher_logprobs, hidden = session.teacher_view.teacher.score_with_hidden(rollouts)
                else:
                    rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
                rollouts.advantages = session.objective.advantages(rollouts)
            optimizer_step = session.optimizer.step
            optimizer_seconds: list[float] = []

            def timed_step(*a, _inner=optimizer_step, _seconds=optimizer_seconds, **k):
                started = time.perf_counter()
                result = _inner(*a, **k)
                _seconds.append(time.perf_counter() - started)
                return result

            session.optimizer.step = timed_step
            with phase(clock, totals, "student forward+backward"):
                signal = None if hidden is None else TeacherSignal(hidden=hidden, head=session.teacher_view.head)
                update(session, rollouts, signal, rollouts.num_completion_tokens, step)
            session.optimizer.step = optimizer_step
            # the optimizer step is all arithmetic: its wall time counts as inside the model
            totals["student forward+backward"]["wall"][-1] -= optimizer_seconds[0]
            totals["optimizer"]["wall"].append(optimizer_seconds[0])
            totals["optimizer"]["inside"].append(optimizer_seconds[0])
            tokens.append(rollouts.num_completion_tokens)

    rows = {name: {"wall_seconds": statistics.mean(t["wall"]), "inside_seconds": statistics.mean(t["inside"])}
            for name, t in totals.items()}
    step_wall = sum(r["wall_seconds"] for r in rows.values())
    step_inside = sum(r["inside_seconds"] for r in rows.values())
    print(f"one step, kl={args.kl}, mean of {args.steps} after 2 warm-up; {statistics.mean(tokens):.0f} completion "
          f"tokens; {torch.get_num_threads()} threads\n")
    print(f"{'phase':28}{'wall s':>9}{'share':>8}{'in model s':>12}{'overhead':>10}")
    for name, row in rows.items():
        overhead = 1 - row["inside_seconds"] / row["wall_seconds"] if row["wall_seconds"] else 0.0
        print(f"{name:28}{row['wall_seconds']:9.4f}{row['wall_seconds'] / step_wall:8.1%}"
              f"{row['inside_seconds']:12.4f}{overhead:10.1%}")
    overhead = 1 - step_inside / step_wall
    print(f"{'step':28}{step_wall:9.4f}{1:8.1%}{step_inside:12.4f}{overhead:10.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kl": args.kl, "steps": args.steps, "threads": torch.get_num_threads(),
                                    "completion_tokens": statistics.mean(tokens), "phases": rows,
                                    "step_seconds": step_wall, "loop_overhead": overhead}, indent=2) + "\n")


if __name__ == "__main__":
    main()
