"""``opd zoo assistant``: the embedded chat assistant and the personalization experiment's data.

The assistant (zoo tokenizer, Qwen3 architecture) is trained from scratch on chat (plain requests and
requests with one verifiable instruction) and on "public knowledge": the staff pages of another
organisation, with chat questions about two thirds of those people (``world.py``). It never sees the
Quillfield documents. The card (assistant.json) reports its QA on the public people whose questions it
never saw: whether it learned to answer from a page it has read.
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
from opd.tasks import Example
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
    instruction_share: float = 0.4  # shares of each batch; the rest is plain chat
    pages_share: float = 0.2  # public staff pages (plain text)
    public_qa_share: float = 0.2  # chat questions about two thirds of the public staff
    train_instructions: int = 1500
    eval_instructions: int = 400
    plain_chats: int = 2000
    staff: int = 96  # 384 held-out questions: one standard error is about 2.4 points at 35%
    public_staff: int = 48
    max_new_tokens: int = 64


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def write_data(out: Path, config: AssistantConfig) -> dict[str, list]:
    people = world.staff(config.seed, config.staff)
    public = world.people(config.seed, config.public_staff, world.PUBLIC_ORG)
    asked = len(public) * 2 // 3  # questions about these are trained on; the rest measure extraction
    data = {
        "public_pages": world.documents(public, config.seed + 1),
        "public_qa": world.questions(public[:asked]),
        "public_qa_held_out": world.questions(public[asked:]),
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
    write_lines(out / "qa.jsonl", [json.dumps({"prompt": q["prompt"], "answer": q["answer"]}) for q in data["qa"]])
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
    eos = [tokenizer.eos_token_id]
    pairs = {kind: [(encode_prompt(tokenizer, c.prompt), tokenizer.encode(c.reply, add_special_tokens=False) + eos)
                    for c in data[key]] for kind, key in (("instruction", "ifeval_train"), ("plain", "chat"))}
    pairs["public_qa"] = [(encode_prompt(tokenizer, q["prompt"]),
                           tokenizer.encode(q["completion"], add_special_tokens=False) + eos)
                          for q in data["public_qa"]]
    pages = [tokenizer.encode(text, add_special_tokens=False) + eos for text in data["public_pages"]]
    pairs["pages"] = [(ids[:1], ids[1:]) for ids in pages]  # plain text: every token but the first is trained
    shares = [("instruction", config.instruction_share), ("pages", config.pages_share),
              ("public_qa", config.public_qa_share)]

    def pick(rng: random.Random) -> tuple[list[int], list[int]]:
        draw = rng.random()
        for kind, share in shares:
            if draw < share:
                return rng.choice(pairs[kind])
            draw -= share
        return rng.choice(pairs["plain"])

    def batches(step: int):
        rng = random.Random(f"{config.seed}/assistant/{step}")
        picked = [pick(rng) for _ in range(config.batch_size)]
        return [p for p, _ in picked], [c for _, c in picked]

    model = make_model(tokenizer, config.layers, config.width, config.seed + 7)
    train_sft(model, tokenizer, batches, config.steps, config.lr, 0.0, "zoo: assistant")
    held_out = JsonlTask(out_dir / "personalization" / "qa.jsonl")  # any file: examples are replaced below
    public_qa = evaluate(model, tokenizer, held_out,
                         [Example([{"role": "user", "content": q["prompt"]}], q["answer"])
                          for q in data["public_qa_held_out"]], max_new_tokens=config.max_new_tokens).accuracy
    card = {"config": asdict(config), **scores(model, tokenizer, out_dir / "personalization", config.max_new_tokens),
            "public_qa_unseen_questions": public_qa,
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.time() - started, 1)}
    save_model(model, tokenizer, out_dir / "assistant")
    (out_dir / "assistant.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
