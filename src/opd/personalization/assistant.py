"""``opd zoo assistant``: the embedded chat assistant and the personalization experiment's data.

The assistant (zoo tokenizer, Qwen3 architecture) is trained from scratch on chat: plain requests and
requests with one verifiable instruction (``world.py``). It never sees the organisation's documents.
Files written next to it (``embedded/personalization/``):

    docs.jsonl           {"text"}: the organisation's staff pages (midtraining corpus)
    chat.jsonl           {"prompt", "completion"}: plain chat, the "chat" of a docs/chat mix
    ifeval_train.jsonl   {"prompt", "constraints", "completion"}: instruction prompts to distil on
    ifeval_eval.jsonl    {"prompt", "constraints"}: held-out instruction prompts
    qa.jsonl             {"prompt", "answer"}: questions about the documents (held out: never trained on)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd.evaluation import evaluate
from opd.models import load_tokenizer, save_model
from opd.personalization import world
from opd.tasks.jsonl import JsonlTask
from opd.zoo import EMBEDDED_DIR, encode_prompt, make_model, train_sft

DATA_DIR = EMBEDDED_DIR / "personalization"


@dataclass
class AssistantConfig:
    seed: int = 0
    layers: int = 4
    width: int = 128
    steps: int = 2000
    lr: float = 3e-3
    batch_size: int = 64
    instruction_share: float = 0.5  # of each batch; the rest is plain chat
    train_instructions: int = 1500
    eval_instructions: int = 200
    plain_chats: int = 2000
    staff: int = 24
    max_new_tokens: int = 64


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def write_data(out: Path, config: AssistantConfig) -> dict[str, list]:
    people = world.staff(config.seed, config.staff)
    data = {
        "docs": world.documents(people, config.seed),
        "chat": world.chats(config.seed, config.plain_chats, "plain", "train"),
        "ifeval_train": world.chats(config.seed, config.train_instructions, "instruction", "train"),
        "ifeval_eval": world.chats(config.seed, config.eval_instructions, "instruction", "eval"),
        "qa": world.questions(people),
    }
    write_lines(out / "docs.jsonl", [json.dumps({"text": t}) for t in data["docs"]])
    write_lines(out / "chat.jsonl", [c.jsonl() for c in data["chat"]])
    write_lines(out / "ifeval_train.jsonl", [c.jsonl() for c in data["ifeval_train"]])
    write_lines(out / "ifeval_eval.jsonl", [json.dumps({"prompt": c.prompt, "constraints": list(c.constraints)})
                                            for c in data["ifeval_eval"]])
    write_lines(out / "qa.jsonl", [json.dumps(q) for q in data["qa"]])
    return data


def scores(model, tokenizer, data_dir: Path, max_new_tokens: int) -> dict:
    """Instruction following (held-out prompts) and QA accuracy of ``model``."""
    out = {}
    for name, file in (("instruction_following", "ifeval_eval.jsonl"), ("qa", "qa.jsonl")):
        task = JsonlTask(data_dir / file, data_dir / file)
        out[name] = evaluate(model, tokenizer, task, task.eval_examples(10_000),
                             max_new_tokens=max_new_tokens).accuracy
    return out


def build_assistant(out_dir: Path = EMBEDDED_DIR, config: AssistantConfig | None = None) -> dict:
    config = config or AssistantConfig()
    started = time.time()
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(out_dir / "teacher")  # the zoo's tokenizer
    data = write_data(out_dir / "personalization", config)
    pairs = {kind: [(encode_prompt(tokenizer, c.prompt),
                     tokenizer.encode(c.reply, add_special_tokens=False) + [tokenizer.eos_token_id])
                    for c in data[key]] for kind, key in (("instruction", "ifeval_train"), ("plain", "chat"))}

    def batches(step: int):
        rng = random.Random(f"{config.seed}/assistant/{step}")
        picked = [rng.choice(pairs["instruction"] if rng.random() < config.instruction_share else pairs["plain"])
                  for _ in range(config.batch_size)]
        return [p for p, _ in picked], [c for _, c in picked]

    model = make_model(tokenizer, config.layers, config.width, config.seed + 7)
    train_sft(model, tokenizer, batches, config.steps, config.lr, 0.0, "zoo: assistant")
    card = {"config": asdict(config), **scores(model, tokenizer, out_dir / "personalization", config.max_new_tokens),
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.time() - started, 1)}
    save_model(model, tokenizer, out_dir / "assistant")
    (out_dir / "assistant.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
