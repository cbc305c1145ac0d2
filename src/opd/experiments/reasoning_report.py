"""The reasoning experiment's report: accuracy against steps and against FLOPs, and report.md."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from opd.experiments import evals, total_flops
from opd.report import pct, plt, save_figure

METHODS = ("sft", "rl", "opd")  # the experiment's three arms, in the report's order
BLOG = {"compute_vs_sft": "9-30x", "steps_vs_rl": "7-10x"}  # the blog's ratios, beside the measured ones

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
    fixed = summary.get("sft_fixed_data")
    if fixed and x == "flops":  # each fixed dataset's final accuracy at its FLOPs, both ways of counting
        points = fixed["points"]
        ax.plot([p["student_flops"] for p in points], [p["accuracy"] for p in points], "D", color=COLOURS["sft"],
                markerfacecolor="none", label="SFT on a fixed dataset, data given")
        ax.plot([p["student_flops"] + p["teacher_sampling_flops"] for p in points], [p["accuracy"] for p in points],
                "D", color=COLOURS["sft"], label="SFT on a fixed dataset, sampling charged")
    if summary["teacher_accuracy"] is not None:
        ax.axhline(summary["teacher_accuracy"], color="grey", linestyle="--", label="teacher")
    ax.axhline(summary["target_accuracy"], color="black", linestyle=":", linewidth=1, label="target")
    if x == "flops":
        ax.set_xscale("log")
    ax.set(xlabel="gradient steps" if x == "steps" else "total FLOPs (student + teacher)",
           ylabel=f"held-out accuracy ({summary['metric']})", ylim=(0, 1.02),
           title=f"Accuracy against {'steps' if x == 'steps' else 'compute'}")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)



def sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def sft_curve_plot(summary: dict, path: Path) -> None:
    """Accuracy against fixed-dataset size (log x): the measured points at their best rate, the fit, its
    extrapolation (dashed) to the levels it is read at, and on-policy distillation's final accuracy."""
    fixed = summary["sft_fixed_data"]
    points, fit = fixed["points"], fixed["fit"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["examples"] for p in points]
    ax.plot(xs, [p["accuracy"] for p in points], "o", color=COLOURS["sft"], label="SFT on a fixed dataset (measured)")
    reach = [r["examples"] for r in fixed["levels"] if r.get("examples")]
    top = max(xs + [x for x in reach if x < 1e4 * max(xs)])
    grid = np.geomspace(min(xs), max(xs), 50)
    line = [fit["intercept"] + fit["slope"] * math.log10(x) for x in grid]
    ax.plot(grid, line, "-", color=COLOURS["sft"], alpha=0.6, label=f"log-linear fit ({100 * fit['slope']:+.1f} "
            "points per 10x data)")
    if top > max(xs):
        far = np.geomspace(max(xs), top, 30)
        ax.plot(far, [fit["intercept"] + fit["slope"] * math.log10(x) for x in far], "--", color=COLOURS["sft"],
                alpha=0.6, label="extrapolated")
    opd_level = next((r for r in fixed["levels"] if r["level"] == "opd's final"), None)
    if opd_level is not None:
        ax.axhline(opd_level["accuracy"], color=COLOURS["opd"], linestyle=":", label="on-policy distillation, final")
    ax.axhline(summary["start_accuracy"], color="black", linestyle=":", linewidth=1, label="start")
    ax.set_xscale("log")
    ax.set(xlabel="teacher samples in the fixed dataset", ylabel=f"held-out accuracy ({summary['metric']})",
           title="SFT's data curve")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def verdict(summary: dict) -> list[str]:
    """Plain sentences: the measured ratios against the blog's, at the highest level they exist for."""
    comparisons, lines = summary["comparisons"], []
    for key, what, ratio_of, blog in (
            ("opd_compute_efficiency_vs_sft_fixed_data_given",
             "compute against SFT on a fixed dataset, its data given (the blog's 9x basis)",
             "SFT would need {v:.2f}x the FLOPs of", BLOG["compute_vs_sft"].split("-")[0] + "x"),
            ("opd_compute_efficiency_vs_sft_fixed_charged",
             "compute against SFT on a fixed dataset, the teacher's sampling charged (the blog's 30x basis)",
             "SFT would need {v:.2f}x the FLOPs of", BLOG["compute_vs_sft"].split("-")[1]),
            ("opd_compute_efficiency_vs_sft", "compute against SFT on fresh teacher samples every step",
             "SFT used {v:.2f}x the FLOPs of", BLOG["compute_vs_sft"]),
            ("rl_steps_over_opd_steps", "gradient steps against RL", "RL took {v:.2f}x the steps of",
             BLOG["steps_vs_rl"])):
        reached = [row for row in comparisons if row.get(key) is not None]
        if key == "rl_steps_over_opd_steps" and not reached:
            bounds = [row for row in comparisons if row.get("rl_steps_lower_bound") is not None]
            if bounds:
                row = max(bounds, key=lambda r: r["accuracy"])
                lines.append(f"- *{what}*: RL did not reach {pct(row['accuracy'])} ({row['level']}) in "
                             f"{summary['rl']['steps']} steps, where on-policy distillation took "
                             f"{row['opd']['steps']}: "
                             f"RL needs >= {row['rl_steps_lower_bound']:.1f}x the steps (a lower bound; the "
                             f"blog: {blog}).")
                continue
        if not reached:
            lines.append(f"- *{what}*: not measurable here: at no level did both reach the accuracy "
                         f"(the blog: {blog}).")
            continue
        row = max(reached, key=lambda r: r["accuracy"])
        floor = float(blog.rstrip("x").split("-")[0])
        claim = "reaches" if row[key] >= floor else "does not reach"
        note = ""
        if "sft_fixed" in row and "fixed" in key:
            fixed = row["sft_fixed"]
            note = (f" (SFT {'extrapolated' if fixed['extrapolated'] else 'interpolated'} to "
                    f"{fixed['examples']:,.0f} examples, one-SE range {fixed['low']:,.0f}-{fixed['high']:,.0f})")
        lines.append(f"- *{what}*: to first reach {pct(row['accuracy'])} ({row['level']}), "
                     f"{ratio_of.format(v=row[key])} on-policy distillation{note}; the blog reports {blog}. "
                     f"This run {claim} the blog's ratio.")
    return lines


def fixed_data_lines(summary: dict, n: int) -> list[str]:
    fixed = summary.get("sft_fixed_data")
    if not fixed:
        return []
    fit = fixed["fit"]
    se_slope = math.sqrt(fit["covariance"][1][1])
    lines = ["## SFT as the blog ran it: fixed datasets of teacher samples", "",
             f"Nested datasets of one teacher sample per fresh training prompt (temperature "
             f"{fixed['dataset']['temperature']}; {pct(fixed['dataset']['verified_share'])} of them verified "
             f"correct), each trained for {fixed['epochs']:g} epochs at {fixed['batch']} examples per step from the "
             f"same student, at the better of the rates {', '.join(f'{r:g}' for r in fixed['rates'])} (chosen on "
             "the validation split). Student FLOPs are the training; teacher FLOPs the sampling of the dataset.",
             "", "| examples | steps | lr | accuracy | greedy | student FLOPs | teacher sampling FLOPs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for point in fixed["points"]:
        lines.append(f"| {point['examples']:,} | {point['steps']} | {point['lr']:g} | {pct(point['accuracy'], n)} | "
                     f"{pct(point['greedy_accuracy'], n)} | {sci(point['student_flops'])} | "
                     f"{sci(point['teacher_sampling_flops'])} |")
    lines += ["", f"Log-linear fit: accuracy = {fit['intercept']:.3f} + {fit['slope']:.3f} x log10(examples) "
              f"(slope {100 * fit['slope']:+.1f} ± {100 * se_slope:.1f} points per tenfold data, {fit['points']} "
              "sizes, weighted by their binomial errors).", "",
              "| level | accuracy | examples SFT needs | one-SE range | student FLOPs | + teacher sampling | |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in fixed["levels"]:
        if row.get("examples") is None:
            lines.append(f"| {row['level']} | {pct(row['accuracy'])} | never (the fit does not rise) | | | | |")
            continue
        kind = "**extrapolated**" if row["extrapolated"] else "within the measured sizes"
        lines.append(f"| {row['level']} | {pct(row['accuracy'])} | {row['examples']:,.0f} | "
                     f"{row['low']:,.0f}-{row['high']:,.0f} | {sci(row['student_flops'])} | "
                     f"{sci(row['student_flops'] + row['teacher_flops'])} | {kind} |")
    return lines + ["", "![SFT's data curve](sft_data_curve.png)", ""]


def rl_lines(summary: dict) -> list[str]:
    run = summary.get("rl_to_the_end")
    if not run:
        return []
    outcome = (f"reached it at step {run['steps_to_level']}" if run["reached"] else
               f"did not reach it in {run['steps_run']} steps (budget {run['budget_steps']})")
    return ["## RL to the end", "",
            f"The chosen RL run went on past the sweep's {summary['steps']} steps toward {pct(run['level'])}, the "
            f"highest level on-policy distillation reached (at step {run['opd_steps']}), with a budget of "
            f"{run['budget_steps']} steps: it {outcome}.", ""]


def write_reasoning_report(out: Path, summary: dict, sweep: list[dict], best: dict) -> None:
    plot_accuracy(summary, sweep, best, out / "accuracy_vs_steps.png", "steps")
    plot_accuracy(summary, sweep, best, out / "accuracy_vs_flops.png", "flops")
    if summary.get("sft_fixed_data"):
        sft_curve_plot(summary, out / "sft_data_curve.png")
    n, n_val = summary.get("eval_examples"), summary["validation_examples"]
    lines = [
        "# The reasoning experiment: SFT, RL and on-policy distillation",
        "",
        f"Metric: {summary['metric_note']}; ± is one binomial standard error over the {n} prompts. Same starting "
        f"student ({pct(summary['start_accuracy'], n)}; greedy {pct(summary.get('start_greedy_accuracy'), n)}), "
        f"teacher {pct(summary['teacher_accuracy'], n)} (greedy {pct(summary.get('teacher_greedy_accuracy'), n)}), "
        f"{summary['steps']} steps per run of the sweep with the same prompts per step and schedule; target "
        f"{pct(summary['target_accuracy'])}. Each method at its own best learning rate, chosen on "
        f"{summary['selection']} ({n_val} prompts).",
        "",
        "| method | lr | steps | final accuracy | greedy | teacher FLOPs | student FLOPs | steps to target "
        "| FLOPs to target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method not in best:
            continue
        row, last = summary[method], evals(best[method]["records"])[-1]
        label = NAMES[method] + (" on fresh teacher samples every step" if method == "sft" else "")
        lines.append(f"| {label} | {row['lr']:g} | {row['steps']} | {pct(row['final_accuracy'], n)} | "
                     f"{pct(last.get('greedy_accuracy'), n)} | {sci(row['teacher_flops'])} | "
                     f"{sci(row['student_flops'])} | "
                     f"{row['steps_to_target'] if row['steps_to_target'] is not None else 'not reached'} | "
                     f"{sci(row['flops_to_target']) if row['flops_to_target'] else 'not reached'} |")
    methods = [m for m in METHODS if m in best]
    lines += ["", "Steps and total FLOPs to first reach each accuracy level (evaluated every "
              f"{_eval_every(best)} steps; SFT-fixed: the fit's data and FLOPs for the level):", "",
              "| level | accuracy | " + " | ".join(NAMES[m] for m in methods)
              + " | SFT-fixed / opd FLOPs, data given | same, sampling charged | SFT-fresh / opd FLOPs "
              "| RL steps / opd steps |",
              "| --- | --- | " + " | ".join("---" for _ in methods) + " | --- | --- | --- | --- |"]
    for row in summary["comparisons"]:
        cells = [f"{row[m]['steps']} steps, {sci(row[m]['flops'])}" if row.get(m) else "not reached" for m in methods]
        rl = (times(row.get("rl_steps_over_opd_steps")) if row.get("rl_steps_over_opd_steps") is not None else
              f">= {row['rl_steps_lower_bound']:.1f}x" if row.get("rl_steps_lower_bound") else "—")
        lines.append(f"| {row['level']} | {pct(row['accuracy'])} | " + " | ".join(cells) + " | "
                     f"{times(row.get('opd_compute_efficiency_vs_sft_fixed_data_given'))} | "
                     f"{times(row.get('opd_compute_efficiency_vs_sft_fixed_charged'))} | "
                     f"{times(row.get('opd_compute_efficiency_vs_sft'))} | {rl} |")
    lines += ["", "## Against the blog", "", *verdict(summary), "",
              "![accuracy against steps](accuracy_vs_steps.png)", "",
              "![accuracy against FLOPs](accuracy_vs_flops.png)", "",
              *rl_lines(summary), *fixed_data_lines(summary, n),
              "## The learning-rate sweep", "",
              "| method | lr | validation accuracy | final held-out accuracy | chosen | run |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in sweep:
        chosen = "yes" if best[entry["method"]] is entry else ""
        lines.append(f"| {entry['method']} | {entry['lr']:g} | {pct(entry['validation_accuracy'], n_val)} | "
                     f"{pct(entry['final_accuracy'], n)} | {chosen} | `{entry['run']}` |")
    lines += ["", "How to read it: FLOPs follow `src/opd/flops.py` (2 x parameters x tokens plus the "
              "attention term; backward = 2 x forward). Teacher FLOPs are the teacher's scoring passes "
              "(opd) or its sampling (SFT); RL has none. \"Data given\" counts only SFT's student FLOPs, as "
              "if the teacher's samples were already paid for (the blog's 9x); \"sampling charged\" adds the "
              "teacher's cost of writing the dataset (the blog's 30x). Compute efficiency = SFT's FLOPs to the "
              "level / on-policy distillation's FLOPs to the same level. The sampled accuracy is the mean over "
              "the draws per prompt at the evaluation temperature: what the student does when it samples (avg@k; "
              "the blog does not say how it sampled AIME); greedy decoding hides how broad a student's "
              "distribution still is.", "",
              f"Wall time of this invocation {summary['wall_seconds']:.0f} s; the runs' own training and "
              f"evaluation time {summary['run_seconds']:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))


def _eval_every(best: dict) -> int:
    records = evals(next(iter(best.values()))["records"])
    return records[1]["step"] - records[0]["step"] if len(records) > 1 else 0
