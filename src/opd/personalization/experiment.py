"""``opd experiment personalization``: teach the assistant an organisation's documents by midtraining,
then restore its instruction following by on-policy distillation from its own earlier self.

Rows (the blog's table): the assistant; + midtraining on documents only; + midtraining on a
documents/chat mix; + that, then on-policy distillation with the original assistant as the teacher,
on instruction prompts. Each row is scored on held-out questions about the documents (QA) and on
held-out instruction prompts (every constraint verified). Every stage is an ordinary run directory
under ``OUT/runs/``; running the command again reuses finished stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd import runs
from opd.experiments import run_config, run_once
from opd.models import load_model, load_tokenizer, pick_device, pick_dtype
from opd.personalization.assistant import DATA_DIR, scores
from opd.report import pct, plt, save_figure

ROWS = {"assistant": "assistant", "midtrain_docs": "+ midtrain on docs only",
        "midtrain_mix": "+ midtrain on docs/chat mix", "midtrain_mix_distilled": "+ that, then on-policy distillation "
        "from the assistant"}


@dataclass
class PersonalizationPlan:
    out: Path
    assistant: str = "embedded:assistant"
    data: Path = DATA_DIR
    midtrain_steps: int = 300
    midtrain_lr: float = 1e-3
    chat_fraction: float = 0.3
    distill_steps: int = 200
    distill_lr: float = 3e-4
    segments: int = 5  # evaluation points along the distillation
    max_new_tokens: int = 64
    overrides: list[str] = field(default_factory=list)  # config fields for every run


def scored(model_dir: Path, data: Path, max_new_tokens: int, cache: Path) -> dict:
    """QA and instruction-following scores of a model directory, cached in ``cache``."""
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("model") == str(model_dir):
            return saved["scores"]
    device = pick_device("auto")
    model = load_model(model_dir, device, pick_dtype("auto", device))
    result = scores(model, load_tokenizer(model_dir), data, max_new_tokens)
    cache.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(cache, {"model": str(model_dir), "scores": result})
    return result


def stage_flops(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"student_flops": summary["student_flops"], "teacher_flops": summary["teacher_flops"],
            "wall_seconds": summary["wall_seconds"]}


def run_personalization(plan: PersonalizationPlan, progress: bool = True) -> dict:
    from opd.models import resolve_model_path

    started = time.perf_counter()
    assistant = Path(resolve_model_path(plan.assistant))
    data, out, n = plan.data, plan.out, plan.max_new_tokens
    out.mkdir(parents=True, exist_ok=True)
    rows = {"assistant": scored(assistant, data, n, out / "assistant_scores.json")}
    midtrain = {"method": "midtrain", "student": assistant, "docs": data / "docs.jsonl", "steps": plan.midtrain_steps,
                "lr": plan.midtrain_lr, "task": data / "qa.jsonl", "eval_file": data / "qa.jsonl",
                "eval_every": max(plan.midtrain_steps // 5, 1), "save_every": plan.midtrain_steps,
                "max_new_tokens": n, "eval_samples": 0}  # the rows are scored greedily by scored(), below
    stages = {"midtrain_docs": {**midtrain},
              "midtrain_mix": {**midtrain, "sft_data": data / "chat.jsonl", "chat_fraction": plan.chat_fraction}}
    flops = {}
    for i, (name, values) in enumerate(stages.items(), start=1):
        run_dir = out / "runs" / name
        run_once(run_config(plan.overrides, run_dir, **values), progress, f"[{i}/3] {name}")
        rows[name] = scored(run_dir / "final", data, n, run_dir / "scores.json")
        flops[name] = stage_flops(run_dir)

    distill_dir = out / "runs" / "distill"
    curve = [{"step": 0, **rows["midtrain_mix"]}]
    per_segment = max(plan.distill_steps // plan.segments, 1)
    for steps in range(per_segment, plan.distill_steps + 1, per_segment):
        config = run_config(plan.overrides, distill_dir, method="opd", student=out / "runs" / "midtrain_mix" / "final",
                            teacher=assistant, task=data / "ifeval_train.jsonl",
                            eval_file=data / "ifeval_eval.jsonl", steps=steps, lr=plan.distill_lr,
                            eval_every=per_segment, save_every=per_segment, max_new_tokens=n, eval_samples=0)
        run_once(config, progress, f"[3/3] distil to step {steps}/{plan.distill_steps}")
        curve.append({"step": steps, **scored(distill_dir / "final", data, n, distill_dir / f"scores_{steps}.json")})
    rows["midtrain_mix_distilled"] = {k: curve[-1][k] for k in ("qa", "instruction_following")}
    flops["distill"] = stage_flops(distill_dir)
    counts = {key: sum(1 for line in (data / name).read_text().splitlines() if line.strip())
              for key, name in (("qa", "qa.jsonl"), ("instruction_following", "ifeval_eval.jsonl"))}
    summary = {**rows, "curve": curve, "compute": flops, "chat_fraction": plan.chat_fraction, "examples": counts,
               "midtrain_steps": plan.midtrain_steps, "distill_steps": plan.distill_steps,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    runs.write_json(out / "summary.json", summary)
    write_report(out, summary)
    return summary


def plot(summary: dict, path: Path) -> None:
    curve, assistant = summary["curve"], summary["assistant"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, colour, label in (("instruction_following", "tab:green", "instruction following"),
                               ("qa", "tab:blue", "internal QA")):
        ax.plot([p["step"] for p in curve], [p[key] for p in curve], "o-", color=colour, label=label)
        ax.axhline(assistant[key], color=colour, linestyle="--", alpha=0.6, label=f"{label}: assistant")
    ax.set(xlabel="on-policy distillation steps (from the docs/chat midtrained model)", ylabel="score",
           ylim=(0, 1.02), title="Restoring behaviour by distilling from the earlier assistant")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)



def write_report(out: Path, summary: dict) -> None:
    plot(summary, out / "scores.png")
    a, docs, mix, final = (summary[k] for k in ROWS)
    n = summary.get("examples", {})
    n_qa, n_if = n.get("qa"), n.get("instruction_following")
    follow = {k: pct(v["instruction_following"]) for k, v in (("a", a), ("docs", docs))}
    lines = ["# Personalization: learn new knowledge, then restore behaviour by distilling from your earlier self",
             "", f"| model | internal QA ({n_qa} questions) | instruction following ({n_if} prompts) |",
             "| --- | --- | --- |"]
    lines += [f"| {label} | {pct(summary[key]['qa'], n_qa)} | {pct(summary[key]['instruction_following'], n_if)} |"
              for key, label in ROWS.items()]
    verdicts = [
        f"- Midtraining on documents {'raised' if docs['qa'] > a['qa'] else 'did not raise'} QA "
        f"({pct(a['qa'])} -> {pct(docs['qa'])}) and "
        f"{'lowered' if docs['instruction_following'] < a['instruction_following'] else 'did not lower'} "
        f"instruction following ({follow['a']} -> {follow['docs']}).",
        f"- Mixing {100 * summary['chat_fraction']:.0f}% chat into midtraining kept instruction following at "
        f"{pct(mix['instruction_following'])} (QA {pct(mix['qa'])}).",
        f"- On-policy distillation from the original assistant brought instruction following to "
        f"{pct(final['instruction_following'])} "
        f"({100 * (final['instruction_following'] - a['instruction_following']):+.1f} points against the assistant) "
        f"with QA at {pct(final['qa'])} (was {pct(mix['qa'])} before distilling).",
    ]
    compute = summary["compute"]
    lines += ["", "## What the toy shows", "", *verdicts, "", "![scores along distillation](scores.png)", "",
              "## Compute", "", "| stage | student FLOPs | teacher FLOPs | wall time |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {c['student_flops']:.2e} | {c['teacher_flops'] or 0:.2e} | {c['wall_seconds']:.0f} s |"
              for name, c in compute.items()]
    lines += ["", "How to read it: internal QA is the share of held-out questions about the documents whose "
              "answer appears in the reply (normalised, whole words); instruction following is the share of "
              "held-out instruction prompts whose every constraint holds (`opd.tasks.ifeval`). Both are greedy; "
              "± is one "
              "binomial standard error, sqrt(p(1-p)/N), so a difference inside two of them is noise. "
              "The distillation's teacher is the assistant itself, before midtraining.", "",
              f"Wall time {summary['wall_seconds']:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))
