"""Tool calls read out of a reply's text (``tool_format=hermes``: ``<tool_call>{JSON}</tool_call>``; ``compact``: the
embedded family's ``[NAME ARGUMENT]``) or out of a message's structured ``tool_calls``; ``opd.environments`` runs
them, ``opd.templates`` hands them back to a template that needs them structured."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
COMPACT_CALL = re.compile(r"\[(\w+) ([^\]\n]*)\]")  # the embedded family's: [calc 347*86]


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
        calls.append(named_call(value["name"], value.get("arguments", {})))
    if reply.count("<tool_call>") > len(calls):
        calls.append(ToolCall("", {}, "a <tool_call> is not closed"))
    return calls


def structured_call(call) -> ToolCall:
    """One of a message's structured ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}``)
    as a ``ToolCall``; one without a name or with arguments that are not an object is invalid."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return ToolCall("", {}, 'a call is {"name": ..., "arguments": {...}}')
    return named_call(function["name"], function.get("arguments") or {})


def named_call(name: str, arguments) -> ToolCall:
    """A call of ``name`` with ``arguments``: an object, or a JSON string of one (as some models write them);
    anything else is an invalid call."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, "the arguments must be an object")
    return ToolCall(name, arguments)
