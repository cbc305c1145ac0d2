"""``opd experiment reasoning``: SFT, RL and on-policy distillation from the same student, each at its
own best learning rate, compared on held-out accuracy against steps and FLOPs (the blog's table).

The learning rate of each method is chosen on a *validation* split (held-out prompts disjoint from the
ones reported on, when the task has one); the reported curves and table use the held-out split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd import runs
from opd.errors import OpdError
from opd.experiments import check_metric, evals, final_accuracy, on_metric, run_config, run_once, total_flops
from opd.experiments.reasoning_report import METHODS, write_reasoning_report

# 1e-3 (sft, opd) and 3e-4 (rl) were the worst of every measured sweep on the embedded default
DEFAULT_LRS = {"sft": (3e-4, 6e-4), "rl": (3e-5, 1e-4), "opd": (3e-4, 6e-4)}
MILESTONES = (0.25, 0.5, 0.8)  # fractions of the student-to-teacher gap reported beside the target


@dataclass
class ReasoningPlan:
    out: Path
    steps: int = 300
    eval_every: int = 25
    lrs: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LRS))
    target: float | None = None  # held-out accuracy; None: start + 80% of the gap to the teacher
    validation_examples: int = 256
    metric: str = "sampled"  # what targets, steps to target and ratios use: "sampled" or "greedy"
    rl_budget_factor: float = 10.0  # RL runs on to this many times opd's steps to the level it is compared at
    sft_sizes: tuple[int, ...] = (4096, 8192, 16384, 32768)  # fixed datasets of teacher samples (() skips)
    sft_epochs: float = 2.0
    sft_batch: int = 128  # examples per step on the fixed datasets
    sft_rates: tuple[float, ...] = (3e-4, 1e-3)
    overrides: list[str] = field(default_factory=list)  # config fields applied to every run


def default_target(start: float, teacher: float, fraction: float = 0.8) -> float:
    """``start + fraction * (teacher - start)``: the accuracy that closes ``fraction`` of the gap."""
    return start + fraction * (teacher - start)


def first_reaching(records: list[dict], target: float) -> dict | None:
    """The first evaluation record (step order) whose held-out accuracy is at least ``target``."""
    return next((r for r in evals(records) if r["accuracy"] >= target - 1e-12), None)


def method_result(records: list[dict], target: float) -> dict:
    """One method's row of summary.json, from its run's metrics."""
    last, hit = records[-1], first_reaching(records, target)
    return {
        "final_accuracy": evals(records)[-1]["accuracy"],
        "teacher_flops": last.get("teacher_flops_total"),
        "student_flops": last.get("student_flops_total"),
        "steps": last["step"],
        "wall_seconds": last["elapsed"],
        "steps_to_target": None if hit is None else hit["step"],
        "flops_to_target": None if hit is None else total_flops(hit),
        "student_flops_to_target": None if hit is None else hit.get("student_flops_total"),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else numerator / denominator


def levels(start: float, teacher: float, target: float, opd_final: float | None = None) -> list[tuple[str, float]]:
    """The accuracy levels compared: the target, 25/50/80% of the gap, and on-policy distillation's own
    final accuracy (the blog's framing: what would SFT or RL need to reach what distillation reached)."""
    out = [("target", target)] + [(f"{int(100 * f)}% of gap", default_target(start, teacher, f)) for f in MILESTONES]
    if opd_final is not None:
        out.append(("opd's final", opd_final))
    return out


def comparisons(curves: dict[str, list[dict]], start: float, teacher: float, target: float,
                sft_fixed: dict | None = None) -> list[dict]:
    """For each level: steps and FLOPs each method needed, with the blog's ratios (SFT FLOPs / method
    FLOPs, total and with SFT's data given; RL steps / opd steps; for the fixed-dataset SFT curve, its
    extrapolated FLOPs to the level / opd's, with and without the teacher's sampling). An RL run that did
    not reach a level that opd reached gives a lower bound: its steps / opd's (``rl_steps_lower_bound``)."""
    opd_final = evals(curves["opd"])[-1]["accuracy"] if "opd" in curves else None
    fixed = {row["level"]: row for row in (sft_fixed or {}).get("levels", [])}
    out = []
    for name, accuracy in levels(start, teacher, target, opd_final):
        row = {"level": name, "accuracy": accuracy}
        for method, records in curves.items():
            hit = first_reaching(records, accuracy)
            row[method] = None if hit is None else {"steps": hit["step"], "flops": total_flops(hit),
                                                    "student_flops": hit.get("student_flops_total")}
        sft, rl, opd = (row.get(m) for m in METHODS)
        if sft and opd:
            row["opd_compute_efficiency_vs_sft"] = ratio(sft["flops"], opd["flops"])
            row["opd_compute_efficiency_vs_sft_data_given"] = ratio(sft["student_flops"], opd["flops"])
        if rl and opd:
            row["rl_steps_over_opd_steps"] = ratio(rl["steps"], opd["steps"])
        elif opd and "rl" in curves:
            row["rl_steps_lower_bound"] = ratio(curves["rl"][-1]["step"], opd["steps"])
        reach = fixed.get(name)
        if opd and reach and reach.get("examples") is not None:
            row["sft_fixed"] = {k: reach[k] for k in ("examples", "low", "high", "extrapolated", "student_flops",
                                                      "teacher_flops")}
            row["opd_compute_efficiency_vs_sft_fixed_data_given"] = ratio(reach["student_flops"], opd["flops"])
            row["opd_compute_efficiency_vs_sft_fixed_charged"] = ratio(
                reach["student_flops"] + reach["teacher_flops"], opd["flops"])
        out.append(row)
    return out


def extend_rl(plan: ReasoningPlan, entry: dict, level: float, opd_steps: int, progress: bool) -> dict:
    """Continue the chosen RL run (same rate, constant after warm-up) until it first reaches ``level``
    or runs ``rl_budget_factor`` x ``opd_steps`` steps in all (never fewer than the sweep's steps)."""
    budget = max(plan.steps, math.ceil(plan.rl_budget_factor * opd_steps))
    chunk = max(plan.eval_every * 8, 1)
    records = entry["records"]
    while first_reaching(records, level) is None and records[-1]["step"] < budget:
        steps = min(budget, records[-1]["step"] + chunk)
        config = run_config(plan.overrides, plan.out / entry["run"], method="rl", lr=entry["lr"], steps=steps,
                            eval_every=plan.eval_every, save_every=plan.eval_every * 4)
        records = on_metric(run_once(config, progress, f"RL on to {steps} of {budget} steps"), plan.metric,
                            str(config.out))
    entry["records"] = records
    hit = first_reaching(records, level)
    return {"level": level, "opd_steps": opd_steps, "budget_steps": budget, "steps_run": records[-1]["step"],
            "reached": hit is not None, "steps_to_level": None if hit is None else hit["step"]}


def validation_set(task, reported: list, count: int) -> tuple[list, str]:
    """Prompts to choose learning rates on, and a sentence saying what they are."""
    if hasattr(task, "validation_examples"):
        return (task.validation_examples(count, reported),
                "a validation split: held-out prompts disjoint from the reported ones")
    return reported, ("the reported held-out split itself (this task has no separate validation split; "
                  "the chosen rates are optimistic by the selection)")


def run_reasoning(plan: ReasoningPlan, progress: bool = True) -> dict:
    """Run the sweep, choose each method's rate, carry RL on to its budget, run the fixed-dataset SFT
    curve, write summary.json, the plots and report.md."""
    from opd.experiments.sft_curve import fit_summary, run_sft_curve
    from opd.tasks.choose import make_task

    unknown = set(plan.lrs) - set(METHODS)
    if unknown:
        raise OpdError(f"unknown method(s) {', '.join(sorted(unknown))}: the experiment compares {', '.join(METHODS)}")
    started = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    sweep, total = [], sum(len(v) for v in plan.lrs.values())
    validation, selection_note = None, ""
    for method in METHODS:
        for lr in plan.lrs.get(method, ()):
            out = plan.out / "runs" / f"{method}-lr{lr:g}"
            config = run_config(plan.overrides, out, method=method, lr=lr, steps=plan.steps,
                                eval_every=plan.eval_every, save_every=plan.eval_every * 4)
            check_metric(plan.metric, config)
            desc = f"[{len(sweep) + 1}/{total}] {method} lr={lr:g}"
            records = run_once(config, progress, desc)
            if validation is None:
                task = make_task(config)
                reported = task.eval_examples(config.eval_examples)
                validation, selection_note = validation_set(task, reported, plan.validation_examples)
            records = on_metric([r for r in records if r["step"] <= plan.steps], plan.metric, str(out))
            sweep.append({"method": method, "lr": lr, "run": str(out.relative_to(plan.out)),
                          "final_accuracy": evals(records)[-1]["accuracy"],
                          "validation_accuracy": final_accuracy(out, config, validation,
                                                                f"validation-{plan.metric}", plan.metric),
                          "records": records})
    if not sweep:
        raise OpdError("no runs: give at least one learning rate for a method")
    best = {}
    for entry in sweep:  # highest validation accuracy; the lower rate on a tie
        current = best.get(entry["method"])
        if current is None or entry["validation_accuracy"] > current["validation_accuracy"]:
            best[entry["method"]] = entry
    first = sweep[0]["records"][0]
    start, teacher = first["accuracy"], first.get("teacher_accuracy")
    if teacher is None and plan.target is None:
        raise OpdError("the teacher's accuracy is unknown (a teacher behind a server): pass --target")
    target = plan.target if plan.target is not None else default_target(start, teacher)
    gap_top = teacher if teacher is not None else target
    curves = {m: e["records"] for m, e in best.items()}

    rl_run = None
    if "rl" in best and "opd" in best:  # RL to the end: the highest level opd reached, or the budget
        reached = [(acc, hit["step"]) for _, acc in levels(start, gap_top, target)
                   if (hit := first_reaching(curves["opd"], acc)) is not None and acc > start]
        if reached:
            level, opd_steps = max(reached)
            rl_run = extend_rl(plan, best["rl"], level, opd_steps, progress)
            curves["rl"] = best["rl"]["records"]

    sft_fixed = None
    if plan.sft_sizes:
        base = run_config(plan.overrides, plan.out / "runs" / "unused")
        sft_fixed = run_sft_curve(plan.out, plan.overrides, list(plan.sft_sizes), plan.sft_epochs, plan.sft_batch,
                                  plan.sft_rates, validation, plan.metric, progress)
        opd_final = evals(curves["opd"])[-1]["accuracy"] if "opd" in curves else None
        sft_fixed.update(fit_summary(sft_fixed["points"], levels(start, gap_top, target, opd_final),
                                     base.eval_examples))

    summary = {
        "metric": plan.metric,
        "metric_note": (f"{plan.metric} accuracy on the held-out split"
                        + (f" (T={first.get('eval_temperature', 1.0)}, mean over draws per prompt)"
                           if plan.metric == "sampled" else "")),
        "start_accuracy": start,
        "teacher_accuracy": teacher,
        "start_greedy_accuracy": first.get("greedy_accuracy"),
        "teacher_greedy_accuracy": first.get("teacher_greedy_accuracy"),
        "target_accuracy": target,
        **{m: {"lr": e["lr"], "run": e["run"], **method_result(e["records"], target)} for m, e in best.items()},
        "rl_to_the_end": rl_run,
        "sft_fixed_data": sft_fixed,
        "comparisons": comparisons(curves, start, gap_top, target, sft_fixed),
        "sweep": [{k: v for k, v in e.items() if k != "records"} for e in sweep],
        "selection": selection_note,
        "validation_examples": len(validation),
        "eval_examples": len(reported),
        "steps": plan.steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "run_seconds": round(sum(e["records"][-1]["elapsed"] for e in sweep)
                             + sum(r["wall"] for r in (sft_fixed or {}).get("sweep", [])), 1),
    }
    runs.write_json(plan.out / "summary.json", summary)
    write_reasoning_report(plan.out, summary, sweep, best)
    return summary
