"""The algorithm as small pure tensor functions. Shapes: (B, T) aligned with ``Rollouts.tokens``.

Notation: q is the sampler (the student when sampling), p_teacher the teacher, pi the learner
(the student being updated). All masks are 1.0 on completion tokens and 0.0 elsewhere.
"""

from __future__ import annotations

import torch


def discounted_future_sum(values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``out[t] = sum_{k >= t} gamma^(k - t) * values[k] * mask[k]``, only over completion tokens.

    ``gamma = 0`` returns ``values * mask`` unchanged (the reference setting).
    """
    values = values * mask
    if gamma == 0.0:
        return values
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def reverse_kl_advantages(
    sampler_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 1.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Per-token advantage of on-policy distillation: the negative sampled reverse KL.

    ``adv[t] = -coef * (log q(x_t) - log p_teacher(x_t))`` on completion tokens, 0 elsewhere, then an
    optional discounted future sum. Since ``x_t ~ q``, ``E[log q - log p_teacher] = KL(q || p_teacher)``
    at that position, so maximising the advantage minimises the reverse KL. No baseline is subtracted.
    Source: Thinking Machines Lab, "On-Policy Distillation" (2025); tinker-cookbook's
    ``incorporate_kl_penalty``.
    """
    per_token = -coef * (sampler_logprobs - teacher_logprobs)
    return discounted_future_sum(per_token, mask, gamma)


def importance_sampling_loss(
    learner_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float = 0.0,
    num_tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-sampling policy-gradient loss, optionally PPO-clipped.

    ``loss = -(1/N) sum_t r_t * A_t`` with ``r_t = exp(log pi(x_t) - log q(x_t))`` and the advantages
    constant. With ``clip_epsilon > 0`` it is PPO's pessimistic objective
    ``-(1/N) sum_t min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)`` (Schulman et al. 2017, eq. 7).
    ``N`` is the number of completion tokens (``num_tokens`` overrides it, e.g. for gradient
    accumulation); an all-masked batch gives exactly 0.
    At ``pi = q`` the gradient is the REINFORCE gradient ``-(1/N) sum_t A_t grad log pi(x_t)``.
    ``weights`` (constant, e.g. ``truncated_importance_weights``) multiply the advantages.
    """
    advantages = advantages.detach() if weights is None else advantages.detach() * weights.detach()
    ratio = torch.exp(learner_logprobs - sampler_logprobs.detach())
    objective = ratio * advantages
    if clip_epsilon > 0:
        clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages
        objective = torch.minimum(objective, clipped)
    denominator = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens))
    return -(objective * mask).sum() / denominator.clamp(min=1.0)


def truncated_importance_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Per-token truncated importance weights for rollouts drawn by an inference engine:
    ``w_t = min(exp(log pi_old(x_t) - log q_engine(x_t)), C)`` on completion tokens, 1 elsewhere.

    ``pi_old`` is the trainer's policy the update starts from (its own log-probs of the sampled tokens,
    recomputed), ``q_engine`` the server's (vLLM's kernels, or weights one step older with async rollouts).
    The policy-gradient loss keeps ``pi_theta / pi_old`` as its ratio and multiplies each token's advantage
    by ``w_t``: the token-level truncated importance sampling (TIS) of Yao, Liu et al., "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training" (2025), ``C = 2`` in their experiments. Capping
    bounds the variance at the price of a bias where the engine under-samples a token by more than C.
    """
    gap = trainer_logprobs - engine_logprobs
    ratio = torch.exp(gap.to(torch.promote_types(gap.dtype, torch.float32))).clamp(max=cap)
    return torch.where(mask > 0, ratio, torch.ones_like(ratio))


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs (..., V) of the distribution tokens are drawn from: tempered, top-p truncated, renormalised.

    ``q(v) = softmax(z / T)(v) / Z`` for ``v`` in the nucleus (the smallest set of most likely tokens whose
    mass under ``softmax(z / T)`` reaches ``top_p``; the top token is always in it), ``-inf`` outside, with
    ``Z`` the nucleus' mass (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1).
    The sampler records it for the sampled token and the learner's log-probs use it too, so the
    importance ratio compares one policy with itself. ``T = 1, top_p = 1`` is the plain log-softmax.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:  # the row's maximum first, kept at 0: a tiny T (even one that is 0 in float32) sends
        shifted = logits - logits.amax(-1, keepdim=True)  # the others to -inf, never the maximum to NaN
        logits = torch.where(shifted == 0, shifted, shifted / temperature)
    logprobs = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop_sorted = mass_before >= top_p  # a token whose predecessors already reach top_p is outside
        drop_sorted[..., 0] = False  # the top token always stays (a top_p that is 0 in float32 kept none)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def exact_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(pi || p_teacher) = sum_v pi(v) (log pi(v) - log p_teacher(v))`` over the last dimension.

    Inputs are full-vocabulary log-probs (..., V); returns (...). Tokens the teacher gives zero
    probability while the student gives them mass make the KL infinite, as it should be.
    """
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


class _ReverseKLFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits, dim=-1)
        probs = logprobs.exp()
        gap = logprobs.sub_(teacher_logprobs)
        kl = (probs * gap).sum(-1)
        ctx.save_for_backward(probs, gap, kl)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, gap, kl = ctx.saved_tensors
        return (gap - kl.unsqueeze(-1)).mul_(probs).mul_(grad_kl.unsqueeze(-1)), None


def reverse_kl_from_logits(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``exact_reverse_kl(log_softmax(student_logits), teacher_logprobs)`` with its gradient in the
    logits written out, in two passes over (N, V) where autograd takes about six:

        d KL / d z_j = pi_j (log pi_j - log p_teacher(j) - KL),   pi = softmax(z)

    (from d pi_v / d z_j = pi_v (delta_vj - pi_j) and d log pi_v / d z_j = delta_vj - pi_j). No
    gradient flows to the teacher.
    """
    return _ReverseKLFromLogits.apply(student_logits, teacher_logprobs.detach())


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """``sum(values * mask) / N`` with N the mask's sum (or ``num_tokens``); 0 for an empty mask."""
    denominator = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens))
    return (values * mask).sum() / denominator.clamp(min=1.0)


def label_smoothed_nll(logprobs: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-row ``(1 - eps) * -log p(target) + eps * mean_v -log p(v)`` (Szegedy et al. 2016, sec. 7).

    ``logprobs`` is (N, V) full log-softmax, ``targets`` (N,); ``eps = 0`` is plain cross-entropy.
    """
    nll = -logprobs.gather(-1, targets[:, None])[:, 0]
    if smoothing == 0.0:
        return nll
    return (1 - smoothing) * nll - smoothing * logprobs.mean(-1)


def group_centred_rewards(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``r_i - mean_{j in group(i)} r_j``: each completion's reward against the other samples of its
    prompt (GRPO's baseline without the std normalisation; Shao et al. 2024, DeepSeekMath, sec. 4.1).
    A group whose samples all scored the same gets 0: no signal, as it should be."""
    sums = torch.zeros(int(group.max()) + 1, dtype=rewards.dtype, device=rewards.device).index_add(0, group, rewards)
    counts = torch.zeros_like(sums).index_add(0, group, torch.ones_like(rewards))
    return rewards - (sums / counts)[group]
