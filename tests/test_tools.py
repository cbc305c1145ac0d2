"""The tool task (#30): the calculator, the compact call format, the zoo tool teacher, `opd experiment tools`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.environments import Dialogue, ToolEnvironment, parse_compact_calls
from opd.errors import OpdError
from opd.evaluation import evaluate
from opd.models import load_model, load_tokenizer, resolve_model_path
from opd.tasks.tools import ToolTask, calc, held_out
from opd.zoo_tools import transcript_ids


def test_the_task_is_products_with_disjoint_splits_and_a_verifier():
    task = ToolTask()
    train = task.train_examples(0, 200, 0)
    held = task.eval_examples(100)
    assert not {ex.messages[-1]["content"] for ex in train} & {ex.messages[-1]["content"] for ex in held}
    assert all(held_out(ex.messages[-1]["content"]) for ex in held)
    example = train[0]
    a, b = example.messages[-1]["content"].removeprefix("Compute ").split("*")
    assert 100 <= int(a) <= 999 and 10 <= int(b) <= 99 and example.answer == str(int(a) * int(b))
    assert task.reward(f"Answer: {example.answer}", example) == 1.0
    assert task.reward(f"Answer: {int(example.answer) + 1}", example) == 0.0
    assert task.train_examples(3, 5, 1) == task.train_examples(3, 5, 1)  # a pure function of (seed, step)
    assert calc("347*86") == "29842"
    with pytest.raises(ValueError, match="digits"):
        calc("__import__('os')")


def test_compact_calls_pass_their_one_argument():
    calls = parse_compact_calls("[calc 347*86]")
    assert [(c.name, c.argument, c.error) for c in calls] == [("calc", "347*86", "")]
    assert "not closed" in parse_compact_calls("[calc 347*86")[-1].error
    assert parse_compact_calls("= 5*3\nAnswer: 15") == []
    talk = ToolEnvironment([calc], "compact").start(None)
    assert talk.respond("[calc 347*86]") == [{"role": "tool", "name": "calc", "content": "29842"}]
    assert talk.respond("[calc 3/4]")[0]["content"] == "error: ValueError: digits, + - * and parentheses only"
    assert talk.respond("Answer: 29842") is None
    assert talk.figures() == {"tool_calls": 2, "valid_tool_calls": 1}


def test_the_transcripts_train_the_assistant_turns_only():
    tokenizer = load_tokenizer(resolve_model_path("embedded:teacher"))
    example = ToolTask().train_examples(0, 1, 0)[0]
    prompt, ids, weights = transcript_ids(tokenizer, example)
    expression = example.messages[-1]["content"].removeprefix("Compute ")
    by_hand = (f"<|im_start|>user\nCompute {expression}<|im_end|>\n<|im_start|>assistant\n[calc {expression}]"
               f"<|im_end|>\n<|im_start|>tool\n{example.answer}<|im_end|>\n<|im_start|>assistant\n"
               f"Answer: {example.answer}<|im_end|>")
    assert tokenizer.decode(prompt + ids) == by_hand
    trained = tokenizer.decode([i for i, w in zip(ids, weights, strict=True) if w])
    assert trained == f"[calc {expression}]<|im_end|>Answer: {example.answer}<|im_end|>"


def test_the_zoo_tool_teacher_uses_the_calculator():
    path = resolve_model_path("embedded:tool-teacher")
    meta = json.loads((Path(path).parent / "zoo-tools.json").read_text())
    assert meta["accuracy"] >= 0.95 and meta["tool_use_share"] >= 0.95
    import torch

    model = load_model(path, torch.device("cpu"), torch.float32)
    task = ToolTask()
    dialogue = Dialogue(ToolEnvironment([calc], "compact"), "tools=calc", 3, 256)
    result = evaluate(model, load_tokenizer(path), task, task.eval_examples(16), max_new_tokens=32, dialogue=dialogue)
    assert result.accuracy == 1.0
    assert result.figures["tool_use_share"] == 1.0 and result.figures["turns_per_conversation"] == 2.0


def test_the_experiment_runs_both_arms_at_equal_compute(tmp_path):
    from opd.experiments.tools import ToolsPlan, run_tools

    summary = run_tools(ToolsPlan(tmp_path / "exp", steps=2, prompts_per_step=2, samples_per_prompt=1, eval_every=1,
                                  eval_examples=4, sft_start=1), progress=False)
    assert [p[0] for p in summary["sft+opd"]["curve"]] == [0, 1, 2]  # the chain's steps run on
    assert summary["sft+opd"]["curve"][2][1] > summary["sft+opd"]["curve"][1][1]  # and its compute adds up
    for arm in ("opd", "sft", "sft+opd"):
        assert summary[arm]["flops"] >= summary["budget_flops"] > 0
        assert 0 <= summary[arm]["accuracy_at_budget"] <= 1
        assert summary[arm]["teacher_accuracy"] == 1.0
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "| on-policy distillation |" in report and "| SFT on the teacher's transcripts |" in report
    assert "| SFT, then on-policy distillation |" in report
    with pytest.raises(OpdError, match="--sft-start 2 must be between 0 and --steps 2"):
        run_tools(ToolsPlan(tmp_path / "bad", steps=2, sft_start=2), progress=False)
    assert (tmp_path / "exp" / "tools.png").is_file()
