"""Held-out evaluation: task accuracy (greedy, and by sampling), verified, and per-token reverse KL to the
teacher."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from opd.models import chat_prompt_ids
from opd.samplers.local import Noise, sample
from opd.tasks import Example, Task
from opd.templates import reply_stops


@dataclass
class EvalResult:
    accuracy: float | None  # greedy; None when the task has no verifier
    sampled_accuracy: float | None  # mean over ``samples`` draws per prompt; None without samples or verifier
    teacher_kl: float | None  # None when no teacher was given
    mean_completion_tokens: float
    examples: int = 0  # the held-out prompts evaluated (the accuracies' N)
    figures: dict = field(default_factory=dict)  # conversations: the greedy ones' turns and tool use


def completions_text(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    *,
    max_new_tokens: int,
    teacher=None,
    batch_size: int = 256,
    seed: int = 0,
    samples: int = 0,
    sample_temperature: float = 1.0,
    dialogue=None,
    noise: Noise | None = None,
) -> EvalResult:
    """Greedy accuracy on ``examples``; with ``samples`` = k > 0 also the sampled accuracy
    ``1/(N k) sum_i sum_j r(y_ij)``, y_ij ~ pi(. | x_i) at ``sample_temperature`` (the mean of k
    samples per prompt: what avg@k reports, and what the student does when it samples); with a
    teacher (a ``teachers.TeacherView``), the mean over completion tokens of ``log pi(x_t) - log
    p_teacher(x_t)`` on the student's own temperature-1 samples, the Monte Carlo estimate of the per-token
    reverse KL (the same estimator for any teacher; for one with another tokenizer, the teacher's
    log-prob of each student token's text given the text before it, ``TeacherView.score``). With ``noise``
    (``sample_noise``) the accuracies are under the same injected errors as training, each from its own
    stream fixed by ``seed`` (the KL is on the student's own samples, without them)."""
    if dialogue is not None:
        return evaluate_conversations(model, tokenizer, task, examples, dialogue, max_new_tokens=max_new_tokens,
                                      teacher=teacher, batch_size=batch_size, seed=seed, samples=samples,
                                      sample_temperature=sample_temperature)
    was_training = model.training
    model.eval()
    correct, scored, lengths = 0.0, 0, []
    sampled_correct, sampled_scored = 0.0, 0
    kl_sum, kl_tokens = 0.0, 0
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    draws = torch.Generator(device=device).manual_seed(seed + 1_000_003)  # the sampled accuracy's own stream
    greedy_noise = noise and replace(noise, seed=seed + 2_000_029)
    drawn_noise = noise and replace(noise, seed=seed + 3_000_017)
    stops = reply_stops(tokenizer)  # the EOS, and the token the template ends a reply with
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in chunk]
        greedy = sample(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                        eos_id=stops, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                        noise=greedy_noise and greedy_noise.shifted(start))
        lengths.extend(greedy.completion_mask.sum(-1).tolist())
        if chunk[0].verifiable:
            texts = completions_text(tokenizer, greedy.written_ids())
            correct += sum(task.reward(t, ex) for t, ex in zip(texts, chunk, strict=True))
            scored += len(chunk)
            if samples > 0:
                drawn = sample(model, prompts, samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                               temperature=sample_temperature, eos_id=stops,
                               pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), generator=draws,
                               noise=drawn_noise and drawn_noise.shifted(start))
                repeated = [ex for ex in chunk for _ in range(samples)]
                texts = completions_text(tokenizer, drawn.written_ids())
                sampled_correct += sum(task.reward(t, ex) for t, ex in zip(texts, repeated, strict=True))
                sampled_scored += len(repeated)
        if teacher is not None:
            sampled = sample(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                             eos_id=stops, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                             generator=generator)
            privileged = any(ex.teacher_messages for ex in chunk)  # the teacher reads its own context
            teacher_lp = teacher.score(sampled, [ex.teacher_conversation for ex in chunk],
                                       privileged=privileged).logprobs
            mask = sampled.completion_mask
            kl_sum += float(((sampled.sampler_logprobs - teacher_lp) * mask).sum())
            kl_tokens += int(mask.sum())
    model.train(was_training)
    return EvalResult(
        accuracy=correct / scored if scored else None,
        sampled_accuracy=sampled_correct / sampled_scored if sampled_scored else None,
        teacher_kl=kl_sum / max(kl_tokens, 1) if teacher is not None else None,
        mean_completion_tokens=sum(lengths) / max(len(lengths), 1),
        examples=len(examples),
    )


@torch.no_grad()
def evaluate_conversations(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
                           examples: list[Example], dialogue, *, max_new_tokens: int, teacher=None,
                           batch_size: int = 256, seed: int = 0, samples: int = 0,
                           sample_temperature: float = 1.0) -> EvalResult:
    """``evaluate`` with the environment in the loop (``dialogue``: an ``environments.Dialogue``): a prompt's
    score is its conversation's reward (the environment's, else the task's verifier on the last reply); greedy
    conversations for the accuracy and the figures (turns, tool use), sampled ones for the sampled accuracy,
    and the teacher's KL on temperature-1 conversations, graded as in training (``teachers.grade.grade``)."""
    from opd.samplers.turns import figures, pack, roll_out
    from opd.step_record import conversation_figures
    from opd.teachers.grade import grade

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    kl_generator = torch.Generator(device=device).manual_seed(seed)
    draws = torch.Generator(device=device).manual_seed(seed + 1_000_003)

    def talk(chunk: list[Example], prompts: list[list[int]], temperature: float, generator, count: int):
        def draw_turn(contexts: list[list[int]], budget: int, turn: int, stops: list[int]):
            return sample(model, contexts, max_new_tokens=budget, temperature=temperature,
                          eos_id=stops, pad_id=pad, vocab_size=vocab, generator=generator)
        rows = roll_out(draw_turn, tokenizer, dialogue.environment, dialogue.name, chunk, prompts, count,
                        dialogue.max_turns, max_new_tokens, dialogue.max_tokens)
        return rows, pack(rows, pad, device, task, dialogue.name)

    correct, lengths, sampled_correct, sampled_scored, kl_sum, kl_tokens = 0.0, [], 0.0, 0, 0.0, 0
    greedy_figures = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in chunk]
        rows, greedy = talk(chunk, prompts, 0.0, None, 1)
        correct += float(greedy.rewards.sum())
        lengths.extend(greedy.completion_mask.sum(-1).tolist())
        greedy_figures.append({"conversation": figures(rows)})
        if samples > 0:
            _, drawn = talk(chunk, prompts, sample_temperature, draws, samples)
            sampled_correct += float(drawn.rewards.sum())
            sampled_scored += drawn.rewards.shape[0]
        if teacher is not None:
            _, drawn = talk(chunk, prompts, 1.0, kl_generator, 1)
            mask = drawn.completion_mask
            kl_sum += float(((drawn.sampler_logprobs - grade(teacher, drawn).logprobs) * mask).sum())
            kl_tokens += int(mask.sum())
    model.train(was_training)
    return EvalResult(accuracy=correct / len(examples) if examples else None,
                      sampled_accuracy=sampled_correct / sampled_scored if sampled_scored else None,
                      teacher_kl=kl_sum / max(kl_tokens, 1) if teacher is not None else None,
                      mean_completion_tokens=sum(lengths) / max(len(lengths), 1), examples=len(examples),
                      figures=conversation_figures(greedy_figures))
