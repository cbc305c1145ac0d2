import pytest
import torch

from opd.losses import sampling_logprobs
from opd.models import chat_prompt_ids
from opd.samplers.local import draw, sample
from opd.scoring import token_logprobs


def prompts_of(tokenizer, texts):
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def test_recorded_logprobs_equal_a_full_forward_pass(tokenizer, tiny_model):
    prompts = prompts_of(tokenizer, ["Compute 1+2", "Compute 3*(4+5)-2", "a much longer prompt here ok"])
    rollouts = sample(tiny_model, prompts, samples_per_prompt=3, max_new_tokens=12,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recomputed = token_logprobs(tiny_model, rollouts, len(tokenizer))
    assert rollouts.tokens.shape[0] == 9
    assert (recomputed - rollouts.sampler_logprobs).abs().max() <= 1e-5


def test_greedy_is_deterministic_and_picks_the_argmax(tokenizer, tiny_model):
    prompts = prompts_of(tokenizer, ["Compute 1+2"])
    first = sample(tiny_model, prompts, max_new_tokens=6, temperature=0.0,
                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    second = sample(tiny_model, prompts, max_new_tokens=6, temperature=0.0,
                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    assert torch.equal(first.tokens, second.tokens)
    with torch.no_grad():
        logits = tiny_model(first.tokens[:, :-1]).logits[0, -1]
    assert first.tokens[0, -1] == logits.argmax()


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    out = sampling_logprobs(probs.log(), temperature=1.0, top_p=0.8).exp()
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    hotter = sampling_logprobs(probs.log(), temperature=2.0, top_p=1.0).exp()
    assert torch.allclose(hotter, probs.sqrt() / probs.sqrt().sum())


def test_sampling_logprobs_work_row_by_row_on_any_leading_shape_in_float32():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 9, generator=gen) * 2  # (B, T, V)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.6), (1.5, 0.9)):
        out = sampling_logprobs(logits, temperature, top_p)
        for b in range(2):
            for t in range(3):
                assert torch.equal(out[b, t], sampling_logprobs(logits[b, t][None], temperature, top_p)[0])
    assert torch.equal(sampling_logprobs(logits), torch.log_softmax(logits, -1))  # defaults: the plain softmax
    low = sampling_logprobs(logits.bfloat16(), 0.7, 0.6)
    assert low.dtype == torch.float32  # bf16 logits are promoted before the softmax


def test_draw_matches_the_distribution_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    draws = draw(probs.repeat(20_000, 1), torch.Generator().manual_seed(0)).view(20_000, 2)
    counts = torch.stack([torch.bincount(draws[:, r], minlength=6) for r in range(2)]).double()
    assert (counts[probs == 0] == 0).all()
    # 20,000 draws per row: each frequency's standard error is at most 0.0036
    assert (counts / 20_000 - probs.double()).abs().max() < 0.015
    # only the ratios matter: a scaled row draws the same tokens from the same uniforms
    assert torch.equal(draw(probs * 4, torch.Generator().manual_seed(3)),
                       draw(probs, torch.Generator().manual_seed(3)))


def nucleus_logprob(logits: torch.Tensor, token: int, temperature: float, top_p: float) -> float:
    """log q(token) written out in float64, one position at a time: softmax(z / T), keep the most likely
    tokens until their mass reaches top_p, renormalise."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    assert token in kept, "a token outside the nucleus was sampled"
    return float(torch.tensor(probs[token] / mass).log())


def test_recorded_logprobs_are_the_tempered_nucleus_distribution(tokenizer, tiny_model):
    prompts = prompts_of(tokenizer, ["Compute 1+2", "Compute 3*(4+5)-2"])
    temperature, top_p = 0.6, 0.7
    rollouts = sample(tiny_model, prompts, samples_per_prompt=2, max_new_tokens=6, temperature=temperature,
                      top_p=top_p, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_model(input_ids=rollouts.tokens, attention_mask=rollouts.attention_mask,
                            position_ids=rollouts.position_ids).logits
    checked = 0
    for b, t in (rollouts.completion_mask > 0).nonzero().tolist():
        expected = nucleus_logprob(logits[b, t - 1], int(rollouts.tokens[b, t]), temperature, top_p)
        assert abs(float(rollouts.sampler_logprobs[b, t]) - expected) < 1e-4
        checked += 1
    assert checked == 24


def test_a_padded_embedding_never_samples_past_the_tokenizer(tokenizer):
    """Qwen-style padding: embedding rows past len(tokenizer) that no text maps to. Here they are made the
    most likely tokens; the sampler must still draw (and normalise over) the tokenizer's ids only."""
    from opd.zoo import make_model

    vocab = len(tokenizer)
    model = make_model(tokenizer, layers=1, width=16, seed=3)
    model.resize_token_embeddings(vocab + 8)
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = model.get_output_embeddings().weight[:vocab].sum(0) * 50
    model.eval()
    prompts = prompts_of(tokenizer, ["Compute 1+2"])
    for temperature in (0.0, 1.0):
        rollouts = sample(model, prompts, samples_per_prompt=4, max_new_tokens=8, temperature=temperature,
                          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, vocab_size=vocab,
                          generator=torch.Generator().manual_seed(0))
        assert int(rollouts.tokens.max()) < vocab
        with torch.no_grad():
            recomputed = token_logprobs(model, rollouts, vocab)
        assert (recomputed - rollouts.sampler_logprobs).abs().max() <= 1e-5


def test_the_cache_is_preallocated_for_exactly_what_sampling_reads(tokenizer, tiny_model):
    from opd.samplers.local import PreallocatedLayer, generation_cache

    cache = generation_cache(tiny_model, 10)
    assert cache.layers and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    keys = torch.zeros(2, 1, 6, 4)
    cache.layers[0].update(keys, keys)
    cache.layers[0].update(keys[:, :, :4], keys[:, :, :4])  # 10 positions: full, not over
    with pytest.raises(RuntimeError, match="KV cache of 10 positions is full"):
        cache.layers[0].update(keys[:, :, :1], keys[:, :, :1])
    # a full-length sample fits the cache sized for it, with no position to spare
    prompts = prompts_of(tokenizer, ["Compute 1+2"])
    rollouts = sample(tiny_model, prompts, max_new_tokens=7, eos_id=-1, pad_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(0))
    assert rollouts.completion_mask.sum() == 7
