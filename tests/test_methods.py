"""The baselines in the one loop: SFT on teacher samples, RL on a verifiable reward, opd+rl."""

import json

import pytest

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.tasks import ArithmeticTask
from opd.trainer import train


def mean(values):
    return sum(values) / len(values)


def test_sft_lowers_cross_entropy_on_teacher_tokens(model_dirs, tmp_path):
    out = tmp_path / "sft"
    summary = train(load_config(None, tiny_train_overrides(model_dirs, out, method="sft", steps=16, temperature=0.001,
                                                           eval_every=16, lr=3e-2)), progress=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    assert mean([r["loss"] for r in records[-4:]]) < 0.8 * mean([r["loss"] for r in records[:4]])
    assert all(r["teacher_kl"] is None for r in records)
    # (a near-greedy random teacher writes learnable text; at temperature 1 it is uniform noise)
    # the teacher wrote the completions: its FLOPs are sampling, the student's only training
    assert summary["teacher_flops"] > 0 and summary["student_flops"] > 0


class DigitTask(ArithmeticTask):
    """A reward the tiny random student can climb: the fraction of its characters that are digits."""

    def reward(self, completion, example):
        return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def test_rl_raises_the_reward(model_dirs, tmp_path):
    out = tmp_path / "rl"
    summary = train(load_config(None, tiny_train_overrides(model_dirs, out, method="rl", steps=30, eval_every=30,
                                                           prompts_per_step=8, samples_per_prompt=8, lr=3e-2)),
                    progress=False, task=DigitTask())
    rewards = [r["train_reward"] for r in read_jsonl(out / "metrics.jsonl")[1:]]
    assert mean(rewards[-5:]) > mean(rewards[:5]) + 0.1
    assert summary["teacher_flops"] == 0.0


def test_rl_needs_answers(model_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", method="rl", task=prompts, eval_file=prompts)
    with pytest.raises(OpdError, match="needs a reward"):
        train(load_config(None, overrides), progress=False)


def test_sft_from_a_dataset_file(model_dirs, tmp_path):
    data = tmp_path / "sft.jsonl"
    lines = [json.dumps({"prompt": f"Compute {i}+1", "completion": f"= {i + 1}\nAnswer: {i + 1}"}) for i in range(6)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    summary = train(load_config(None, tiny_train_overrides(model_dirs, out, method="sft", sft_data=data, steps=16,
                                                           eval_every=16, lr=3e-2)), progress=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    assert mean([r["loss"] for r in records[-4:]]) < 0.5 * mean([r["loss"] for r in records[:4]])
    assert summary["teacher_flops"] == 0.0  # the data was given
    assert records[0]["completion_tokens"] > 0


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', r"sft.jsonl:1: field 'completion' must be a non-empty string"),
    ('{"completion": "x"}', r"sft.jsonl:1: missing field 'prompt'"),
])
def test_sft_data_errors_name_the_line(model_dirs, tmp_path, line, message):
    data = tmp_path / "sft.jsonl"
    data.write_text(line + "\n")
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", method="sft", sft_data=data)
    with pytest.raises(OpdError, match=message):
        train(load_config(None, overrides), progress=False)
    assert not (tmp_path / "run").exists()


def test_sft_data_needs_method_sft(model_dirs, tmp_path):
    with pytest.raises(OpdError, match="sft_data is only read by method=sft"):
        load_config(None, tiny_train_overrides(model_dirs, tmp_path, sft_data="x.jsonl"))
