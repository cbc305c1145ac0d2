"""A user's prompts from a JSONL file: one object per line, ``{"prompt": ..., "answer": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...], "answer": ...}``; ``answer`` is optional.

With answers, accuracy is exact match of the completion's final answer (the text after the last
``Answer:``, else its last line), compared case-, space- and trailing-punctuation-insensitively.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from opd.models import OpdError
from opd.tasks import Example

ROLES = ("system", "user", "assistant")


def parse_line(path: Path, lineno: int, line: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise OpdError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise OpdError(f"{where}: each line must be a JSON object with a 'prompt' or 'messages' field")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise OpdError(f"{where}: field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise OpdError(f"{where}: field 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES \
                    or not isinstance(message.get("content"), str):
                raise OpdError(f"{where}: field 'messages[{i}]' must be an object with 'role' "
                               f"({', '.join(ROLES)}) and 'content' (a string)")
    else:
        raise OpdError(f"{where}: missing field 'prompt' (or 'messages')")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise OpdError(f"{where}: field 'answer' must be a string or a number")
    return Example(messages, None if answer is None else str(answer))


def read_jsonl(path: str | Path, what: str, parse) -> list:
    """``parse(path, lineno, line)`` for every non-blank line of ``path``; ``what`` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise OpdError(f"{what} {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        items = [parse(path, lineno, line) for lineno, line in enumerate(handle, start=1) if line.strip()]
    if not items:
        raise OpdError(f"{what} {path} holds nothing (no non-blank line)")
    return items


def load_examples(path: str | Path) -> list[Example]:
    return read_jsonl(path, "prompts file", parse_line)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


def final_answer(completion: str) -> str:
    if "Answer:" in completion:
        return completion.rsplit("Answer:", 1)[1]
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class JsonlTask:
    """Training prompts from ``path``, held-out prompts from ``eval_path`` (both JSONL)."""

    def __init__(self, path: str | Path, eval_path: str | Path | None = None) -> None:
        self.name = str(path)
        self.train = load_examples(path)
        self.held_out = load_examples(eval_path) if eval_path else []

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        return [self.train[i] for i in epoch_order(len(self.train), step, count, seed)]

    def eval_examples(self, count: int) -> list[Example]:
        return self.held_out[:count]

    def reward(self, completion: str, answer: str | None) -> float:
        if answer is None:
            return 0.0
        return 1.0 if normalise(final_answer(completion)) == normalise(answer) else 0.0


def load_sft_pairs(path: str | Path) -> list[tuple[Example, str]]:
    """An SFT dataset: each line a prompt (``prompt`` or ``messages``, as above) and its ``completion``."""

    def parse(path: Path, lineno: int, line: str) -> tuple[Example, str]:
        example = parse_line(path, lineno, line)
        completion = json.loads(line).get("completion")
        if not isinstance(completion, str) or not completion:
            raise OpdError(f"{path}:{lineno}: field 'completion' must be a non-empty string")
        return example, completion

    return read_jsonl(path, "SFT data file", parse)


def epoch_order(count: int, step: int, batch: int, seed: int) -> list[int]:
    """Indices for ``step``: a seeded permutation of ``range(count)``, reshuffled every epoch."""
    orders: dict[int, list[int]] = {}  # one shuffle per epoch the step touches (at most a few)
    out = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, index = divmod(i, count)
        if epoch not in orders:
            orders[epoch] = list(range(count))
            random.Random(f"{seed}/{epoch}").shuffle(orders[epoch])
        out.append(orders[epoch][index])
    return out
