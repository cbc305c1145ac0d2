"""``samplers.turns`` at its own interface: conversations rolled out turn by turn with a scripted draw (each
turn's reply fixed, so every column is known), packed into one batch: the environment's tokens read but not
sampled, each turn's columns and the conversation before it, the rewards, and the token budget."""

from __future__ import annotations

import torch

from opd.models import chat_prompt_ids
from opd.rollouts import pack_pairs
from opd.samplers.turns import environment_ids, pack, render, roll_out
from opd.tasks import ArithmeticTask


class AskTwice:
    """A user who asks "Sure?" once, then ends; the reward is the number of replies."""

    tools = None

    def start(self, example):
        return Asking()


class Asking:
    def __init__(self) -> None:
        self.replies = 0

    def respond(self, reply: str):
        self.replies += 1
        return [{"role": "user", "content": "Sure?"}] if self.replies == 1 else None

    def reward(self):
        return float(self.replies)


def scripted(tokenizer, replies: list[str], seen: list):
    """A draw that answers turn ``t`` of every context with ``replies[t]`` and EOS (log-prob -1 per token)."""
    def draw(contexts: list[list[int]], max_new_tokens: int, turn: int, stops: list[int]):
        seen.append([list(c) for c in contexts])
        ids = (tokenizer.encode(replies[turn], add_special_tokens=False) + [tokenizer.eos_token_id])[:max_new_tokens]
        drawn = pack_pairs(contexts, [ids] * len(contexts), tokenizer.pad_token_id)
        drawn.sampler_logprobs = -drawn.completion_mask
        return drawn
    return draw


def test_environment_tokens_are_the_difference_of_two_renderings(tokenizer):
    answer = [{"role": "user", "content": "Sure?"}]
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.decode(environment_ids(tokenizer, answer))
    assert render(tokenizer, probe + answer, True).endswith(text)
    assert "Sure?" in text


def test_a_rolled_out_conversation_packs_into_one_row_per_conversation(tokenizer):
    task = ArithmeticTask(operators=2)
    examples = task.train_examples(0, 2, 0)
    prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in examples]
    seen: list = []
    rows = roll_out(scripted(tokenizer, ["= 4", "yes"], seen), tokenizer, AskTwice(), "ask", examples, prompts,
                    samples_per_prompt=2, max_turns=4, max_new_tokens=8, max_tokens=200)
    assert len(rows) == 4 and all(len(t.spans) == 2 and t.done and not t.cut for t in rows)
    first = tokenizer.encode("= 4", add_special_tokens=False) + [tokenizer.eos_token_id]
    between = environment_ids(tokenizer, [{"role": "user", "content": "Sure?"}])
    assert seen[1][0] == prompts[0] + first + between  # the second turn reads the first and the answer
    batch = pack(rows, tokenizer.pad_token_id, torch.device("cpu"), task, "ask")
    assert batch.prompt_index.tolist() == [0, 0, 1, 1] and batch.rewards.tolist() == [2.0] * 4
    assert batch.messages == [ex.messages for ex in examples for _ in range(2)]
    second = tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id]
    for row in range(4):
        turns = batch.turns[row]
        sampled = batch.tokens[row][batch.completion_mask[row] > 0].tolist()
        assert sampled == first + second  # the environment's tokens are not sampled
        assert [batch.tokens[row, t.start:t.end].tolist() for t in turns] == [first, second]
        assert turns[0].before == examples[row // 2].messages
        assert turns[1].before == examples[row // 2].messages + [{"role": "assistant", "content": "= 4"},
                                                                 {"role": "user", "content": "Sure?"}]
        assert (batch.sampler_logprobs[row][batch.completion_mask[row] > 0] == -1).all()
        assert int(batch.attention_mask[row].sum()) == len(prompts[row // 2]) + len(first + between + second)
    assert batch.conversation["conversations"] == 4 and batch.conversation["turns"] == 8
    assert batch.conversation["cut"] == 0


def test_the_token_budget_cuts_a_conversation_short(tokenizer):
    task = ArithmeticTask(operators=2)
    examples = task.train_examples(0, 1, 0)
    prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in examples]
    first = tokenizer.encode("= 4", add_special_tokens=False) + [tokenizer.eos_token_id]
    budget = len(prompts[0]) + len(first) + 2  # no room for the environment's answer
    rows = roll_out(scripted(tokenizer, ["= 4", "yes"], []), tokenizer, AskTwice(), "ask", examples, prompts,
                    samples_per_prompt=1, max_turns=4, max_new_tokens=8, max_tokens=budget)
    assert rows[0].cut and len(rows[0].spans) == 1 and len(rows[0].prompt) + len(rows[0].ids) <= budget
