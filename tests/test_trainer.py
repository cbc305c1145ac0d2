import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.models import chat_prompt_ids, save_model
from opd.setup import open_session
from opd.trainer import train
from opd.zoo import make_model


def test_short_run_lowers_teacher_kl_and_writes_the_run_directory(model_dirs, tokenizer, tmp_path):
    # two random tiny models are both near uniform (KL ~0.01, all noise): a peaked teacher leaves
    # the student something to learn (KL ~1.3 nats at the start)
    teacher = make_model(tokenizer, layers=1, width=32, seed=1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(10)
    save_model(teacher, tokenizer, tmp_path / "peaked-teacher")
    out = tmp_path / "run"
    dirs = {**model_dirs, "teacher": tmp_path / "peaked-teacher"}
    config = load_config(None, tiny_train_overrides(dirs, out, steps=12, eval_every=12, kl="full",
                                                    prompts_per_step=8, samples_per_prompt=4, lr=3e-2))
    summary = train(config, progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    first_kl = sum(r["teacher_kl"] for r in records[1:4]) / 3
    last_kl = sum(r["teacher_kl"] for r in records[-3:]) / 3
    assert last_kl < 0.8 * first_kl
    assert summary["teacher_kl_after"] < summary["teacher_kl_before"]
    for name in ("config.json", "summary.json", "report.md", "curves.png", "final/config.json",
                 "checkpoints/latest.json"):
        assert (out / name).exists(), name
    assert summary["eval_examples"] == 4 and "| held-out accuracy (4 prompts) |" in (out / "report.md").read_text()
    final = load_file(out / "final" / "model.safetensors")
    start = load_file(dirs["student"] / "model.safetensors")
    last = load_file(out / "checkpoints" / "step_000012" / "model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)  # final/ is the trained student
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-3
    assert " ± " in (out / "report.md").read_text()
    for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy",
                "teacher_kl_before", "teacher_kl_after", "steps", "wall_seconds"):
        assert key in summary
    assert summary["student_flops"] == pytest.approx(sum(r["student_flops"] for r in records[1:]))
    assert summary["teacher_flops"] == records[-1]["teacher_flops_total"] > summary["student_flops"] / 10


@pytest.mark.parametrize("extra", [{}, {"kl": "full"}, {"lora_rank": 4, "lora_targets": "q_proj,v_proj"}])
def test_resume_reproduces_the_uninterrupted_run(model_dirs, tmp_path, extra, monkeypatch):
    # resumed at step 2 of a 6-step warm-up: the learning rate is still rising, so an unrestored
    # scheduler (or optimizer) shows in the lr and in every later loss
    extra = {"warmup_steps": 6, **extra}
    whole = tmp_path / "whole"
    train(load_config(None, tiny_train_overrides(model_dirs, whole, **extra)), progress=False)
    part = tmp_path / "part"
    # an interrupted run: killed during step 4, with a checkpoint at step 2 and a metrics line past it (step 3)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_train_overrides(model_dirs, part, **extra)), progress=False)
    assert [r["step"] for r in read_jsonl(part / "metrics.jsonl")] == [0, 1, 2, 3]
    assert json.loads((part / "checkpoints" / "latest.json").read_text())["step"] == 2
    monkeypatch.undo()
    resumed_config = load_config(None, tiny_train_overrides(model_dirs, part, **extra))
    train(resumed_config, resume=part, progress=False)
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl", "lr", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert [r["lr"] for r in got[1:]] == pytest.approx([1e-2 * s / 6 for s in (1, 2, 3, 4)])


def interrupt_at(monkeypatch, index: int) -> None:
    """Make ``train`` stop with a KeyboardInterrupt as it starts step ``index`` (0-based)."""
    import opd.trainer

    real = opd.trainer.training_step

    def interrupted(session, step):
        if step == index:
            raise KeyboardInterrupt
        return real(session, step)

    monkeypatch.setattr(opd.trainer, "training_step", interrupted)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_train_overrides(model_dirs, out)), progress=False)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert not (out / "checkpoints").exists()
    monkeypatch.undo()
    train(load_config(None, tiny_train_overrides(model_dirs, out)), resume=out, progress=False)
    fresh = tmp_path / "fresh"
    train(load_config(None, tiny_train_overrides(model_dirs, fresh)), progress=False)
    expected, got = read_jsonl(fresh / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    for a, b in zip(expected[1:], got[1:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_resume_refuses_a_directory_that_is_not_a_run(model_dirs, tmp_path):
    with pytest.raises(OpdError, match="not an opd run directory"):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path)), resume=tmp_path, progress=False)


def test_resume_refuses_a_disagreeing_config(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny_train_overrides(model_dirs, out, steps=2)), progress=False)
    changed = load_config(None, tiny_train_overrides(model_dirs, out, kl_coef=0.5))
    with pytest.raises(OpdError, match="kl_coef: run has 1.0, now 0.5"):
        train(changed, resume=out, progress=False)


def test_existing_run_directory_is_not_overwritten(model_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OpdError, match="already exists"):
        train(load_config(None, tiny_train_overrides(model_dirs, out)), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(model_dirs, tmp_path, monkeypatch):
    from opd.objective import Objective

    out = tmp_path / "run"
    real = Objective.loss
    calls = {"n": 0}

    def exploding(self, student, rollouts, num_tokens, signal=None):
        calls["n"] += 1
        loss = real(self, student, rollouts, num_tokens, signal)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(Objective, "loss", exploding)
    with pytest.raises(OpdError) as stopped:
        train(load_config(None, tiny_train_overrides(model_dirs, out)), progress=False)
    assert str(stopped.value) == (
        f"step 3: the loss and gradient norm are not finite (loss nan, gradient norm nan); the run stopped before "
        f"applying it. The last good checkpoint is {out / 'checkpoints' / 'step_000002'}. Resume from it with a lower "
        f"rate: opd train --resume {out} lr=0.001 (or raise warmup_steps, or lower grad_clip). on_nonfinite=skip "
        "skips such steps instead.")
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    kept = load_file(out / "checkpoints" / "step_000002" / "model.safetensors")
    assert not (out / "final").exists()
    monkeypatch.setattr(Objective, "loss", real)
    train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "two", steps=2)), progress=False)
    good = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert kept.keys() == good.keys() and all(torch.equal(kept[k], good[k]) for k in good)  # step 2's weights


def test_an_infinite_loss_with_finite_gradients_also_stops_the_run(model_dirs, tmp_path, monkeypatch):
    """The check covers the loss and the gradient norm each: here only the loss is infinite (a constant
    added to it has no gradient), at the first step, before any checkpoint."""
    from opd.objective import Objective

    real = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda *args: real(*args) + float("inf"))
    with pytest.raises(OpdError) as stopped:
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run")), progress=False)
    assert str(stopped.value).startswith("step 1: the loss is not finite (loss inf, gradient norm ")
    assert "The last good checkpoint is none. No checkpoint was written yet: start again with a lower lr" in \
        str(stopped.value)


def test_a_prompt_over_the_context_limit_is_refused_or_truncated(model_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 300, "answer": "1"}) + "\n")
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", task=prompts, eval_file=prompts, steps=1)
    with pytest.raises(OpdError, match="exceeds max_prompt_tokens"):
        train(load_config(None, overrides), progress=False)
    assert not (tmp_path / "run").exists()
    session = open_session(load_config(None, overrides + ["truncate_prompts=true"]))
    messages = [{"role": "user", "content": "word " * 300}]
    whole = chat_prompt_ids(session.tokenizer, messages)
    assert len(whole) > session.prompter.max_prompt_tokens
    budget = session.prompter.max_prompt_tokens
    assert session.prompt_ids(messages) == whole[-budget:]  # its end, which holds the question


def test_a_run_resumed_mid_schedule_reproduces_the_uninterrupted_rates_and_losses(model_dirs, tmp_path, monkeypatch):
    # 6 steps: warm-up over 2, then cosine to 0.1 x lr; stopped at step 3 (checkpoint at 2) in the decay
    extra = {"steps": 6, "warmup_steps": 2, "lr_schedule": "cosine", "min_lr_ratio": 0.1, "save_every": 2}
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(load_config(None, tiny_train_overrides(model_dirs, whole, **extra)), progress=False)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_train_overrides(model_dirs, part, **extra)), progress=False)
    monkeypatch.undo()
    train(load_config(None, tiny_train_overrides(model_dirs, part, **extra)), resume=part, progress=False)
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["lr"] for r in got[1:]] == pytest.approx([r["lr"] for r in expected[1:]], rel=1e-12)
    assert [r["loss"] for r in got[1:]] == pytest.approx([r["loss"] for r in expected[1:]], rel=1e-4, abs=1e-6)
    # warm-up (k+1)/2, then p = (k-1)/4 for k = 1..5: the factor 0.1 + 0.9 (1 + cos(pi p)) / 2
    factors = [0.5, 1.0] + [0.1 + 0.9 * (1 + math.cos(math.pi * (k - 1) / 4)) / 2 for k in range(2, 6)]
    assert [r["lr"] for r in got[1:]] == pytest.approx([1e-2 * f for f in factors], rel=1e-9)
    assert got[-1]["lr"] == pytest.approx(1e-3)  # the last update at min_lr_ratio x lr
