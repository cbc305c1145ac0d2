"""Several teachers: prompts routed by their "teacher" field to the teachers that teachers= names; each
teacher scores only its rows, each one's KL, accuracy and compute are logged, and the student learns from
both."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.models import load_model
from opd.setup import open_session
from opd.teachers.local import LocalTeacher
from opd.teachers.routed import parse_teachers
from opd.teachers.view import TeacherView
from opd.trainer import train


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tokenizer, model_dirs):
    """Two teachers that each know one task: ``a`` answers every prompt "Answer: 1", ``b`` "Answer: 2" (a few
    SFT steps each), and prompts of two kinds, each with its teacher's answer as the reference completion."""
    from opd.models import chat_prompt_ids, save_model
    from opd.zoo import make_model, train_sft

    root = tmp_path_factory.mktemp("two")
    prompts = {"a": [f"Compute {i}+{i % 5}" for i in range(12)], "b": [f"Say hello to {i} friends" for i in range(12)]}
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts["a"] + prompts["b"]]
    dirs = {}
    for name, answer, seed in (("a", 1, 11), ("b", 2, 12)):
        teacher = make_model(tokenizer, layers=1, width=32, seed=seed)
        said = tokenizer.encode(f"Answer: {answer}", add_special_tokens=False) + [tokenizer.eos_token_id]
        train_sft(teacher, tokenizer, lambda _, said=said: (ids, [said] * len(ids)), 60, 1e-2, 0.0, f"teacher {name}")
        save_model(teacher, tokenizer, root / name)
        dirs[name] = root / name
    rows = {name: [{"prompt": p, "answer": answer, "completion": f"Answer: {answer}", "teacher": name}
                   for p in prompts[name]] for name, answer in (("a", "1"), ("b", "2"))}
    order = [row for pair in zip(rows["a"], rows["b"], strict=True) for row in pair]  # every step mixes both
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order[:8]))
    return {**dirs, "train": root / "train.jsonl", "eval": root / "eval.jsonl", "rows": order}


def overrides(model_dirs, two_teachers, out, **extra) -> list[str]:
    values = {"kl": "topk", "teacher_topk": 20, "task": two_teachers["train"], "eval_file": two_teachers["eval"],
              "teachers": f"a={two_teachers['a']},b={two_teachers['b']}", **extra}
    return tiny_train_overrides(model_dirs, out, **values)


def test_each_row_is_scored_by_the_teacher_its_prompt_names(model_dirs, two_teachers, tmp_path, tokenizer):
    session = open_session(load_config(None, overrides(model_dirs, two_teachers, tmp_path / "run")))
    rollouts = session.source.rollouts(0)
    names = rollouts.teacher_names
    assert set(names) == {"a", "b"}
    routed = session.teacher_view.score(rollouts, rollouts.messages, topk=20)
    counts = (rollouts.completion_mask[:, 1:] > 0).sum(-1).tolist()
    offsets = [sum(counts[:row]) for row in range(len(counts) + 1)]
    for name in ("a", "b"):
        alone = TeacherView(LocalTeacher(load_model(two_teachers[name], torch.device("cpu"), torch.float32),
                                         len(tokenizer)), tokenizer)
        rows = [i for i, n in enumerate(names) if n == name]
        own = alone.score(rollouts.select(torch.tensor(rows)), [rollouts.messages[i] for i in rows], topk=20)
        assert torch.allclose(routed.logprobs[rows], own.logprobs, atol=1e-6)
        positions = torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in rows])
        assert torch.equal(routed.topk[0][positions], own.topk[0])
        assert torch.allclose(routed.topk[1][positions], own.topk[1], atol=1e-6)


def exact_kl_on_references(student_dir, teacher_dir, tokenizer, rows: list[dict]) -> float:
    """The mean exact reverse KL between a student and a teacher along the rows' reference completions."""
    from opd.models import chat_prompt_ids
    from opd.rollouts import pack_pairs
    from opd.scoring import full_divergence

    rollouts = pack_pairs([chat_prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows],
                          [tokenizer.encode(r["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
                           for r in rows], tokenizer.pad_token_id)
    teacher = LocalTeacher(load_model(teacher_dir, torch.device("cpu"), torch.float32), len(tokenizer))
    student = load_model(student_dir, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        _, hidden = teacher.score_with_hidden(rollouts)
        kl = full_divergence(student, hidden, teacher.head, rollouts, len(tokenizer))
    return float(kl.sum() / rollouts.completion_mask.sum())


def test_the_student_learns_from_both_teachers_and_each_is_reported(model_dirs, two_teachers, tmp_path, tokenizer):
    """Mixed batches, each row scored by its own teacher: after training the student is closer to each teacher
    on that teacher's prompts, and closer than when every row goes to one teacher (routing matters)."""
    runs = {}
    for name, teachers in (("routed", f"a={two_teachers['a']},b={two_teachers['b']}"),
                           ("one", f"a={two_teachers['a']},b={two_teachers['a']}")):
        out = tmp_path / name
        extra = {"steps": 30, "eval_every": 30, "lmbda": 0.5, "warmup_steps": 5, "teachers": teachers}
        train(load_config(None, overrides(model_dirs, two_teachers, out, **extra)), progress=False)
        runs[name] = out
    rows = {n: [r for r in two_teachers["rows"] if r["teacher"] == n] for n in ("a", "b")}
    before = {n: exact_kl_on_references(model_dirs["student"], two_teachers[n], tokenizer, rows[n]) for n in rows}
    after = {n: exact_kl_on_references(runs["routed"] / "final", two_teachers[n], tokenizer, rows[n]) for n in rows}
    misrouted = exact_kl_on_references(runs["one"] / "final", two_teachers["b"], tokenizer, rows["b"])
    assert after["a"] < 0.7 * before["a"] and after["b"] < 0.7 * before["b"], (before, after)
    assert after["b"] < 0.8 * misrouted, (after, misrouted)
    records = read_jsonl(runs["routed"] / "metrics.jsonl")
    step = records[1]
    assert step["teacher_kl/a"] > 0 and step["teacher_kl/b"] > 0
    assert step["teacher_flops"] == pytest.approx(step["teacher_flops/a"] + step["teacher_flops/b"])
    first = records[0]
    assert first["accuracy"] == pytest.approx((first["accuracy/a"] + first["accuracy/b"]) / 2)  # 4 prompts each
    assert {"eval_teacher_kl/a", "eval_teacher_kl/b", "sampled_accuracy/a"} <= set(first)


def test_teacher_names_are_checked_before_any_compute(model_dirs, two_teachers, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y", "teacher": "c"}) + "\n")
    config = load_config(None, overrides(model_dirs, two_teachers, tmp_path / "run") + [f"task={bad}",
                                                                                         f"eval_file={bad}"])
    with pytest.raises(OpdError, match="names the teacher 'c', which teachers= does not define .it has: a, b."):
        open_session(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(OpdError, match="'a' must look like NAME=DIR_OR_URL"):
        parse_teachers("a")
    with pytest.raises(OpdError, match="works with kl=sampled or kl=topk"):
        load_config(None, ["teachers=a=x", "kl=full"])
    toml = tmp_path / "run.toml"
    toml.write_text(f'kl = "topk"\n[teachers]\na = "{two_teachers["a"]}"\nb = "{two_teachers["b"]}"\n')
    assert parse_teachers(load_config(str(toml)).teachers) == {"a": str(two_teachers["a"]), "b": str(two_teachers["b"])}
