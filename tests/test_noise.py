"""Injected errors (``sample_noise``, ``opd.samplers.local.Noise``) and DART's data (SFT rows with ``untrained``
spans): the environment's replaced tokens are read as context, never trained on, never left out of what a reward
or the exact teacher reads; the teacher's noisy samples mark exactly their replaced characters."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from opd.config import TrainConfig
from opd.distributed import Dist
from opd.errors import OpdError
from opd.evaluation import evaluate
from opd.models import chat_prompt_ids
from opd.regimes.exact import EPSILON, Exact, ExactTeacher, noisy_completion
from opd.regimes.vocab import char_tokenizer
from opd.samplers.local import Noise, sample, task_noise
from opd.samplers.sources import DataPairs, Prompter, Rewards
from opd.tasks.choose import regime_task
from opd.tasks.jsonl import load_sft_pairs
from opd.teachers.programmatic import ProgrammaticTeacher
from opd.zoo import make_model

TASK = "chain:4:recoverable:8"


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def student(chars):
    return make_model(chars, layers=1, width=32, seed=0).eval()


def draw(model, tokenizer, noise=None, prompts=16, seed=0):
    task = regime_task(TASK)
    ids = [chat_prompt_ids(tokenizer, ex.messages) for ex in task.eval_examples(prompts)]
    return sample(model, ids, samples_per_prompt=2, max_new_tokens=16, temperature=1.0, eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                  generator=torch.Generator().manual_seed(seed), noise=noise)


def test_the_noise_tokens_are_the_tasks_states(chars):
    noise = task_noise(0.1, regime_task(TASK), chars, len(chars))
    assert [chars.decode([t]) for t in noise.tokens] == list("abcdefgh")
    assert task_noise(0.0, regime_task(TASK), chars, len(chars)) is None


def test_replaced_tokens_are_context_the_loss_never_sees(student, chars):
    clean = draw(student, chars)
    assert torch.equal(draw(student, chars, Noise(0.0, (14, 15), 5)).tokens, clean.tokens)  # rate 0: no change
    noisy = draw(student, chars, replace(task_noise(0.3, regime_task(TASK), chars, len(chars)), seed=5))
    start = (noisy.completion_mask > 0).any(0).nonzero()[0].item()
    replaced = (noisy.attention_mask[:, start:] > 0) & (noisy.completion_mask[:, start:] == 0)
    share = replaced.sum() / (noisy.attention_mask[:, start:] > 0).sum()
    assert 0.15 < share < 0.4  # about the rate (less: an EOS is never replaced)
    tokens = noisy.tokens[:, start:]
    assert set(tokens[replaced].tolist()) <= set(range(14, 22))  # states a..h
    assert not (replaced & (tokens == chars.eos_token_id)).any()
    assert (noisy.sampler_logprobs[:, start:][replaced] == 0).all()
    # the model went on from the replaced token: its recorded log-probs are a full forward's over the written row
    with torch.no_grad():
        logits = student(input_ids=noisy.tokens, attention_mask=noisy.attention_mask,
                         position_ids=(noisy.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    full = torch.log_softmax(logits[:, :-1, :len(chars)].float(), -1).gather(-1, noisy.tokens[:, 1:, None])[..., 0]
    mask = noisy.completion_mask[:, 1:] > 0
    torch.testing.assert_close(full[mask], noisy.sampler_logprobs[:, 1:][mask], atol=1e-4, rtol=1e-4)
    written, own = noisy.written_ids(), noisy.completion_ids()
    assert all(len(w) == len(o) + int(r.sum()) for w, o, r in zip(written, own, replaced, strict=True))


def test_a_reward_and_the_exact_teacher_read_the_replaced_tokens(student, chars):
    task = regime_task(TASK)
    noisy = draw(student, chars, replace(task_noise(0.5, task, chars, len(chars)), seed=1), prompts=8)
    examples = task.eval_examples(8)
    with_rewards = Rewards(chars, task).attach(noisy, examples, 2)
    texts = chars.batch_decode(noisy.written_ids(), skip_special_tokens=True)
    expected = [task.reward(t, ex) for t, ex in zip(texts, [e for e in examples for _ in range(2)], strict=True)]
    assert with_rewards.rewards.tolist() == expected
    start = (noisy.completion_mask > 0).any(0).nonzero()[0].item()
    first_replaced = [r for r in range(noisy.tokens.shape[0]) if noisy.completion_mask[r, start] == 0]
    assert first_replaced, "a row whose first token is the environment's (the case a per-row start misreads)"
    teacher = ProgrammaticTeacher(Exact(chars, task), len(chars), "exact")
    rows = teacher.rows(noisy)
    exact = ExactTeacher(task, chars, EPSILON)
    at = 0
    for r, ex in enumerate(e for e in examples for _ in range(2)):
        completion = noisy.written_ids()[r]
        own = (noisy.completion_mask[r, start:start + len(completion)] > 0).nonzero()[:, 0]
        want = exact.logprobs(ex.messages[-1]["content"], completion)[own]
        torch.testing.assert_close(rows[at:at + len(own)], want)
        at += len(own)
    assert at == rows.shape[0]


def test_evaluation_under_noise_is_seeded_and_no_noise_changes_nothing(student, chars):
    task = regime_task(TASK)
    examples = task.eval_examples(32)
    clean = evaluate(student, chars, task, examples, max_new_tokens=16)
    assert evaluate(student, chars, task, examples, max_new_tokens=16, noise=None).accuracy == clean.accuracy
    noise = task_noise(0.2, task, chars, len(chars))
    once = evaluate(student, chars, task, examples, max_new_tokens=16, noise=noise, samples=2)
    again = evaluate(student, chars, task, examples, max_new_tokens=16, noise=noise, samples=2)
    assert (once.accuracy, once.sampled_accuracy) == (again.accuracy, again.sampled_accuracy)
    assert once.mean_completion_tokens != clean.mean_completion_tokens  # the noise changed what was written


def test_the_teachers_noisy_samples_mark_exactly_their_replaced_characters():
    task = regime_task(TASK)
    rng = random.Random(0)
    replaced = 0
    for ex in task.train_examples(0, 64, 3):
        text, spans = noisy_completion(task, ex, rng, 0.2)
        marked = {s for s, _ in spans}
        assert all(e == s + 1 for s, e in spans) and all(text[s] in task.noise_tokens for s in marked)
        prompt = ex.messages[-1]["content"]
        for i, char in enumerate(text):  # every character the teacher wrote is one it gives mass to
            if i not in marked:
                assert task.next_char_probs(prompt, text[:i]).get(char, 0) > 0, (text, i)
        replaced += len(spans)
    assert replaced > 0
    clean = [noisy_completion(task, ex, random.Random(1), 0.0) for ex in task.train_examples(0, 16, 3)]
    assert all(spans == () and task.reward(text, ex) == 1.0
               for (text, spans), ex in zip(clean, task.train_examples(0, 16, 3), strict=True))


def test_untrained_spans_are_masked_in_the_sft_rows(tmp_path, chars):
    path = tmp_path / "dart.jsonl"
    path.write_text(json.dumps({"prompt": "a>b,b>a;a:3", "completion": "bxab", "untrained": [[1, 2]]}) + "\n"
                    + json.dumps({"prompt": "a>b,b>a;b:2", "completion": "ab"}) + "\n")
    pairs = load_sft_pairs(path)
    assert [p[2] for p in pairs] == [((1, 2),), ()]
    prompter = Prompter(chars, 100)
    source = DataPairs(pairs, 2, prompter, 16, 0, Rewards(chars, regime_task("chain:3:recoverable:3")),
                       Dist(), torch.device("cpu"))
    rows = source.rollouts(0)
    by_text = {}
    for r in range(2):
        ids = rows.written_ids()[r]
        start = (rows.completion_mask > 0).any(0).nonzero()[0].item()
        by_text[chars.decode(ids, skip_special_tokens=True)] = rows.completion_mask[r, start:start + len(ids)].tolist()
    assert by_text == {"bxab": [1.0, 0.0, 1.0, 1.0, 1.0], "ab": [1.0, 1.0, 1.0]}  # EOS trained


@pytest.mark.parametrize(("untrained", "says"), [("x", "a list"), ([[2, 1]], "start < end"), ([[0, 9]], "within"),
                                                 ([[1, 3], [2, 4]], "after the span"), ([[0, True]], "pairs")])
def test_bad_untrained_spans_name_the_row(tmp_path, untrained, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "abcd", "untrained": untrained}) + "\n")
    with pytest.raises(OpdError, match=f"bad.jsonl:1.*{says}"):
        load_sft_pairs(path)


@pytest.mark.parametrize("extra", [{"sampler": "http://localhost:1"}, {"tools": "calc"}])
def test_noise_outside_the_in_process_single_turn_sampler_is_refused(extra):
    with pytest.raises(OpdError, match="sample_noise"):
        TrainConfig(sample_noise=0.1, **extra).validate()
    with pytest.raises(OpdError, match="sample_noise"):
        TrainConfig(sample_noise=1.0).validate()
