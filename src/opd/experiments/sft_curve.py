"""SFT as the blog ran it: off-policy distillation on *fixed* datasets of teacher samples of growing size,
each at its own best rate, and the log-linear fit of accuracy against data that the blog extrapolated
to the size SFT would need to reach a target (its "SFT-2M (extrapolated)" row).

The datasets are nested (the first D lines of one file of teacher samples), one sample per fresh
training prompt, drawn at the run's sampling temperature; each size is trained for the same number of
epochs from the same student, so its compute grows linearly with its size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd import runs
from opd.config import TrainConfig
from opd.errors import OpdError
from opd.progress import progress as bar_over


@dataclass
class LogLinearFit:
    """``accuracy = intercept + slope * log10(examples)``, fitted to ``points`` sizes."""

    intercept: float
    slope: float  # accuracy gained per tenfold more data
    covariance: list[list[float]]  # of (intercept, slope)
    points: int

    def predict(self, examples: float) -> float:
        return self.intercept + self.slope * math.log10(examples)


def log_linear_fit(sizes: list[float], accuracies: list[float], errors: list[float]) -> LogLinearFit:
    """Weighted least squares of ``a + b log10(D)`` with weights ``1/se_i^2`` (each point's binomial
    standard error, floored at 0.001). The covariance of (a, b) is ``(X^T W X)^-1``, scaled by the
    reduced chi-square ``chi^2 / (n - 2)`` when that exceeds 1 (the points scatter more than their own
    noise says), the usual practice for a fit whose model may be wrong. Needs at least two sizes."""
    if len(sizes) < 2 or len(set(sizes)) < 2:
        raise OpdError("a log-linear fit needs at least two different dataset sizes")
    x = np.log10(np.asarray(sizes, dtype=np.float64))
    y = np.asarray(accuracies, dtype=np.float64)
    w = 1.0 / np.maximum(np.asarray(errors, dtype=np.float64), 1e-3) ** 2
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (design * w[:, None])
    covariance = np.linalg.inv(normal)
    intercept, slope = covariance @ (design.T @ (w * y))
    if len(x) > 2:
        residuals = y - (intercept + slope * x)
        reduced_chi2 = float((w * residuals**2).sum() / (len(x) - 2))
        covariance = covariance * max(reduced_chi2, 1.0)
    return LogLinearFit(float(intercept), float(slope), covariance.tolist(), len(x))


def extrapolate(fit: LogLinearFit, target: float) -> dict | None:
    """The data size at which the fit reaches ``target``: ``D* = 10^((target - a) / b)``, with a one-
    standard-error range from the delta method on ``x* = log10 D*``:
    ``var(x*) = (var a + 2 x* cov(a, b) + x*^2 var b) / b^2``. None when the fit does not rise."""
    if fit.slope <= 0:
        return None
    x = (target - fit.intercept) / fit.slope
    (var_a, cov_ab), (_, var_b) = fit.covariance
    se = math.sqrt(max(var_a + 2 * x * cov_ab + x * x * var_b, 0.0)) / fit.slope
    return {"examples": power10(x), "low": power10(x - se), "high": power10(x + se), "log10_se": se}


def power10(exponent: float) -> float:
    """``10 ** exponent``, infinite past the float range (a nearly flat fit needs "more data than exists")."""
    try:
        return 10.0**exponent
    except OverflowError:
        return math.inf


def sft_steps(examples: int, epochs: float, batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``examples`` at ``batch`` examples per step."""
    return max(1, math.ceil(epochs * examples / batch))


def teacher_dataset(config: TrainConfig, sizes: list[int], directory: Path, progress: bool = True) -> dict:
    """One teacher sample for each of ``max(sizes)`` fresh training prompts (drawn with a seed apart from
    the run's), written to ``directory/teacher-<D>.jsonl`` for each size D (nested: the first D lines),
    with ``directory/dataset.json``: the teacher's sampling FLOPs for each size and the share of samples
    the task's verifier accepts. Reused when already there."""
    from opd.evaluation import completions_text
    from opd.flops import ModelShape, sampling_flops
    from opd.models import chat_prompt_ids, load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
    from opd.samplers.local import sample
    from opd.tasks.choose import make_task

    meta_path = directory / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["sizes"] == sorted(sizes) and meta["teacher"] == config.teacher:
            return meta
    if config.remote_teacher:
        raise OpdError("the fixed-dataset SFT curve samples the teacher, and a teacher behind a server only "
                       "scores: give an in-process teacher, or --sft-sizes none")
    directory.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    path = resolve_model_path(config.teacher_spec, "teacher")
    tokenizer = load_tokenizer(path)
    teacher = load_model(path, device, pick_dtype(config.dtype, device)).eval()
    shape, task, total = ModelShape.of(teacher), make_task(config), max(sizes)
    generator = torch.Generator(device).manual_seed(config.seed + 424_242)
    lines, flops, correct, batch = [], [], 0.0, 512
    for index in bar_over(range(math.ceil(total / batch)), desc="SFT data: teacher samples", disable=not progress):
        examples = task.train_examples(index, min(batch, total - index * batch), config.seed + 424_242)
        prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in examples]
        with torch.no_grad():
            drawn = sample(teacher, prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           top_p=config.top_p, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                           vocab_size=len(tokenizer), generator=generator)
        lengths = drawn.completion_mask.sum(-1).tolist()
        for example, text, prompt, length in zip(examples, completions_text(tokenizer, drawn.completion_ids()),
                                                 prompts, lengths, strict=True):
            row = {"messages": example.messages, "completion": text}
            if example.answer is not None:
                row["answer"] = example.answer
                correct += task.reward(text, example)
            lines.append(json.dumps(row))
            flops.append(sampling_flops(shape, [len(prompt)], [int(length)]))
    cumulative = np.cumsum(flops)
    for size in sizes:
        (directory / f"teacher-{size}.jsonl").write_text("\n".join(lines[:size]) + "\n")
    meta = {"sizes": sorted(sizes), "teacher": config.teacher, "temperature": config.temperature,
            "teacher_sampling_flops": {str(size): float(cumulative[size - 1]) for size in sizes},
            "verified_share": correct / total}
    runs.write_json(meta_path, meta)
    return meta


def fit_summary(points: list[dict], target_levels: list[tuple[str, float]], n: int) -> dict:
    """The fit over the measured sizes and, for each named level, the data and FLOPs SFT would need by
    extrapolation (FLOPs scale with the data: the per-example cost of the largest measured size)."""
    from opd.report import standard_error

    fit = log_linear_fit([p["examples"] for p in points], [p["accuracy"] for p in points],
                         [standard_error(p["accuracy"], n) for p in points])
    largest = max(points, key=lambda p: p["examples"])
    smallest = min(p["examples"] for p in points)
    per_example_train = largest["student_flops"] / largest["examples"]
    per_example_teacher = largest["teacher_sampling_flops"] / largest["examples"]
    levels = []
    for name, accuracy in target_levels:
        reach = extrapolate(fit, accuracy)
        row = {"level": name, "accuracy": accuracy, "extrapolated": reach is not None  # beyond the sizes run
               and not smallest <= reach["examples"] <= largest["examples"]}
        if reach is not None:
            row.update({k: reach[k] for k in ("examples", "low", "high")},
                       student_flops=reach["examples"] * per_example_train,
                       teacher_flops=reach["examples"] * per_example_teacher)
        levels.append(row)
    return {"fit": asdict(fit), "levels": levels, "per_example_student_flops": per_example_train,
            "per_example_teacher_flops": per_example_teacher}


def run_sft_curve(out: Path, overrides: list[str], sizes: list[int], epochs: float, batch: int,
                  rates: tuple[float, ...], validation: list, metric: str, progress: bool = True) -> dict:
    """Train the student on each fixed dataset at each rate; each size keeps the rate with the best
    ``metric`` accuracy on ``validation``. Returns the dataset's card, every run, and the chosen points
    (examples, accuracy on the reported split, its FLOPs)."""
    from opd.experiments import evals, final_accuracy, on_metric, run_config, run_once

    first = run_config(overrides, out / "runs" / "unused")
    data = teacher_dataset(first, sizes, out / "sft-data", progress)
    sweep, total = [], len(sizes) * len(rates)
    for size in sorted(sizes):
        steps = sft_steps(size, epochs, batch)
        for lr in rates:
            run_dir = out / "runs" / f"sft-fixed-{size}-lr{lr:g}"
            config = run_config(overrides, run_dir, method="sft", sft_data=out / "sft-data" / f"teacher-{size}.jsonl",
                                lr=lr, steps=steps, prompts_per_step=batch, samples_per_prompt=1,
                                warmup_steps=max(1, steps // 10), eval_every=steps, save_every=steps)
            desc = f"[SFT data {len(sweep) + 1}/{total}] {size} examples lr={lr:g}"
            records = on_metric(run_once(config, progress, desc), metric, str(run_dir))
            last = evals(records)[-1]
            sweep.append({"examples": size, "lr": lr, "steps": steps, "run": str(run_dir.relative_to(out)),
                          "accuracy": last["accuracy"], "greedy_accuracy": last["greedy_accuracy"],
                          "validation_accuracy": final_accuracy(run_dir, config, validation, "validation", metric),
                          "student_flops": records[-1]["student_flops_total"],
                          "teacher_sampling_flops": data["teacher_sampling_flops"][str(size)],
                          "start_accuracy": evals(records)[0]["accuracy"], "wall": records[-1]["elapsed"]})
    points = []
    for size in sorted(sizes):  # the best validation accuracy; the lower rate on a tie
        candidates = [e for e in sweep if e["examples"] == size]
        points.append(max(candidates, key=lambda e: (e["validation_accuracy"], -e["lr"])))
    return {"dataset": data, "epochs": epochs, "batch": batch, "rates": list(rates), "sweep": sweep,
            "points": points}
