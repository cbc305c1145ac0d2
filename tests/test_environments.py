"""Multi-turn and tool-calling distillation (#30): environments, whole-conversation rollouts, the teacher's
reading of every turn on each of its paths, bad environments."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cross_teacher import sequence_logprobs

from conftest import LiveServer, read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.environments import ToolEnvironment, parse_tool_calls
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer, resolve_model_path, save_model
from opd.samplers.turns import environment_ids, render
from opd.setup import open_session
from opd.tasks import ArithmeticTask
from opd.teachers import TeacherView
from opd.teachers.grade import by_turns, grade
from opd.teachers.remote import RemoteTeacher
from opd.teachers.view import teacher_conversations
from opd.trainer import train

CPU = torch.device("cpu")
EMBEDDED = {"student": "embedded:student", "teacher": "embedded:teacher"}


class GoOn:
    """A user who asks for more ``turns - 1`` times; the reward is the number of the user's turns."""

    tools = None

    def __init__(self, turns: int = 3) -> None:
        self.turns = turns

    def start(self, example):
        return GoOnConversation(self.turns)


class GoOnConversation:
    def __init__(self, turns: int) -> None:
        self.turns, self.said = turns, 0

    def respond(self, reply: str):
        self.said += 1
        return None if self.said >= self.turns else [{"role": "user", "content": f"Go on ({self.said})."}]

    def reward(self):
        return float(self.said)


class OneTurn:
    """Over after the first reply, graded by the task's verifier: a single-turn run."""

    tools = None

    def start(self, example):
        return self

    def respond(self, reply):
        return None

    def reward(self):
        return None


def session_with(environment, tmp_path, dirs=EMBEDDED, **extra):
    values = dict(max_new_tokens=48, prompts_per_step=2, samples_per_prompt=2, environment="python:test")
    values.update(extra)
    return open_session(load_config(None, tiny_train_overrides(dirs, tmp_path / "run", **values)),
                        environment=environment)


def session_named(tmp_path, **extra):
    """A session whose environment the config names (``environment=`` or ``tools=``)."""
    values = dict(max_new_tokens=48, prompts_per_step=2, samples_per_prompt=2, **extra)
    return open_session(load_config(None, tiny_train_overrides(EMBEDDED, tmp_path / "run", **values)))


def sampled_spans(rollouts, row: int) -> list[tuple[int, int]]:
    return [(start, end) for start, end, _ in rollouts.turns[row]]


def test_tool_calls_are_parsed_as_the_hermes_format_defines():
    calls = parse_tool_calls('I will use it. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
                             '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>')
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, ""), ("add", {"a": 3}, "")]
    assert parse_tool_calls("no call here") == []
    assert "not JSON" in parse_tool_calls("<tool_call>{add}</tool_call>")[0].error
    assert "not closed" in parse_tool_calls('<tool_call>{"name": "add"')[0].error
    bad = parse_tool_calls('<tool_call>{"name": "a", "arguments": 3}</tool_call>')
    assert "arguments must be an object" in bad[0].error


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits, + - * and parentheses
    """
    if set(expression) - set("0123456789+-*() "):
        raise ValueError("only digits, + - * and parentheses")
    return str(eval(expression))  # noqa: S307 - the characters are checked above


def test_the_tool_environment_runs_each_call_and_says_what_was_wrong():
    environment = ToolEnvironment([calculate])
    assert environment.tools[0]["function"]["name"] == "calculate"
    assert environment.tools[0]["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    talk = environment.start(None)
    answer = talk.respond('<tool_call>{"name": "calculate", "arguments": {"expression": "3*(4+5)"}}</tool_call>')
    assert answer == [{"role": "tool", "name": "calculate", "content": "27"}]
    answer = talk.respond('<tool_call>{"name": "calc", "arguments": {}}</tool_call>'
                          '<tool_call>{"name": "calculate", "arguments": {"expression": "x"}}</tool_call>')
    assert answer[0]["content"].startswith("error: there is no tool 'calc'")
    assert answer[1]["content"] == "error: ValueError: only digits, + - * and parentheses"
    assert talk.respond("Answer: 27") is None  # no call: the conversation is over
    assert talk.figures() == {"tool_calls": 3, "valid_tool_calls": 1}
    with pytest.raises(OpdError, match="a docstring with an Args: section"):
        ToolEnvironment([lambda x: x])


def test_a_row_is_the_chat_template_rendering_of_its_conversation(tmp_path):
    session = session_with(GoOn(3), tmp_path)
    rollouts = session.source.rollouts(0)
    tokenizer = session.tokenizer
    assert all(len(turns) == 3 for turns in rollouts.turns)  # the embedded student ends its turns
    for row in range(rollouts.tokens.shape[0]):
        tokens = rollouts.tokens[row][rollouts.attention_mask[row] > 0].tolist()
        *_, (start, end, before) = rollouts.turns[row]
        last = tokenizer.decode(rollouts.tokens[row, start:end - 1])
        conversation = before + [{"role": "assistant", "content": last}]
        by_hand = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)
        assert tokenizer.decode(tokens) + "\n" == by_hand
        assert [m["content"] for m in conversation if m["role"] == "user"][1:] == ["Go on (1).", "Go on (2)."]
        sampled = torch.zeros(rollouts.tokens.shape[1], dtype=torch.bool)
        for start, end in sampled_spans(rollouts, row):
            sampled[start:end] = True
        assert torch.equal(rollouts.completion_mask[row] > 0, sampled)  # the environment's tokens are out
    assert rollouts.rewards.tolist() == [3.0] * 4
    session.close()


def test_environment_ids_are_the_template_difference(tokenizer):
    ids = environment_ids(tokenizer, [{"role": "tool", "content": "27"}])
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n27<|im_end|>\n<|im_start|>assistant\n"
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    with pytest.raises(OpdError, match="needs the student's chat template"):
        environment_ids(base, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("kl", ["sampled", "full"])
def test_environment_tokens_get_exactly_zero_gradient(tmp_path, kl):
    session = session_with(GoOn(3), tmp_path, kl=kl, prompts_per_step=4, samples_per_prompt=1)
    rollouts = session.source.rollouts(0)
    graded = grade(session.teacher_view, rollouts, session.objective.grading)
    rollouts.teacher_logprobs = graded.logprobs
    signal = session.objective.signal(graded, session.teacher_view)
    rollouts.advantages = session.objective.advantages(rollouts)
    kept = {}
    norm = session.student.get_decoder().norm

    def keep(_module, _inputs, out):  # returns None: the output stays as it is
        out.retain_grad()
        kept.setdefault("outs", []).append(out)

    handle = norm.register_forward_hook(keep)
    session.loss_module(rollouts, rollouts.num_completion_tokens, signal).backward()
    handle.remove()
    (out,) = kept["outs"]  # one forward over (B, T): no two rows share a prompt
    grad = out.grad.abs().sum(-1)  # the gradient reaching each position's head input
    predicts = torch.zeros_like(rollouts.completion_mask, dtype=torch.bool)
    predicts[:, :-1] = rollouts.completion_mask[:, 1:] > 0  # position t predicts token t + 1
    environment = torch.zeros_like(predicts)
    environment[:, :-1] = (rollouts.attention_mask[:, 1:] > 0) & (rollouts.completion_mask[:, 1:] == 0)
    environment &= rollouts.attention_mask > 0
    prompt_end = int((rollouts.completion_mask > 0).any(0).nonzero()[0])
    environment[:, : prompt_end - 1] = False  # the prompt's own positions (never in a loss either)
    assert environment.sum() > 20 and predicts.sum() > 100
    assert (grad[environment] == 0).all()
    assert (grad[predicts] > 0).float().mean() > 0.9
    session.close()


def own_template_teacher(root):
    """The embedded teacher with a template of its own: a system prompt and empty thinking tags."""
    from test_cross_teacher import THINKING_TEMPLATE

    path = resolve_model_path("embedded:teacher")
    theirs = load_tokenizer(path)
    theirs.chat_template = THINKING_TEMPLATE
    save_model(load_model(path, CPU, torch.float32), theirs, root / "own-teacher")
    return root / "own-teacher"


@pytest.mark.parametrize("path", ["shared", "own", "aligned"])
def test_the_teacher_reads_each_turn_after_the_conversation_in_its_own_rendering(tmp_path, path):
    teacher = {"shared": "embedded:teacher", "own": None, "aligned": "embedded:teacher-bpe2"}[path]
    teacher = teacher or str(own_template_teacher(tmp_path))
    session = session_with(GoOn(3), tmp_path, dirs={"student": "embedded:student", "teacher": teacher}, kl="sampled")
    view = session.teacher_view
    assert view.path == path
    rollouts = session.source.rollouts(0)
    scored = grade(view, rollouts)
    model, theirs = view.model, view.teacher_tokenizer
    for row in range(rollouts.tokens.shape[0]):
        for start, end, before in rollouts.turns[row]:
            turn = rollouts.tokens[row, start:end].tolist()
            got = scored.logprobs[row, start:end]
            with torch.no_grad():
                if path == "shared":  # the student's tokens, as they are: one forward over the row
                    first = int(rollouts.attention_mask[row].argmax())
                    want = sequence_logprobs(model, rollouts.tokens[row, first:end].tolist(), start - first,
                                             len(theirs))
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
                    continue
                if path == "own":
                    text = "<|im_start|>system\nYou are a careful teacher.<|im_end|>\n" + "".join(
                        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in before)
                    text += "<|im_start|>assistant\n<think>\n\n</think>\n\n"
                else:  # the other family's turns
                    text = "".join(f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in before)
                    text += "<start_of_turn>model\n"
                prompt = theirs.encode(text, add_special_tokens=False)
                if path == "own":  # the student's ids after the teacher's rendering
                    want = sequence_logprobs(model, prompt + turn, len(prompt), len(theirs))
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
                else:  # the turn's text in the teacher's tokens: the shares sum to its log-prob
                    reply = session.tokenizer.decode(turn[:-1])
                    ids = theirs.encode(reply, add_special_tokens=False) + [theirs.eos_token_id]
                    want = sequence_logprobs(model, prompt + ids, len(prompt), len(theirs))
                    torch.testing.assert_close(got.sum(), want.sum(), rtol=0, atol=1e-4)
    if path == "shared":  # turn by turn, the same
        conversations, _ = teacher_conversations(rollouts)
        torch.testing.assert_close(by_turns(view, rollouts, conversations, False, 0).logprobs, scored.logprobs,
                                   rtol=0, atol=1e-5)
    session.close()


def test_a_served_teacher_grades_conversations_as_in_process(tmp_path):
    session = session_with(GoOn(3), tmp_path, kl="sampled")
    rollouts = session.source.rollouts(0)
    local = grade(session.teacher_view, rollouts).logprobs
    with LiveServer(resolve_model_path("embedded:teacher")) as live:
        with RemoteTeacher(live.url, model="teacher") as remote:
            remote.connect(session.tokenizer, 256)
            served = grade(TeacherView(remote, session.tokenizer), rollouts).logprobs
            theirs = copy.copy(session.tokenizer)
            theirs.chat_template = "{# another text, the same rendering #}" + theirs.chat_template  # turn by turn
            own = TeacherView(remote, session.tokenizer, theirs)
            assert own.path == "own"
            by_turn = grade(own, rollouts).logprobs
    torch.testing.assert_close(served, local, rtol=0, atol=1e-4)
    torch.testing.assert_close(by_turn, local, rtol=0, atol=1e-4)  # a template that renders the same
    session.close()


class Raises(GoOn):
    def start(self, example):
        talk = super().start(example)
        talk.respond = lambda reply: 1 / 0
        return talk


class Malformed(GoOn):
    def start(self, example):
        talk = super().start(example)
        talk.respond = lambda reply: [{"role": "assistant", "content": "I speak for the student"}]
        return talk


class NeverEnds(GoOn):
    def start(self, example):
        return GoOnConversation(10**9)


def test_a_bad_environment_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_train_overrides(EMBEDDED, out, max_new_tokens=64, prompts_per_step=2, samples_per_prompt=1,
                                     environment="python:test", steps=3, save_every=1, eval_every=100,
                                     eval_examples=2, lr=1e-5)  # a student that still ends its turns

    second_step = {ex.messages[-1]["content"] for ex in ArithmeticTask().train_examples(1, 2, 0)}

    class LaterRaises(GoOn):  # the second step's prompts break it
        def start(self, example):
            broken = example.messages[-1]["content"] in second_step
            return Raises(2).start(example) if broken else super().start(example)

    with pytest.raises(OpdError, match=r"environment LaterRaises raised ZeroDivisionError: division by zero \(prompt "
                                       r"'.*', after the reply '.*'\); the run stopped, its last checkpoint kept"):
        train(load_config(None, overrides), progress=False, environment=LaterRaises(2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step_000001"]
    with pytest.raises(OpdError, match=r"environment Malformed.*message 0 of its turn is .*'role': 'assistant'"):
        session_with(Malformed(2), tmp_path / "b").source.rollouts(0)
    session = session_with(NeverEnds(), tmp_path / "c", max_turns=3)
    rollouts = session.source.rollouts(0)
    figures = rollouts.conversation
    assert figures["cut"] == figures["conversations"] == 4 and figures["turns"] == 12
    session.close()


def test_a_one_turn_environment_reproduces_the_single_turn_run_exactly(tmp_path):
    logged = {}
    for name, environment in (("plain", None), ("one-turn", OneTurn())):
        out = tmp_path / name
        overrides = tiny_train_overrides(EMBEDDED, out, max_new_tokens=40, prompts_per_step=2, samples_per_prompt=2,
                                         environment="python:test" if environment else "", steps=3, eval_every=3,
                                         save_every=3, lr=3e-4, warmup_steps=0, eval_examples=4)
        train(load_config(None, overrides), progress=False, environment=environment)
        logged[name] = [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "elapsed"
                         and "turns" not in k and "tool" not in k and "cut_share" not in k}
                        for r in read_jsonl(out / "metrics.jsonl")]
    assert logged["one-turn"] == logged["plain"]


def learning_run(out, sampler=None, steps=6) -> list[dict]:
    overrides = tiny_train_overrides(EMBEDDED, out, max_new_tokens=40, prompts_per_step=4, samples_per_prompt=2,
                                     environment="python:test", steps=steps, eval_every=steps, save_every=steps,
                                     lr=3e-4, kl="full", warmup_steps=0, eval_examples=8, max_turns=3)
    train(load_config(None, overrides + ([f"sampler={sampler}"] if sampler else [])), progress=False,
          environment=GoOn(2))
    return read_jsonl(out / "metrics.jsonl")


def test_a_multi_turn_run_learns_and_logs_its_conversations(tmp_path):
    records = learning_run(tmp_path / "run")  # measured: eval KL 2.31 -> 1.77 nats in 8 steps
    assert all(r["turns_per_conversation"] > 1.5 for r in records[1:])
    assert records[-1]["eval_turns_per_conversation"] > 1.5 and "eval_tool_use_share" in records[-1]
    assert records[-1]["eval_teacher_kl"] < 0.9 * records[0]["eval_teacher_kl"]


def test_a_multi_turn_run_through_opd_serve_learns_like_in_process(tmp_path):
    local = learning_run(tmp_path / "local", steps=5)
    with LiveServer(resolve_model_path("embedded:student")) as live:
        served = learning_run(tmp_path / "served", live.url, steps=5)
    assert all(r["engine_max_abs_logprob_gap"] <= 1e-4 for r in served[1:])  # the trainer's policy's samples
    assert all(r["turns_per_conversation"] > 1.5 for r in served[1:])
    for records in (served, local):
        assert records[-1]["eval_teacher_kl"] < records[0]["eval_teacher_kl"]
    assert abs(served[-1]["eval_teacher_kl"] - local[-1]["eval_teacher_kl"]) < 0.25 * local[0]["eval_teacher_kl"]


def test_tools_reach_the_template_of_each_side(tmp_path):
    tools = "test_environments:calculate"
    session = session_named(tmp_path, tools=tools)
    assert session.dialogue.environment.tools[0]["function"]["name"] == "calculate"
    template = "{% if tools %}TOOLS {{ tools | length }} {% endif %}" + session.tokenizer.chat_template
    session.tokenizer.chat_template = template
    assert render(session.tokenizer, [{"role": "user", "content": "x"}], True).startswith("TOOLS 1 ")
    session.close()
    with pytest.raises(OpdError, match="give environment= or tools=, not both"):
        session_named(tmp_path / "both", tools=tools, environment="test_environments:GoOn")


def test_sft_with_an_environment_needs_the_students_tokens_and_is_refused_before_the_run_directory(tmp_path):
    dirs = {"student": "embedded:student", "teacher": str(own_template_teacher(tmp_path))}
    with pytest.raises(OpdError, match="method=sft with an environment trains on the teacher's conversations"):
        session_with(GoOn(2), tmp_path, dirs=dirs, method="sft")
    assert not (tmp_path / "run").exists()
