import pytest
import torch

from opd import scoring
from opd.losses import exact_reverse_kl
from opd.models import chat_prompt_ids
from opd.rollouts import pack_pairs
from opd.scoring import completion_hidden, full_divergence, token_logprobs
from opd.teachers.local import LocalTeacher
from opd.zoo import make_model


def batch(tokenizer):
    texts = ["Compute 1+2", "Compute 3*(4+5)-2 please, with many words", "x"]
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    completions = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id]
                   for c in ["= 3\nAnswer: 3", "= 3*9-2\n= 25\nAnswer: 25", "hello"]]
    return prompts, completions


def test_padded_batch_scores_like_each_sequence_alone(tokenizer):
    teacher = LocalTeacher(make_model(tokenizer, layers=2, width=32, seed=5), len(tokenizer))
    prompts, completions = batch(tokenizer)
    packed = pack_pairs(prompts, completions, tokenizer.pad_token_id)
    together = teacher.score(packed)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        mask = packed.completion_mask[row] > 0  # the columns of this row's completion tokens
        assert together[row][~mask].abs().max() == 0
        single = pack_pairs([prompt], [completion], tokenizer.pad_token_id)
        alone = teacher.score(single)[0][single.completion_mask[0] > 0]
        assert torch.allclose(together[row][mask], alone, atol=1e-5)
        # and against a plain forward pass with no padding at all: position t-1 predicts token t
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            plain = teacher.model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(together[row][mask], plain[len(prompt) - 1:], atol=1e-5)


def test_chunked_logprobs_and_gradients_match_unchunked(tokenizer, monkeypatch):
    model = make_model(tokenizer, layers=1, width=16, seed=6)
    rollouts = pack_pairs(*batch(tokenizer), tokenizer.pad_token_id)

    def run():
        model.zero_grad()
        logprobs = token_logprobs(model, rollouts, len(tokenizer))
        logprobs.sum().backward()
        return logprobs.detach(), model.get_output_embeddings().weight.grad.clone()

    whole, whole_grad = run()
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 3 * len(tokenizer))  # 3 rows per chunk
    chunked, chunked_grad = run()
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(whole_grad, chunked_grad, atol=1e-6)


def test_full_reverse_kl_matches_direct_computation(tokenizer, monkeypatch):
    student = make_model(tokenizer, layers=1, width=16, seed=7)
    teacher = make_model(tokenizer, layers=1, width=32, seed=8).eval()
    rollouts = pack_pairs(*batch(tokenizer), tokenizer.pad_token_id)
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 5 * len(tokenizer))
    with torch.no_grad():
        teacher_hidden, teacher_head = completion_hidden(teacher, rollouts)
    kl = full_divergence(student, teacher_hidden, teacher_head, rollouts, len(tokenizer))
    with torch.no_grad():
        positions = rollouts.completion_mask[:, 1:] > 0
        student_lp = student(rollouts.tokens, attention_mask=rollouts.attention_mask,
                             position_ids=rollouts.position_ids).logits[:, :-1][positions].log_softmax(-1)
        teacher_lp = teacher(rollouts.tokens, attention_mask=rollouts.attention_mask,
                             position_ids=rollouts.position_ids).logits[:, :-1][positions].log_softmax(-1)
        expected = exact_reverse_kl(student_lp.double(), teacher_lp.double())
    assert torch.allclose(kl[:, 1:][positions].double(), expected, atol=1e-5)
    assert (kl[rollouts.completion_mask == 0] == 0).all()


def test_shared_prompts_give_the_padded_forward_values_and_gradients(tokenizer):
    """Samples of one prompt run it once (Rollouts.prompt_groups); a batch whose rows are told apart
    by prompt_index runs the plain padded forward. Both must agree, values and gradients."""
    model = make_model(tokenizer, layers=2, width=16, seed=7)
    prompts, completions = batch(tokenizer)
    grouped = pack_pairs([prompts[0]] * 3 + [prompts[1]] * 2 + [prompts[2]],
                         [completions[0], completions[1], completions[2], completions[2], completions[0],
                          completions[1]], tokenizer.pad_token_id)
    grouped.prompt_index = torch.tensor([0, 0, 0, 1, 1, 2])
    alone = grouped.select(slice(None))
    alone.prompt_index = torch.arange(6)
    first, group, width = grouped.prompt_groups()
    assert first.tolist() == [0, 3, 5] and group.tolist() == [0, 0, 0, 1, 1, 2]
    assert alone.prompt_groups() is None

    def run(rollouts):
        model.zero_grad()
        logprobs = token_logprobs(model, rollouts, len(tokenizer))
        (logprobs * torch.linspace(1, 2, logprobs.shape[1])).sum().backward()
        return logprobs.detach(), [p.grad.clone() for p in model.parameters()]

    shared, shared_grads = run(grouped)
    padded, padded_grads = run(alone)
    assert (shared - padded).abs().max() < 1e-5
    for a, b in zip(shared_grads, padded_grads, strict=True):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
    # rows claiming one prompt_index but holding different prompts are not shared
    grouped.tokens[1, width - 1] = (grouped.tokens[1, width - 1] + 1) % len(tokenizer)
    assert grouped.prompt_groups() is None


def test_completion_row_offsets_count_each_rows_completion_even_after_a_one_token_prompt(tokenizer):
    """Midtraining's document chunks have a one-token prompt, so a completion may start at column 1."""
    model = make_model(tokenizer, layers=1, width=16, seed=0).eval()
    cases = [([[5], [6]], [[9, 10, 11], [12]]), ([[5], [5]], [[9, 10, 11], [12]]),  # distinct, shared prompt
             ([[5, 7], [5, 7]], [[9, 10], [12]]), ([[5, 7], [5, 7]], [[9], [12]])]  # completions 2 and 1 wide
    for prompts, completions in cases:
        rollouts = pack_pairs(prompts, completions, tokenizer.pad_token_id)
        if prompts[0] == prompts[1]:
            rollouts.prompt_index[:] = 0
            assert rollouts.prompt_groups() is not None
        counts = [len(c) for c in completions]
        assert scoring.completion_row_offsets(rollouts) == [0, counts[0], sum(counts)]
        with torch.no_grad():
            hidden, _ = completion_hidden(model, rollouts)
            plain = model.get_decoder()(input_ids=rollouts.tokens, attention_mask=rollouts.attention_mask,
                                        position_ids=rollouts.position_ids).last_hidden_state[:, :-1]
        assert torch.allclose(hidden, plain[rollouts.completion_mask[:, 1:] > 0], atol=1e-5)


def test_chunked_rows_without_gradients_equal_one_chunk(tokenizer, monkeypatch):
    model = make_model(tokenizer, layers=1, width=16, seed=0).eval()
    prompts, completions = batch(tokenizer)
    rollouts = pack_pairs(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        whole = token_logprobs(model, rollouts, len(tokenizer))
        monkeypatch.setattr(scoring, "LOGITS_BUDGET", len(tokenizer) * 3)  # chunks of 3 rows
        chunked = token_logprobs(model, rollouts, len(tokenizer))
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_prompt_groups_need_a_prompt_and_a_completion(tokenizer):
    shared = pack_pairs([[5, 6], [5, 6]], [[7], [8, 9]], tokenizer.pad_token_id)
    shared.prompt_index[:] = 0
    assert shared.prompt_groups() is not None
    no_prompt = pack_pairs([[], []], [[7], [8, 9]], tokenizer.pad_token_id)
    no_prompt.prompt_index[:] = 0
    assert no_prompt.prompt_groups() is None  # nothing to share
    nothing = pack_pairs([[5, 6], [5, 6]], [[7], [8]], tokenizer.pad_token_id)
    nothing.prompt_index[:] = 0
    nothing.completion_mask[:] = 0
    assert nothing.prompt_groups() is None


@pytest.mark.parametrize("kind, beta", [("forward_kl", 0.0), ("jsd", 0.3)])
def test_full_divergence_takes_gkds_divergences(tokenizer, kind, beta):
    from opd.divergences import divergence_from_logits

    student = make_model(tokenizer, layers=1, width=16, seed=7)
    teacher = make_model(tokenizer, layers=1, width=32, seed=8).eval()
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(10)  # a peaked teacher: the divergences differ
    rollouts = pack_pairs(*batch(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        teacher_hidden, teacher_head = completion_hidden(teacher, rollouts)
    got = full_divergence(student, teacher_hidden, teacher_head, rollouts, len(tokenizer),
                          divergence_from_logits(kind, beta))
    positions = rollouts.completion_mask[:, 1:] > 0
    with torch.no_grad():
        s = student(rollouts.tokens, attention_mask=rollouts.attention_mask,
                    position_ids=rollouts.position_ids).logits[:, :-1][positions].double().softmax(-1)
        t = teacher(rollouts.tokens, attention_mask=rollouts.attention_mask,
                    position_ids=rollouts.position_ids).logits[:, :-1][positions].double().softmax(-1)
    m = beta * t + (1 - beta) * s
    expected = ((t * (t.log() - s.log())).sum(-1) if kind == "forward_kl"
                else beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(-1))
    assert torch.allclose(got[:, 1:][positions].double(), expected, atol=1e-5)
    reverse = full_divergence(student, teacher_hidden, teacher_head, rollouts, len(tokenizer))
    assert not torch.allclose(got, reverse, atol=1e-3)
