"""A step's record: what each rank saw of its rows (``rank_figures``), gathered from every rank, and the line
``metrics.jsonl`` holds for the step (``step_record``): the loss, the KL to the teacher and the reward of the
student's own rows, the lengths, the alignment's chunks, a rollout server's mismatch, and the FLOPs."""

from __future__ import annotations

import torch

from opd.config import TrainConfig
from opd.flops import ModelShape, StepKind, mixed_step_flops, step_flops
from opd.rollouts import Rollouts
from opd.samplers.service import merge_stats
from opd.teachers.routed import per_teacher_kl, routed_step_flops


def rank_figures(rollouts: Rollouts, graded, several: bool) -> dict:
    """What the step's record needs from this rank (``graded``: the teacher's ``Scored`` answer, or None)."""
    mask = rollouts.completion_mask
    completion_lengths = [int(n) for n in mask.sum(-1).tolist()]
    # every token after a row's prompt, the environment's among them (a conversation's turns, sample_noise's
    # replacements): its own row's, for the FLOPs; the trained ones are completion_lengths
    written_lengths = [len(ids) for ids in rollouts.written_ids()]
    on_policy = rollouts.on_policy if rollouts.on_policy is not None else \
        torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return {
        "completion_lengths": completion_lengths,
        "written_lengths": written_lengths,
        "prompt_lengths": [int(n) - w for n, w in zip(rollouts.attention_mask.sum(-1).tolist(), written_lengths,
                                                      strict=True)],
        "rewards": rollouts.rewards.tolist(),
        # GKD's off-policy rows (lmbda < 1) train on the divergence; the logged KL and reward are the student's
        "on_policy": on_policy.tolist(),
        "kl_sum": None if rollouts.teacher_logprobs is None or rollouts.sampler_logprobs is None
        else float(((rollouts.sampler_logprobs - rollouts.teacher_logprobs) * mask)[on_policy].sum()),
        "kl_tokens": float(mask[on_policy].sum()),
        "teachers": per_teacher_kl(rollouts, on_policy) if several else None,
        "names": rollouts.teacher_names or [],
        # what the teacher read, when its rendering or tokenizer differs (its FLOPs), and the alignment's chunks
        "teacher_prompt_lengths": graded and graded.teacher_prompt_lengths,
        "teacher_completion_lengths": graded and graded.teacher_completion_lengths,
        "chunks": [graded.chunk_count, graded.single_token_chunks] if graded and graded.chunks is not None else None,
        "engine": rollouts.engine,
        "offpolicy": rollouts.offpolicy,
        "conversation": rollouts.conversation,  # multi-turn rollouts: turns, tool calls
    }


def conversation_figures(ranks: list[dict]) -> dict:
    """Multi-turn rows: turns per conversation, the share cut short (max_turns, the token budget), tool calls,
    the share of them that were valid (parsed, a known tool, ran), the share of conversations that used one."""
    parts = [r["conversation"] for r in ranks if r.get("conversation")]
    if not parts:
        return {}
    total = {key: sum(p[key] for p in parts) for key in parts[0]}
    conversations = max(total["conversations"], 1)
    return {"turns_per_conversation": round(total["turns"] / conversations, 4),
            "cut_share": round(total["cut"] / conversations, 4), "tool_calls": total["tool_calls"],
            "valid_tool_call_share": round(total["valid_tool_calls"] / total["tool_calls"], 4)
            if total["tool_calls"] else None,
            "tool_use_share": round(total["tool_users"] / conversations, 4)}


def joined(ranks: list[dict], key: str) -> list:
    """Every rank's list under ``key``, in rank order (the step's rows)."""
    return [v for r in ranks for v in r[key]]


def engine_stats(ranks: list[dict]) -> dict:
    """A rollout server's mismatch statistics over every rank's rows ({} without a server)."""
    return merge_stats([r["engine"] for r in ranks]) if ranks[0]["engine"] is not None else {}


def step_record(ranks: list[dict], config: TrainConfig, student_shape: ModelShape, teacher_view, kind: StepKind,
                step: int, loss: float, grad_norm: float, lr: float, engine: dict, seconds: dict,
                micro: dict | None = None) -> dict:
    """The step's line of metrics.jsonl from every rank's ``rank_figures``."""
    completion_lengths, prompt_lengths = joined(ranks, "completion_lengths"), joined(ranks, "prompt_lengths")
    written_lengths = joined(ranks, "written_lengths")
    rewards, on_policy = joined(ranks, "rewards"), joined(ranks, "on_policy")
    student_rewards = [r for r, on in zip(rewards, on_policy, strict=True) if on]
    teacher_lengths = None
    if ranks[0]["teacher_prompt_lengths"] is not None:
        teacher_lengths = (joined(ranks, "teacher_prompt_lengths"), joined(ranks, "teacher_completion_lengths"))
    alignment = {}
    if ranks[0]["chunks"] is not None:
        chunks, single = (sum(r["chunks"][i] for r in ranks) for i in (0, 1))
        alignment = {"aligned_chunks": chunks, "single_token_chunk_share": round(single / max(chunks, 1), 4),
                     "teacher_completion_tokens": sum(teacher_lengths[1])}
    kl_tokens = sum(r["kl_tokens"] for r in ranks)
    teacher_kl = None if ranks[0]["kl_sum"] is None or not kl_tokens else sum(r["kl_sum"] for r in ranks) / kl_tokens
    teacher_shape = None if teacher_view is None else teacher_view.shape
    off_rows = len(on_policy) - sum(on_policy)
    if off_rows:  # the off-policy part's compute: its training and scoring, and the teacher's sampling
        offpolicy = ranks[0]["offpolicy"]
        flops = mixed_step_flops(student_shape, teacher_shape, prompt_lengths, written_lengths, on_policy,
                                 config.samples_per_prompt, offpolicy.rows_per_prompt, offpolicy.teacher_sampled,
                                 trained_lengths=completion_lengths)
    else:
        flops = step_flops(student_shape, teacher_shape, prompt_lengths, written_lengths,
                           kind, group=1 if kind == StepKind.GIVEN else config.samples_per_prompt,
                           teacher_lengths=teacher_lengths, trained_tokens=sum(completion_lengths))
    if teacher_view is not None and teacher_view.several:  # each teacher's KL and compute
        merged = {"prompt_lengths": prompt_lengths, "completion_lengths": written_lengths,
                  "trained_lengths": completion_lengths}
        flops.update(routed_step_flops(teacher_view, student_shape, config.samples_per_prompt, ranks, merged))
    pushed = seconds.get("sync")
    return {
        "step": step + 1,
        "loss": loss,
        "teacher_kl": teacher_kl,
        "train_reward": sum(student_rewards or rewards) / len(student_rewards or rewards),
        **({"offpolicy_rows": off_rows} if off_rows else {}),
        "completion_tokens": sum(completion_lengths),
        "grad_norm": grad_norm,
        "lr": lr,
        **(micro or {}),  # max_tokens_per_micro_batch: how many, and their padding share
        **alignment,
        **conversation_figures(ranks),
        **engine,
        **flops,
        "sample_seconds": round(seconds["sample"] - (pushed or 0.0), 4),
        "score_seconds": round(seconds["score"], 4),
        **({"sync_seconds": round(pushed, 4)} if pushed is not None else {}),
        "train_seconds": round(seconds["train"], 4),
    }
