"""Every ``opd experiment`` command at tiny sizes, through the CLI's own ``main``, with ``kl`` left to the runs
(auto, as a user who never names it): interrupted in the middle of an arm and run again (it resumes and ends),
then run a third time into the same ``--out`` (everything reused: not one training step)."""

from __future__ import annotations

import json
import shutil

import pytest

import opd.trainer
from conftest import tiny_train_overrides
from opd.cli import main

EXPERIMENTS = {
    "reasoning": ["--steps", "2", "--eval-every", "1", "--validation-examples", "4", "--lr-sft", "1e-3",
                  "--lr-rl", "1e-3", "--lr-opd", "1e-3", "--sft-sizes", "8,16", "--sft-epochs", "1", "--sft-batch",
                  "4", "--sft-rates", "1e-3", "--rl-budget-factor", "2.5"],
    "dense-vs-sparse": ["--rl-steps", "2", "--opd-steps", "2", "--rl-eval-every", "1", "--opd-eval-every", "1",
                        "--reuse-steps", "2", "--reuse-samples", "4"],
    "data-reuse": ["--steps", "2", "--samples", "4", "--eval-every", "1"],
    "lora": ["--rank", "2", "--steps", "2", "--eval-every", "1", "--lora-lr-scale", "1,3"],
    "tools": ["--steps", "2", "--prompts", "2", "--samples", "1", "--eval-every", "1", "--eval-examples", "4",
              "--sft-start", "1"],
    "personalization": ["--midtrain-steps", "2", "--distill-steps", "2", "--segments", "2"],
}
# the tiny runs' fields, less what each experiment sets itself; kl is left to auto
DROPPED = ("out=", "steps=", "eval_every=", "save_every=", "lr=", "kl=")


@pytest.fixture(scope="module")
def assistant_zoo(model_dirs, tmp_path_factory):
    """A tiny assistant with its personalization data (the embedded one's recipe at toy sizes)."""
    from opd.personalization.assistant import AssistantConfig, build_assistant

    zoo = tmp_path_factory.mktemp("zoo")
    shutil.copytree(model_dirs["teacher"], zoo / "teacher")
    build_assistant(zoo, AssistantConfig(layers=1, width=16, steps=3, train_instructions=40, eval_instructions=8,
                                         plain_chats=20, staff=2, max_new_tokens=8))
    return zoo


def arguments(name: str, model_dirs, assistant_zoo) -> list[str]:
    if name == "tools":  # its own models (the embedded student and tool teacher)
        return ["eval_examples=4", "warmup_steps=1"]
    if name == "personalization":
        return ["--assistant", str(assistant_zoo / "assistant"), "--data", str(assistant_zoo / "personalization"),
                "prompts_per_step=4", "samples_per_prompt=2", "warmup_steps=1", "doc_tokens=16", "eval_examples=4",
                "max_new_tokens=8"]
    drop = DROPPED + (("prompts_per_step=", "samples_per_prompt=") if name in ("data-reuse", "dense-vs-sparse",
                                                                              "lora") else ())
    return [o for o in tiny_train_overrides(model_dirs, "unused") if not o.startswith(drop)]


class Steps:
    """Counts training steps; interrupts (KeyboardInterrupt) the second run at its second step, once."""

    def __init__(self, monkeypatch, interrupt: bool):
        self.calls, self.sessions, self.interrupted = 0, [], not interrupt
        real = opd.trainer.training_step

        def counted(session, step):
            if id(session) not in self.sessions:
                self.sessions.append(id(session))
            if not self.interrupted and len(self.sessions) == 2 and step >= 1:
                self.interrupted = True
                raise KeyboardInterrupt
            self.calls += 1
            return real(session, step)

        monkeypatch.setattr(opd.trainer, "training_step", counted)


def metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_an_experiment_resumes_after_an_interruption_and_reuses_its_runs(name, model_dirs, assistant_zoo, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "exp"
    argv = ["experiment", name, "--quiet", "--out", str(out), *EXPERIMENTS[name],
            *arguments(name, model_dirs, assistant_zoo)]
    first = Steps(monkeypatch, interrupt=True)
    assert main(argv) == 130  # interrupted in the middle of its second run
    assert first.interrupted and first.calls >= 2
    second = Steps(monkeypatch, interrupt=False)
    assert main(argv) == 0, capsys.readouterr().err
    assert second.calls >= 1
    for run_dir in (out / "runs").rglob("metrics.jsonl"):  # every run resumed or started over, none twice
        steps = metric_steps(run_dir.parent)
        assert steps == sorted(set(steps)) and steps[0] == 0, (run_dir, steps)
    summary = json.loads((out / "summary.json").read_text())
    third = Steps(monkeypatch, interrupt=False)
    assert main(argv) == 0, capsys.readouterr().err
    assert third.calls == 0  # everything reused, nothing retrained
    again = json.loads((out / "summary.json").read_text())
    drop = ("wall_seconds",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in summary.items() if k not in drop}
    assert "wall time" in capsys.readouterr().out
