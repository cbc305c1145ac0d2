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
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

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
    from opd.environments import TOOL_CALL, parse_tool_calls

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


def leading_special(tokenizer, text: str) -> str:
    """The special (added) token ``text`` starts with, or ""."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:1]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if not ids or ids[0] not in special:
        return ""
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if text.startswith(token) else ""


def between_turns(tokenizer, messages: list[dict]) -> str:
    """The text between an assistant turn's EOS (the student's last sampled token) and the next turn's first
    sampled token: the rest of the turn's end, ``messages`` and the generation prompt, as the template renders
    them after a probe turn. The conversation up to that EOS must render the same once ``messages`` follow
    (prefix-preserving). A template that closes a past turn with another special token than the one the model
    stops on (GPT-OSS: ``<|end|>`` for ``<|return|>``) keeps the sampled one in the row."""
    eos = tokenizer.eos_token or ""
    if not eos:
        raise OpdError("a conversation needs the tokenizer's eos_token (the student ends each turn on it): set one")
    probe = for_template(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": REPLY}]
                         + messages)[:2]  # the assistant's turn as the template reads it before these messages
    before, after = rendered(tokenizer, probe, False), rendered(tokenizer, probe + messages, True)
    anchor = before.rfind(REPLY)
    if anchor < 0:
        raise OpdError(f"{describe(tokenizer)} drops the assistant's reply from its rendering, so a conversation "
                       "cannot be kept token for token: give chat_template=PATH with one that keeps it")
    end = before.find(eos, anchor)
    if end < 0:  # no EOS after the reply: the next message's opening may be what the model stops on (GLM)
        if after.startswith(before) and after[len(before):].startswith(eos):
            return after[len(before) + len(eos):]
        raise OpdError(f"{describe(tokenizer)} does not end an assistant turn with the tokenizer's EOS {eos!r} "
                       f"(after the reply it renders {before[anchor + len(REPLY):][:40]!r}, then "
                       f"{after[len(before):][:40]!r}), and the student ends each turn on its EOS: set the "
                       "tokenizer's eos_token to the token the model ends a turn with")
    if after[:end] != before[:end]:
        where = next(i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b)
        family = family_of(chat_template_of(tokenizer))
        fix = (f"opd runs conversations in TRL's {family}_training template when it is installed (pip install trl)"
               if training_template(family) else "give chat_template=PATH with a template that is")
        raise OpdError(f"{describe(tokenizer)} renders a conversation's start differently once it goes on (it is "
                       f"not prefix-preserving: {before[where:end][:50]!r} becomes {after[where:end][:50]!r}), so "
                       f"a turn's tokens cannot be appended to the sampled ones: {fix}")
    rest = after[end:]
    closer = eos if rest.startswith(eos) else leading_special(tokenizer, rest) if end == anchor + len(REPLY) else ""
    if not closer:  # (another closer only in the EOS's place: right after the reply)
        raise OpdError(f"{describe(tokenizer)} ends a past assistant turn with {rest[:40]!r} where the model "
                       f"ends it with {eos!r}: give chat_template=PATH with a template that keeps the turn's end")
    return rest[len(closer):]


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
