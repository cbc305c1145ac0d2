"""A Qwen3 pair as a user has one (issue #41): Qwen3's real vocabulary (151,643 ordinary tokens and its 26 added
ones, 151,669 in all), an embedding padded to 151,936 rows, and Qwen3's own chat template as TRL ships it, with
thinking on and off, end to end through ``opd train``, ``opd serve`` as the rollout server, and ``opd chat``.

Everything is built here: a byte-level tokenizer of Qwen3's size (the bytes encode any text, the rest of the
ordinary vocabulary is filler no text maps to), and two random ``Qwen3ForCausalLM`` models. In both the padded
rows are made the most likely tokens by far (a direction every hidden state shares, which only the padded rows
read strongly), so any code that samples or scores over the padded rows shows it at once: a drawn id past the
tokenizer, or a KL to the teacher of ~100 nats in place of a fraction of one."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs TRL's Qwen3 chat template")

ORDINARY = 151_643  # Qwen3's byte-level BPE vocabulary
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # 151643-151656, special
ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]  # -151668
TOKENS = ORDINARY + len(SPECIAL) + len(ADDED)  # 151,669: len(tokenizer)
ROWS = 151_936  # Qwen3's embedding rows (vocab_size in its config.json)
THINKING_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the generation prompt with enable_thinking=false
PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in itertools.product(range(4), (1, 2))]


def qwen3_template() -> str:
    """Qwen3's chat template, as the installed TRL ships it (never copied into opd)."""
    folder = Path(next(iter(importlib.util.find_spec("trl").submodule_search_locations))) / "chat_templates"
    return (folder / "qwen3.jinja").read_text(encoding="utf-8")


def qwen3_tokenizer():
    """A tokenizer of Qwen3's shape: byte-level BPE with 151,643 ordinary tokens (the 256 bytes, which encode any
    text, then filler), its special and added tokens at their ids, EOS ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for letters in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=4):
        if len(vocab) == ORDINARY:
            break
        vocab["Ġ" + "".join(letters)] = len(vocab)  # a word with its leading space, as byte-level BPE spells one
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=qwen3_template(), model_max_length=40960)


def qwen3_model(tokenizer, width: int, layers: int, seed: int):
    """A random ``Qwen3ForCausalLM`` with Qwen3's 151,936-row (tied) embedding, its padded rows the most likely
    tokens after every context: every real row shares one coordinate, which the padded rows read 30x stronger."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    heads = 2
    config = Qwen3Config(vocab_size=ROWS, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=width // heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:TOKENS, 0] += 1.0
        embedding[TOKENS:] = 0.0
        embedding[TOKENS:, 0] = 30.0
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """The student (32 wide, 1 layer) and a bigger teacher (64 wide, 2 layers), saved as HF model directories
    with the tokenizer, and a prompts file."""
    from opd.models import save_model

    root = tmp_path_factory.mktemp("qwen3")
    tokenizer = qwen3_tokenizer()
    dirs = {"student": root / "student", "teacher": root / "teacher", "prompts": root / "prompts.jsonl",
            "held_out": root / "held_out.jsonl"}
    save_model(qwen3_model(tokenizer, 32, 1, seed=1), tokenizer, dirs["student"])
    save_model(qwen3_model(tokenizer, 64, 2, seed=2), tokenizer, dirs["teacher"])
    dirs["prompts"].write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:6]))
    dirs["held_out"].write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[6:]))
    return dirs


@pytest.fixture()
def spy(monkeypatch):
    """Every batch the trainer draws, as it reaches the teacher (tokens, completion mask); each is checked at
    once to hold only the tokenizer's ids (a padded row drawn would otherwise fail later, in scoring)."""
    import opd.trainer

    seen, real = [], opd.trainer.grade

    def grade(view, rollouts, *args, **kwargs):
        drawn = rollouts.tokens[rollouts.completion_mask > 0]
        assert drawn.numel() > 0 and int(drawn.max()) < TOKENS, f"a padded row was sampled: {int(drawn.max())}"
        seen.append((rollouts.tokens.clone(), rollouts.completion_mask.clone()))
        return real(view, rollouts, *args, **kwargs)

    monkeypatch.setattr(opd.trainer, "grade", grade)
    return seen


def train_args(pair: dict[str, Path], out: Path, thinking: bool, **extra) -> list[str]:
    """``opd train``'s command line for a short run on the pair, both sides' templates with ``enable_thinking``."""
    switch = json.dumps({"enable_thinking": thinking})
    values = {"student": pair["student"], "teacher": pair["teacher"], "task": pair["prompts"],
              "eval_file": pair["held_out"], "method": "opd",
              "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "eval_every": 2,
              "eval_examples": 2, "eval_samples": 0, "save_every": 2, "warmup_steps": 0, "lr": 1e-3,
              "chat_template_kwargs": switch, "teacher_chat_template_kwargs": switch, **extra}
    return ["train", *[f"{k}={v}" for k, v in values.items()], "--out", str(out), "--quiet"]


def check_run(out: Path, seen: list, thinking: bool, steps: int = 2) -> None:
    """The run finished, its losses and KLs finite (the KL that of two near-uniform distributions over the
    tokenizer's ids, not ~100 nats from the teacher's padded rows), every sampled id one of the tokenizer's, and
    each prompt rendered as Qwen3's template renders it with the thinking switch."""
    from transformers import AutoTokenizer

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    for record in records[1:]:
        assert math.isfinite(record["loss"]) and abs(record["teacher_kl"]) < 1, record
    assert len(seen) == steps
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for tokens, mask in seen:
        for row, row_mask in zip(tokens, mask, strict=True):
            start = int(row_mask.nonzero()[0])
            prompt = tokenizer.decode(row[:start], skip_special_tokens=False).replace("<|endoftext|>", "")
            question = next((p["prompt"] for p in PROMPTS if p["prompt"] in prompt), None)
            assert question, prompt
            expected = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=thinking)
            assert prompt == expected
            assert prompt.endswith(THINKING_OFF) != thinking
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["kl"], resolved["teacher_template"]) == ("full", "shared")  # one tokenizer, one rendering
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["vocab_size"] == ROWS
    from opd.templates import family_of

    assert family_of(AutoTokenizer.from_pretrained(final).chat_template) == "qwen3"  # the model's own, kept


def test_the_pair_has_qwen3s_shape(pair):
    """What the runs below rest on: the saved tokenizer has Qwen3's size and ids and encodes any text, the models
    keep their 151,936 rows, and opd reads the template as TRL's qwen3 (its own for a single-turn run)."""
    from opd.models import load_model, load_tokenizer
    from opd.templates import family_of

    tokenizer = load_tokenizer(pair["student"])
    assert len(tokenizer) == TOKENS == 151_669
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) \
        == [151_643, 151_644, 151_645, 151_667, 151_668]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "What is 2 plus 2? Ünïcode, tabs\tand <think>tags</think>."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert family_of(tokenizer.chat_template) == "qwen3"
    for name in ("student", "teacher"):
        model = load_model(pair[name], torch.device("cpu"), torch.float32)
        assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == ROWS
        with torch.no_grad():  # the padded rows are what an unrestricted draw would take
            logits = model(torch.tensor([tokenizer.encode(text)])).logits[0]
        assert (logits.argmax(-1) >= TOKENS).all()


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_opd_train_on_a_qwen3_pair(pair, tmp_path, spy, thinking):
    from opd.cli import main

    out = tmp_path / "run"
    assert main(train_args(pair, out, thinking)) == 0
    check_run(out, spy, thinking)


def test_opd_serve_samples_for_a_run_on_a_qwen3_pair(pair, tmp_path, spy, monkeypatch):
    """`opd serve` in its own process as the rollout server (sampler=http://): the run's weights reach it before
    each draw (its log-probs are the trainer's), and it never samples a padded row either (checked on what it
    answers, before the trainer reads it)."""
    import httpx

    from opd.cli import main
    from opd.http import wait_until_healthy
    from opd.samplers.remote import RemoteSampler
    from opd.server import free_port

    answered, real = [], RemoteSampler.sample

    def sample(self, *args, **kwargs):
        rollouts = real(self, *args, **kwargs)
        drawn = rollouts.tokens[rollouts.completion_mask > 0]
        assert int(drawn.max()) < TOKENS, f"the rollout server sampled a padded row: {int(drawn.max())}"
        answered.append(drawn.numel())
        return rollouts

    monkeypatch.setattr(RemoteSampler, "sample", sample)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "opd", "serve", str(pair["student"]), "--port", str(port),
                                   "--name", "qwen3-student"], stderr=handle, text=True)
        try:
            wait_until_healthy(url, server, timeout=120, every=0.2)
            listing = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
            out = tmp_path / "run"
            assert main(train_args(pair, out, thinking=False, sampler=url)) == 0, log.read_text()
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert [(m["id"], m["vocab_size"]) for m in listing] == [("qwen3-student", TOKENS)]
    assert len(answered) == 2 and all(answered)
    check_run(out, spy, thinking=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    assert all(r["engine_max_abs_logprob_gap"] <= 1e-4 for r in records), records


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_opd_chat_with_a_trained_qwen3_student(pair, tmp_path, monkeypatch, capsys, thinking):
    """One exchange with `opd chat`, and one sample with `opd sample`, on a run's final/ (the padded model it
    saved), thinking on and off (--chat-template-kwargs): the prompt is Qwen3's rendering of the message, the
    reply drawn from the tokenizer's ids only."""
    import opd.chat
    from opd.cli import main
    from opd.models import load_tokenizer

    final = tmp_path / "run" / "final"
    assert main(train_args(pair, tmp_path / "run", thinking, steps=1, eval_every=1, save_every=1)) == 0
    drawn, real = [], opd.chat.sample

    def sample(model, prompts, **kwargs):
        rollouts = real(model, prompts, **kwargs)
        drawn.append((prompts[0], rollouts.completion_ids()[0]))
        return rollouts

    monkeypatch.setattr(opd.chat, "sample", sample)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus 2?\n"))
    capsys.readouterr()
    switch = json.dumps({"enable_thinking": thinking})
    assert main(["chat", str(final), "--max-new-tokens", "8", "--temperature", "1",
                 "--chat-template-kwargs", switch]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 1
    (prompt, reply), = drawn
    tokenizer = load_tokenizer(final)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
    assert tokenizer.decode(prompt) == expected and expected.endswith(THINKING_OFF) != thinking
    assert len(reply) == 8 and max(reply) < TOKENS, reply
    # `opd sample` takes the same switch
    import opd.samplers.local

    monkeypatch.setattr(opd.samplers.local, "sample", sample)
    assert main(["sample", str(final), "--prompt", "What is 2 plus 2?", "--max-new-tokens", "8",
                 "--chat-template-kwargs", switch]) == 0
    assert capsys.readouterr().out.count("--- sample") == 1
    assert tokenizer.decode(drawn[-1][0]) == expected and max(drawn[-1][1]) < TOKENS


def docs_tool_command() -> list[str]:
    """The real-pair tool command of docs/conversations.md, as a user copies it (continuations joined)."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "docs" / "conversations.md").read_text()
    start = text.index("opd train student=Qwen/Qwen3-1.7B")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(lines))


def test_the_docs_real_pair_tool_command_runs_as_written_on_stand_ins(pair, tmp_path, monkeypatch, capsys):
    """docs/conversations.md's command for a Qwen3 pair with tools, word for word but for the models (the stand-in
    pair above, for Qwen/Qwen3-1.7B and Qwen/Qwen3-8B), the prompts file and the tools' module (written here), and
    a short run's size: the student's conversations take TRL's qwen3 training template, the tools reach it."""
    from opd.cli import main

    (tmp_path / "mytools.py").write_text(
        'def search(query: str) -> str:\n    """Search the web.\n\n    Args:\n        query: the words\n    """\n'
        '    return "nothing found"\n\n\n'
        'def fetch(url: str) -> str:\n    """Fetch a page.\n\n    Args:\n        url: the address\n    """\n'
        '    return "an empty page"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    command = docs_tool_command()
    assert command[:2] == ["opd", "train"] and "tools=mytools:search,mytools:fetch" in command
    stand_ins = {"student=Qwen/Qwen3-1.7B": f"student={pair['student']}",
                 "teacher=Qwen/Qwen3-8B": f"teacher={pair['teacher']}", "task=prompts.jsonl": f"task={pair['prompts']}"}
    assert set(stand_ins) <= set(command)
    args = [stand_ins.get(word, word) for word in command[1:]]
    out = tmp_path / "run"
    short = ["steps=1", "prompts_per_step=2", "samples_per_prompt=2", "max_new_tokens=6", "max_turns=2",
             f"eval_file={pair['held_out']}", "eval_examples=2", "eval_samples=0", "warmup_steps=0"]
    assert main(args + short + ["--out", str(out)]) == 0
    log = capsys.readouterr()
    assert "qwen3_training" in log.out + log.err  # said in the run's log: the family's training template taken
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1] and all(math.isfinite(r["loss"]) for r in records[1:])
    assert records[0]["teacher_accuracy"] is not None  # the teacher's own conversations, in its training variant
