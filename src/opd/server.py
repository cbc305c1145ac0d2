"""``opd serve MODEL_DIR``: the scoring part of the OpenAI-compatible completions API, shaped as vLLM
shapes it, so that a client written for one works with the other.

- ``POST /v1/completions``: ``prompt`` as token ids (one list, or a list of lists for a batch),
  ``max_tokens`` 0 or 1, ``prompt_logprobs`` (vLLM's extension: the log-prob of every prompt token
  plus the top k), ``echo`` + ``logprobs`` (the OpenAI form).
- ``POST /tokenize`` (vLLM's), ``GET /v1/models``, ``GET /health``.

Concurrent requests are queued and scored together: one worker thread drains the queue into a batch
(up to ``max_batch_tokens``) and runs one forward pass for all of them.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_TOP_K = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "code": status}})


Number = StrictFloat | StrictInt


class CompletionRequest(BaseModel):
    """The completions API's parameters (OpenAI's and vLLM's sampling extensions). An unknown field, a
    value of the wrong type, or a value this server does not honour is a 400 naming the field
    (``check_sampling``), never silently ignored: a client must not read something it did not ask for."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    skip_special_tokens: StrictBool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


@dataclass
class ScoreJob:
    sequences: list[list[int]]
    top_k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[dict] = field(default_factory=list)


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: list[list[int]], top_k: int, vocab_size: int) -> list[dict]:
    """For each sequence: ``token_logprobs[t]`` = log p(x_t | x_<t) for t >= 1, their ranks, the top-k
    ids and log-probs at every position, and the same for the next token after the sequence."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    tokens = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits[..., :vocab_size]
    out = []
    for row, seq in enumerate(sequences):
        logprobs = torch.log_softmax(logits[row, : len(seq)].float(), dim=-1)  # (L, V): predicts t+1
        targets = torch.tensor(seq[1:], device=device)
        chosen = logprobs[:-1].gather(-1, targets[:, None])[:, 0]
        ranks = (logprobs[:-1] > chosen[:, None]).sum(-1) + 1
        k = max(top_k, 1)
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        out.append({"token_logprobs": chosen.tolist(), "ranks": ranks.tolist(),
                    "top_ids": top_ids.tolist(), "top_logprobs": top_lp.tolist()})
    return out


class BatchScorer:
    """One worker thread; requests that arrive while it is busy are scored together."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_batch_tokens: int) -> None:
        self.model, self.vocab_size, self.max_batch_tokens = model, vocab_size, max_batch_tokens
        self.jobs: queue.Queue[ScoreJob] = queue.Queue()
        self.batches_run = 0
        threading.Thread(target=self.run, daemon=True, name="opd-scorer").start()

    def submit(self, job: ScoreJob) -> None:
        self.jobs.put(job)

    def run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            tokens = sum(len(s) for s in batch[0].sequences)
            while tokens < self.max_batch_tokens:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                tokens += sum(len(s) for s in job.sequences)
            self.score(batch)

    def score(self, batch: list[ScoreJob]) -> None:
        sequences = [s for job in batch for s in job.sequences]
        top_k = max(job.top_k for job in batch)
        try:
            results = score_sequences(self.model, sequences, top_k, self.vocab_size)
            error = None
        except Exception as err:  # noqa: BLE001 - any failure goes back to the waiting requests as a 500
            results, error = [], err
        self.batches_run += 1
        start = 0
        for job in batch:
            count = len(job.sequences)
            if error is None:
                job.results = results[start : start + count]
                job.loop.call_soon_threadsafe(_resolve, job.future, None)
            else:
                job.loop.call_soon_threadsafe(_resolve, job.future, error)
            start += count


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(True)
    else:
        future.set_exception(error)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None
    max_model_len: int
    max_body_bytes: int = 8 << 20
    max_batch_tokens: int = 8192


def create_app(model: torch.nn.Module, tokenizer, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="opd serve", docs_url=None, redoc_url=None)
    vocab_size = len(tokenizer)
    scorer = BatchScorer(model.eval(), vocab_size, config.max_batch_tokens)
    app.state.scorer = scorer

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "malformed")
        if first.get("type") == "extra_forbidden":
            message = "not a parameter this server implements"
        return error_response(400, f"invalid request: {where or 'body'}: {message}", "invalid_request_error")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                      "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and int(length) > config.max_body_bytes:
            return error_response(413, f"request body of {length} bytes is over the limit of "
                                  f"{config.max_body_bytes}", "invalid_request_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server has `{config.model_name}`",
                           "not_found_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "opd",
            "max_model_len": config.max_model_len, "vocab_size": vocab_size}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        check_model(body.model)
        sequences = validate_prompt(body, vocab_size, config.max_model_len)
        top_k = max(body.prompt_logprobs or 0, body.logprobs or 0)
        loop = asyncio.get_running_loop()
        job = ScoreJob(sequences, top_k, loop, loop.create_future())
        scorer.submit(job)
        try:
            await job.future
        except Exception as err:  # noqa: BLE001
            raise ApiError(500, f"scoring failed: {err}", "server_error") from err
        choices = [make_choice(i, seq, res, body, tokenizer) for i, (seq, res) in
                   enumerate(zip(sequences, job.results, strict=True))]
        prompt_tokens = sum(len(s) for s in sequences)
        completion_tokens = body.max_tokens * len(sequences)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": config.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def check_sampling(body: CompletionRequest) -> None:
    """Refuse what this server does not honour: it scores (``max_tokens=0``) or extends by one greedy
    token (``max_tokens=1``), one choice per prompt, in one body. Neutral values are accepted."""

    def refuse(name: str, why: str) -> None:
        raise ApiError(400, f"{name}={getattr(body, name)!r}: {why}")

    if body.max_tokens not in (0, 1):
        refuse("max_tokens", "this server only scores (0) or extends by one greedy token (1)")
    if body.stream:
        refuse("stream", "this server answers in one body; it does not stream")
    if body.stream_options is not None:
        refuse("stream_options", "only valid with stream=true, which this server does not implement")
    if body.n < 1:
        refuse("n", "must be at least 1")
    if body.n > 1:
        refuse("n", "must be 1: this server returns one choice per prompt")
    if body.best_of not in (None, 1):
        refuse("best_of", "must be 1 (or absent)")
    if body.temperature is not None:
        if body.temperature < 0:
            refuse("temperature", "must be at least 0")
        if body.temperature > 0 and body.max_tokens > 0:
            refuse("temperature", "this server extends greedily only: use temperature=0 (or max_tokens=0)")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        refuse("top_p", "must be in (0, 1]")
    if body.top_k is not None and body.top_k < -1:
        refuse("top_k", "must be -1 or 0 (off) or at least 1")
    if body.min_p is not None and not 0 <= body.min_p <= 1:
        refuse("min_p", "must be in [0, 1]")
    def within(value, low: float, high: float) -> bool:
        return value is None or low <= value <= high

    penalties = (("presence_penalty", 0, within(body.presence_penalty, -2, 2), "must be in [-2, 2]"),
                 ("frequency_penalty", 0, within(body.frequency_penalty, -2, 2), "must be in [-2, 2]"),
                 ("repetition_penalty", 1, body.repetition_penalty is None or body.repetition_penalty > 0,
                  "must be positive"))
    for name, neutral, valid, rule in penalties:
        if not valid:
            refuse(name, rule)
        if getattr(body, name) not in (None, neutral):
            refuse(name, f"not implemented by this server; leave it at {neutral}")
    if body.logit_bias:
        refuse("logit_bias", "not implemented by this server")
    if body.suffix is not None:
        refuse("suffix", "not implemented by this server")
    if body.max_tokens > 0 and (body.stop or body.stop_token_ids):
        refuse("stop" if body.stop else "stop_token_ids", "not implemented when generating (max_tokens=1)")


def validate_prompt(body: CompletionRequest, vocab_size: int, max_model_len: int) -> list[list[int]]:
    check_sampling(body)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(body, name)
        if value is not None and not 0 <= value <= MAX_TOP_K:
            raise ApiError(400, f"{name}={value} must be between 0 and {MAX_TOP_K}")
    prompt = body.prompt
    sequences = [prompt] if prompt and isinstance(prompt[0], int) else prompt
    if not sequences:
        raise ApiError(400, "prompt is empty")
    for i, seq in enumerate(sequences):
        if not seq:
            raise ApiError(400, f"prompt[{i}] is empty")
        if len(seq) + body.max_tokens > max_model_len:
            raise ApiError(400, f"prompt[{i}] has {len(seq)} tokens; with max_tokens={body.max_tokens} that is "
                           f"over this model's maximum context length of {max_model_len}")
        bad = next((t for t in seq if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt[{i}] holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return sequences


def make_choice(index: int, seq: list[int], res: dict, body: CompletionRequest, tokenizer) -> dict:
    decode = tokenizer.decode
    choice: dict = {"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                    "stop_reason": None, "prompt_token_ids": seq}
    generated = res["top_ids"][-1][0] if body.max_tokens == 1 else None
    if generated is not None:
        choice["text"] = decode([generated])
    if body.prompt_logprobs is not None:
        entries: list = [None]
        for t in range(1, len(seq)):
            entry = {str(seq[t]): {"logprob": res["token_logprobs"][t - 1], "rank": res["ranks"][t - 1],
                                   "decoded_token": decode([seq[t]])}}
            for rank, (tid, lp) in enumerate(zip(res["top_ids"][t - 1][: body.prompt_logprobs],
                                                 res["top_logprobs"][t - 1], strict=False), start=1):
                entry.setdefault(str(tid), {"logprob": lp, "rank": rank, "decoded_token": decode([tid])})
            entries.append(entry)
        choice["prompt_logprobs"] = entries
    if body.logprobs is not None:
        ids, lps, tops = [], [], []
        if body.echo:
            ids = list(seq)
            lps = [None] + res["token_logprobs"]
            tops = [None] + [top_dict(res, t - 1, body.logprobs, decode) for t in range(1, len(seq))]
        if generated is not None:
            ids.append(generated)
            lps.append(res["top_logprobs"][-1][0])
            tops.append(top_dict(res, len(seq) - 1, body.logprobs, decode))
        texts = [decode([i]) for i in ids]
        offsets, position = [], 0
        for text in texts:
            offsets.append(position)
            position += len(text)
        choice["logprobs"] = {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops,
                              "text_offset": offsets}
    if body.echo:
        choice["text"] = decode(seq) + choice["text"]
    return choice


def top_dict(res: dict, position: int, k: int, decode) -> dict:
    return {decode([tid]): lp for tid, lp in zip(res["top_ids"][position][:k], res["top_logprobs"][position],
                                                  strict=False)}


def serve(model_dir: str, host: str, port: int, api_key: str | None, name: str | None, device: str,
          dtype: str, max_batch_tokens: int) -> None:
    import uvicorn

    from opd.models import load_model, load_tokenizer, pick_device, pick_dtype
    from opd.setup import resolve_model_path

    path = resolve_model_path(model_dir)
    chosen_device = pick_device(device)
    model = load_model(path, chosen_device, pick_dtype(dtype, chosen_device))
    tokenizer = load_tokenizer(path)
    config = ServerConfig(model_name=name or model_dir, api_key=api_key or os.environ.get("OPD_API_KEY"),
                          max_model_len=getattr(model.config, "max_position_embeddings", 2048),
                          max_batch_tokens=max_batch_tokens)
    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level="warning")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread on a free loopback port (tests, benchmarks):
    ``with BackgroundServer(app) as server: ... server.url``."""

    def __init__(self, app: FastAPI, start_timeout: float = 20.0) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
