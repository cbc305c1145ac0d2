"""The student's weights to the rollout server after every optimizer step.

- ``lora``: the adapter is saved where the server can read it and loaded by a new name through vLLM's
  runtime LoRA endpoint (``POST /v1/load_lora_adapter``; ``vllm serve --enable-lora`` with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), the previous one unloaded; samples are then asked of the
  new adapter by name. HTTP only: an unmodified ``vllm serve`` does it.
- ``reload``: the whole model as safetensors in a directory the server reads, then opd's own
  ``POST /opd/reload_weights`` (``opd serve``; vLLM has no such endpoint).

A directory is written completely, under a temporary name, before the server is told about it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from opd.errors import OpdError
from opd.models import plain_model
from opd.samplers.remote import RemoteSampler


class WeightSync:
    kind = ""

    def __init__(self, sampler: RemoteSampler, directory: Path, prefix: str) -> None:
        self.sampler, self.directory, self.prefix = sampler, Path(directory).resolve(), prefix
        self.current: Path | None = None

    def write(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def announce(self, folder: Path, version: int) -> None:
        raise NotImplementedError

    def push(self, model: torch.nn.Module, version: int) -> None:
        """Write the weights of ``model`` (after ``version`` updates) and have the server load them."""
        folder = self.directory / f"step-{version:06d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with torch.no_grad():
            self.write(model, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        try:
            self.announce(folder, version)
        except OpdError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if self.current is not None and self.current != folder:
            shutil.rmtree(self.current, ignore_errors=True)
        self.current = folder

    def release(self) -> None:
        """Undo what the server holds for this run where it can (an adapter); a full reload stays."""

    def ask(self, path: str, body: dict, fix: str) -> dict:
        try:
            return self.sampler.http.request("POST", path, body)
        except OpdError as err:
            raise OpdError(f"{err} {fix}") from None


class LoraSync(WeightSync):
    kind = "lora"

    def write(self, model: torch.nn.Module, folder: Path) -> None:
        if not hasattr(model, "peft_config"):
            raise OpdError("sampler_sync=lora needs a LoRA run (lora_rank > 0); use sampler_sync=reload")
        model.save_pretrained(folder)

    def announce(self, folder: Path, version: int) -> None:
        name = f"{self.prefix}-step-{version}"
        self.ask("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)},
                 f"Could not load the adapter {name} from {folder}: the server must run with LoRA enabled "
                 "(vllm serve --enable-lora --max-lora-rank R, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and read "
                 "that path (set sampler_sync_dir= to a directory both machines share).")
        previous, self.sampler.model = self.sampler.model, name
        if previous != self.sampler.base_model:
            self.ask("/v1/unload_lora_adapter", {"lora_name": previous}, f"Could not unload {previous}.")


    def release(self) -> None:
        if self.sampler.model != self.sampler.base_model:
            self.ask("/v1/unload_lora_adapter", {"lora_name": self.sampler.model}, "")
            self.sampler.model = self.sampler.base_model


class ReloadSync(WeightSync):
    kind = "reload"

    def write(self, model: torch.nn.Module, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(plain_model(model), str(folder / "model.safetensors"))  # tied tensors once

    def announce(self, folder: Path, version: int) -> None:
        self.ask("/opd/reload_weights", {"path": str(folder)},
                 "A full-weight reload needs opd serve's /opd/reload_weights and a path the server reads "
                 "(sampler_sync_dir=). vLLM has no such endpoint: train with LoRA (sampler_sync=lora) or, on "
                 "GPUs, sampler_sync=nccl.")


def make_sync(kind: str, sampler: RemoteSampler, directory: Path, prefix: str) -> WeightSync:
    classes = {"lora": LoraSync, "reload": ReloadSync}
    if kind == "nccl":
        from opd.samplers.nccl import NcclSync

        return NcclSync(sampler, directory, prefix)
    return classes[kind](sampler, directory, prefix)
