"""Real model families in conversations (``opd.templates``): every original chat template the installed TRL ships
(read from the package at test time), put on the test tokenizer with the family's special tokens, renders a
conversation through opd's environment-token path exactly as the template (or TRL's training variant, taken
where the family's own is not prefix-preserving) renders the whole conversation; a tool turn runs on every
template with a tool role; refusals are ``OpdError``s naming the family and why, never a template's own error."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from test_turns import AskTwice, scripted

from opd.chat_settings import chat_template_of
from opd.errors import OpdError
from opd.models import chat_prompt_ids, chat_prompt_text
from opd.rollouts import pack_pairs
from opd.samplers.turns import environment_ids, pack, render, roll_out
from opd.tasks import ArithmeticTask
from opd.teachers import LocalTeacher, TeacherView
from opd.teachers.grade import grade
from opd.teachers.view import choose_path
from opd.templates import (
    between_turns,
    check_student,
    choose_templates,
    for_template,
    structured_calls,
    turn_end,
    turn_stops,
)
from opd.zoo import make_model

SPEC = importlib.util.find_spec("trl")
pytestmark = pytest.mark.skipif(SPEC is None, reason="trl is not installed (the dev extra has it)")
FOLDER = Path(next(iter(SPEC.submodule_search_locations))) / "chat_templates" if SPEC else Path()
# not run: their content must be a list of image/text blocks (a vision processor's format), or the model is not
# sampled left to right (diffusion)
SKIPPED = {"idefics3": "vision: content blocks", "smolvlm": "vision: content blocks",
           "llava_next": "vision: content blocks", "diffusion_gemma": "diffusion, not autoregressive"}
ORIGINALS = sorted(p.stem for p in FOLDER.glob("*.jinja") if not p.stem.endswith("_training") and p.stem not in SKIPPED)
NOT_PREFIX_PRESERVING = {"qwen3", "qwen3_5_think", "qwen3_5_nothink", "qwen3_6"}  # conversations take *_training
NO_TOOL_ROLE = {"cohere": "cannot render", "cohere2": "no tool role", "gemma": "cannot render",
                "gemma3": "cannot render", "phi3": "no tool role", "phi3_5": "no tool role"}
# the generation prompt opens the reasoning (<think>), and the template drops it from past turns, where the row keeps
# what the model wrote: only the environment's part of the row is the template's
REASONING_IN_PROMPT = {"deepseek_r1_distill", "deepseekv3", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra",
                       "nemotron_3_5_lightning"}
CLOSER = {"gptoss": {"<|return|>": "<|end|>"}}  # a past answer closes with <|end|>, the row keeps <|return|>
EOS = {"glm4moe": "<|user|>"}  # GLM closes no turn: the model stops on the next message's role token
MARKERS = re.compile(r"<[|｜][^<>\s]{1,40}?[|｜]>|<[a-z_]{3,20}\|>|<\|[a-z_]{3,20}>|<(?:start|end)_of_turn>|<bos>")
REPLIES = ("= 4", "Yes, 4.")


def family_tokenizer(base, name: str):
    """``base`` with the ``name`` template, its markers as special tokens, a BOS, and as EOS the token the
    family ends an assistant turn with (the first marker after the reply)."""
    text = (FOLDER / f"{name}.jinja").read_text(encoding="utf-8")
    tokenizer = copy.deepcopy(base)
    tokenizer.chat_template = text
    markers = sorted(set(MARKERS.findall(text)))
    tokenizer.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": markers})
    closed = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                           tokenize=False)
    after = closed[closed.rindex("y") + 1:]
    tokenizer.eos_token = EOS.get(name) or MARKERS.search(after).group(0)
    return tokenizer


@pytest.fixture(scope="module")
def families(tokenizer):
    return {name: family_tokenizer(tokenizer, name) for name in ORIGINALS}


def stop_tokens(tokenizer, tools: bool) -> list[str]:
    return tokenizer.convert_ids_to_tokens(turn_stops(tokenizer, tools))


def sampled(tokenizer, history: list[dict], reply: dict, tools: bool) -> tuple[str, str]:
    """What the model writes for ``reply`` after ``history``: the template's last turn between its generation
    prompt and the first stop token (a thinking template's empty ``<think>`` block included), and that token
    ("" where the template renders none after the turn)."""
    prompt = render(tokenizer, history, True)
    closed = render(tokenizer, for_template(tokenizer, history + [reply])[:len(history) + 1], False)
    assert closed.startswith(prompt), (prompt, closed)
    ends = [(closed.find(stop, len(prompt)), stop) for stop in stop_tokens(tokenizer, tools)]
    end, stop = min(((i, s) for i, s in ends if i >= 0), default=(-1, ""))
    return (closed[len(prompt):], "") if end < 0 else (closed[len(prompt):end], stop)


def opd_row(tokenizer, conversation: list[dict], closers: dict) -> str:
    """The conversation's row as opd builds it: the prompt, each turn as sampled, the stop token it ended on (as
    the template closes a past turn: ``closers``), the environment's tokens (``environment_ids``)."""
    tools = any(m["role"] == "tool" for m in conversation)
    row = chat_prompt_text(tokenizer, conversation[:1])[0]
    i = 1
    while i < len(conversation):
        text, stop = sampled(tokenizer, conversation[:i], conversation[i], tools)
        row += text
        answer = []
        for message in conversation[i + 1:]:
            if message["role"] == "assistant":
                break
            answer.append(message)
        if not answer:
            return row
        stop = stop or turn_end(tokenizer, answer).stop  # GLM renders none: the next message's opening stops it
        row += closers.get(stop, stop) + tokenizer.decode(environment_ids(tokenizer, answer))
        i += 1 + len(answer)
    return row


def chosen(tokenizer, tools: bool):
    """The student's tokenizer as a run with an environment (with tools or not) sets it up."""
    environment = type("Env", (), {"tools": [{"type": "function", "function": {"name": "calc"}}] if tools else None})
    return choose_templates(tokenizer, None, "", "", environment())


def same_as_template(tokenizer, conversation: list[dict], name: str) -> None:
    """opd's row of ``conversation`` is the template's rendering of it, up to the closing after the last turn's
    EOS; where the template drops past reasoning, the environment's part after each turn is the template's."""
    eos = tokenizer.eos_token
    if name in REASONING_IN_PROMPT:
        for i in range(1, len(conversation) - 1):
            if conversation[i]["role"] == "assistant":
                text = render(tokenizer, conversation[:i + 2], True)
                cut = text.rindex(eos, 0, text.rindex(conversation[i + 1]["content"]))
                assert text[cut + len(eos):] == tokenizer.decode(environment_ids(tokenizer, conversation[i + 1:i + 2]))
        return
    full = render(tokenizer, conversation, False)
    row = opd_row(tokenizer, conversation, CLOSER.get(name, {}))
    assert full.startswith(row), (row, full)
    assert full[len(row):] == "" or full[len(row):].startswith(eos)


@pytest.mark.parametrize("name", ORIGINALS)
def test_a_user_follow_up_renders_as_the_family_template_does(families, name):
    student, _, notes = chosen(families[name], tools=False)
    assert bool(notes) == (name in NOT_PREFIX_PRESERVING)
    assert chat_template_of(student) == (FOLDER / f"{name}{'_training' if notes else ''}.jinja").read_text()
    assert families[name].chat_template == (FOLDER / f"{name}.jinja").read_text()  # the saved one stays the model's
    conversation = [{"role": "user", "content": "Compute 2+2"}, {"role": "assistant", "content": REPLIES[0]},
                    {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": REPLIES[1]}]
    same_as_template(student, conversation, name)


@pytest.mark.parametrize("name", ORIGINALS)
def test_a_tool_turn_runs_on_every_template_with_a_tool_role(families, name):
    if name in NO_TOOL_ROLE:
        with pytest.raises(OpdError, match=rf"the {name} chat template .*{NO_TOOL_ROLE[name]}"):
            chosen(families[name], tools=True)
        return
    student, _, _ = chosen(families[name], tools=True)
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+2"}}\n</tool_call>'
    conversation = [{"role": "user", "content": "Compute 2+2"}, {"role": "assistant", "content": call},
                    {"role": "tool", "name": "calc", "content": "opd-result-4"},
                    {"role": "assistant", "content": REPLIES[0]}]
    same_as_template(student, for_template(student, conversation), name)
    assert "opd-result-4" in between_turns(student, conversation[2:3])


def test_the_not_prefix_preserving_family_is_refused_without_its_training_template(families):
    with pytest.raises(OpdError, match="the qwen3 chat template renders a conversation's start differently.*"
                                       "qwen3_training"):
        check_student(families["qwen3"], tools=False)


@pytest.mark.parametrize(("name", "eos", "tools", "stops"), [
    ("qwen3_8", None, True, ["<|im_end|>"]),
    ("llama3_1", None, True, ["<|eot_id|>"]),
    ("gptoss", None, True, ["<|return|>", "<|call|>"]),  # an answer, a call
    ("gemma4", None, True, ["<turn|>", "<|tool_response>"]),
    ("glm4moe", None, True, ["<|user|>", "<|observation|>"]),  # no closer: the next message's opening
    ("phi3", "<|endoftext|>", False, ["<|endoftext|>", "<|end|>"]),  # the EOS ends a closed conversation only
    ("gemma3", "<eos>", False, ["<eos>", "<end_of_turn>"]),
])
def test_a_turn_stops_on_the_eos_and_the_tokens_the_family_ends_its_turns_with(families, name, eos, tools, stops):
    tokenizer = copy.deepcopy(families[name])
    if eos:
        tokenizer.add_special_tokens({"eos_token": eos})
    student, _, _ = chosen(tokenizer, tools)
    assert stop_tokens(student, tools) == stops


def test_the_row_keeps_the_eos_where_the_family_ends_a_turn_with_another_token(families):
    """Phi-3's tokenizer ends on <|endoftext|>, its turns on <|end|>: a turn the student ends on either is followed
    by the template's next message, the stop token it wrote kept."""
    phi = copy.deepcopy(families["phi3"])
    phi.add_special_tokens({"eos_token": "<|endoftext|>"})
    student, _, _ = chosen(phi, tools=False)
    after = student.decode(environment_ids(student, [{"role": "user", "content": "Sure?"}]))
    assert after == "\n<|user|>\nSure?<|end|>\n<|assistant|>\n"


def test_a_template_that_ends_no_turn_with_a_special_token_is_refused(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(OpdError, match="ends no assistant turn with a special token"):
        check_student(plain, tools=False)


def test_a_template_error_is_an_opd_error_naming_the_family(tokenizer, families):
    with pytest.raises(OpdError, match=r"the gemma chat template cannot render .*user -> assistant -> tool"):
        render(families["gemma"], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                   {"role": "tool", "content": "z"}], True)
    no_bos = copy.deepcopy(tokenizer)
    no_bos.chat_template = (FOLDER / "llama3.jinja").read_text()
    with pytest.raises(OpdError, match="llama3 chat template .*bos_token.*set it"):
        chat_prompt_ids(no_bos, [{"role": "user", "content": "x"}])


def test_gpt_oss_gets_the_calls_as_structured_tool_calls(families):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": 'ok <tool_call>{"name": "calc", "arguments": {"a": 7}}</tool_call>'},
                {"role": "tool", "name": "calc", "content": "7"}]
    assert structured_calls(messages)[1] == {"role": "assistant", "content": "ok", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"a": 7}}}]}
    text = render(families["gptoss"], messages, True)
    assert 'to=functions.calc<|channel|>commentary json<|message|>{"a": 7}<|call|>' in text
    assert "<|start|>functions.calc to=assistant" in text


def test_given_templates_are_files_and_the_teacher_keeps_its_own(tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}<|im_end|>{% endfor %}"
                    "{% if add_generation_prompt %}[assistant]{% endif %}")
    student, teacher, notes = choose_templates(tokenizer, tokenizer, str(path), "", None)
    assert chat_template_of(student) == path.read_text() and tokenizer.chat_template != path.read_text()
    assert chat_template_of(teacher) == tokenizer.chat_template and not notes
    assert chat_prompt_text(student, [{"role": "user", "content": "q"}])[0] == "[user]q<|im_end|>[assistant]"
    assert choose_path(student, teacher, "auto") == "own"
    with pytest.raises(OpdError, match="chat_template=nope.jinja: there is no such file"):
        choose_templates(tokenizer, None, "nope.jinja", "", None)


def test_a_qwen3_conversation_end_to_end_the_teacher_in_its_own_template(families):
    """A Qwen3 student rolls out a two-turn conversation in the training template (its thinking kept in the
    row); a Qwen3 teacher grades each turn after the conversation as its own template renders it (the earlier
    turn's thinking dropped, as at inference)."""
    own = families["qwen3"]
    student, teacher, notes = choose_templates(own, own, "", "", AskTwice())
    assert "qwen3_training" in notes[0] and chat_template_of(teacher) == own.chat_template
    assert choose_path(student, teacher, "auto") == "own"
    think = "<think>\nhm\n</think>\n\n"
    replies = [think + "= 4", think + "yes"]

    draw = scripted(student, replies, [])
    task = ArithmeticTask(operators=2)
    examples = task.train_examples(0, 1, 0)
    prompts = [chat_prompt_ids(student, ex.messages) for ex in examples]
    rows = roll_out(draw, student, AskTwice(), "ask", examples, prompts, samples_per_prompt=1, max_turns=3,
                    max_new_tokens=64, max_tokens=400)
    batch = pack(rows, student.pad_token_id, torch.device("cpu"), task, "ask")
    conversation = examples[0].messages + [{"role": "assistant", "content": replies[0]},
                                           {"role": "user", "content": "Sure?"},
                                           {"role": "assistant", "content": replies[1]}]
    row = batch.tokens[0][batch.attention_mask[0] > 0].tolist()
    assert student.decode(row) + "\n" == render(student, conversation, False)  # the training template's
    assert "hm" not in render(teacher, conversation[:-1], True)  # the teacher's own drops past thinking
    model = make_model(own, layers=1, width=16, seed=3).eval()
    scorer = LocalTeacher(model, len(own))
    scored = grade(TeacherView(scorer, student, teacher), batch)
    want = []
    for turn in batch.turns[0]:
        direct = pack_pairs([chat_prompt_ids(teacher, turn.before)], [batch.tokens[0, turn.start:turn.end].tolist()],
                            own.pad_token_id)
        want.append(scorer.score(direct)[direct.completion_mask > 0])
    torch.testing.assert_close(scored.logprobs[0][batch.completion_mask[0] > 0], torch.cat(want))
