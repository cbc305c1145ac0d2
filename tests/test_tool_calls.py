"""Tool calls read the family's way (``tool_format=auto``, ``opd.environments.ToolEnvironment.read``): for every
chat template the installed TRL has a response template for, a call rendered by the family's own template (read
from the installed ``trl`` at test time) is read back, name and arguments; where the tokenizer has none the Hermes
parser reads the text as before; and a conversation whose turns end on the family's call token (GPT-OSS
``<|call|>``, Gemma 4 ``<|tool_response>``) rolls out through opd's conversation path into the template's own
rendering, the calls handed back to the template structured."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_templates import ORIGINALS, family_tokenizer

from opd.chat_settings import with_template_kwargs
from opd.environments import ToolEnvironment, load_environment
from opd.models import chat_prompt_ids
from opd.rollouts import pack_pairs
from opd.samplers.turns import pack, render, roll_out, stop_ids
from opd.tasks import ArithmeticTask, Example
from opd.templates import choose_templates, response_template, trl_response_template, trl_templates, turn_end


def calc(expression: str, digits: int = 0) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression, e.g. 2+2
        digits: decimal places of the result
    """
    return str(round(eval(expression, {"__builtins__": {}}), digits))  # noqa: S307 - the tests' own strings


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


TOOLS = [calc, add]
CALLS = [("calc", {"expression": "2+2", "digits": 3}), ("add", {"a": 7, "b": 35})]
ONE_CALL = {"gptoss", "llama3_1", "llama3_2"}  # one call a turn (GPT-OSS stops on <|call|> after it)
# the families whose response template reads tool calls (DeepSeek-R1-Distill's reads the reasoning and the text only)
PARSED = [name for name in ORIGINALS
          if "tool_calls" in (trl_response_template(trl_templates()[name]) or {}).get("fields", {})]


def structured(calls: list[tuple[str, dict]]) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in calls]


@pytest.fixture(scope="module")
def families(tokenizer):
    return {name: family_tokenizer(tokenizer, name) for name in PARSED + ["phi3"]}


def written(tokenizer, history: list[dict], message: dict) -> tuple[str, str]:
    """(the context, the model's text) of ``message`` after ``history``: the family's rendering of the conversation
    ending on it, split where it leaves the generation prompt's (a thinking template's prompt opens ``<think>``,
    which the closed turn closes)."""
    prompt = render(tokenizer, history, True)
    closed = render(tokenizer, history + [message], False)
    shared = len(os.path.commonprefix([prompt, closed]))
    return closed[:shared], closed[shared:]


def test_the_families_trl_reads_include_every_tool_format_named_in_the_issue():
    assert {"qwen3", "qwen3_5_think", "llama3_1", "llama3_2", "gptoss", "glm4moe", "gemma4"} <= set(PARSED)


@pytest.mark.parametrize("name", PARSED)
def test_a_call_the_family_template_renders_is_read_back(families, name):
    environment = ToolEnvironment(TOOLS, "auto")
    tokenizer = with_template_kwargs(families[name], {"tools": environment.tools})
    assert response_template(tokenizer) is not None
    history = [{"role": "user", "content": "Compute 2+2 and 7+35"}]
    calls = CALLS[:1] if name in ONE_CALL else CALLS
    context, text = written(tokenizer, history, {"role": "assistant", "content": "", "tool_calls": structured(calls)})
    ids = tokenizer.encode(text, add_special_tokens=False)
    message = environment.read(tokenizer, tokenizer.encode(context, add_special_tokens=False), ids)
    assert message is not None and message["role"] == "assistant", (text, message)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == calls
    answer = environment.start(None).respond(message)
    results = [{"role": "tool", "name": "calc", "content": "4"}, {"role": "tool", "name": "add", "content": "42"}]
    assert answer == results[:len(calls)]


def test_without_a_response_template_the_reply_is_read_as_hermes_text(tokenizer, families):
    """The embedded family's tokenizer (no response template, a template TRL does not ship) and Phi-3 (TRL has
    none for it): ``read`` leaves the turn as its text, whose Hermes calls run as with ``tool_format=hermes``."""
    for plain in (tokenizer, families["phi3"]):
        assert response_template(plain) is None
        environment = ToolEnvironment(TOOLS)  # auto, the default
        text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        ids = plain.encode(text, add_special_tokens=False) + [plain.eos_token_id]
        assert environment.read(plain, [], ids) is None
        talk = environment.start(None)
        assert talk.respond({"role": "assistant", "content": text}) == [{"role": "tool", "name": "add", "content": "3"}]
        assert talk.respond(text) == ToolEnvironment(TOOLS, "hermes").start(None).respond(text)
    assert load_environment("", "test_tool_calls:add", "auto")[0].format == "auto"


def test_a_reply_the_family_parser_cannot_read_is_an_invalid_call(families):
    environment = ToolEnvironment(TOOLS, "auto")
    tokenizer = families["qwen2_5"]
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call><|im_end|>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert environment.read(tokenizer, [], ids) is None
    answer = environment.start(None).respond({"role": "assistant", "content": tokenizer.decode(ids[:-1])})
    assert answer[0]["content"].startswith("error: the call is not JSON")
    talk = environment.start(None)
    bad = talk.respond({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add",
                                                                                         "arguments": "[1]"}}]})
    assert bad == [{"role": "tool", "name": "add", "content": "error: the arguments must be an object"}]
    assert talk.figures() == {"tool_calls": 1, "valid_tool_calls": 0}


def scripted_turns(tokenizer, turns: list[str], seen: list):
    """A draw that writes ``turns[t]`` (text with its stop token) at turn ``t`` of every context."""
    def draw(contexts: list[list[int]], max_new_tokens: int, turn: int, stops: list[int]):
        seen.append(stops)
        ids = tokenizer.encode(turns[turn], add_special_tokens=False)[:max_new_tokens]
        drawn = pack_pairs(contexts, [ids] * len(contexts), tokenizer.pad_token_id)
        drawn.sampler_logprobs = -drawn.completion_mask
        return drawn
    return draw


@pytest.mark.parametrize("name", ["gptoss", "gemma4", "qwen3_5_think", "llama3_1", "glm4moe"])
def test_a_tool_conversation_in_the_family_format_rolls_out_as_the_template_renders_it(families, name):
    """The student calls a tool in its family's format and ends the turn on the family's token for it; the call is
    read, run, and answered; the next turn answers. The row is the template's rendering of the conversation
    (the calling turn structured), the sampled tokens (each turn's stop included) the only ones trained on."""
    environment = ToolEnvironment([add], "auto")
    own = with_template_kwargs(families[name], {"tools": environment.tools})
    student, _, _ = choose_templates(own, None, "", "", environment)
    example = Example([{"role": "user", "content": "Add 7 and 35"}], "42")
    call = {"role": "assistant", "content": "", "tool_calls": structured([("add", {"a": 7, "b": 35})])}
    result = {"role": "tool", "name": "add", "content": "42"}
    final = {"role": "assistant", "content": "42"}
    whole = render(student, example.messages + [call, result, final], False)
    prompt = render(student, example.messages, True)
    first = written(student, example.messages, call)[1]
    second = written(student, example.messages + [call, result], final)[1]
    stops = student.convert_ids_to_tokens(stop_ids(student, environment))

    def ended(text: str, following: list[dict]) -> str:
        """The turn as the model writes it: up to its first stop token, or (GLM: the template renders none after
        it) with the token the next message opens with, on which the model stops."""
        ends = [text.find(s) + len(s) for s in stops if s in text]
        return text[:min(ends)] if ends else text + turn_end(student, following).stop

    turns = [ended(first, [result]), ended(second, [{"role": "user", "content": "And then?"}])]
    seen: list = []
    rows = roll_out(scripted_turns(student, turns, seen), student, environment, "tools=add", [example],
                    [chat_prompt_ids(student, example.messages)], samples_per_prompt=1, max_turns=3,
                    max_new_tokens=200, max_tokens=4000)
    assert seen[0] == stop_ids(student, environment) and len(seen) == 2
    row = rows[0]
    assert row.done and not row.cut and row.spans and len(row.spans) == 2
    assert row.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 7, "b": 35}}
    assert row.messages[2] == result and row.conversation.figures() == {"tool_calls": 1, "valid_tool_calls": 1}
    text = prompt + student.decode(row.ids[:-1])  # the last turn's stop aside: the template may close it otherwise
    assert whole.startswith(text) and whole[len(text):].strip() in ("", student.decode(row.ids[-1:])), (text, whole)
    batch = pack([row], student.pad_token_id, torch.device("cpu"), ArithmeticTask(operators=2), "tools=add")
    sampled = batch.tokens[0][batch.completion_mask[0] > 0].tolist()
    assert student.decode(sampled) == turns[0] + turns[1]


def test_a_tool_conversation_on_the_embedded_family_is_unchanged_by_auto(tokenizer):
    """The embedded family has no response template: its turns stop on the EOS alone and its Hermes calls are
    read as text, the conversation's assistant turns plain text, as with ``tool_format=hermes``."""
    example = Example([{"role": "user", "content": "Add 7 and 35"}], "42")
    call = '<tool_call>{"name": "add", "arguments": {"a": 7, "b": 35}}</tool_call>' + tokenizer.eos_token
    out = {}
    for fmt in ("auto", "hermes"):
        environment = ToolEnvironment([add], fmt)
        student = with_template_kwargs(copy.copy(tokenizer), {"tools": environment.tools})
        seen: list = []
        rows = roll_out(scripted_turns(student, [call, "42" + tokenizer.eos_token], seen), student, environment, "t",
                        [example], [chat_prompt_ids(student, example.messages)], samples_per_prompt=1, max_turns=3,
                        max_new_tokens=200, max_tokens=4000)
        assert seen[0] == [tokenizer.eos_token_id]
        out[fmt] = (rows[0].ids, rows[0].messages)
    assert out["auto"] == out["hermes"]
    assert out["auto"][1][1] == {"role": "assistant", "content": call.removesuffix(tokenizer.eos_token)}
