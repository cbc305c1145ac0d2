"""The reasoning experiment's report: accuracy against steps and against FLOPs, and report.md."""

from __future__ import annotations

from pathlib import Path

from opd.experiments import evals, total_flops
from opd.experiments.reasoning import BLOG, METHODS
from opd.report import pct, plt, save_figure

COLOURS = {"sft": "tab:blue", "rl": "tab:orange", "opd": "tab:green"}
NAMES = {"sft": "SFT (off-policy distillation)", "rl": "RL (task reward)", "opd": "on-policy distillation"}


def plot_accuracy(summary: dict, sweep: list[dict], best: dict, path: Path, x: str) -> None:
    """Held-out accuracy against gradient steps (``x="steps"``) or total FLOPs (log axis); the chosen
    rate of each method bold, the other rates of its sweep faint."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in sweep:
        points = [(r["step"] if x == "steps" else total_flops(r), r["accuracy"]) for r in evals(entry["records"])]
        points = [(a, b) for a, b in points if a is not None and (x == "steps" or a > 0)]
        chosen = best[entry["method"]] is entry
        label = f"{NAMES[entry['method']]} (lr {entry['lr']:g})" if chosen else None
        ax.plot(*zip(*points, strict=True), "o-" if chosen else "-", color=COLOURS[entry["method"]],
                alpha=1.0 if chosen else 0.25, linewidth=2 if chosen else 1, markersize=3, label=label)
    if summary["teacher_accuracy"] is not None:
        ax.axhline(summary["teacher_accuracy"], color="grey", linestyle="--", label="teacher")
    ax.axhline(summary["target_accuracy"], color="black", linestyle=":", linewidth=1, label="target")
    if x == "flops":
        ax.set_xscale("log")
    ax.set(xlabel="gradient steps" if x == "steps" else "total FLOPs (student + teacher)",
           ylabel="held-out accuracy (greedy)", ylim=(0, 1.02),
           title=f"Accuracy against {'steps' if x == 'steps' else 'compute'}")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)



def sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def verdict(comparisons: list[dict]) -> list[str]:
    """Plain sentences: the ratios at the target (or the highest level all methods reached)."""
    lines = []
    for key, what, ratio_of, blog in (
            ("opd_compute_efficiency_vs_sft", "compute against SFT", "SFT used {v:.2f}x the FLOPs of",
             BLOG["compute_vs_sft"]),
            ("rl_steps_over_opd_steps", "gradient steps against RL", "RL took {v:.2f}x the steps of",
             BLOG["steps_vs_rl"])):
        reached = [row for row in comparisons if row.get(key) is not None]
        if not reached:
            lines.append(f"- *{what}*: not measurable here: at no level did both methods reach the accuracy "
                         f"within the run (the blog: {blog}).")
            continue
        row = max(reached, key=lambda r: r["accuracy"])
        claim = "reproduces" if row[key] >= float(blog.split("-")[0]) else "does not reproduce"
        lines.append(f"- *{what}*: to first reach {pct(row['accuracy'])} ({row['level']}), "
                     f"{ratio_of.format(v=row[key])} on-policy distillation; the blog reports {blog}. "
                     f"The toy {claim} the blog's ratio.")
    return lines


def write_reasoning_report(out: Path, summary: dict, sweep: list[dict], best: dict) -> None:
    plot_accuracy(summary, sweep, best, out / "accuracy_vs_steps.png", "steps")
    plot_accuracy(summary, sweep, best, out / "accuracy_vs_flops.png", "flops")
    n, n_val = summary.get("eval_examples"), summary["validation_examples"]
    sft_flops = None
    if "sft" in best and summary["sft"]["flops_to_target"]:
        sft_flops = summary["sft"]["flops_to_target"]
    lines = [
        "# The reasoning experiment: SFT, RL and on-policy distillation",
        "",
        f"Same starting student (held-out accuracy {pct(summary['start_accuracy'], n)} on {n} prompts; ± is one "
        f"binomial standard error), teacher at {pct(summary['teacher_accuracy'], n)}, {summary['steps']} steps "
        f"per run with the same prompts per step and schedule; target accuracy {pct(summary['target_accuracy'])}. "
        f"Each method at its own best learning rate, chosen on {summary['selection']} ({n_val} prompts).",
        "",
        "| method | lr | final accuracy | teacher FLOPs | student FLOPs | steps to target | FLOPs to target "
        "| compute efficiency vs SFT |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method not in best:
            continue
        row = summary[method]
        efficiency = None if not sft_flops or not row["flops_to_target"] else sft_flops / row["flops_to_target"]
        lines.append(f"| {NAMES[method]} | {row['lr']:g} | {pct(row['final_accuracy'], n)} | "
                     f"{sci(row['teacher_flops'])} | {sci(row['student_flops'])} | "
                     f"{row['steps_to_target'] if row['steps_to_target'] is not None else 'not reached'} | "
                     f"{sci(row['flops_to_target']) if row['flops_to_target'] else 'not reached'} | "
                     f"{times(efficiency) if sft_flops else '—'} |")
    lines += ["", "Steps and total FLOPs to first reach each accuracy level (evaluated every "
              f"{_eval_every(best)} steps):", "",
              "| level | accuracy | " + " | ".join(NAMES[m] for m in METHODS if m in best)
              + " | SFT FLOPs / opd FLOPs | same, SFT data given | RL steps / opd steps |",
              "| --- | --- | " + " | ".join("---" for m in METHODS if m in best) + " | --- | --- | --- |"]
    for row in summary["comparisons"]:
        cells = [f"{row[m]['steps']} steps, {sci(row[m]['flops'])}" if row.get(m) else "not reached"
                 for m in METHODS if m in best]
        lines.append(f"| {row['level']} | {pct(row['accuracy'])} | " + " | ".join(cells) + " | "
                     f"{times(row.get('opd_compute_efficiency_vs_sft'))} | "
                     f"{times(row.get('opd_compute_efficiency_vs_sft_data_given'))} | "
                     f"{times(row.get('rl_steps_over_opd_steps'))} |")
    lines += ["", "## Against the blog", "", *verdict(summary["comparisons"]), "",
              "![accuracy against steps](accuracy_vs_steps.png)", "",
              "![accuracy against FLOPs](accuracy_vs_flops.png)", "",
              "## The learning-rate sweep", "",
              "| method | lr | validation accuracy | final held-out accuracy | chosen | run |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in sweep:
        chosen = "yes" if best[entry["method"]] is entry else ""
        lines.append(f"| {entry['method']} | {entry['lr']:g} | {pct(entry['validation_accuracy'], n_val)} | "
                     f"{pct(entry['final_accuracy'], n)} | {chosen} | `{entry['run']}` |")
    lines += ["", "How to read it: FLOPs follow `src/opd/flops.py` (2 x parameters x tokens plus the "
              "attention term; backward = 2 x forward). Teacher FLOPs are the teacher's scoring passes "
              "(opd) or its sampling (SFT); RL has none. \"SFT data given\" counts only SFT's student "
              "FLOPs, as if the teacher's samples were already paid for. Compute efficiency vs SFT = "
              "SFT's FLOPs to the level / the method's FLOPs to the same level. Accuracy is greedy on the "
              "held-out split, checked by the task's verifier.", "",
              f"Wall time of this invocation {summary['wall_seconds']:.0f} s; the runs' own training and "
              f"evaluation time {summary['run_seconds']:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))


def _eval_every(best: dict) -> int:
    records = evals(next(iter(best.values()))["records"])
    return records[1]["step"] - records[0]["step"] if len(records) > 1 else 0
