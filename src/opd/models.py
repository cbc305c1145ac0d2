"""Load and save Hugging Face models and tokenizers; LoRA; device/dtype choice; vocab checks."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd.chat_settings import chat_template_of
from opd.errors import OpdError


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, float32 on a CPU, unless asked otherwise."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested not in names:
        raise OpdError(f"dtype={requested!r} is not one of auto, {', '.join(names)}")
    return names[requested]


def not_found(path: str | Path, what: str, err: Exception) -> OpdError:
    """The error for a model or tokenizer that would not load; a hub id is named as one."""
    if Path(path).is_dir():
        return OpdError(f"cannot load {what} from {path}: {err}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OpdError(f"cannot load {what} for {path}: there is no local directory {path}, and the Hugging Face hub "
                    f"did not give it ({first}). Check the name, or download it first "
                    "(`huggingface-cli download ORG/NAME --local-dir DIR`) and give the directory.")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise not_found(path, "a tokenizer", err) from err
    if tokenizer.eos_token_id is None:
        raise OpdError(f"the tokenizer in {path} has no eos_token; set one in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # a pad equal to EOS is safe here: masks come from the sampler, never from pad ids
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise not_found(path, "a causal LM", err) from err
    return model.to(device)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The KV cache as the installed transformers wants it passed to ``model``'s forward: ``cache=``
    (transformers 5.x, where ``past_key_values=`` warns that it is deprecated) or ``past_key_values=``."""
    return {_cache_argument(type(model.get_decoder() if hasattr(model, "get_decoder") else model)): cache}


@functools.cache
def _cache_argument(decoder_class: type) -> str:
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def chat_prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, bool]:
    """``messages`` rendered with the tokenizer's chat template (``chat_template_of``, with its
    ``template_kwargs``), ready for the reply, and whether its encoding adds the tokenizer's special tokens (only
    for a base model without a template, which sees the plain text of the last user message). A template that
    cannot render ``messages`` raises an ``OpdError`` naming its family (``templates.rendered``)."""
    if chat_template_of(tokenizer):
        from opd.templates import rendered

        return rendered(tokenizer, messages, True), False
    return messages[-1]["content"], True


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, ready for the reply."""
    text, special = chat_prompt_text(tokenizer, messages)
    return tokenizer.encode(text, add_special_tokens=special)


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers ``is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning a user cannot act on: silence that one message, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    modules = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    with quiet_peft():
        return get_peft_model(model, config)


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing of the decoder layers with transformers' own mechanism (non-reentrant: it
    works under LoRA, whose frozen embeddings give no input that requires grad, and under DDP and FSDP2).
    It acts in training mode only, so sampling and evaluation keep their KV cache."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise OpdError(f"gradient_checkpointing=true: {type(model).__name__} does not support transformers' "
                       "gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the older name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def recomputes_layers(model: torch.nn.Module) -> bool:
    """Whether a forward now checkpoints the decoder layers (training mode, gradients on): transformers then
    drops any KV cache, so a forward must not rely on one."""
    enabled = getattr(model, "is_activation_checkpointing", None)
    if enabled is None:
        enabled = getattr(model, "is_gradient_checkpointing", False)
    return bool(enabled) and model.training and torch.is_grad_enabled()


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model with any LoRA adapters merged in (a copy), for saving in plain HF format."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def save_atomically(directory: Path, write: callable) -> None:
    """Write a directory through ``write(tmp_dir)`` and rename it into place: all or nothing."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save ``model`` (LoRA merged) and its tokenizer as one HF directory, atomically."""

    def write(tmp: Path) -> None:
        plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_atomically(directory, write)


EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"  # the models opd ships (opd zoo builds them)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_path(name: str, field: str = "model") -> str:
    """``embedded:NAME`` is a model shipped with opd; a local directory must hold a model (config.json);
    anything else must look like a hub id (``ORG/NAME``), whose loading then says if the hub lacks it.
    ``field`` names the setting in errors (``student``, ``teacher``)."""
    if name.startswith(EMBEDDED_PREFIX):
        path = EMBEDDED_DIR / name[len(EMBEDDED_PREFIX):]
        if not (path / "config.json").is_file():
            raise OpdError(f"the embedded model {name} is missing at {path}; rebuild it with `opd zoo build` "
                           "(`opd zoo assistant` for the assistant, `opd zoo tools` for the tool teacher)")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OpdError(f"{field}={name}: the directory has no config.json, so it is not a Hugging Face model "
                           "directory (one written by save_pretrained, or an opd run's final/ or checkpoint)")
        return str(path)
    if path.exists():
        raise OpdError(f"{field}={name} is a file; give a model directory or a hub id")
    if not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise OpdError(f"{field}={name}: the directory {path} does not exist. Give a Hugging Face model directory "
                       "or a hub id such as Qwen/Qwen3-1.7B")
    return name  # a hub id: load_tokenizer and load_model say if the hub does not have it
