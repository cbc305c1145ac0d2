"""The regime map's tables and plot: for each sweep point, each method's final held-out accuracy (mean and
standard error over seeds), and the compute each needs to reach a ladder of targets, as the ratio
SFT / on-policy distillation (and RL / on-policy distillation in steps), at nominal teacher sizes."""

from __future__ import annotations

import math
from pathlib import Path

# a seed's target: its warm start's accuracy plus this share of the way to the best final accuracy any method reaches
# at the point (seed mean); a seed whose warm start is past that best has nothing to gain and gives no ratio
TARGETS = (0.5, 0.7, 0.9)
SCALES = (1, 4, 16)  # the teacher's nominal size, in times the student's per-token forward cost
METHODS = ("opd", "sft-fresh", "sft-fixed", "dart", "rl")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pair_cost(shape, lengths: list[tuple[int, int]]) -> float:
    """The nominal teacher's FLOPs to write pairs of these (prompt, completion) lengths: one forward over
    each (with a KV cache, sampling costs what scoring does)."""
    from opd.flops import grouped_forward_flops

    return sum(grouped_forward_flops(shape, [p], [c], 1, c) for p, c in lengths)


def curve(run: dict, method: str, shape, rows_per_step: int, scale: int) -> list[tuple[int, float, float]]:
    """(step, accuracy, FLOPs so far) at each evaluation: the student's, and the teacher's at ``scale``."""
    records, lengths = run["records"], run["data"]
    per_pair = pair_cost(shape, lengths) / len(lengths) if lengths else 0.0
    up_front = per_pair * len(lengths) if method == "sft-fixed" else 0.0
    out = []
    for r in records:
        if r.get("accuracy") is None:
            continue
        teacher = (r.get("teacher_flops_total") or 0.0) if method == "opd" else 0.0
        if method in ("sft-fresh", "dart"):
            teacher = per_pair * rows_per_step * r["step"]
        out.append((r["step"], r["accuracy"], r.get("student_flops_total", 0.0) + scale * (teacher + up_front)))
    return out


def parts_at(run: dict, method: str, shape, rows_per_step: int, target: float) -> dict[str, float] | None:
    """``split`` of the compute a run has spent when it first reaches ``target`` (teacher at x1)."""
    student_only = curve(run, method, shape, rows_per_step, 0)
    with_teacher = curve(run, method, shape, rows_per_step, 1)
    for (_, accuracy, student), (_, _, total) in zip(student_only, with_teacher, strict=True):
        if accuracy >= target - 1e-9:
            return split(method, student, total - student)
    return None


def split(method: str, student: float, teacher: float) -> dict[str, float]:
    """FLOPs so far by part: the student's training (6N per trained token) and sampling (2N per sampled token:
    a quarter of ``opd train``'s student count for the sampling methods, whose rows it both samples and
    trains on), and the teacher's (scoring for ``opd``, writing the pairs for SFT and DART; at x1)."""
    sampling = student / 4 if method in ("opd", "rl") else 0.0
    return {"student_training": student - sampling, "student_sampling": sampling, "teacher": teacher}


def to_target(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(steps, FLOPs) at the first evaluation at or above ``target``; None when never reached."""
    for step, accuracy, flops in points:
        if accuracy >= target - 1e-9:
            return step, flops
    return None


def point_summary(name: str, methods: dict, shape, rows_per_step: int) -> dict:
    finals = {m: [run["records"][-1].get("accuracy") or 0.0 for run in runs] for m, runs in methods.items()}
    best = max(mean_se(v)[0] for v in finals.values())
    start = mean_se([start_accuracy(run) for run in next(iter(methods.values()))])[0]
    out = {"point": name, "final": {m: mean_se(v) for m, v in finals.items()}, "best": best, "start": start,
           "seeds": len(next(iter(methods.values()))), "ratios": {}}
    if all(run.get("diversity") is not None for runs in methods.values() for run in runs):
        out["diversity"] = {m: mean_se([run["diversity"] for run in runs]) for m, runs in methods.items()}
    for scale in SCALES:
        for fraction in TARGETS:
            for method in ("sft-fresh", "sft-fixed", "dart", "rl"):
                if method not in methods or "opd" not in methods:
                    continue
                for given in (False, True) if method == "sft-fixed" else (False,):
                    key = (f"{method}/opd {'steps' if method == 'rl' else 'flops'} x{scale} @{fraction:g}"
                           + (" data given" if given else ""))
                    out["ratios"][key] = ratio_entry(methods["opd"], methods[method], method, shape, rows_per_step,
                                                     scale, best, fraction, given)
                if scale == 1 and fraction == TARGETS[-1]:
                    for name, runs in (("opd", methods["opd"]), (method, methods[method])):
                        found = [p for p in (parts_at(r, name, shape, rows_per_step, seed_target(r, best, fraction))
                                             for r in runs if seed_target(r, best, fraction) is not None) if p]
                        if found:
                            out.setdefault("parts", {})[name] = {k: sum(p[k] for p in found) / len(found)
                                                                 for k in found[0]} | {"seeds": len(found)}
    return out


def start_accuracy(run: dict) -> float:
    """The warm start's accuracy: a run's first evaluation (step 0), which every arm of a seed shares."""
    return next((r["accuracy"] for r in run["records"] if r.get("accuracy") is not None), 0.0)


def seed_target(run: dict, best: float, fraction: float) -> float | None:
    """A seed's target: its warm start's accuracy plus ``fraction`` of the way to ``best`` (None when its warm
    start is already at or above ``best``: nothing to gain, no ratio)."""
    start = start_accuracy(run)
    return None if best <= start else start + fraction * (best - start)


def ratio_entry(opd_runs: list, other_runs: list, method: str, shape, rows_per_step: int, scale: int,
                best: float, fraction: float, given: bool = False) -> dict:
    """The ratio other / opd of the compute (RL: steps) to each seed's target (``seed_target``), per seed where
    both reach it; the seeds where only one does are counted, and those already past ``best``. ``given``: the
    blog's first basis, SFT's dataset given (its writing not charged; the 9x), where the default charges it
    (the 30x); the teacher's scoring for opd is always charged."""
    ratios, reached, opd_only, other_only, no_room = [], 0, 0, 0, 0
    for opd_run, other in zip(opd_runs, other_runs, strict=True):
        target = seed_target(opd_run, best, fraction)
        if target is None:
            no_room += 1
            continue
        a = to_target(curve(opd_run, "opd", shape, rows_per_step, scale), target)
        b = to_target(curve(other, method, shape, rows_per_step, 0 if given else scale), target)
        opd_only += bool(a and not b)
        other_only += bool(b and not a)
        if a and b:
            reached += 1
            cost = (b[0], a[0]) if method == "rl" else (b[1], a[1])
            ratios.append(cost[0] / cost[1] if cost[1] > 0 else 1.0 if cost[0] == 0 else math.inf)
    return {"geomean": geomean(ratios), "values": ratios, "seeds_reaching_both": reached, "opd_only": opd_only,
            "other_only": other_only, "seeds_at_best": no_room}


def geomean(values: list[float]) -> float | None:
    if not values:
        return None
    if any(math.isinf(v) for v in values):
        return math.inf
    return math.exp(sum(map(math.log, values)) / len(values))


def cell(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def reached(entry: dict) -> str | None:
    """A ratio's geometric mean and its range over the seeds ("1.30 [0.90-1.80]"), None when no seed reached
    the target with both methods."""
    if entry["geomean"] is None:
        return None
    values = entry["values"]
    spread = f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else ""
    return f"{entry['geomean']:.2f}{spread}"


def ratio_cell(entry: dict) -> str:
    alone = "".join(f", {entry[k]} {who}" for k, who in (("opd_only", "opd only"), ("other_only", "other only"),
                                                          ("seeds_at_best", "started past the best")) if entry.get(k))
    text = reached(entry)
    return f"n/r{alone}" if text is None else f"{text} ({entry['seeds_reaching_both']}{alone})"


def report(plan, points: list, results: dict, rates: dict) -> dict:
    """``report.md``, ``regimes.png`` and the summary's numbers."""
    import torch

    from opd.flops import ModelShape
    from opd.models import load_model
    from opd.regimes.exact import EPSILON

    summaries = []
    for point in points:
        model = load_model(plan.out / "models" / f"w{point.width}-s0", torch.device("cpu"), torch.float32)
        shape = ModelShape.of(model)
        summaries.append(point_summary(point.name, results[point.name], shape, plan.prompts * plan.samples))
    methods = sorted({m for s in summaries for m in s["final"]}, key=METHODS.index)
    lines = [f"# Regime map: {plan.sweep}", "",
             f"Exact teacher floored at epsilon = {EPSILON:g} (mixed with uniform); teacher FLOPs at a nominal size of "
             f"{', '.join(map(str, SCALES))}x the student's per-token forward cost; {plan.seeds} seeds planned; "
             f"{plan.steps} steps per arm from a shared SFT warm start of {plan.warm_steps} steps; learning rates "
             f"{rates} (5 warm-up steps, then constant); held-out greedy accuracy on {plan.eval_examples} prompts "
             "(mean ± standard error over seeds; one prompt set's binomial standard error is about "
             f"{100 * math.sqrt(0.25 / plan.eval_examples):.1f} points at 50%).",
             "", "| point | seeds | warm start | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for s in summaries:
        lines.append(f"| {s['point']} | {s['seeds']} | {100 * s['start']:.1f} | "
                     + " | ".join(cell(s["final"][m]) if m in s["final"] else "" for m in methods) + " |")
    if all("diversity" in s for s in summaries):
        lines += ["", "Path diversity of each final student (distinct valid walks per valid answer, 8 samples at T=1 "
                  "of 64 held-out prompts; mean ± standard error over seeds):", "",
                  "| point | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for s in summaries:
            lines.append(f"| {s['point']} | " + " | ".join(f"{s['diversity'][m][0]:.3f} ± {s['diversity'][m][1]:.3f}"
                                                          if m in s["diversity"] else "" for m in methods) + " |")
    for scale in SCALES:
        keys = sorted({k for s in summaries for k in s["ratios"] if f" x{scale} " in k})
        lines += ["", f"Compute to target, teacher x{scale}: geometric mean over seeds [min-max] (seeds where both "
                  "reached it); a seed's target = its warm start's accuracy + fraction x (best final accuracy at the "
                  "point - its warm start's). n/r: not reached.", "",
                  "| point | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for s in summaries:
            lines.append(f"| {s['point']} | " + " | ".join(ratio_cell(s["ratios"][k]) if k in s["ratios"] else ""
                                                          for k in keys) + " |")
    lines += ["", f"Where the compute to the {TARGETS[-1]:g} target goes (teacher x1; FLOPs, mean over the seeds that "
              "reach it, their count in brackets): student training (6N a trained token), student sampling (2N a "
              "sampled token), teacher (scoring for opd, writing the pairs for SFT and DART).", "",
              "| point | method | student training | student sampling | teacher |", "|---|---|---|---|---|"]
    for s in summaries:
        for method, p in sorted(s.get("parts", {}).items(), key=lambda item: METHODS.index(item[0])):
            lines.append(f"| {s['point']} | {method} ({p['seeds']}) | {p['student_training']:.3g} | "
                         f"{p['student_sampling']:.3g} | {p['teacher']:.3g} |")
    plot(plan.out / "regimes.png", plan.sweep, summaries)
    lines += ["", "![ratios](regimes.png)", ""]
    (plan.out / "report.md").write_text("\n".join(lines))
    (plan.out / "table.md").write_text("\n".join(compact_tables(summaries, methods)) + "\n")
    return {"sweep": plan.sweep, "epsilon": EPSILON, "scales": SCALES, "targets": TARGETS, "rates": rates,
            "points": summaries}


def short_cell(entry: dict | None) -> str:
    """A ratio as the docs' compact table writes it: geometric mean [range], then +k (seeds only opd reaches the
    target), -k (only the other method), =k (seeds whose warm start is past the best already)."""
    if entry is None:
        return ""
    marks = "".join(f" {sign}{entry[key]}" for key, sign in (("opd_only", "+"), ("other_only", "-"),
                                                             ("seeds_at_best", "=")) if entry.get(key))
    return f"{reached(entry) or 'n/r'}{marks}"


def compact_tables(summaries: list[dict], methods: list[str]) -> list[str]:
    """``table.md``, what the docs show of a sweep: final accuracies, and the ratios at the halfway and top
    targets with the smallest and largest teacher (``sft-fixed`` also with its dataset given)."""
    lines = ["| point | seeds | warm start | " + " | ".join(methods) + " |", "|---" * (len(methods) + 3) + "|"]
    for s in summaries:
        lines.append(f"| {s['point']} | {s['seeds']} | {100 * s['start']:.1f} | "
                     + " | ".join(cell(s["final"][m]) if m in s["final"] else "" for m in methods) + " |")
    keys = []
    low, high = TARGETS[0], TARGETS[-1]
    for scale in (SCALES[0], SCALES[-1]):
        for method in (m for m in methods if m not in ("opd", "rl")):
            for fraction in (low, high):
                keys.append((f"{method} @{fraction:g} x{scale}", f"{method}/opd flops x{scale} @{fraction:g}"))
                if method == "sft-fixed" and scale == SCALES[-1]:
                    keys.append((f"{method} @{fraction:g} x{scale} given",
                                 f"{method}/opd flops x{scale} @{fraction:g} data given"))
    if "rl" in methods:
        keys += [(f"rl/opd steps @{fraction:g}", f"rl/opd steps x1 @{fraction:g}") for fraction in (low, high)]
    lines += ["", "FLOPs to target, other / opd (geometric mean over the seeds where both reach it [range]; +k: k "
              "seeds only opd reaches, -k: only the other, =k: k seeds whose warm start is past the best; x1 / x16: "
              "the teacher's nominal size; given: SFT's dataset not charged):", "",
              "| point | " + " | ".join(label for label, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s in summaries:
        lines.append(f"| {s['point']} | " + " | ".join(short_cell(s["ratios"].get(key)) for _, key in keys) + " |")
    return lines


def plot(path: Path, sweep: str, summaries: list[dict]) -> None:
    """SFT (and DART) / OPD FLOPs to target against the sweep's points, one line per target (teacher x1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in ("sft-fresh", "sft-fixed", "dart") if any(m in s["final"] for s in summaries)]
    figure, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4), sharey=True, squeeze=False)
    axes = axes[0]
    names = [s["point"] for s in summaries]
    for ax, method in zip(axes, others, strict=True):
        for fraction in TARGETS:
            key = f"{method}/opd flops x1 @{fraction:g}"
            ys = [s["ratios"].get(key, {}).get("geomean") for s in summaries]
            ax.plot(range(len(names)), [y if y is not None else float("nan") for y in ys], marker="o",
                    label=f"target {fraction:g} x best")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{method} / opd FLOPs to target ({sweep})")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("FLOPs ratio (> 1: on-policy distillation cheaper)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
