"""Memory and time of one training step as completions grow, with #29's memory savers switched on one by one,
against TRL's DistillationTrainer with its own gradient checkpointing at the same shapes and work.

    .venv/bin/python bench/long_sequences.py [--lengths 1024 2048 4096 8192] [--modes ...] [--out FILE]

The models: Qwen3 architecture with Qwen3's real vocabulary (151,936 ids, untied head), random weights,
width and depth reduced so a step runs on a CPU: student 4 layers x 256, teacher 4 x 512; a synthetic
word-level tokenizer of 151,936 ids. A step: one prompt of ``--prompt`` tokens, two samples of it with
completions of L and L/2 tokens (rows of unequal length, as sampled rows are), the exact reverse KL
(``kl=full``; TRL: ``beta=1``, its chunked divergence), AdamW. The rows are given, not sampled: this times
what changes with the savers (the teacher's scoring, the student's forward and backward, the update).

Modes (opd's own ``training_step`` on a session built by ``open_session``):

- ``unchunked``: no checkpointing, and the output head in one piece (``scoring.LOGITS_BUDGET`` raised so one
  chunk holds every position: the (positions x vocabulary) logits materialised, as a plain implementation does);
- ``chunked``: opd's default: the head in chunks of 2^25 logits, each recomputed in backward;
- ``checkpointing``: + ``gradient_checkpointing=true``;
- ``token-budget``: + ``max_tokens_per_micro_batch`` = prompt + L (one row per micro-batch, longest first);
- ``trl``: TRL's ``DistillationTrainer.compute_loss`` (its chunked divergence) with
  ``gradient_checkpointing=True``, both rows in one batch, its own AdamW.

Each (mode, length) is a fresh subprocess using both cores, one at a time. AdamW's moments are created first
(a step with zero gradients), so the step measured is a steady one; then one step, timed (wall seconds) and under
``torch.profiler`` (profile_memory). Peak memory = the bytes of every tensor alive before the step (both models,
the optimizer's state) + the peak "Total Allocated" of the profiler's memory events during it (torch's CPU
allocator; on CUDA ``torch.cuda.max_memory_allocated``). The step's peak resident set is recorded beside it.
``opd plan``'s estimate for the same config (weights, optimizer, teacher, and the larger of scoring and training)
is printed beside the opd modes' measured peaks.
Results: bench/results/long_sequences.json and .png (peak memory and step time against length).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
VOCAB = 151_936
OPD_MODES = ("unchunked", "chunked", "checkpointing", "token-budget")
MODES = (*OPD_MODES, "trl")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def build_models(root: Path) -> tuple[Path, Path]:
    """Random Qwen3 student (4 x 256) and teacher (4 x 512) with a 151,936-id word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], model_max_length=32_768)
    tokenizer.chat_template = TEMPLATE
    assert len(tokenizer) == VOCAB
    paths = []
    for name, layers, width, seed in (("teacher", 4, 512, 1), ("student", 4, 256, 2)):
        path = root / name
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            config = Qwen3Config(vocab_size=VOCAB, hidden_size=width, intermediate_size=3 * width,
                                 num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=2,
                                 head_dim=64, max_position_embeddings=32_768, tie_word_embeddings=False,
                                 bos_token_id=None, eos_token_id=vocab["<|im_end|>"], pad_token_id=0)
            Qwen3ForCausalLM(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def rows(prompt: int, length: int, check: bool = False, seed: int = 0):
    """([each row's prompt ids], [each row's completion ids]): random ids past the special tokens. The timed
    step: one prompt, completions of L and L/2 tokens. ``check`` (``--plan-check``): the rows ``opd plan``
    sizes for, two prompts (of ``prompt`` and 3/4 of it: one row left-padded) each with L tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4 * (prompt + length),), generator=generator).tolist()
    if check:
        short = prompt * 3 // 4
        return ([ids[:prompt], ids[prompt:prompt + short]],
                [ids[2 * prompt:2 * prompt + length], ids[2 * prompt + length:2 * prompt + 2 * length]])
    return [ids[:prompt]] * 2, [ids[prompt:prompt + length], ids[prompt + length:prompt + length + length // 2]]


def opd_config(mode: str, student: Path, teacher: Path, out: Path, prompt: int, length: int, prompts: int = 1):
    from opd.config import load_config

    overrides = [f"student={student}", f"teacher={teacher}", f"out={out}", "method=opd", "kl=full",
                 f"prompts_per_step={prompts}", f"samples_per_prompt={2 // prompts}", f"max_new_tokens={length}",
                 "steps=3",
                 "dtype=float32", "eval_examples=1", "eval_every=1000", "save_every=1000", "warmup_steps=0",
                 "lr=1e-5"]
    if mode in ("checkpointing", "token-budget"):
        overrides.append("gradient_checkpointing=true")
    if mode == "token-budget":
        overrides.append(f"max_tokens_per_micro_batch={prompt + length}")
    return load_config(None, overrides)


class GivenRows:
    """A rollout source with fixed rows: the same completions every step (what the savers change is the
    step after sampling), in the sampler's layout: [left padding] prompt completion [right padding]."""

    from_data, where = False, ""

    def __init__(self, prompts: list[list[int]], completions: list[list[int]], device) -> None:
        self.prompts, self.completions, self.device = prompts, completions, device

    def rollouts(self, step: int):
        import torch

        from opd.rollouts import Rollouts

        start = max(map(len, self.prompts))
        tokens = torch.zeros(len(self.completions), start + max(map(len, self.completions)), dtype=torch.long)
        attention = torch.zeros_like(tokens)
        completion = torch.zeros(tokens.shape)
        for i, (prompt, ids) in enumerate(zip(self.prompts, self.completions, strict=True)):
            tokens[i, start - len(prompt):start + len(ids)] = torch.tensor(prompt + ids)
            attention[i, start - len(prompt):start + len(ids)] = 1
            completion[i, start:start + len(ids)] = 1
        index = [self.prompts.index(prompt) for prompt in self.prompts]  # rows of one prompt share its index
        rollouts = Rollouts(tokens=tokens, attention_mask=attention, completion_mask=completion,
                            prompt_index=torch.tensor(index),
                            sampler_logprobs=-completion, rewards=torch.zeros(len(self.completions)),
                            extras={"messages": [[{"role": "user", "content": "w1"}]] * len(self.completions)})
        return rollouts.to(self.device) if hasattr(rollouts, "to") else rollouts

    def push_seconds(self):
        return None

    def finish(self, steps: int) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


def planned(config, student: Path, teacher: Path, prompt: int) -> int:
    """``opd plan``'s bytes for what the step holds: weights, optimizer, teacher, the larger of scoring and
    training (no sampling, no evaluation in this bench)."""
    from opd.plan import memory
    from opd.probe import model_facts

    student_facts, _ = model_facts(str(student), "student", config)
    teacher_facts, _ = model_facts(str(teacher), "teacher", config)
    p = memory(student_facts, teacher_facts, config, 1, "ddp", prompt).parts
    return (p["student_weights"] + p["optimizer"] + p["teacher_weights"]
            + max(p["scoring"], p["training_activations"] + p["gradients"]))


def measure(mode: str, length: int, prompt: int, student: Path, teacher: Path, check: bool = False) -> dict:
    """In this (fresh) process: the optimizer's state created, then one step, timed and profiled."""
    import torch

    from opd.probe import reset_peak, rss_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts, completions = rows(prompt, length, check)
    maker = trl_step if mode == "trl" else opd_step
    step, model, optimizer, cleanup, plan = maker(mode, student, teacher, prompts, completions, device)
    create_state(model, optimizer)
    held = live_tensor_bytes()  # both models' weights and the optimizer's state: what the step starts from
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    reset_peak()
    base = rss_bytes("VmRSS")
    started = time.perf_counter()
    step_peak = profiled_peak(step) if device.type == "cpu" else (step(), 0)[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - held
    seconds = time.perf_counter() - started
    rss_peak = rss_bytes("VmHWM") - base
    cleanup()
    return {"mode": mode, "length": length, "step_seconds": seconds, "allocated_peak": held + step_peak,
            "held_before": held, "rss_step_peak": rss_peak, "planned": plan, "device": str(device)}


def create_state(model, optimizer) -> None:
    """AdamW's moments exist from the first step on: create them (a step with zero gradients and no decay) so
    the measured step is a steady one."""
    import torch

    decays = [group["weight_decay"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, decay in zip(optimizer.param_groups, decays, strict=True):
        group["weight_decay"] = decay


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def profiled_peak(step) -> int:
    """The peak of the bytes torch's CPU allocator hands out during one step, above what was held before it:
    "Total Allocated" in the profiler's memory events (it counts the allocations made while profiling)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp, "trace.json")
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]")


def opd_step(mode, student, teacher, prompts, completions, device):
    from opd import scoring
    from opd.setup import open_session
    from opd.trainer import training_step

    if mode == "unchunked":  # one chunk holds every completion position: the logits in one piece
        import opd.plan

        scoring.LOGITS_BUDGET = opd.plan.LOGITS_BUDGET = 1 << 40
    tmp = tempfile.TemporaryDirectory()
    longest, distinct = max(map(len, prompts)), len({tuple(p) for p in prompts})
    config = opd_config(mode, student, teacher, Path(tmp.name) / "run", longest, len(completions[0]), distinct)
    plan = planned(config, student, teacher, longest)
    session = open_session(config)
    session.source = GivenRows(prompts, completions, session.device)
    counter = iter(range(10**6))

    def step():
        training_step(session, next(counter))

    def cleanup():
        session.close()
        tmp.cleanup()

    return step, session.student, session.optimizer, cleanup, plan


def trl_step(mode, student, teacher, prompts, completions, device):
    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from opd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(student)
    tokenizer.padding_side = "left"
    student_model = load_model(student, device, torch.float32)
    teacher_model = load_model(teacher, device, torch.float32)
    tmp = tempfile.TemporaryDirectory()
    config = DistillationConfig(
        output_dir=tmp.name, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[],
        max_completion_length=len(completions[0]), temperature=1.0, beta=1.0, use_cpu=device.type == "cpu",
        disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "w1"}]}])
    trainer = DistillationTrainer(model=student_model, teacher_model=teacher_model, args=config,
                                  train_dataset=dataset, processing_class=tokenizer)
    # what transformers' Trainer does when training starts with gradient_checkpointing=True
    student_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
    student_model.train()
    optimizer = trainer.create_optimizer()
    width = max(map(len, completions))
    completion_ids = torch.zeros(2, width, dtype=torch.long)
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    for i, ids in enumerate(completions):
        completion_ids[i, :len(ids)] = torch.tensor(ids)
        completion_mask[i, :len(ids)] = 1
    inputs = {"prompt_ids": torch.tensor(prompts), "prompt_mask": torch.ones(2, len(prompts[0]), dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "num_items_in_batch": completion_mask.sum().float()}
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(student_model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_model.parameters(), 1.0)
        optimizer.step()

    return step, student_model, optimizer, tmp.cleanup, None


def child(args) -> None:
    result = measure(args.child, args.child_length, args.prompt, Path(args.models) / "student",
                     Path(args.models) / "teacher", args.plan_check)
    Path(args.child_out).write_text(json.dumps(result))


def slope(points: list[dict], key: str) -> float | None:
    """Least-squares bytes per completion token."""
    if len(points) < 2:
        return None
    xs, ys = [p["length"] for p in points], [p[key] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def summarise(results: list[dict]) -> dict:
    by_mode = {m: sorted((r for r in results if r["mode"] == m and "error" not in r), key=lambda r: r["length"])
               for m in MODES}
    slopes = {m: slope(points, "allocated_peak") for m, points in by_mode.items()}
    summary: dict = {"slope_bytes_per_token": slopes}
    for m in ("unchunked", "chunked"):
        if slopes.get(m) and slopes.get("token-budget"):
            summary[f"slope_ratio_{m}_over_all_savers"] = slopes[m] / slopes["token-budget"]
    at = {m: {p["length"]: p for p in points} for m, points in by_mode.items()}
    if 8192 in at["token-budget"] and 8192 in at["trl"]:
        summary["peak_over_trl_at_8k"] = at["token-budget"][8192]["allocated_peak"] / at["trl"][8192]["allocated_peak"]
    for length, point in at["checkpointing"].items():
        if length in at["chunked"]:
            summary.setdefault("checkpointing_time_ratio", {})[length] = (
                point["step_seconds"] / at["chunked"][length]["step_seconds"])
    summary["plan_over_measured"] = {
        m: {length: p["planned"] / p["allocated_peak"] for length, p in at[m].items() if p.get("planned")}
        for m in OPD_MODES}
    return summary


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        points = sorted((r for r in results if r["mode"] == mode and "error" not in r), key=lambda r: r["length"])
        if not points:
            continue
        xs = [p["length"] for p in points]
        left.plot(xs, [p["allocated_peak"] / 2**30 for p in points], marker="o", label=mode)
        right.plot(xs, [p["step_seconds"] for p in points], marker="o", label=mode)
        if mode != "trl" and points[0].get("planned"):
            left.plot(xs, [p["planned"] / 2**30 for p in points], linestyle=":", color=left.lines[-1].get_color())
    left.set(xlabel="completion tokens (longest row)", ylabel="peak allocated, GiB (dotted: opd plan)",
             xscale="log", yscale="log", title="memory of one step")
    right.set(xlabel="completion tokens (longest row)", ylabel="seconds", xscale="log", yscale="log",
              title="time of one step")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--models", default=None, help="where the random models are built (default: a temp dir)")
    parser.add_argument("--out", default=None, help="default: bench/results/long_sequences.json (with --plan-check: "
                        "long_sequences_plan.json)")
    parser.add_argument("--plan-check", action="store_true",
                        help="memory at the rows opd plan sizes for (two prompts, one left-padded, each with L "
                        "tokens): opd's modes only, the plan's estimate against the measured peak")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one (mode, length) may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.plan_check and "trl" in args.modes:
        args.modes = [m for m in args.modes if m != "trl"]  # TRL has no plan
    args.out = args.out or str(RESULTS / ("long_sequences_plan.json" if args.plan_check else "long_sequences.json"))
    holder = None if args.models else tempfile.TemporaryDirectory()
    models = Path(args.models or holder.name)
    build_models(models)
    results = []
    for length in args.lengths:
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp, "result.json")
                command = [sys.executable, __file__, "--child", mode, "--child-length", str(length), "--child-out",
                           str(out), "--prompt", str(args.prompt), "--models", str(models)]
                command += ["--plan-check"] if args.plan_check else []
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                    failure = None if done.returncode == 0 else (
                        f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0
                        else ([line for line in done.stderr.splitlines() if "Error" in line] or ["?"])[-1])
                except subprocess.TimeoutExpired:
                    failure = f"over {args.timeout} s"
                result = json.loads(out.read_text()) if failure is None else {"mode": mode, "length": length,
                                                                               "error": failure}
            results.append(result)
            if "error" in result:
                print(f"{mode:>14} {length:>6}: failed: {result['error']}", flush=True)
            else:
                plan = f"  plan {result['planned'] / 2**30:6.2f} GiB" if result["planned"] else ""
                print(f"{mode:>14} {length:>6}: {result['step_seconds']:7.2f} s  allocated "
                      f"{result['allocated_peak'] / 2**30:6.2f} GiB  rss +{result['rss_step_peak'] / 2**30:6.2f} GiB"
                      f"{plan}", flush=True)
    summary = summarise(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
