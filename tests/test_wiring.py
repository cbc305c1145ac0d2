"""The trainer's wiring where one-line bugs hide: the rendered prompt, EOS in what is trained, gradient
clipping, gradient accumulation over completions of unequal lengths, and the sampler's recorded log-probs."""

import json
import time

import pytest
import torch

from conftest import sgd_update, tiny_train_overrides, unequal_batch, with_bos
from opd.config import load_config
from opd.models import chat_prompt_ids, load_tokenizer, save_model
from opd.samplers.local import sample
from opd.setup import open_session
from opd.tasks.jsonl import epoch_order
from opd.trainer import training_step, update


def test_the_prompt_is_the_chat_template_with_its_generation_prompt(model_dirs, tmp_path, tokenizer):
    session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1+2"}]
    # the zoo's template, written out by hand
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1+2<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert session.prompt_ids(messages) == tokenizer.encode(expected, add_special_tokens=False)
    assert tokenizer.decode(chat_prompt_ids(tokenizer, messages)) == expected
    example = session.source.prompts.all(0)[0]
    rollouts = session.source.rollouts(0)
    first_prompt = rollouts.tokens[0][(rollouts.attention_mask[0] > 0) & (rollouts.completion_mask[0] == 0)]
    assert tokenizer.decode(first_prompt.tolist()).endswith("<|im_start|>assistant\n")
    assert first_prompt.tolist() == session.prompt_ids(example.messages)


def stopping_model(tokenizer, seed=3):
    """A tiny model whose EOS is likely enough that rows stop at different steps."""
    from opd.zoo import make_model

    model = make_model(tokenizer, layers=1, width=16, seed=seed).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = head.mean(0) * 0 + torch.randn(head.shape[1]) * 3
    return model


def test_eos_is_sampled_into_the_completion_mask_and_nothing_after_it(tokenizer):
    eos = tokenizer.eos_token_id
    model = stopping_model(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in ("Compute 1+2", "Compute 2*3")]
    rollouts = sample(model, prompts, samples_per_prompt=8, max_new_tokens=10, eos_id=eos, pad_id=eos,
                      vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(1))
    width = max(len(p) for p in prompts)
    stopped = 0
    for row in range(rollouts.tokens.shape[0]):
        generated = rollouts.tokens[row, width:].tolist()  # the raw columns, not what the mask says
        length = generated.index(eos) + 1 if eos in generated else len(generated)
        stopped += eos in generated and length < len(generated)
        mask = rollouts.completion_mask[row, width:]
        assert mask[:length].tolist() == [1.0] * length  # EOS included
        assert mask[length:].sum() == 0
        if eos in generated:
            assert rollouts.sampler_logprobs[row, width + length - 1] < 0  # EOS's log-prob was recorded
    assert stopped >= 4  # rows of unequal lengths, so the test means something


def test_sft_pairs_train_on_eos_and_no_bos_inside(model_dirs, tmp_path, tokenizer):
    """A completion is its text's tokens plus EOS, with no special tokens added in the middle of the
    sequence: the student's tokenizer here adds a BOS to every encoding, as Llama's does."""
    from opd.zoo import make_model

    bos_tokenizer, bos = with_bos(model_dirs["student"])
    assert bos_tokenizer.encode("= 2")[0] == bos
    save_model(make_model(bos_tokenizer, layers=1, width=16, seed=2), bos_tokenizer, tmp_path / "bos-student")
    data = tmp_path / "sft.jsonl"
    long = "= " + "1+" * 20 + "1"  # longer than max_new_tokens: cut to max_new_tokens - 1 tokens, then EOS
    data.write_text(json.dumps({"prompt": "Compute 1+1", "completion": "= 2"}) + "\n"
                    + json.dumps({"prompt": "Compute more", "completion": long}) + "\n")
    session = open_session(load_config(None, tiny_train_overrides(
        {**model_dirs, "student": tmp_path / "bos-student"}, tmp_path / "run", method="sft", sft_data=data,
        prompts_per_step=2, max_new_tokens=8)))
    rollouts = session.source.rollouts(0)
    eos = tokenizer.eos_token_id
    for messages, row, mask in zip(rollouts.messages, rollouts.tokens, rollouts.completion_mask,
                                   strict=True):
        text = "= 2" if messages[-1]["content"] == "Compute 1+1" else long
        assert row[mask > 0].tolist() == tokenizer.encode(text, add_special_tokens=False)[:7] + [eos]


def test_sft_data_is_taken_in_its_seeded_epoch_order(model_dirs, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Compute {i}+1", "completion": f"= {i + 1}"}) + "\n"
                            for i in range(5)))
    taken = {}
    for seed in (0, 1):
        session = open_session(load_config(None, tiny_train_overrides(
            model_dirs, tmp_path / f"run{seed}", method="sft", sft_data=data, prompts_per_step=2, seed=seed)))
        taken[seed] = []
        for step in range(4):  # over an epoch boundary
            rollouts = session.source.rollouts(step)
            expected = [session.source.pairs[i][0].messages for i in epoch_order(5, step, 2, seed)]
            assert rollouts.messages == expected and rollouts.tokens.shape[0] == 2
            taken[seed] += [messages[-1]["content"] for messages in expected]
    assert taken[0] != taken[1]


def sgd_step(model_dirs, tmp_path, name, **extra) -> tuple[dict, float]:
    session = open_session(load_config(None, tiny_train_overrides(
        model_dirs, tmp_path / name, prompts_per_step=4, samples_per_prompt=2, grad_clip=1e9, **extra)))
    batch = unequal_batch(session)
    loss = sgd_update(session, batch, int(batch.completion_mask.sum()))
    return {k: v.detach().clone() for k, v in session.full_model.state_dict().items()}, loss


@pytest.mark.parametrize("method, kl", [("opd", "sampled"), ("opd", "full"), ("sft", "sampled"), ("rl", "sampled")])
def test_gradient_accumulation_equals_one_batch_with_unequal_lengths(model_dirs, tmp_path, method, kl):
    one, loss = sgd_step(model_dirs, tmp_path, "one", method=method, kl=kl)
    for micro in (2, 4):
        many, accumulated = sgd_step(model_dirs, tmp_path, f"acc{micro}", method=method, kl=kl, grad_accum=micro)
        worst = max((one[k] - many[k]).abs().max().item() for k in one)
        assert worst < 1e-6, (micro, worst)
        assert accumulated == pytest.approx(loss, rel=1e-5, abs=1e-7)  # the step's loss, not one micro-batch's


def test_clipping_bounds_the_gradient_the_optimizer_applies(model_dirs, tmp_path):
    session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", grad_clip=1e-3)))
    batch = unequal_batch(session)
    batch.teacher_logprobs = session.teacher_view.teacher.score(batch)
    batch.advantages = session.objective.advantages(batch)
    applied = []
    session.optimizer.register_step_pre_hook(
        lambda *_: applied.append(torch.cat([p.grad.flatten() for p in session.trainable]).norm().item()))
    _, grad_norm, _ = update(session, batch, None, int(batch.completion_mask.sum()), step=0)
    assert grad_norm > 0.01  # the norm before clipping, as logged
    assert applied == [pytest.approx(1e-3, rel=1e-4)]


def test_the_step_record_is_computed_from_the_steps_own_rollouts(model_dirs, tmp_path, monkeypatch):
    """teacher_kl, train_reward, completion_tokens and the FLOPs of a step's record, recomputed from the
    rollouts the step trained on (captured), with the prompt lengths counted independently."""
    from opd.flops import StepKind, step_flops

    tokenizer = load_tokenizer(model_dirs["student"])
    save_model(stopping_model(tokenizer), tokenizer, tmp_path / "stopping")  # rows of unequal lengths
    session = open_session(load_config(None, tiny_train_overrides({**model_dirs, "student": tmp_path / "stopping"},
                                                                  tmp_path / "run", max_new_tokens=10)))
    monkeypatch.setattr(session.task, "reward", lambda text, example: float(len(text) % 3))  # rewards of 0, 1, 2
    captured = []
    real = session.source.rollouts
    monkeypatch.setattr(session.source, "rollouts", lambda *a: captured.append(real(*a)) or captured[-1])
    started = time.perf_counter()
    record = training_step(session, 0)
    wall = time.perf_counter() - started
    rollouts = captured[0]
    assert rollouts.rewards.sum() > 0
    timings = [record[k] for k in ("sample_seconds", "score_seconds", "train_seconds")]
    assert all(t > 0 for t in timings) and sum(timings) <= wall + 1e-3  # each rounded to 0.1 ms
    assert record["grad_norm"] > 0 and record["lr"] == session.config.lr / session.config.warmup_steps
    mask = rollouts.completion_mask
    expected_kl = float(((rollouts.sampler_logprobs - rollouts.teacher_logprobs) * mask).sum() / mask.sum())
    assert record["teacher_kl"] == pytest.approx(expected_kl, rel=1e-6)
    assert record["train_reward"] == pytest.approx(float(rollouts.rewards.mean()))
    assert record["completion_tokens"] == int(mask.sum())
    prompt_lengths = [int(((a > 0) & (m == 0)).sum()) for a, m in zip(rollouts.attention_mask, mask, strict=True)]
    completion_lengths = [int(m.sum()) for m in mask]
    assert len(set(completion_lengths)) > 1  # unequal lengths, so a mix-up shows
    flops = step_flops(session.student_shape, session.teacher_view.shape, prompt_lengths, completion_lengths,
                       StepKind.DISTIL, group=session.config.samples_per_prompt)
    assert record["student_flops"] == pytest.approx(flops["student_flops"])
    assert record["teacher_flops"] == pytest.approx(flops["teacher_flops"])


def test_a_step_on_given_pairs_counts_each_pair_once_and_no_teacher(model_dirs, tmp_path, monkeypatch):
    from opd.flops import StepKind, step_flops

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Compute {i}+1", "completion": f"= {i + 1}"}) + "\n"
                            for i in range(4)))
    session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", method="sft",
                                                                  sft_data=data)))
    captured = []
    real = session.source.rollouts
    monkeypatch.setattr(session.source, "rollouts", lambda *a: captured.append(real(*a)) or captured[-1])
    record = training_step(session, 0)
    mask = captured[0].completion_mask
    prompts = [int(((a > 0) & (m == 0)).sum()) for a, m in zip(captured[0].attention_mask, mask, strict=True)]
    flops = step_flops(session.student_shape, session.teacher_view.shape, prompts, [int(m.sum()) for m in mask],
                       StepKind.GIVEN, group=1)
    assert record["student_flops"] == pytest.approx(flops["student_flops"]) and record["teacher_flops"] == 0


def test_training_prompts_follow_the_seed_and_train_prompts_reuses_step_zeros(model_dirs, tmp_path):
    texts = {}
    for seed in (0, 1):
        session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / f"s{seed}", seed=seed)))
        texts[seed] = [ex.messages[-1]["content"] for ex in session.source.prompts.all(0)]
        assert session.source.prompts.all(3) == session.task.train_examples(3, 4, seed)
    assert texts[0] != texts[1]
    session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "reuse", train_prompts=3,
                                                                  prompts_per_step=2, seed=1)))
    pool = session.task.train_examples(0, 3, 1)
    for step in range(4):  # each epoch of the pool in its seeded order
        assert session.source.prompts.all(step) == [pool[i] for i in epoch_order(3, step, 2, 1)]


def test_sft_samples_come_from_the_teacher_and_opd_samples_from_the_student(model_dirs, tmp_path):
    """At temperature 1 a sampler's recorded log-probs are its own: the teacher's for sft, the student's
    otherwise."""
    from opd.scoring import token_logprobs

    for method, who in (("sft", "teacher"), ("opd", "student")):
        session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / method, method=method)))
        rollouts = session.source.rollouts(0)
        model = session.teacher_view.model if who == "teacher" else session.full_model
        with torch.no_grad():
            own = token_logprobs(model, rollouts, session.vocab_size)
        mask = rollouts.completion_mask > 0
        assert torch.allclose(own[mask], rollouts.sampler_logprobs[mask], atol=1e-5), method
