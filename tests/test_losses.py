"""Each formula against an independent computation: enumeration on a tiny vocabulary, float64."""

import itertools

import pytest
import torch

from opd.losses import (
    discounted_future_sum,
    exact_reverse_kl,
    group_centred_rewards,
    importance_sampling_loss,
    label_smoothed_nll,
    masked_token_mean,
    reverse_kl_advantages,
    reverse_kl_from_logits,
)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_sampled_reverse_kl_averages_to_exact_kl_over_sequences():
    # two-token sequences over a 3-token vocabulary; q and p are autoregressive tables
    gen = torch.Generator().manual_seed(0)
    q_first = torch.randn(3, generator=gen).log_softmax(-1)
    p_first = torch.randn(3, generator=gen).log_softmax(-1)
    q_second = torch.randn(3, 3, generator=gen).log_softmax(-1)  # [first token, second token]
    p_second = torch.randn(3, 3, generator=gen).log_softmax(-1)
    exact = 0.0  # KL(q || p) of the sequence distribution, by enumerating all 9 sequences
    for a, b in itertools.product(range(3), range(3)):
        log_q = q_first[a] + q_second[a, b]
        exact += log_q.exp() * (log_q - p_first[a] - p_second[a, b])
    # Monte Carlo: sum over tokens of the negative advantage, sequences drawn from q
    n = 200_000
    first = torch.multinomial(q_first.exp(), n, replacement=True, generator=gen)
    second = torch.multinomial(q_second[first].exp(), 1, generator=gen)[:, 0]
    sampler = torch.stack([q_first[first], q_second[first, second]], dim=1)
    teacher = torch.stack([p_first[first], p_second[first, second]], dim=1)
    advantages = reverse_kl_advantages(sampler, teacher, torch.ones(n, 2))
    estimate = -advantages.sum(-1).mean()
    assert abs(estimate - exact) < 4 * (-advantages.sum(-1)).std() / n**0.5


def test_exact_reverse_kl_matches_definition():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).log_softmax(-1)  # (B, T, V)
    teacher = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).log_softmax(-1)
    for b in range(2):
        for t in range(4):
            expected = sum(student[b, t, v].exp() * (student[b, t, v] - teacher[b, t, v]) for v in range(5))
            assert torch.isclose(exact_reverse_kl(student, teacher)[b, t], expected)
    assert torch.allclose(exact_reverse_kl(student, student), torch.zeros(2, 4, dtype=torch.float64))


def test_reverse_kl_from_logits_value_and_gradient_match_autograd():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 3  # (B, T, V), like (N, V) row-wise
    teacher = (torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    weights = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    fused_logits = logits.clone().requires_grad_(True)
    (reverse_kl_from_logits(fused_logits, teacher) * weights).sum().backward()
    plain_logits = logits.clone().requires_grad_(True)
    plain = exact_reverse_kl(plain_logits.log_softmax(-1), teacher)
    (plain * weights).sum().backward()
    assert torch.allclose(reverse_kl_from_logits(logits, teacher), plain.detach(), atol=1e-12)
    assert torch.allclose(fused_logits.grad, plain_logits.grad, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: reverse_kl_from_logits(z, teacher), (logits.clone().requires_grad_(),))


def test_importance_sampling_gradient_equals_reinforce_on_policy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, requires_grad=True, generator=gen)  # one position per row, vocab 6
    tokens = torch.tensor([1, 4, 2])
    advantages = torch.randn(3, 1, generator=gen)
    mask = torch.ones(3, 1)
    learner = logits.log_softmax(-1).gather(-1, tokens[:, None])
    loss = importance_sampling_loss(learner, learner.detach(), advantages, mask)
    (grad_is,) = torch.autograd.grad(loss, logits)
    # REINFORCE: -(1/N) sum_t A_t grad log pi(x_t), with grad log softmax = onehot - softmax
    onehot = torch.nn.functional.one_hot(tokens, 6).double()
    reinforce = -(advantages * (onehot - logits.detach().softmax(-1))) / 3
    assert torch.allclose(grad_is, reinforce)


def test_ppo_clip_clips_the_ratio():
    sampler = torch.zeros(1, 4)
    learner = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    advantages = torch.full((1, 4), 2.0)
    mask = torch.ones(1, 4)
    clipped = importance_sampling_loss(learner, sampler, advantages, mask, clip_epsilon=0.2)
    # min(r A, clip(r) A) with A = 2 > 0: 2 x (0.5, 0.9, 1.1, 1.2)
    assert torch.isclose(clipped, -2 * torch.tensor((0.5 + 0.9 + 1.1 + 1.2) / 4))
    negative = importance_sampling_loss(learner, sampler, -advantages, mask, clip_epsilon=0.2)
    # with A = -2 the pessimistic bound keeps the larger ratio: 0.8, 0.9, 1.1, 1.5
    assert torch.isclose(negative, 2 * torch.tensor((0.8 + 0.9 + 1.1 + 1.5) / 4))
    unclipped = importance_sampling_loss(learner + 1.0, sampler, advantages, mask)  # no clipping by default
    assert torch.isclose(unclipped, -2 * torch.exp(learner + 1.0).mean())
    learner_param = learner.clone().requires_grad_(True)
    importance_sampling_loss(learner_param, sampler, torch.ones(1, 4), mask, clip_epsilon=0.2).backward()
    assert learner_param.grad[0, 3] == 0 and learner_param.grad[0, 0] != 0  # clipped side has no gradient


def test_fully_masked_batch_gives_zero_not_nan():
    values = torch.randn(2, 3)
    mask = torch.zeros(2, 3)
    assert importance_sampling_loss(values, values, values, mask).item() == 0.0
    assert masked_token_mean(values, mask).item() == 0.0
    one = torch.zeros(2, 3)
    one[1, 2] = 1.0  # a single completion token: its value is the mean
    assert masked_token_mean(values, one).item() == values[1, 2].item()
    assert importance_sampling_loss(values, values, values, one).item() == -values[1, 2].item()


def test_gamma_gives_discounted_future_sum():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 5, generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    for gamma in (0.7, 1.0):  # 1.0: the undiscounted future sum
        out = discounted_future_sum(values, mask, gamma)
        for b in range(2):
            for t in range(5):
                expected = sum(gamma ** (k - t) * values[b, k] * mask[b, k] for k in range(t, 5)) * mask[b, t]
                assert torch.isclose(out[b, t], torch.as_tensor(expected))
    assert torch.equal(discounted_future_sum(values, mask, 0.0), values * mask)


def test_advantage_is_negative_log_ratio_times_coef():
    sampler = torch.tensor([[-1.0, -2.0]])
    teacher = torch.tensor([[-1.5, -0.5]])
    adv = reverse_kl_advantages(sampler, teacher, torch.tensor([[1.0, 0.0]]), coef=2.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, 0.0]]))


def test_label_smoothed_nll():
    logprobs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.25, 0.5]], dtype=torch.float64).log()
    target = torch.tensor([0, 2, 1])
    assert torch.equal(label_smoothed_nll(logprobs, target), -logprobs.gather(-1, target[:, None])[:, 0])  # default
    for smoothing in (0.0, 0.1, 0.5):
        got = label_smoothed_nll(logprobs, target, smoothing)
        for row in range(3):
            expected = (1 - smoothing) * -logprobs[row, target[row]] + smoothing * -logprobs[row].mean()
            assert torch.isclose(got[row], expected)


def test_group_centred_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    assert torch.allclose(group_centred_rewards(rewards, group), expected)
    doubles = group_centred_rewards(rewards.double(), group)  # any float dtype, kept
    assert doubles.dtype == torch.float64 and torch.allclose(doubles, expected.double())
    fine = torch.tensor([1 + 1e-12, 1.0], dtype=torch.float64)  # a difference only float64 holds
    assert group_centred_rewards(fine, torch.tensor([0, 0]))[0].item() == pytest.approx(5e-13, rel=1e-3)


def test_the_discount_counts_a_conversations_environment_tokens_as_steps():
    """``gamma > 0`` across a tool result: the exponent is the distance in positions, so the environment's
    (masked) tokens between two turns discount the later turn's terms like positions of its own (documented
    in docs/conversations.md); they add nothing themselves."""
    from opd.losses import discounted_future_sum

    values = torch.tensor([[1.0, 2.0, 7.0, 7.0, 7.0, 3.0]])  # a turn (2 tokens), a tool result (3), a turn (1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    out = discounted_future_sum(values, mask, 0.5)
    assert out[0].tolist() == pytest.approx([1 + 0.5 * 2 + 0.5**5 * 3, 2 + 0.5**4 * 3, 0, 0, 0, 3])
