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
from tqdm import tqdm

from opd import distributed, runs
from opd.config import TrainConfig
from opd.evaluation import EvalResult, completions_text, evaluate
from opd.flops import mixed_step_flops, step_flops
from opd.models import OpdError
from opd.objective import TeacherSignal
from opd.rollouts import Rollouts, concat_rollouts, pack_pairs
from opd.samplers.local import sample
from opd.samplers.service import check_gap, merge_stats, reweight
from opd.scoring import completion_row_offsets
from opd.setup import Session, open_session
from opd.tasks import Example
from opd.tasks.jsonl import epoch_order
from opd.teachers.routed import per_teacher_kl, routed_step_flops
from opd.trackers import Trackers


def train_examples(session: Session, step: int) -> list[Example]:
    """The step's prompts (all ranks'): a fresh draw from the task, or with ``train_prompts=N`` the N
    prompts of step 0 reused in a reshuffled cycle (the blog's data-reuse experiment uses N=1)."""
    config, task = session.config, session.task
    if not config.train_prompts:
        return task.train_examples(step, config.prompts_per_step, config.seed)
    pool = task.train_examples(0, config.train_prompts, config.seed)
    return [pool[i] for i in epoch_order(len(pool), step, config.prompts_per_step, config.seed)]


def pair_ids(session: Session, index: int) -> tuple[list[int], list[int]]:
    """``sft_data`` pair ``index`` as token ids: the chat-rendered prompt, and the completion cut to
    ``max_new_tokens - 1`` tokens with EOS appended."""
    example, text = session.sft_pairs[index]
    return session.prompt_ids(example.messages), completion_ids(session, text)


def completion_ids(session: Session, text: str) -> list[int]:
    """A given completion as token ids: cut to ``max_new_tokens - 1`` tokens, EOS appended."""
    tokenizer = session.tokenizer
    return tokenizer.encode(text, add_special_tokens=False)[: session.config.max_new_tokens - 1] + [
        tokenizer.eos_token_id]


def dataset_rollouts(session: Session, step: int) -> tuple[list[Example], Rollouts]:
    """method=sft with sft_data: this rank's (prompt, completion) pairs of the step."""
    config = session.config
    order = epoch_order(len(session.sft_pairs), step, config.prompts_per_step, config.seed)
    mine = distributed.shard(order, session.dist)
    pairs = [pair_ids(session, i) for i in mine]
    rollouts = pack_pairs([p for p, _ in pairs], [c for _, c in pairs], session.tokenizer.pad_token_id)
    return [session.sft_pairs[i][0] for i in mine], rollouts.to(session.device)


def midtrain_rollouts(session: Session, step: int) -> Rollouts:
    """method=midtrain: this rank's share of the step's document chunks (each chunk's first token is its
    prompt, the rest is trained on) and, with ``chat_fraction``, chat pairs from ``sft_data``."""
    config = session.config
    chats = round(config.prompts_per_step * config.chat_fraction)
    docs = epoch_order(len(session.doc_chunks), step, config.prompts_per_step - chats, config.seed)
    pairs = epoch_order(len(session.sft_pairs), step, chats, config.seed + 1) if chats else []
    # document chunks are token lists, chat pairs indices into sft_data; each rank encodes only its own
    mine = distributed.shard([session.doc_chunks[i] for i in docs] + pairs, session.dist)
    rows = [([item[0]], item[1:]) if isinstance(item, list) else pair_ids(session, item) for item in mine]
    rollouts = pack_pairs([p for p, _ in rows], [c for _, c in rows], session.tokenizer.pad_token_id)
    rollouts.rewards = torch.zeros(len(rows))
    return rollouts.to(session.device)


def split_on_policy(config, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """GKD's ``lmbda``: the first ``round(lmbda * n)`` of this rank's prompts are answered by the student, the
    rest are off-policy (their completions come from the data or the teacher)."""
    count = round(config.lmbda * len(examples)) if config.method == "opd" else len(examples)
    return examples[:count], examples[count:]


def sampled_rollouts(session: Session, examples: list[Example], step: int, teacher: bool) -> Rollouts:
    """This rank's samples for ``examples``, ``samples_per_prompt`` each, drawn in process by the student or
    the teacher (reading the prompts as it was trained to: its own template, then re-packed after the
    student's rendering)."""
    config, tokenizer = session.config, session.tokenizer
    prompts = [session.prompt_ids(ex.messages) for ex in examples]
    own = teacher and session.teacher_view.path == "own"
    seed = config.seed * 1_000_003 + step + session.dist.rank * 7_919_000_003  # rank 0: as one process
    if teacher and config.method != "sft":
        seed += 104_729  # the teacher's draws are not the student's
    rollouts = sample(session.teacher_model if teacher else session.full_model,
                      [session.teacher_view.teacher_prompt(ex.messages) for ex in examples] if own else prompts,
                      samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                      temperature=config.temperature, top_p=config.top_p, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, vocab_size=session.vocab_size,
                      generator=torch.Generator(session.device).manual_seed(seed))
    if own:  # the student trains on the teacher's completion after its own rendering of the prompt
        groups = rollouts.prompt_index
        rollouts = pack_pairs([p for p in prompts for _ in range(config.samples_per_prompt)],
                              rollouts.completion_ids(), tokenizer.pad_token_id).to(session.device)
        rollouts.prompt_index = groups.to(session.device)
    return rollouts


def off_policy_rollouts(session: Session, examples: list[Example], step: int) -> Rollouts:
    """GKD's off-policy part: each prompt's reference completion from the data (one row), or with
    ``seq_kd`` (or when a prompt has none) ``samples_per_prompt`` of the teacher's samples, with rewards;
    ``extras["offpolicy"]`` says which. The teacher samples only here, when these rows need it."""
    config = session.config
    teacher = config.seq_kd or any(not ex.completion for ex in examples)
    if teacher:
        rollouts, per_prompt = sampled_rollouts(session, examples, step, teacher=True), config.samples_per_prompt
    else:
        rollouts = pack_pairs([session.prompt_ids(ex.messages) for ex in examples],
                              [completion_ids(session, ex.completion) for ex in examples],
                              session.tokenizer.pad_token_id).to(session.device)
        per_prompt = 1
    rollouts = with_rewards(session, rollouts, examples, per_prompt)
    rollouts.extras["offpolicy"] = {"rows_per_prompt": per_prompt, "teacher_sampled": teacher}
    return rollouts


def with_rewards(session: Session, rollouts: Rollouts, examples: list[Example], per_prompt: int) -> Rollouts:
    """The conversation each row answers (``extras["messages"]``) and each completion's task reward."""
    texts = completions_text(session.tokenizer, rollouts.completion_ids())
    repeated = [ex for ex in examples for _ in range(per_prompt)]
    rollouts.extras["messages"] = [ex.messages for ex in repeated]
    rollouts.extras["teacher"] = [ex.teacher or "" for ex in repeated]  # teachers=: who scores each row
    rollouts.rewards = torch.tensor([session.task.reward(t, ex) for t, ex in zip(texts, repeated, strict=True)],
                                    device=rollouts.tokens.device)
    return rollouts


def step_rollouts(session: Session, step: int) -> Rollouts:
    """This rank's share of the step: sampled by the student (the teacher for sft), with rewards; with
    ``lmbda < 1`` its off-policy rows after the student's (``extras["on_policy"]`` tells them apart)."""
    config = session.config
    if config.method == "midtrain":
        return midtrain_rollouts(session, step)
    if session.sft_pairs:
        examples, rollouts = dataset_rollouts(session, step)
        return with_rewards(session, rollouts, examples, 1)

    def mine(at: int) -> list[Example]:
        return distributed.shard(train_examples(session, at), session.dist)

    examples, off = split_on_policy(config, mine(step))
    rollouts = None
    if not examples:
        pass  # lmbda=0: every row off-policy
    elif session.rollout_service is not None:  # a rollout server draws them (vLLM, opd serve)
        examples, rollouts = session.rollout_service.rollouts(
            session, step, lambda at: split_on_policy(config, mine(at))[0],
            lambda chosen: [session.prompt_ids(ex.messages) for ex in chosen])
        rollouts = rollouts.to(session.device)
        rollouts.extras["engine"] = reweight(session, rollouts)
    else:  # the student samples; for sft the teacher
        rollouts = sampled_rollouts(session, examples, step, teacher=config.method == "sft")
    if rollouts is not None:
        rollouts = with_rewards(session, rollouts, examples, config.samples_per_prompt)
    if not off:
        return rollouts
    extra = off_policy_rollouts(session, off, step)
    if rollouts is None:
        extra.extras["on_policy"] = torch.zeros(extra.tokens.shape[0], dtype=torch.bool, device=session.device)
        return extra
    merged = concat_rollouts(rollouts, extra, session.tokenizer.pad_token_id)
    merged.extras["on_policy"] = torch.arange(merged.tokens.shape[0], device=session.device) < rollouts.tokens.shape[0]
    return merged


def update(session: Session, rollouts: Rollouts, signal: TeacherSignal | None, step_tokens: int,
           step: int) -> tuple[float, float]:
    """One optimizer step on this rank's rollouts; ``step_tokens`` counts the completion tokens of all
    ranks. Returns (this rank's loss, the gradient norm before clipping)."""
    config, module = session.config, session.loss_module
    session.student.train()
    session.optimizer.zero_grad(set_to_none=True)
    rows = rollouts.tokens.shape[0]
    micro = max(rows // config.grad_accum, 1)
    starts = list(range(0, rows, micro))
    offsets = completion_row_offsets(rollouts) if signal is not None else []
    per_rank_tokens = step_tokens / session.dist.world  # DDP and FSDP2 average gradients over ranks
    loss_total = 0.0
    for i, start in enumerate(starts):
        part = signal.rows(slice(offsets[start], offsets[start + micro])) if signal is not None else None
        last = i == len(starts) - 1  # DDP all-reduces once, after the last micro-batch
        with nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync():
            loss = module(rollouts.select(slice(start, start + micro)), per_rank_tokens, part)
            loss.backward()
        loss_total += loss.item()
    grad_norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(session.trainable, config.grad_clip)).item()
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
        raise OpdError(f"step {step}: non-finite loss ({loss_total}) or gradient norm ({grad_norm}); "
                       f"the run stopped before applying it. The last good checkpoint is "
                       f"{session.last_checkpoint or 'none (no checkpoint was written yet)'}. "
                       "Lower lr or raise warmup_steps, then --resume.")
    session.optimizer.step()
    session.scheduler.step()
    distributed.refresh_full_copy(session.student, session.full_model, session.config.parallel, session.dist)
    return loss_total, grad_norm


def training_step(session: Session, step: int) -> dict:
    config = session.config
    started = time.perf_counter()
    session.full_model.eval()
    rollouts = step_rollouts(session, step)
    sampled = time.perf_counter()
    pushed = session.rollout_service.lap() if session.rollout_service else None  # inside step_rollouts

    objective, signal, graded = session.objective, None, None
    if objective.distils:  # with kl=full one teacher forward serves the logged KL and the exact-KL loss
        needs = objective.teacher_needs
        graded = session.teacher_view.score(rollouts, rollouts.extras["messages"], hidden=needs == "distribution",
                                            topk=config.teacher_topk if needs == "topk" else 0)
        rollouts.teacher_logprobs = graded.logprobs
        signal = objective.signal(graded, session.teacher_view.head if needs == "distribution" else None)
    rollouts.advantages = session.objective.advantages(rollouts)
    scored = time.perf_counter()

    mask = rollouts.completion_mask
    completion_lengths = [int(n) for n in mask.sum(-1).tolist()]
    on_policy = rollouts.extras.get("on_policy", torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device))
    local = {  # what the step's record needs from every rank
        "completion_lengths": completion_lengths,
        "prompt_lengths": [int(n) - c for n, c in zip(rollouts.attention_mask.sum(-1).tolist(), completion_lengths,
                                                      strict=True)],
        "rewards": rollouts.rewards.tolist(),
        # GKD's off-policy rows (lmbda < 1) train on the divergence; the logged KL and reward are the student's
        "on_policy": on_policy.tolist(),
        "kl_sum": None if rollouts.teacher_logprobs is None or rollouts.sampler_logprobs is None
        else float(((rollouts.sampler_logprobs - rollouts.teacher_logprobs) * mask)[on_policy].sum()),
        "kl_tokens": float(mask[on_policy].sum()),
        "teachers": per_teacher_kl(rollouts, on_policy) if session.teacher_shapes else None,
        "names": rollouts.extras.get("teacher", []),
        # what the teacher read, when its rendering or tokenizer differs (its FLOPs), and the alignment's chunks
        "teacher_prompt_lengths": graded and graded.teacher_prompt_lengths,
        "teacher_completion_lengths": graded and graded.teacher_completion_lengths,
        "chunks": [graded.chunk_count, graded.single_token_chunks] if graded and graded.chunks is not None else None,
        "engine": rollouts.extras.get("engine"),
    }
    ranks = distributed.all_gather(local, session.dist)
    merged = {key: [v for r in ranks for v in r[key]]
              for key in ("completion_lengths", "prompt_lengths", "rewards", "on_policy")}
    student_rewards = [r for r, on in zip(merged["rewards"], merged["on_policy"], strict=True) if on]
    teacher_lengths = None
    if local["teacher_prompt_lengths"] is not None:
        teacher_lengths = tuple([v for r in ranks for v in r[key]] for key in ("teacher_prompt_lengths",
                                                                             "teacher_completion_lengths"))
    alignment = {}
    if local["chunks"] is not None:
        chunks, single = (sum(r["chunks"][i] for r in ranks) for i in (0, 1))
        alignment = {"aligned_chunks": chunks, "single_token_chunk_share": round(single / max(chunks, 1), 4),
                     "teacher_completion_tokens": sum(teacher_lengths[1])}
    engine = merge_stats([r["engine"] for r in ranks]) if local["engine"] is not None else {}
    if engine:  # before the update: samples from the wrong weights are not trained on
        check_gap(engine, config.engine_gap_limit, step, session.rollout_service.sampler.url)
    num_tokens = sum(merged["completion_lengths"])
    lr = session.scheduler.get_last_lr()[0]  # the rate this step's update uses
    loss, grad_norm = update(session, rollouts, signal, num_tokens, step)
    loss = sum(distributed.all_gather(loss, session.dist)) / session.dist.world
    trained = time.perf_counter()

    from_data = bool(session.sft_pairs or session.doc_chunks)  # given pairs or documents, not samples
    kl_tokens = sum(r["kl_tokens"] for r in ranks)
    teacher_kl = None if local["kl_sum"] is None or not kl_tokens else sum(r["kl_sum"] for r in ranks) / kl_tokens
    off_rows = len(merged["on_policy"]) - sum(merged["on_policy"])
    if off_rows:  # the off-policy part's compute: its training and scoring, and the teacher's sampling
        offpolicy = rollouts.extras["offpolicy"]
        flops = mixed_step_flops(session.student_shape, session.teacher_shape, merged["prompt_lengths"],
                                 merged["completion_lengths"], merged["on_policy"], config.samples_per_prompt,
                                 offpolicy["rows_per_prompt"], offpolicy["teacher_sampled"])
    else:
        flops = step_flops(session.student_shape, session.teacher_shape, merged["prompt_lengths"],
                           merged["completion_lengths"], "sft_data" if from_data else config.method,
                           group=1 if from_data else config.samples_per_prompt, teacher_lengths=teacher_lengths)
    if session.teacher_shapes:  # several teachers: each one's KL and compute
        flops.update(routed_step_flops(session, ranks, merged))
    return {
        "step": step + 1,
        "loss": loss,
        "teacher_kl": teacher_kl,
        "train_reward": sum(student_rewards or merged["rewards"]) / len(student_rewards or merged["rewards"]),
        **({"offpolicy_rows": off_rows} if off_rows else {}),
        "completion_tokens": num_tokens,
        "grad_norm": grad_norm,
        "lr": lr,
        **alignment,
        **engine,
        **flops,
        "sample_seconds": round(sampled - started - (pushed or 0.0), 4),
        "score_seconds": round(scored - sampled, 4),
        **({"sync_seconds": round(pushed, 4)} if pushed is not None else {}),
        "train_seconds": round(trained - scored, 4),
    }


def run_eval(session: Session) -> dict:
    """Held-out accuracy and the KL to the teacher; with several teachers, also each one's on its own prompts
    (``accuracy/NAME``, ...), the overall figures their weighted means (by prompts; the KL by tokens)."""
    config = session.config

    def run(examples: list[Example], view) -> EvalResult:
        return evaluate(session.full_model, session.tokenizer, session.task, examples,
                        max_new_tokens=config.max_new_tokens, teacher=view, seed=config.seed,
                        samples=config.eval_samples, sample_temperature=config.eval_temperature,
                        batch_size=config.eval_batch)

    if not session.teacher_shapes:
        result = run(session.eval_set, session.teacher_view)
        return {"accuracy": result.accuracy, "sampled_accuracy": result.sampled_accuracy,
                "eval_teacher_kl": result.teacher_kl}
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
          task=None, reward=None) -> dict:
    """Run (or resume) on-policy distillation; returns the summary written to summary.json. Under
    torchrun every rank trains; rank 0 alone evaluates, logs and writes (the others return {}). ``task``
    and ``reward``: a user's Python objects in place of ``config.task`` and ``config.reward``."""
    session = open_session(config, resume, task, reward)
    run_dir, records, main = session.run_dir, session.records, session.dist.main
    purge_from = None if resume is None else session.start_step + 1 if session.start_step else 0
    trackers = Trackers(config.report_to if main else "none", run_dir, config.to_dict(), purge_from,
                        config.tracker_project, config.run_name)
    try:
        if main:
            from opd.plan import session_plan, short_form

            print(f"opd: {short_form(session_plan(session))}", file=sys.stderr)
        if main and session.teacher_view is not None:
            probe = [ex.messages[-1]["content"] for ex in session.eval_set[:32]]
            print(f"opd: {session.teacher_view.describe(probe)}", file=sys.stderr)
        # every rank evaluates when the teacher's layers are sharded (its forwards are collectives); rank 0 logs
        evaluates = main or getattr(session.teacher, "sharded", False)
        if not records and evaluates:  # a fresh run: measure where the student and teacher start
            teacher = None  # a teacher behind a server only scores; it cannot be asked to answer
            if session.teacher_model is not None:  # in its own tokens and template
                teacher = evaluate(session.teacher_model, session.teacher_tokenizer, session.task, session.eval_set,
                                   max_new_tokens=config.max_new_tokens, seed=config.seed,
                                   samples=config.eval_samples, sample_temperature=config.eval_temperature,
                      batch_size=config.eval_batch)
            first = {"step": 0, **run_eval(session), "teacher_accuracy": teacher and teacher.accuracy,
                     "teacher_sampled_accuracy": teacher and teacher.sampled_accuracy, "elapsed": 0.0}
            if main:
                runs.append_metrics(run_dir, first)
                trackers.log(first)
            records.append(first)
        elapsed = records[-1]["elapsed"] if records else 0.0
        totals = {key: records[-1].get(f"{key}_total", 0.0) if records else 0.0
                  for key in ("student_flops", "teacher_flops")}
        bar = tqdm(range(session.start_step, config.steps), desc=desc, disable=not (progress and main),
                   initial=session.start_step, total=config.steps, dynamic_ncols=True)
        for step in bar:
            tick = time.perf_counter()
            record = training_step(session, step)
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
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=_last(records, "teacher_kl"),
                            reward=f"{record['train_reward']:.2f}", acc=_last(records, "accuracy"))
        bar.close()
        if session.rollout_service is not None:  # the server ends with the trained student
            session.rollout_service.ensure_weights(session.full_model, config.steps, session.dist)
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

