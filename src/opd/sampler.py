"""Batched sampling with an explicit KV cache, recording the sampler's log-prob of every token.

The sampler knows nothing about text: it takes prompt token ids and returns ``Rollouts``.

What the recorded log-probs mean: ``sampler_logprobs[t] = log q(token_t)`` where ``q`` is the
distribution the token was actually drawn from, i.e. ``softmax(logits / temperature)`` restricted to
the top-p nucleus and renormalised. At temperature 1 and top_p 1 that is exactly the student's
log-prob. At other settings it is the behaviour policy's log-prob, which is what the importance ratio
``exp(lp_learner - lp_sampler)`` needs to correct from the sampler back to the student; the
reverse-KL advantage then measures the sampler's distribution against the teacher.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from opd.rollouts import Rollouts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) token ids and attention mask with every prompt ending at column P - 1."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return tokens, mask


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution tokens are drawn from: tempered, top-p truncated, renormalised."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """Sample ``samples_per_prompt`` completions for each prompt; temperature 0 means greedy.

    Rows are grouped by prompt: rows ``i*G .. i*G+G-1`` answer prompt ``i``. A row stops after its
    first EOS, which is part of the completion (and so is trained on); later columns are padding.
    """
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    prompt_tokens, prompt_mask = left_pad(repeated, pad_id)
    batch, prompt_width = prompt_tokens.shape
    prompt_tokens, prompt_mask = prompt_tokens.to(device), prompt_mask.to(device)

    cache = DynamicCache()
    attention = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    step_input = prompt_tokens
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens, new_logprobs, new_mask = [], [], []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_input,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # never a (B, P, V) logits tensor for the prompt
        )
        logits = out.logits[:, -1, :]
        if temperature == 0:
            token = logits.argmax(-1)
            token_lp = torch.log_softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0]
        else:
            logprobs = sampling_logprobs(logits, temperature, top_p)
            token = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
            token_lp = logprobs.gather(-1, token[:, None])[:, 0]
        alive = ~finished
        new_tokens.append(torch.where(alive, token, torch.full_like(token, pad_id)))
        new_logprobs.append(torch.where(alive, token_lp, torch.zeros_like(token_lp)))
        new_mask.append(alive.float())
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
        step_input = new_tokens[-1][:, None]
        attention = torch.cat([attention, alive.long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1

    completion = torch.stack(new_tokens, dim=1)
    completion_lp = torch.stack(new_logprobs, dim=1)
    completion_mask = torch.stack(new_mask, dim=1)
    zeros = torch.zeros((batch, prompt_width), device=device)
    return Rollouts(
        tokens=torch.cat([prompt_tokens, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
        completion_mask=torch.cat([zeros, completion_mask], dim=1),
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
        sampler_logprobs=torch.cat([zeros, completion_lp], dim=1),
    )
