"""Where a step's rows come from: one interface, ``RolloutSource.rollouts(step)``, that returns this rank's
``Rollouts`` with their rewards and the conversations they answer (``Rollouts.messages``).

The sources, each given plain arguments at setup:

- ``Sampled``: a model's samples of the step's prompts, drawn in process (``InProcess``: the student, or
  the teacher for ``method=sft``) or by a rollout server (``ServerSamples``: vLLM or ``opd serve``, the
  weights pushed before every draw, through ``OnServer``, the one place a source talks to a server).
- ``OffPolicy``: GKD's off-policy rows, each prompt's reference completion or the teacher's samples.
- ``Mixed``: GKD's ``lmbda``, the student's rows of the step then the off-policy ones.
- ``Conversations``: whole conversations (``samplers.turns``), every assistant turn the student's (or for
  ``sft`` the teacher's), the environment answering each; in process or through a rollout server.
- ``DataPairs``: ``sft_data``'s (prompt, completion) pairs; ``Documents``: midtraining's document chunks
  mixed with chat pairs.

The trainer asks its one source and never tests which kind it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from opd import distributed
from opd.environments import Dialogue
from opd.errors import OpdError
from opd.evaluation import completions_text
from opd.models import chat_prompt_ids
from opd.rollouts import OffPolicyRows, Rollouts, concat_rollouts, pack_pairs
from opd.samplers.local import NOISE_STREAM, Noise, sample_in_batches
from opd.samplers.service import RolloutService, reweight
from opd.samplers.turns import DrawTurn, pack, roll_out
from opd.tasks import Example, Task
from opd.tasks.jsonl import epoch_order
from opd.templates import reply_stops


@dataclass(frozen=True)
class Prompter:
    """A conversation as the student's prompt ids: its chat template, within ``max_prompt_tokens`` (the
    context less ``max_new_tokens``); a longer prompt is refused, or with ``truncate`` keeps its end."""

    tokenizer: object
    max_prompt_tokens: int
    truncate: bool = False

    def ids(self, messages: list[dict]) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, messages)
        if len(ids) > self.max_prompt_tokens:
            if not self.truncate:
                raise OpdError(f"a prompt of {len(ids)} tokens exceeds max_prompt_tokens="
                               f"{self.max_prompt_tokens} (context minus max_new_tokens): shorten it, "
                               f"lower max_new_tokens, or set truncate_prompts=true to keep its end")
            ids = ids[-self.max_prompt_tokens:]
        return ids

    @cached_property
    def stops(self) -> list[int]:
        """The tokens a reply stops on (``templates.reply_stops``: the EOS and the token the student's template
        ends a reply with, Phi-3's ``<|end|>``, Gemma 3's ``<end_of_turn>``), read once from the template."""
        return reply_stops(self.tokenizer)

    def completion(self, text: str, max_new_tokens: int) -> list[int]:
        """A given completion as token ids: cut to ``max_new_tokens - 1`` tokens, the reply's end appended (the
        token the sampler stops the student's own replies on)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)[: max_new_tokens - 1]
        return ids + [self.stops[-1]]


@dataclass(frozen=True)
class Draw:
    """How rows are sampled: the settings every sampler shares."""

    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    rows_per_call: int = 0  # sample_batch: rows the in-process sampler draws at once (0: all of them)
    noise: Noise | None = None  # sample_noise: the environment's replacements of drawn tokens

    def stream(self, step: int, rank: int, offset: int = 0) -> int:
        """The seed of a step's draws on ``rank`` (rank 0: as one process; ``offset``: another stream)."""
        return self.seed * 1_000_003 + step + rank * 7_919_000_003 + offset


@dataclass
class StepPrompts:
    """Each step's prompts, this rank's share, and GKD's split: the first ``round(on_policy_share * n)`` of
    this rank's prompts are answered by the student, the rest are off-policy."""

    task: Task
    prompts_per_step: int
    train_prompts: int  # 0: a fresh draw every step; N: the N prompts of step 0 reused in a reshuffled cycle
    seed: int
    dist: distributed.Dist
    on_policy_share: float = 1.0
    recent: dict = field(default_factory=dict)  # step -> split: each part of a step (and the next) reads it once

    def all(self, step: int) -> list[Example]:
        """The step's prompts (all ranks')."""
        if not self.train_prompts:
            return self.task.train_examples(step, self.prompts_per_step, self.seed)
        pool = self.task.train_examples(0, self.train_prompts, self.seed)
        return [pool[i] for i in epoch_order(len(pool), step, self.prompts_per_step, self.seed)]

    def split(self, step: int) -> tuple[list[Example], list[Example]]:
        """This rank's (on-policy, off-policy) prompts of ``step``."""
        if step not in self.recent:
            mine = distributed.shard(self.all(step), self.dist)
            count = round(self.on_policy_share * len(mine))
            self.recent = {k: v for k, v in self.recent.items() if k == step - 1}  # this step, the last, the next
            self.recent[step] = mine[:count], mine[count:]
        return self.recent[step]


@dataclass(frozen=True)
class Rewards:
    """Each row's task reward and the conversation it answers (``messages``, ``teacher_names``, and
    ``teacher_messages``: what the teacher reads, the same objects unless a row has privileged context)."""

    tokenizer: object
    task: Task

    def attach(self, rollouts: Rollouts, examples: list[Example], per_prompt: int) -> Rollouts:
        texts = completions_text(self.tokenizer, rollouts.written_ids())
        repeated = [ex for ex in examples for _ in range(per_prompt)]
        rollouts.messages = [ex.messages for ex in repeated]
        rollouts.teacher_names = [ex.teacher or "" for ex in repeated]  # teachers=: who scores each row
        rollouts.teacher_messages = [ex.teacher_conversation for ex in repeated]  # privileged context
        rollouts.rewards = torch.tensor([self.task.reward(t, ex) for t, ex in zip(texts, repeated, strict=True)],
                                        device=rollouts.tokens.device)
        return rollouts


class OnServer:
    """A rollout server behind a source, and the one place a source talks to it: the student's weights
    pushed before a draw, the trainer's own log-probs of the server's samples with their truncated
    importance weights (``reweighted``), the push time, and the release and close of the server."""

    def __init__(self, service: RolloutService, model: torch.nn.Module, vocab_size: int, draw: Draw,
                 tis_cap: float, dist: distributed.Dist) -> None:
        self.service, self.model, self.vocab_size, self.draw = service, model, vocab_size, draw
        self.tis_cap, self.dist = tis_cap, dist

    @property
    def where(self) -> str:
        return self.service.sampler.url

    def push(self, version: int) -> None:
        """The server holds the weights after ``version`` updates."""
        self.service.ensure_weights(self.model, version, self.dist)

    def reweighted(self, rollouts: Rollouts) -> Rollouts:
        """The server's samples with the trainer's log-probs as ``sampler_logprobs``, importance weights
        against the server's (``engine_logprobs``) and the step's mismatch sums (``Rollouts.engine``)."""
        rollouts.engine = reweight(self.model, rollouts, self.vocab_size, self.draw.temperature, self.draw.top_p,
                                   self.tis_cap, self.draw.rows_per_call)
        return rollouts


class RolloutSource:
    """The interface, and what every source with a rollout server behind it (``server``) does with it."""

    server: OnServer | None = None

    @property
    def where(self) -> str:
        """The rollout server behind the source, for messages ("" without one)."""
        return "" if self.server is None else self.server.where

    def rollouts(self, step: int) -> Rollouts | None:
        raise NotImplementedError

    def push_seconds(self) -> float | None:
        """Seconds spent pushing weights to a rollout server since the last call (None: no server)."""
        return None if self.server is None else self.server.service.lap()

    def finish(self, steps: int) -> None:
        """The run's last update is done: a rollout server ends holding the trained student."""
        if self.server is not None:
            self.server.push(steps)

    def release(self) -> None:
        """The weights pushed to a rollout server leave it (``opd plan``'s probe: not the run's)."""
        if self.server is not None:
            self.server.service.sync.release()

    def close(self) -> None:
        """Release what the source holds (a server's connections, a colocated engine)."""
        if self.server is not None:
            self.server.service.close()


class InProcess:
    """A model in this process samples ``samples_per_prompt`` completions of each prompt. The teacher
    (``teacher_prompt``: its own rendering) reads the prompt in its own template when its view says so
    (``own``), and its own context when a prompt has one (``teacher_messages``); its completions are then
    re-packed after the student's rendering, which the student trains on."""

    def __init__(self, model: torch.nn.Module, prompter: Prompter, draw: Draw, vocab_size: int,
                 device: torch.device, rank: int, seed_offset: int = 0, teacher_prompt=None, own: bool = False) -> None:
        self.model, self.prompter, self.draw, self.vocab_size = model, prompter, draw, vocab_size
        self.device, self.rank, self.seed_offset, self.teacher_prompt = device, rank, seed_offset, teacher_prompt
        self.own = own

    def sample(self, examples: list[Example], step: int) -> Rollouts:
        draw, tokenizer = self.draw, self.prompter.tokenizer
        prompts = [self.prompter.ids(ex.messages) for ex in examples]
        seed = draw.stream(step, self.rank, self.seed_offset)
        reads_own = self.teacher_prompt is not None and (self.own or any(ex.teacher_messages for ex in examples))
        if reads_own and draw.noise is not None:
            raise OpdError("sample_noise with a teacher that writes in its own chat template or context: its samples "
                           "are re-packed after the student's rendering, where the replaced tokens' places are lost")
        rollouts = sample_in_batches(
            self.model, [self.teacher_prompt(ex.teacher_conversation) for ex in examples] if reads_own else prompts,
            rows=draw.rows_per_call, samples_per_prompt=draw.samples_per_prompt, max_new_tokens=draw.max_new_tokens,
            temperature=draw.temperature, top_p=draw.top_p, eos_id=self.prompter.stops,
            pad_id=tokenizer.pad_token_id, vocab_size=self.vocab_size,
            generator=torch.Generator(self.device).manual_seed(seed),
            noise=draw.noise and replace(draw.noise, seed=seed + NOISE_STREAM))
        if reads_own:  # the student trains on the teacher's completion after its own rendering
            groups = rollouts.prompt_index
            rollouts = pack_pairs([p for p in prompts for _ in range(draw.samples_per_prompt)],
                                  rollouts.completion_ids(), tokenizer.pad_token_id).to(self.device)
            rollouts.prompt_index = groups.to(self.device)
        return rollouts


class Sampled(RolloutSource):
    """A model's samples of the step's (on-policy) prompts, with rewards: drawn ``InProcess``, or by a
    rollout server (``ServerSamples``). A step without on-policy prompts (``lmbda=0``) gives None."""

    def __init__(self, prompts: StepPrompts, sampler: InProcess, rewards: Rewards) -> None:
        self.prompts, self.sampler, self.rewards = prompts, sampler, rewards

    def rollouts(self, step: int) -> Rollouts | None:
        examples = self.prompts.split(step)[0]
        if not examples:
            return None
        return self.rewards.attach(self.sampler.sample(examples, step), examples, self.sampler.draw.samples_per_prompt)


class ServerSamples(RolloutSource):
    """The student's samples of the step's prompts drawn by a rollout server (``server``), the weights
    pushed before every draw; with ``async_rollouts`` the next step's are drawn during this step's update
    (one update stale). The trainer's own log-probs of the samples become ``sampler_logprobs``, with
    truncated importance weights against the server's (``Rollouts.engine``: the mismatch statistics)."""

    def __init__(self, server: OnServer, prompts: StepPrompts, prompter: Prompter, rewards: Rewards, steps: int,
                 async_rollouts: bool, device: torch.device) -> None:
        self.server, self.prompts, self.prompter, self.rewards = server, prompts, prompter, rewards
        self.steps, self.async_rollouts, self.device = steps, async_rollouts, device

    def rollouts(self, step: int) -> Rollouts | None:
        if not self.prompts.split(step)[0]:
            return None
        server = self.server
        examples, rollouts = server.service.rollouts(step, self.prompts, self.prompter, server.draw, server.model,
                                                     self.async_rollouts and step + 1 < self.steps)
        rollouts = server.reweighted(rollouts.to(self.device))
        return self.rewards.attach(rollouts, examples, server.draw.samples_per_prompt)


class OffPolicy(RolloutSource):
    """GKD's off-policy part: each prompt's reference completion from the data (one row), or with
    ``seq_kd`` (or when a prompt has none) ``samples_per_prompt`` of the teacher's samples, with rewards;
    ``Rollouts.offpolicy`` says which. The teacher samples only here, when these rows need it."""

    def __init__(self, prompts: StepPrompts, teacher: InProcess, prompter: Prompter, rewards: Rewards,
                 seq_kd: bool) -> None:
        self.prompts, self.teacher, self.prompter = prompts, teacher, prompter
        self.rewards, self.seq_kd = rewards, seq_kd

    def rollouts(self, step: int) -> Rollouts | None:
        examples = self.prompts.split(step)[1]
        if not examples:
            return None
        sampled = self.seq_kd or any(not ex.completion for ex in examples)
        if sampled:
            rollouts, per_prompt = self.teacher.sample(examples, step), self.teacher.draw.samples_per_prompt
        else:
            max_new_tokens, pad = self.teacher.draw.max_new_tokens, self.prompter.tokenizer.pad_token_id
            rollouts = pack_pairs([self.prompter.ids(ex.messages) for ex in examples],
                                  [self.prompter.completion(ex.completion, max_new_tokens) for ex in examples],
                                  pad).to(self.teacher.device)
            per_prompt = 1
        rollouts = self.rewards.attach(rollouts, examples, per_prompt)
        rollouts.offpolicy = OffPolicyRows(per_prompt, sampled)
        return rollouts


class Mixed(RolloutSource):
    """GKD's ``lmbda``: this rank's on-policy rows, then its off-policy ones (``Rollouts.on_policy`` tells
    them apart); either part may be empty in a step."""

    def __init__(self, on: Sampled | ServerSamples, off: OffPolicy, pad_id: int, device: torch.device) -> None:
        self.on, self.off, self.pad_id, self.device = on, off, pad_id, device
        self.server = on.server  # the student's part may be drawn by a rollout server

    def rollouts(self, step: int) -> Rollouts:
        rollouts, extra = self.on.rollouts(step), self.off.rollouts(step)
        if extra is None:
            return rollouts
        if rollouts is None:
            extra.on_policy = torch.zeros(extra.tokens.shape[0], dtype=torch.bool, device=self.device)
            return extra
        merged = concat_rollouts(rollouts, extra, self.pad_id)
        merged.on_policy = torch.arange(merged.tokens.shape[0], device=self.device) < rollouts.tokens.shape[0]
        return merged


class Conversations(RolloutSource):
    """The step's conversations as a rollout source: every assistant turn drawn in process, or with
    ``server`` by a rollout server (one request per open conversation and turn, the weights pushed first; the
    trainer's own log-probs then become ``sampler_logprobs``, as for ``ServerSamples``)."""

    def __init__(self, prompts: StepPrompts, prompter: Prompter, draw: Draw, dialogue: Dialogue, task,
                 model: torch.nn.Module, vocab_size: int, device: torch.device, rank: int,
                 server: OnServer | None = None) -> None:
        self.prompts, self.prompter, self.draw, self.dialogue, self.task = prompts, prompter, draw, dialogue, task
        self.model, self.vocab_size, self.device, self.rank, self.server = model, vocab_size, device, rank, server

    def draw_turn(self, step: int) -> DrawTurn:
        """One sample of each context: the server's (seeded by step and turn), or the model's in process
        (one generator a step, seeded as ``InProcess`` seeds its draws)."""
        draw, tokenizer = self.draw, self.prompter.tokenizer
        if self.server is not None:
            sampler = self.server.service.sampler

            def served(contexts: list[list[int]], max_new_tokens: int, turn: int, stops: list[int]) -> Rollouts:
                return sampler.sample(contexts, samples_per_prompt=1, max_new_tokens=max_new_tokens,
                                      temperature=draw.temperature, top_p=draw.top_p, eos_id=stops,
                                      pad_id=tokenizer.pad_token_id, seed=(draw.seed, step * 1000 + turn, self.rank))
            return served
        generator = torch.Generator(self.device).manual_seed(draw.stream(step, self.rank))

        def local(contexts: list[list[int]], max_new_tokens: int, turn: int, stops: list[int]) -> Rollouts:
            return sample_in_batches(self.model, contexts, rows=draw.rows_per_call, samples_per_prompt=1,
                                     max_new_tokens=max_new_tokens, temperature=draw.temperature, top_p=draw.top_p,
                                     eos_id=stops, pad_id=tokenizer.pad_token_id,
                                     vocab_size=self.vocab_size, generator=generator)
        return local

    def rollouts(self, step: int) -> Rollouts | None:
        examples = self.prompts.split(step)[0]
        if not examples:
            return None
        if self.server is not None:
            self.server.push(step)
        talk = self.dialogue
        rows = roll_out(self.draw_turn(step), self.prompter.tokenizer, talk.environment, talk.name, examples,
                        [self.prompter.ids(ex.messages) for ex in examples], self.draw.samples_per_prompt,
                        talk.max_turns, self.draw.max_new_tokens, talk.max_tokens)
        rollouts = pack(rows, self.prompter.tokenizer.pad_token_id, self.device, self.task, talk.name)
        if self.server is not None:
            rollouts.engine_logprobs = rollouts.sampler_logprobs.clone()
            rollouts = self.server.reweighted(rollouts)
        return rollouts


class DataPairs(RolloutSource):
    """``sft_data``: this rank's (prompt, completion) pairs of the step, in a seeded order reshuffled every
    epoch; each completion cut to ``max_new_tokens - 1`` tokens with EOS appended."""

    def __init__(self, pairs: list[tuple[Example, str]], prompts_per_step: int, prompter: Prompter,
                 max_new_tokens: int, seed: int, rewards: Rewards, dist: distributed.Dist,
                 device: torch.device) -> None:
        self.pairs, self.prompts_per_step, self.prompter, self.max_new_tokens = pairs, prompts_per_step, prompter, \
            max_new_tokens
        self.seed, self.rewards, self.dist, self.device = seed, rewards, dist, device

    def ids(self, index: int) -> tuple[list[int], list[int]]:
        """Pair ``index`` as token ids: the chat-rendered prompt and the completion."""
        example, text, *_ = self.pairs[index]
        return self.prompter.ids(example.messages), self.prompter.completion(text, self.max_new_tokens)

    def trained(self, index: int, length: int) -> list[float]:
        """Pair ``index``'s loss mask over its ``length`` completion ids: 0 on a token that overlaps one of its
        ``untrained`` character spans (``load_sft_pairs``), 1 elsewhere (the appended EOS included)."""
        _, text, *rest = self.pairs[index]
        spans = rest[0] if rest else ()
        if not spans:
            return [1.0] * length
        offsets = self.prompter.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        mask = [0.0 if any(a < end and start < b for start, end in spans) else 1.0 for a, b in offsets]
        return mask[:length - 1] + [1.0]  # the completion is cut to max_new_tokens - 1 tokens, then EOS

    def rollouts(self, step: int) -> Rollouts:
        order = epoch_order(len(self.pairs), step, self.prompts_per_step, self.seed)
        mine = distributed.shard(order, self.dist)
        pairs = [self.ids(i) for i in mine]
        trained = [self.trained(i, len(c)) for i, (_, c) in zip(mine, pairs, strict=True)]
        rollouts = pack_pairs([p for p, _ in pairs], [c for _, c in pairs], self.prompter.tokenizer.pad_token_id,
                              trained)
        return self.rewards.attach(rollouts.to(self.device), [self.pairs[i][0] for i in mine], 1)


class Documents(RolloutSource):
    """``method=midtrain``: this rank's share of the step's document chunks (each chunk's first token is its
    prompt, the rest is trained on) and, with ``chat_fraction``, chat pairs from ``sft_data``."""

    def __init__(self, chunks: list[list[int]], chats: DataPairs, prompts_per_step: int, chat_fraction: float,
                 seed: int, dist: distributed.Dist, device: torch.device) -> None:
        self.chunks, self.chats, self.prompts_per_step, self.chat_fraction = chunks, chats, prompts_per_step, \
            chat_fraction
        self.seed, self.dist, self.device = seed, dist, device

    def rollouts(self, step: int) -> Rollouts:
        chats = round(self.prompts_per_step * self.chat_fraction)
        docs = epoch_order(len(self.chunks), step, self.prompts_per_step - chats, self.seed)
        pairs = epoch_order(len(self.chats.pairs), step, chats, self.seed + 1) if chats else []
        # document chunks are token lists, chat pairs indices into sft_data; each rank encodes only its own
        mine = distributed.shard([self.chunks[i] for i in docs] + pairs, self.dist)
        rows = [([item[0]], item[1:]) if isinstance(item, list) else self.chats.ids(item) for item in mine]
        rollouts = pack_pairs([p for p, _ in rows], [c for _, c in rows], self.chats.prompter.tokenizer.pad_token_id)
        rollouts.rewards = torch.zeros(len(rows))
        return rollouts.to(self.device)


def document_chunks(path: str, tokenizer, length: int, options) -> list[list[int]]:
    """Each document's tokens, EOS appended, cut into pieces of ``length`` (pieces under 2 tokens dropped)."""
    from opd.tasks.jsonl import load_documents

    chunks = []
    for text in load_documents(path, options):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        chunks += [ids[i : i + length] for i in range(0, len(ids), length) if len(ids[i : i + length]) >= 2]
    return chunks
