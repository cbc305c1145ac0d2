"""A teacher that is a program (``teachers.programmatic``): read on the same paths as a model teacher, its
log-probs enter the loss exactly as the model's would (a program that computes a model's own distribution
gives the same grades, the same exact KL and the same top-k as that model loaded as a teacher), bad programs
are refused before they reach the loss, and the regime tasks' exact teacher runs through ``opd train``."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import tiny_train_overrides
from opd.config import load_config
from opd.divergences import divergence_from_logits
from opd.errors import OpdError
from opd.rollouts import pack_pairs
from opd.scoring import completion_hidden, full_divergence
from opd.teachers import LocalTeacher, TeacherView
from opd.teachers.programmatic import ProgrammaticTeacher, load_program


class ModelAsProgram:
    """A model's own next-token log-probs, computed apart from opd's scorer (one plain forward per row)."""

    def __init__(self, model, vocab: int) -> None:
        self.model, self.vocab = model, vocab

    @torch.no_grad()
    def logprobs(self, prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, : self.vocab]
        return torch.log_softmax(logits.double(), -1).float()


def rows(tokenizer):
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10]]
    completions = [[11, 12, 13], [14, tokenizer.eos_token_id], [15, 16, 17, 18]]
    batch = pack_pairs(prompts, completions, tokenizer.pad_token_id)
    batch.prompt_index = torch.tensor([0, 0, 1])
    return batch


def test_a_program_grades_as_the_model_it_computes(tokenizer, tiny_model):
    vocab = len(tokenizer)
    model_view = TeacherView(LocalTeacher(tiny_model, vocab), tokenizer)
    program_view = TeacherView(ProgrammaticTeacher(ModelAsProgram(tiny_model, vocab), vocab, "test:Model"), tokenizer)
    assert program_view.path == "shared" and program_view.model is None
    batch = rows(tokenizer)
    messages = [[{"role": "user", "content": "x"}]] * 3
    want = model_view.score(batch, messages, hidden=True, topk=4)
    got = program_view.score(batch, messages, hidden=True, topk=4)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.topk[0], want.topk[0])
    torch.testing.assert_close(got.topk[1], want.topk[1], atol=1e-5, rtol=1e-5)
    student = type(tiny_model)(tiny_model.config)  # the exact reverse KL of a student against each: the same
    kl = divergence_from_logits("reverse_kl", 0.5)
    by_model = full_divergence(student, want.hidden, model_view.head, batch, vocab, kl)
    by_program = full_divergence(student, got.hidden, program_view.head, batch, vocab, kl)
    torch.testing.assert_close(by_program, by_model, atol=1e-5, rtol=1e-5)
    assert completion_hidden(student, batch)[0].shape[0] == got.hidden.shape[0]


class Unfloored:
    """An exact teacher without a floor: probability 0 (log-prob -inf) off its one token."""

    def __init__(self, tokenizer) -> None:
        self.vocab = len(tokenizer)

    def logprobs(self, prompt_ids, completion_ids):
        out = torch.full((len(completion_ids), self.vocab), float("-inf"))
        out[:, 7] = 0.0
        return out


class Narrow:
    def logprobs(self, prompt_ids, completion_ids):
        return torch.zeros(len(completion_ids), 3)


def test_a_program_that_is_not_finite_or_the_wrong_shape_is_stopped(tokenizer):
    batch = rows(tokenizer)
    with pytest.raises(OpdError, match="not finite .* floor the distribution"):
        ProgrammaticTeacher(Unfloored(tokenizer), len(tokenizer), "t:Unfloored").score(batch)
    with pytest.raises(OpdError, match=r"shape \(3, 3\) .* must be \(3, 300\)"):
        ProgrammaticTeacher(Narrow(), len(tokenizer), "t:Narrow").score(batch)


def test_a_program_is_made_with_what_it_accepts(tokenizer, monkeypatch, tmp_path):
    module = tmp_path / "my_teachers.py"
    module.write_text("class Both:\n    def __init__(self, tokenizer, task):\n        self.got = (tokenizer, task)\n"
                      "    def logprobs(self, p, c):\n        return None\n"
                      "class Neither:\n    def logprobs(self, p, c):\n        return None\n"
                      "VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_program("my_teachers:Both", tokenizer, "TASK").got == (tokenizer, "TASK")
    assert isinstance(load_program("my_teachers:Neither", tokenizer, "TASK"), object)
    with pytest.raises(OpdError, match="neither an object with logprobs"):
        load_program("my_teachers:VALUE", tokenizer, "TASK")
    sys.modules.pop("my_teachers", None)


def test_config_tells_a_program_from_a_model():
    assert load_config(None, ["teacher=opd.regimes.exact:Exact"]).program_teacher
    for model in ("embedded:teacher", "Qwen/Qwen3-8B", "http://127.0.0.1:8000", "/models/teacher"):
        assert not load_config(None, [f"teacher={model}"]).program_teacher


@pytest.mark.parametrize("spec", ["chain:0", "chain:4:sometimes", "chain:4:fatal:40", "paths:x", "paths:4:-1",
                                  "paths:4:nan", "chain:4:fatal:8:9"])
def test_bad_regime_task_specs_are_refused(spec):
    from opd.tasks.choose import regime_task

    with pytest.raises(OpdError, match=f"task='{spec}'"):
        regime_task(spec)


def test_the_exact_teacher_distils_a_chain_through_opd_train(tmp_path):
    """``task=chain:...`` with ``teacher=opd.regimes.exact:Exact`` end to end: the exact KL (kl=auto resolves
    to full: the program's distribution is here), finite losses, the teacher's FLOPs charged as the student's."""
    from opd.models import save_model
    from opd.regimes.vocab import char_tokenizer
    from opd.trainer import train
    from opd.zoo import make_model

    tokenizer = char_tokenizer()
    save_model(make_model(tokenizer, layers=1, width=16, seed=0), tokenizer, tmp_path / "student")
    config = load_config(None, [f"student={tmp_path / 'student'}", "teacher=opd.regimes.exact:Exact",
                                "task=chain:3:recoverable:4", "steps=3", "prompts_per_step=4", "samples_per_prompt=2",
                                "max_new_tokens=8", "eval_examples=8", "eval_every=3", "save_every=3",
                                "warmup_steps=1", f"out={tmp_path / 'run'}"])
    summary = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(r["teacher_flops"] > 0 for r in steps) and summary["teacher_kl_after"] is not None
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved"]["kl"] == "full"


def test_sft_from_a_program_teacher_needs_its_data(tmp_path, model_dirs):
    from opd.setup import open_session

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", method="sft", kl="sampled",
                                                    teacher="opd.regimes.exact:Exact"))
    with pytest.raises(OpdError, match="a program, which only grades"):
        open_session(config)
