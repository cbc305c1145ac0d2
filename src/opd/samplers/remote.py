"""The student's rollouts from a server: vLLM's OpenAI-compatible ``/v1/completions`` (``vllm serve``,
``opd serve``, or anything that speaks it), with the student's weights pushed to it after every update.

A request sends token-id prompts and asks for ``n`` samples each, stopping at the student's EOS (a
conversation's turn: at any of its stop ids, ``stop_token_ids``), with
the sampled tokens' ids (``return_token_ids``, or vLLM's older ``return_tokens_as_token_ids`` strings)
and their log-probs (``logprobs=0``). The server's log-probs become ``Rollouts.engine_logprobs``: the
engine's numerics are not the trainer's, which the trainer corrects with a truncated importance weight
(``losses.truncated_importance_weights``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

from opd.errors import OpdError
from opd.http import JsonClient, check_served
from opd.rollouts import Rollouts, pack_pairs


def request_seed(*parts: int) -> int:
    """A seed for one request, a pure function of (run seed, step, rank, chunk): reruns draw the same."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_ids(completions: list[list[int]], vocab_size: int | None, engine: str, fix: str) -> None:
    """Refuse a sampled token id past the student tokenizer's ``vocab_size`` ids (None: not known): the model's
    embedding is padded past its tokenizer (e.g. Qwen's 151,936 rows for 151,669 tokens) and ``engine`` sampled
    a padded row, which has no text and which opd's own sampler never draws; ``fix`` says what to do."""
    if vocab_size is None:
        return
    for ids in completions:
        if ids and max(ids) >= vocab_size:
            raise OpdError(f"{engine} sampled token id {max(ids)}, past the student tokenizer's {vocab_size} ids: the "
                           "model's embedding is padded past its tokenizer (e.g. Qwen's 151,936 rows for 151,669 "
                           f"tokens) and the engine samples the padded rows; {fix}")


def stop_list(eos_id: int | list[int]) -> list[int]:
    """The stop ids a draw is given (``eos_id``: one id, or a conversation turn's list), as a list."""
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


def choice_tokens(choice: dict, where: str) -> tuple[list[int], list[float]]:
    """A choice's sampled token ids and their log-probs: ``token_ids`` (vLLM >= 0.10.2 with
    ``return_token_ids``) or ``logprobs.tokens`` as ``token_id:N`` (``return_tokens_as_token_ids``)."""
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs")
    if values is None:
        raise OpdError(f"{where}: the answer has no logprobs.token_logprobs (was logprobs=0 honoured?)")
    ids = choice.get("token_ids")
    if ids is None:
        tokens = logprobs.get("tokens") or []
        if not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            raise OpdError(f"{where}: the answer carries neither token_ids nor tokens as 'token_id:N'; the server "
                           "must honour return_token_ids or return_tokens_as_token_ids (vLLM does)")
        ids = [int(t.partition(":")[2]) for t in tokens]
    if len(ids) != len(values) or any(v is None for v in values):
        raise OpdError(f"{where}: {len(ids)} sampled tokens but {len(values)} log-probs")
    return list(ids), [float(v) for v in values]


class RemoteSampler:
    """Samples through ``url``'s completions API. ``model`` is the served name to sample from; a LoRA run
    switches it to the adapter loaded after each update (``samplers.sync``)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 retries: int = 4, backoff: float = 0.5, rows_per_request: int = 64, concurrency: int = 4) -> None:
        self.http = JsonClient(url, "rollout server", api_key, timeout, retries, backoff, concurrency)
        self.url = self.http.url
        self.model = model
        self.base_model: str | None = None
        self.vocab_size: int | None = None  # the student tokenizer's ids: a token past them has no text
        self.rows_per_request, self.concurrency = rows_per_request, concurrency
        self.pool = ThreadPoolExecutor(concurrency)

    def connect(self, tokenizer, context_needed: int) -> None:
        """Check the served model (name, context, tokenizer) before training."""
        self.vocab_size = len(tokenizer)
        self.model = self.base_model = check_served(
            self.http, "sampler", self.model, "sampler_model", tokenizer, context_needed,
            tokenizer_fix="The rollout server must serve the student (its tokenizer).")

    def sample(self, prompts: list[list[int]], *, samples_per_prompt: int, max_new_tokens: int, temperature: float,
               top_p: float, eos_id: int | list[int], pad_id: int, seed: tuple[int, ...]) -> Rollouts:
        """Rollouts in the in-process sampler's layout (rows grouped by prompt), with the server's log-probs
        as ``engine_logprobs``; ``sampler_logprobs`` is left for the trainer to fill with its own."""
        per_request = max(self.rows_per_request // samples_per_prompt, 1)
        chunks = [prompts[i : i + per_request] for i in range(0, len(prompts), per_request)]
        model = self.model

        def ask(index: int) -> list[tuple[list[int], list[float]]]:
            chunk = chunks[index]
            body = {"model": model, "prompt": chunk, "n": samples_per_prompt, "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "logprobs": 0, "stop_token_ids": stop_list(eos_id),
                    "seed": request_seed(*seed, index), "return_token_ids": True,
                    "return_tokens_as_token_ids": True, "skip_special_tokens": False}
            choices = self.http.request("POST", "/v1/completions", body).get("choices") or []
            if len(choices) != len(chunk) * samples_per_prompt:
                raise OpdError(f"rollout server {self.url} answered {len(choices)} choices for {len(chunk)} prompts x "
                               f"n={samples_per_prompt}: is it an OpenAI-compatible completions server?")
            choices = sorted(choices, key=lambda c: c["index"])
            return [choice_tokens(c, f"rollout server {self.url}, choice {c['index']}") for c in choices]

        drawn = [row for part in self.pool.map(ask, range(len(chunks))) for row in part]
        completions = [ids for ids, _ in drawn]
        for ids in completions:
            if len(ids) > max_new_tokens:
                raise OpdError(f"rollout server {self.url} returned {len(ids)} tokens for max_tokens={max_new_tokens}")
        check_ids(completions, self.vocab_size, f"rollout server {self.url}", "serve it with opd serve, which "
                  "samples the tokenizer's ids only, or make the server's vocabulary the tokenizer's")
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        rollouts = pack_pairs(rows, completions, pad_id)
        rollouts.prompt_index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        width = max(len(p) for p in prompts)
        engine = torch.zeros(rollouts.tokens.shape)
        for row, (_, values) in enumerate(drawn):
            engine[row, width : width + len(values)] = torch.tensor(values)
        rollouts.engine_logprobs = engine
        return rollouts

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
