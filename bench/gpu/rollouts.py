"""GPU only: opd's own sampler against vLLM (in-process, and `vllm serve` over HTTP) on a Qwen3-shaped model.

    python bench/gpu/rollouts.py [--layers 28] [--width 2048] [--max-new-tokens 1024] [--steps 4]

Builds a Qwen3-shaped model from a config (random weights, bf16; 28 x 2048 with intermediate 6144 and
GQA 16/8 heads is about 1.4B parameters without Qwen's vocabulary: it uses the embedded tokenizer, since
no hub is reachable), saves it, and runs `opd train` for a few steps with it as student and teacher:

- ``local``: opd's sampler (KV cache, in-process)
- ``vllm``: ``sampler=vllm`` (in-process vLLM, sleep mode, weights loaded after every step)
- ``http``: ``vllm serve --enable-lora`` then ``sampler=http://`` with a LoRA student (runtime adapters)

Random weights rarely draw EOS, so samples run to ``--max-new-tokens``. Reports per variant completion
tokens per second of sampling, seconds per step and the trainer/engine mismatch statistics, into
bench/results/gpu_rollouts.json. Not yet run: no GPU was lent to the sessions that wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd.http import wait_until_healthy
from opd.models import load_tokenizer, resolve_model_path
from opd.server import free_port


def build(path: Path, layers: int, width: int) -> None:
    tokenizer = load_tokenizer(resolve_model_path("embedded:student"))
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=width // 16, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters at {path}", flush=True)


def serve(model: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    server = subprocess.Popen(["vllm", "serve", str(model), "--port", str(port), "--enable-lora",
                               "--max-lora-rank", "64", "--gpu-memory-utilization", "0.35",
                               "--logprobs-mode", "processed_logprobs", "--max-model-len", "4096"], env=env)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=600, every=2)
    except Exception:
        server.kill()
        raise
    return server


def train(model: Path, out: Path, steps: int, max_new_tokens: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "opd", "train", f"student={model}", f"teacher={model}", f"steps={steps}",
               f"max_new_tokens={max_new_tokens}", "prompts_per_step=16", "samples_per_prompt=4", "kl=sampled",
               f"eval_every={steps}", "eval_examples=16", "eval_samples=0", f"save_every={steps}", "dtype=bfloat16",
               "lr=1e-6", f"out={out}", "--quiet", *extra]
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    later = records[1:] or records  # the first step includes warm-up (CUDA graphs, the first push)

    def mean(key: str) -> float | None:
        values = [r[key] for r in later if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"sample_tokens_per_second": sum(r["completion_tokens"] for r in later) / sum(r["sample_seconds"]
                                                                                           for r in later),
            "step_seconds": mean("sample_seconds") + mean("score_seconds") + mean("train_seconds")
            + (mean("sync_seconds") or 0.0),
            **{k: mean(k) for k in ("sample_seconds", "sync_seconds", "score_seconds", "train_seconds",
                                    "is_ratio_mean", "is_ratio_max", "is_truncated_share", "engine_kl",
                                    "engine_max_abs_logprob_gap")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default="local,vllm,http")
    parser.add_argument("--out", default="bench/results/gpu_rollouts.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu/rollouts.py needs a CUDA GPU and vLLM")
    results = {"device": torch.cuda.get_device_name(), "layers": args.layers, "width": args.width,
               "max_new_tokens": args.max_new_tokens, "variants": {}}
    with tempfile.TemporaryDirectory() as root:
        model = Path(root) / "model"
        build(model, args.layers, args.width)
        for name in args.variants.split(","):
            out, extra, server = Path(root) / name, [], None
            if name == "vllm":
                extra = ["sampler=vllm"]
            elif name == "http":
                port = free_port()
                server = serve(model, port)
                extra = [f"sampler=http://127.0.0.1:{port}", "lora_rank=32"]
            try:
                results["variants"][name] = train(model, out, args.steps, args.max_new_tokens, extra)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=60)
            print(name, json.dumps(results["variants"][name]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
