"""``opd serve MODEL_DIR``: the scoring part of the OpenAI-compatible completions API, shaped as vLLM
shapes it, so that a client written for one works with the other.

- ``POST /v1/completions``: ``prompt`` as token ids (one list, or a list of lists for a batch);
  ``max_tokens`` 0 or 1 scores, ``prompt_logprobs`` (vLLM's extension: the log-prob of every prompt token
  plus the top k), ``echo`` + ``logprobs`` (the OpenAI form); any other ``max_tokens`` samples (with
  ``prompt_logprobs`` too, and ``stop`` strings as vLLM applies them).
- ``POST /tokenize`` (vLLM's), ``GET /v1/models``, ``GET /health``.

Concurrent requests are queued and scored together: one worker thread drains the queue into a batch
(up to ``max_batch_tokens``) and runs one forward pass for all of them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from opd.server.api import (
    CompletionRequest,
    LoadLoraRequest,
    ReloadRequest,
    TokenizeRequest,
    UnloadLoraRequest,
    make_choice,
    prompt_entries,
    sampled_choice,
    stop_at_string,
    stop_ids,
    validate_prompt,
)
from opd.server.worker import ApiError, Job, ServedModel, Worker, adapter_listing
from opd.templates import reply_stops

__all__ = ["ApiError", "BackgroundServer", "ServerConfig", "create_app", "free_port", "serve"]


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "code": status}})


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
    eos_ids = reply_stops(tokenizer)  # where a sample ends unless ignore_eos: the EOS and the template's reply end
    served = ServedModel(model, config.model_name)

    def score(module: torch.nn.Module, sequences: list[list[int]], top_k: int) -> list[dict]:
        return score_sequences(module, sequences, top_k, vocab_size)

    worker = Worker(served, score, config.max_batch_tokens)
    app.state.scorer = worker
    app.state.served = served

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
        prompt = err.body.get("prompt") if isinstance(err.body, dict) else None
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
            where, message = "prompt", ("text prompts are not implemented by this server; send token ids (a list "
                                        "of ints, or a list of lists for a batch), e.g. from POST /tokenize")
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

    async def run(job: Job, what: str):
        worker.submit(job)
        try:
            await job.future
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ApiError(500, f"{what} failed: {type(err).__name__}: {err}", "server_error") from err
        return job.results

    def new_job(kind: str, model_name: str | None, **fields) -> Job:
        loop = asyncio.get_running_loop()
        return Job(kind, model_name, loop, loop.create_future(), **fields)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": adapter_listing(served, config.max_model_len, vocab_size)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        served.check(body.model)
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        served.check(body.model)
        sequences = validate_prompt(body, vocab_size, config.max_model_len)
        if body.sampling:
            choices, completion_tokens = await sample_request(body, sequences)
        else:
            top_k = max(body.prompt_logprobs or 0, body.logprobs or 0)
            results = await run(new_job("score", body.model, sequences=sequences, top_k=top_k), "scoring")
            choices = [make_choice(i, seq, res, body, tokenizer) for i, (seq, res) in
                       enumerate(zip(sequences, results, strict=True))]
            completion_tokens = body.max_tokens * len(sequences)
        prompt_tokens = sum(len(s) for s in sequences)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or config.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def sample_request(body: CompletionRequest, sequences: list[list[int]]) -> tuple[list[dict], int]:
        from opd.samplers.local import sample

        stops = stop_ids(body, eos_ids)
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        generator = torch.Generator().manual_seed(body.seed if body.seed is not None
                                                  else int.from_bytes(os.urandom(6), "little"))

        def draw(_: ServedModel, module: torch.nn.Module):
            rollouts = sample(module, sequences, samples_per_prompt=body.n, max_new_tokens=body.max_tokens,
                              temperature=temperature, top_p=1.0 if body.top_p is None else float(body.top_p),
                              eos_id=stops or [-1], pad_id=tokenizer.pad_token_id or 0, vocab_size=vocab_size,
                              generator=generator)
            mask = rollouts.completion_mask > 0
            drawn = [(rollouts.tokens[b][mask[b]].tolist(), rollouts.sampler_logprobs[b][mask[b]].tolist())
                     for b in range(len(mask))]
            # the prompt's log-probs under the same weights (one job: no reload between the two passes)
            scored = None if body.prompt_logprobs is None else score(module, sequences, body.prompt_logprobs)
            return drawn, scored

        drawn, scored = await run(new_job("sample", body.model, run=draw), "sampling")

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens)

        ended = [stop_at_string(ids, lps, body.stop_strings, decode) for ids, lps in drawn]
        choices = [sampled_choice(i, sequences[i // body.n], ids, lps, text, hit, body, tokenizer, stops,
                                  eos_ids) for i, (ids, lps, text, hit) in enumerate(ended)]
        if scored is not None:  # vLLM repeats the prompt's log-probs in each of its choices
            entries = [prompt_entries(seq, res, body.prompt_logprobs, tokenizer.decode)
                       for seq, res in zip(sequences, scored, strict=True)]
            for i, choice in enumerate(choices):
                choice["prompt_logprobs"] = entries[i // body.n]
        return choices, sum(len(ids) for ids, *_ in ended)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:  # vLLM answers in plain text
        def load(target: ServedModel, _: torch.nn.Module) -> None:
            if body.load_inplace and body.lora_name in target.adapters:
                target.unload_adapter(body.lora_name)
            target.load_adapter(body.lora_name, body.lora_path)

        await run(new_job("admin", None, run=load), "loading the adapter")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        await run(new_job("admin", None, run=lambda target, _: target.unload_adapter(body.lora_name)),
                  "unloading the adapter")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/opd/reload_weights")
    async def reload_weights(body: ReloadRequest) -> dict:
        count = await run(new_job("admin", None, run=lambda target, _: target.reload(body.path)), "the reload")
        return {"status": "ok", "tensors": count, "reloads": served.reloads}

    return app


def serve(model_dir: str, host: str, port: int, api_key: str | None, name: str | None, device: str,
          dtype: str, max_batch_tokens: int) -> None:
    import uvicorn

    from opd.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path

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
