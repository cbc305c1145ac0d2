"""The embedded default: a byte-level BPE tokenizer, a teacher and an SFT-initialised student,
built from scratch, deterministically from a seed, in real Hugging Face format.

``opd zoo build`` runs ``build``. The teacher learns the arithmetic task from reference solutions; the
student is a smaller model trained briefly on a fixed set of teacher samples, like the blog's
"SFT-400K" starting point.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opd.evaluation import completions_text, evaluate
from opd.losses import label_smoothed_nll
from opd.models import EMBEDDED_DIR, chat_prompt_ids, load_model, load_tokenizer, save_model
from opd.progress import progress
from opd.rollouts import pack_pairs
from opd.samplers.local import sample
from opd.scoring import completion_hidden, head_logprobs
from opd.tasks import ArithmeticTask, step_rng
from opd.tasks.arithmetic import RETRY, solution_with_retries
from opd.tasks.arithmetic import reward as arithmetic_reward


@dataclass(frozen=True)
class TokenizerStyle:
    """What makes a zoo tokenizer family its own: special tokens, chat template, how digits split."""

    special_tokens: tuple[str, ...]  # ids 0.. in this order
    eos: str
    pad: str
    user_open: str  # the template's text around a user turn and before the reply
    turn_close: str
    reply_open: str
    individual_digits: bool  # Llama-style one token per digit, or runs of digits that BPE may merge

    def chat_template(self) -> str:
        return ("{% for message in messages %}" + self.user_open.replace("user", "{{ message['role'] }}")
                + "{{ message['content'] }}" + self.turn_close + "{% endfor %}"
                "{% if add_generation_prompt %}" + self.reply_open + "{% endif %}")

    def render(self, prompt: str, reply: str) -> str:
        return f"{self.user_open}{prompt}{self.turn_close}{self.reply_open}{reply}{self.eos}\n"


QWEN_STYLE = TokenizerStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>",
                            user_open="<|im_start|>user\n", turn_close="<|im_end|>\n",
                            reply_open="<|im_start|>assistant\n", individual_digits=True)
# the second family (``embedded:teacher-bpe2``): Gemma-like turns, its own special tokens, numbers merged
GEMMA_STYLE = TokenizerStyle(("<pad>", "<eos>", "<start_of_turn>", "<end_of_turn>"), eos="<end_of_turn>",
                             pad="<pad>", user_open="<start_of_turn>user\n", turn_close="<end_of_turn>\n",
                             reply_open="<start_of_turn>model\n", individual_digits=False)
CHAT_TEMPLATE = QWEN_STYLE.chat_template()
SPECIAL_TOKENS = list(QWEN_STYLE.special_tokens)
WORDS = (
    "the a an of to and in is was for on that with as it by at from this be are or not have has "
    "which you your please write answer list question sentence word words paragraph short long "
    "company team project report policy meeting office staff manager engineer customer product "
    "plan budget year month week day time people city river mountain north south east west "
    "always never only every each first last next before after because when where what who how "
    "summary title bullet point format json lowercase uppercase start end include exclude"
).split()


@dataclass
class ZooConfig:
    seed: int = 0
    vocab_size: int = 512
    operators: int = 3
    teacher_layers: int = 4
    teacher_width: int = 128
    teacher_steps: int = 2500
    teacher_lr: float = 3e-3
    teacher_label_smoothing: float = 0.0  # > 0 leaves a uniform floor the student learns to sample
    teacher_retry_rate: float = 0.0  # per line: a wrong line, "retry", the right one (the wrong one untrained)
    student_layers: int = 2
    student_width: int = 96
    student_sft_examples: int = 4096  # fixed set of teacher samples the student is trained on
    student_sft_steps: int = 500
    student_lr: float = 3e-3
    sample_temperature: float = 1.0  # teacher's temperature when writing the student's SFT data
    batch_size: int = 64
    eval_examples: int = 500
    max_new_tokens: int = 48


def corpus(seed: int, operators: int, lines: int = 4000, style: TokenizerStyle = QWEN_STYLE) -> list[str]:
    """Text the tokenizer learns its merges from: task chats plus plain English sentences."""
    rng = random.Random(seed)
    task = ArithmeticTask(operators)
    texts = [style.render(problem.prompt, problem.solution) for problem in task.problems(rng, lines, "train")]
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        texts.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","]))
    return texts


def build_tokenizer(seed: int, vocab_size: int, operators: int, corpus_lines: int = 4000,
                    style: TokenizerStyle = QWEN_STYLE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (encodes any text); with the default style its digits are always single tokens, as
    in Llama, and its turns Qwen's; ``GEMMA_STYLE`` gives another family (other special tokens, template,
    and numbers that BPE may merge into one token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=style.individual_digits),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(style.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(seed, operators, corpus_lines, style), trainer=trainer)
    others = [t for t in style.special_tokens if t not in (style.eos, style.pad)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=style.eos, pad_token=style.pad,
        additional_special_tokens=others, chat_template=style.chat_template(),
        model_max_length=256,
    )


def make_model(tokenizer: PreTrainedTokenizerFast, layers: int, width: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    heads = max(2, width // 32)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=width // heads, max_position_embeddings=256, tie_word_embeddings=True,
        rope_theta=10000.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)


def sft_loss(model, tokenizer, prompts: list[list[int]], completions: list[list[int]],
             weights: list[list[int]] | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Mean (label-smoothed) cross-entropy over the completion tokens, or with ``weights`` (0/1 per
    completion token, row by row) ``sum_t w_t nll_t / sum_t w_t``: a token of weight 0 is context only."""
    rollouts = pack_pairs(prompts, completions, tokenizer.pad_token_id)
    hidden, head = completion_hidden(model, rollouts)
    targets = rollouts.tokens[:, 1:][rollouts.completion_mask[:, 1:] > 0]
    nll = label_smoothed_nll(head_logprobs(head, hidden, len(tokenizer)), targets, smoothing)
    if weights is None:
        return nll.mean()
    weight = torch.tensor([w for row in weights for w in row], dtype=nll.dtype)  # the order of ``targets``
    return (nll * weight).sum() / weight.sum().clamp(min=1)


def train_sft(model, tokenizer, batches, steps: int, lr: float, smoothing: float, desc: str) -> None:
    """Cross-entropy on completion tokens; ``batches(step)`` gives (prompt ids, completion ids) and
    optionally a 0/1 weight per completion token (0: not trained, e.g. an injected mistake)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    model.train()
    bar = progress(range(steps), desc=desc, unit="step")
    for step in bar:
        prompts, completions, *weights = batches(step)
        loss = sft_loss(model, tokenizer, prompts, completions, weights[0] if weights else None, smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def weighted_ids(tokenizer: PreTrainedTokenizerFast, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """The segments' text as token ids with EOS, and a 0/1 weight per id: 1 when every character the
    token covers belongs to a trained segment (EOS: 1)."""
    text, trained = "", []
    for piece, train in segments:
        text += piece
        trained += [train] * len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = [int(all(trained[start:end])) for start, end in encoded["offset_mapping"]]
    return encoded["input_ids"] + [tokenizer.eos_token_id], weights + [1]


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def build_teacher(tokenizer: PreTrainedTokenizerFast, config: ZooConfig) -> Qwen3ForCausalLM:
    """The teacher learns the task from reference solutions (optionally label-smoothed)."""
    task = ArithmeticTask(config.operators)

    def batches(step: int):
        rng = step_rng(config.seed, step, salt=1)
        problems = task.problems(rng, config.batch_size, "train")
        prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
        if not config.teacher_retry_rate:
            return prompts, [tokenizer.encode(p.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
                             for p in problems]
        traces = [weighted_ids(tokenizer, solution_with_retries(p.tree, rng, config.teacher_retry_rate))
                  for p in problems]
        return prompts, [ids for ids, _ in traces], [weights for _, weights in traces]

    teacher = make_model(tokenizer, config.teacher_layers, config.teacher_width, config.seed)
    train_sft(teacher, tokenizer, batches, config.teacher_steps, config.teacher_lr,
              config.teacher_label_smoothing, "zoo: teacher")
    return teacher


def build_student(tokenizer: PreTrainedTokenizerFast, teacher: torch.nn.Module,
                  config: ZooConfig) -> tuple[Qwen3ForCausalLM, float, float]:
    """A smaller model trained on one teacher sample for each of a fixed set of training prompts.
    Returns the student, the verified accuracy of its SFT data and the share of it with a retry."""
    task = ArithmeticTask(config.operators)
    problems = task.problems(step_rng(config.seed, 0, salt=2), config.student_sft_examples, "train")
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    generator = torch.Generator().manual_seed(config.seed)
    completions: list[list[int]] = []
    for start in progress(range(0, len(prompts), 256), desc="zoo: teacher samples"):
        rollouts = sample(teacher, prompts[start : start + 256], max_new_tokens=config.max_new_tokens,
                          temperature=config.sample_temperature, eos_id=tokenizer.eos_token_id,
                          pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), generator=generator)
        completions.extend(rollouts.completion_ids())
    texts = completions_text(tokenizer, completions)
    data_accuracy = sum(arithmetic_reward(t, p.answer) for t, p in zip(texts, problems, strict=True)) / len(problems)
    retry_share = sum(RETRY in t for t in texts) / len(texts)

    def batches(step: int):
        rng = step_rng(config.seed, step, salt=3)
        picks = [rng.randrange(len(prompts)) for _ in range(config.batch_size)]
        return [prompts[i] for i in picks], [completions[i] for i in picks]

    student = make_model(tokenizer, config.student_layers, config.student_width, config.seed + 1)
    train_sft(student, tokenizer, batches, config.student_sft_steps, config.student_lr, 0.0, "zoo: student SFT")
    return student, data_accuracy, retry_share


def build(out_dir: Path = EMBEDDED_DIR, config: ZooConfig | None = None, reuse_teacher: bool = False) -> dict:
    """Build tokenizer, teacher and student into ``out_dir``; returns the zoo's card (zoo.json).
    With ``reuse_teacher`` the tokenizer and teacher already in ``out_dir`` are kept."""
    config = config or ZooConfig()
    started = time.time()
    torch.manual_seed(config.seed)
    task = ArithmeticTask(config.operators)
    eval_set = task.eval_examples(config.eval_examples)
    if reuse_teacher:
        tokenizer = load_tokenizer(out_dir / "teacher")
        teacher = load_model(out_dir / "teacher", torch.device("cpu"), torch.float32).eval()
    else:
        tokenizer = build_tokenizer(config.seed, config.vocab_size, config.operators)
        teacher = build_teacher(tokenizer, config)
    teacher_acc = evaluate(teacher, tokenizer, task, eval_set, max_new_tokens=config.max_new_tokens).accuracy
    student, data_accuracy, retry_share = build_student(tokenizer, teacher, config)
    student_acc = evaluate(student, tokenizer, task, eval_set, max_new_tokens=config.max_new_tokens).accuracy
    card = {
        "config": asdict(config),
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "student_sft_data_accuracy": data_accuracy,
        "student_sft_data_retry_share": retry_share,  # teacher samples that show a retry (its own mistakes)
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "build_seconds": round(time.time() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if not reuse_teacher:
        save_model(teacher, tokenizer, out_dir / "teacher")
    save_model(student, tokenizer, out_dir / "student")
    (out_dir / "zoo.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


SECOND_TEACHER = "teacher-bpe2"  # embedded:teacher-bpe2: a teacher on another tokenizer


def build_second_teacher(out_dir: Path = EMBEDDED_DIR, config: ZooConfig | None = None,
                         vocab_size: int = 1024) -> dict:
    """A teacher for the same task on a tokenizer of another family (``GEMMA_STYLE``: other special tokens
    and chat template, numbers merged into multi-digit tokens, another vocabulary size and merges), to
    distil the embedded student across tokenizers. Writes ``out_dir/teacher-bpe2`` and its card."""
    config = config or ZooConfig()
    started = time.time()
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.seed + 1, vocab_size, config.operators, style=GEMMA_STYLE)
    teacher = build_teacher(tokenizer, config)
    eval_set = ArithmeticTask(config.operators).eval_examples(config.eval_examples)
    card = {
        "config": {**asdict(config), "vocab_size": vocab_size, "tokenizer_style": "gemma"},
        "teacher_accuracy": evaluate(teacher, tokenizer, ArithmeticTask(config.operators), eval_set,
                                     max_new_tokens=config.max_new_tokens).accuracy,
        "tokenizer_size": len(tokenizer),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "build_seconds": round(time.time() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(teacher, tokenizer, out_dir / SECOND_TEACHER)
    (out_dir / f"{SECOND_TEACHER}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
