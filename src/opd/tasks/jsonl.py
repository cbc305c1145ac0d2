"""A user's prompts from a JSONL file: one object per line, ``{"prompt": ..., "answer": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...], "answer": ...}``; ``answer`` is optional, and
``constraints`` (a list, see ``opd.ifeval``) may stand in its place for instruction-following prompts.

With an answer, a completion is correct when its final answer (the text after its last ``Answer:``,
else the whole completion) equals the answer or holds it as a run of whole words, both normalised as
SQuAD does (lower case, punctuation and the articles a/an/the dropped, spaces collapsed; signs and
decimal points of numbers kept). With constraints, when every constraint holds.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from opd.ifeval import follows, parse_constraints
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
    constraints = parse_constraints(obj["constraints"], where) if "constraints" in obj else ()
    return Example(messages, None if answer is None else str(answer), constraints)


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
    """Lower case; punctuation and the articles a/an/the dropped; a number's sign and decimal point kept."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())  # a '.' survives only between digits
    text = re.sub(r"-(?!\d)", " ", text)  # a '-' survives only as a sign
    text = re.sub(r"[^\w\s.-]|_", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def final_answer(completion: str) -> str:
    return completion.rsplit("Answer:", 1)[1] if "Answer:" in completion else completion


def answer_matches(completion: str, answer: str) -> bool:
    """The final answer equals ``answer``, or holds it as a run of whole words, after ``normalise``."""
    said, gold = normalise(final_answer(completion)), normalise(answer)
    return bool(gold) and (said == gold or f" {gold} " in f" {said} ")


VERIFIERS = ("exact", "math", "ifeval")


class JsonlTask:
    """Training prompts from ``path``, held-out prompts from ``eval_path`` (both JSONL), graded by
    ``verifier``: ``exact`` (the normalised match above; constraints where a line has them), ``math``
    (``tasks.math``: math-verify on the answer), ``ifeval`` (every line must carry constraints)."""

    def __init__(self, path: str | Path, eval_path: str | Path | None = None, verifier: str = "exact") -> None:
        if verifier not in VERIFIERS:
            raise OpdError(f"verifier={verifier!r} must be one of {', '.join(VERIFIERS)} (or give your own "
                           "function as reward=module:function)")
        self.name = str(path)
        self.verifier = verifier
        self.train = load_examples(path)
        self.held_out = load_examples(eval_path) if eval_path else []
        if verifier == "math":
            from opd.tasks.math import check_installed

            check_installed()
        if verifier == "ifeval":
            for source, examples in ((path, self.train), (eval_path, self.held_out)):
                for i, example in enumerate(examples):
                    if not example.constraints:
                        raise OpdError(f"{source}: prompt {i + 1} has no 'constraints', which verifier=ifeval "
                                       "grades by")

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        return [self.train[i] for i in epoch_order(len(self.train), step, count, seed)]

    def eval_examples(self, count: int) -> list[Example]:
        return self.held_out[:count]

    def reward(self, completion: str, example: Example) -> float:
        if example.constraints:
            return 1.0 if follows(completion, list(example.constraints)) else 0.0
        if example.answer is None:
            return 0.0
        if self.verifier == "math":
            from opd.tasks.math import math_correct

            return 1.0 if math_correct(completion, example.answer) else 0.0
        return 1.0 if answer_matches(completion, example.answer) else 0.0


def load_sft_pairs(path: str | Path) -> list[tuple[Example, str]]:
    """An SFT dataset: each line a prompt (``prompt`` or ``messages``, as above) and its ``completion``."""

    def parse(path: Path, lineno: int, line: str) -> tuple[Example, str]:
        example = parse_line(path, lineno, line)
        completion = json.loads(line).get("completion")
        if not isinstance(completion, str) or not completion:
            raise OpdError(f"{path}:{lineno}: field 'completion' must be a non-empty string")
        return example, completion

    return read_jsonl(path, "SFT data file", parse)


def load_documents(path: str | Path) -> list[str]:
    """A documents file: each line ``{"text": "..."}``."""

    def parse(path: Path, lineno: int, line: str) -> str:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise OpdError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise OpdError(f"{path}:{lineno}: field 'text' must be a non-empty string")
        return obj["text"]

    return read_jsonl(path, "documents file", parse)


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
