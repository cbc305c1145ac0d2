import json
import random

import pytest
import torch

from opd.models import load_model, load_tokenizer
from opd.tasks import arithmetic
from opd.zoo import ZooConfig, build, build_tokenizer, make_model, sft_loss, weighted_ids

TINY = dict(vocab_size=300, operators=1, teacher_layers=1, teacher_width=32, teacher_steps=30,
            student_layers=1, student_width=16, student_sft_examples=64, student_sft_steps=10,
            batch_size=16, eval_examples=16, max_new_tokens=16)


def test_tokenizer_is_byte_level_with_single_digit_tokens_and_a_chat_template(tokenizer):
    text = "Compute 12+(34*5) — héllo ✓"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    digits = [tokenizer.decode([i]) for i in tokenizer.encode("1234567890", add_special_tokens=False)]
    assert digits == list("1234567890")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_is_deterministic():
    first = build_tokenizer(seed=3, vocab_size=280, operators=2, corpus_lines=200)
    second = build_tokenizer(seed=3, vocab_size=280, operators=2, corpus_lines=200)
    assert first.get_vocab() == second.get_vocab()


def test_build_writes_loadable_hf_models_and_a_card(tmp_path):
    card = build(tmp_path, ZooConfig(**TINY))
    assert json.loads((tmp_path / "zoo.json").read_text()) == card
    for name in ("teacher", "student"):
        model = load_model(tmp_path / name, torch.device("cpu"), torch.float32)
        assert model.config.model_type == "qwen3"
        assert load_tokenizer(tmp_path / name).chat_template
    assert 0 <= card["teacher_accuracy"] <= 1 and 0 <= card["student_accuracy"] <= 1
    assert card["teacher_parameters"] > card["student_parameters"]
    # the student can be rebuilt alone against the saved teacher
    again = build(tmp_path, ZooConfig(**TINY), reuse_teacher=True)
    assert again["teacher_accuracy"] == card["teacher_accuracy"]


def test_reference_solution_format():
    assert arithmetic.solution(("+", 5, ("*", 2, 3))) == "= 5+6\n= 11\nAnswer: 11"


def test_retry_traces_inject_wrong_lines_that_are_not_trained():
    rng = random.Random(0)
    tree = arithmetic.make_tree(rng, 3, "train")
    reference = arithmetic.solution(tree)
    segments = arithmetic.solution_with_retries(tree, rng, rate=1.0)  # a mistake before every line
    trained = "".join(text for text, keep in segments if keep)
    assert trained.replace(f"{arithmetic.RETRY}\n", "") == reference
    lines = reference.splitlines()[:-1]  # the rewrite lines (not "Answer: N")
    wrong = [text.strip() for text, keep in segments if not keep]
    assert len(wrong) == len(lines) and all(w != right for w, right in zip(wrong, lines, strict=True))
    assert all(text == f"{arithmetic.RETRY}\n" for text, keep in segments[1::3])  # wrong, retry, right, ...
    assert arithmetic.solution_with_retries(tree, rng, rate=0.0) == [(line + "\n", True) for line in lines] + [
        (reference.splitlines()[-1], True)]


def test_weighted_ids_mask_exactly_the_injected_line(tokenizer):
    segments = [("= 5+6\n", True), ("= 12\n", False), ("retry\n", True), ("= 11\n", True), ("Answer: 11", True)]
    ids, weights = weighted_ids(tokenizer, segments)
    assert ids[-1] == tokenizer.eos_token_id and len(weights) == len(ids)
    masked = tokenizer.decode([i for i, w in zip(ids, weights, strict=True) if not w])
    kept = tokenizer.decode([i for i, w in zip(ids, weights, strict=True) if w], skip_special_tokens=True)
    assert masked.strip() == "= 12" and kept == "= 5+6\nretry\n= 11\nAnswer: 11"


def test_the_retry_loss_skips_the_injected_tokens_exactly(tokenizer):
    """The weighted loss equals the mean negative log-likelihood of the trained tokens alone, computed
    from one plain forward pass in float64: the teacher is never taught to make the injected mistake."""
    model = make_model(tokenizer, layers=1, width=16, seed=3).double()
    ids, weights = weighted_ids(tokenizer, [("= 5+6\n", True), ("= 12\n", False), ("retry\n= 11\n", True)])
    prompt = tokenizer.encode("Compute 5+6", add_special_tokens=False)
    with torch.no_grad():
        loss = sft_loss(model, tokenizer, [prompt], [ids], [weights])
        plain = sft_loss(model, tokenizer, [prompt], [ids])
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0], -1)
    nll = [-logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(ids)]
    expected = sum(n for n, w in zip(nll, weights, strict=True) if w) / sum(weights)
    assert 0 < sum(weights) < len(weights)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)  # the head works in float32
    assert float(plain) == pytest.approx(float(sum(nll) / len(nll)), rel=1e-6)
