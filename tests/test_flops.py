"""The FLOP formulas against torch's own count of the same computation (within 10%)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from opd.flops import ModelShape, forward_flops, grouped_forward_flops, sampling_flops, step_flops, training_flops
from opd.models import chat_prompt_ids
from opd.rollouts import pack_pairs
from opd.samplers.local import sample
from opd.scoring import token_logprobs
from opd.zoo import make_model


@pytest.fixture()
def model(tokenizer):
    model = make_model(tokenizer, layers=2, width=64, seed=0).eval()
    model.set_attn_implementation("eager")  # attention as matmuls, which the counter sees
    return model


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_matches_the_counter(model):
    ids = torch.randint(0, 200, (1, 120))
    with torch.no_grad():
        direct = counted(lambda: model(ids))
    formula = forward_flops(ModelShape.of(model), [120], logit_positions=120)
    assert formula == pytest.approx(direct, rel=0.10)
    # and the attention term is real: without it the formula falls short
    shape = ModelShape.of(model)
    assert 2 * shape.body_params * 120 + 2 * shape.d_model * shape.vocab * 120 < 0.95 * direct


def test_sampling_with_a_kv_cache_matches_the_counter(model, tokenizer):
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Compute 3*(4+5)-2 and more words"}])
    holder = {}

    def run():
        holder["r"] = sample(model, [prompt], max_new_tokens=40, eos_id=-1, pad_id=tokenizer.pad_token_id,
                             vocab_size=len(tokenizer),
                             generator=torch.Generator().manual_seed(0))

    direct = counted(run)
    completion = int(holder["r"].completion_mask.sum())
    assert completion == 40
    assert sampling_flops(ModelShape.of(model), [len(prompt)], [completion]) == pytest.approx(direct, rel=0.10)


def test_training_forward_backward_matches_the_counter(model, tokenizer):
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Compute 1+2"}])
    completion = tokenizer.encode("= 3\nAnswer: 3 and then a long tail of words", add_special_tokens=False)
    rollouts = pack_pairs([prompt], [completion], tokenizer.pad_token_id)
    model.train()
    direct = counted(lambda: token_logprobs(model, rollouts, len(tokenizer)).sum().backward())
    formula = training_flops(ModelShape.of(model), [len(prompt) + len(completion)], len(completion))
    assert formula == pytest.approx(direct, rel=0.10)


def test_step_flops_splits_teacher_and_student(model, tokenizer):
    student = ModelShape.of(model)
    teacher = ModelShape.of(make_model(tokenizer, layers=3, width=96, seed=1))
    step = step_flops(student, teacher, [10, 12], [5, 7])
    assert step["teacher_flops"] == forward_flops(teacher, [15, 19], 12)
    assert step["student_flops"] > training_flops(student, [15, 19], 12)
    assert step_flops(student, None, [10], [5])["teacher_flops"] is None


def test_a_prompt_shared_by_its_samples_is_counted_once(model, tokenizer):
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
               for text in ("Compute 3*(4+5)-2 and some more words", "Compute 1*(2+3)-4 and some more words")]
    holder = {}

    def run():
        holder["r"] = sample(model, prompts, samples_per_prompt=3, max_new_tokens=12, eos_id=-1,
                             pad_id=tokenizer.pad_token_id,
                             vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(0))

    direct = counted(run)
    rollouts = holder["r"]
    assert len(prompts[0]) == len(prompts[1])  # no padding, which the formulas do not count
    prompt_lengths = [len(prompts[0])] * 3 + [len(prompts[1])] * 3
    completions = [12] * 6
    shape = ModelShape.of(model)
    assert sampling_flops(shape, prompt_lengths, completions, group=3) == pytest.approx(direct, rel=0.10)
    assert rollouts.prompt_groups() is not None
    model.train()
    direct = counted(lambda: token_logprobs(model, rollouts, len(tokenizer)).sum().backward())
    formula = 3 * grouped_forward_flops(shape, prompt_lengths, completions, 3, sum(completions))
    assert formula == pytest.approx(direct, rel=0.10)
    # reading each prompt once is what makes it cheaper than the rows one by one
    rows = [p + c for p, c in zip(prompt_lengths, completions, strict=True)]
    assert formula < 0.9 * training_flops(shape, rows, 72)
    step = step_flops(shape, shape, prompt_lengths, completions, group=3)
    assert step["teacher_flops"] == formula / 3
