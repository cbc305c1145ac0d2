"""Environments: what answers the student's turns in a multi-turn conversation.

An environment is given like ``reward=`` (an object, or ``module:Name`` naming a class or a factory): its
``start(example)`` opens one conversation, whose ``respond(reply)`` takes the assistant's reply text and
returns the messages that answer it (tool results, a user's next turn) or None when the conversation is
over; ``reward()`` is the conversation's final reward (None: the task's verifier reads the last reply), and
``tools`` (on the environment) the JSON schemas the chat template is given (None: no tools).

``ToolEnvironment`` is the built-in one (``tools=module:fn,module:fn``): Python functions called with the
arguments of each tool call in the reply, parsed in the Hermes/Qwen format the chat templates of those
families define (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number per reply), or with
``tool_format=compact`` the embedded family's own ``[NAME ARGUMENT]``; a reply without a call ends the
conversation, and every call's result (or what was wrong with it) answers it as a ``tool`` message.

What the environment says is checked as it is said: an exception in it, or a turn that is not a list of
``{"role": "user" | "tool" | "system", "content": str}`` messages, stops the run with an ``OpdError`` naming
the environment, the prompt and the turn (the run's last checkpoint stays as it was).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from opd.errors import OpdError
from opd.tasks import Example

ROLES = ("user", "tool", "system")
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
COMPACT_CALL = re.compile(r"\[(\w+) ([^\]\n]*)\]")  # the embedded family's: [calc 347*86]
TOOL_FORMATS = ("hermes", "compact")


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


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # why the call is invalid ("" when it is valid and its tool exists)
    argument: str | None = None  # the compact format's one argument, passed as the first parameter


def parse_compact_calls(reply: str) -> list[ToolCall]:
    """Every ``[NAME ARGUMENT]`` in ``reply`` (the embedded family's format: one string argument); a ``[NAME``
    that is not closed on its line is an invalid call."""
    calls = [ToolCall(name, {}, argument=argument.strip()) for name, argument in COMPACT_CALL.findall(reply)]
    if len(re.findall(r"\[\w+ ", reply)) > len(calls):
        calls.append(ToolCall("", {}, "a [call is not closed with ] on its line"))
    return calls


def parse_tool_calls(reply: str) -> list[ToolCall]:
    """Every ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` in ``reply``; an unclosed tag or a
    body that is not such an object is an invalid call (its ``error`` says why)."""
    calls = []
    for body in TOOL_CALL.findall(reply):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", {}, f"the call is not JSON ({err.msg})"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall("", {}, 'a call is {"name": ..., "arguments": {...}}'))
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            calls.append(ToolCall(value["name"], {}, "the arguments must be an object"))
            continue
        calls.append(ToolCall(value["name"], arguments))
    if reply.count("<tool_call>") > len(calls):
        calls.append(ToolCall("", {}, "a <tool_call> is not closed"))
    return calls


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

    def respond(self, reply: str) -> list[dict] | None:
        calls = self.environment.parse(reply)
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
    conversation (the task's verifier grades it)."""

    def __init__(self, functions: list[Callable], call_format: str = "hermes") -> None:
        if not functions:
            raise OpdError("tools= names no function")
        if call_format not in TOOL_FORMATS:
            raise OpdError(f"tool_format={call_format!r} must be one of {', '.join(TOOL_FORMATS)}")
        self.functions = {f.__name__: f for f in functions}
        self.tools = [tool_schema(f) for f in functions]
        self.parse = parse_tool_calls if call_format == "hermes" else parse_compact_calls

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


def respond(conversation: Conversation, reply: str, name: str, example: Example) -> list[dict] | None:
    """``conversation.respond(reply)``, checked; an exception in it becomes an ``OpdError`` naming it."""
    try:
        turn = conversation.respond(reply)
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


def load_environment(spec: str, tools: str, tool_format: str = "hermes",
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
