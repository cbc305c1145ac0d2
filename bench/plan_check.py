"""How close `opd plan` comes: its wall-time estimate and its memory estimate against the measured run, on the
embedded default (800 steps) and on a wider student (4 layers x 256, random weights, 200 steps).

    .venv/bin/python bench/plan_check.py [--out bench/results/plan_check.json] [--steps-wide 200]

Each run is measured in its own process: the wall time of `train` as a whole (setup, training,
evaluations, checkpoints, report) and the peak resident set over it, less the resident set after the imports
(/proc/self/clear_refs resets the peak), taken after importing what the
run will import (the model's code, peft, matplotlib): the plan counts tensors, not the process's code. The
plan is made first, in another process, by `opd plan --json --nproc 1` (its probe included). Runs one at a
time: on two cores a run beside another would time both wrong. What the plan counts, tensors, is measured as
well: the peak of "Total Allocated" in torch.profiler's memory events (profile_memory=True) over a 4-step run
of the same config, which holds every phase at its real size (the profiler's overhead would spoil the
timing, so that run is not timed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, sys, time
from pathlib import Path
import matplotlib.pyplot, peft, transformers.models.qwen3.modeling_qwen3  # the process itself, before the baseline
from opd.config import load_config
from opd.probe import reset_peak, rss_bytes
from opd.trainer import train
config = load_config(None, sys.argv[2:])
reset_peak(); base = rss_bytes("VmRSS"); started = time.perf_counter()
summary = train(config, progress=False)
Path(sys.argv[1]).write_text(json.dumps({"wall_seconds": time.perf_counter() - started,
    "peak_memory": rss_bytes("VmHWM") - base, "completion_tokens_trained": summary["completion_tokens_trained"]}))
"""


ALLOCATED = """
import json, sys
from torch.profiler import ProfilerActivity, profile
from opd.config import load_config
from opd.trainer import train
config = load_config(None, sys.argv[3:])
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    train(config, progress=False)
prof.export_chrome_trace(sys.argv[2])
events = json.load(open(sys.argv[2]))["traceEvents"]
peak = max(e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]")
open(sys.argv[1], "w").write(json.dumps({"allocated_peak": peak}))
"""
ALLOCATED_STEPS = 4  # the profiled run: every phase (both step-0 evaluations, training, an evaluation, a checkpoint)


def allocated_peak(name: str, overrides: list[str], root: Path) -> int:
    """The peak of the bytes torch's CPU allocator holds ("Total Allocated" of the profiler's memory events)
    over a short run of the same config: every phase the plan counts, at its real size, in 4 steps."""
    result, trace = root / f"{name}-allocated.json", root / f"{name}-trace.json"
    run = [*overrides, f"steps={ALLOCATED_STEPS}", f"eval_every={ALLOCATED_STEPS}",
           f"out={root / 'runs' / (name + '-profiled')}"]
    done = subprocess.run([sys.executable, "-c", ALLOCATED, str(result), str(trace), *run], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the profiled run failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())["allocated_peak"]


def wide_student(root: Path) -> Path:
    from opd.models import load_tokenizer, resolve_model_path, save_model
    from opd.zoo import make_model

    tokenizer = load_tokenizer(resolve_model_path("embedded:student"))
    path = root / "student-4x256"
    save_model(make_model(tokenizer, layers=4, width=256, seed=5), tokenizer, path)
    return path


def check(name: str, overrides: list[str], root: Path) -> dict:
    plan = json.loads(subprocess.run([sys.executable, "-m", "opd", "plan", *overrides, "--json", "--nproc", "1"],
                                     check=True, capture_output=True, text=True).stdout)
    result = root / f"{name}.json"
    run = [*overrides, f"out={root / 'runs' / name}"]
    done = subprocess.run([sys.executable, "-c", MEASURE, str(result), *run], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the run failed:\n{done.stderr[-3000:]}")
    measured = json.loads(result.read_text())
    estimate = plan["layouts"][0]["peak"]
    allocated = allocated_peak(name, overrides, root)
    row = {"name": name, "overrides": overrides,
           "plan_wall_seconds": plan["probe"]["wall_seconds"], "wall_seconds": measured["wall_seconds"],
           "wall_ratio": plan["probe"]["wall_seconds"] / measured["wall_seconds"],
           "plan_peak_memory": estimate, "probe_peak_memory": plan["probe"]["peak_memory"],
           "peak_memory": measured["peak_memory"], "memory_ratio": estimate / measured["peak_memory"],
           "probe_memory_ratio": plan["probe"]["peak_memory"] / measured["peak_memory"],
           "allocated_peak_memory": allocated, "allocated_ratio": estimate / allocated,
           "plan_step_seconds": plan["probe"]["step_seconds"], "probe_completion_tokens":
           plan["probe"]["completion_tokens"]}
    print(f"{name}: wall {row['plan_wall_seconds']:.0f} s planned vs {row['wall_seconds']:.0f} s measured "
          f"(x{row['wall_ratio']:.2f}); peak memory {estimate / 2**20:.0f} MiB planned, probe "
          f"{row['probe_peak_memory'] / 2**20:.0f} MiB, run {row['peak_memory'] / 2**20:.0f} MiB "
          f"(x{row['memory_ratio']:.2f}, probe x{row['probe_memory_ratio']:.2f}); torch's allocator peak "
          f"{allocated / 2**20:.0f} MiB (x{row['allocated_ratio']:.2f})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/plan_check.json")
    parser.add_argument("--steps-wide", type=int, default=200)
    parser.add_argument("--allocated-only", action="store_true",
                        help="only (re)measure torch's allocator peak, into the rows already in --out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opd-plan-check-") as tmp:
        root = Path(tmp)
        if args.allocated_only:
            rows = json.loads(Path(args.out).read_text())
            cases = {"embedded-default": [], "student-4x256": [f"student={wide_student(root)}"]}
            for row in rows:
                row["allocated_peak_memory"] = allocated_peak(row["name"], cases[row["name"]], root)
                row["allocated_ratio"] = row["plan_peak_memory"] / row["allocated_peak_memory"]
                print(f"{row['name']}: planned {row['plan_peak_memory'] / 2**20:.0f} MiB, torch's allocator peak "
                      f"{row['allocated_peak_memory'] / 2**20:.0f} MiB (x{row['allocated_ratio']:.2f})", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
            return
        rows = [check("embedded-default", [], root),
                check("student-4x256", [f"student={wide_student(root)}", f"steps={args.steps_wide}"], root)]
    for row in rows:
        row["overrides"] = [o if not o.startswith("student=") else "student=<4x256 random, built here>"
                            for o in row["overrides"]]
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
