"""Rollouts of whole conversations: the student samples every assistant turn, an environment
(``opd.environments``) answers each, until it says the conversation is over, ``max_turns`` turns were
sampled, or the row would pass ``max_trajectory_tokens``.

One row per conversation, in the student's tokens as its chat template renders the conversation: the
prompt, then each sampled turn (its stop token included: the EOS, or the token the template ends that kind
of turn with, ``templates.turn_stops``) followed by the environment's messages (``environment_ids``).
``completion_mask`` is 1 on the sampled tokens alone: the environment's tokens are read (they are the context
of the turns after them) but carry no advantage and no gradient, and the teacher grades only sampled tokens.
``Rollouts.turns`` holds each row's turn spans (columns) and the conversation before each turn, for a teacher
that reads the conversation in its own template (``teachers.grade``). ``samplers.sources.Conversations`` is
the rollout source that draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opd.chat_settings import chat_template_of
from opd.environments import Conversation, Environment, final_reward, read_turn, respond
from opd.errors import OpdError
from opd.rollouts import Rollouts, Turn, pack_pairs
from opd.tasks import Example
from opd.templates import between_turns, rendered, turn_stops


def render(tokenizer, messages: list[dict], generation: bool) -> str:
    """``messages`` as the chat template renders them (``models.chat_template_of``: a training template
    ``opd.templates`` chose, or the tokenizer's own), with the tokenizer's ``template_kwargs`` (the environment's
    ``tools`` among them: ``setup`` puts them there, for the student's and the teacher's); a template that cannot
    render them raises an ``OpdError`` naming it and why, never the template's own error."""
    return rendered(tokenizer, messages, generation)


def with_template(tokenizer):
    """``tokenizer``, checked to have a chat template (a conversation is rendered in it)."""
    if not chat_template_of(tokenizer):
        raise OpdError("a conversation needs the student's chat template (this student has none): give a "
                       "tokenizer with one")
    return tokenizer


def environment_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens between an assistant turn's stop token and the next turn's first sampled token: ``messages``
    (the environment's) and the generation prompt, as the chat template renders them after the turn's end
    (``templates.between_turns``: the difference of two renderings, so any template's format is kept; a template
    that does not extend its own rendering is refused)."""
    return tokenizer.encode(between_turns(with_template(tokenizer), messages), add_special_tokens=False)


def stop_ids(tokenizer, environment: Environment) -> list[int]:
    """The tokens a turn of a conversation with ``environment`` stops on (``templates.turn_stops``): the EOS, and
    the tokens the template ends a turn with before a user's message or, with tools, a tool result."""
    return turn_stops(with_template(tokenizer), bool(getattr(environment, "tools", None)))


@dataclass
class Trajectory:
    """One conversation as it is sampled."""

    example: Example
    conversation: Conversation
    prompt: list[int]
    messages: list[dict]  # the student's conversation so far
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each turn's [start, end) in ids
    before: list[int] = field(default_factory=list)  # len(messages) before each turn
    done: bool = False
    cut: bool = False  # ended by max_turns or the token budget, not by the environment
    reply: str = ""  # the last assistant turn's text

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.sampled += [logprobs is not None] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def row_logprobs(drawn: Rollouts) -> list[list[float]]:
    """Each row's log-probs of its sampled tokens (a server's: ``engine_logprobs``)."""
    values = drawn.engine_logprobs if drawn.engine_logprobs is not None else drawn.sampler_logprobs
    return [[v for v, m in zip(row, mask, strict=True) if m > 0]
            for row, mask in zip(values.tolist(), drawn.completion_mask.tolist(), strict=True)]


# (contexts, max_new_tokens, turn, stop ids) -> one sample of each context, ended by one of the stop ids
DrawTurn = Callable[[list[list[int]], int, int, list[int]], Rollouts]


def roll_out(draw_turn: DrawTurn, tokenizer, environment: Environment, name: str, examples: list[Example],
             prompts: list[list[int]], samples_per_prompt: int, max_turns: int, max_new_tokens: int,
             max_tokens: int) -> list[Trajectory]:
    """``samples_per_prompt`` conversations of each example (``prompts``: their rendered prompt ids), every
    assistant turn of every open conversation drawn in one ``draw_turn`` call per turn, which stops each on the
    turn's stop tokens (``stop_ids``); the one a turn ended on stays in the row as it was sampled."""
    stops = stop_ids(tokenizer, environment)
    reads = hasattr(environment, "read")  # an environment that reads each turn itself (environments)
    rows = []
    for example, prompt in zip(examples, prompts, strict=True):
        for _ in range(samples_per_prompt):
            rows.append(Trajectory(example, start(environment, example, name), prompt, list(example.messages)))
    for turn in range(max_turns):
        active = [t for t in rows if not t.done]
        if not active:
            break
        room = [max_tokens - len(t.prompt) - len(t.ids) for t in active]
        drawn = draw_turn([t.prompt + t.ids for t in active], min(max_new_tokens, max(room)), turn, stops)
        for t, ids, logprobs, free in zip(active, drawn.completion_ids(), row_logprobs(drawn), room, strict=True):
            ids, logprobs, context = ids[:free], logprobs[:free], t.prompt + t.ids
            t.before.append(len(t.messages))
            t.spans.append((len(t.ids), len(t.ids) + len(ids)))
            t.add(ids, logprobs)
            ended = bool(ids) and ids[-1] in stops
            t.reply = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
            message = {"role": "assistant", "content": t.reply}
            if reads and ended:  # the environment reads the turn itself (tool calls, structured)
                message = read_turn(environment, tokenizer, context, ids, name) or message
            t.messages.append(message)
            if not ended:  # the turn ran out of tokens
                t.done = t.cut = True
                continue
            answer = respond(t.conversation, t.reply, name, t.example, message if reads else None)
            if answer is None:
                t.done = True
                continue
            more = environment_ids(tokenizer, answer)
            if turn == max_turns - 1 or len(t.prompt) + len(t.ids) + len(more) >= max_tokens:
                t.done = t.cut = True  # the environment goes on, the trajectory may not
                continue
            t.add(more, None)
            t.messages.extend(answer)
    return rows


def start(environment: Environment, example: Example, name: str) -> Conversation:
    try:
        return environment.start(example)
    except Exception as err:  # noqa: BLE001 - a user's environment: stop, explained
        raise OpdError(f"environment {name}: start() raised {type(err).__name__}: {err} (prompt "
                       f"{example.messages[-1]['content'][:60]!r})") from err


def pack(rows: list[Trajectory], pad_id: int, device: torch.device, task, name: str) -> Rollouts:
    """The conversations as one batch (``pack_pairs``' layout: prompts left-padded, the rest after them), the
    mask on sampled tokens only; rewards from the environment (else the task's verifier on the last reply)."""
    rollouts = pack_pairs([t.prompt for t in rows], [t.ids for t in rows], pad_id)
    width = max(len(t.prompt) for t in rows)
    sampled = torch.zeros(rollouts.tokens.shape)
    logprobs = torch.zeros(rollouts.tokens.shape)
    for row, t in enumerate(rows):
        sampled[row, width:width + len(t.ids)] = torch.tensor(t.sampled, dtype=torch.float32)
        logprobs[row, width:width + len(t.ids)] = torch.tensor(t.logprobs, dtype=torch.float32)
    rollouts.completion_mask = sampled
    rollouts.sampler_logprobs = logprobs
    groups, index = {}, []
    for t in rows:  # the samples of one prompt are consecutive
        index.append(groups.setdefault(id(t.example), len(groups)))
    rollouts.prompt_index = torch.tensor(index)
    rewards = []
    for t in rows:
        value = final_reward(t.conversation, name)
        rewards.append(value if value is not None else float(task.reward(t.reply, t.example)))
    rollouts.rewards = torch.tensor(rewards)
    rollouts = rollouts.to(device)
    rollouts.messages = [t.example.messages for t in rows]
    rollouts.teacher_names = [t.example.teacher or "" for t in rows]
    rollouts.teacher_messages = [t.example.teacher_conversation for t in rows]
    rollouts.turns = [[Turn(width + a, width + b, t.messages[:n]) for (a, b), n in zip(t.spans, t.before, strict=True)]
                      for t in rows]
    rollouts.conversation = figures(rows)
    return rollouts


def figures(rows: list[Trajectory]) -> dict:
    """The step's conversation figures: turns per conversation, the share cut short, tool calls."""
    out = {"conversations": len(rows), "turns": sum(len(t.spans) for t in rows),
           "cut": sum(t.cut for t in rows), "tool_calls": 0, "valid_tool_calls": 0, "tool_users": 0}
    for t in rows:
        more = t.conversation.figures() if hasattr(t.conversation, "figures") else {}
        out["tool_calls"] += more.get("tool_calls", 0)
        out["valid_tool_calls"] += more.get("valid_tool_calls", 0)
        out["tool_users"] += more.get("valid_tool_calls", 0) > 0
    return out
