"""Rollouts from a server against the in-process sampler, on the embedded pair: learning and speed.

    .venv/bin/python bench/rollout_server.py [--steps 100] [--seeds 0,1,2] [--variants local,http,async,...]

Each variant is a whole `opd train` run (a subprocess) of the default config for ``--steps`` steps with
evaluations at 0, half way and the end (256 held-out prompts, greedy and 4 samples each). The ``http``
variants start `opd serve embedded:student` on one core (OMP_NUM_THREADS=1) and train on the other;
``local`` trains on both cores. Writes bench/results/rollout_server.json: per variant the accuracies with
their binomial standard errors, wall seconds, steps/s (evaluations excluded), and the mean time per step
in sampling, pushing weights, scoring and the update, with the engine/trainer mismatch statistics.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opd.http import wait_until_healthy
from opd.server import free_port

VARIANTS = {
    "local": [],
    "http": ["sampler=SERVER"],
    "async": ["sampler=SERVER", "async_rollouts=1"],
    "local-lora": ["lora_rank=32", "lr=2e-3"],
    "http-lora": ["lora_rank=32", "lr=2e-3", "sampler=SERVER"],
}


def start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "opd", "serve", "embedded:student", "--port", str(port),
                               "--name", "student"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
    except Exception:
        server.kill()
        raise
    return server


def run(name: str, steps: int, root: Path, seed: int) -> dict:
    overrides = VARIANTS[name]
    server = None
    if any("SERVER" in o for o in overrides):
        port = free_port()
        server = start_server(port)
        overrides = [o.replace("SERVER", f"http://127.0.0.1:{port}") for o in overrides]
    out = root / f"{name}-{seed}"
    threads = "1" if server else "2"
    command = [sys.executable, "-m", "opd", "train", f"steps={steps}", f"eval_every={steps // 2}",
               f"save_every={steps}", f"out={out}", f"seed={seed}", *overrides]
    started = time.time()
    try:
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                       stdout=subprocess.DEVNULL)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    wall = time.time() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "accuracy" in r]
    trained = [r for r in records if r["step"] > 0]
    n = 256

    def with_error(p: float, draws: int) -> dict:
        return {"value": round(p, 4), "se": round(math.sqrt(p * (1 - p) / draws), 4)}

    def mean(key: str) -> float | None:
        values = [r[key] for r in trained if r.get(key) is not None]
        return round(sum(values) / len(values), 5) if values else None

    return {
        "seed": seed, "overrides": overrides, "wall_seconds": round(wall, 1),
        "steps_per_second": round(len(trained) / sum(r["sample_seconds"] + r.get("sync_seconds", 0)
                                                     + r["score_seconds"] + r["train_seconds"] for r in trained), 3),
        "evals": [{"step": r["step"], "greedy": with_error(r["accuracy"], n),
                   "sampled": with_error(r["sampled_accuracy"], 4 * n), "teacher_kl": r["eval_teacher_kl"]}
                  for r in evals],
        "per_step_seconds": {k: mean(k) for k in ("sample_seconds", "sync_seconds", "score_seconds",
                                                  "train_seconds")},
        "engine": {k: mean(k) for k in ("is_ratio_mean", "is_ratio_max", "is_truncated_share", "engine_kl",
                                        "engine_max_abs_logprob_gap")},
    }


def spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": round(mean, 4), "sd_across_seeds": sd and round(sd, 4), "values": values}


def table(results: dict) -> str:
    """The README's table: per variant the mean over seeds (and the spread across seeds) at the last step."""
    lines = ["| variant | sampled accuracy | greedy accuracy | eval KL | steps/s | sampling s/step | push s/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in results["variants"].items():
        runs = v["runs"]

        def mean_of(key: str, runs: list = runs) -> str:
            values = [r["per_step_seconds"][key] for r in runs if r["per_step_seconds"][key] is not None]
            return f"{sum(values) / len(values):.3f}" if values else "—"

        def pct(spread_: dict) -> str:
            sd = spread_["sd_across_seeds"]
            return f"{100 * spread_['mean']:.1f}" + (f" (sd {100 * sd:.1f})" if sd is not None else "")

        lines.append(f"| {name} | {pct(v['final_sampled'])} | {pct(v['final_greedy'])} | "
                     f"{v['final_teacher_kl']['mean']:.3f} | {v['steps_per_second']['mean']:.2f} | "
                     f"{mean_of('sample_seconds')} | {mean_of('sync_seconds')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0", help="training seeds, a comma list (default 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="bench/results/rollout_server.json")
    parser.add_argument("--table", help="print the markdown table of a results file and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name in args.variants.split(","):
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
                runs.append(run(name, args.steps, Path(root), seed))
                print(name, json.dumps(runs[-1]), flush=True)
            results[name] = {
                "final_sampled": spread([r["evals"][-1]["sampled"]["value"] for r in runs]),
                "final_greedy": spread([r["evals"][-1]["greedy"]["value"] for r in runs]),
                "final_teacher_kl": spread([round(r["evals"][-1]["teacher_kl"], 4) for r in runs]),
                "steps_per_second": spread([r["steps_per_second"] for r in runs]),
                "runs": runs}
    Path(args.out).write_text(json.dumps({"steps": args.steps, "variants": results}, indent=2) + "\n")
    print(table({"variants": results}))


if __name__ == "__main__":
    main()
