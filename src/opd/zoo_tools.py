"""The embedded tool teacher (``opd zoo tools``): the embedded teacher taught to use a calculator.

It starts from ``embedded:teacher`` (which knows the arithmetic task's format) and learns, by
cross-entropy on the assistant turns of reference conversations (``tasks.tools.ToolTask.transcript``),
to answer ``Compute A*B`` with a ``[calc A*B]`` call and then ``Answer: N`` copied from the calculator's
result. The calculator's message is in each sequence as context, not trained on (weight 0). Deterministic
from its seed; written to ``embedded/tool-teacher`` with a ``zoo-tools.json`` of how it was built.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opd.models import EMBEDDED_DIR, chat_prompt_ids, load_model, load_tokenizer, save_model
from opd.samplers.turns import environment_ids
from opd.tasks.tools import ToolTask


@dataclass(frozen=True)
class ToolZooConfig:
    seed: int = 0
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64
    eval_examples: int = 200


def transcript_ids(tokenizer, example) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, the rest of the conversation's ids, a 0/1 weight per id: 1 on the assistant's tokens)."""
    prompt = chat_prompt_ids(tokenizer, example.messages)
    ids, weights = [], []
    for message in ToolTask.transcript(example):
        if message["role"] == "assistant":
            turn = tokenizer.encode(message["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
            ids, weights = ids + turn, weights + [1] * len(turn)
        else:
            context = environment_ids(tokenizer, [message])
            ids, weights = ids + context, weights + [0] * len(context)
    return prompt, ids, weights


def build_tool_teacher(out_dir: Path = EMBEDDED_DIR, config: ToolZooConfig | None = None) -> dict:
    """Fine-tune the embedded teacher into a calculator user; evaluate it with the calculator in the loop."""
    import torch

    from opd.environments import Dialogue, ToolEnvironment
    from opd.evaluation import evaluate
    from opd.tasks.tools import calc
    from opd.zoo import train_sft

    config = config or ToolZooConfig()
    started = time.time()
    source = EMBEDDED_DIR / "teacher"
    tokenizer = load_tokenizer(source)
    torch.manual_seed(config.seed)
    model = load_model(source, torch.device("cpu"), torch.float32)
    task = ToolTask()

    def batches(step: int):
        examples = task.train_examples(step, config.batch_size, config.seed)
        rows = [transcript_ids(tokenizer, ex) for ex in examples]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    train_sft(model, tokenizer, batches, config.steps, config.lr, 0.0, "zoo: tool teacher")
    dialogue = Dialogue(ToolEnvironment([calc], "compact"), "tools=calc", 3, 256)
    result = evaluate(model, tokenizer, task, task.eval_examples(config.eval_examples), max_new_tokens=32,
                      dialogue=dialogue)
    save_model(model, tokenizer, out_dir / "tool-teacher")
    meta = {"config": asdict(config), "accuracy": result.accuracy, **result.figures,
            "parameters": sum(p.numel() for p in model.parameters()), "build_seconds": round(time.time() - started)}
    (out_dir / "zoo-tools.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta

