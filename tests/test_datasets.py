"""Prompts, SFT pairs and documents from what ``datasets`` reads: parquet, csv, save_to_disk folders, column
mapping, OpenAI and ShareGPT messages, streaming; each trains exactly as the same rows in JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.tasks import ArithmeticTask
from opd.tasks.choose import make_task
from opd.tasks.jsonl import JsonlTask, load_documents, load_sft_pairs, parse_record
from opd.tasks.sources import DataOptions, StreamRows, open_dataset
from opd.trainer import train

datasets = pytest.importorskip("datasets")


def arithmetic_rows(count: int, seed: int = 0) -> list[dict]:
    return [{"prompt": ex.messages[-1]["content"], "answer": ex.answer}
            for ex in ArithmeticTask().train_examples(seed, count, 0)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same 12 training and 6 held-out prompts as JSONL, parquet, csv and a save_to_disk folder."""
    root = tmp_path_factory.mktemp("sources")
    train_rows, eval_rows = arithmetic_rows(12), arithmetic_rows(6, seed=99)
    out = {"jsonl": write_jsonl(root / "train.jsonl", train_rows),
           "eval": write_jsonl(root / "eval.jsonl", eval_rows)}
    table = datasets.Dataset.from_list(train_rows)
    table.to_parquet(str(root / "train.parquet"))
    table.to_csv(str(root / "train.csv"), index=False)
    datasets.DatasetDict({"train": table, "test": datasets.Dataset.from_list(eval_rows)}).save_to_disk(
        str(root / "saved"))
    out.update(parquet=root / "train.parquet", csv=root / "train.csv", saved=root / "saved")
    return out


@pytest.mark.parametrize("form", ["parquet", "csv", "saved"])
def test_a_dataset_trains_exactly_as_the_same_prompts_in_jsonl(model_dirs, sources, tmp_path, form):
    eval_file = {"saved": sources["saved"]}.get(form, sources["eval"])  # the folder's test split
    runs = {}
    for name, task in (("jsonl", sources["jsonl"]), (form, sources[form])):
        config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / name, task=task, eval_file=eval_file,
                                                        steps=2, save_every=100))
        built = make_task(config)
        runs[name] = ([built.train_examples(s, 4, 0) for s in range(4)], built.eval_examples(6))
        train(config, progress=False)
        runs[name] += (read_jsonl(tmp_path / name / "metrics.jsonl"),)
    (jsonl_batches, jsonl_eval, jsonl_records), (batches, held_out, records) = runs["jsonl"], runs[form]
    assert batches == jsonl_batches and held_out == jsonl_eval  # the same prompts, in the same order
    assert len({ex.messages[-1]["content"] for batch in batches[:3] for ex in batch}) == 12  # an epoch: every row
    assert records[1]["loss"] == jsonl_records[1]["loss"] and records[2]["loss"] == jsonl_records[2]["loss"]


def test_openai_and_sharegpt_messages_and_mapped_columns(tmp_path):
    openai = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "2+"},
                                                        {"type": "text", "text": "2?"}]},
                           {"role": "assistant", "content": "4"}], "answer": 4}
    example, completion = parse_record(openai, "row 0")
    assert [m["role"] for m in example.messages] == ["system", "user"] and example.messages[1]["content"] == "2+2?"
    assert completion == "4" and example.answer == "4"
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    example, completion = parse_record(sharegpt, "row 1")
    assert example.messages == [{"role": "user", "content": "hi"}] and completion == "hello"
    mapped = DataOptions(prompt_field="question", answer_field="solution")
    example, _ = parse_record({"question": "1+1?", "solution": "2", "prompt": "ignored"}, "row 2", mapped)
    assert example.messages[-1]["content"] == "1+1?" and example.answer == "2"
    rows = [{"question": "What is 1+1?", "solution": 2}, {"question": "What is 2+3?", "solution": 5}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    task = JsonlTask(tmp_path / "qa.parquet", tmp_path / "qa.parquet", options=mapped)
    assert [ex.answer for ex in task.eval_examples(5)] == ["2", "5"]
    assert task.reward("Answer: 5", task.eval_examples(5)[1]) == 1.0


def test_sft_pairs_and_documents_from_tables(tmp_path):
    chats = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(3)]
    datasets.Dataset.from_list(chats).to_parquet(str(tmp_path / "chat.parquet"))
    pairs = load_sft_pairs(tmp_path / "chat.parquet")
    assert len(pairs) == 3 and pairs[2][0].messages[-1]["content"] == "q2" and pairs[2][1] == "a2"
    datasets.Dataset.from_list([{"body": "one doc"}, {"body": "two"}]).to_parquet(str(tmp_path / "docs.parquet"))
    assert list(load_documents(tmp_path / "docs.parquet", DataOptions(text_field="body"))) == ["one doc", "two"]
    with pytest.raises(OpdError, match=r"docs\.parquet has no column 'text'; its columns: body"):
        load_documents(tmp_path / "docs.parquet")


def test_bad_rows_columns_and_splits_are_named_before_any_compute(model_dirs, sources, tmp_path):
    rows = arithmetic_rows(3)
    rows[2]["prompt"] = "  "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(OpdError, match=r"prompts file .*bad\.parquet row 2: field 'prompt' must be a non-empty"):
        JsonlTask(tmp_path / "bad.parquet")
    with pytest.raises(OpdError, match=r"has no column 'question' or 'messages' or 'conversations'; its columns: "
                                       r"prompt, answer"):
        JsonlTask(sources["parquet"], options=DataOptions(prompt_field="question"))
    with pytest.raises(OpdError, match=r"saved has no split 'validation'; its splits: train, test"):
        JsonlTask(sources["saved"], sources["saved"], options=DataOptions(eval_split="validation"))
    with pytest.raises(OpdError, match=r"a file must be \.jsonl, \.json, \.parquet or \.csv"):
        open_dataset(str(write_jsonl(tmp_path / "x.txt", [])), DataOptions(streaming=True), "prompts file")
    out = tmp_path / "run"
    with pytest.raises(OpdError, match=r"row 2: field 'prompt'"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, task=tmp_path / "bad.parquet",
                                                     eval_file=sources["eval"])), progress=False)
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("bad", [0, 999, 1000, 2499])
def test_every_row_of_a_table_is_checked_across_its_batches(tmp_path, bad):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(2500)]
    rows[bad]["prompt"] = ""
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "many.parquet"))
    with pytest.raises(OpdError, match=rf"many\.parquet row {bad}: field 'prompt'"):
        JsonlTask(tmp_path / "many.parquet")


def test_a_stream_is_a_pure_function_of_seed_and_step_across_epochs_and_resumes(sources):
    streamed = DataOptions(streaming=True)
    task = JsonlTask(sources["parquet"], sources["eval"], options=streamed)
    assert isinstance(task.train, StreamRows)
    sequential = [task.train_examples(step, 5, 0) for step in range(6)]  # 30 rows: 2.5 epochs of 12
    fresh = JsonlTask(sources["parquet"], sources["eval"], options=streamed)
    assert fresh.train_examples(4, 5, 0) == sequential[4]  # a resumed run skips to its step
    assert task.train_examples(1, 5, 0) == sequential[1]  # and going back starts over
    prompts = [ex.messages[-1]["content"] for batch in sequential for ex in batch]
    table = [json.loads(line)["prompt"] for line in sources["jsonl"].read_text().splitlines()]
    assert sorted(prompts[:12]) == sorted(table) and sorted(prompts[12:24]) == sorted(table)  # each epoch: all rows
    assert prompts[:12] != prompts[12:24]  # reshuffled every epoch
    assert [ex.messages[-1]["content"] for ex in fresh.train_examples(0, 12, 1)] != prompts[:12]  # the seed counts
    held = JsonlTask(sources["jsonl"], sources["saved"], options=DataOptions(streaming=True))
    assert [ex.answer for ex in held.eval_examples(3)] == [r["answer"] for r in arithmetic_rows(3, seed=99)]


def test_hub_specs_parse_name_subset_and_split():
    from opd.tasks.sources import parse_hub_spec

    options = DataOptions(split="train", subset="")
    assert parse_hub_spec("hf:openai/gsm8k:main@test", options) == ("openai/gsm8k", "main", "test")
    assert parse_hub_spec("hf:openai/gsm8k", DataOptions(subset="socratic")) == ("openai/gsm8k", "socratic", "train")
    with pytest.raises(OpdError, match="name a dataset"):
        parse_hub_spec("hf:@test", options)
