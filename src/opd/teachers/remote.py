"""A teacher behind an HTTP server that speaks the OpenAI-compatible completions API with vLLM's
``prompt_logprobs`` (vLLM, SGLang's vLLM-compatible mode, or ``opd serve``)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from opd.models import OpdError
from opd.rollouts import Rollouts

PROBE_TEXT = "Compute 12+(3*4)-5\nAnswer: 19. The quick brown fox, über café ✓"


class RemoteTeacher:
    """Scores rollouts by sending each row's tokens as a prompt with ``prompt_logprobs=0``.

    Rows go out in requests of ``rows_per_request`` sequences, ``concurrency`` requests at a time.
    Connection errors, timeouts and 5xx answers are retried with exponential backoff; after
    ``retries`` failures the error names the server and the last failure."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 0.5, rows_per_request: int = 16, concurrency: int = 8) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.rows_per_request, self.concurrency = rows_per_request, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.model = model

    def request(self, method: str, path: str, json: dict | None = None) -> dict:
        last: str  # the latest failure; set by every failed attempt (there is at least one)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.request(method, path, json=json)
            except httpx.TransportError as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise OpdError(f"teacher server {self.url}{path} refused the request: HTTP "
                               f"{response.status_code}: {response.text[:500]}")
            return response.json()
        raise OpdError(f"teacher server {self.url} did not answer {method} {path} after {self.retries + 1} "
                       f"tries; last failure: {last}. Is it running? The run's last checkpoint is kept; "
                       "continue with `opd train --resume RUN_DIR` once the server is back.")

    def connect(self, tokenizer, context_needed: int, source: str = "student") -> None:
        """Check the served model before training: its name, context length and tokenizer. ``tokenizer`` is
        the one opd will send ids in: the student's (``source`` "student"), or the one given by
        ``teacher_tokenizer=`` for a teacher with another tokenizer ("teacher_tokenizer")."""
        listing = self.request("GET", "/v1/models")
        models = {m["id"]: m for m in listing.get("data", [])}
        if self.model is None:
            if len(models) != 1:
                raise OpdError(f"teacher server {self.url} serves {sorted(models)}; choose one with teacher_model=")
            self.model = next(iter(models))
        if self.model not in models:
            raise OpdError(f"teacher server {self.url} does not serve {self.model!r}; it serves {sorted(models)}")
        max_len = models[self.model].get("max_model_len")
        if max_len is not None and max_len < context_needed:
            raise OpdError(f"teacher {self.model} at {self.url} has a context of {max_len} tokens, but prompts "
                           f"plus max_new_tokens need up to {context_needed}")
        served = self.request("POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                                    "add_special_tokens": False})["tokens"]
        local = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        if served != local:
            fix = ("If the teacher's tokenizer differs from the student's, give it as teacher_tokenizer=DIR (a "
                   "directory or hub id with its tokenizer files): opd then aligns the two on the text."
                   if source == "student" else "teacher_tokenizer= must be the served model's tokenizer.")
            raise OpdError(f"the tokenizer of teacher {self.model} at {self.url} differs from the {source}'s: "
                           f"a probe text encodes to {served[:12]}... there and {local[:12]}... here. {fix}")
        vocab = models[self.model].get("vocab_size")
        if vocab is not None and vocab < len(tokenizer):
            raise OpdError(f"teacher {self.model} at {self.url} has {vocab} token ids, the {source}'s tokenizer "
                           f"{len(tokenizer)}")

    def score_sequences(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 of each sequence."""
        chunks = [sequences[i : i + self.rows_per_request] for i in range(0, len(sequences), self.rows_per_request)]

        def send(chunk: list[list[int]]) -> list[list[float]]:
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "prompt_logprobs": 0,
                    "temperature": 0.0}
            choices = sorted(self.request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise OpdError(f"teacher server {self.url} answered {len(choices)} choices for {len(chunk)} prompts "
                               "(one each expected): is it an OpenAI-compatible completions server?")
            out = []
            for seq, choice in zip(chunk, choices, strict=True):
                entries = choice["prompt_logprobs"]
                out.append([entries[t][str(seq[t])]["logprob"] for t in range(1, len(seq))])
            return out

        with ThreadPoolExecutor(self.concurrency) as pool:
            return [row for part in pool.map(send, chunks) for row in part]

    def top_logprobs(self, sequences: list[list[int]], top_k: int) -> list[list[dict[int, float]]]:
        """For each sequence, at each position t >= 1: ``{token id: log p}`` for the server's ``top_k`` most
        likely tokens there and the sequence's own token (vLLM's ``prompt_logprobs``: ``top_k`` + 1 entries
        at most). One sequence per request, ``concurrency`` at a time."""

        def ask(sequence: list[int]) -> list[dict[int, float]]:
            body = {"model": self.model, "prompt": [sequence], "max_tokens": 1, "prompt_logprobs": top_k,
                    "temperature": 0.0}
            entries = self.request("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"][1:]
            return [{int(token): value["logprob"] for token, value in entry.items()} for entry in entries]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(ask, sequences))

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        mask = rollouts.attention_mask.cpu()
        tokens = rollouts.tokens.cpu()
        starts = [int(row.nonzero()[0]) for row in mask]
        sequences = [tokens[b, s:][mask[b, s:] > 0].tolist() for b, s in enumerate(starts)]
        scored = self.score_sequences(sequences)
        out = torch.zeros(tokens.shape, dtype=torch.float32)
        for b, (start, logprobs) in enumerate(zip(starts, scored, strict=True)):
            out[b, start + 1 : start + 1 + len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
        return out.to(rollouts.tokens.device) * rollouts.completion_mask
