"""What ``opd serve`` holds and runs: the model (with runtime LoRA adapters and full-weight reloads) and
the one worker thread that runs every forward pass, so that a reload never races a forward.

Adapters follow vLLM's runtime LoRA API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``; a request
names an adapter as its ``model``); a full-weight reload (``/opd/reload_weights``) is opd's own endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd.models import quiet_peft


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``directory`` (a single file or HF's shards)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ApiError(400, f"{directory} holds no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


class ServedModel:
    """The base model and the LoRA adapters loaded on it by name (peft, one active per forward)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.base, self.name = model.eval(), name
        self.peft = None  # a PeftModel once an adapter is loaded
        self.adapters: dict[str, str] = {}  # name -> the path it was loaded from
        self.reloads = 0

    def check(self, model_name: str | None) -> None:
        if model_name is not None and model_name != self.name and model_name not in self.adapters:
            adapters = f" and the adapters {sorted(self.adapters)}" if self.adapters else ""
            raise ApiError(404, f"The model `{model_name}` does not exist; this server has `{self.name}`{adapters}",
                           "not_found_error")

    @contextlib.contextmanager
    def using(self, model_name: str | None):
        """The module that answers for ``model_name``: an adapter by its name, else the base model."""
        if model_name in self.adapters:
            self.peft.set_adapter(model_name)
            yield self.peft
        elif self.peft is not None:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            yield self.base

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name == self.name or name in self.adapters:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ApiError(400, f"lora_path={path}: no adapter_config.json there (a PEFT adapter directory, as "
                           "save_pretrained writes it, is expected)")
        try:
            with quiet_peft():
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
                else:
                    self.peft.load_adapter(path, adapter_name=name)
        except Exception as err:  # noqa: BLE001 - a bad adapter is the client's error, reported as such
            if self.peft is not None and name in self.peft.peft_config:
                self.peft.delete_adapter(name)
            raise ApiError(400, f"could not load the LoRA adapter at {path}: {type(err).__name__}: {err}") from err
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "not_found_error")
        del self.adapters[name]
        if self.adapters:
            self.peft.set_adapter(next(iter(self.adapters)))
            self.peft.delete_adapter(name)
        else:  # the last one: take the LoRA layers out again
            self.base = self.peft.unload().eval()
            self.peft = None

    @torch.no_grad()
    def reload(self, path: str) -> int:
        """Copy the weights saved in ``path`` into the base model, all or nothing: every name must be one of
        the model's and every shape must match before any is copied. Weights tied to a loaded one (the output
        head to the embeddings) may be absent. Returns the number of tensors copied."""
        if self.adapters:
            raise ApiError(409, f"LoRA adapters are loaded ({sorted(self.adapters)}): unload them before a "
                           "full-weight reload")
        folder = Path(path)
        if not folder.is_dir():
            raise ApiError(400, f"path={path}: no such directory on the server")
        loaded = read_safetensors(folder)
        own = self.base.state_dict()
        unknown = sorted(set(loaded) - set(own))
        if unknown:
            raise ApiError(400, f"{path}: tensors this model does not have: {unknown[:5]}")
        wrong = [f"{n} {tuple(t.shape)} (model: {tuple(own[n].shape)})" for n, t in loaded.items()
                 if t.shape != own[n].shape]
        if wrong:
            raise ApiError(400, f"{path}: shapes differ: {wrong[:5]}")
        covered = {own[n].data_ptr() for n in loaded}
        missing = sorted(n for n in set(own) - set(loaded) if own[n].data_ptr() not in covered)
        if missing:
            raise ApiError(400, f"{path}: tensors missing: {missing[:5]}")
        for name, tensor in loaded.items():
            own[name].copy_(tensor)
        self.reloads += 1
        return len(loaded)


@dataclass
class Job:
    """One request's work for the worker thread: ``kind`` "score" (batched with other scoring jobs of the
    same model), "sample", or "admin" (``run`` is called with the served model)."""

    kind: str
    model_name: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    sequences: list[list[int]] = field(default_factory=list)
    top_k: int = 0
    run: object = None  # callable(ServedModel, module) -> result, for "sample" and "admin"
    results: object = None


class Worker:
    """One thread runs every job in arrival order; scoring jobs that wait together are run as one batch
    (up to ``max_batch_tokens``)."""

    def __init__(self, served: ServedModel, score, max_batch_tokens: int) -> None:
        self.served, self.score_fn, self.max_batch_tokens = served, score, max_batch_tokens
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.held: Job | None = None
        self.batches_run = 0
        threading.Thread(target=self.loop, daemon=True, name="opd-serve-worker").start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def next_job(self, block: bool) -> Job | None:
        if self.held is not None:
            job, self.held = self.held, None
            return job
        try:
            return self.jobs.get(block=block)
        except queue.Empty:
            return None

    def loop(self) -> None:
        while True:
            job = self.next_job(block=True)
            if job.kind != "score":
                self.finish([job], functools.partial(self.run_one, job))
                continue
            batch = [job]
            tokens = sum(len(s) for s in job.sequences)
            while tokens < self.max_batch_tokens:
                more = self.next_job(block=False)
                if more is None:
                    break
                if more.kind != "score" or more.model_name != job.model_name:
                    self.held = more
                    break
                batch.append(more)
                tokens += sum(len(s) for s in more.sequences)
            self.finish(batch, functools.partial(self.score_batch, batch))

    def run_one(self, job: Job) -> list:
        with self.served.using(job.model_name) as module:
            return [job.run(self.served, module)]

    def score_batch(self, batch: list[Job]) -> list:
        sequences = [s for job in batch for s in job.sequences]
        with self.served.using(batch[0].model_name) as module:
            results = self.score_fn(module, sequences, max(job.top_k for job in batch))
        out, start = [], 0
        for job in batch:
            out.append(results[start : start + len(job.sequences)])
            start += len(job.sequences)
        return out

    def finish(self, batch: list[Job], compute) -> None:
        try:
            results, error = compute(), None
        except Exception as err:  # noqa: BLE001 - any failure goes back to the waiting requests
            results, error = [None] * len(batch), err
        self.batches_run += 1
        for job, result in zip(batch, results, strict=True):
            job.results = result
            job.loop.call_soon_threadsafe(_resolve, job.future, error)


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(True)
    else:
        future.set_exception(error)


def adapter_listing(served: ServedModel, max_model_len: int, vocab_size: int) -> list[dict]:
    """``/v1/models``' entries: the base model, then each adapter with its ``parent`` and ``root`` (vLLM's)."""
    base = {"id": served.name, "object": "model", "created": 0, "owned_by": "opd", "root": served.name,
            "parent": None, "max_model_len": max_model_len, "vocab_size": vocab_size}
    return [base] + [{**base, "id": name, "root": path, "parent": served.name}
                     for name, path in served.adapters.items()]

