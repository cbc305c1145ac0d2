"""``opd chat MODEL``: talk to a model directory in the terminal, with its own chat template.

The conversation keeps every turn while it fits: before each reply the oldest exchanges (a user turn and
the reply to it) are dropped until the rendered prompt plus ``max_new_tokens`` fits the model's context.
A system message, when given, is always kept. Without ``max_new_tokens`` a reply may take up to
``DEFAULT_REPLY_TOKENS`` or half the context, whichever is smaller, so the defaults work on a model of any
context (the embedded models have 256 positions).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

import torch

from opd.errors import OpdError
from opd.evaluation import completions_text
from opd.models import chat_prompt_ids
from opd.samplers.local import sample
from opd.templates import reply_stops

DEFAULT_REPLY_TOKENS = 256
HELP = "commands: /reset (forget the conversation), /help, /quit (or end of input)"


@dataclass
class Conversation:
    tokenizer: object
    context: int  # the model's context window, in tokens
    max_new_tokens: int
    system: str = ""
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, oldest first
    dropped: int = 0  # exchanges dropped so far to fit the context

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        """The conversation rendered for the next reply, its oldest exchanges dropped until it fits."""
        budget = self.context - self.max_new_tokens
        while True:
            ids = chat_prompt_ids(self.tokenizer, self.messages())
            if len(ids) <= budget:
                return ids
            if len(self.turns) <= 1:
                raise OpdError(f"this message alone is {len(ids)} tokens; with max_new_tokens={self.max_new_tokens} "
                               f"it does not fit the model's context of {self.context}")
            self.turns = self.turns[2:]  # one exchange: the oldest user turn and its reply
            self.dropped += 1

    def reset(self) -> None:
        self.turns, self.dropped = [], 0


def reply_budget(context: int, max_new_tokens: int | None) -> tuple[int, str]:
    """The longest reply in tokens, and a line saying how it was chosen when it was not asked for."""
    if max_new_tokens is None:
        budget = min(DEFAULT_REPLY_TOKENS, context // 2)
        if budget < DEFAULT_REPLY_TOKENS:
            return budget, f"(replies of up to {budget} tokens: half the model's context of {context}; " \
                           "--max-new-tokens sets it)"
        return budget, ""
    if not 0 < max_new_tokens < context:
        default = min(DEFAULT_REPLY_TOKENS, context // 2)
        raise OpdError(f"--max-new-tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                       f"{context}: give a value from 1 to {context - 1} (or leave it out: {default})")
    return max_new_tokens, ""


def chat(model: torch.nn.Module, tokenizer, *, temperature: float = 0.7, top_p: float = 1.0,
         max_new_tokens: int | None = None, system: str = "", seed: int = 0, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    """Read user turns from ``stdin`` (one line each) and write the model's replies to ``stdout``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    context = getattr(model.config, "max_position_embeddings", 2048)
    max_new_tokens, said = reply_budget(context, max_new_tokens)
    conversation = Conversation(tokenizer, context, max_new_tokens, system)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    interactive = stdin.isatty()
    if not tokenizer.chat_template:
        print("(this model has no chat template: each message is answered on its own)", file=stdout)
    if said:
        print(said, file=stdout)
    print(HELP, file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            conversation.reset()
            print("(conversation reset)", file=stdout)
            continue
        if text.strip() == "/help":
            print(HELP, file=stdout)
            continue
        conversation.turns.append({"role": "user", "content": text})
        dropped = conversation.dropped
        try:
            prompt = conversation.prompt_ids()
        except OpdError as err:
            conversation.turns.pop()
            print(f"(not sent: {err})", file=stdout)
            continue
        if conversation.dropped > dropped:
            print(f"(the {conversation.dropped} oldest exchanges no longer fit the context and were dropped)",
                  file=stdout)
        rollouts = sample(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_id=reply_stops(tokenizer), pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                          generator=generator)
        reply = completions_text(tokenizer, rollouts.completion_ids())[0].strip()
        conversation.turns.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", file=stdout, flush=True)
