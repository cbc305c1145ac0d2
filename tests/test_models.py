"""Loading models and tokenizers: every way a path, a hub id, a dtype or a tokenizer can be wrong is named,
before any compute; and a student whose embedding is padded past its tokenizer trains."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.models import chat_prompt_ids, load_tokenizer, pick_dtype, save_model
from opd.trainer import train
from opd.zoo import make_model


@pytest.mark.parametrize("student, message", [
    ("/nonexistent", r"student=/nonexistent: the directory /nonexistent does not exist. Give a Hugging Face model"),
    ("./missing/model", r"student=./missing/model: the directory missing/model does not exist"),
    ("a/b/c", r"student=a/b/c: the directory a/b/c does not exist"),
])
def test_a_missing_directory_is_named_as_one(model_dirs, tmp_path, student, message):
    with pytest.raises(OpdError, match=message):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", student=student)), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_directory_without_a_model_or_a_file_is_refused(model_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdError, match=r"teacher=.*empty: the directory has no config.json"):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", teacher=tmp_path / "empty")),
              progress=False)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(OpdError, match=r"student=.*weights.bin is a file"):
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", student=tmp_path / "weights.bin")),
              progress=False)


def test_a_hub_id_that_cannot_be_had_says_so(model_dirs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", student="no-such-org/no-such-model")
    result = subprocess.run([sys.executable, "-m", "opd", "train", *overrides], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert ("cannot load a tokenizer for no-such-org/no-such-model: there is no local directory "
            "no-such-org/no-such-model, and the Hugging Face hub did not give it") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_dtype_is_named():
    with pytest.raises(OpdError, match="dtype='fp8' is not one of auto, float32"):
        pick_dtype("fp8", torch.device("cpu"))
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_tokenizer_without_eos_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    values = json.loads(config.read_text())
    values["eos_token"] = None
    config.write_text(json.dumps(values))
    with pytest.raises(OpdError, match="has no eos_token; set one in tokenizer_config.json"):
        load_tokenizer(tmp_path / "tok")


def test_a_tokenizer_without_a_pad_token_gets_eos_as_pad(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tmp_path / "tok" / name
        if path.exists():
            values = json.loads(path.read_text())
            values.pop("pad_token", None)
            path.write_text(json.dumps(values))
    loaded = load_tokenizer(tmp_path / "tok")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the zoo's own tokenizer has a pad of its own
    assert loaded.pad_token_id == loaded.eos_token_id


def test_without_a_chat_template_the_prompt_is_the_plain_user_text(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Compute 1+2"}]
        assert chat_prompt_ids(tokenizer, messages) == tokenizer.encode("Compute 1+2", add_special_tokens=True)
    finally:
        tokenizer.chat_template = template
    assert chat_prompt_ids(tokenizer, messages) != tokenizer.encode("Compute 1+2", add_special_tokens=True)


def padded(tokenizer, width: int, seed: int, extra: int):
    """A model whose embedding has ``extra`` rows past the tokenizer, made the most likely tokens; the
    first ``len(tokenizer)`` rows are those of ``make_model(tokenizer, 1, width, seed)``."""
    vocab = len(tokenizer)
    model = make_model(tokenizer, layers=1, width=width, seed=seed)
    model.resize_token_embeddings(vocab + extra, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = model.get_output_embeddings().weight[:vocab].sum(0) * 50
    return model


@pytest.mark.parametrize("kl, who", [("sampled", "student"), ("full", "student"), ("full", "teacher")])
def test_a_model_padded_past_its_tokenizer_trains_and_evaluates(model_dirs, tokenizer, tmp_path, kl, who):
    """Qwen pads its embedding (151,936 rows for 151,669 tokens). Here the padded rows are the most likely
    tokens: sampling them would crash the teacher (it cannot embed them) and bias every ratio, and an exact
    KL over them would compare distributions over different supports."""
    width, seed = (16, 2) if who == "student" else (32, 1)  # the seeds model_dirs' models were made with
    save_model(padded(tokenizer, width, seed, 8 if who == "student" else 5), tokenizer, tmp_path / "padded")
    runs = {}
    for name, dirs in (("padded", {**model_dirs, who: tmp_path / "padded"}), ("plain", model_dirs)):
        runs[name] = tmp_path / f"run-{name}"
        train(load_config(None, tiny_train_overrides(dirs, runs[name], kl=kl, steps=2, eval_every=2)), progress=False)
    # the padded rows are inert: the run is the unpadded model's, number for number
    for a, b in zip(read_jsonl(runs["plain"] / "metrics.jsonl"), read_jsonl(runs["padded"] / "metrics.jsonl"),
                    strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
