"""What a run optimises, decided once from the config before any compute: what it needs from the
teacher, the per-token advantages, and the loss of one micro-batch (DESIGN.md's table).

| method | the teacher gives | advantage per token | loss |
| --- | --- | --- | --- |
| ``opd``, ``kl=sampled`` | its log-prob of each sampled token | ``-kl_coef (lp_student - lp_teacher)`` | IS / PPO |
| ``opd``, ``kl=full`` | its whole distribution (hidden states + head) | none | the divergence itself |
| ``opd``, ``kl=topk`` | its top-k ids and log-probs per position | none | the divergence on the top-k + tails |
| ``rl`` | nothing | the group-centred task reward | IS / PPO |
| ``opd+rl`` | as ``opd`` | the sum of the two (the KL part only with ``kl=sampled``) | divergence + IS / PPO |
| ``sft``, ``midtrain`` | nothing | none | cross-entropy on the given tokens |

IS: the importance-sampling policy gradient. Formulas and sources are in ``losses`` and ``divergences``;
this module only chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.divergences import divergence_from_logits
from opd.flops import StepKind
from opd.losses import group_centred_rewards, importance_sampling_loss, masked_token_mean, reverse_kl_advantages
from opd.rollouts import Rollouts
from opd.scoring import full_divergence, token_logprobs, topk_divergence

SUPERVISED = ("sft", "midtrain")  # cross-entropy on given tokens


def resolve_kl(kl: str, *, remote: bool, several: bool, aligned: bool) -> str:
    """``kl=auto``: the sampled estimate when the teacher reads another tokenizer (the alignment scores
    sampled tokens only), the teacher's top-k when a server sends it (a server sends log-probs, not the
    whole distribution) or several teachers route rows (each row another head), else the exact KL.
    Any other value is kept. ``kl_of`` gathers the inputs from a config."""
    if kl != "auto":
        return kl
    if aligned:
        return "sampled"
    return "topk" if remote or several else "full"


def kl_of(config, aligned: bool) -> str:
    """``config.kl`` resolved (``resolve_kl``) for its teacher: behind a server (``remote_teacher``), several
    (``teachers=``), and ``aligned`` when the teacher reads another tokenizer (known once both tokenizers
    are read: setup, ``opd plan``'s probe and ``opd demo`` read them; before that, pass False). The one
    place that gathers these inputs. Midtraining reads no teacher."""
    remote = config.remote_teacher and config.method != "midtrain"
    return resolve_kl(config.kl, remote=remote, several=bool(config.teachers), aligned=aligned)


def step_kind(config) -> StepKind:
    """What each step of a run computes, for its FLOPs: given tokens (``sft_data``, midtraining), the
    teacher's samples (``sft``), or the student's samples with (``opd``, ``opd+rl``) or without (``rl``) the
    teacher scoring them. ``opd train`` and ``opd plan`` count by it."""
    if config.method == "midtrain" or config.sft_data:
        return StepKind.GIVEN
    return {"sft": StepKind.TEACHER_SAMPLES, "rl": StepKind.RL}.get(config.method, StepKind.DISTIL)


@dataclass(frozen=True)
class Grading:
    """What a step asks of the teacher beyond its log-prob of each sampled token: its final hidden states
    (``kl=full``: its head then gives the whole distribution), its top-``topk`` ids and log-probs per
    position (``kl=topk``), and how many rows it grades at a time (``sample_batch``; 0: all)."""

    hidden: bool = False
    topk: int = 0
    rows: int = 0


LOGPROBS = Grading()  # the sampled tokens' log-probs alone (kl=sampled, the logged KL)


@dataclass
class TeacherSignal:
    """The teacher's distribution at a batch's completion positions, in ``scoring.completion_hidden``'s
    order: its final hidden states and its head (``kl=full``), or its top-k ids and log-probs
    (``kl=topk``). The sampled tokens' log-probs travel in ``Rollouts.teacher_logprobs``."""

    hidden: torch.Tensor | None = None  # (N, H)
    head: torch.nn.Module | None = None
    topk_ids: torch.Tensor | None = None  # (N, k)
    topk_logprobs: torch.Tensor | None = None  # (N, k)

    def rows(self, span: slice) -> TeacherSignal:
        """The signal at the completion positions ``span`` (a micro-batch's rows)."""
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[span]

        return TeacherSignal(cut(self.hidden), self.head, cut(self.topk_ids), cut(self.topk_logprobs))


@dataclass(frozen=True)
class Objective:
    distils: bool  # a teacher grades the student's tokens (opd, opd+rl)
    rewarded: bool  # the task's reward enters the advantage (rl, opd+rl)
    supervised: bool  # cross-entropy on given tokens (sft, midtrain)
    kl: str  # resolved: sampled | full | topk
    divergence: str = "reverse_kl"
    beta: float = 0.5
    kl_coef: float = 1.0
    reward_coef: float = 1.0
    gamma: float = 0.0
    temperature: float = 1.0  # the sampling distribution the importance ratio is taken against
    top_p: float = 1.0
    ppo_clip: float = 0.0
    vocab_size: int = 0  # the tokenizer's ids: a padded head's extra rows are never scored
    teacher_topk: int = 20  # kl=topk: the teacher's ids per position
    grade_rows: int = 0  # rows the teacher grades at a time (0: the whole batch)
    kind: StepKind = StepKind.DISTIL  # what a step computes, for its FLOPs

    @classmethod
    def of(cls, config, vocab_size: int) -> Objective:
        """The run's objective (``config.kl`` resolved already). With ``sample_batch``, the teacher grades
        whole prompts' samples, about ``sample_batch`` rows at a time."""
        rows = max(1, config.sample_batch // config.samples_per_prompt) * config.samples_per_prompt \
            if config.sample_batch else 0
        return cls(config.distils, config.rewarded, config.method in SUPERVISED, config.kl, config.divergence,
                   config.beta, config.kl_coef, config.reward_coef, config.gamma, config.temperature, config.top_p,
                   config.ppo_clip, vocab_size, config.teacher_topk, rows, step_kind(config))

    @property
    def exact(self) -> bool:
        """The divergence over the vocabulary (or its top-k) enters the loss itself."""
        return self.distils and self.kl in ("full", "topk")

    @property
    def grading(self) -> Grading | None:
        """What a step asks the teacher for (None: no teacher grades the rows): the sampled tokens'
        log-probs always, and its hidden states (``kl=full``) or its top-k (``kl=topk``) for the loss."""
        if not self.distils:
            return None
        return Grading(hidden=self.kl == "full", topk=self.teacher_topk if self.kl == "topk" else 0,
                       rows=self.grade_rows)

    def signal(self, scored, view) -> TeacherSignal | None:
        """The loss's part of a teacher's ``Scored`` answer (None when the loss needs none): its hidden states
        with ``view``'s head (``kl=full``), or its top-k (``kl=topk``)."""
        if not self.exact:
            return None
        if self.kl == "full":
            return TeacherSignal(hidden=scored.hidden, head=view.head)
        return TeacherSignal(topk_ids=scored.topk[0], topk_logprobs=scored.topk[1])

    def advantages(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) per-token signal: the negative sampled reverse KL (``opd``, ``kl=sampled``), the
        group-centred task reward on every completion token (``rl``), or their sum (``opd+rl``)."""
        mask = rollouts.completion_mask
        total = torch.zeros_like(mask)
        if self.distils and self.kl == "sampled":
            total = total + reverse_kl_advantages(rollouts.sampler_logprobs, rollouts.teacher_logprobs, mask,
                                                  self.kl_coef, self.gamma)
        if self.rewarded:
            centred = group_centred_rewards(rollouts.rewards, rollouts.prompt_index)
            total = total + self.reward_coef * centred[:, None] * mask
        return total

    def loss(self, student: torch.nn.Module, rollouts: Rollouts, num_tokens: float,
             signal: TeacherSignal | None = None) -> torch.Tensor:
        """The student's loss on one micro-batch, normalised by the step's completion-token count."""
        mask, vocab = rollouts.completion_mask, self.vocab_size
        if self.supervised:  # cross-entropy on the given (or the teacher's) tokens
            return -masked_token_mean(token_logprobs(student, rollouts, vocab), mask, num_tokens)
        loss = torch.zeros(())
        if self.exact:
            # the exact divergence over the vocabulary at every visited position (reverse KL: lower variance),
            # or over the teacher's top-k and a tail bucket
            if self.kl == "full":
                kl = full_divergence(student, signal.hidden, signal.head, rollouts, vocab,
                                     divergence_from_logits(self.divergence, self.beta))
            else:
                kl = topk_divergence(student, rollouts, vocab, signal.topk_ids, signal.topk_logprobs,
                                     self.divergence, self.beta)
            loss = self.kl_coef * masked_token_mean(kl, mask, num_tokens)
            if not self.rewarded:
                return loss
        # the learner's log-probs under the sampling distribution: the ratio is 1 before the update
        learner_logprobs = token_logprobs(student, rollouts, vocab, self.temperature, self.top_p)
        return loss + importance_sampling_loss(learner_logprobs, rollouts.sampler_logprobs, rollouts.advantages,
                                               mask, self.ppo_clip, num_tokens, rollouts.is_weights)
