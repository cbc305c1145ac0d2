"""Each method's signal moves the student the right way through the trainer's own wiring (sampling,
scoring, advantages, loss, update), on a tiny problem built for that signal.

The one-step tests use one prompt with many samples of one token, so that every sample shares its context
and the sampled estimator's gradient is close to its expectation; plain SGD makes the weight change the
gradient itself. Their measure is exact (a full-vocabulary KL), not sampled, so it has no noise.
"""

import pytest
import torch

from conftest import tiny_train_overrides, unequal_batch, use_sgd
from opd.config import load_config
from opd.losses import group_centred_rewards, reverse_kl_advantages
from opd.scoring import head_logprobs
from opd.setup import open_session
from opd.trainer import training_step


def one_prompt_session(dirs, tmp_path, **extra):
    values = {"prompts_per_step": 1, "samples_per_prompt": 1024, "max_new_tokens": 1, "train_prompts": 1,
              "grad_clip": 1e9, **extra}
    session = open_session(load_config(None, tiny_train_overrides(dirs, tmp_path / "run", **values)))
    use_sgd(session, lr=0.1)
    return session


def first_token_kl(session) -> torch.Tensor:
    """Exact KL(student || teacher) over the vocabulary of the first completion token of the reused prompt,
    differentiable in the student."""
    example = session.task.train_examples(0, 1, session.config.seed)[0]
    ids = torch.tensor([session.prompt_ids(example.messages)])
    vocab = session.vocab_size

    def last_logprobs(model):
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, -1]
        return head_logprobs(model.get_output_embeddings(), hidden, vocab).double()

    student = last_logprobs(session.full_model)
    with torch.no_grad():
        teacher = last_logprobs(session.teacher_view.model)
    return (student.exp() * (student - teacher)).sum()


@pytest.mark.parametrize("method, kl", [("opd", "sampled"), ("opd", "full"), ("opd+rl", "sampled"),
                                        ("opd+rl", "full")])
def test_one_distillation_step_lowers_the_exact_kl_to_the_teacher(peaked_teacher, tmp_path, method, kl):
    # reward_coef=0: opd+rl's reward term is checked on its own below; here only its KL wiring
    session = one_prompt_session(peaked_teacher, tmp_path, method=method, kl=kl, reward_coef=0.0)
    params = session.trainable
    before = first_token_kl(session)
    descent = -torch.cat([g.flatten() for g in torch.autograd.grad(before, params)])
    start = torch.cat([p.detach().flatten() for p in params])
    training_step(session, 0)
    step = torch.cat([p.detach().flatten() for p in params]) - start
    cosine = torch.nn.functional.cosine_similarity(step.double(), descent, dim=0)
    with torch.no_grad():
        after = first_token_kl(session)
    assert before > 1.0  # the peaked teacher leaves something to learn
    # the update points down the exact KL's gradient (the sampled estimator only on average: 1024 samples)
    assert cosine > (0.95 if kl == "full" else 0.6), cosine
    assert after < before - 0.005, (before, after)


def test_opd_plus_rl_adds_the_group_centred_reward_to_the_sampled_kl(peaked_teacher, tmp_path):
    session = one_prompt_session(peaked_teacher, tmp_path, method="opd+rl", kl="sampled", reward_coef=0.5,
                                 prompts_per_step=2, samples_per_prompt=3, max_new_tokens=4)
    rollouts = session.source.rollouts(0)
    rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
    rollouts.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # what each completion scored
    mask = rollouts.completion_mask
    kl_part = -(rollouts.sampler_logprobs - rollouts.teacher_logprobs) * mask
    # each prompt's three samples: mean 1/3 and 2/3
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    expected = kl_part + 0.5 * centred[:, None] * mask
    assert torch.allclose(session.objective.advantages(rollouts), expected, atol=1e-6)
    assert torch.allclose(group_centred_rewards(rollouts.rewards, rollouts.prompt_index), centred)
    assert torch.allclose(reverse_kl_advantages(rollouts.sampler_logprobs, rollouts.teacher_logprobs, mask),
                          kl_part)


@pytest.mark.parametrize("method", ["opd", "rl"])
def test_with_temperature_and_top_p_the_ratio_is_exactly_one_before_the_update(model_dirs, tmp_path, monkeypatch,
                                                                               method):
    """The policy that samples is the policy being trained: at the first micro-batch of a step the
    learner's log-prob of every sampled token equals the sampler's recorded one."""
    import opd.objective
    import opd.trainer

    seen = {}
    real = opd.objective.importance_sampling_loss

    def spy(learner, sampler, *args, **kwargs):
        seen.setdefault("pairs", []).append((learner.detach().clone(), sampler.clone(), args[1].clone()))
        return real(learner, sampler, *args, **kwargs)

    monkeypatch.setattr(opd.objective, "importance_sampling_loss", spy)
    session = open_session(load_config(None, tiny_train_overrides(
        model_dirs, tmp_path / "run", method=method, kl="sampled", temperature=0.7, top_p=0.8, grad_accum=2,
        max_new_tokens=12)))
    sampled = []
    real_rollouts = session.source.rollouts
    monkeypatch.setattr(session.source, "rollouts", lambda *a: sampled.append(real_rollouts(*a)) or sampled[-1])
    training_step(session, 0)
    assert len(seen["pairs"]) == 2  # both micro-batches: the update comes after the last one
    masks = torch.cat([mask for _, _, mask in seen["pairs"]])
    assert torch.equal(masks, sampled[0].completion_mask)  # every sampled token, EOS included, is checked
    for learner, sampler, mask in seen["pairs"]:
        ratio = torch.exp(learner - sampler)[mask > 0]
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio


@pytest.mark.parametrize("method", ["sft", "midtrain"])
def test_one_cross_entropy_step_lowers_the_nll_of_its_tokens(peaked_teacher, tmp_path, method):
    """sft (the teacher's samples) and midtrain (document chunks): the update points down the negative
    log-likelihood of exactly the tokens it trained on, measured afterwards on the same batch."""
    import json

    from opd.scoring import token_logprobs

    extra = {"method": method, "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8}
    if method == "midtrain":
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": f"Mara Venn works in Oslo since {2000 + i}."}) + "\n"
                                for i in range(6)))
        extra.update(docs=str(docs), doc_tokens=8)
    session = one_prompt_session(peaked_teacher, tmp_path, **extra)
    captured = []
    real = session.source.rollouts
    session.source.rollouts = lambda *a: captured.append(real(*a)) or captured[-1]
    params = session.trainable
    start = torch.cat([p.detach().flatten() for p in params])
    training_step(session, 0)
    batch = captured[0]
    step = torch.cat([p.detach().flatten() for p in params]) - start
    with torch.no_grad():
        for p, value in zip(params, torch.split(start, [p.numel() for p in params]), strict=True):
            p.copy_(value.view_as(p))  # back to the weights the batch was trained from
    mask = batch.completion_mask
    nll = -(token_logprobs(session.full_model, batch, session.vocab_size) * mask).sum() / mask.sum()
    descent = -torch.cat([g.flatten() for g in torch.autograd.grad(nll, params)])
    assert torch.nn.functional.cosine_similarity(step, descent, dim=0) > 0.99


def test_opd_plus_rl_with_the_exact_kl_adds_the_reward_term(peaked_teacher, tmp_path):
    """kl=full: the loss of opd+rl is the exact-KL loss of opd plus the importance-sampling loss of the
    group-centred reward, whose value at ratio 1 is -(1/N) sum_t A_t."""
    from conftest import exact_signal

    sessions = {m: one_prompt_session(peaked_teacher, tmp_path / m, method=m, kl="full", reward_coef=0.5,
                                      prompts_per_step=2, samples_per_prompt=3, max_new_tokens=4)
                for m in ("opd", "opd+rl")}
    rollouts = unequal_batch(sessions["opd+rl"])  # unequal lengths: the reward term does not cancel
    rollouts.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    rollouts.teacher_logprobs, hidden = sessions["opd+rl"].teacher_view.teacher.score_with_hidden(rollouts)
    rollouts.advantages = sessions["opd+rl"].objective.advantages(rollouts)
    n = rollouts.num_completion_tokens
    with torch.no_grad():
        both = sessions["opd+rl"].loss_module(rollouts, n, exact_signal(sessions["opd+rl"], hidden))
        kl_only = sessions["opd"].loss_module(rollouts, n, exact_signal(sessions["opd"], hidden))
    reward_term = -(rollouts.advantages * rollouts.completion_mask).sum() / n
    assert reward_term.abs() > 0.01
    assert float(both - kl_only) == pytest.approx(float(reward_term), abs=1e-5)


def test_the_discount_reaches_the_advantages(model_dirs, tmp_path):
    from opd.losses import discounted_future_sum

    session = one_prompt_session(model_dirs, tmp_path, kl="sampled", gamma=0.9, samples_per_prompt=4,
                                 max_new_tokens=5)
    rollouts = session.source.rollouts(0)
    rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
    mask = rollouts.completion_mask
    per_token = -(rollouts.sampler_logprobs - rollouts.teacher_logprobs)
    assert torch.allclose(session.objective.advantages(rollouts), discounted_future_sum(per_token, mask, 0.9),
                          atol=1e-6)
