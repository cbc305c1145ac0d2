"""GKD's knobs on the embedded pair: the top-k estimate's bias, and learning under each estimator, divergence
and on-policy share.

    .venv/bin/python bench/gkd_table.py [--steps 300] [--bias-only] [--variants NAME,...]

1. Bias (no training): 64 held-out prompts x 4 samples of the embedded student; at every completion position
   the exact reverse and forward KL to the embedded teacher against their top-k estimates (the teacher's K
   most likely tokens plus a tail bucket, ``divergences.topk_divergence_from_logits``) for K = 1, 5, 20.
2. Learning: `opd train` of the default config (a subprocess each) for ``--steps`` steps, evaluated every
   ``steps / 3`` on the 256 held-out prompts (greedy, and 4 samples each): the estimators (kl=sampled, kl=topk
   K=20, kl=full), then each divergence at lmbda 1 and 0.5 (the off-policy half: the task's reference
   solutions). Steps to a target: the first evaluation at or above it.

Writes bench/results/gkd_table.json and prints the README's tables. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = {
    "sampled": ["kl=sampled"],
    "topk20": ["kl=topk", "teacher_topk=20"],
    "full": ["kl=full"],
    "forward_kl": ["kl=full", "divergence=forward_kl"],
    "jsd0.5": ["kl=full", "divergence=jsd", "beta=0.5"],
    "reverse_lmbda0.5": ["kl=full", "lmbda=0.5"],
    "forward_lmbda0.5": ["kl=full", "divergence=forward_kl", "lmbda=0.5"],
    "jsd0.5_lmbda0.5": ["kl=full", "divergence=jsd", "beta=0.5", "lmbda=0.5"],
}


@torch.no_grad()
def bias(prompts: int = 64, samples: int = 4) -> dict:
    from opd.divergences import divergence_from_logits, topk_divergence_from_logits
    from opd.models import chat_prompt_ids, load_model, load_tokenizer, resolve_model_path
    from opd.samplers.local import sample
    from opd.scoring import completion_hidden, head_logits, head_logprobs
    from opd.tasks import ArithmeticTask

    student_path, teacher_path = resolve_model_path("embedded:student"), resolve_model_path("embedded:teacher")
    tokenizer = load_tokenizer(student_path)
    cpu = torch.device("cpu")
    student, teacher = (load_model(p, cpu, torch.float32).eval() for p in (student_path, teacher_path))
    ids = [chat_prompt_ids(tokenizer, ex.messages) for ex in ArithmeticTask().eval_examples(prompts)]
    rollouts = sample(student, ids, samples_per_prompt=samples, max_new_tokens=48, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      generator=torch.Generator().manual_seed(0))
    vocab = len(tokenizer)
    s_hidden, s_head = completion_hidden(student, rollouts)
    t_hidden, t_head = completion_hidden(teacher, rollouts)
    logits = head_logits(s_head, s_hidden, vocab).double()
    teacher_lp = head_logprobs(t_head, t_hidden, vocab).double()
    out = {"positions": logits.shape[0], "vocab": vocab}
    for kind in ("reverse_kl", "forward_kl"):
        exact = divergence_from_logits(kind)(logits, teacher_lp)
        row = {"exact": float(exact.mean())}
        for k in (1, 5, 20):
            top = teacher_lp.topk(k, dim=-1)
            estimate = topk_divergence_from_logits(logits, top.indices, top.values, kind)
            row[f"k{k}"] = {"mean": float(estimate.mean()),
                            "relative_bias": float((estimate.mean() - exact.mean()) / exact.mean()),
                            "share_of_exact_per_position_median": float((estimate / exact.clamp(min=1e-12)).median()),
                            "max_gap": float((exact - estimate).max())}
        out[kind] = row
    return out


def learn(name: str, steps: int, root: Path) -> dict:
    out = root / name
    every = max(steps // 3, 1)
    command = [sys.executable, "-m", "opd", "train", f"steps={steps}", f"eval_every={every}", f"save_every={steps}",
               f"out={out}", *VARIANTS[name]]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [{"step": r["step"], "greedy": r["accuracy"], "sampled": r["sampled_accuracy"],
              "teacher_kl": r["eval_teacher_kl"]} for r in records if "accuracy" in r]
    trained = [r for r in records if r["step"] > 0]
    return {"overrides": VARIANTS[name], "evals": evals,
            "seconds_per_step": sum(r["elapsed"] - p["elapsed"] for r, p in zip(trained[1:], trained, strict=False)
                                    if "accuracy" not in r) / max(len(trained) - 1, 1),
            "teacher_flops": trained[-1]["teacher_flops_total"], "student_flops": trained[-1]["student_flops_total"]}


def steps_to(evals: list[dict], key: str, target: float) -> int | None:
    return next((e["step"] for e in evals if e[key] is not None and e[key] >= target), None)


def tables(results: dict) -> str:
    lines = []
    if "bias" in results:
        b = results["bias"]
        lines += [f"Top-k bias ({b['positions']} positions of the student's samples, vocabulary {b['vocab']}):", "",
                  "| divergence | exact | K=1 | K=5 | K=20 |", "| --- | --- | --- | --- | --- |"]
        for kind in ("reverse_kl", "forward_kl"):
            row = b[kind]
            cells = " | ".join(f"{row[f'k{k}']['mean']:.4f} ({100 * row[f'k{k}']['relative_bias']:+.1f}%)"
                               for k in (1, 5, 20))
            lines.append(f"| {kind} | {row['exact']:.4f} | {cells} |")
        lines.append("")
    if "learning" in results:
        n, target = 256, results.get("target", 0.45)
        steps = [e["step"] for e in next(iter(results["learning"].values()))["evals"][1:]]
        lines += ["| variant | " + " | ".join(f"sampled @{s}" for s in steps) +
                  f" | greedy @{steps[-1]} | eval KL @{steps[-1]} | steps to {100 * target:.0f}% sampled | FLOPs |",
                  "| --- |" + " --- |" * (len(steps) + 4)]
        for name, run in results["learning"].items():
            cells = " | ".join(f"{100 * e['sampled']:.1f}" for e in run["evals"][1:])
            last = run["evals"][-1]
            se = 100 * math.sqrt(last["sampled"] * (1 - last["sampled"]) / (4 * n))
            reached = steps_to(run["evals"], "sampled", target)
            flops = (run["student_flops"] or 0) + (run["teacher_flops"] or 0)
            lines.append(f"| {name} | {cells} (±{se:.1f}) | {100 * last['greedy']:.1f} | {last['teacher_kl']:.3f} | "
                         f"{reached if reached is not None else f'> {steps[-1]}'} | {flops:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bias-only", action="store_true")
    parser.add_argument("--out", default="bench/results/gkd_table.json")
    parser.add_argument("--table", help="print the tables of a results file and stop")
    args = parser.parse_args()
    if args.table:
        print(tables(json.loads(Path(args.table).read_text())))
        return
    results = {"steps": args.steps, "bias": bias()}
    print(json.dumps(results["bias"]), flush=True)
    if not args.bias_only:
        results["learning"] = {}
        with tempfile.TemporaryDirectory() as root:
            for name in args.variants.split(","):
                results["learning"][name] = learn(name, args.steps, Path(root))
                print(name, json.dumps(results["learning"][name]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))


if __name__ == "__main__":
    main()
