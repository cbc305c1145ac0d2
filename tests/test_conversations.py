"""Conversations (#30): chat_template_kwargs for each side, privileged teacher context, teacher=self."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_cross_teacher import sequence_logprobs

from conftest import read_jsonl, tiny_train_overrides
from opd.chat_settings import with_template_kwargs
from opd.config import load_config
from opd.errors import OpdError
from opd.models import chat_prompt_ids, chat_prompt_text, load_model, save_model
from opd.rollouts import pack_pairs
from opd.setup import open_session
from opd.tasks import ArithmeticTask, Example
from opd.tasks.jsonl import load_examples
from opd.teachers import LocalTeacher, TeacherView
from opd.teachers.view import teacher_conversations
from opd.trainer import train, training_step

CPU = torch.device("cpu")
BRANCHING = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def branching_dirs(tmp_path_factory, tokenizer, model_dirs):
    """The tiny pair with a chat template that opens a thinking block when ``enable_thinking`` is true."""
    theirs = copy.deepcopy(tokenizer)
    theirs.chat_template = BRANCHING
    root = tmp_path_factory.mktemp("branching")
    dirs = {}
    for name in ("student", "teacher"):
        dirs[name] = root / name
        save_model(load_model(model_dirs[name], CPU, torch.float32), theirs, dirs[name])
    return dirs


def test_chat_template_kwargs_reach_the_template(tokenizer):
    theirs = copy.deepcopy(tokenizer)
    theirs.chat_template = BRANCHING
    messages = [{"role": "user", "content": "Compute 1+2"}]
    assert not chat_prompt_text(theirs, messages)[0].endswith("<think>\n")
    thinking = with_template_kwargs(theirs, {"enable_thinking": True})
    assert thinking is theirs  # set on the tokenizer itself the first time
    assert chat_prompt_text(thinking, messages)[0].endswith("assistant\n<think>\n")
    plain = with_template_kwargs(thinking, {"enable_thinking": False})
    assert plain is not thinking  # the other side's copy: the first keeps its own
    assert chat_prompt_text(plain, messages)[0].endswith("assistant\n")
    assert chat_prompt_text(thinking, messages)[0].endswith("<think>\n")


def test_each_side_renders_with_its_own_kwargs_in_a_run(branching_dirs, tmp_path):
    overrides = tiny_train_overrides(branching_dirs, tmp_path / "run", kl="full",
                                     chat_template_kwargs='{"enable_thinking": true}')
    session = open_session(load_config(None, overrides))
    messages = [{"role": "user", "content": "Compute 1+2"}]
    think = session.tokenizer.convert_tokens_to_ids("<think>") if "<think>" in session.tokenizer.get_vocab() else None
    student_text = session.tokenizer.decode(session.prompt_ids(messages))
    teacher_text = session.teacher_view.teacher_tokenizer.decode(session.teacher_view.teacher_prompt(messages))
    assert student_text.endswith("<think>\n") or think is not None
    assert "<think>" in student_text and "<think>" not in teacher_text  # the teacher's own (none given)
    assert session.teacher_view.path == "own"  # the renderings differ: the teacher reads its own
    session.close()
    both = tiny_train_overrides(branching_dirs, tmp_path / "both", chat_template_kwargs='{"enable_thinking": true}',
                                teacher_chat_template_kwargs='{"enable_thinking": true}')
    session = open_session(load_config(None, both))
    assert session.teacher_view.path == "shared"
    assert "<think>" in session.teacher_view.teacher_tokenizer.decode(session.teacher_view.teacher_prompt(messages))
    session.close()


def test_bad_template_kwargs_name_the_field():
    with pytest.raises(OpdError, match="chat_template_kwargs='enable_thinking' is not JSON"):
        load_config(None, ["chat_template_kwargs=enable_thinking"])
    with pytest.raises(OpdError, match="teacher_chat_template_kwargs='\\[1\\]' must be a JSON object"):
        load_config(None, ["teacher_chat_template_kwargs=[1]"])
    assert load_config(None, ['chat_template_kwargs={"a": 1}']).template_kwargs() == {"a": 1}


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_privileged_context_is_read_from_a_prompts_file(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "Compute 1+2", "answer": "3", "teacher_prompt": "Compute 1+2 (it is 3)"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+2"}],
         "teacher_messages": [{"role": "user", "content": "Compute 2+2; the answer is 4"}]},
        {"prompt": "Compute 5+5"}])
    first, second, third = load_examples(path)
    assert first.teacher_conversation == [{"role": "user", "content": "Compute 1+2 (it is 3)"}]
    assert first.messages == [{"role": "user", "content": "Compute 1+2"}]
    assert second.teacher_conversation == [{"role": "user", "content": "Compute 2+2; the answer is 4"}]
    assert third.teacher_messages is None and third.teacher_conversation is third.messages
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x", "teacher_prompt": "y", "teacher_messages": [
        {"role": "user", "content": "z"}]}])
    with pytest.raises(OpdError, match=r"bad.jsonl:1: give 'teacher_messages' or 'teacher_prompt', not both"):
        load_examples(bad)
    ends = write_prompts(tmp_path / "ends.jsonl", [{"prompt": "x", "teacher_messages": [
        {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]}])
    with pytest.raises(OpdError, match="ends.jsonl:1: field 'teacher_messages' must end with the turn"):
        load_examples(ends)


def hinted_prompts(tmp_path, count=8):
    return write_prompts(tmp_path / "hinted.jsonl", [
        {"prompt": f"Compute {i}+{i + 1}", "answer": str(2 * i + 1),
         "teacher_prompt": f"Compute {i}+{i + 1}. Answer: {2 * i + 1}"} for i in range(count)])


@pytest.mark.parametrize("kl", ["sampled", "full", "topk"])
def test_the_teacher_scores_the_completion_after_its_own_context(model_dirs, tmp_path, kl):
    path = hinted_prompts(tmp_path)
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", task=str(path), eval_file=str(path), kl=kl)
    session = open_session(load_config(None, overrides))
    assert session.teacher_view.path == "shared"  # one tokenizer, one template: the prompts alone differ
    rollouts = session.source.rollouts(0)
    conversations, privileged = teacher_conversations(rollouts)
    assert privileged and conversations != rollouts.messages
    scored = session.teacher_view.score(rollouts, conversations, hidden=kl == "full", privileged=privileged,
                                        topk=session.config.teacher_topk if kl == "topk" else 0)
    model, tokenizer = session.teacher_view.model, session.tokenizer
    mask = rollouts.completion_mask > 0
    for row, completion in enumerate(rollouts.completion_ids()):
        prompt = chat_prompt_ids(tokenizer, conversations[row])  # the teacher's context, rendered by hand
        assert "Answer:" in tokenizer.decode(prompt)
        with torch.no_grad():
            want = sequence_logprobs(model, prompt + completion, len(prompt), len(tokenizer))
        torch.testing.assert_close(scored.logprobs[row, mask[row]], want, rtol=0, atol=1e-5)
    with torch.no_grad():
        plain = session.teacher_view.score(rollouts, rollouts.messages).logprobs
    assert (plain - scored.logprobs).abs().max() > 1e-3  # the context matters to the teacher
    training_step(session, 0)
    session.close()


def test_teacher_self_is_a_frozen_copy_of_the_initial_student(model_dirs, tmp_path):
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", teacher="self", lr=5e-2)
    session = open_session(load_config(None, overrides))
    teacher, student = session.teacher_view.model, session.student
    assert teacher is not student
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for (name, a), b in zip(student.state_dict().items(), before.values(), strict=True):
        assert torch.equal(a, b), name  # the student's own starting weights
    record = training_step(session, 0)
    assert abs(record["teacher_kl"]) < 1e-4  # its own samples, graded by itself: no gap yet
    training_step(session, 1)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # frozen
    assert any(not torch.equal(a, before[k]) for k, a in student.state_dict().items())  # the student moved
    session.close()


def test_a_privileged_self_teacher_lowers_the_students_kl_on_its_prompts(tmp_path):
    """Self-distillation with privileged context: the embedded student, told the answer in its teacher's
    prompt, teaches its plain-prompt self to reply as it would with the hint (the train KL to that teacher
    falls: 1.9 -> 0.3 nats in 20 steps when measured)."""
    examples = ArithmeticTask().train_examples(0, 16, 0)
    path = write_prompts(tmp_path / "hinted.jsonl", [
        {"prompt": ex.messages[-1]["content"], "answer": ex.answer,
         "teacher_prompt": f"{ex.messages[-1]['content']} The answer is {ex.answer}."} for ex in examples])
    dirs = {"student": "embedded:student", "teacher": "embedded:student"}
    out = tmp_path / "run"
    overrides = tiny_train_overrides(dirs, out, teacher="self", task=str(path), eval_file=str(path), steps=14,
                                     eval_every=14, save_every=14, prompts_per_step=8, samples_per_prompt=4,
                                     lr=1e-3, warmup_steps=0, max_new_tokens=48, eval_examples=8)
    summary = train(load_config(None, overrides), progress=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    first = sum(r["teacher_kl"] for r in records[:3]) / 3
    last = sum(r["teacher_kl"] for r in records[-3:]) / 3
    assert first > 0.5  # the hint moves the teacher's distribution a long way
    assert last < 0.6 * first, (first, last)
    assert summary["teacher_kl_after"] < summary["teacher_kl_before"]


def test_an_example_without_context_is_read_as_the_students(tokenizer, tiny_model):
    plain = Example([{"role": "user", "content": "x"}], None)
    rows = pack_pairs([[5], [5]], [[6], [6]], 0)
    rows.messages, rows.teacher_messages = [plain.messages] * 2, [plain.teacher_conversation] * 2
    assert teacher_conversations(rows) == (rows.messages, False)
    view = TeacherView(LocalTeacher(tiny_model, len(tokenizer)), tokenizer)
    assert view.reading(False) == "shared" and view.reading(True) == "own"


def test_sft_with_privileged_context_has_the_teacher_write_from_its_own(tmp_path):
    from opd.samplers.local import sample_in_batches

    examples = ArithmeticTask().train_examples(0, 8, 0)
    path = write_prompts(tmp_path / "hinted.jsonl", [
        {"prompt": ex.messages[-1]["content"], "answer": ex.answer,
         "teacher_prompt": f"{ex.messages[-1]['content']} The answer is {ex.answer}."} for ex in examples])
    dirs = {"student": "embedded:student", "teacher": "embedded:student"}
    overrides = tiny_train_overrides(dirs, tmp_path / "run", method="sft", teacher="self", task=str(path),
                                     eval_file=str(path), max_new_tokens=32)
    session = open_session(load_config(None, overrides))
    rollouts = session.source.rollouts(0)
    chosen = session.source.prompts.split(0)[0]
    tokenizer, config = session.tokenizer, session.config
    hinted = [chat_prompt_ids(tokenizer, ex.teacher_conversation) for ex in chosen]
    want = sample_in_batches(session.teacher_view.model, hinted, rows=0, samples_per_prompt=config.samples_per_prompt,
                             max_new_tokens=config.max_new_tokens, temperature=1.0, top_p=1.0,
                             eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                             generator=torch.Generator().manual_seed(0))
    assert rollouts.completion_ids() == want.completion_ids()  # drawn after the teacher's context
    first = rollouts.tokens[0][rollouts.attention_mask[0] > 0]
    assert "The answer is" not in tokenizer.decode(first)  # trained on after the student's prompt
    session.close()
