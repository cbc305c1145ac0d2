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
from opd.errors import OpdError
from opd.models import plain_model, save_atomically

# fields that may differ between a run and its resumption without changing its results
RESUMABLE_CHANGES = {"steps", "out", "eval_every", "save_every", "device", "parallel", "offload", "dist_timeout",
                     "report_to", "tracker_project", "run_name", "sampler", "sampler_model", "sampler_sync_dir",
                     "async_rollouts", "lr", "warmup_steps", "grad_clip", "on_nonfinite", "check_memory"}
# (lr, warmup_steps and grad_clip: a run that diverged resumes from its last good checkpoint with a lower rate)


# fields a run resolves when it starts (``auto``, or what the models imply): config.json keeps what was asked for,
# its "resolved" object what each became; a resumed run must resolve those that change results the same way
# a field read only when another is set: inert (and free to differ, e.g. a default that changed) where that one is
# empty on both sides
INERT_WITHOUT = {"tool_format": "tools"}
RESOLVED = ("kl", "teacher_template", "dtype", "device", "sampler_sync")
SAME_RESOLUTION = ("kl", "teacher_template", "dtype")  # device and sampler_sync may change, as device and sampler
TEMPLATE_REQUEST = {"own": "own", "shared": "student"}  # teacher_template= that keeps a resolved path (aligned: none)


def new_run_dir(config: TrainConfig, requested: dict | None = None, resolved: dict | None = None) -> Path:
    """A new run directory with its config.json: the fields as asked for (``requested``, else ``config``'s) and,
    under ``"resolved"``, what the run resolved them to (``RESOLVED``)."""
    path = Path(config.out) if config.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}"
    if path.exists() and any(path.iterdir()):
        raise OpdError(f"run directory {path} already exists and is not empty; "
                       f"choose another with --out, or continue it with --resume {path}")
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", {**(requested or config.to_dict()), "resolved": resolved or {}})
    return path


def read_saved(run_dir: Path) -> dict:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise OpdError(f"{run_dir} is not an opd run directory (no config.json)")
    try:
        saved = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise OpdError(f"{config_path} is not valid JSON (line {err.lineno}: {err.msg}); it is not a config opd "
                       "wrote, or it was edited: restore it, or start a new run") from None
    if not isinstance(saved, dict):
        raise OpdError(f"{config_path} is not a JSON object of config fields")
    return saved


def saved_resolution(saved: dict) -> dict:
    """What a run resolved its fields to: its "resolved" object; a run written before there was one recorded
    ``kl`` as resolved in its place (and left the others as asked)."""
    if "resolved" in saved:
        return saved["resolved"]
    return {"kl": saved["kl"]} if "kl" in saved else {}


def check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume a directory that is not a run, or whose config, as asked for, disagrees with ``config``
    (as asked for: before resolution). A field in ``RESOLVED`` that either side leaves to the run (``auto``) is
    compared once resolved, by ``check_resolution``."""
    saved = read_saved(run_dir)
    resolved = saved_resolution(saved)
    saved = {k: v for k, v in saved.items() if k != "resolved"}
    current = config.to_dict()
    defaults = type(config)().to_dict()  # a field newer than the run: the run had its default

    def agree(key: str) -> bool:
        then, now = saved.get(key, defaults.get(key)), current.get(key)
        if key in RESOLVED and (then == now or "auto" in (then, now) or resolved.get(key) == now):
            return True  # an auto (or the value it became) is checked once this run has resolved it
        if key in INERT_WITHOUT and not saved.get(INERT_WITHOUT[key]) and not current.get(INERT_WITHOUT[key]):
            return True
        return key in RESUMABLE_CHANGES or then == now

    differing = sorted(k for k in set(saved) | set(current) if not agree(k))
    if differing:
        details = ", ".join(f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise OpdError(f"cannot resume {run_dir}: its config disagrees ({details}). "
                       "Resume with the run's own config, or start a new run.")


def check_resolution(run_dir: Path, resolved: dict, reasons: dict | None = None) -> None:
    """Refuse to resume a run whose ``SAME_RESOLUTION`` fields resolve now to other values than when it started
    (the models or the machine changed under an ``auto``), naming each with the value to pass to keep it."""
    then = saved_resolution(read_saved(run_dir))
    differing = [k for k in SAME_RESOLUTION if k in then and k in resolved and then[k] != resolved[k]]
    if differing:
        reasons = reasons or {}
        details = "; ".join(f"{k} resolved to {then[k]!r} when the run started and resolves to {resolved[k]!r} now"
                            + (f" ({reasons[k]})" if reasons.get(k) else "") for k in differing)
        values = {k: TEMPLATE_REQUEST.get(then[k]) if k == "teacher_template" else then[k] for k in differing}
        fix = " ".join(f"{k}={v}" for k, v in values.items() if v)
        raise OpdError(f"cannot resume {run_dir}: {details}. "
                       + (f"Pass {fix} to resume it as it ran, or start a new run." if fix else
                          "Resume with the models it started with, or start a new run."))


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
    saved = read_saved(Path(run_dir))
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
