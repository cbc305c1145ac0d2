"""Experiments: several ordinary training runs under one directory, compared in one report.

Each run is a normal opd run directory under ``OUT/runs/``; an interrupted experiment started again
with the same command reuses the finished runs and resumes the unfinished one.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd import runs
from opd.config import TrainConfig, load_config
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer, pick_device, pick_dtype


def run_config(overrides: list[str], out: Path, **values) -> TrainConfig:
    """The user's overrides, then the experiment's own values (which win), run into ``out``."""
    fixed = [f"{k}={v}" for k, v in values.items()]
    return load_config(None, list(overrides) + fixed + [f"out={out}"])


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in ``run_dir`` ended having trained ``steps`` steps or more (its ``summary.json``)."""
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text())["steps"] >= steps


def run_once(config: TrainConfig, progress: bool = True, desc: str = "opd") -> list[dict]:
    """Train ``config`` into ``config.out`` and return its metrics: a finished run with the same config
    is reused, an interrupted one resumed, otherwise a new one started."""
    from opd.trainer import train

    run_dir = Path(config.out)
    if (run_dir / "config.json").is_file():
        runs.check_resumable(run_dir, config)
        if not finished(run_dir, config.steps):
            train(config, resume=run_dir, progress=progress, desc=desc)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise OpdError(f"{run_dir} exists and is not an opd run directory; move it away or choose another --out")
    else:
        train(config, progress=progress, desc=desc)
    return runs.read_metrics(run_dir)


METRICS = {"sampled": ("sampled_accuracy", "teacher_sampled_accuracy"), "greedy": ("accuracy", "teacher_accuracy")}
METRIC_NAMES = {"sampled": "sampled accuracy (mean of k draws per prompt)", "greedy": "greedy accuracy"}


def check_metric(metric: str, config: TrainConfig) -> None:
    if metric not in METRICS:
        raise OpdError(f"--metric {metric!r} must be one of {', '.join(METRICS)}")
    if metric == "sampled" and config.eval_samples < 1:
        raise OpdError("--metric sampled needs eval_samples >= 1 (draws per held-out prompt); "
                       "set eval_samples=4 or use --metric greedy")


def on_metric(records: list[dict], metric: str, run: str = "a run") -> list[dict]:
    """The run's records with ``accuracy`` and ``teacher_accuracy`` read as ``metric`` ("sampled" or
    "greedy"), so that an experiment's targets and curves use it; the greedy figures stay in
    ``greedy_accuracy`` and ``teacher_greedy_accuracy``."""
    key, teacher_key = METRICS[metric]
    out = []
    for record in records:
        if record.get("accuracy") is not None and record.get(key) is None:
            raise OpdError(f"{run} has no {metric} accuracy at step {record['step']} (it was evaluated without "
                           "it, e.g. by an older opd): move it away to rerun it, or use --metric greedy")
        record = dict(record)
        if "accuracy" in record:
            record["greedy_accuracy"], record["accuracy"] = record["accuracy"], record.get(key)
        if "teacher_accuracy" in record:
            record["teacher_greedy_accuracy"] = record["teacher_accuracy"]
            record["teacher_accuracy"] = record.get(teacher_key)
        out.append(record)
    return out


def final_accuracy(run_dir: Path, config: TrainConfig, examples: list, name: str, metric: str = "greedy") -> float:
    """Accuracy (``metric``) of a run's final model on ``examples``, cached in ``run_dir/<name>.json``."""
    from opd.evaluation import evaluate
    from opd.tasks.choose import make_task

    cache = run_dir / f"{name}.json"
    samples = config.eval_samples if metric == "sampled" else 0
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["examples"] == len(examples) and saved.get("metric", "greedy") == metric:
            return saved["accuracy"]
    device = pick_device(config.device)
    model = load_model(run_dir / "final", device, pick_dtype(config.dtype, device))
    result = evaluate(model, load_tokenizer(run_dir / "final"), make_task(config), examples,
                      max_new_tokens=config.max_new_tokens, seed=config.seed, samples=samples,
                      sample_temperature=config.eval_temperature)
    accuracy = result.sampled_accuracy if metric == "sampled" else result.accuracy
    runs.write_json(cache, {"examples": len(examples), "metric": metric, "accuracy": accuracy})
    return accuracy


def evals(records: list[dict]) -> list[dict]:
    """The records that carry a held-out evaluation, in step order."""
    return [r for r in records if r.get("accuracy") is not None]


def total_flops(record: dict, include_teacher: bool = True) -> float | None:
    student, teacher = record.get("student_flops_total", 0.0), record.get("teacher_flops_total", 0.0)
    if student is None or (include_teacher and teacher is None):
        return None
    return student + (teacher if include_teacher else 0.0)
