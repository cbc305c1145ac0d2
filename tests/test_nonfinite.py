"""A run that diverges says so: a loss, gradient, update or sampling distribution made non-finite at step 3 by a
planted hook stops the run at that step, naming it and the quantity, with the last checkpoint (step 2) intact and
resumable; with ``on_nonfinite=skip`` a non-finite loss or gradient skips the step (no update, no schedule step)
and the run finishes, counting it in metrics.jsonl; the same on two ranks. A gradient norm of exactly 0 for ten
steps in a row gets one warning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import opd.trainer
from conftest import tiny_train_overrides
from opd.config import load_config
from opd.distributed import PolicyLoss
from opd.errors import NonFiniteError
from opd.samplers.local import draw
from opd.trainer import train


def plant(what: str, at: int, rank: int | None = None, setattr_=setattr) -> None:
    """Make step ``at`` (0-based) of ``train`` non-finite in ``what`` (on ``rank`` only, if given)."""
    real = opd.trainer.training_step

    def step(session, index):
        if index != at or (rank is not None and session.dist.rank != rank):
            return real(session, index)
        first = next(p for p in session.full_model.parameters() if p.requires_grad)
        trainable = session.trainable[0]
        undo = []
        if what == "sampling":  # the sampling copy's weights: its logits are NaN
            with torch.no_grad():
                first.fill_(math.nan)
        elif what == "loss":
            policy = next(m for m in session.loss_module.modules() if isinstance(m, PolicyLoss))  # inside DDP too
            forward = policy.forward
            policy.forward = lambda *args: forward(*args) * math.nan
            undo.append(lambda: delattr(policy, "forward"))
        elif what == "gradient":
            undo.append(trainable.register_hook(lambda g: g * math.inf).remove)
        elif what == "weights":  # the update itself overflows
            optimizer_step = session.optimizer.step

            def overflowing(*args, **kwargs):
                result = optimizer_step(*args, **kwargs)
                with torch.no_grad():
                    trainable.fill_(math.inf)
                return result

            session.optimizer.step = overflowing
            undo.append(lambda: delattr(session.optimizer, "step"))
        try:
            return real(session, index)
        finally:
            for action in undo:
                action()

    setattr_(opd.trainer, "training_step", step)


def steps_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("what, quantity", [("loss", "loss"), ("gradient", "gradient norm"),
                                            ("weights", "weights"), ("sampling", "sampling distribution")])
def test_a_run_that_diverges_stops_at_the_step_naming_it_and_keeps_its_last_checkpoint(model_dirs, tmp_path,
                                                                                      monkeypatch, what, quantity):
    out = tmp_path / "run"
    config = load_config(None, tiny_train_overrides(model_dirs, out))  # steps=4, save_every=2
    plant(what, at=2, setattr_=monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match=rf"^step 3: the {quantity}( and gradient norm)? (is|are) not finite .*"
                       rf"The last good checkpoint is {out}/checkpoints/step_000002\. Resume from it with a lower "
                       rf"rate: opd train --resume {out} lr=0\.001") as error:
        train(config, progress=False)
    assert error.value.quantity.startswith(quantity)
    assert [r["step"] for r in steps_of(out)] == [0, 1, 2]  # the diverged step is not logged
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    weights = load_file(out / "checkpoints" / "step_000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    monkeypatch.undo()
    train(load_config(None, tiny_train_overrides(model_dirs, out, lr=1e-3)), resume=out, progress=False)
    assert [r["step"] for r in steps_of(out)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_on_nonfinite_skip_skips_the_step_and_leaves_the_optimizer_and_schedule_as_they_were(model_dirs, tmp_path,
                                                                                            monkeypatch, what):
    out = tmp_path / "run"
    config = load_config(None, tiny_train_overrides(model_dirs, out, on_nonfinite="skip", warmup_steps=4))
    before = {}
    real = opd.trainer.update

    def watched(session, *args):  # what the skipped step leaves: weights, AdamW's moments, the schedule
        state = lambda: ([p.detach().clone() for p in session.trainable],  # noqa: E731
                         [v.clone() for s in session.optimizer.state.values() for v in s.values()],
                         session.scheduler.last_epoch)
        snapshot = state()
        result = real(session, *args)
        if result[2]:
            before["same"] = all(torch.equal(a, b) for a, b in zip(snapshot[0] + snapshot[1],
                                                                   state()[0] + state()[1], strict=True))
            before["epoch"] = (snapshot[2], state()[2])
        return result

    monkeypatch.setattr(opd.trainer, "update", watched)
    plant(what, at=2, setattr_=monkeypatch.setattr)
    summary = train(config, progress=False)
    records = steps_of(out)
    assert summary["steps"] == 4 and [r["step"] for r in records] == [0, 1, 2, 3, 4]  # it counts toward steps
    assert [r["nonfinite_skipped"] for r in records[1:]] == [0, 0, 1, 0]
    assert records[3]["grad_norm"] is None or not math.isfinite(records[3]["grad_norm"] or math.nan)
    assert before["same"] and before["epoch"][0] == before["epoch"][1]
    assert records[4]["lr"] == pytest.approx(records[3]["lr"])  # the schedule did not advance over the skip
    assert all(torch.isfinite(p).all() for p in load_file(out / "final" / "model.safetensors").values())


def test_skip_does_not_hide_a_broken_sampler_or_update(model_dirs, tmp_path, monkeypatch):
    plant("weights", at=1, setattr_=monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match="^step 2: the weights are not finite .*No checkpoint was written yet"):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "r", on_nonfinite="skip")),
              progress=False)


def test_the_sampler_never_draws_past_the_vocabulary():
    assert draw(torch.tensor([[0.0, 1.0, 0.0]])).item() == 1
    for bad in ([math.nan, 1.0, 0.0], [math.inf, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]):
        with pytest.raises(NonFiniteError, match="the sampling distribution is not finite"):
            draw(torch.tensor([bad, [0.2, 0.3, 0.5]]))


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan(tiny_model):
    from opd.losses import sampling_logprobs

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, -1.0]])
    logprobs = sampling_logprobs(logits, 5e-324)
    assert torch.isfinite(logprobs.exp()).all()
    assert logprobs[0].exp().tolist() == [0.0, 1.0, 0.0] and logprobs[1].exp().tolist() == pytest.approx([.5, .5, 0])
    assert torch.allclose(sampling_logprobs(logits, 0.7), torch.log_softmax(logits / 0.7, -1), atol=1e-6)
    tiny_nucleus = sampling_logprobs(logits, 1.0, 1.9e-158)  # 0 in float32: the top token alone, not NaN
    assert tiny_nucleus[0].exp().tolist() == [0.0, 1.0, 0.0]


def test_a_collapsed_policy_gets_one_warning(model_dirs, tmp_path, monkeypatch, capsys):
    real = opd.trainer.training_step

    def flat(session, index):
        record = real(session, index)
        return {**record, "grad_norm": 0.0} if index >= 1 else record  # steps 2.. report a zero gradient

    monkeypatch.setattr(opd.trainer, "training_step", flat)
    train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "r", steps=14, eval_every=14,
                                                 save_every=14)), progress=False)
    err = capsys.readouterr().err
    assert err.count("opd: warning: the gradient norm has been exactly 0 for 10 steps in a row (to step 11)") == 1
    assert "rewards were equal" not in err  # distillation: the reward plays no part


def test_rls_warning_names_equal_rewards(model_dirs, tmp_path, monkeypatch, capsys):
    real = opd.trainer.training_step
    monkeypatch.setattr(opd.trainer, "training_step", lambda session, index: {**real(session, index), "grad_norm": 0.0})
    train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "r", method="rl", kl="sampled", steps=10,
                                                 eval_every=10, save_every=10)), progress=False)
    assert "every group's rewards were equal" in capsys.readouterr().err


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_two_ranks_take_the_same_decision(model_dirs, tmp_path, on_nonfinite):
    """Rank 1 alone meets a non-finite value at step 3 (its sampler's weights, or its loss): both ranks stop at
    once naming it (no rank left waiting for dist_timeout), or with skip both skip the step and finish."""
    import time

    from test_distributed import WORKER, torchrun

    out = tmp_path / "run"
    what = "sampling" if on_nonfinite == "stop" else "loss"
    overrides = tiny_train_overrides(model_dirs, out, dist_timeout=90, on_nonfinite=on_nonfinite)
    started = time.monotonic()
    result = torchrun([str(WORKER), "nonfinite", "1", what, *overrides], timeout=240)
    assert time.monotonic() - started < 80  # well under dist_timeout: nobody waited for a collective
    if on_nonfinite == "stop":
        assert result.returncode != 0
        assert result.stderr.count("step 3: the sampling distribution is not finite") >= 2, result.stderr[-3000:]
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert [r.get("nonfinite_skipped") for r in steps_of(out)[1:]] == [0, 0, 1, 0]
