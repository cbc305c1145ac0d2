"""``teachers.grade`` at its own interface, on a hand-made conversation row: which way a row is read (whole,
or turn by turn after the conversation in the teacher's rendering), the grades against the teacher scoring
each turn directly, grading in parts, and joining parts' answers."""

from __future__ import annotations

import copy

import torch

from opd.models import chat_prompt_ids
from opd.objective import Grading
from opd.rollouts import Turn, pack_pairs
from opd.samplers.turns import environment_ids
from opd.teachers import LocalTeacher, Scored, TeacherView
from opd.teachers.grade import grade, joined

USER = [{"role": "user", "content": "Compute 2+2"}]


def conversation_row(tokenizer):
    """One row: the prompt, a sampled turn, the environment's answer (not sampled), a second sampled turn."""
    prompt = chat_prompt_ids(tokenizer, USER)
    first = tokenizer.encode("= 4", add_special_tokens=False) + [tokenizer.eos_token_id]
    answer = [{"role": "user", "content": "Sure?"}]
    between = environment_ids(tokenizer, answer)
    second = tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = pack_pairs([prompt], [first + between + second], tokenizer.pad_token_id)
    start = len(prompt)
    rows.completion_mask[0, start + len(first) : start + len(first) + len(between)] = 0  # the environment's
    rows.messages, rows.teacher_names = [USER], [""]
    spans = [(start, start + len(first)), (start + len(first) + len(between), rows.tokens.shape[1])]
    rows.turns = [[Turn(*spans[0], list(USER)),
                   Turn(*spans[1], USER + [{"role": "assistant", "content": "= 4"}] + answer)]]
    return rows, [first, second]


def test_a_shared_teacher_reads_the_row_whole(tokenizer, tiny_model):
    teacher = LocalTeacher(tiny_model, len(tokenizer))
    rows, _ = conversation_row(tokenizer)
    scored = grade(TeacherView(teacher, tokenizer), rows)
    mask = rows.completion_mask > 0
    torch.testing.assert_close(scored.logprobs[mask], teacher.score(rows)[mask])


def test_a_teacher_with_its_own_template_reads_each_turn_after_the_conversation(tokenizer, tiny_model):
    theirs = copy.deepcopy(tokenizer)
    theirs.chat_template = "<|im_start|>system\nTeach.<|im_end|>\n" + tokenizer.chat_template
    teacher = LocalTeacher(tiny_model, len(tokenizer))
    rows, turns = conversation_row(tokenizer)
    scored = grade(TeacherView(teacher, tokenizer, theirs), rows)
    got = scored.logprobs[0][rows.completion_mask[0] > 0]
    want = []
    for turn, ids in zip(rows.turns[0], turns, strict=True):
        direct = pack_pairs([chat_prompt_ids(theirs, turn.before)], [ids], tokenizer.pad_token_id)
        want.append(teacher.score(direct)[direct.completion_mask > 0])
    torch.testing.assert_close(got, torch.cat(want))
    assert scored.teacher_prompt_lengths == [sum(len(chat_prompt_ids(theirs, t.before)) for t in rows.turns[0])]
    whole = grade(TeacherView(teacher, tokenizer), rows).logprobs[0][rows.completion_mask[0] > 0]
    assert not torch.allclose(got[len(turns[0]):], whole[len(turns[0]):])  # the second turn's context differs


def test_grading_in_parts_equals_grading_whole(tokenizer, tiny_model):
    view = TeacherView(LocalTeacher(tiny_model, len(tokenizer)), tokenizer)
    rows, _ = conversation_row(tokenizer)
    many = rows.select([0, 0, 0])
    whole, parts = grade(view, many, Grading(hidden=True)), grade(view, many, Grading(hidden=True, rows=2))
    torch.testing.assert_close(parts.logprobs, whole.logprobs)
    torch.testing.assert_close(parts.hidden, whole.hidden)


def test_joined_answers_number_the_chunks_across_the_batch():
    one = Scored(torch.zeros(1, 3), torch.tensor([[-1, 0, 1]]), chunk_count=2, single_token_chunks=1,
                 teacher_prompt_lengths=[4], teacher_completion_lengths=[2],
                 topk=(torch.tensor([[1, 2]]), torch.tensor([[-0.1, -2.0]])), hidden=torch.zeros(2, 4))
    two = Scored(torch.ones(2, 3), torch.tensor([[-1, 0, 0], [-1, 1, 2]]), chunk_count=3, single_token_chunks=2,
                 teacher_prompt_lengths=[5, 6], teacher_completion_lengths=[1, 3],
                 topk=(torch.tensor([[3, 4], [5, 6]]), torch.tensor([[-0.3, -1.0], [-0.5, -0.9]])),
                 hidden=torch.ones(3, 4))
    both = joined([one, two])
    assert both.chunks.tolist() == [[-1, 0, 1], [-1, 2, 2], [-1, 3, 4]]
    assert (both.chunk_count, both.single_token_chunks) == (5, 3)
    assert both.teacher_prompt_lengths == [4, 5, 6] and both.teacher_completion_lengths == [2, 1, 3]
    assert torch.equal(both.logprobs, torch.cat([one.logprobs, two.logprobs]))
    assert both.topk[0].tolist() == [[1, 2], [3, 4], [5, 6]] and both.topk[1].shape == (3, 2)
    assert torch.equal(both.hidden, torch.cat([one.hidden, two.hidden]))
