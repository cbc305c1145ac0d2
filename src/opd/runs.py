"""The run directory: config.json, metrics.jsonl, summary.json, checkpoints/, final/, report.

Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves a
half-written one; ``checkpoints/latest`` names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from opd.config import TrainConfig
from opd.models import OpdError, plain_model, save_atomically

# fields that may differ between a run and its resumption without changing its results
RESUMABLE_CHANGES = {"steps", "out", "eval_every", "save_every", "device", "parallel", "offload", "dist_timeout",
                     "report_to", "tracker_project", "run_name", "sampler", "sampler_model", "sampler_sync_dir",
                     "async_rollouts"}


def new_run_dir(config: TrainConfig) -> Path:
    path = Path(config.out) if config.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}"
    if path.exists() and any(path.iterdir()):
        raise OpdError(f"run directory {path} already exists and is not empty; "
                       f"choose another with --out, or continue it with --resume {path}")
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", config.to_dict())
    return path


def check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume a directory that is not a run, or whose config disagrees with ``config``."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise OpdError(f"{run_dir} is not an opd run directory (no config.json)")
    saved = json.loads(config_path.read_text())
    current = config.to_dict()
    defaults = type(config)().to_dict()  # a field newer than the run: the run had its default
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise OpdError(f"cannot resume {run_dir}: its config disagrees ({details}). "
                       "Resume with the run's own config, or start a new run.")


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def append_metrics(run_dir: Path, record: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, up_to_step: int | None = None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def rewrite_metrics(run_dir: Path, records: list[dict]) -> None:
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, run_dir / "metrics.jsonl")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict) -> Path:
    """Model (or LoRA adapter) in HF format plus optimizer/scheduler state; older ones are removed."""
    root = run_dir / "checkpoints"
    path = checkpoint_path(run_dir, step)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # a PeftModel writes its adapter, a plain model its weights
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, **trainer_state}, tmp / "trainer_state.pt")

    save_atomically(path, write)
    write_json(root / "latest.json", {"step": step, "path": path.name})
    for old in root.glob("step_*"):
        if old != path and not old.name.endswith(".tmp"):
            shutil.rmtree(old)
    return path


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    pointer = run_dir / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    return info["step"], run_dir / "checkpoints" / info["path"]


def save_final(run_dir: Path, model, tokenizer) -> Path:
    path = run_dir / "final"

    def write(tmp: Path) -> None:
        plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_atomically(path, write)
    return path


def saved_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was started with (fields newer than the run read as their defaults)."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise OpdError(f"{run_dir} is not an opd run directory (no config.json)")
    saved = json.loads(config_path.read_text())
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
