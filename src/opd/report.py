"""The run's report: a PNG of held-out accuracy and teacher KL against step, and report.md."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opd.config import TrainConfig  # noqa: E402


def plot_curves(records: list[dict], summary: dict, path: Path) -> None:
    evals = [r for r in records if r.get("accuracy") is not None]
    trains = [r for r in records if r.get("teacher_kl") is not None]
    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:blue",
                label="student, greedy")
    sampled = [r for r in evals if r.get("sampled_accuracy") is not None]
    if sampled:
        acc_ax.plot([r["step"] for r in sampled], [r["sampled_accuracy"] for r in sampled], "s--",
                    color="tab:blue", alpha=0.6, markersize=4, label="student, sampled")
    if summary.get("teacher_accuracy") is not None:
        acc_ax.axhline(summary["teacher_accuracy"], color="grey", linestyle="--", label="teacher, greedy")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title="Accuracy")
    acc_ax.legend(loc="lower right")
    kl_ax.plot([r["step"] for r in trains], [r["teacher_kl"] for r in trains], alpha=0.5,
               label="train samples")
    kl_evals = [r for r in records if r.get("eval_teacher_kl") is not None]
    kl_ax.plot([r["step"] for r in kl_evals], [r["eval_teacher_kl"] for r in kl_evals], "o-",
               label="held-out samples")
    kl_ax.set(xlabel="step", ylabel="nats / token", title="Reverse KL to the teacher")
    kl_ax.legend(loc="upper right")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` prompts: ``sqrt(p (1 - p) / n)``."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def pct(value: float | None, n: int | None = None) -> str:
    """``52.7%``, or with the number of prompts it was measured on, ``52.7% ± 3.1`` (one standard error)."""
    if value is None:
        return "—"
    if not n:
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% ± {100 * standard_error(value, n):.1f}"


def fmt(value: float | None, percent: bool = False, n: int | None = None) -> str:
    if value is None:
        return "n/a"
    return pct(value, n) if percent else f"{value:.3f}"


def flops(value: float | None) -> str:
    return "unknown (teacher behind a server)" if value is None else f"{value:.3g} FLOPs"


def write_report(run_dir: Path, config: TrainConfig, records: list[dict], summary: dict) -> None:
    plot_curves(records, summary, run_dir / "curves.png")
    n = summary.get("eval_examples")
    timed = [r for r in records if "sample_seconds" in r]
    totals = {k: sum(r[k] for r in timed) for k in ("sample_seconds", "score_seconds", "train_seconds")}
    lines = [
        f"# opd run: {config.method}, {summary['steps']} steps",
        "",
        f"Student `{config.student}`, teacher `{config.teacher}`, task `{config.task}`, "
        f"estimator `kl={config.kl}`, lr {config.lr}, {config.prompts_per_step} prompts x "
        f"{config.samples_per_prompt} samples per step.",
        "",
        "| | before | after | teacher |",
        "| --- | --- | --- | --- |",
        f"| held-out accuracy ({n} prompts) | {fmt(summary['student_accuracy_before'], True, n)} | "
        f"{fmt(summary['student_accuracy_after'], True, n)} | {fmt(summary['teacher_accuracy'], True, n)} |",
        f"| held-out accuracy sampled (T={summary.get('eval_temperature')}, mean of {summary.get('eval_samples')}) | "
        f"{fmt(summary.get('student_sampled_accuracy_before'), True, n)} | "
        f"{fmt(summary.get('student_sampled_accuracy_after'), True, n)} | "
        f"{fmt(summary.get('teacher_sampled_accuracy'), True, n)} |",
        f"| reverse KL to teacher (nats/token) | {fmt(summary['teacher_kl_before'])} | "
        f"{fmt(summary['teacher_kl_after'])} | 0 |",
        "",
        "![accuracy and teacher KL](curves.png)",
        "",
        f"Wall time {summary['wall_seconds']:.0f} s (training and periodic evaluation): sampling "
        f"{totals['sample_seconds']:.0f} s, teacher scoring {totals['score_seconds']:.0f} s, "
        f"student update {totals['train_seconds']:.0f} s. "
        f"{summary['completion_tokens_trained']} completion tokens trained.",
        "",
        f"Compute (see `src/opd/flops.py`): student {flops(summary.get('student_flops'))} (sampling and "
        f"training), teacher {flops(summary.get('teacher_flops'))} (scoring); evaluation not counted.",
        "",
        "How to read it: accuracy is greedy decoding on the held-out split, checked by the task's "
        "verifier; sampled accuracy is the mean over `eval_samples` completions per prompt drawn at "
        "`eval_temperature` (what the student does when it samples: avg@k). ± is one binomial standard "
        "error over the N prompts, sqrt(p(1-p)/N) (for the sampled accuracy an upper bound: k draws per "
        "prompt average out part of the noise), so a difference inside two of them is noise. The KL is the mean over "
        "the student's own temperature-1 samples of log p_student - log p_teacher per completion token; "
        "0 means the student samples like the teacher. Per-step figures are in metrics.jsonl, the full "
        "config in config.json.",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
