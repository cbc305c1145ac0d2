"""``opd experiment tools``: teaching a student to use a calculator, on-policy distillation against SFT on the
teacher's transcripts, at equal compute.

The task (``task=tools``) multiplies a three-digit number by a two-digit one, which the embedded student
cannot do in its head. The teacher (``embedded:tool-teacher``, ``opd zoo tools``) answers with a
``[calc A*B]`` call and then the calculator's result. Both arms start from the same student, see the same
prompts and converse with the same calculator (``tools=opd.tasks.tools:calc``, ``tool_format=compact``):

- ``opd``: the student converses, the teacher grades every token it wrote (``kl=full``);
- ``sft``: the teacher converses, the student trains on the teacher's turns (cross-entropy; the
  calculator's messages are context, as in the ``opd`` arm);
- ``sft+opd``: ``sft`` for the first ``sft_start`` steps, then on-policy distillation from there (the blog's
  recipe: a student that already writes the format), the same steps in all.

Held-out figures (greedy, the calculator in the loop): accuracy, the share of conversations with a valid
call, the share of calls that were valid; each arm's at the largest compute both reached (student and teacher
FLOPs, as ``opd train`` counts them), with one binomial standard error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd import runs
from opd.errors import OpdError
from opd.experiments import evals, run_config, run_once, total_flops
from opd.report import plt, save_figure

TOOLS = {"task": "tools", "tools": "opd.tasks.tools:calc", "tool_format": "compact", "teacher": "embedded:tool-teacher",
         "max_turns": 3, "max_new_tokens": 32, "eval_samples": 0, "kl": "full", "warmup_steps": 10}
ARMS = {"opd": "on-policy distillation", "sft": "SFT on the teacher's transcripts",
        "sft+opd": "SFT, then on-policy distillation"}


@dataclass
class ToolsPlan:
    out: Path
    steps: int = 200
    prompts_per_step: int = 16
    samples_per_prompt: int = 2
    lr_opd: float = 2e-3
    lr_sft: float = 1e-3
    eval_every: int = 25
    eval_examples: int = 256
    overrides: list[str] = field(default_factory=list)
    sft_start: int = 25  # sft+opd: SFT steps before on-policy distillation takes over


def ensure_teacher() -> None:
    from opd.models import EMBEDDED_DIR
    from opd.zoo_tools import build_tool_teacher

    if not (EMBEDDED_DIR / "tool-teacher" / "config.json").is_file():
        build_tool_teacher()


def se(p: float | None, n: int) -> str:
    if p is None:
        return "—"
    return f"{100 * p:.1f}% ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def shifted(point: dict, before: dict) -> dict:
    """A point of the second run of a chain, in the chain's steps and compute."""
    out = {**point, "step": point["step"] + before["step"]}
    for key in ("student_flops_total", "teacher_flops_total"):
        if out.get(key) is not None and before.get(key) is not None:
            out[key] = out[key] + before[key]
    return out


def at_budget(points: list[dict], budget: float) -> dict:
    """The last evaluation whose total compute is within ``budget`` (step 0 counts none)."""
    within = [p for p in points if (total_flops(p) or 0.0) <= budget * (1 + 1e-9)]
    return within[-1] if within else points[0]


def run_tools(plan: ToolsPlan, progress: bool = True) -> dict:
    if not 0 < plan.sft_start < plan.steps:
        raise OpdError(f"--sft-start {plan.sft_start} must be between 0 and --steps {plan.steps}, exclusive")
    started = time.time()
    ensure_teacher()
    def arm(key: str, method: str, steps: int, desc: str, **extra) -> list[dict]:
        values = {**TOOLS, "method": method, "steps": steps, "prompts_per_step": plan.prompts_per_step,
                  "samples_per_prompt": plan.samples_per_prompt, "lr": plan.lr_opd if method == "opd" else plan.lr_sft,
                  "eval_every": plan.eval_every, "save_every": steps, "eval_examples": plan.eval_examples, **extra}
        return evals(run_once(run_config(plan.overrides, plan.out / "runs" / key, **values), progress, desc))

    curves = {"opd": arm("opd", "opd", plan.steps, "[1/4] opd"), "sft": arm("sft", "sft", plan.steps, "[2/4] sft")}
    start = arm("sft-start", "sft", plan.sft_start, "[3/4] sft+opd: sft")
    then = arm("sft-then-opd", "opd", plan.steps - plan.sft_start, "[4/4] sft+opd: opd",
               student=plan.out / "runs" / "sft-start" / "final")
    curves["sft+opd"] = start + [shifted(p, start[-1]) for p in then[1:]]
    n = plan.eval_examples
    budget = min(total_flops(points[-1]) or 0.0 for points in curves.values())
    summary = {"eval_examples": n, "budget_flops": budget, "plan": {k: str(v) for k, v in vars(plan).items()}}
    for key, points in curves.items():
        first, last, matched = points[0], points[-1], at_budget(points, budget)
        summary[key] = {
            "accuracy_before": first["accuracy"], "accuracy_after": last["accuracy"],
            "accuracy_at_budget": matched["accuracy"], "step_at_budget": matched["step"],
            "tool_use_after": last.get("eval_tool_use_share"),
            "valid_calls_after": last.get("eval_valid_tool_call_share"),
            "tool_use_at_budget": matched.get("eval_tool_use_share"),
            "valid_calls_at_budget": matched.get("eval_valid_tool_call_share"),
            "teacher_kl_after": last.get("eval_teacher_kl"), "flops": total_flops(last),
            "teacher_accuracy": first.get("teacher_accuracy"),
            "curve": [[p["step"], total_flops(p) or 0.0, p["accuracy"], p.get("eval_tool_use_share")] for p in points]}
    summary["wall_seconds"] = time.time() - started
    runs.write_json(plan.out / "summary.json", summary)
    plot(curves, budget, plan.out / "tools.png")
    write_report(plan, summary)
    return summary


def plot(curves: dict[str, list[dict]], budget: float, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in curves.items():
        xs = [total_flops(p) or 0.0 for p in points]
        left.plot(xs, [p["accuracy"] for p in points], "o-", markersize=3, label=ARMS[key])
        right.plot(xs, [p.get("eval_tool_use_share") or 0.0 for p in points], "o-", markersize=3, label=ARMS[key])
    for ax, label in ((left, "held-out accuracy (greedy, calculator in the loop)"),
                      (right, "conversations with a valid tool call")):
        ax.axvline(budget, color="grey", linestyle=":", label="equal compute")
        ax.set(xlabel="FLOPs (student + teacher)", ylabel=label, ylim=(-0.02, 1.02))
    left.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def write_report(plan: ToolsPlan, summary: dict) -> None:
    n = summary["eval_examples"]
    teacher = summary["opd"]["teacher_accuracy"]
    lines = ["# Tool use: on-policy distillation against SFT on the teacher's transcripts", "",
             f"Task `tools` (A*B, A of three digits, B of two), the calculator in the loop (`[calc A*B]`), "
             f"{plan.steps} steps of {plan.prompts_per_step} prompts x {plan.samples_per_prompt} conversations, "
             f"learning rates {plan.lr_opd:g} (opd) and {plan.lr_sft:g} (sft). Teacher (`embedded:tool-teacher`): "
             f"{se(teacher, n)}.", "",
             f"At equal compute ({summary['budget_flops']:.3g} FLOPs, student + teacher):", "",
             "| arm | accuracy before | at equal compute | conversations with a valid call | calls valid | "
             "step | after all steps | KL to teacher after |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, name in ARMS.items():
        row = summary[key]
        kl = "—" if row["teacher_kl_after"] is None else f"{row['teacher_kl_after']:.3f}"
        lines.append(f"| {name} | {se(row['accuracy_before'], n)} | {se(row['accuracy_at_budget'], n)} | "
                     f"{share(row['tool_use_at_budget'])} | {share(row['valid_calls_at_budget'])} | "
                     f"{row['step_at_budget']} | {se(row['accuracy_after'], n)} | {kl} |")
    lines += ["", f"Accuracies on {n} held-out prompts; ± is one binomial standard error, sqrt(p(1-p)/N).", "",
              "![tools](tools.png)", "", f"Wall time {summary['wall_seconds']:.0f} s.", ""]
    (plan.out / "report.md").write_text("\n".join(lines))
