"""Environments: what answers the student's turns in a multi-turn conversation.

An environment is given like ``reward=`` (an object, or ``module:Name`` naming a class or a factory): its
``start(example)`` opens one conversation, whose ``respond(reply)`` takes the assistant's reply text and
returns the messages that answer it (tool results, a user's next turn) or None when the conversation is
over; ``reward()`` is the conversation's final reward (None: the task's verifier reads the last reply), and
``tools`` (on the environment) the JSON schemas the chat template is given (None: no tools). An environment
that reads the assistant's turn itself has ``read(tokenizer, context, ids)`` (the turn's token ids, its stop
token included, after the conversation's ``context`` ids), which returns the turn as a message (None: its text,
``{"role": "assistant", "content": reply}``); its conversations' ``respond`` is then given that message (a dict),
which is also the conversation's assistant turn.

``ToolEnvironment`` is the built-in one (``tools=module:fn,module:fn``): Python functions called with the
arguments of each tool call in the reply; a reply without a call ends the conversation, and every call's
result (or what was wrong with it) answers it as a ``tool`` message. ``tool_format=auto`` (the default) reads
the calls the family's way, transformers' ``parse_response`` with the family's response template (the
tokenizer's own, else the one TRL has for the chat template: Qwen's Hermes JSON and XML, Llama 3.1/3.2,
GPT-OSS, GLM-4-MoE, Gemma 4, LFM2, ...; ``templates.response_template``), the turn handed back to the template
with structured ``tool_calls``; where there is none, as ``hermes``: the Hermes/Qwen format
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number per reply) in the reply's text, which
the turn keeps as it is. ``tool_format=compact`` is the embedded family's own ``[NAME ARGUMENT]``.

What the environment says is checked as it is said: an exception in it, or a turn that is not a list of
``{"role": "user" | "tool" | "system", "content": str}`` messages, stops the run with an ``OpdError`` naming
the environment, the prompt and the turn (the run's last checkpoint stays as it was).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from opd.errors import OpdError
from opd.tasks import Example
from opd.tool_calls import ToolCall, parse_compact_calls, parse_tool_calls, structured_call

ROLES = ("user", "tool", "system")
TOOL_FORMATS = ("auto", "hermes", "compact")


class Conversation(Protocol):
    def respond(self, reply: str) -> list[dict] | None:
        """The messages that answer the assistant's ``reply``; None when the conversation is over."""
        ...

    def reward(self) -> float | None:
        """The conversation's reward once it is over (None: the task's verifier reads the last reply)."""
        ...


class Environment(Protocol):
    tools: list[dict] | None  # the tools' JSON schemas, for the chat template (None: no tools)

    def start(self, example: Example) -> Conversation:
        ...


def tool_schema(function: Callable) -> dict:
    """The JSON schema chat templates take for ``function`` (transformers' ``get_json_schema``: its type hints
    and its docstring's ``Args:``)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(function)
    except Exception as err:  # noqa: BLE001 - transformers raises its own types for a missing docstring
        raise OpdError(f"tool {getattr(function, '__name__', function)!r}: {err}. A tool needs type hints and a "
                       "docstring with an Args: section (transformers' get_json_schema reads them)") from None


@dataclass
class ToolConversation:
    environment: ToolEnvironment
    calls: int = 0
    valid_calls: int = 0

    def respond(self, reply: str | dict) -> list[dict] | None:
        calls = self.environment.calls(reply)
        if not calls:
            return None
        out = []
        for call in calls:
            self.calls += 1
            function = self.environment.functions.get(call.name)
            if not call.error and function is None:
                call.error = f"there is no tool {call.name!r} (tools: {', '.join(self.environment.functions)})"
            if call.error:
                out.append({"role": "tool", "name": call.name or "error", "content": f"error: {call.error}"})
                continue
            try:
                result = function(call.argument) if call.argument is not None else function(**call.arguments)
                self.valid_calls += 1
            except Exception as err:  # noqa: BLE001 - the tool's error is the model's to read
                result = f"error: {type(err).__name__}: {err}"
            out.append({"role": "tool", "name": call.name, "content": str(result)})
        return out

    def reward(self) -> float | None:
        return None

    def figures(self) -> dict:
        return {"tool_calls": self.calls, "valid_tool_calls": self.valid_calls}


class ToolEnvironment:
    """Tool calling: each reply's calls are run and their results answer it; a reply without one ends the
    conversation (the task's verifier grades it). ``call_format``: ``TOOL_FORMATS`` (see the module)."""

    def __init__(self, functions: list[Callable], call_format: str = "auto") -> None:
        if not functions:
            raise OpdError("tools= names no function")
        if call_format not in TOOL_FORMATS:
            raise OpdError(f"tool_format={call_format!r} must be one of {', '.join(TOOL_FORMATS)}")
        self.functions = {f.__name__: f for f in functions}
        self.tools = [tool_schema(f) for f in functions]
        self.format = call_format
        self.parse = parse_compact_calls if call_format == "compact" else parse_tool_calls

    def read(self, tokenizer, context: list[int], ids: list[int]) -> dict | None:
        """The assistant's turn ``ids`` (its stop token included) after ``context`` as a message with structured
        ``tool_calls``, where ``tool_format=auto`` and the family has a response template
        (``templates.response_template``): as transformers' ``parse_response`` reads it, the arguments typed by
        the tools' schemas. None (the turn is its text, whose calls ``parse`` finds) otherwise: another format,
        no response template, a reply without calls, or one the family's parser cannot read."""
        from opd.templates import response_template

        schema = response_template(tokenizer) if self.format == "auto" else None
        if schema is None:
            return None
        try:
            message = tokenizer.parse_response(ids, schema=schema, prefix=context, tools=self.tools)
        except Exception:  # noqa: BLE001 - a reply the family's parser cannot read is read as text
            return None
        if not isinstance(message, dict) or not message.get("tool_calls"):
            return None
        return {**message, "role": "assistant", "content": message.get("content") or ""}

    def calls(self, reply: str | dict) -> list[ToolCall]:
        """The calls in ``reply``: a message's structured ``tool_calls`` (``read``), else those ``parse`` finds
        in its text (a message's ``content``, or the reply text itself)."""
        if isinstance(reply, dict) and reply.get("tool_calls"):
            return [structured_call(call) for call in reply["tool_calls"]]
        return self.parse(reply.get("content") or "" if isinstance(reply, dict) else reply)

    def start(self, example: Example) -> ToolConversation:
        return ToolConversation(self)


@dataclass(frozen=True)
class Dialogue:
    """A run's conversations: its environment, the environment's name in messages, and their bounds."""

    environment: Environment
    name: str
    max_turns: int
    max_tokens: int  # a conversation's tokens at most, its prompt included


def checked_turn(turn, name: str, example: Example, reply: str) -> list[dict] | None:
    """``turn`` as the environment returned it, or an ``OpdError`` saying what is wrong with it."""
    if turn is None:
        return None
    where = f"environment {name}, prompt {example.messages[-1]['content'][:60]!r}, after the reply {reply[:60]!r}"
    if not isinstance(turn, list) or not turn:
        raise OpdError(f"{where}: respond() returned {type(turn).__name__} {str(turn)[:60]!r}; it must return a "
                       "non-empty list of messages, or None when the conversation is over")
    for i, message in enumerate(turn):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"),
                                                                                          str)):
            raise OpdError(f"{where}: message {i} of its turn is {str(message)[:80]!r}; each must be "
                           f"{{'role': {' | '.join(ROLES)}, 'content': str}}")
    return turn


def read_turn(environment: Environment, tokenizer, context: list[int], ids: list[int], name: str) -> dict | None:
    """``environment.read(tokenizer, context, ids)``, checked: a message (a dict with a ``content`` string) or
    None; anything else, or an exception in it, is an ``OpdError`` naming the environment."""
    try:
        message = environment.read(tokenizer, context, ids)
    except Exception as err:  # noqa: BLE001 - a user's environment: stop, explained
        raise OpdError(f"environment {name}: read() raised {type(err).__name__}: {err}") from err
    if message is not None and not (isinstance(message, dict) and isinstance(message.get("content"), str)):
        raise OpdError(f"environment {name}: read() returned {str(message)[:80]!r}; it must return a message "
                       "({'role': 'assistant', 'content': str, ...}) or None")
    return message


def respond(conversation: Conversation, reply: str, name: str, example: Example,
            message: dict | None = None) -> list[dict] | None:
    """``conversation.respond(reply)`` (``respond(message)`` for an environment that reads its turns itself: the
    message its ``read`` returned), checked; an exception in it becomes an ``OpdError`` naming it."""
    try:
        turn = conversation.respond(reply if message is None else message)
    except OpdError:
        raise
    except Exception as err:  # noqa: BLE001 - any error in a user's environment stops the run, explained
        raise OpdError(f"environment {name} raised {type(err).__name__}: {err} (prompt "
                       f"{example.messages[-1]['content'][:60]!r}, after the reply {reply[:60]!r}); the run "
                       "stopped, its last checkpoint kept: fix the environment and --resume") from err
    return checked_turn(turn, name, example, reply)


def final_reward(conversation: Conversation, name: str) -> float | None:
    try:
        value = conversation.reward()
    except Exception as err:  # noqa: BLE001
        raise OpdError(f"environment {name}: reward() raised {type(err).__name__}: {err}") from err
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise OpdError(f"environment {name}: reward() returned {value!r}; it must be a number or None")
    return None if value is None else float(value)


def load_environment(spec: str, tools: str, tool_format: str = "auto",
                     given=None) -> tuple[Environment | None, str]:
    """``given`` (a Python object, ``opd.train(..., environment=)``), else ``environment=module:Name`` (a class or
    factory called with no arguments, or an instance) or ``tools=module:fn,...`` (the built-in
    ``ToolEnvironment``); (None, "") when none is set."""
    from opd.tasks.custom import load_object

    if given is not None:
        return checked_environment(given, type(given).__name__)
    if spec and tools:
        raise OpdError("give environment= or tools=, not both (an environment of your own runs its own tools)")
    if tools:
        functions = []
        for item in (t.strip() for t in tools.split(",") if t.strip()):
            value = load_object(item, "tools")
            functions.extend(value if isinstance(value, list | tuple) else [value])
        if not all(callable(f) for f in functions):
            raise OpdError(f"tools={tools!r}: each entry must name a function (or a list of functions)")
        return ToolEnvironment(functions, tool_format), f"tools={tools}"
    if not spec:
        return None, ""
    if spec.startswith("python:"):
        raise OpdError(f"environment={spec}: this run's environment was a Python object; pass it again "
                       "(opd.train(..., environment=...)) or give its import path, environment=module:Name")
    value = load_object(spec, "environment")
    return checked_environment(value() if isinstance(value, type) or (callable(value) and not hasattr(value, "start"))
                               else value, spec)


def checked_environment(environment, name: str) -> tuple[Environment, str]:
    if not hasattr(environment, "start"):
        raise OpdError(f"environment {name} has no start(example) method; see opd.environments")
    return environment, name
