"""``opd export``: a run (or one of its checkpoints) as a standalone Hugging Face model directory that
``transformers`` and ``vllm serve`` load as they are, with a model card; or, with ``adapter=True``, the
PEFT adapter files that ``vllm serve --enable-lora`` loads.

A LoRA is merged into the weights in float32 and only then cast to the export dtype (a merge done in
bf16 rounds every merged weight once more). Every export is checked before it is renamed into place:
the exported directory is loaded back with ``transformers`` alone (``peft`` for an adapter) and its
log-probs on a fixed probe are compared with the run's model; the largest difference is printed and
written into the model card.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.errors import OpdError
from opd.models import load_model, load_tokenizer, pick_dtype, quiet_peft, save_atomically

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROBE_SEQUENCES, PROBE_TOKENS = 4, 64


@dataclass
class Source:
    """What an export reads: the run directory, the model directory in it, and the step it holds."""

    run_dir: Path
    model_dir: Path
    step: int | None
    is_adapter: bool


def find_source(path: str | Path, adapter: bool) -> Source:
    """A run directory (its final/ model, or with ``adapter`` its latest checkpoint), a checkpoint, or final/."""
    from opd import runs

    path = Path(path)
    if not path.is_dir():
        raise OpdError(f"{path} is not a directory: give a run directory, one of its checkpoints, or its final/")
    if (path / "config.json").is_file() and (path / "metrics.jsonl").exists():  # a run directory
        latest = runs.latest_checkpoint(path)
        if adapter or not (path / "final").is_dir():
            if latest is None:
                raise OpdError(f"{path} has no checkpoint yet (checkpoints/latest.json) to export")
            return source_at(path, latest[1], latest[0])
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
        return source_at(path, path / "final", summary.get("steps"))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not (run_dir / "metrics.jsonl").exists():
        raise OpdError(f"{path} is not in an opd run directory (no metrics.jsonl in {run_dir}): export reads the "
                       "run's config and evaluations for the model card")
    step = int(path.name.rpartition("_")[2]) if path.name.startswith("step_") else None
    return source_at(run_dir, path, step)


def source_at(run_dir: Path, model_dir: Path, step: int | None) -> Source:
    return Source(run_dir, model_dir, step, (model_dir / "adapter_config.json").is_file())


def load_source(source: Source, config) -> torch.nn.Module:
    """The run's model in float32 on the CPU: a plain model, or the base student with the adapter applied."""
    from opd.models import resolve_model_path

    if not source.is_adapter:
        return load_model(source.model_dir, torch.device("cpu"), torch.float32).eval()
    from peft import PeftModel

    base = load_model(resolve_model_path(config.student, "student"), torch.device("cpu"), torch.float32)
    with quiet_peft():
        return PeftModel.from_pretrained(base, str(source.model_dir)).eval()


def probe_ids(vocab_size: int, context: int) -> torch.Tensor:
    """Fixed random token ids: a probe of every position's whole distribution, whatever the task."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (PROBE_SEQUENCES, min(PROBE_TOKENS, context)), generator=generator)


@torch.no_grad()
def log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def export(path: str | Path, out: str | Path, adapter: bool = False, dtype: str = "float32") -> dict:
    """Write the export to ``out`` (which must not exist or be empty); returns what the model card says."""
    from opd import runs
    from opd.models import resolve_model_path

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OpdError(f"{out} already exists; choose another output directory")
    source = find_source(path, adapter)
    config = runs.saved_config(source.run_dir)
    if adapter and not source.is_adapter:
        raise OpdError(f"--adapter exports a LoRA run's adapter; {source.run_dir} trained all weights (lora_rank=0)")
    torch_dtype = pick_dtype(dtype, torch.device("cpu"))
    tokenizer = load_tokenizer(source.model_dir)
    reference = load_source(source, config)
    ids = probe_ids(reference.config.vocab_size, getattr(reference.config, "max_position_embeddings", PROBE_TOKENS))
    expected = log_probs(reference, ids)
    if adapter:
        base_name = config.student if not config.student.startswith("embedded:") else \
            resolve_model_path(config.student, "student")
    else:
        model = reference.merge_and_unload() if source.is_adapter else reference
        model = model.to(torch_dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id

    card: dict = {}

    def write(tmp: Path) -> None:
        if adapter:
            for name in ADAPTER_FILES:
                shutil.copy2(source.model_dir / name, tmp / name)
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = base_name
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
            exported = load_source(source_at(source.run_dir, tmp, source.step), config)
        else:
            model.save_pretrained(tmp)
            exported = load_model(tmp, torch.device("cpu"), torch_dtype).eval()
        tokenizer.save_pretrained(tmp)
        difference = (log_probs(exported, ids) - expected).abs().max().item()
        card.update(model_card(source, config, adapter, dtype if not adapter else "as trained", difference))
        (tmp / "README.md").write_text(card["text"])

    save_atomically(out, write)
    return {k: v for k, v in card.items() if k != "text"}


def model_card(source: Source, config, adapter: bool, dtype: str, difference: float) -> dict:
    """The card's facts (from the run's config, summary or metrics) and its Markdown."""
    from opd import runs
    from opd.report import fmt

    records = runs.read_metrics(source.run_dir, up_to_step=source.step)
    evals = [r for r in records if r.get("accuracy") is not None]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    n = config.eval_examples
    base = config.student
    facts = {"step": source.step, "max_logprob_difference": difference, "dtype": dtype, "adapter": adapter,
             "student_flops": last.get("student_flops_total"), "teacher_flops": last.get("teacher_flops_total")}
    teacher = "none (documents)" if config.method == "midtrain" else f"`{config.teacher}`"
    lines = [
        "---", f"base_model: {base}", "library_name: " + ("peft" if adapter else "transformers"),
        "tags:", "- opd", "- on-policy-distillation", "---", "",
        f"# {source.run_dir.name}", "",
        f"Trained with opd (on-policy distillation) from `{base}`: method `{config.method}`, teacher {teacher}, "
        f"task `{config.task}`, `kl={config.kl}`, lr {config.lr}, "
        f"{config.prompts_per_step} prompts x {config.samples_per_prompt} samples per step, "
        f"{f'LoRA rank {config.lora_rank} (alpha {config.lora_alpha:g})' if config.lora_rank else 'all weights'}; "
        f"exported at step {source.step} of {config.steps}.",
        "",
        "| held-out evaluation | before | at export |",
        "| --- | --- | --- |",
        f"| accuracy, greedy ({n} prompts) | {fmt(first.get('accuracy'), True, n)} | "
        f"{fmt(last.get('accuracy'), True, n)} |",
        f"| accuracy, sampled (T={config.eval_temperature:g}, {config.eval_samples} per prompt) | "
        f"{fmt(first.get('sampled_accuracy'), True, n)} | {fmt(last.get('sampled_accuracy'), True, n)} |",
        f"| reverse KL to the teacher (nats/token) | {fmt(first.get('eval_teacher_kl'))} | "
        f"{fmt(last.get('eval_teacher_kl'))} |",
        "",
        f"Compute to this step: student {flops(facts['student_flops'])}, teacher {flops(facts['teacher_flops'])} "
        "(forward and backward, counted by opd).",
        "",
        f"Export: {'the PEFT adapter (load it on the base model, or `vllm serve --enable-lora`)' if adapter else ''}"
        f"{'' if adapter else 'LoRA merged in float32, then ' if config.lora_rank else ''}"
        f"{'' if adapter else f'saved in {dtype}'}; largest difference of a log-prob on a {PROBE_SEQUENCES} x "
        f"{PROBE_TOKENS}-token probe against the run's model (float32): {difference:.2e}.",
        "",
    ]
    return {**facts, "text": "\n".join(lines)}


def flops(value: float | None) -> str:
    return "unknown (a remote teacher)" if value is None else f"{value:.3g} FLOPs"
