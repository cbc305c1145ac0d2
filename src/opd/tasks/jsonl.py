"""A user's prompts from a JSONL file: one object per line, ``{"prompt": ..., "answer": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...], "answer": ...}``; ``answer`` is optional, and
``constraints`` (a list, see ``opd.tasks.ifeval``) may stand in its place for instruction-following prompts.

With an answer, a completion is correct when its final answer (the text after its last ``Answer:``,
else the whole completion) equals the answer or holds it as a run of whole words, both normalised as
SQuAD does (lower case, punctuation and the articles a/an/the dropped, spaces collapsed; signs and
decimal points of numbers kept). With constraints, when every constraint holds.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

from opd.errors import OpdError
from opd.tasks import Example
from opd.tasks.ifeval import follows, parse_constraints
from opd.tasks.sources import DataOptions, StreamRows, is_dataset_spec, open_rows

DEFAULT_OPTIONS = DataOptions()

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}  # ShareGPT's ``from`` values


def given(obj: dict, name: str):
    """The field's value, or None when the field is absent or null (a table's missing cell)."""
    return obj.get(name) if name else None


def message_text(content, where: str):
    """A message's text: a string, or OpenAI's list of parts (the ``text`` parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise OpdError(f"{where} must be a string (or a list of {{'type': 'text', 'text': ...}} parts)")


def parse_messages(value, field: str, where: str) -> list[dict]:
    """OpenAI ``[{"role", "content"}]`` or ShareGPT ``[{"from", "value"}]`` messages, as OpenAI's."""
    if not isinstance(value, list) or not value:
        raise OpdError(f"{where}: field '{field}' must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and "from" in message and "role" not in message:
            role = SHAREGPT_ROLES.get(message["from"])
            if role is None:
                raise OpdError(f"{where}: field '{field}[{i}].from' is {message['from']!r}; opd reads the ShareGPT "
                               f"roles {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": role, "content": message_text(message.get("value"), f"{where}: field '{field}[{i}]"
                                                                                     ".value'")})
        elif isinstance(message, dict) and message.get("role") in ROLES:
            out.append({"role": message["role"], "content": message_text(message.get("content"),
                                                                         f"{where}: field '{field}[{i}].content'")})
        else:
            raise OpdError(f"{where}: field '{field}[{i}]' must be an object with 'role' ({', '.join(ROLES)}) and "
                           "'content' (a string), or ShareGPT's 'from' and 'value'")
    return out


def parse_record(obj, where: str, options: DataOptions = DEFAULT_OPTIONS) -> tuple[Example, str | None]:
    """One prompt row (a JSONL line's object or a dataset's row) -> (Example, its reference completion).

    The prompt is ``prompt`` (a string) or ``messages`` (OpenAI) / ``conversations`` (ShareGPT); trailing
    assistant messages are not part of the prompt: the last of them is the row's completion unless a
    ``completion`` field gives one. ``options`` maps the column names."""
    if not isinstance(obj, dict):
        raise OpdError(f"{where}: each line must be a JSON object with a 'prompt' or 'messages' field")
    prompt_field, messages_field = options.prompt_field, options.messages_field
    if messages_field == "messages" and given(obj, "messages") is None and given(obj, "conversations") is not None:
        messages_field = "conversations"
    completion = None
    if given(obj, prompt_field) is not None:
        if not isinstance(obj[prompt_field], str) or not obj[prompt_field].strip():
            raise OpdError(f"{where}: field '{prompt_field}' must be a non-empty string")
        messages = [{"role": "user", "content": obj[prompt_field]}]
    elif given(obj, messages_field) is not None:
        messages = parse_messages(obj[messages_field], messages_field, where)
        while messages and messages[-1]["role"] == "assistant":
            completion = completion if completion is not None else messages[-1]["content"]
            messages = messages[:-1]
        if not messages:
            raise OpdError(f"{where}: field '{messages_field}' holds only assistant messages: no prompt")
    else:
        raise OpdError(f"{where}: missing field '{prompt_field}' (or '{messages_field}')")
    answer = given(obj, options.answer_field)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        raise OpdError(f"{where}: field '{options.answer_field}' must be a string or a number")
    constraints = parse_constraints(obj["constraints"], where) if given(obj, "constraints") is not None else ()
    if given(obj, options.completion_field) is not None:
        completion = obj[options.completion_field]
    teacher = obj.get("teacher") if isinstance(obj, dict) else None
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise OpdError(f"{where}: field 'teacher' must be a teacher's name (a non-empty string) from teachers=")
    return Example(messages, None if answer is None else str(answer), constraints,
                   completion if isinstance(completion, str) and completion else None, teacher,
                   privileged_context(obj, messages, where)), completion


def privileged_context(obj: dict, messages: list[dict], where: str) -> list[dict] | None:
    """What the teacher reads in place of the student's prompt: ``teacher_messages`` (a conversation, OpenAI or
    ShareGPT), or ``teacher_prompt`` (a string: the student's messages with the last user turn's text replaced by
    it); None when the row has neither."""
    if given(obj, "teacher_messages") is not None and given(obj, "teacher_prompt") is not None:
        raise OpdError(f"{where}: give 'teacher_messages' or 'teacher_prompt', not both")
    if given(obj, "teacher_messages") is not None:
        teacher = parse_messages(obj["teacher_messages"], "teacher_messages", where)
        if teacher[-1]["role"] == "assistant":
            raise OpdError(f"{where}: field 'teacher_messages' must end with the turn the student answers (a user "
                           "turn), not an assistant one")
        return teacher
    if given(obj, "teacher_prompt") is not None:
        if not isinstance(obj["teacher_prompt"], str) or not obj["teacher_prompt"].strip():
            raise OpdError(f"{where}: field 'teacher_prompt' must be a non-empty string")
        last = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
        return [*messages[:last], {**messages[last], "content": obj["teacher_prompt"]}]
    return None


def parse_json(path: Path, lineno: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise OpdError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


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


def load_examples(path: str | Path, options: DataOptions = DEFAULT_OPTIONS) -> list[Example]:
    return open_prompts(path, options)


def reads_as_jsonl(spec: str, options: DataOptions) -> bool:
    """Read by opd's own JSONL reader (in memory, errors by line number): a file that is not .json,
    .parquet or .csv, when not streaming. Everything else goes through ``datasets`` (``tasks.sources``)."""
    return not options.streaming and (spec.lower().endswith(".jsonl") or not is_dataset_spec(spec))


def read_rows(spec: str | Path, options: DataOptions, what: str, parse_row, required: tuple[str, ...] = (),
              split: str | None = None):
    """``parse_row(obj, where)`` of every row of ``spec``: a list from opd's JSONL reader, or the rows
    ``tasks.sources`` reads (``required``: its column groups)."""
    spec = str(spec)
    if reads_as_jsonl(spec, options):
        return read_jsonl(spec, what, lambda p, n, line: parse_row(parse_json(p, n, line), f"{p}:{n}"))
    return open_rows(spec, options, what, parse_row, required, split)


def open_prompts(spec: str | Path, options: DataOptions = DEFAULT_OPTIONS, what: str = "prompts file",
                 split: str | None = None):
    """The prompts ``spec`` names: a list (JSONL), or rows read through ``datasets`` (``tasks.sources``)."""
    return read_rows(spec, options, what, lambda row, where: parse_record(row, where, options)[0],
                     (options.prompt_columns,), split)


def first_rows(rows, count: int) -> list:
    if isinstance(rows, StreamRows):
        return rows.first(count)
    return [rows[i] for i in range(min(count, len(rows)))]


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
    """Training prompts from ``path``, held-out prompts from ``eval_path``, graded by ``verifier``: ``exact``
    (the normalised match above; constraints where a line has them), ``math`` (``tasks.math``: math-verify
    on the answer), ``ifeval`` (every line must carry constraints). Either path may be a JSONL file or
    anything ``tasks.sources`` reads (parquet, csv, json, a folder, a ``save_to_disk`` folder,
    ``hf:ORG/NAME``); ``options`` maps the columns and says whether to stream."""

    def __init__(self, path: str | Path, eval_path: str | Path | None = None, verifier: str = "exact",
                 options: DataOptions = DEFAULT_OPTIONS) -> None:
        if verifier not in VERIFIERS:
            raise OpdError(f"verifier={verifier!r} must be one of {', '.join(VERIFIERS)} (or give your own "
                           "function as reward=module:function)")
        self.name = str(path)
        self.verifier = verifier
        self.train = open_prompts(path, options)
        self.held_out = open_prompts(eval_path, options, "held-out prompts", options.eval_split) if eval_path else []
        if verifier == "math":
            from opd.tasks.math import check_installed

            check_installed()
        if verifier == "ifeval":
            for source, examples in ((path, self.train), (eval_path, self.held_out)):
                if isinstance(examples, StreamRows):  # pragma: no cover - checked per row
                    continue  # a streamed row is checked when it is read (reward below)
                for i, example in enumerate(examples):
                    if not example.constraints:
                        raise OpdError(f"{source}: prompt {i + 1} has no 'constraints', which verifier=ifeval "
                                       "grades by")

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        if isinstance(self.train, StreamRows):
            return self.train.take(step * count, count, seed)
        return [self.train[i] for i in epoch_order(len(self.train), step, count, seed)]

    def eval_examples(self, count: int) -> list[Example]:
        return first_rows(self.held_out, count)

    def reward(self, completion: str, example: Example) -> float:
        if self.verifier == "ifeval" and not example.constraints:
            raise OpdError(f"{self.name}: the prompt {example.messages[-1]['content']!r} has no 'constraints', which "
                           "verifier=ifeval grades by")
        if example.constraints:
            return 1.0 if follows(completion, list(example.constraints)) else 0.0
        if example.answer is None:
            return 0.0
        if self.verifier == "math":
            from opd.tasks.math import math_correct

            return 1.0 if math_correct(completion, example.answer) else 0.0
        return 1.0 if answer_matches(completion, example.answer) else 0.0


def load_sft_pairs(path: str | Path, options: DataOptions = DEFAULT_OPTIONS):
    """An SFT dataset: each row a prompt (``prompt`` or ``messages``, as above), its ``completion`` (or the
    messages' last assistant turn) and, optionally, ``untrained``: ``[start, end)`` character spans of the
    completion that are context, not trained on (the environment's tokens, e.g. DART's injected errors).
    Each item is ``(example, completion, spans)``. Read as a table even when ``streaming`` (training indexes
    it)."""

    def pair(obj, where: str) -> tuple[Example, str, tuple[tuple[int, int], ...]]:
        example, completion = parse_record(obj, where, options)
        if not isinstance(completion, str) or not completion:
            raise OpdError(f"{where}: field '{options.completion_field}' must be a non-empty string (or end the "
                           f"'{options.messages_field}' with the assistant's answer)")
        return example, completion, untrained_spans(obj.get("untrained") if isinstance(obj, dict) else None,
                                                    len(completion), where)

    return read_rows(path, replace(options, streaming=False), "SFT data file", pair, (options.prompt_columns,))


def untrained_spans(value, length: int, where: str) -> tuple[tuple[int, int], ...]:
    """A row's ``untrained`` field: ``[[start, end], ...]``, character offsets into the completion with
    ``0 <= start < end <= length``, in order and not overlapping (None: no span)."""
    if value is None:
        return ()
    problem = "a list of [start, end] pairs of integers"
    if not isinstance(value, list):
        raise OpdError(f"{where}: field 'untrained' must be {problem}, got {type(value).__name__}")
    spans, last = [], 0
    for item in value:
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise OpdError(f"{where}: field 'untrained' must be {problem}, got {item!r}")
        start, end = item
        if not last <= start < end <= length:
            raise OpdError(f"{where}: field 'untrained' span {item} must lie within the completion's {length} "
                           f"characters, after the span before it ({last}), with start < end")
        spans.append((start, end))
        last = end
    return tuple(spans)


def load_documents(path: str | Path, options: DataOptions = DEFAULT_OPTIONS):
    """A documents file: each row ``{"text": "..."}`` (the column named by ``text_field``)."""
    field = options.text_field

    def text(obj, where: str) -> str:
        if not isinstance(obj, dict) or not isinstance(given(obj, field), str) or not obj[field].strip():
            raise OpdError(f"{where}: field '{field}' must be a non-empty string")
        return obj[field]

    return read_rows(path, replace(options, streaming=False), "documents file", text, (field,))


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
