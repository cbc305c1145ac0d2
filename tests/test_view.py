"""``teachers.view`` and ``teachers.base`` at their own interface: which path a teacher reads the rollouts on,
what it reads for each row, and its grades on each path against the teacher scoring the ids directly."""

from __future__ import annotations

import copy

import pytest
import torch

from opd.errors import OpdError
from opd.models import chat_prompt_ids
from opd.rollouts import pack_pairs
from opd.teachers import InProcessTeacher, LocalTeacher, RemoteTeacher, Teacher, TeacherView
from opd.teachers.view import choose_path, teacher_conversations

QUESTIONS = ["Compute 1+2", "Compute 3*4"]


def conversations():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def rows_for(tokenizer, messages):
    prompts = [chat_prompt_ids(tokenizer, m) for m in messages]
    completions = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in ("= 3", "= 12")]
    return pack_pairs(prompts, completions, tokenizer.pad_token_id), completions


def with_system(tokenizer):
    """The same tokenizer with a template that adds a system turn: another rendering, the same ids."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = "<|im_start|>system\nBe brief.<|im_end|>\n" + tokenizer.chat_template
    return other


def test_the_path_follows_the_tokenizers_and_templates(tokenizer, other_tokenizer):
    assert choose_path(tokenizer, tokenizer, "auto") == "shared"
    assert choose_path(tokenizer, with_system(tokenizer), "auto") == "own"
    assert choose_path(tokenizer, with_system(tokenizer), "own") == "own"
    assert choose_path(tokenizer, with_system(tokenizer), "student") == "shared"
    assert choose_path(tokenizer, other_tokenizer, "auto") == "aligned"
    with pytest.raises(OpdError, match="teacher_template='mine' must be one of auto, own, student"):
        choose_path(tokenizer, tokenizer, "mine")


def test_what_the_teacher_reads_for_each_row(tokenizer):
    rows, _ = rows_for(tokenizer, conversations())
    rows.messages = conversations()
    assert teacher_conversations(rows) == (rows.messages, False)  # no teacher_messages: the student's
    rows.teacher_messages = list(rows.messages)
    assert teacher_conversations(rows)[1] is False  # the same conversations
    rows.teacher_messages = [[{"role": "system", "content": "The answer is 3."}] + rows.messages[0], rows.messages[1]]
    assert teacher_conversations(rows) == (rows.teacher_messages, True)  # privileged context


def test_shared_path_grades_are_the_teachers_own_scores(tokenizer, tiny_model):
    teacher = LocalTeacher(tiny_model, len(tokenizer))
    rows, _ = rows_for(tokenizer, conversations())
    scored = TeacherView(teacher, tokenizer).score(rows, conversations(), hidden=True, topk=3)
    logprobs, hidden = teacher.score_with_hidden(rows)
    torch.testing.assert_close(scored.logprobs, logprobs)
    torch.testing.assert_close(scored.hidden, hidden)
    ids, top = teacher.topk(hidden, 3)
    assert torch.equal(scored.topk[0], ids) and torch.equal(scored.topk[1], top)


@pytest.mark.parametrize("privileged", [False, True])
def test_own_path_reads_the_teachers_rendering_then_the_students_completion(tokenizer, tiny_model, privileged):
    teacher_tokenizer = tokenizer if privileged else with_system(tokenizer)
    view = TeacherView(LocalTeacher(tiny_model, len(tokenizer)), tokenizer, teacher_tokenizer)
    rows, completions = rows_for(tokenizer, conversations())
    theirs = [[{"role": "system", "content": "hint"}] + m for m in conversations()] if privileged else conversations()
    scored = view.score(rows, theirs, privileged=privileged)
    direct = pack_pairs([chat_prompt_ids(teacher_tokenizer, m) for m in theirs], completions, tokenizer.pad_token_id)
    want = LocalTeacher(tiny_model, len(tokenizer)).score(direct)
    torch.testing.assert_close(scored.logprobs[rows.completion_mask > 0], want[direct.completion_mask > 0])
    assert scored.teacher_prompt_lengths == [len(chat_prompt_ids(teacher_tokenizer, m)) for m in theirs]
    shared = view.score(rows, theirs, privileged=False) if privileged else None
    if privileged:  # reading the student's prompt instead gives other grades: the context mattered
        assert not torch.allclose(shared.logprobs, scored.logprobs)


def test_teachers_say_whether_their_distribution_is_here(tokenizer, tiny_model):
    local, remote = LocalTeacher(tiny_model, len(tokenizer)), RemoteTeacher("http://127.0.0.1:9")
    assert local.in_process and not remote.in_process and remote.local_model is None
    for teacher, protocol in ((local, InProcessTeacher), (remote, Teacher)):
        missing = [name for name in protocol.__annotations__ if not hasattr(teacher, name)]
        missing += [name for name in vars(protocol) if callable(vars(protocol)[name]) and not name.startswith("_")
                    and not hasattr(teacher, name)]
        assert not missing, (type(teacher).__name__, missing)
    rows, _ = rows_for(tokenizer, conversations())
    logprobs, ids, top = local.score_topk(rows, 4)
    want_ids, want_top = local.topk(local.score_with_hidden(rows)[1], 4)
    assert torch.equal(ids, want_ids) and torch.equal(top, want_top)
    torch.testing.assert_close(logprobs, local.score(rows))
    remote.close()
