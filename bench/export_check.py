"""Does a merge lose accuracy? A LoRA run on the embedded pair, then its last checkpoint (the adapter on the base
student, unmerged, float32) against `opd export` of it in float32 and in bf16: held-out accuracy (greedy, and
sampled with 4 draws per prompt at T=1, the same seeds), the share of held-out prompts whose greedy completion
is the same text as the checkpoint's, and the export's own log-prob check.

    .venv/bin/python bench/export_check.py [--steps 200] [--out bench/results/export_check.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from opd.config import load_config
from opd.evaluation import completions_text, evaluate
from opd.export import export
from opd.models import chat_prompt_ids, load_model, load_tokenizer, quiet_peft, resolve_model_path
from opd.samplers.local import sample
from opd.tasks import ArithmeticTask
from opd.trainer import train


def greedy_texts(model, tokenizer, examples) -> list[str]:
    prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in examples]
    rollouts = sample(model, prompts, max_new_tokens=48, temperature=0.0, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    return completions_text(tokenizer, rollouts.completion_ids())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="bench/results/export_check.json")
    args = parser.parse_args()
    task, cpu = ArithmeticTask(), torch.device("cpu")
    examples = task.eval_examples(256)
    with tempfile.TemporaryDirectory(prefix="opd-export-check-") as tmp:
        run = Path(tmp) / "run"
        overrides = [f"steps={args.steps}", "lora_rank=32", "lr=2e-3", f"out={run}", f"save_every={args.steps}",
                     f"eval_every={args.steps}"]
        train(load_config(None, overrides), progress=True)
        checkpoint = run / "checkpoints" / f"step_{args.steps:06d}"
        from peft import PeftModel

        tokenizer = load_tokenizer(checkpoint)
        base = load_model(resolve_model_path("embedded:student"), cpu, torch.float32)
        with quiet_peft():
            models = {"checkpoint (adapter, float32)": PeftModel.from_pretrained(base, str(checkpoint)).eval()}
        checks = {}
        for dtype in ("float32", "bfloat16"):
            facts = export(checkpoint, Path(tmp) / dtype, dtype=dtype)
            checks[dtype] = facts["max_logprob_difference"]
            models[f"export, {dtype}"] = load_model(Path(tmp) / dtype, cpu, getattr(torch, dtype)).eval()
        rows, reference = [], None
        for name, model in models.items():
            result = evaluate(model, tokenizer, task, examples, max_new_tokens=48, seed=0, samples=4,
                              sample_temperature=1.0)
            texts = greedy_texts(model, tokenizer, examples)
            reference = reference or texts
            rows.append({"model": name, "greedy": result.accuracy, "sampled": result.sampled_accuracy,
                         "same_greedy_text": sum(a == b for a, b in zip(texts, reference, strict=True)) / len(texts),
                         "max_logprob_difference": checks.get(name.rpartition(", ")[2])})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "examples": len(examples), "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
