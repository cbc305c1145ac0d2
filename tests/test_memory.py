"""What keeps long sequences in memory (gradient checkpointing; #29) changes the memory, never the
gradient: each setting against the same update with it off, for every objective."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_train_overrides, unequal_batch
from opd.config import load_config
from opd.setup import open_session

OBJECTIVES = {"sampled": {"kl": "sampled"}, "full": {"kl": "full"}, "topk": {"kl": "topk", "teacher_topk": 5},
              "jsd": {"kl": "full", "divergence": "jsd", "beta": 0.3}, "sft": {"method": "sft"},
              "opd+rl": {"method": "opd+rl", "kl": "sampled"}, "lora": {"kl": "full", "lora_rank": 4}}


def gradient(session, batch, calls: list[int] | None = None) -> torch.Tensor:
    """The loss's gradient on ``batch`` through the trainer's own pieces: the teacher's part the objective
    asks for, the advantages, and the wrapped loss module (what ``update`` backpropagates). ``calls``: a
    counter that is reset between the forward and the backward pass."""
    objective, view, signal = session.objective, session.teacher_view, None
    asked = objective.grading
    if asked is not None:
        messages = [[{"role": "user", "content": "unused on the shared path"}]] * batch.tokens.shape[0]
        graded = view.score(batch, messages, hidden=asked.hidden, topk=5 if asked.topk else 0)
        batch.teacher_logprobs = graded.logprobs
        signal = objective.signal(graded, view)
    batch.advantages = objective.advantages(batch)
    session.student.train()
    session.student.zero_grad(set_to_none=True)
    loss = session.loss_module(batch, batch.num_completion_tokens, signal)
    if calls is not None:
        calls[0] = 0  # from here on, the backward pass's forwards only
    loss.backward()
    return torch.cat([p.grad.flatten() for p in session.trainable])


def layer_forwards(session) -> list[int]:
    """A counter of the first decoder layer's MLP forward calls, inside the checkpointed layer (a forward
    hook would not see the recompute: torch runs it without hooks)."""
    calls = [0]
    mlp = session.student.get_decoder().layers[0].mlp
    real = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    mlp.forward = counted
    return calls


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradient(peaked_teacher, tmp_path, name):
    grads, forwards = {}, {}
    for on in (False, True):
        config = load_config(None, tiny_train_overrides(peaked_teacher, tmp_path / str(on), samples_per_prompt=3,
                                                        gradient_checkpointing=str(on).lower(), **OBJECTIVES[name]))
        session = open_session(config)
        batch = unequal_batch(session)
        calls = layer_forwards(session)
        grads[on] = gradient(session, batch, calls)
        forwards[on] = calls[0]
        session.close()
    assert grads[False].abs().max() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert forwards == {False: 0, True: 1}  # checkpointed, the layer runs again in the backward pass


def test_sampling_a_few_rows_at_a_time_keeps_each_rows_prompt_group_and_log_probs(model_dirs, tmp_path, monkeypatch):
    import opd.samplers.local
    from opd.scoring import token_logprobs

    calls = []
    real = opd.samplers.local.sample
    monkeypatch.setattr(opd.samplers.local, "sample",
                        lambda model, prompts, **kw: calls.append(len(prompts) * kw["samples_per_prompt"])
                        or real(model, prompts, **kw))
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", prompts_per_step=5,
                                                    samples_per_prompt=3, sample_batch=7, kl="sampled"))
    session = open_session(config)
    rollouts = session.source.rollouts(0)
    assert calls == [6, 6, 3]  # 2 prompts x 3 samples fit in 7 rows; the last call holds the fifth prompt
    assert torch.equal(rollouts.prompt_index, torch.arange(5).repeat_interleave(3))
    examples = session.source.prompts.all(0)
    for row in range(15):  # each row's prompt is its own group's, read off its tokens
        prompt = rollouts.tokens[row][(rollouts.attention_mask[row] > 0) & (rollouts.completion_mask[row] == 0)]
        assert prompt.tolist() == session.prompt_ids(examples[row // 3].messages)
        assert rollouts.messages[row] == examples[row // 3].messages
    with torch.no_grad():  # the recorded log-probs are the model's at temperature 1, whatever call drew them
        own = token_logprobs(session.full_model, rollouts, session.vocab_size)
    torch.testing.assert_close(own * rollouts.completion_mask, rollouts.sampler_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_token_budget_micro_batches_keep_the_whole_batchs_update(peaked_teacher, tmp_path, name):
    """Rows regrouped by length into micro-batches of at most 80 positions (one of them holds rows of two
    prompts out of order), their padding columns cut: the update (SGD at rate 1, so the weight change is
    the gradient) is the one-batch update."""
    from conftest import use_sgd
    from opd.trainer import token_budget, update

    deltas, counts = {}, {}
    for budget, checkpointed in ((0, False), (80, False), (81, True)):  # and both settings at once
        config = load_config(None, tiny_train_overrides(peaked_teacher, tmp_path / str(budget), samples_per_prompt=3,
                                                        grad_clip=1e9, max_tokens_per_micro_batch=budget,
                                                        gradient_checkpointing=str(checkpointed).lower(),
                                                        **OBJECTIVES[name]))
        session = open_session(config)
        batch = unequal_batch(session)
        gradient(session, batch)  # the teacher's part and the advantages, as the step computes them
        signal = None
        if session.objective.exact:
            asked = session.objective.grading
            messages = [[{"role": "user", "content": "x"}]] * batch.tokens.shape[0]
            graded = session.teacher_view.score(batch, messages, hidden=asked.hidden, topk=5 if asked.topk else 0)
            signal = session.objective.signal(graded, session.teacher_view)
        before = [p.detach().clone() for p in session.trainable]
        use_sgd(session, lr=1.0)
        batches, record = token_budget(session, batch)
        counts[budget] = len(batches) if batches else 1
        update(session, batch, signal, batch.num_completion_tokens, 0, batches)
        deltas[budget] = torch.cat([(p.detach() - b).flatten() for p, b in zip(session.trainable, before, strict=True)])
        if budget:
            assert record["micro_batches"] == len(batches) and 0 <= record["padding_share"] < 1
            assert any(b != list(range(b[0], b[0] + len(b))) for b in batches)  # rows out of their order
        session.close()
    assert counts[80] > 2 and deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[80], deltas[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(deltas[81], deltas[0], rtol=1e-5, atol=1e-7)


def test_the_plan_holds_the_budget_keeps_prompts_together_and_splits_evenly():
    from opd.micro_batches import cost, padding_share, plan, split_to

    prompt_index = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    prompts = [5, 5, 5, 9, 9, 9, 2, 2, 2]
    completions = [1, 7, 3, 2, 2, 2, 12, 1, 1]
    batches = plan(prompt_index, prompts, completions, budget=30)
    assert sorted(r for b in batches for r in b) == list(range(9))  # every row once
    assert all(cost(b, prompts, completions) <= 30 for b in batches if len(b) > 1)
    flat = [r for b in batches for r in b]
    for group in (0, 1, 2):  # a prompt's samples stay adjacent (their prompt runs once)
        where = [i for i, r in enumerate(flat) if prompt_index[r] == group]
        assert where == list(range(where[0], where[0] + 3))
    assert [prompt_index[r] for r in flat[:3]] == [2, 2, 2]  # the longest prompt + completion first
    assert plan([0], [50], [50], budget=10) == [[0]]  # a row over the budget is a micro-batch of its own
    evened = split_to(batches, len(batches) + 2)
    assert len(evened) == len(batches) + 2 and sorted(r for b in evened for r in b) == list(range(9))
    assert padding_share([[0, 1]], prompts, completions) == pytest.approx(1 - (6 + 12) / (2 * (5 + 7)))
    with pytest.raises(ValueError):
        split_to([[0], [1]], 3)


def test_a_prompt_of_exactly_the_budget_is_kept_whole_and_one_token_more_is_refused(tokenizer):
    from opd.errors import OpdError
    from opd.models import chat_prompt_ids
    from opd.samplers.sources import Prompter

    messages = [{"role": "user", "content": "Compute 1+2"}]
    ids = chat_prompt_ids(tokenizer, messages)
    assert Prompter(tokenizer, len(ids)).ids(messages) == ids
    with pytest.raises(OpdError, match=f"a prompt of {len(ids)} tokens exceeds max_prompt_tokens={len(ids) - 1}"):
        Prompter(tokenizer, len(ids) - 1).ids(messages)
    assert Prompter(tokenizer, len(ids) - 1, truncate=True).ids(messages) == ids[1:]


@pytest.mark.parametrize("name,extra", [("full", {"kl": "full"}), ("topk", {"kl": "topk", "teacher_topk": 5}),
                                        ("aligned", {"kl": "sampled"})])
def test_the_teacher_grades_a_few_rows_at_a_time_as_it_grades_them_all(model_dirs, cross_dirs, tmp_path, name,
                                                                     extra):
    """sample_batch=3 rows: the teacher's forwards hold 3 rows' activations; the log-probs, hidden states, top-k
    and (another tokenizer: the aligned path) the chunks numbered across the batch equal one whole grading."""
    from dataclasses import replace

    from opd.objective import Grading
    from opd.teachers.grade import grade

    dirs = cross_dirs if name == "aligned" else model_dirs
    config = load_config(None, tiny_train_overrides(dirs, tmp_path / "run", prompts_per_step=4, samples_per_prompt=2,
                                                    **extra))
    session = open_session(config)
    batch = unequal_batch(session)
    examples = session.task.train_examples(0, 4, 0)
    batch.messages = [ex.messages for ex in examples for _ in range(2)]
    kind = Grading(hidden=name == "full", topk=5 if name == "topk" else 0)
    calls = []
    real = session.teacher_view.teacher.score_with_hidden
    session.teacher_view.teacher.score_with_hidden = lambda r: calls.append(r.tokens.shape[0]) or real(r)
    whole, parts = grade(session.teacher_view, batch, kind), grade(session.teacher_view, batch, replace(kind, rows=3))
    assert calls[1:] == [3, 3, 2]  # 8 rows: one forward of 8, then three of at most 3
    torch.testing.assert_close(parts.logprobs, whole.logprobs, atol=1e-5, rtol=1e-5)
    for field in ("hidden", "chunks"):
        if getattr(whole, field) is not None:
            torch.testing.assert_close(getattr(parts, field), getattr(whole, field), atol=1e-5, rtol=1e-5)
    if whole.topk is not None:
        assert torch.equal(parts.topk[0], whole.topk[0])
        torch.testing.assert_close(parts.topk[1], whole.topk[1], atol=1e-5, rtol=1e-5)
    assert (parts.chunk_count, parts.teacher_prompt_lengths) == (whole.chunk_count, whole.teacher_prompt_lengths)
    if name == "aligned":
        assert whole.chunks is not None and int(whole.chunks.max()) + 1 == whole.chunk_count > 8


def test_a_training_step_grades_its_rows_sample_batch_at_a_time(model_dirs, tmp_path):
    from opd.trainer import training_step

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", prompts_per_step=4,
                                                    samples_per_prompt=2, sample_batch=5, kl="full"))
    session = open_session(config)
    calls = []
    real = session.teacher_view.teacher.score_with_hidden
    session.teacher_view.teacher.score_with_hidden = lambda r: calls.append(r.tokens.shape[0]) or real(r)
    training_step(session, 0)
    assert calls == [4, 4]  # whole prompts: 2 x 2 samples in 5 rows


def test_the_trainers_own_log_probs_of_served_rows_are_the_same_a_few_rows_at_a_time(model_dirs, tmp_path):
    """With a rollout server the trainer re-reads the rows without gradients (``reweight``); sample_batch rows
    at a time gives the same log-probs, importance weights and mismatch sums."""
    from opd.samplers.service import reweight

    session = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", prompts_per_step=4,
                                                                   samples_per_prompt=2)))
    results = []
    for rows in (0, 3):
        batch = unequal_batch(session)
        batch.engine_logprobs = (batch.sampler_logprobs + 0.1 * torch.linspace(-1, 1, batch.tokens.shape[1])) \
            * batch.completion_mask
        results.append((reweight(session.full_model, batch, session.vocab_size, 1.0, 1.0, 2.0, rows), batch))
    (whole, a), (parts, b) = results
    torch.testing.assert_close(b.sampler_logprobs, a.sampler_logprobs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.is_weights, a.is_weights, atol=1e-6, rtol=1e-6)
    assert parts == pytest.approx(whole, rel=1e-5)
