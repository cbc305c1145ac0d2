"""A teacher behind an HTTP server that speaks the OpenAI-compatible completions API with vLLM's
``prompt_logprobs`` (vLLM, SGLang's vLLM-compatible mode, or ``opd serve``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from opd.errors import OpdError
from opd.http import JsonClient, check_served
from opd.rollouts import Rollouts


class RemoteTeacher:
    """Scores rollouts by sending each row's tokens as a prompt with ``prompt_logprobs=0``.

    Rows go out in requests of ``rows_per_request`` sequences, ``concurrency`` requests at a time.
    Connection errors, timeouts and 5xx answers are retried with exponential backoff; after
    ``retries`` failures the error names the server and the last failure."""

    in_process = False  # a ``base.Teacher``: log-probs and top-k, as the server sends them

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 0.5, rows_per_request: int = 16, concurrency: int = 8) -> None:
        self.http = JsonClient(url, "teacher server", api_key, timeout, retries, backoff, concurrency)
        self.url, self.request = self.http.url, self.http.request
        self.rows_per_request, self.concurrency = rows_per_request, concurrency
        self.model = model  # the served model's name
        self.local_model, self.sharded = None, False  # nothing of it runs in this process

    def close(self) -> None:
        """Close the connection pool (a run closes its teachers when it ends, or when a check refuses)."""
        self.http.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def connect(self, tokenizer, context_needed: int, source: str = "student") -> None:
        """Check the served model before training: its name, context length and tokenizer. ``tokenizer`` is
        the one opd will send ids in: the student's (``source`` "student"), or the one given by
        ``teacher_tokenizer=`` for a teacher with another tokenizer ("teacher_tokenizer")."""
        fix = ("If the teacher's tokenizer differs from the student's, give it as teacher_tokenizer=DIR (a "
               "directory or hub id with its tokenizer files): opd then aligns the two on the text."
               if source == "student" else "teacher_tokenizer= must be the served model's tokenizer.")
        self.model = check_served(self.http, "teacher", self.model, "teacher_model", tokenizer, context_needed,
                                  source, fix)

    def score_sequences(self, sequences: list[list[int]], top_k: int = 0) -> list:
        """log p(x_t | x_<t) for t >= 1 of each sequence; with ``top_k``, per sequence ``(own, ids, lps)``: the
        own tokens' log-probs and, at each position, the ids and log-probs of the teacher's ``top_k`` most
        likely tokens (rank 1..k of vLLM's ``prompt_logprobs``). Values from the wire must be finite."""
        chunks = [sequences[i : i + self.rows_per_request] for i in range(0, len(sequences), self.rows_per_request)]

        def send(chunk: list[list[int]]) -> list:
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "prompt_logprobs": top_k,
                    "temperature": 0.0}
            choices = sorted(self.request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise OpdError(f"teacher server {self.url} answered {len(choices)} choices for {len(chunk)} prompts "
                               "(one each expected): is it an OpenAI-compatible completions server?")
            out = []
            for seq, choice in zip(chunk, choices, strict=True):
                entries = choice["prompt_logprobs"]
                own = [entries[t][str(seq[t])]["logprob"] for t in range(1, len(seq))]
                if not top_k:
                    out.append(own)
                    continue
                ids, lps = [], []
                for t in range(1, len(seq)):
                    ranked = sorted((v["rank"], int(k), v["logprob"]) for k, v in entries[t].items()
                                    if v["rank"] <= top_k)
                    if len(ranked) != top_k:
                        raise OpdError(f"teacher server {self.url} sent {len(ranked)} of the top {top_k} log-probs at "
                                       f"position {t}: does it allow prompt_logprobs={top_k} (vLLM: --max-logprobs)?")
                    ids.append([i for _, i, _ in ranked])
                    lps.append([v for _, _, v in ranked])
                out.append((own, ids, lps))
            values = [v for row in out for v in (row if not top_k else row[0] + [x for r in row[2] for x in r])]
            if not all(math.isfinite(v) for v in values):
                raise OpdError(f"teacher server {self.url} sent a non-finite log-prob (-inf or NaN)")
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

    def sequences_of(self, rollouts: Rollouts) -> tuple[list[int], list[list[int]]]:
        mask, tokens = rollouts.attention_mask.cpu(), rollouts.tokens.cpu()
        starts = [int(row.nonzero()[0]) for row in mask]
        return starts, [tokens[b, s:][mask[b, s:] > 0].tolist() for b, s in enumerate(starts)]

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_topk(rollouts, 0)[0]

    def score_topk(self, rollouts: Rollouts, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """(B, T) the teacher's log-prob of each completion token, and with ``top_k`` its top-k ids and log-probs
        (N, k) at the completion positions, in ``scoring.completion_hidden``'s order (row by row)."""
        starts, sequences = self.sequences_of(rollouts)
        scored = self.score_sequences(sequences, top_k)
        out = torch.zeros(rollouts.tokens.shape, dtype=torch.float32)
        ids, lps = [], []
        completion = rollouts.completion_mask.cpu() > 0
        for b, (start, row) in enumerate(zip(starts, scored, strict=True)):
            own = row[0] if top_k else row
            out[b, start + 1 : start + 1 + len(own)] = torch.tensor(own, dtype=torch.float32)
            if top_k:
                for column in completion[b].nonzero()[:, 0].tolist():
                    ids.append(row[1][column - start - 1])
                    lps.append(row[2][column - start - 1])
        device = rollouts.tokens.device
        logprobs = out.to(device) * rollouts.completion_mask
        if not top_k:
            return logprobs, None, None
        return (logprobs, torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(lps, dtype=torch.float32, device=device))
