"""Chat templates in conversations: rendering that fails as an ``OpdError``, the environment's tokens between two
turns, and the template each side reads a conversation in.

A conversation's row appends the environment's tokens to the student's sampled ones (``samplers.turns``), so the
student's template must be *prefix-preserving*: a conversation renders the same once it goes on. Some families'
are not (Qwen3 drops the last turn's ``<think>`` block once another message follows); TRL ships a training
variant for those (``<family>_training.jinja``), which ``choose_templates`` takes from the installed ``trl`` at run
time (nothing is copied into opd) when the family's own template is recognised (an exact match with one TRL ships)
and fails the probe conversation, and the user gave no ``chat_template=``. The model's own template stays on its
tokenizer (what a checkpoint saves); the teacher keeps its own unless ``teacher_chat_template=`` gives one. A
template that cannot express the conversation at all (no ``tool`` role) is refused before any compute.

A sampled turn stops on the EOS or on the token the template ends that kind of turn with (``turn_stops``: GPT-OSS
``<|call|>``, Gemma 4 ``<|tool_response>``, Phi-3 ``<|end|>``), which the row keeps as sampled; the environment's
tokens after it are the template's (``turn_end``). ``response_template`` is how the family's replies are read back
into messages with structured tool calls (``tool_format=auto``), the tokenizer's own or the installed TRL's.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from jinja2 import TemplateError

from opd.chat_settings import chat_template_of, template_kwargs, with_chat_template
from opd.errors import OpdError

REPLY = "opd-reply"  # the probe's assistant turn: a text no template adds
RESULT = "opd-result-27"  # the probe's tool result, which the rendering must keep
# what a template raises: jinja2's TemplateError (raise_exception, UndefinedError), and Python's on bad values
RENDER_ERRORS = (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
NEEDS_CALLS: dict[str, bool] = {}  # template -> whether it renders a tool result only after structured calls


@functools.cache
def trl_templates() -> dict[str, str]:
    """Every chat template the installed TRL ships (``trl/chat_templates/*.jinja``: name -> text), read without
    importing TRL; empty when it is not installed."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.jinja"))}


def family_of(template: str | None) -> str | None:
    """The name of the TRL template ``template`` is, byte for byte (``qwen3``, ``qwen3_training``); None."""
    if not template:
        return None
    return next((name for name, text in trl_templates().items() if text == template), None)


def training_template(family: str | None) -> str | None:
    """TRL's training variant of the ``family`` template (prefix-preserving), when it ships one."""
    if not family or family.endswith("_training"):
        return None
    return trl_templates().get(f"{family}_training")


def response_template(tokenizer) -> dict | None:
    """How a reply in the tokenizer's family is read back into a message (``content``, structured ``tool_calls``;
    transformers' ``parse_response``): the tokenizer's own ``response_template`` (a checkpoint's, which transformers
    loads), else the one TRL's ``add_response_schema`` gives its chat template or the family of the one its
    conversations use (TRL's training variant), where TRL ships that template; None where neither."""
    own = getattr(tokenizer, "response_template", None)
    if own:
        return own
    family = family_of(chat_template_of(tokenizer)) or ""
    original = trl_templates().get(family.removesuffix("_training"))
    candidates = [t for t in (tokenizer.chat_template, original) if isinstance(t, str)]
    return next((found for t in candidates if (found := trl_response_template(t)) is not None), None)


@functools.cache
def trl_response_template(template: str) -> dict | None:
    """The response template TRL's ``add_response_schema`` sets for the chat template ``template`` (one TRL ships
    and knows how to parse), read from the installed TRL at run time; None when it has none or TRL is missing."""
    if importlib.util.find_spec("trl") is None:
        return None
    from trl.chat_template_utils import add_response_schema

    holder = SimpleNamespace(chat_template=template)  # add_response_schema sets its template on what it is given
    try:
        add_response_schema(holder)
    except ValueError:  # a template TRL does not recognise
        return None
    return getattr(holder, "response_template", None)


def describe(tokenizer) -> str:
    """The template in words, for errors: its family when TRL's, else what it is."""
    family = family_of(chat_template_of(tokenizer))
    return f"the {family} chat template" if family else "this chat template (not one the installed TRL ships)"


def read_template(path: str, field: str) -> str | None:
    """The template in the file ``path`` (``chat_template=``), None when not given."""
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise OpdError(f"{field}={path}: there is no such file; give a Jinja chat template file (.jinja)")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise OpdError(f"{field}={path} is empty")
    return text


def structured_calls(messages: list[dict]) -> list[dict]:
    """``messages`` with ``tool_calls`` on each assistant turn a ``tool`` message answers, as templates such as
    GPT-OSS's need: the turn's Hermes calls when they match its answers, else one call per answer, named by it
    (the calls' text is then taken out of the turn's content)."""
    from opd.tool_calls import TOOL_CALL, parse_tool_calls

    out = [dict(m) for m in messages]
    for i, message in enumerate(out):
        if message.get("role") != "assistant" or message.get("tool_calls"):
            continue
        answers = []
        for later in out[i + 1:]:
            if later.get("role") != "tool":
                break
            answers.append(later)
        if not answers:
            continue
        parsed = [c for c in parse_tool_calls(message.get("content") or "") if not c.error]
        if len(parsed) != len(answers):
            parsed = [None] * len(answers)
        message["tool_calls"] = [{"type": "function", "function": {
            "name": call.name if call else answer.get("name", "tool"), "arguments": call.arguments if call else {}}}
            for call, answer in zip(parsed, answers, strict=True)]
        message["content"] = TOOL_CALL.sub("", message.get("content") or "").strip()
    return out


def apply(tokenizer, messages: list[dict], generation: bool) -> str:
    """``apply_chat_template`` with ``chat_template_of`` and the tokenizer's ``template_kwargs``, to text."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         chat_template=chat_template_of(tokenizer), **template_kwargs(tokenizer))


def needs_calls(tokenizer) -> bool:
    """Whether the template renders a tool result only after an assistant turn with structured ``tool_calls``
    (GPT-OSS's raises without them, Gemma 4's drops the result); probed once per template."""
    template = chat_template_of(tokenizer)
    if template not in NEEDS_CALLS:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": REPLY},
                 {"role": "tool", "name": "calc", "content": RESULT}]
        try:
            NEEDS_CALLS[template] = RESULT not in apply(tokenizer, probe, True)
        except RENDER_ERRORS:
            NEEDS_CALLS[template] = True
    return NEEDS_CALLS[template]


def for_template(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` as the template needs them: with structured ``tool_calls`` when it does (``needs_calls``)."""
    if any(m.get("role") == "tool" for m in messages) and needs_calls(tokenizer):
        return structured_calls(messages)
    return messages


def rendered(tokenizer, messages: list[dict], generation: bool) -> str:
    """``messages`` as the tokenizer's chat template (``chat_template_of``, with its ``template_kwargs``) renders
    them, the assistant's tool calls structured where the template needs them (``for_template``); a template
    that cannot render them raises an ``OpdError`` naming it and why, never its own error."""
    try:
        return apply(tokenizer, for_template(tokenizer, messages), generation)
    except RENDER_ERRORS as err:
        raise render_error(tokenizer, messages, err) from None


def render_error(tokenizer, messages: list[dict], err: Exception) -> OpdError:
    """The ``OpdError`` for a template that raised ``err`` on ``messages``: its family, the conversation's
    roles, the template's own words, and what to do."""
    roles = [m.get("role") for m in messages]
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "bos_token" in reason or "eos_token" in reason:
        advice = "the template reads a special token the tokenizer lacks: set it in the tokenizer's config"
    elif "tool" in roles:
        advice = ("it has no tool role: use a model whose template renders tool results, or give "
                  "chat_template=PATH (teacher_chat_template= for the teacher) with one that does")
    else:
        advice = "give chat_template=PATH (teacher_chat_template= for the teacher) with a template that renders it"
    return OpdError(f"{describe(tokenizer)} cannot render a conversation with the roles {' -> '.join(roles)} "
                    f"({type(err).__name__}: {reason[:160]}): {advice}")


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special and added tokens (the markers chat templates are written in)."""
    return set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())


def leading_special(tokenizer, text: str) -> str:
    """The special (added) token ``text`` starts with, or ""."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:1]
    if not ids or ids[0] not in special_ids(tokenizer):
        return ""
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if text.startswith(token) else ""


def trailing_special(tokenizer, text: str) -> str:
    """The special (added) token ``text`` ends with, whitespace after it aside, or ""."""
    stripped = text.rstrip()
    ids = tokenizer.encode(stripped, add_special_tokens=False)[-1:]
    if not ids or ids[0] not in special_ids(tokenizer):
        return ""
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if stripped.endswith(token) else ""


def probe_replies(tokenizer, messages: list[dict]) -> list[dict]:
    """The probe's assistant turn before ``messages``, as the template may read it: the text ``REPLY``; where
    ``messages`` open with tool results and the template renders them only after structured calls
    (``needs_calls``), one call per result, named by it, with ``REPLY`` its argument and no text (Gemma 4 renders a
    calling turn's text after the results), then (for a template that drops the calls) with the text too."""
    answers = []
    for message in messages:
        if message.get("role") != "tool":
            break
        answers.append(message)
    if not answers or not needs_calls(tokenizer):
        return [{"role": "assistant", "content": REPLY}]
    calls = [{"type": "function", "function": {"name": answer.get("name") or "tool", "arguments": {"opd": REPLY}}}
             for answer in answers]
    return [{"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "assistant", "content": REPLY, "tool_calls": calls}]


@dataclass(frozen=True)
class TurnEnd:
    """How an assistant turn ends before the environment's messages, in the template's text."""

    stop: str  # the token the model ends the turn with: the sampler stops on it, the row keeps it
    rest: str  # the text after the turn's end, the environment's: its messages and the next generation prompt


def turn_end(tokenizer, messages: list[dict]) -> TurnEnd:
    """The end of an assistant turn that ``messages`` follow, from two renderings of a probe conversation: the
    turn as the conversation's last message (as the model writes it) and with ``messages`` and the generation
    prompt after it. The model's stop token is, in this order:

    1. the tokenizer's EOS, where the two share it after the turn's text (``<|im_end|>``, ``<|eot_id|>``);
    2. else the last special token they share after the turn's text (Phi-3's ``<|end|>`` where the EOS is
       ``<|endoftext|>``, GPT-OSS's ``<|call|>`` and Gemma 4's ``<|tool_response>`` after a call);
    3. where they share none but each starts with one, the finished turn's: GPT-OSS ends an answer with
       ``<|return|>`` and closes it with ``<|end|>`` once the conversation goes on (the row keeps the sampled one);
    4. where the template writes nothing after the turn (GLM), the first special token of the message after it.

    The conversation up to the turn's text must render the same once ``messages`` follow (prefix-preserving), and
    a template that ends the turn with no special token is refused (the sampler could not stop it)."""
    if not tokenizer.eos_token:
        raise OpdError("a conversation needs the tokenizer's eos_token (a turn may end on it): set one")
    for reply in probe_replies(tokenizer, messages):
        probe = [{"role": "user", "content": "x"}, reply]
        before = rendered(tokenizer, probe, False)
        anchor = before.rfind(REPLY)
        if anchor >= 0:
            break
    else:
        raise OpdError(f"{describe(tokenizer)} drops the assistant's reply from its rendering, so a conversation "
                       "cannot be kept token for token: give chat_template=PATH with one that keeps it")
    after = rendered(tokenizer, probe + messages, True)
    start = anchor + len(REPLY)
    shared = len(os.path.commonprefix([before, after]))
    if shared < start:
        family = family_of(chat_template_of(tokenizer))
        fix = (f"opd runs conversations in TRL's {family}_training template when it is installed (pip install trl)"
               if training_template(family) else "give chat_template=PATH with a template that is")
        raise OpdError(f"{describe(tokenizer)} renders a conversation's start differently once it goes on (it is "
                       f"not prefix-preserving: {before[shared:start][:50]!r} becomes {after[shared:start][:50]!r}), "
                       f"so a turn's tokens cannot be appended to the sampled ones: {fix}")
    eos = before.find(tokenizer.eos_token, start, shared)
    if eos >= 0 and shared >= eos + len(tokenizer.eos_token):
        return TurnEnd(tokenizer.eos_token, after[eos + len(tokenizer.eos_token):])
    tail = before[start:shared].rstrip()
    stop = trailing_special(tokenizer, tail)
    if stop:
        return TurnEnd(stop, after[start + len(tail):])
    finished, past = leading_special(tokenizer, before[start:]), leading_special(tokenizer, after[start:])
    if finished and past:
        return TurnEnd(finished, after[start + len(past):])
    opening = leading_special(tokenizer, after[len(before):]) if shared == len(before) else ""
    if opening:
        return TurnEnd(opening, after[len(before) + len(opening):])
    raise OpdError(f"{describe(tokenizer)} ends no assistant turn with a special token (after the reply it renders "
                   f"{before[start:][:40]!r}, and {after[start:][:40]!r} once the conversation goes on), so the "
                   "student's sampler could not stop the turn: give chat_template=PATH with a template that ends "
                   "each assistant turn with one")


def between_turns(tokenizer, messages: list[dict]) -> str:
    """The text between an assistant turn's stop token (the student's last sampled token) and the next turn's
    first sampled token: ``messages`` and the generation prompt, as the template renders them (``turn_end``)."""
    return turn_end(tokenizer, messages).rest


def turn_stops(tokenizer, tools: bool) -> list[int]:
    """The tokens a conversation's sampled turn stops on: the tokenizer's EOS, then the token the template ends the
    model's turn with before each probe turn (``probe_turns``: a user's follow-up, a tool result when ``tools``;
    ``turn_end``). Just the EOS where the template ends every turn with it (the embedded family, Qwen, Llama)."""
    stops = [tokenizer.eos_token_id]
    for turn in probe_turns(tools):
        stop = tokenizer.convert_tokens_to_ids(turn_end(tokenizer, turn).stop)
        stops += [stop] if stop not in stops else []
    return stops


def reply_stops(tokenizer) -> list[int]:
    """The tokens a single reply (a training row, an evaluation, ``opd sample``, ``opd chat``) stops on: the EOS,
    and the token the template ends a finished assistant turn with (``turn_stops`` without tools: Phi-3's
    ``<|end|>``, Gemma 3's ``<end_of_turn>``, GPT-OSS's ``<|return|>``), the last in the list. The EOS alone where
    the template ends the turn with it, where the tokenizer has no chat template, or where opd cannot read the
    turn's end from its renderings (a conversation would be refused there; a single reply keeps the EOS)."""
    if not chat_template_of(tokenizer):
        return [tokenizer.eos_token_id]
    try:
        return turn_stops(tokenizer, False)
    except (OpdError, TemplateError):
        return [tokenizer.eos_token_id]


def probe_turns(tools: bool) -> list[list[dict]]:
    """The environment's turns a run's templates are checked with: a user's follow-up, and a tool result when
    the environment has tools."""
    turns = [[{"role": "user", "content": "And then?"}]]
    if tools:
        turns.append([{"role": "tool", "name": "calc", "content": RESULT}])
    return turns


def check_student(tokenizer, tools: bool) -> None:
    """The student's template appends each probe turn to a conversation (``between_turns``), the tool result
    kept; else an ``OpdError`` naming the template and why."""
    for turn in probe_turns(tools):
        text = between_turns(tokenizer, turn)
        if turn[0]["role"] == "tool" and RESULT not in text:
            raise OpdError(f"{describe(tokenizer)} has no tool role: it drops a tool message's result, so the "
                           "student would never read its tools' answers. Use a model whose template renders tool "
                           "results, or give chat_template=PATH with one that does")


def check_teacher(tokenizer, tools: bool) -> None:
    """The teacher's template renders a conversation with each probe turn (it reads each turn's context whole:
    ``teachers.grade``), the tool result kept; else an ``OpdError``."""
    for turn in probe_turns(tools):
        conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": REPLY}] + turn
        if RESULT not in rendered(tokenizer, conversation, True) and turn[0]["role"] == "tool":
            raise OpdError(f"the teacher's {describe(tokenizer)[4:]} has no tool role: it drops a tool message's "
                           "result. Give teacher_chat_template=PATH with one that renders it")


def conversation_template(tokenizer, check) -> tuple[object, str]:
    """``tokenizer`` with the template its conversations need: its own when ``check`` passes, else TRL's training
    variant of its family when that one passes (and a note saying so); else ``check``'s ``OpdError``."""
    try:
        check(tokenizer)
        return tokenizer, ""
    except OpdError as err:
        refusal = err
    family = family_of(chat_template_of(tokenizer))
    patched = training_template(family)
    if patched is None:
        raise refusal
    candidate = with_chat_template(tokenizer, patched)
    try:
        check(candidate)
    except OpdError as err:
        raise OpdError(f"{refusal} (TRL's {family}_training template fails too: {err})") from None
    return candidate, (f"conversations use TRL's {family}_training chat template (the model's own, {family}, "
                       f"fails: {refusal}); the saved tokenizer keeps its own")


def writing_template(tokenizer, environment):
    """``tokenizer`` as a model writes its own conversations in (the teacher's accuracy, measured on the
    environment's conversations): what a student's conversations take (``conversation_template``: its own
    template, or its family's training variant, which renders the same but for the dropped history), since a
    conversation's row appends each turn to the sampled tokens; None when no template can."""
    tools = bool(getattr(environment, "tools", None))
    try:
        return conversation_template(tokenizer, lambda t: check_student(t, tools))[0]
    except OpdError:
        return None


def choose_templates(student, teacher, chat_template: str, teacher_chat_template: str, environment) -> tuple:
    """(student tokenizer, teacher tokenizer, notes for the run's log): each rendering with ``chat_template=`` /
    ``teacher_chat_template=`` (files) when given; with an environment, each checked on a probe conversation
    before any compute, a recognised family's training template taken when its own fails (the teacher only when
    its own cannot render the conversation at all)."""
    student = with_chat_template(student, read_template(chat_template, "chat_template"))
    if teacher is not None:
        teacher = with_chat_template(teacher, read_template(teacher_chat_template, "teacher_chat_template"))
    if environment is None:
        return student, teacher, []
    tools = bool(getattr(environment, "tools", None))
    notes = []
    if chat_template:
        check_student(student, tools)
    else:
        student, note = conversation_template(student, lambda t: check_student(t, tools))
        notes += [f"the student: {note}"] if note else []
    if teacher is not None:
        if teacher_chat_template:
            check_teacher(teacher, tools)
        else:
            teacher, note = conversation_template(teacher, lambda t: check_teacher(t, tools))
            notes += [f"the teacher: {note}"] if note else []
    return student, teacher, notes
