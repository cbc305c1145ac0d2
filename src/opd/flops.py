"""Compute accounting: FLOPs of the forward passes, backward passes and sampling a run performs.

For a decoder-only transformer, one token through the body costs ``2 * N_body`` FLOPs (one multiply
and one add per weight of every linear layer, N_body = the parameters of all layers, embeddings
excluded), the output head ``2 * d_model * V`` FLOPs at each position where logits are computed, and
attention ``4 * d_attn`` FLOPs per (query, key) pair per layer (``Q K^T`` and ``A V``, with
``d_attn = n_heads * head_dim``) — Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
table 1, with the attention-values product counted too. Attention is counted dense over the padded
length (``L * L`` pairs for a forward over L tokens), as an eager or math kernel computes it; a
FlashAttention kernel that skips masked blocks does about half of that. A backward pass costs twice its
forward. Only real tokens are counted (padding is an implementation cost, not the method's), and the
head's recomputation under activation checkpointing is not. The samples of one prompt share it: every
pass reads it once (``grouped_forward_flops``). Evaluation is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch


@dataclass(frozen=True)
class ModelShape:
    body_params: int  # parameters of the transformer layers and final norm (no embeddings, no head)
    d_model: int
    d_attn: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        shared = head.data_ptr() == embed.data_ptr()
        body = total - embed.numel() - (0 if shared else head.numel())  # LoRA adapters count as body
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(body, config.hidden_size, config.num_attention_heads * head_dim, config.num_hidden_layers,
                   head.shape[0])


def forward_flops(shape: ModelShape, lengths: list[int], logit_positions: int) -> float:
    """One forward pass over sequences of the given real lengths, with logits at ``logit_positions``
    positions in all: ``sum_L (2 N_body L + 4 layers d_attn L^2) + 2 d_model V * logit_positions``."""
    body = sum(2 * shape.body_params * n + 4 * shape.layers * shape.d_attn * n * n for n in lengths)
    return float(body + 2 * shape.d_model * shape.vocab * logit_positions)


def grouped_forward_flops(shape: ModelShape, prompt_lengths: list[int], completion_lengths: list[int],
                          group: int, logit_positions: int) -> float:
    """One forward over rows whose runs of ``group`` consecutive rows share a prompt, computed as
    ``scoring.completion_hidden`` does: each prompt once (``2 N_body P + 4 layers d_attn P^2``), then
    each row's completion attending to its prompt and to itself (``2 N_body C + 4 layers d_attn C (P + C)``).
    With ``group`` 1 nothing is shared: ``forward_flops`` over the rows' full lengths."""
    if group <= 1:
        lengths = [p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
        return forward_flops(shape, lengths, logit_positions)
    attention = 4 * shape.layers * shape.d_attn
    body = 0
    for start in range(0, len(prompt_lengths), group):
        prompt = prompt_lengths[start]
        body += 2 * shape.body_params * prompt + attention * prompt * prompt
        for completion in completion_lengths[start : start + group]:
            body += 2 * shape.body_params * completion + attention * completion * (prompt + completion)
    return float(body + 2 * shape.d_model * shape.vocab * logit_positions)


def sampling_flops(shape: ModelShape, prompt_lengths: list[int], completion_lengths: list[int],
                   group: int = 1) -> float:
    """Sampling with a KV cache: one forward over each prompt (logits at its last position only; a
    prompt shared by ``group`` consecutive rows is read once), then one token at a time, token ``i``
    attending to the ``P + i`` keys before it and itself."""
    prompts = prompt_lengths[:: max(group, 1)]
    total = forward_flops(shape, prompts, logit_positions=len(prompts))
    per_token_body = 2 * shape.body_params + 2 * shape.d_model * shape.vocab
    for prompt, completion in zip(prompt_lengths, completion_lengths, strict=True):
        # the first sampled token comes from the prompt pass; each later one costs one cached step
        for step in range(1, completion):
            total += per_token_body + 4 * shape.layers * shape.d_attn * (prompt + step)
    return float(total)


def training_flops(shape: ModelShape, lengths: list[int], logit_positions: int) -> float:
    """Forward plus backward (twice the forward) of the learner."""
    return 3 * forward_flops(shape, lengths, logit_positions)


class StepKind(StrEnum):
    """What a training step computes, for its FLOPs (``objective.step_kind`` says which a run's steps are)."""

    DISTIL = "distil"  # opd, opd+rl: the student samples, the teacher scores every sequence, the student trains
    RL = "rl"  # the student samples and trains; no teacher
    TEACHER_SAMPLES = "teacher_samples"  # sft: the teacher samples, the student trains
    GIVEN = "given"  # sft_data, midtrain: the student trains on given tokens (producing them is not this run's)


def step_flops(student: ModelShape, teacher: ModelShape | None, prompt_lengths: list[int],
               completion_lengths: list[int], kind: StepKind = StepKind.DISTIL, group: int = 1,
               teacher_lengths: tuple[list[int], list[int]] | None = None, trained_tokens: int | None = None) -> dict:
    """One training step of ``kind`` (``StepKind``: who samples, who scores; the teacher scores a sequence
    once, logits at completion positions). Runs of ``group`` consecutive rows are the samples of one
    prompt, which every pass reads once. A row's completion is every token after its prompt: the tokens
    sampled, and the environment's among them (a conversation's turns, ``sample_noise``'s replacements),
    each its own row's, read by every pass and counted in sampling as a sampled token; ``trained_tokens``
    (default: all of them) are the positions with logits. ``teacher_lengths``: the (prompt, completion)
    lengths the teacher read, when its rendering or tokenizer differs."""
    kind = StepKind(kind)
    completion_tokens = sum(completion_lengths) if trained_tokens is None else trained_tokens
    student_flops = 3 * grouped_forward_flops(student, prompt_lengths, completion_lengths, group, completion_tokens)
    if kind == StepKind.GIVEN:
        return {"student_flops": student_flops, "teacher_flops": 0.0}
    if kind == StepKind.TEACHER_SAMPLES:
        teacher_flops = None if teacher is None else sampling_flops(teacher, prompt_lengths, completion_lengths,
                                                                    group)
        return {"student_flops": student_flops, "teacher_flops": teacher_flops}
    student_flops += sampling_flops(student, prompt_lengths, completion_lengths, group)
    if kind == StepKind.RL:
        return {"student_flops": student_flops, "teacher_flops": 0.0}
    prompts, completions = teacher_lengths or (prompt_lengths, completion_lengths)
    teacher_flops = None if teacher is None else grouped_forward_flops(teacher, prompts, completions, group,
                                                                       sum(completions))
    return {"student_flops": student_flops, "teacher_flops": teacher_flops}


def mixed_step_flops(student: ModelShape, teacher: ModelShape | None, prompt_lengths: list[int],
                     completion_lengths: list[int], on_policy: list[bool], group: int, off_group: int,
                     teacher_sampled: bool, trained_lengths: list[int] | None = None) -> dict:
    """A step with GKD's off-policy rows (``lmbda < 1``): ``step_flops`` of the on-policy rows (the student
    samples, the teacher scores, the student trains), plus for the off-policy rows the student's training,
    the teacher's scoring, and the teacher's sampling when it wrote them (``off_group`` rows per prompt).
    ``trained_lengths``: each row's trained tokens, where fewer than its completion's (``step_flops``)."""
    trained_lengths = completion_lengths if trained_lengths is None else trained_lengths

    def part(flag: bool) -> tuple[list[int], list[int], int]:
        rows = [i for i, on in enumerate(on_policy) if on == flag]
        return ([prompt_lengths[i] for i in rows], [completion_lengths[i] for i in rows],
                sum(trained_lengths[i] for i in rows))

    (on_prompts, on_completions, on_trained), (off_prompts, off_completions, tokens) = part(True), part(False)
    total = {"student_flops": 0.0, "teacher_flops": 0.0 if teacher is not None else None}
    if on_prompts:
        total = step_flops(student, teacher, on_prompts, on_completions, StepKind.DISTIL, group,
                           trained_tokens=on_trained)
    total["student_flops"] += 3 * grouped_forward_flops(student, off_prompts, off_completions, off_group, tokens)
    if teacher is not None:
        total["teacher_flops"] += grouped_forward_flops(teacher, off_prompts, off_completions, off_group, tokens)
        if teacher_sampled:
            total["teacher_flops"] += sampling_flops(teacher, off_prompts, off_completions, off_group)
    return total
