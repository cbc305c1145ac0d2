"""What ``opd plan`` reads and measures: the models' configs and tokenizers, the task's prompts, the
teacher server, and a short probe of real steps that times a step, an evaluation and a checkpoint and
measures peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, reset
through ``/proc/self/clear_refs`` and read from ``VmHWM``, less the resident set before the probe).

The probe writes only to a temporary directory; a run directory is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opd.config import TrainConfig
from opd.errors import OpdError
from opd.models import chat_prompt_ids, load_tokenizer, resolve_model_path
from opd.objective import kl_of
from opd.plan import ModelFacts, Plan, check_vocab, make_plan
from opd.tasks.choose import make_task
from opd.teachers.build import check_teacher_path, teacher_tokenizer_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EVAL_PROBE = 32  # held-out prompts the probe evaluates (the time is scaled to eval_examples)


def model_facts(name: str, field: str, config: TrainConfig) -> tuple[ModelFacts, str]:
    from transformers import AutoConfig

    path = resolve_model_path(name, field)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise OpdError(f"{field}={name}: cannot read its config.json ({err})") from err
    return ModelFacts.of(name, hf_config, lora=config if field == "student" else None), path


def has_weights(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def server_check(config: TrainConfig) -> tuple[str, str]:
    import httpx

    headers = {"Authorization": f"Bearer {os.environ['OPD_TEACHER_API_KEY']}"} \
        if os.environ.get("OPD_TEACHER_API_KEY") else {}
    url = config.teacher.rstrip("/") + ("/models" if config.teacher.rstrip("/").endswith("/v1") else "/v1/models")
    try:
        reply = httpx.get(url, headers=headers, timeout=10)
        reply.raise_for_status()
        served = [m["id"] for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        return "error", f"teacher server {config.teacher}: {url} did not answer as an OpenAI-compatible server ({err})"
    if config.teacher_model and config.teacher_model not in served:
        return "error", f"teacher server {config.teacher} serves {', '.join(served)}, not {config.teacher_model}"
    return "ok", f"teacher server {config.teacher} answers, serving {', '.join(served)}"


def gather(config: TrainConfig, processes: list[int], prompt_tokens: int) -> tuple[Plan, bool]:
    """The plan's static part, and whether the probe can run (the weights are here and nothing failed)."""
    config.validate()
    checks: list[tuple[str, str]] = []
    student, student_path = model_facts(config.student, "student", config)
    remote = config.remote_teacher
    midtrain = config.method == "midtrain"
    teacher, teacher_path = (None, None) if remote or midtrain or config.program_teacher else model_facts(
        config.teacher_spec, "teacher", config)
    runnable = has_weights(student_path) and (teacher_path is None or has_weights(teacher_path))
    if not runnable:
        checks.append(("note", "the weights are not here (config.json only): no probe, no time estimate"))
    if remote:
        checks.append(server_check(config))
        checks.append(("note", "a served teacher's size is unknown here: its memory and FLOPs are not counted"))
    lengths = [prompt_tokens] if prompt_tokens else []
    tokenizer, kl = None, config.kl  # kl=auto: resolved below once both tokenizers are read
    if Path(student_path).is_dir() and not any((Path(student_path) / f).is_file() for f in TOKENIZER_FILES):
        checks.append(("note", f"no tokenizer in {student_path}: tokenizer, template and data checks skipped"))
    else:
        try:
            tokenizer = load_tokenizer(student_path)
        except OpdError as err:
            checks.append(("note", f"no tokenizer for the student ({str(err).splitlines()[0][:160]}): tokenizer, "
                                   "template and data checks skipped"))
    if tokenizer is not None:
        checks.append(check_vocab(student, tokenizer, "the student"))
        checks.append(("ok" if tokenizer.chat_template else "note", "the student has a chat template" if
                       tokenizer.chat_template else "the student has no chat template: it reads the plain prompt"))
        if not midtrain:
            try:
                teacher_tokenizer = teacher_tokenizer_for(config, tokenizer, teacher_path)
                if teacher is not None:
                    checks.append(check_vocab(teacher, teacher_tokenizer, "the teacher"))
                path = check_teacher_path(config, tokenizer, teacher_tokenizer, student_path, teacher_path)
                kl = kl_of(config, aligned=path == "aligned")
                checks.append(("ok", {"shared": "one tokenizer and one chat template: the teacher reads the "
                                                "student's tokens", "own": "one tokenizer, the teacher's own chat "
                                                "template (teacher_template=own)", "aligned": "the tokenizers "
                                                "differ: the teacher's tokens are aligned with the student's on "
                                                "the text (kl=sampled)"}[path]))
            except OpdError as err:
                checks.append(("error", str(err)))
                runnable = False
        try:
            task = make_task(config)
            examples = task.train_examples(0, config.prompts_per_step, config.seed) + task.eval_examples(8)
            measured = [len(chat_prompt_ids(tokenizer, ex.messages)) for ex in examples]
            checks.append(("ok", f"task {task.name}: prompts of {min(measured)}-{max(measured)} tokens "
                                 f"(mean {statistics.mean(measured):.1f}) in the first step"))
            lengths = lengths or measured
        except OpdError as err:
            checks.append(("error", str(err)))
            runnable = False
    if not lengths:
        raise OpdError("without the student's tokenizer the prompts cannot be measured: pass --prompt-tokens N")
    plan = make_plan(dataclasses.replace(config, kl=kl), student, teacher, (statistics.mean(lengths), max(lengths)),
                     processes, checks)
    return plan, runnable


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset the peak resident set (``VmHWM``) where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe(config: TrainConfig, steps: int = 3, progress: bool = True) -> dict:
    """Time ``steps`` training steps after one warm-up step, one evaluation (on up to ``EVAL_PROBE`` prompts,
    scaled to ``eval_examples``) and one checkpoint, on a copy of ``config`` in a temporary directory."""
    from opd import runs
    from opd.evaluation import evaluate
    from opd.setup import open_session
    from opd.trainer import run_eval, training_step

    trial = copy.deepcopy(config)
    with tempfile.TemporaryDirectory(prefix="opd-plan-") as tmp:
        trial.out = str(Path(tmp) / "run")
        cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_memory = torch.cuda.memory_allocated()
        reset_peak()
        base_rss = rss_bytes("VmRSS")
        started = time.perf_counter()
        session = open_session(trial)
        setup = time.perf_counter() - started
        times, tokens = [], []
        for step in range(steps + 1):
            tick = time.perf_counter()
            record = training_step(session, step)
            if step:  # the first step warms caches and kernels up
                times.append(time.perf_counter() - tick)
                tokens.append(record["completion_tokens"] / (config.prompts_per_step * config.samples_per_prompt))
            if progress:
                print(f"opd plan: probe step {step + 1} of {steps + 1}: {time.perf_counter() - tick:.2f} s",
                      flush=True)
        full_eval = session.eval_set
        session.eval_set = full_eval[:EVAL_PROBE]
        scale = len(full_eval) / len(session.eval_set)
        tick = time.perf_counter()
        run_eval(session)
        eval_seconds = (time.perf_counter() - tick) * scale
        teacher_eval = 0.0
        view = session.teacher_view
        if view is not None and view.model is not None:
            tick = time.perf_counter()
            evaluate(view.model, view.teacher_tokenizer, session.task, session.eval_set,
                     max_new_tokens=config.max_new_tokens, seed=config.seed, samples=config.eval_samples,
                     sample_temperature=config.eval_temperature, batch_size=config.eval_batch)
            teacher_eval = (time.perf_counter() - tick) * scale
        tick = time.perf_counter()
        runs.save_checkpoint(session.run_dir, steps + 1, session.full_model, session.tokenizer, session.trainer_state())
        save_seconds = time.perf_counter() - tick
        session.source.release()  # the probe's adapter leaves a rollout server (opd train pushes its own)
        session.close()
        if cuda:
            peak, source = torch.cuda.max_memory_allocated() - base_memory, "torch.cuda.max_memory_allocated"
        else:
            peak, source = rss_bytes("VmHWM") - base_rss, "peak resident set of the process, less its start"
    step_seconds = statistics.mean(times)
    evaluations = 1 + config.steps // config.eval_every + (1 if config.steps % config.eval_every else 0)
    saves = config.steps // config.save_every + (1 if config.steps % config.save_every else 0) + 1  # + final/
    wall = setup + config.steps * step_seconds + evaluations * eval_seconds + teacher_eval + saves * save_seconds
    return {"steps": steps, "device": str(session.device), "setup_seconds": setup, "step_seconds": step_seconds,
            "eval_seconds": eval_seconds, "teacher_eval_seconds": teacher_eval, "save_seconds": save_seconds,
            "evaluations": evaluations, "completion_tokens": statistics.mean(tokens), "wall_seconds": wall,
            "peak_memory": peak, "memory_source": source}
