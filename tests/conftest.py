"""Tiny models and a tokenizer built in-process: no network, seconds to make."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from opd.models import chat_prompt_ids, load_model, load_tokenizer, save_model
from opd.rollouts import Rollouts, pack_pairs
from opd.samplers.local import sample
from opd.server import BackgroundServer, ServerConfig, create_app
from opd.zoo import GEMMA_STYLE, build_tokenizer, make_model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(seed=0, vocab_size=300, operators=2, corpus_lines=300)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A random 'teacher' and a different random 'student' sharing the tokenizer, saved in HF format."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, width, seed in (("teacher", 32, 1), ("student", 16, 2)):
        dirs[name] = root / name
        save_model(make_model(tokenizer, layers=1, width=width, seed=seed), tokenizer, dirs[name])
    return dirs


@pytest.fixture(scope="session")
def peaked_teacher(tmp_path_factory, tokenizer, model_dirs) -> dict[str, Path]:
    """``model_dirs`` with a teacher whose output logits are scaled up 10x: two random tiny models are both
    near uniform (KL ~0.01, all noise), a peaked teacher leaves the student something to learn (KL ~1.3
    nats at the start)."""
    return {**model_dirs, "teacher": save_peaked(tokenizer, 1, tmp_path_factory.mktemp("peaked") / "teacher")}


def save_peaked(tokenizer, seed: int, path: Path) -> Path:
    """A random 1 x 32 teacher on ``tokenizer`` with its output logits scaled up 10x, saved at ``path``."""
    teacher = make_model(tokenizer, layers=1, width=32, seed=seed)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(10)
    save_model(teacher, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def other_tokenizer():
    """A tokenizer of another family: other special tokens, chat template, merges and vocabulary size."""
    return build_tokenizer(seed=1, vocab_size=400, operators=2, corpus_lines=300, style=GEMMA_STYLE)


@pytest.fixture(scope="session")
def cross_dirs(tmp_path_factory, other_tokenizer, model_dirs) -> dict[str, Path]:
    """``model_dirs`` with a peaked teacher (logits x10) on ``other_tokenizer``."""
    return {**model_dirs, "teacher": save_peaked(other_tokenizer, 4, tmp_path_factory.mktemp("cross") / "teacher")}


@pytest.fixture()
def tiny_model(tokenizer):
    return make_model(tokenizer, layers=1, width=16, seed=3).eval()


def tiny_train_overrides(model_dirs: dict[str, Path], out: Path, **extra) -> list[str]:
    """Config overrides for a run of a few seconds on the tiny models."""
    values = {"student": str(model_dirs["student"]), "teacher": str(model_dirs["teacher"]),
              "steps": 4, "prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8,
              "eval_examples": 4, "eval_every": 2, "save_every": 2, "warmup_steps": 1, "lr": 1e-2, "kl": "sampled",
              "out": str(out), **extra}
    return [f"{k}={v}" for k, v in values.items()]


def unequal_batch(session) -> Rollouts:
    """One fixed batch (the same in every process) whose completions are cut to unequal lengths, so that
    micro-batches and ranks hold unequal token counts: a wrong normalisation then changes the update."""
    tokenizer = session.tokenizer
    examples = session.task.train_examples(0, session.config.prompts_per_step, 0)
    prompts = [session.prompt_ids(ex.messages) for ex in examples]
    rollouts = sample(session.full_model, prompts, samples_per_prompt=session.config.samples_per_prompt,
                      max_new_tokens=8, eos_id=-1, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      generator=torch.Generator().manual_seed(7))
    width = rollouts.tokens.shape[1] - 8
    for row in range(rollouts.tokens.shape[0]):
        keep = [1, 2, 1, 3, 8, 7, 8, 6][row % 8]  # halves of 7 and 29 tokens
        rollouts.completion_mask[row, width + keep:] = 0
        rollouts.attention_mask[row, width + keep:] = 0
        rollouts.sampler_logprobs[row, width + keep:] = 0
    rollouts.rewards = torch.linspace(0, 1, rollouts.tokens.shape[0])
    return rollouts


class LiveServer(BackgroundServer):
    """``opd serve``'s app for a model directory, on a free loopback port."""

    def __init__(self, model_dir, api_key=None, max_model_len=256):
        self.model = load_model(model_dir, torch.device("cpu"), torch.float32).eval()
        self.tokenizer = load_tokenizer(model_dir)
        config = ServerConfig(model_name="teacher", api_key=api_key, max_model_len=max_model_len,
                              max_body_bytes=64 * 1024)
        self.app = create_app(self.model, self.tokenizer, config)
        super().__init__(self.app)


def rollouts_of(tokenizer):
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}])
               for t in ["Compute 1+2", "Compute 3*(4+5)-2 with a longer prompt", "x"]]
    completions = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id]
                   for c in ["= 3\nAnswer: 3", "= 25", "hello there, a longer completion"]]
    return pack_pairs(prompts, completions, tokenizer.pad_token_id)


def with_bos(model_dir: Path):
    """The tokenizer of ``model_dir`` made to add a BOS (``<|im_start|>``) to every encoding, as Llama's does;
    returns it and the BOS id."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = load_tokenizer(model_dir)
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)])
    return tokenizer, bos


def use_sgd(session, lr: float) -> None:
    """Plain SGD at a constant rate in place of the session's AdamW (and its schedule): the weight change
    is then the gradient itself, where Adam's first step is nearly blind to a gradient's scale."""
    session.optimizer = torch.optim.SGD(session.trainable, lr=lr)
    session.scheduler = torch.optim.lr_scheduler.LambdaLR(session.optimizer, lambda _: 1.0)


def sgd_update(session, rollouts: Rollouts, step_tokens: int) -> float:
    """Score ``rollouts`` with the session's teacher, take their advantages and apply one update by SGD at
    rate 1 (the weight change is then the gradient itself); ``step_tokens`` counts the whole step's
    completion tokens; with ``max_tokens_per_micro_batch`` the micro-batches are the trainer's
    (``token_budget``: as many on every rank). Returns the loss."""
    from opd.trainer import token_budget, update

    hidden = None
    if session.config.kl == "full":
        rollouts.teacher_logprobs, hidden = session.teacher_view.teacher.score_with_hidden(rollouts)
    else:
        rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
    rollouts.advantages = session.objective.advantages(rollouts)
    use_sgd(session, lr=1.0)
    batches, _ = token_budget(session, rollouts)
    return update(session, rollouts, exact_signal(session, hidden), step_tokens, step=0, batches=batches)[0]


def exact_signal(session, hidden):
    """``kl=full``'s teacher signal from the teacher's hidden states (None stays None)."""
    from opd.objective import TeacherSignal

    return None if hidden is None else TeacherSignal(hidden=hidden, head=session.teacher_view.teacher.head)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# two threads on this 2-core machine; `make mutate` sets OMP_NUM_THREADS=1, since forked test processes
# must not inherit an OpenMP thread pool
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
