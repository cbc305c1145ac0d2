"""GKD's on-policy share (``lmbda``) and sequence-level KD (``seq_kd``): which rows the student answers, where
the off-policy rows come from, that the teacher samples only when they need it, and the compute counted."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.flops import ModelShape, StepKind, mixed_step_flops, step_flops
from opd.rollouts import OffPolicyRows, concat_rollouts, pack_pairs
from opd.scoring import token_logprobs
from opd.setup import open_session


def counting_sampler(monkeypatch, session) -> list[str]:
    """Record who samples (``student`` or ``teacher``) at every call of the trainer's sampler."""
    import opd.samplers.local

    calls, real = [], opd.samplers.local.sample

    def counted(model, *args, **kwargs):
        calls.append("teacher" if model is session.teacher_view.model else "student")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(opd.samplers.local, "sample", counted)
    return calls


def test_off_policy_rows_take_the_datas_completions_and_the_teacher_never_samples(model_dirs, tmp_path, monkeypatch):

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", kl="full", lmbda=0.5))
    session = open_session(config)
    calls = counting_sampler(monkeypatch, session)
    rollouts = session.source.rollouts(0)
    assert calls == ["student"]
    examples = session.task.train_examples(0, 4, config.seed)
    on = rollouts.on_policy.tolist()
    assert on == [True] * 4 + [False] * 2  # 2 prompts x 2 samples by the student, then 1 row per reference
    tokenizer = session.tokenizer
    for row, example in zip((4, 5), examples[2:], strict=True):
        want = tokenizer.encode(example.completion, add_special_tokens=False)[: config.max_new_tokens - 1]
        assert rollouts.completion_ids()[row] == want + [tokenizer.eos_token_id]
        assert rollouts.messages[row] == example.messages
    assert rollouts.offpolicy == OffPolicyRows(1, False)


def test_seq_kd_has_the_teacher_write_the_off_policy_rows(model_dirs, tmp_path, monkeypatch):

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", kl="full", lmbda=0.5,
                                                    seq_kd="true"))
    session = open_session(config)
    calls = counting_sampler(monkeypatch, session)
    rollouts = session.source.rollouts(0)
    assert calls == ["student", "teacher"]
    assert rollouts.on_policy.tolist() == [True] * 4 + [False] * 4
    assert rollouts.offpolicy == OffPolicyRows(2, True)
    monkeypatch.undo()
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "all-on", kl="full", lmbda=1.0,
                                                    seq_kd="true"))  # nothing off-policy: no teacher samples
    session = open_session(config)
    calls = counting_sampler(monkeypatch, session)
    session.source.rollouts(1)
    assert calls == ["student"]


@pytest.mark.parametrize("kl", ["full", "topk"])
def test_the_gkd_command_runs_and_counts_the_teachers_sampling(model_dirs, tmp_path, kl):
    out = tmp_path / "run"
    overrides = tiny_train_overrides(model_dirs, out, kl=kl, divergence="jsd", beta=0.5, lmbda=0.5, seq_kd="true",
                                     teacher_topk=20)
    from opd.trainer import train

    train(load_config(None, overrides), progress=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    assert all(r["offpolicy_rows"] == 4 and r["teacher_flops"] > 0 for r in records)
    on_only = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "on", kl=kl, divergence="jsd", beta=0.5,
                                                     teacher_topk=20))
    train(on_only, progress=False)
    plain = read_jsonl(tmp_path / "on" / "metrics.jsonl")[1:]
    assert records[0]["teacher_flops"] > plain[0]["teacher_flops"]  # the teacher also sampled


def test_mixed_step_flops_add_the_off_policy_parts():
    student = ModelShape(body_params=10_000, d_model=16, d_attn=16, layers=2, vocab=300)
    teacher = ModelShape(body_params=40_000, d_model=32, d_attn=32, layers=2, vocab=300)
    prompts, completions = [10, 10, 12, 12, 9], [5, 6, 7, 8, 4]
    all_on = mixed_step_flops(student, teacher, prompts, completions, [True] * 5, 1, 1, False)
    assert all_on == step_flops(student, teacher, prompts, completions, StepKind.DISTIL, 1)
    written = mixed_step_flops(student, teacher, prompts, completions, [True, True, False, False, False], 1, 1, True)
    given = mixed_step_flops(student, teacher, prompts, completions, [True, True, False, False, False], 1, 1, False)
    assert written["student_flops"] == given["student_flops"] < all_on["student_flops"]  # no student sampling
    assert written["teacher_flops"] > given["teacher_flops"] == pytest.approx(all_on["teacher_flops"])


def test_two_parts_concatenated_keep_every_rows_values(tiny_model, tokenizer):
    first = pack_pairs([[5, 6, 7], [5, 6, 7]], [[8, 9], [10]], tokenizer.pad_token_id)
    first.sampler_logprobs = torch.rand(first.tokens.shape) * first.completion_mask
    first.messages = ["a", "a"]
    second = pack_pairs([[11, 12, 13, 14, 15]], [[16, 17, 18, 19]], tokenizer.pad_token_id)
    second.messages = ["b"]
    merged = concat_rollouts(first, second, tokenizer.pad_token_id)
    assert merged.completion_ids() == first.completion_ids() + second.completion_ids()
    starts = [int(row.nonzero()[0]) for row in merged.completion_mask]
    assert starts == [5, 5, 5]  # the layout every stage assumes: all prompts end at one column
    assert merged.prompt_index.tolist() == [0, 1, 2] and merged.messages == ["a", "a", "b"]
    both = token_logprobs(tiny_model, merged, len(tokenizer)).detach()
    apart = [token_logprobs(tiny_model, part, len(tokenizer)).detach() for part in (first, second)]
    for got, want in ((both[:2], apart[0]), (both[2:], apart[1])):
        assert torch.allclose(got[got != 0], want[want != 0], atol=1e-6)
    assert torch.equal(merged.sampler_logprobs[:2][merged.completion_mask[:2] > 0],
                       first.sampler_logprobs[first.completion_mask > 0])
    assert (merged.sampler_logprobs[2] == 0).all()


def test_off_policy_rows_need_the_teachers_distribution_and_a_teacher_that_can_write(model_dirs, tmp_path):
    with pytest.raises(OpdError, match="lmbda=0.5: the off-policy rows train on the teacher's distribution"):
        load_config(None, ["lmbda=0.5", "kl=sampled"])
    with pytest.raises(OpdError, match=r"lmbda=1.5 must be a finite number in \[0, 1\]"):
        load_config(None, ["lmbda=1.5"])
    from conftest import LiveServer

    with LiveServer(model_dirs["teacher"]) as live:
        overrides = tiny_train_overrides(model_dirs, tmp_path / "run", kl="topk", lmbda=0.5, seq_kd="true")
        with pytest.raises(OpdError, match="a teacher behind a server only scores"):
            open_session(load_config(None, overrides + [f"teacher={live.url}"]))


def test_one_sample_per_prompt_from_the_teacher_is_still_counted_as_its_sampling(model_dirs, tmp_path):
    """Prompts without a completion: the teacher writes the off-policy rows, one each here, and that is its
    sampling (counted in its FLOPs) even though one row per prompt is also what data completions give."""
    import json


    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Compute {i}+1", "answer": str(i + 1)}) + "\n"
                               for i in range(8)))
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", kl="full", lmbda=0.5,
                                                    samples_per_prompt=1, task=prompts, eval_file=prompts))
    rollouts = open_session(config).source.rollouts(0)
    assert rollouts.offpolicy == OffPolicyRows(1, True)


def test_with_lmbda_zero_every_row_is_off_policy_and_no_student_kl_is_logged(model_dirs, tmp_path, monkeypatch):
    from opd.trainer import training_step

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", kl="full", lmbda=0.0))
    session = open_session(config)
    calls = counting_sampler(monkeypatch, session)
    rollouts = session.source.rollouts(0)
    assert calls == []  # nobody samples: every prompt has a reference completion
    on = rollouts.on_policy
    assert on.dtype == torch.bool and on.tolist() == [False] * rollouts.tokens.shape[0] == [False] * 4
    record = training_step(session, 0)
    assert record["offpolicy_rows"] == 4 and record["teacher_kl"] is None
