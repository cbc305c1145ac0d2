"""opd's on-policy distillation against TRL's DistillationTrainer on the same work.

    pip install -e '.[bench]'        # TRL; nothing is installed at import time
    .venv/bin/python bench/vs_trl.py [--pair zoo|wide] [--steps 30] [--repeats 3] [--out FILE]
                                     [--systems opd-sampled opd-full trl]

The same student, teacher, prompts (each step's prompts x samples, in the same order), batch, max
completion tokens, learning rate and schedule, temperature 1, float32. opd runs with ``kl=sampled``
(the reference estimator) and ``kl=full`` (the exact reverse KL over the vocabulary: what TRL's
``beta=1`` optimises); TRL's DistillationTrainer runs with ``beta=1`` and a local teacher. Each run is a
fresh subprocess (so peak memory is its own), the three systems alternate, ``--repeats`` times.

Per run: median seconds per step (the first step and the evaluation step excluded), completion tokens
trained per second, peak memory (max RSS on CPU, max allocated on CUDA), and after the last step the
held-out accuracy and per-token reverse KL to the teacher measured by the same code (opd's
``evaluate``) for every system. Writes bench/results/vs_trl.json (or --out) with
``tokens_per_second_ratio`` (opd kl=full / TRL, median over repeats) at the top level (null when
``--systems`` leaves TRL out). tests/test_bench.py runs a short form (3 steps, a few prompts).

``--pair wide`` builds a wider untrained pair with the zoo's tokenizer (teacher 4 x 512, student
4 x 256): speed only, its accuracy means nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SYSTEMS = ("opd-sampled", "opd-full", "trl")
RESULTS = Path(__file__).with_name("results")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def wide_pair(root: Path) -> tuple[str, str]:
    from opd.models import load_tokenizer, resolve_model_path, save_model
    from opd.zoo import make_model

    tokenizer = load_tokenizer(resolve_model_path("embedded:teacher"))
    paths = []
    for name, layers, width, seed in (("teacher", 4, 512, 1), ("student", 4, 256, 2)):
        path = root / name
        if not (path / "config.json").is_file():
            save_model(make_model(tokenizer, layers, width, seed), tokenizer, path)
        paths.append(str(path))
    return paths[0], paths[1]


def step_prompts(args) -> list[list[dict]]:
    """Every step's prompts, each repeated ``samples`` times in a row (opd's order)."""
    from opd.tasks import ArithmeticTask

    task = ArithmeticTask()
    out = []
    for step in range(args.steps):
        for example in task.train_examples(step, args.prompts, args.seed):
            out.extend([example.messages] * args.samples)
    return out


def evaluate_final(model, tokenizer, teacher, args, device) -> dict:
    from opd.evaluation import evaluate
    from opd.models import load_tokenizer
    from opd.tasks import ArithmeticTask
    from opd.teachers import LocalTeacher, TeacherView

    task = ArithmeticTask()
    teacher_tokenizer = load_tokenizer(args.teacher)
    # evaluate scores through a TeacherView (score(rollouts, messages) -> Scored), as training reads the teacher
    view = TeacherView(LocalTeacher(teacher, len(teacher_tokenizer)), tokenizer, teacher_tokenizer)
    result = evaluate(model, tokenizer, task, task.eval_examples(args.eval_examples),
                      max_new_tokens=args.max_new_tokens, teacher=view, seed=args.seed)
    return {"accuracy": result.accuracy, "teacher_kl": result.teacher_kl}


def run_opd(system: str, args, device) -> dict:
    from opd.config import load_config
    from opd.models import load_model
    from opd.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [
            f"student={args.student}", f"teacher={args.teacher}", f"kl={system.split('-')[1]}",
            f"steps={args.steps}", f"prompts_per_step={args.prompts}", f"samples_per_prompt={args.samples}",
            f"max_new_tokens={args.max_new_tokens}", f"lr={args.lr}", f"warmup_steps={args.warmup}",
            f"eval_every={args.steps + 1}", f"save_every={args.steps}", f"eval_examples={args.eval_examples}",
            f"seed={args.seed}", f"out={tmp}/run", f"device={device.type}", "dtype=float32"])
        train(config, progress=False)
        records = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["step"] >= 1]
        seconds = [b["elapsed"] - a["elapsed"] for a, b in zip(steps, steps[1:], strict=False)][:-1]
        tokens = [r["completion_tokens"] for r in steps[1:-1]]
        final = steps[-1]
        model = load_model(Path(tmp, "run", "final"), device, torch.float32)  # evaluated like TRL's below
        from opd.models import load_tokenizer

        teacher = load_model(args.teacher, device, torch.float32)
        evaluation = evaluate_final(model, load_tokenizer(Path(tmp, "run", "final")), teacher, args, device)
    return {"step_seconds": seconds, "step_tokens": tokens, "final_logged_accuracy": final.get("accuracy"),
            **evaluation}


def run_trl(args, device) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.student)
    tokenizer.padding_side = "left"
    student = load_model(args.student, device, torch.float32)
    teacher = load_model(args.teacher, device, torch.float32)
    dataset = Dataset.from_list([{"prompt": messages} for messages in step_prompts(args)])
    times: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as tmp:
        config = DistillationConfig(
            output_dir=tmp, per_device_train_batch_size=args.prompts * args.samples, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup,
            adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=1.0,
            shuffle_dataset=False, dataloader_num_workers=0, use_cpu=device.type == "cpu", seed=args.seed,
            disable_tqdm=True)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    rows = args.prompts * args.samples
    evaluation = evaluate_final(student, tokenizer, teacher, args, device)
    return {"step_seconds": times[1:], "step_tokens": [m * rows for m in lengths[1:]], **evaluation}


def one(system: str, args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run_trl(args, device) if system == "trl" else run_opd(system, args, device)
    seconds = statistics.median(result["step_seconds"])
    tokens = sum(result["step_tokens"]) / sum(result["step_seconds"][: len(result["step_tokens"])])
    return {"system": system, "median_step_seconds": seconds, "tokens_per_second": tokens,
            "peak_memory_mb": peak_memory_mb(device), "accuracy": result["accuracy"],
            "teacher_kl": result["teacher_kl"], "device": str(device), "step_seconds": result["step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("zoo", "wide"), default="zoo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                        help="the systems to run (default: all three; the ratios need trl)")
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 3:  # the first step and the last (evaluated) one are not timed
        parser.error("--steps must be at least 3")
    if args.one:
        print(json.dumps(one(args.one, args)))
        return

    from opd.models import resolve_model_path

    if args.pair == "wide":
        teacher, student = wide_pair(Path(tempfile.gettempdir()) / "opd-bench-wide-pair")
    else:
        teacher, student = resolve_model_path("embedded:teacher"), resolve_model_path("embedded:student")
    passthrough = [f"--steps={args.steps}", f"--prompts={args.prompts}", f"--samples={args.samples}",
                   f"--max-new-tokens={args.max_new_tokens}", f"--lr={args.lr}", f"--warmup={args.warmup}",
                   f"--eval-examples={args.eval_examples}", f"--seed={args.seed}", f"--student={student}",
                   f"--teacher={teacher}"]
    runs: list[dict] = []
    systems = [system for system in SYSTEMS if system in args.systems]
    for repeat in range(args.repeats):
        for system in systems:
            done = subprocess.run([sys.executable, __file__, f"--one={system}", *passthrough],
                                  capture_output=True, text=True)
            if done.returncode != 0:  # the child's traceback, not only its exit status
                sys.exit(f"{system} failed (exit {done.returncode}):\n{done.stderr[-8000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"repeat": repeat, **result})
            print(f"repeat {repeat + 1}/{args.repeats} {system:12} {result['median_step_seconds']:.3f} s/step "
                  f"{result['tokens_per_second']:8.0f} tok/s  acc {100 * result['accuracy']:.1f}%  "
                  f"kl {result['teacher_kl']:.3f}  peak {result['peak_memory_mb']:.0f} MB", flush=True)
    table = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        table[system] = {key: statistics.median(r[key] for r in mine) for key in
                         ("median_step_seconds", "tokens_per_second", "peak_memory_mb", "accuracy", "teacher_kl")}
    trl = table["trl"]["tokens_per_second"] if "trl" in table else None

    def ratio(system: str) -> float | None:
        return table[system]["tokens_per_second"] / trl if trl and system in table else None

    summary = {
        "tokens_per_second_ratio": ratio("opd-full"),
        "tokens_per_second_ratio_sampled": ratio("opd-sampled"),
        "pair": args.pair, "student": student, "teacher": teacher, "steps": args.steps, "repeats": args.repeats,
        "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens, "lr": args.lr, "device": runs[0]["device"],
        "threads": torch.get_num_threads(), "medians": table, "runs": runs,
    }
    print(f"\n{'system':14}{'s/step':>9}{'tok/s':>9}{'vs TRL':>8}{'peak MB':>9}{'accuracy':>10}{'teacher KL':>12}")
    for system, row in table.items():
        versus = f"{row['tokens_per_second'] / trl:7.2f}x" if trl else f"{'-':>8}"
        print(f"{system:14}{row['median_step_seconds']:9.3f}{row['tokens_per_second']:9.0f}"
              f"{versus}{row['peak_memory_mb']:9.0f}{100 * row['accuracy']:9.1f}%"
              f"{row['teacher_kl']:12.3f}")
    out = args.out or RESULTS / ("vs_trl.json" if args.pair == "zoo" else f"vs_trl_{args.pair}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
