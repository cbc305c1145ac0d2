"""Log-probs of a rollout's tokens under a model, computed without a (B, T, V) logits tensor.

Only the positions that predict completion tokens go through the output head, in chunks of rows sized
so that one chunk's float32 logits stay under ``LOGITS_BUDGET`` elements; with gradients on, each
chunk is recomputed in the backward pass (activation checkpointing) instead of being kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from opd.losses import reverse_kl_from_logits, sampling_logprobs
from opd.models import cache_kwargs, recomputes_layers
from opd.rollouts import Rollouts

LOGITS_BUDGET = 1 << 25  # float32 elements per chunk of logits (128 MiB)


def completion_hidden(model: torch.nn.Module, rollouts: Rollouts,
                      share_prompts: bool = True) -> tuple[torch.Tensor, torch.nn.Module]:
    """Final hidden states at the positions that predict completion tokens: (N, H), and the head.

    Rows that share a prompt (``Rollouts.prompt_groups``: the samples of one prompt) run it once:
    the decoder reads the G distinct prompts, their keys and values are repeated to the B rows, and
    the completions attend to them as a cache. The same function of the inputs as one padded
    forward, so also the same gradients (a shared prompt position sums its rows' gradients), at
    G/B of the prompt's cost. ``share_prompts=False``: always one forward (a sharded teacher's ranks must
    run the same number of forwards whatever their rows); so too with the layers checkpointed, which
    drops the cache the shared prompt lives in."""
    decoder = model.get_decoder()
    groups = rollouts.prompt_groups() if share_prompts and not recomputes_layers(model) else None
    if groups is None:
        hidden = decoder(
            input_ids=rollouts.tokens,
            attention_mask=rollouts.attention_mask,
            position_ids=rollouts.position_ids,
            use_cache=False,  # a cache here would only copy every layer's keys and values
        ).last_hidden_state[:, :-1]
        predicts_completion = rollouts.completion_mask[:, 1:] > 0  # position t-1 predicts token t
        return hidden[predicts_completion], model.get_output_embeddings()
    first, group, width = groups
    positions = rollouts.position_ids
    cache = DynamicCache(config=model.config)
    prompt_hidden = decoder(
        input_ids=rollouts.tokens[first, :width],
        attention_mask=rollouts.attention_mask[first, :width],
        position_ids=positions[first, :width],
        **cache_kwargs(decoder, cache),
        use_cache=True,
    ).last_hidden_state
    # positions width-1 .. T-2 predict the tokens at width .. T-1
    hidden = prompt_hidden[group, -1:]
    if rollouts.tokens.shape[1] - 1 > width:
        cache.reorder_cache(group)  # row b reads its prompt's keys and values
        hidden = torch.cat([hidden, decoder(
            input_ids=rollouts.tokens[:, width:-1],
            attention_mask=rollouts.attention_mask[:, :-1],
            position_ids=positions[:, width:-1],
            **cache_kwargs(decoder, cache),
            use_cache=True,
        ).last_hidden_state], dim=1)
    return hidden[rollouts.completion_mask[:, width:] > 0], model.get_output_embeddings()


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over the first ``vocab_size`` ids (embedding rows past it are padding), in float32 (float64
    for a float64 model)."""
    logits = head(hidden)[:, :vocab_size]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full log-softmax over the first ``vocab_size`` ids."""
    return sampling_logprobs(head_logits(head, hidden, vocab_size))


def chunked_rows(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], vocab_size: int
) -> torch.Tensor:
    """Apply ``fn`` to row chunks of ``inputs`` and concatenate, checkpointing when it saves memory."""
    rows = inputs[0].shape[0]
    chunk = max(1, LOGITS_BUDGET // max(vocab_size, 1))
    if rows <= chunk:
        return fn(*inputs)
    outputs = []
    for start in range(0, rows, chunk):
        part = tuple(x[start : start + chunk] for x in inputs)
        if torch.is_grad_enabled():
            outputs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outputs.append(fn(*part))
    return torch.cat(outputs)


def scatter_completion(rollouts: Rollouts, values: torch.Tensor) -> torch.Tensor:
    """Place per-completion-token values (N,) back into a (B, T) tensor aligned with the tokens."""
    out = torch.zeros(rollouts.tokens.shape, dtype=values.dtype, device=values.device)
    predicts_completion = rollouts.completion_mask[:, 1:] > 0
    out[:, 1:] = out[:, 1:].masked_scatter(predicts_completion, values)
    return out


def completion_targets(rollouts: Rollouts) -> torch.Tensor:
    """(N,) the completion tokens, in the order of ``completion_hidden``'s rows."""
    return rollouts.tokens[:, 1:][rollouts.completion_mask[:, 1:] > 0]


def completion_row_offsets(rollouts: Rollouts) -> list[int]:
    """Where each batch row's completion positions start among ``completion_hidden``'s rows (B + 1)."""
    counts = (rollouts.completion_mask[:, 1:] > 0).sum(-1).tolist()
    return [0, *itertools.accumulate(counts)]


def gather_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """(N,) log-prob of ``targets`` from hidden states (N, H), chunked over rows; with ``temperature`` or
    ``top_p``, under the sampling distribution (``losses.sampling_logprobs``)."""

    def gather(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sampling_logprobs(head_logits(head, h, vocab_size), temperature, top_p).gather(-1, t[:, None])[:, 0]

    return chunked_rows(gather, (hidden, targets), vocab_size)


def token_logprobs(model: torch.nn.Module, rollouts: Rollouts, vocab_size: int, temperature: float = 1.0,
                   top_p: float = 1.0) -> torch.Tensor:
    """(B, T) log-prob of each completion token under ``model`` (tempered and top-p truncated when asked,
    as the sampler draws); 0 outside the completion."""
    hidden, head = completion_hidden(model, rollouts)
    targets = completion_targets(rollouts)
    return scatter_completion(rollouts, gather_logprobs(head, hidden, targets, vocab_size, temperature, top_p))


def full_divergence(
    student: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Module,
    rollouts: Rollouts,
    vocab_size: int,
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = reverse_kl_from_logits,
) -> torch.Tensor:
    """(B, T) a divergence between the student and the teacher over the whole vocabulary at every
    completion position (``divergence(student_logits, teacher_logprobs)``: the reverse KL by default, or
    one of ``divergences``), differentiable in the student; ``teacher_hidden`` comes from
    ``completion_hidden``."""
    hidden, head = completion_hidden(student, rollouts)

    def per_row(h: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_lp = head_logprobs(teacher_head, th, vocab_size).to(h.device)
        return divergence(head_logits(head, h, vocab_size), teacher_lp)

    return scatter_completion(rollouts, chunked_rows(per_row, (hidden, teacher_hidden), vocab_size))


def topk_divergence(student: torch.nn.Module, rollouts: Rollouts, vocab_size: int, teacher_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, kind: str = "reverse_kl", beta: float = 0.5) -> torch.Tensor:
    """(B, T) ``divergences.topk_divergence_from_logits`` at every completion position: the student's whole
    distribution against the teacher's top-k (ids and log-probs (N, k), ``completion_hidden``'s order) with
    one tail bucket each; differentiable in the student."""
    from opd.divergences import topk_divergence_from_logits

    hidden, head = completion_hidden(student, rollouts)

    def per_row(h: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> torch.Tensor:
        return topk_divergence_from_logits(head_logits(head, h, vocab_size), ids, lps.to(h.device), kind, beta)

    return scatter_completion(rollouts, chunked_rows(per_row, (hidden, teacher_ids, teacher_logprobs), vocab_size))
