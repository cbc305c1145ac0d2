"""opd from Python: ``opd.train`` and ``opd.evaluate``, the two calls a user's script needs.

    import opd
    summary = opd.train(student="Qwen/Qwen3-1.7B", teacher="Qwen/Qwen3-8B", task="prompts.jsonl",
                        kl="sampled", lr=1e-6, steps=150)
    result = opd.evaluate(summary["final"], task="held_out.jsonl", samples=4)

A task is a name (``arithmetic``), a prompts file, or any object with the ``opd.Task`` methods; a reward
is any function ``reward(completion: str, example: opd.Example) -> float``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from opd.config import TrainConfig, load_config
from opd.evaluation import EvalResult
from opd.tasks import Example, Task
from opd.tasks.custom import Reward


def _config(config: TrainConfig | str | Path | None, fields: dict) -> TrainConfig:
    """A config from an object, a TOML file or the defaults, with ``fields`` set on top (checked by name)."""
    if isinstance(config, TrainConfig):
        base = dataclasses.replace(config)
    else:
        base = load_config(str(config) if config is not None else None, [])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        from opd.errors import OpdError

        raise OpdError(f"unknown config field(s) {', '.join(unknown)}; `opd train --help` lists them all")
    return dataclasses.replace(base, **fields)


def _name(obj) -> str:
    return f"python:{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def train(config: TrainConfig | str | Path | None = None, *, task: Task | None = None, reward: Reward | None = None,
          environment=None, resume: str | Path | None = None, progress: bool = True, **fields) -> dict:
    """Train a student (on-policy distillation by default; any ``method=``) and return the run's summary,
    with ``run_dir`` and ``final`` (the trained student's directory) added.

    ``config``: a ``TrainConfig``, a TOML file, or None for the defaults; ``fields`` override any config
    field (``steps=100``, ``teacher="..."``). ``task``: a ``Task`` object in place of ``config.task``.
    ``reward``: ``reward(completion, example) -> float`` in place of the task's verifier, for training
    (``method=rl`` / ``opd+rl``) and for the reported accuracy. ``environment``: an object whose
    ``start(example)`` opens a conversation (``opd.environments``), in place of ``config.environment``.
    ``resume``: a run directory to continue."""
    from opd.trainer import train as run

    if config is None and resume is not None:  # continue with the run's own config, as `opd train --resume`
        from opd.runs import saved_config

        config = saved_config(resume)
    resolved = _config(config, fields)
    if not resolved.out and resume is None:  # the default name, fixed here so that the summary can give it
        resolved.out = str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{resolved.method}")
    if task is not None:
        resolved.task = _name(task)
    if reward is not None:
        resolved.reward = _name(reward)
    if environment is not None:
        resolved.environment = _name(environment)
    summary = run(resolved, resume, progress=progress, task=task, reward=reward, environment=environment)
    run_dir = Path(resume) if resume is not None else Path(resolved.out) if resolved.out else None
    if summary and run_dir is not None:
        summary = {**summary, "run_dir": str(run_dir), "final": str(run_dir / "final")}
    return summary


def evaluate(model: str | Path, task: Task | str = "arithmetic", *, examples: int = 256, samples: int = 0,
             temperature: float = 1.0, eval_file: str = "", verifier: str = "exact", reward: Reward | None = None,
             teacher: str | Path | None = None, teacher_template: str = "auto", max_new_tokens: int = 48,
             seed: int = 0, device: str = "auto", data: dict | None = None) -> EvalResult:
    """Held-out accuracy of ``model`` (a model directory, hub id, ``embedded:NAME`` or a run's ``final/``):
    greedy, and with ``samples`` = k the mean over k draws per prompt at ``temperature``; with ``teacher``
    the per-token reverse KL to it. ``task`` is a ``Task`` object, a built-in name or a prompts file
    or dataset (then ``eval_file`` holds the held-out prompts, or the file itself is used, its ``eval_split``);
    ``data``: the dataset fields of ``TrainConfig`` (``prompt_field``, ``answer_field``, ``split``, ...)."""
    from opd.config import apply_values
    from opd.domains import COUNT, POSITIVE, SEED, Number, check
    from opd.errors import OpdError
    from opd.evaluation import evaluate as run
    from opd.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
    from opd.tasks.choose import is_file_task, make_task

    for name, value, domain in (("samples", samples, Number(0, integer=True)), ("temperature", temperature, POSITIVE),
                                ("examples", examples, COUNT), ("max_new_tokens", max_new_tokens, COUNT),
                                ("seed", seed, SEED)):
        problem = check(domain, name, value, "opd.evaluate argument")
        if problem:
            raise OpdError(problem)
    device_ = pick_device(device)
    dtype = pick_dtype("auto", device_)
    path = resolve_model_path(str(model), "model")
    tokenizer = load_tokenizer(path)
    if isinstance(task, str):
        name = eval_file if task == "arithmetic" and eval_file else task
        config = TrainConfig(task=name, eval_file=eval_file or (name if is_file_task(name) else ""),
                             verifier=verifier)
        apply_values(config, data or {}, "data")
        built = make_task(config, reward=reward)
    else:
        built = make_task(TrainConfig(), task, reward)
    held_out = built.eval_examples(examples)
    if not held_out:
        raise OpdError(f"task {built.name} has no held-out prompts; pass eval_file=PATH.jsonl")
    view = None
    if teacher is not None:
        from opd.teachers import LocalTeacher, TeacherView

        teacher_path = resolve_model_path(str(teacher), "teacher")
        teacher_tokenizer = load_tokenizer(teacher_path)
        view = TeacherView(LocalTeacher(load_model(teacher_path, device_, dtype), len(teacher_tokenizer)),
                           tokenizer, teacher_tokenizer, teacher_template)
    return run(load_model(path, device_, dtype), tokenizer, built, held_out, max_new_tokens=max_new_tokens,
               teacher=view, seed=seed, samples=samples, sample_temperature=temperature)


__all__ = ["Example", "Task", "TrainConfig", "evaluate", "train"]
