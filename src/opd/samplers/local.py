"""Batched sampling with an explicit KV cache, recording the sampler's log-prob of every token.

The sampler knows nothing about text: it takes prompt token ids and returns ``Rollouts``.

What the recorded log-probs mean: ``sampler_logprobs[t] = log q(token_t)`` where ``q`` is the
distribution the token was actually drawn from, i.e. ``softmax(logits / temperature)`` restricted to
the top-p nucleus and renormalised. At temperature 1 and top_p 1 that is exactly the student's
log-prob. At other settings it is the behaviour policy's log-prob; the learner's log-probs in the loss
are taken under the same transform (``losses.sampling_logprobs``), so the policy being trained is the
one that samples, the importance ratio is exactly 1 at the first micro-batch of a step, and the
reverse-KL advantage measures that policy against the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from opd.errors import NonFiniteError, OpdError
from opd.losses import sampling_logprobs
from opd.models import cache_kwargs
from opd.rollouts import Rollouts, concat_rollouts


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV-cache layer that writes each step into one buffer sized for the whole
    generation, where ``DynamicLayer`` concatenates: the same keys and values (views of the buffer's
    filled prefix), without copying the whole cache once per layer per token (O(T^2) traffic)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, key_dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, key_dim))
        self.value_buffer = value_states.new_empty((batch, value_states.shape[1], self.capacity,
                                                    value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row b becomes old row ``beam_idx[b]`` (rows may repeat: one prompt's cache for its samples)."""
        if not self.is_initialized:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((len(beam_idx), *old.shape[1:]))
            new[:, :, : self.length].copy_(old[:, :, : self.length].index_select(0, beam_idx.to(old.device)))
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def generation_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """The model's own cache layout (sliding-window layers stay as they are) with every plain
    full-attention layer preallocated for ``capacity`` positions."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), drawn with probability ``probs[b, i] / probs[b].sum()``.

    Inverse-CDF sampling (e.g. Devroye, *Non-Uniform Random Variate Generation*, 1986, sec. 2.2):
    with ``c`` the running sum of the row and ``u ~ U[0, 1)``, return the first ``i`` with
    ``c_i > u * c_V``. One uniform per row instead of ``torch.multinomial``'s V exponentials. The sum
    runs in float64; ``u * c_V`` is held strictly below ``c_V``, so a zero-probability entry (whose
    ``c_i`` equals ``c_{i-1}``) is never returned. A row whose mass is not a positive finite number (NaN or
    inf probabilities) raises ``NonFiniteError``: there is nothing to draw from.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # NaN or inf logits: no index is drawn past V
        raise NonFiniteError("sampling distribution", "the sampling distribution is not finite (the model's logits "
                             "hold NaN or inf, e.g. its weights diverged): nothing can be drawn from it")
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True)[:, 0]


@dataclass(frozen=True)
class Noise:
    """The environment's corruption of sampled tokens (``sample_noise=q``): each token the model draws that is
    not a stop token is, with probability ``rate``, replaced by one of ``tokens`` drawn uniformly (it may be the
    same token). A replaced token is the environment's, not the model's choice: its ``completion_mask`` is 0
    (no loss on it, no log-prob recorded), and the model reads it as context from there on. The draws come
    from their own stream, ``seed``, so a run's sampling stream is the same with and without noise.
    Injected errors of this kind are DART's (Laskey et al. 2017, arXiv 1703.09327): they put a policy in
    states off its own path, where it must recover."""

    rate: float
    tokens: tuple[int, ...]
    seed: int

    def shifted(self, by: int) -> Noise:
        """The same noise on another stream (a later chunk of ``sample_in_batches``)."""
        return Noise(self.rate, self.tokens, self.seed + 7919 * by)


NOISE_STREAM = 1_000_033  # a step's noise draws: its sampling seed plus this (their own stream)


def task_noise(rate: float, task, tokenizer, vocab_size: int) -> Noise | None:
    """``sample_noise=rate``'s ``Noise`` for ``task``: its ``noise_tokens`` (a string, one token a character: a
    regime task's states) when it has them, else every id below ``vocab_size`` that is no special token; None
    at rate 0. The seed is a placeholder each use replaces (``replace(noise, seed=...)``)."""
    if not rate:
        return None
    chars = getattr(task, "noise_tokens", None)
    if chars:
        ids = [tokenizer.encode(c, add_special_tokens=False) for c in chars]
        if any(len(i) != 1 for i in ids):
            raise OpdError(f"sample_noise: the task's noise tokens {chars!r} are not one token each in the student's "
                           "tokenizer")
        tokens = tuple(i[0] for i in ids)
    else:
        specials = set(tokenizer.all_special_ids)
        tokens = tuple(i for i in range(vocab_size) if i not in specials)
    return Noise(rate, tokens, 0)


def corrupt(token: torch.Tensor, noise: Noise, stops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Which of ``token`` (B,) the environment replaces (a bool (B,) tensor) and what with (B,): a stop token
    never, another with probability ``noise.rate``, by ``noise.tokens[j]``, j uniform."""
    hit = torch.rand(token.shape, generator=generator, device=token.device) < noise.rate
    hit &= ~torch.isin(token, stops)
    choices = torch.tensor(noise.tokens, dtype=torch.long, device=token.device)
    swap = choices[torch.randint(len(choices), token.shape, generator=generator, device=token.device)]
    return hit, torch.where(hit, swap, token)


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


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | list[int],
    pad_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
) -> Rollouts:
    """Sample ``samples_per_prompt`` completions for each prompt; temperature 0 means greedy.

    Only the first ``vocab_size`` ids (``len(tokenizer)``) are candidates: an embedding padded past the
    tokenizer (Qwen's 151,936 rows for 151,669 tokens) has untrained rows that no text maps to, and the
    recorded log-probs are over the same support as the learner's (``scoring.head_logits``).

    Rows are grouped by prompt: rows ``i*G .. i*G+G-1`` answer prompt ``i``. A row stops after its
    first EOS (``eos_id``: one id, or a list of stop ids), which is part of the completion (and so is
    trained on); later columns are padding. With ``noise``, the environment replaces some drawn tokens
    (``Noise``): masked out of ``completion_mask``, attended as context.
    """
    device = next(model.parameters()).device
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id)
    prompt_tokens, prompt_mask = prompt_tokens.to(device), prompt_mask.to(device)
    prompt_width = prompt_tokens.shape[1]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = generation_cache(model, prompt_width + max_new_tokens - 1)  # the last token is never read back
    with_cache = cache_kwargs(model, cache)  # resolved once, not per decoded token
    # each prompt is read once, then its cache is repeated for its samples
    logits = model(input_ids=prompt_tokens, attention_mask=prompt_mask, position_ids=positions,
                   use_cache=True, **with_cache,
                   logits_to_keep=1,  # never a (B, P, V) logits tensor for the prompt
                   ).logits[:, -1, :vocab_size]
    rows = torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt)
    cache.reorder_cache(rows)
    prompt_tokens, prompt_mask, positions = prompt_tokens[rows], prompt_mask[rows], positions[rows]
    logits = logits[rows]
    batch = len(rows)

    # the decoded rows: ``active`` are their rows of the batch; a finished row is dropped (with its
    # cache) once a quarter of them are finished, and until then decodes padding that nothing reads
    active = torch.arange(batch, device=device)
    live = torch.ones(batch, dtype=torch.bool, device=device)
    attention = prompt_mask
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_lp = torch.zeros((batch, max_new_tokens), device=device)
    completion_mask = torch.zeros((batch, max_new_tokens), device=device)
    written = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)  # attended: the noise's too
    length = 0
    # one new token attends to every unpadded position: with SDPA and only full-attention layers the
    # (B, 1, 1, L) mask is the 2D one, given as is instead of rebuilt by the model at every step
    noisy = noise is not None and noise.rate > 0
    noise_draws = torch.Generator(device).manual_seed(noise.seed) if noisy else None
    direct_mask = (getattr(model.config, "_attn_implementation", None) == "sdpa"
                   and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers))
    for step in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(-1)
            token_lp = torch.log_softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0]
        else:
            logprobs = sampling_logprobs(logits, temperature, top_p)
            token = draw(logprobs.exp(), generator)
            token_lp = logprobs.gather(-1, token[:, None])[:, 0]
        rows_now = active[live]
        if noisy:  # the environment's tokens: context, not the model's choice
            replaced, token = corrupt(token, noise, stops, noise_draws)
            token_lp = torch.where(replaced, torch.zeros_like(token_lp), token_lp)
            completion_mask[rows_now, step] = (~replaced[live]).float()
        else:
            completion_mask[rows_now, step] = 1.0
        completion[rows_now, step] = token[live]
        written[rows_now, step] = 1
        completion_lp[rows_now, step] = token_lp[live].float()
        length = step + 1
        live = live & ~torch.isin(token, stops)
        kept = int(live.sum())
        if kept == 0 or length == max_new_tokens:
            break
        if kept <= 0.75 * len(live):
            keep = live.nonzero()[:, 0]
            cache.reorder_cache(keep)
            active, live, attention, positions, token = (active[keep], live[keep], attention[keep],
                                                         positions[keep], token[keep])
        token = torch.where(live, token, torch.full_like(token, pad_id))
        attention = torch.cat([attention, live.long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        mask = attention.bool()[:, None, None, :] if direct_mask else attention
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **with_cache).logits[:, -1, :vocab_size]

    completion, completion_lp = completion[:, :length], completion_lp[:, :length]
    completion_mask, written = completion_mask[:, :length], written[:, :length]
    zeros = torch.zeros((batch, prompt_width), device=device)
    return Rollouts(
        tokens=torch.cat([prompt_tokens, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, written], dim=1),
        completion_mask=torch.cat([zeros, completion_mask], dim=1),
        prompt_index=rows,
        sampler_logprobs=torch.cat([zeros, completion_lp], dim=1),
    )


def sample_in_batches(model: torch.nn.Module, prompts: list[list[int]], *, rows: int, samples_per_prompt: int,
                      pad_id: int, noise: Noise | None = None, **kwargs) -> Rollouts:
    """``sample`` over ``prompts`` a few at a time, at most ``rows`` rows (prompts x samples) per call, so the
    KV cache is sized for those rows (``rows=0``: all at once, one call). The rows, their order and groups are
    one call's; the draws differ from one call's (the generator is read in another order)."""
    per_call = len(prompts) if rows <= 0 else max(1, rows // samples_per_prompt)
    out = None
    for start in range(0, len(prompts), per_call):
        part = sample(model, prompts[start : start + per_call], samples_per_prompt=samples_per_prompt,
                      pad_id=pad_id, noise=noise.shifted(start) if noise and start else noise, **kwargs)
        out = part if out is None else concat_rollouts(out, part, pad_id)
    return out
