"""The training loop: sample, score, advantages, step, evaluate, log, checkpoint.

``train`` reads top to bottom; ``training_step`` is one step: sample, score, advantages, update (the loss is
``objective.Objective``).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from opd import distributed, runs
from opd.config import TrainConfig
from opd.errors import NonFiniteError
from opd.evaluation import EvalResult, evaluate
from opd.micro_batches import (
    completion_positions,
    padding_share,
    plan,
    row_lengths,
    rows_tensor,
    split_to,
    trimmed,
)
from opd.objective import TeacherSignal
from opd.progress import progress as bar_over
from opd.rollouts import Rollouts
from opd.samplers.service import check_gap
from opd.scoring import completion_row_offsets
from opd.setup import Session, open_session
from opd.step_record import engine_stats, joined, rank_figures, step_record
from opd.tasks import Example
from opd.teachers.grade import grade
from opd.trackers import Trackers

COLLAPSE_STEPS = 10  # a gradient norm of exactly 0 this many steps in a row gets one warning


def update(session: Session, rollouts: Rollouts, signal: TeacherSignal | None, step_tokens: int,
           step: int, batches: list[list[int]] | None = None) -> tuple[float, float, bool]:
    """One optimizer step on this rank's rollouts; ``step_tokens`` counts the completion tokens of all
    ranks. ``batches``: the micro-batches' rows (``micro_batches.plan``), else ``grad_accum`` even slices.
    Returns (this rank's loss, the gradient norm before clipping, whether the step was skipped).

    A non-finite loss or gradient norm on any rank stops the run on every rank before the update
    (``NonFiniteError``), or with ``on_nonfinite=skip`` skips it: no optimizer step, no scheduler step (AdamW's
    moments and the schedule stay as they were; the step still counts toward ``steps``). Weights that the update
    itself made non-finite always stop the run, before any save, so the last checkpoint is a good one."""
    config, module = session.config, session.loss_module
    session.student.train()
    session.optimizer.zero_grad(set_to_none=True)
    rows = rollouts.tokens.shape[0]
    if batches is None:
        micro = max(rows // config.grad_accum, 1)
        batches = [list(range(start, min(start + micro, rows))) for start in range(0, rows, micro)]
        parts = [(rollouts.select(slice(b[0], b[-1] + 1)), b) for b in batches]
    else:  # token-budget micro-batches, each without its all-padding columns
        parts = [(trimmed(rollouts.select(rows_tensor(b, rollouts.tokens.device))), b) for b in batches]
    offsets = completion_row_offsets(rollouts) if signal is not None else []
    per_rank_tokens = step_tokens / session.dist.world  # DDP and FSDP2 average gradients over ranks
    loss_total = 0.0
    for i, (part, rows_of) in enumerate(parts):
        part_signal = None if signal is None else signal.rows(completion_positions(offsets, rows_of,
                                                                                    rollouts.tokens.device))
        last = i == len(parts) - 1  # DDP all-reduces once, after the last micro-batch
        with nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync():
            loss = module(part, per_rank_tokens, part_signal)
            loss.backward()
        loss_total += loss.item()
    grad_norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(session.trainable, config.grad_clip)).item()
    bad = [q for q, value in (("loss", loss_total), ("gradient norm", grad_norm)) if not math.isfinite(value)]
    ranks = distributed.all_gather(bad, session.dist)  # every rank takes the same decision
    bad = [q for q in ("loss", "gradient norm") if any(q in rank for rank in ranks)]
    if bad:
        if config.on_nonfinite == "skip":  # as DeepSpeed's and Megatron's overflowed steps: no update at all
            session.optimizer.zero_grad(set_to_none=True)
            return loss_total, grad_norm, True
        raise diverged(session, step, " and ".join(bad), f"loss {loss_total}, gradient norm {grad_norm}",
                       "the run stopped before applying it")
    session.optimizer.step()
    session.scheduler.step()
    weights_ok = bool(torch.stack([torch.isfinite(distributed.local_value(p)).all() for p in session.trainable])
                      .all())  # one device sync per step, not one per parameter
    if not all(distributed.all_gather(weights_ok, session.dist)):  # overflow in the update itself: never saved
        raise diverged(session, step, "weights", "the update made them NaN or inf", "the run stopped before saving")
    distributed.refresh_full_copy(session.student, session.full_model, session.config.parallel, session.dist)
    return loss_total, grad_norm, False


def diverged(session: Session, step: int, quantity: str, detail: str, what: str) -> NonFiniteError:
    """The error that stops a run whose ``quantity`` is not finite at ``step`` (0-based: the record's is +1)."""
    last = session.last_checkpoint
    resume = (f"Resume from it with a lower rate: opd train --resume {session.run_dir} lr={session.config.lr / 10:g} "
              "(or raise warmup_steps, or lower grad_clip)" if last else
              "No checkpoint was written yet: start again with a lower lr (or raise warmup_steps)")
    verb = "are" if " and " in quantity or quantity == "weights" else "is"
    return NonFiniteError(quantity, f"step {step + 1}: the {quantity} {verb} not finite ({detail}); {what}. The last "
                          f"good checkpoint is {last or 'none'}. {resume}. on_nonfinite=skip skips such steps instead.")


def training_step(session: Session, step: int) -> dict:
    """One step: sample (or read the data), score with the teacher, advantages, update; returns its record."""
    objective, view = session.objective, session.teacher_view
    started = time.perf_counter()
    session.full_model.eval()
    try:
        rollouts, failed = session.source.rollouts(step), None
    except NonFiniteError as err:
        rollouts, failed = None, err
    if any(distributed.all_gather(failed is not None, session.dist)):  # every rank stops, none left waiting
        raise diverged(session, step, "sampling distribution", "NaN or inf logits: the student's weights are not "
                       "finite, or a temperature or top_p the logits overflow at", "nothing was sampled") from failed
    sampled = time.perf_counter()
    graded, signal = None, None
    if objective.grading is not None:  # with kl=full one teacher forward serves the logged KL and the loss
        graded = grade(view, rollouts, objective.grading)
        rollouts.teacher_logprobs = graded.logprobs
        signal = objective.signal(graded, view)
    rollouts.advantages = objective.advantages(rollouts)
    scored = time.perf_counter()

    ranks = distributed.all_gather(rank_figures(rollouts, graded, view is not None and view.several), session.dist)
    engine = engine_stats(ranks)
    if engine:  # before the update: samples from the wrong weights are not trained on
        check_gap(engine, session.config.engine_gap_limit, step, session.source.where)
    num_tokens = sum(joined(ranks, "completion_lengths"))
    lr = session.scheduler.get_last_lr()[0]  # the rate this step's update uses
    batches, micro = token_budget(session, rollouts)
    loss, grad_norm, skipped = update(session, rollouts, signal, num_tokens, step, batches)
    loss = sum(distributed.all_gather(loss, session.dist)) / session.dist.world
    seconds = {"sample": sampled - started, "score": scored - sampled, "train": time.perf_counter() - scored}
    pushed = session.source.push_seconds()  # a rollout server's weight push, inside the sampling time
    if pushed is not None:
        seconds["sync"] = pushed
    record = step_record(ranks, session.config, session.student_shape, view, session.objective.kind, step, loss,
                         grad_norm, lr, engine, seconds, micro)
    if session.config.on_nonfinite == "skip":
        record["nonfinite_skipped"] = int(skipped)
        if skipped:  # a NaN is not JSON: the record says which were not finite
            record.update({k: None if not math.isfinite(record[k]) else record[k] for k in ("loss", "grad_norm")})
    return record


def token_budget(session: Session, rollouts: Rollouts) -> tuple[list[list[int]] | None, dict]:
    """``max_tokens_per_micro_batch``: this rank's micro-batches (as many on every rank), and the record's
    ``micro_batches`` and ``padding_share`` over all ranks; (None, {}) when it is off (``grad_accum``)."""
    budget = session.config.max_tokens_per_micro_batch
    if not budget:
        return None, {}
    prompt, completion = row_lengths(rollouts)  # a conversation's environment tokens are in its completion part
    batches = plan(rollouts.prompt_index.tolist(), prompt, completion, budget)
    batches = split_to(batches, max(distributed.all_gather(len(batches), session.dist)))
    share = padding_share(batches, prompt, completion)
    shares = distributed.all_gather(share, session.dist)
    return batches, {"micro_batches": len(batches), "padding_share": round(sum(shares) / len(shares), 4)}


def run_eval(session: Session) -> dict:
    """Held-out accuracy and the KL to the teacher; with several teachers, also each one's on its own prompts
    (``accuracy/NAME``, ...), the overall figures their weighted means (by prompts; the KL by tokens)."""
    config = session.config

    def run(examples: list[Example], view) -> EvalResult:
        return evaluate(session.full_model, session.tokenizer, session.task, examples,
                        max_new_tokens=config.max_new_tokens, teacher=view, seed=config.seed,
                        samples=config.eval_samples, sample_temperature=config.eval_temperature,
                        batch_size=config.eval_batch, dialogue=session.dialogue, noise=session.noise)

    if session.teacher_view is None or not session.teacher_view.several:
        result = run(session.eval_set, session.teacher_view)
        return {"accuracy": result.accuracy, "sampled_accuracy": result.sampled_accuracy,
                "eval_teacher_kl": result.teacher_kl, **{f"eval_{k}": v for k, v in result.figures.items()}}
    parts = {}
    for name in dict.fromkeys(ex.teacher or "" for ex in session.eval_set):
        examples = [ex for ex in session.eval_set if (ex.teacher or "") == name]
        parts[name] = (len(examples), run(examples, session.teacher_view.view(name)))
    record = {}
    for key, attr in (("accuracy", "accuracy"), ("sampled_accuracy", "sampled_accuracy"),
                      ("eval_teacher_kl", "teacher_kl")):
        weights = [(count * (result.mean_completion_tokens if key == "eval_teacher_kl" else 1), getattr(result, attr))
                   for count, result in parts.values()]
        known = [(w, v) for w, v in weights if v is not None]
        record[key] = sum(w * v for w, v in known) / sum(w for w, _ in known) if known else None
        for name, (_, result) in parts.items():
            record[f"{key}/{name or 'default'}"] = getattr(result, attr)
    return record


def train(config: TrainConfig, resume: str | Path | None = None, progress: bool = True, desc: str = "opd",
          task=None, reward=None, environment=None) -> dict:
    """Run (or resume) on-policy distillation; returns the summary written to summary.json. Under
    torchrun every rank trains; rank 0 alone evaluates, logs and writes (the others return {}). ``task``
    and ``reward``: a user's Python objects in place of ``config.task`` and ``config.reward``."""
    session = open_session(config, resume, task, reward, environment)
    run_dir, records, main = session.run_dir, session.records, session.dist.main
    purge_from = None if resume is None else session.start_step + 1 if session.start_step else 0
    trackers = Trackers(config.report_to if main else "none", run_dir, config.to_dict(), purge_from,
                        config.tracker_project, config.run_name)
    try:
        if main:
            from opd.plan import session_plan, short_form

            print(f"opd: {short_form(session_plan(session))}", file=sys.stderr)
            if config.offloaded() and not session.dist.active:
                print(f"opd: offload={config.offload} does nothing on one process: it moves FSDP2's shards, and "
                      "FSDP2 shards across several (opd train --nproc N)", file=sys.stderr)
        if main and session.teacher_view is not None:
            probe = [ex.messages[-1]["content"] for ex in session.eval_set[:32]]
            print(f"opd: {session.teacher_view.describe(probe)}", file=sys.stderr)
        # every rank evaluates when the teacher's layers are sharded (its forwards are collectives); rank 0 logs
        view = session.teacher_view
        evaluates = main or (view is not None and view.sharded)
        if not records and evaluates:  # a fresh run: measure where the student and teacher start
            teacher = None  # a teacher behind a server only scores; it cannot be asked to answer
            writer = view and view.teacher_tokenizer  # in its own tokens and template (conversations: one it can
            if view is not None and session.dialogue is not None:  # write them in, e.g. Qwen3's training variant)
                from opd.templates import writing_template

                writer = writing_template(writer, session.dialogue.environment)
            if view is not None and view.model is not None and writer is not None:
                teacher = evaluate(view.model, writer, session.task, session.eval_set,
                                   max_new_tokens=config.max_new_tokens, seed=config.seed,
                                   samples=config.eval_samples, sample_temperature=config.eval_temperature,
                                   batch_size=config.eval_batch, dialogue=session.dialogue)
            first = {"step": 0, **run_eval(session), "teacher_accuracy": teacher and teacher.accuracy,
                     "teacher_sampled_accuracy": teacher and teacher.sampled_accuracy, "elapsed": 0.0}
            if main:
                runs.append_metrics(run_dir, first)
                trackers.log(first)
            records.append(first)
        elapsed = records[-1]["elapsed"] if records else 0.0
        totals = {key: records[-1].get(f"{key}_total", 0.0) if records else 0.0
                  for key in ("student_flops", "teacher_flops")}
        bar = bar_over(range(session.start_step, config.steps), desc=desc, disable=not (progress and main),
                       initial=session.start_step, total=config.steps, unit="step")
        flat, warned = 0, False  # steps in a row whose gradient norm was exactly 0; the warning given once
        for step in bar:
            tick = time.perf_counter()
            record = training_step(session, step)
            flat = flat + 1 if record["grad_norm"] == 0 else 0
            if flat == COLLAPSE_STEPS and main and not warned:
                warned = True
                why = ("every group's rewards were equal (nothing to learn from: all right or all wrong; more "
                       "samples_per_prompt or an easier start give a signal), or " if config.method == "rl" else "")
                print(f"opd: warning: the gradient norm has been exactly 0 for {COLLAPSE_STEPS} steps in a row (to "
                      f"step {record['step']}): {why}the policy has likely collapsed onto tokens it no longer moves "
                      f"from (a rate too high for it: lr={config.lr:g}); check teacher_kl and accuracy, and lower lr",
                      file=sys.stderr)
            done = record["step"] == config.steps
            if evaluates and (record["step"] % config.eval_every == 0 or done):
                record.update(run_eval(session))
            elapsed += time.perf_counter() - tick
            record["elapsed"] = round(elapsed, 3)
            for key in totals:  # cumulative compute; a remote teacher's architecture is unknown (null)
                totals[key] = None if record[key] is None or totals[key] is None else totals[key] + record[key]
                record[f"{key}_total"] = totals[key]
            save = record["step"] % config.save_every == 0 or done
            trainer_state = session.trainer_state() if save else None  # a collective under FSDP2: all ranks call it
            if main:
                runs.append_metrics(run_dir, record)
                trackers.log(record)
            if save:
                session.last_checkpoint = runs.checkpoint_path(run_dir, record["step"])
                if main:
                    runs.save_checkpoint(run_dir, record["step"], session.full_model, session.tokenizer, trainer_state)
            records.append(record)
            bar.set_postfix(loss=_last(records, "loss"), kl=_last(records, "teacher_kl"),
                            reward=f"{record['train_reward']:.2f}", acc=_last(records, "accuracy"))
        bar.close()
        session.source.finish(config.steps)  # a rollout server ends holding the trained student
    except BaseException:  # an error or an interrupt: the trackers' runs are closed, to be resumed
        trackers.abort()
        raise
    finally:
        session.close()
    summary = {}
    if main:
        runs.save_final(run_dir, session.full_model, session.tokenizer)
        summary = summarize(records, config, len(session.eval_set))
        runs.write_json(run_dir / "summary.json", summary)
        from opd.report import write_report

        write_report(run_dir, config, records, summary)
        trackers.finish({"curves": run_dir / "curves.png"}, summary)
    distributed.barrier(session.dist)  # the ranks leave together, after rank 0 has written
    return summary


def _last(records: list[dict], key: str) -> str:
    values = [r[key] for r in records if r.get(key) is not None]
    return f"{values[-1]:.3f}" if values else "-"


def summarize(records: list[dict], config: TrainConfig, eval_examples: int) -> dict:
    evals = [r for r in records if "accuracy" in r]
    first, last = evals[0], evals[-1]
    return {
        "method": config.method,
        "eval_examples": eval_examples,  # the accuracies' N: one standard error is sqrt(p (1 - p) / N)
        "student_accuracy_before": first["accuracy"],
        "student_accuracy_after": last["accuracy"],
        "teacher_accuracy": first["teacher_accuracy"],
        "eval_samples": config.eval_samples,  # the sampled accuracies' draws per prompt, at eval_temperature
        "eval_temperature": config.eval_temperature,
        "student_sampled_accuracy_before": first.get("sampled_accuracy"),
        "student_sampled_accuracy_after": last.get("sampled_accuracy"),
        "teacher_sampled_accuracy": first.get("teacher_sampled_accuracy"),
        "teacher_kl_before": first["eval_teacher_kl"],
        "teacher_kl_after": last["eval_teacher_kl"],
        "steps": records[-1]["step"],
        "wall_seconds": records[-1]["elapsed"],
        "completion_tokens_trained": sum(r.get("completion_tokens", 0) for r in records),
        "student_flops": records[-1].get("student_flops_total"),
        "teacher_flops": records[-1].get("teacher_flops_total"),
    }

