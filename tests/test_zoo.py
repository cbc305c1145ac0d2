import json

import torch

from opd.models import load_model, load_tokenizer
from opd.tasks import arithmetic
from opd.zoo import ZooConfig, build, build_tokenizer

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
