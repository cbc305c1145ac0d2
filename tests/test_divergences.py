"""GKD's divergences against brute force on a tiny vocabulary, in float64: values by an explicit sum over the
vocabulary, gradients by autograd through the definition (independent of the written-out backward), on
flat, peaked and near-zero distributions, and the beta -> 0 / 1 limits of the generalized JSD."""

from __future__ import annotations

import math

import pytest
import torch

from opd.divergences import divergence_from_logits, forward_kl_from_logits, jsd_from_logits
from opd.losses import reverse_kl_from_logits

CASES = {
    "flat": (torch.tensor([0.1, -0.2, 0.05, 0.0, 0.3]), torch.tensor([0.0, 0.1, -0.1, 0.2, -0.3])),
    "peaked": (torch.tensor([9.0, -3.0, 0.5, -8.0, 1.0]), torch.tensor([-6.0, 12.0, 0.0, -2.0, 3.0])),
    "near_zero": (torch.tensor([30.0, -30.0, 0.0, -25.0, 29.0]), torch.tensor([-40.0, 35.0, 34.0, -1.0, 0.0])),
}


def brute(kind: str, logits: list[float], teacher_logits: list[float], beta: float = 0.5) -> float:
    """The definition, one vocabulary entry at a time, in Python floats."""
    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    s, t = softmax(logits), softmax(teacher_logits)

    def kl(p, q):
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)

    if kind == "reverse_kl":
        return kl(s, t)
    if kind == "forward_kl":
        return kl(t, s)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t, strict=True)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def by_definition(kind: str, logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    s, t = torch.softmax(logits, -1), teacher_logprobs.exp()
    if kind == "reverse_kl":
        return (s * (s.log() - t.log())).sum(-1)
    if kind == "forward_kl":
        return (t * (t.log() - s.log())).sum(-1)
    m = beta * t + (1 - beta) * s
    return beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(-1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.5), ("jsd", 0.1),
                                        ("jsd", 0.9)])
def test_each_divergence_and_its_gradient_against_the_definition(case, kind, beta):
    student_logits, teacher_logits = (x.double() for x in CASES[case])
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    logits = student_logits.clone().requires_grad_(True)
    value = divergence_from_logits(kind, beta)(logits[None], teacher_lp[None])[0]
    assert value.item() == pytest.approx(brute(kind, student_logits.tolist(), teacher_logits.tolist(), beta),
                                         rel=1e-9, abs=1e-12)
    value.backward()
    reference = student_logits.clone().requires_grad_(True)
    by_definition(kind, reference, teacher_lp, beta).backward()
    assert torch.allclose(logits.grad, reference.grad, rtol=1e-8, atol=1e-12), (logits.grad, reference.grad)


def test_the_gradients_agree_with_finite_differences():
    student_logits, teacher_logits = (x.double() for x in CASES["peaked"])
    teacher_lp = torch.log_softmax(teacher_logits, -1)[None]
    for fn in (forward_kl_from_logits, lambda z, t: jsd_from_logits(z, t, 0.3)):
        logits = student_logits[None].clone().requires_grad_(True)
        fn(logits, teacher_lp).sum().backward()
        for j in range(5):
            step = torch.zeros_like(student_logits[None])
            step[0, j] = 1e-6
            numeric = (fn(student_logits[None] + step, teacher_lp) - fn(student_logits[None] - step, teacher_lp)) / 2e-6
            assert logits.grad[0, j].item() == pytest.approx(numeric.item(), abs=1e-7)


def test_the_generalized_jsd_tends_to_beta_times_forward_kl_and_to_the_reverse_kl():
    """Near beta = 0 the JSD is beta KL(t || s) (its derivative in beta there), near 1 it is (1 - beta) KL(s || t):
    TRL's and ms-swift's convention names the ends after those directions."""
    student_logits, teacher_logits = (x.double()[None] for x in CASES["flat"])
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    forward = forward_kl_from_logits(student_logits, teacher_lp).item()
    reverse = reverse_kl_from_logits(student_logits, teacher_lp).item()
    for eps in (1e-3, 1e-4):
        assert jsd_from_logits(student_logits, teacher_lp, eps).item() / eps == pytest.approx(forward, rel=10 * eps)
        assert jsd_from_logits(student_logits, teacher_lp, 1 - eps).item() / eps == pytest.approx(reverse, rel=10 * eps)
    assert jsd_from_logits(student_logits, teacher_lp, 0.0).item() == pytest.approx(forward)
    assert jsd_from_logits(student_logits, teacher_lp, 1.0).item() == pytest.approx(reverse)


def test_equal_distributions_give_zero_and_no_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    teacher_lp = torch.log_softmax(logits.detach(), -1)
    for kind, beta in (("forward_kl", 0), ("jsd", 0.5), ("reverse_kl", 1)):
        logits.grad = None
        value = divergence_from_logits(kind, beta)(logits, teacher_lp).sum()
        value.backward()
        assert abs(value.item()) < 1e-12 and logits.grad.abs().max() < 1e-12


def test_jsd_at_beta_one_trains_exactly_like_todays_exact_reverse_kl(model_dirs, tmp_path):
    """The seed command's setting (``--beta 1``, on-policy): step for step the same run as ``kl=full``."""
    from conftest import read_jsonl, tiny_train_overrides
    from opd.config import load_config
    from opd.trainer import train

    runs = {}
    for name, extra in (("today", {}), ("jsd1", {"divergence": "jsd", "beta": 1.0, "lmbda": 1.0}),
                        ("jsd05", {"divergence": "jsd", "beta": 0.5})):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / name, kl="full", **extra)), progress=False)
        runs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    for a, b in zip(runs["today"], runs["jsd1"], strict=True):
        assert {k: v for k, v in a.items() if "seconds" not in k and k != "elapsed"} == \
               {k: v for k, v in b.items() if "seconds" not in k and k != "elapsed"}
    assert runs["jsd05"][1]["loss"] != runs["today"][1]["loss"]  # another objective


def test_divergences_other_than_the_reverse_kl_need_the_whole_distribution():
    from opd.config import load_config
    from opd.errors import OpdError

    with pytest.raises(OpdError, match="divergence=forward_kl compares the two distributions .* needs kl=full"):
        load_config(None, ["divergence=forward_kl", "kl=sampled"])
    with pytest.raises(OpdError, match=r"beta=1.5 must be a finite number in \[0, 1\]"):
        load_config(None, ["divergence=jsd", "beta=1.5"])


@pytest.mark.parametrize("kind, beta", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.4)])
def test_topk_with_the_whole_vocabulary_is_the_exact_divergence_and_a_lower_bound_below(kind, beta):
    from opd.divergences import topk_divergence_from_logits

    generator = torch.Generator().manual_seed(0)
    student_logits = (3 * torch.randn(4, 7, generator=generator, dtype=torch.float64))
    teacher_lp = torch.log_softmax(3 * torch.randn(4, 7, generator=generator, dtype=torch.float64), -1)
    exact_logits = student_logits.clone().requires_grad_(True)
    exact = divergence_from_logits(kind, beta)(exact_logits, teacher_lp)
    exact.sum().backward()
    previous = torch.zeros(4, dtype=torch.float64)
    for k in range(1, 8):
        top = teacher_lp.topk(k, dim=-1)
        logits = student_logits.clone().requires_grad_(True)
        value = topk_divergence_from_logits(logits, top.indices, top.values, kind, beta)
        assert (value <= exact + 1e-9).all() and (value >= previous - 1e-9).all()  # refinements only add
        previous = value.detach()
    assert torch.allclose(value, exact, atol=1e-9)
    value.sum().backward()
    assert torch.allclose(logits.grad, exact_logits.grad, atol=1e-9)


def test_topk_through_a_server_equals_topk_in_process(model_dirs, tokenizer):
    from conftest import LiveServer, rollouts_of
    from opd.teachers.local import LocalTeacher
    from opd.teachers.remote import RemoteTeacher
    from opd.teachers.view import TeacherView

    rollouts = rollouts_of(tokenizer)
    messages = [[{"role": "user", "content": "x"}]] * rollouts.tokens.shape[0]
    with LiveServer(model_dirs["teacher"]) as live:
        with RemoteTeacher(live.url, rows_per_request=2) as remote:
            remote.connect(tokenizer, 200)
            served = TeacherView(remote, tokenizer).score(rollouts, messages, topk=20)
        local = TeacherView(LocalTeacher(live.model, len(tokenizer)), tokenizer).score(rollouts, messages, topk=20)
    assert torch.equal(served.topk[0], local.topk[0])
    assert (served.topk[1] - local.topk[1]).abs().max() <= 1e-5
    assert (served.logprobs - local.logprobs).abs().max() <= 1e-5
    assert served.topk[0].shape == (int(rollouts.completion_mask.sum()), 20)


def test_topk_over_the_whole_vocabulary_trains_like_the_exact_kl(model_dirs, tmp_path, tokenizer):
    from conftest import read_jsonl, tiny_train_overrides
    from opd.config import load_config
    from opd.trainer import train

    runs = {}
    for name, extra in (("full", {"kl": "full"}), ("topk", {"kl": "topk", "teacher_topk": len(tokenizer)})):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / name, **extra)), progress=False)
        runs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    for a, b in zip(runs["full"], runs["topk"], strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_training_with_the_top_k_from_a_server_matches_the_top_k_in_process(model_dirs, tmp_path):
    from conftest import LiveServer, read_jsonl, tiny_train_overrides
    from opd.config import load_config
    from opd.trainer import train

    overrides = {"kl": "topk", "teacher_topk": 20, "divergence": "jsd", "beta": 0.3}
    train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "local", **overrides)), progress=False)
    with LiveServer(model_dirs["teacher"]) as live:
        remote = tiny_train_overrides(model_dirs, tmp_path / "remote", **overrides) + [f"teacher={live.url}"]
        train(load_config(None, remote), progress=False)
    for a, b in zip(read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(tmp_path / "remote" / "metrics.jsonl"),
                    strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_kl_auto_is_the_exact_kl_in_process_the_top_k_from_a_server_and_sampled_across_tokenizers(
        model_dirs, cross_dirs, tmp_path):
    from conftest import LiveServer, tiny_train_overrides
    from opd.config import load_config
    from opd.setup import open_session

    def resolved(dirs, name, *extra) -> str:
        overrides = [o for o in tiny_train_overrides(dirs, tmp_path / name) if not o.startswith("kl=")]
        session = open_session(load_config(None, overrides + list(extra)))
        session.close()
        return session.config.kl

    assert resolved(model_dirs, "local") == "full"
    assert resolved(cross_dirs, "cross") == "sampled"
    with LiveServer(model_dirs["teacher"]) as live:
        assert resolved(model_dirs, "remote", f"teacher={live.url}") == "topk"
    assert resolved(model_dirs, "several", f"teachers=b={model_dirs['teacher']}") == "topk"


def test_the_readmes_real_model_command_says_what_kl_auto_would_choose():
    # Qwen3-1.7B and Qwen3-8B share one tokenizer and the teacher is in process: what the test above
    # resolves for model_dirs ("full"); the docs must say so next to the command that names kl=sampled
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "getting-started.md").read_text()
    section = page[page.index("## Running on real models"):page.index("## The embedded default")]
    assert "student=Qwen/Qwen3-1.7B teacher=Qwen/Qwen3-8B" in section and "kl=sampled" in section
    assert "Left out, `kl` is `auto`, which for\nthis pair (one tokenizer, the teacher in process) resolves to " \
           "`kl=full`" in section
