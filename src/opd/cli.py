"""``opd``: the command line. Every subcommand has --help; errors are one clear line, exit 2."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
import traceback
from pathlib import Path

from opd.config import TrainConfig, load_config
from opd.models import OpdError


def config_help() -> str:
    """The config fields with defaults and the comments written beside them in config.py."""
    import opd.config

    source = inspect.getsource(opd.config.TrainConfig)
    lines = ["config fields (key=value):"]
    for match in re.finditer(r"^    (\w+): [\w |]+ = ([^#\n]+?)\s*(?:#\s*(.*))?$", source, re.M):
        name, default, comment = match.groups()
        lines.append(f"  {name}={default.strip()}" + (f"  {comment}" if comment else ""))
    return "\n".join(lines)


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The same ``opd`` command line under ``torchrun`` on this node, without ``--nproc``."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "opd", *rest]


def cmd_train(args: argparse.Namespace) -> int:
    from opd.trainer import train

    if args.nproc and args.nproc > 1:
        import subprocess

        return subprocess.call(torchrun_argv(args.nproc, sys.argv[1:]))
    overrides = list(args.overrides)
    if args.resume:
        config_path = Path(args.resume) / "config.json"
        if not config_path.is_file():
            raise OpdError(f"{args.resume} is not an opd run directory (no config.json)")
        saved = json.loads(config_path.read_text())
        base = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
        config = load_config(args.config, overrides, base=base)
    else:
        if args.out:
            overrides.append(f"out={args.out}")
        config = load_config(args.config, overrides)
    summary = train(config, resume=args.resume, progress=not args.quiet)
    if summary:  # under torchrun only rank 0 has one
        print(json.dumps(summary, indent=2))
    return 0


def cmd_midtrain(args: argparse.Namespace) -> int:
    from opd.trainer import train

    values = [f"student={args.model}", "method=midtrain", f"docs={args.docs}", f"chat_fraction={args.chat_fraction}"]
    if args.chat:
        values.append(f"sft_data={args.chat}")
    out = args.out or f"runs/midtrain-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(args.config, list(args.overrides) + values + [f"out={out}"])
    summary = train(config, progress=not args.quiet)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opd.trainer import train

    overrides = list(args.overrides)  # the config's defaults are the demo's settings
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(None, overrides + [f"out={out}"])
    print(f"opd demo: on-policy distillation of the embedded student from the embedded teacher "
          f"({config.steps} steps, kl={config.kl}, lr={config.lr})")
    started = time.time()
    summary = train(config, progress=not args.quiet)
    rows = [
        ("accuracy, greedy", summary["student_accuracy_before"], summary["student_accuracy_after"],
         summary["teacher_accuracy"], True),
        (f"accuracy, sampled T={config.eval_temperature:g}", summary["student_sampled_accuracy_before"],
         summary["student_sampled_accuracy_after"], summary["teacher_sampled_accuracy"], True),
        ("reverse KL to teacher", summary["teacher_kl_before"], summary["teacher_kl_after"], 0.0, False),
    ]
    print(f"\n{'':24}{'before':>10}{'after':>10}{'teacher':>10}")
    for name, before, after, teacher, percent in rows:
        if before is None:  # eval_samples=0: no sampled accuracy
            continue
        cells = [f"{100 * v:.1f}%" if percent else f"{v:.3f}" for v in (before, after, teacher)]
        print(f"{name:24}" + "".join(f"{c:>10}" for c in cells))
    print(f"\nwall time {time.time() - started:.0f} s; run directory: {out} (report.md, curves.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opd.evaluation import evaluate
    from opd.models import check_same_vocabulary, load_model, load_tokenizer, pick_device, pick_dtype
    from opd.setup import make_task, resolve_model_path
    from opd.teacher import LocalTeacher

    if args.samples < 0 or args.temperature <= 0:
        raise OpdError(f"--samples {args.samples} must be 0 or more and --temperature {args.temperature} positive")
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    path = resolve_model_path(args.model, "model")
    tokenizer = load_tokenizer(path)
    task_file = args.eval_file if args.task == "arithmetic" and args.eval_file else args.task
    config = TrainConfig(task=task_file, eval_file=args.eval_file or "")
    task = make_task(config)
    examples = task.eval_examples(args.examples)
    if not examples:
        raise OpdError(f"task {task.name} has no held-out prompts; pass --eval-file PATH.jsonl")
    teacher = None
    if args.teacher:
        teacher_path = resolve_model_path(args.teacher, "--teacher")
        check_same_vocabulary(tokenizer, load_tokenizer(teacher_path), path, teacher_path)
        teacher = LocalTeacher(load_model(teacher_path, device, dtype), len(tokenizer))
    result = evaluate(load_model(path, device, dtype), tokenizer, task, examples,
                      max_new_tokens=args.max_new_tokens, teacher=teacher, seed=args.seed, samples=args.samples,
                      sample_temperature=args.temperature)
    print(json.dumps({"model": args.model, "examples": len(examples), "accuracy": result.accuracy,
                      "sampled_accuracy": result.sampled_accuracy, "samples": args.samples,
                      "temperature": args.temperature,
                      "teacher_kl": result.teacher_kl,
                      "mean_completion_tokens": result.mean_completion_tokens}, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from opd.evaluation import completions_text
    from opd.models import chat_prompt_ids, load_model, load_tokenizer, pick_device, pick_dtype
    from opd.sampler import sample
    from opd.setup import resolve_model_path

    device = pick_device(args.device)
    path = resolve_model_path(args.model, "model")
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, pick_dtype("auto", device)).eval()
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    rollouts = sample(model, [prompt], samples_per_prompt=args.n, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      generator=torch.Generator(device).manual_seed(args.seed))
    for i, text in enumerate(completions_text(tokenizer, rollouts.completion_ids())):
        print(f"--- sample {i + 1}\n{text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from opd.chat import chat
    from opd.models import load_model, load_tokenizer, pick_device, pick_dtype
    from opd.setup import resolve_model_path

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise OpdError("--temperature must be at least 0 (0: greedy) and --top-p in (0, 1]")
    device = pick_device(args.device)
    path = resolve_model_path(args.model, "model")
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, pick_dtype("auto", device)).eval()
    return chat(model, tokenizer, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, system=args.system or "", seed=args.seed)


def rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of learning rates") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: learning rates must be positive")
    return values


def sizes(text: str) -> list[int]:
    """``4096,8192``: dataset sizes; ``none`` for no fixed-dataset SFT curve."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, or none") from None
    if any(v < 1 for v in values) or (values and len(set(values)) < 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two different positive sizes (a fit needs two)")
    return values


def cmd_experiment(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = not args.quiet
    if args.experiment == "reasoning":
        from opd.experiments.reasoning import ReasoningPlan, run_reasoning

        lrs = {m: getattr(args, f"lr_{m}") for m in ("sft", "rl", "opd") if getattr(args, f"lr_{m}")}
        summary = run_reasoning(ReasoningPlan(
            out, args.steps, args.eval_every, lrs, args.target, args.validation_examples, args.metric,
            args.rl_budget_factor, tuple(args.sft_sizes), args.sft_epochs, args.sft_batch, args.sft_rates,
            args.overrides), progress)
    elif args.experiment == "dense-vs-sparse":
        from opd.experiments.dense_sparse import DenseSparsePlan, run_dense_vs_sparse

        summary = run_dense_vs_sparse(DenseSparsePlan(
            out, args.rl_steps, args.rl_lr, args.opd_steps, args.opd_lr, args.opd_warmup, args.rl_eval_every,
            args.opd_eval_every,
            args.reuse_steps, args.reuse_samples, args.reuse_lr, args.metric, args.overrides), progress)
    elif args.experiment == "data-reuse":
        from opd.experiments.variants import DataReusePlan, run_data_reuse

        summary = run_data_reuse(DataReusePlan(out, args.steps, args.samples, args.lr, args.warmup_steps,
                                               args.eval_every, args.overrides, args.metric), progress)
    elif args.experiment == "personalization":
        from opd.personalization.experiment import PersonalizationPlan, run_personalization

        summary = run_personalization(PersonalizationPlan(
            out, args.assistant, Path(args.data) if args.data else PersonalizationPlan.data, args.midtrain_steps,
            args.midtrain_lr, args.chat_fraction, args.distill_steps, args.distill_lr, args.segments,
            overrides=args.overrides), progress)
    else:
        from opd.experiments.variants import LoraPlan, run_lora

        summary = run_lora(LoraPlan(out, args.rank, args.steps, args.lr, tuple(args.lora_lr_scale), args.eval_every,
                                    args.overrides, args.metric), progress)
    print((out / "report.md").read_text())
    print(f"summary: {out / 'summary.json'} (wall time {summary['wall_seconds']:.0f} s)")
    return 0


def with_overrides(config, items: list[str], what: str):
    """A build dataclass with ``key=value`` items applied (each value cast to the field's type)."""
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(config, name):
            raise OpdError(f"{what} override {item!r}: expected key=value with key one of "
                           f"{', '.join(config.__dataclass_fields__)}")
        try:
            setattr(config, name, type(getattr(config, name))(value))
        except ValueError:
            raise OpdError(f"{what} override {item!r}: {value!r} is not a valid "
                           f"{type(getattr(config, name)).__name__}") from None
    return config


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from opd.zoo import EMBEDDED_DIR, ZooConfig, build

    config = with_overrides(ZooConfig(), args.overrides, "zoo")
    card = build(Path(args.out) if args.out else EMBEDDED_DIR, config, reuse_teacher=args.reuse_teacher)
    print(json.dumps(card, indent=2))
    return 0


def cmd_zoo_assistant(args: argparse.Namespace) -> int:
    from opd.personalization.assistant import AssistantConfig, build_assistant
    from opd.zoo import EMBEDDED_DIR

    config = with_overrides(AssistantConfig(), args.overrides, "assistant")
    out = Path(args.out) if args.out else EMBEDDED_DIR
    if not (out / "teacher" / "tokenizer.json").is_file():
        raise OpdError(f"{out} holds no zoo tokenizer (teacher/): run `opd zoo build --out {out}` first")
    print(json.dumps(build_assistant(out, config), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from opd.server import serve

    print(f"opd serve: {args.model} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    serve(args.model, args.host, args.port, args.api_key, args.name, args.device, args.dtype,
          args.max_batch_tokens)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    sub = root.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="run on-policy distillation", formatter_class=fmt,
                           description="Train a student on its own samples graded by a teacher.",
                           epilog=config_help())
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--config", help="TOML file of config fields (overrides still win)")
    train.add_argument("--out", help="run directory (default runs/<time>-<method>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="run data-parallel on N processes of this machine (calls torchrun; see parallel=)")
    train.set_defaults(func=cmd_train)

    mid = sub.add_parser("midtrain", help="continued training on documents (optionally mixed with chat)",
                         formatter_class=fmt, epilog=config_help(),
                         description="Next-token cross-entropy on a corpus of documents, optionally mixed with chat "
                         "data, with the run directory, logging, checkpoints and compute accounting of opd train. "
                         "Held-out evaluation uses task= / eval_file= (e.g. a QA file about the documents).")
    mid.add_argument("model", help="HF model directory, hub id, or embedded:assistant")
    mid.add_argument("--docs", required=True, help="JSONL of {\"text\": ...} documents")
    mid.add_argument("--chat", help="JSONL of chat pairs (prompt or messages, + completion) to mix in")
    mid.add_argument("--chat-fraction", type=float, default=0.0,
                     help="share of each step's sequences taken from --chat (e.g. 0.3 for 70%% docs / 30%% chat)")
    mid.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides (steps=, lr=, lora_rank=, task= and eval_file= for evaluation, ...)")
    mid.add_argument("--config", help="TOML file of config fields")
    mid.add_argument("--out", help="run directory (default runs/midtrain-<time>)")
    mid.add_argument("--quiet", action="store_true", help="no progress bar")
    mid.set_defaults(func=cmd_midtrain)

    demo = sub.add_parser("demo", help="distil the embedded student from the embedded teacher",
                          formatter_class=fmt, epilog=config_help())
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    demo.add_argument("--out", help="run directory (default runs/demo-<time>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="held-out accuracy (and teacher KL) of a model")
    ev.add_argument("model", help="HF model directory, hub id, or embedded:student / embedded:teacher")
    ev.add_argument("--teacher", help="also report the per-token reverse KL to this teacher")
    ev.add_argument("--task", default="arithmetic", help="built-in task or a JSONL prompts file")
    ev.add_argument("--eval-file", help="JSONL of held-out prompts: with answers (QA, exact or whole-word match) or "
                    "constraints (instruction following)")
    ev.add_argument("--examples", type=int, default=256, help="number of held-out prompts")
    ev.add_argument("--samples", type=int, default=4, help="sampled accuracy: completions per prompt, mean "
                    "(0: greedy only; default 4)")
    ev.add_argument("--temperature", type=float, default=1.0, help="the sampled accuracy's temperature (default 1)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled draws")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    sm = sub.add_parser("sample", help="print completions of a prompt")
    sm.add_argument("model", help="HF model directory, hub id, or embedded:student / embedded:teacher")
    sm.add_argument("--prompt", required=True, help="the user message")
    sm.add_argument("-n", type=int, default=1, help="number of samples")
    sm.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    sm.add_argument("--top-p", type=float, default=1.0)
    sm.add_argument("--max-new-tokens", type=int, default=64)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--device", default="auto")
    sm.set_defaults(func=cmd_sample)

    ch = sub.add_parser("chat", help="talk to a model in the terminal (its chat template, history kept)",
                        description="Talk to a model directory: one line per message; /reset forgets the "
                        "conversation, /quit (or end of input) leaves. The oldest exchanges are dropped when the "
                        "conversation outgrows the model's context.")
    ch.add_argument("model", help="HF model directory, hub id, a run's final/, or embedded:assistant")
    ch.add_argument("--system", help="a system message kept at the start of the conversation")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a teacher's log-probs over the OpenAI-compatible API")
    sv.add_argument("model", help="HF model directory, hub id, or embedded:teacher")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require this bearer token (default: $OPD_API_KEY, else none)")
    sv.add_argument("--name", help="model name to answer to (default: the MODEL argument)")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--dtype", default="auto")
    sv.add_argument("--max-batch-tokens", type=int, default=8192,
                    help="most prompt tokens scored in one forward pass across queued requests")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("experiment", help="the blog's experiments on the embedded default (or your models)")
    ex_sub = ex.add_subparsers(dest="experiment", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config fields for every run (student=, teacher=, task=, prompts_per_step=, ...)")
    common.add_argument("--out", help="experiment directory (default runs/<experiment>-<time>); "
                        "running the same command again reuses finished runs and resumes the unfinished one")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--metric", choices=("sampled", "greedy"), default="sampled",
                        help="accuracy that targets, curves and ratios use: sampled (mean of eval_samples draws "
                        "per prompt at eval_temperature; default) or greedy")
    rs = ex_sub.add_parser("reasoning", parents=[common], formatter_class=fmt, epilog=config_help(),
                           help="SFT vs RL vs on-policy distillation: accuracy against steps and FLOPs",
                           description="SFT, RL and on-policy distillation from the same student, each at its "
                           "best learning rate (chosen on a validation split), compared in the blog's table.")
    rs.add_argument("--steps", type=int, default=300, help="gradient steps per run (default 300)")
    rs.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (default 25)")
    rs.add_argument("--target", type=float, help="held-out accuracy to reach (default: start + 80%% of the gap "
                    "to the teacher)")
    rs.add_argument("--validation-examples", type=int, default=256,
                    help="prompts the learning rates are chosen on (default 256)")
    for method, default in (("sft", "3e-4,6e-4"), ("rl", "3e-5,1e-4"), ("opd", "3e-4,6e-4")):
        rs.add_argument(f"--lr-{method}", type=rates, default=rates(default),
                        help=f"learning rates swept for {method} (default {default}); empty to skip the method")
    rs.add_argument("--rl-budget-factor", type=float, default=10.0,
                    help="RL goes on until it reaches the highest level on-policy distillation reached, or this "
                    "many times distillation's steps to it (default 10)")
    rs.add_argument("--sft-sizes", type=sizes, default=sizes("4096,8192,16384,32768"),
                    help="fixed datasets of teacher samples for SFT's data curve (default 4096,8192,16384,32768; "
                    "'none' skips the curve)")
    rs.add_argument("--sft-epochs", type=float, default=2.0, help="epochs over each fixed dataset (default 2)")
    rs.add_argument("--sft-batch", type=int, default=128, help="examples per step on a fixed dataset (default 128)")
    rs.add_argument("--sft-rates", type=rates, default=rates("3e-4,1e-3"),
                    help="learning rates tried for each fixed dataset (default 3e-4,1e-3)")
    rs.set_defaults(func=cmd_experiment)
    ds = ex_sub.add_parser("dense-vs-sparse", parents=[common], formatter_class=fmt, epilog=config_help(),
                           help="RL, then on-policy distillation from the RL checkpoint: steps to its accuracy",
                           description="Train the student with RL, then distil the original student from that RL "
                           "checkpoint on-policy: gradient steps and FLOPs each needs to reach the RL model's "
                           "accuracy (the blog: 7-10x fewer steps), and the single-prompt reuse in that setting.")
    ds.add_argument("--rl-steps", type=int, default=1500, help="RL steps (default 1500)")
    ds.add_argument("--rl-lr", type=float, default=1e-4, help="RL learning rate (default 1e-4)")
    ds.add_argument("--opd-steps", type=int, default=400, help="distillation steps (default 400)")
    ds.add_argument("--opd-lr", type=float, default=6e-4, help="distillation learning rate (default 6e-4)")
    ds.add_argument("--opd-warmup", type=int, default=10, help="distillation warm-up steps (default 10)")
    ds.add_argument("--rl-eval-every", type=int, default=25)
    ds.add_argument("--opd-eval-every", type=int, default=5)
    ds.add_argument("--reuse-steps", type=int, default=20, help="single-prompt run's steps (default 20)")
    ds.add_argument("--reuse-samples", type=int, default=128, help="its samples per step (default 128)")
    ds.add_argument("--reuse-lr", type=float, default=3e-4)
    ds.set_defaults(func=cmd_experiment)
    dr = ex_sub.add_parser("data-reuse", parents=[common], formatter_class=fmt, epilog=config_help(),
                           help="on-policy distillation on one prompt reused every step vs fresh prompts")
    dr.add_argument("--steps", type=int, default=20, help="gradient steps (default 20, as in the blog)")
    dr.add_argument("--samples", type=int, default=128, help="sequences sampled per step (default 128)")
    dr.add_argument("--lr", type=float, default=6e-4)
    dr.add_argument("--warmup-steps", type=int, default=2)
    dr.add_argument("--eval-every", type=int, default=5)
    dr.set_defaults(func=cmd_experiment)
    lo = ex_sub.add_parser("lora", parents=[common], formatter_class=fmt, epilog=config_help(),
                           help="LoRA vs full fine-tuning after SFT and after on-policy distillation")
    lo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    lo.add_argument("--steps", type=int, default=200, help="gradient steps per run (default 200)")
    lo.add_argument("--lr", type=float, default=6e-4, help="full fine-tuning's learning rate (default 6e-4)")
    lo.add_argument("--lora-lr-scale", type=rates, default=rates("3,10"),
                    help="LoRA's learning rates = lr x each (default 3,10; ~10x is the usual advice); the gap is "
                    "read at LoRA's best")
    lo.add_argument("--eval-every", type=int, default=25)
    lo.set_defaults(func=cmd_experiment)
    pe = ex_sub.add_parser("personalization", parents=[common], formatter_class=fmt, epilog=config_help(),
                           help="midtrain the assistant on documents, then restore its instruction following by "
                           "distilling from its earlier self")
    pe.add_argument("--assistant", default="embedded:assistant", help="the assistant (model directory)")
    pe.add_argument("--data", help="directory with docs.jsonl, chat.jsonl, ifeval_train.jsonl, ifeval_eval.jsonl, "
                    "qa.jsonl (default: the embedded ones)")
    pe.add_argument("--midtrain-steps", type=int, default=300)
    pe.add_argument("--midtrain-lr", type=float, default=1e-3)
    pe.add_argument("--chat-fraction", type=float, default=0.3, help="chat share of the mixed midtraining")
    pe.add_argument("--distill-steps", type=int, default=200)
    pe.add_argument("--distill-lr", type=float, default=3e-4)
    pe.add_argument("--segments", type=int, default=5, help="evaluation points along the distillation")
    pe.set_defaults(func=cmd_experiment)

    zoo = sub.add_parser("zoo", help="the embedded tiny models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="rebuild tokenizer, teacher and student from scratch")
    build.add_argument("overrides", nargs="*", metavar="key=value", help="ZooConfig overrides, e.g. seed=1")
    build.add_argument("--out", help="output directory (default: the package's embedded/)")
    build.add_argument("--reuse-teacher", action="store_true",
                       help="keep the tokenizer and teacher already in the output directory; rebuild the student")
    build.set_defaults(func=cmd_zoo_build)
    assistant = zoo_sub.add_parser("assistant", help="build the chat assistant and the personalization data "
                                   "(reuses the zoo's tokenizer)")
    assistant.add_argument("overrides", nargs="*", metavar="key=value",
                           help="AssistantConfig overrides, e.g. steps=2000")
    assistant.add_argument("--out", help="zoo directory (default: the package's embedded/)")
    assistant.set_defaults(func=cmd_zoo_assistant)
    return root


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also come after options that follow a
    positional argument (``opd midtrain MODEL --docs F steps=100``), which argparse leaves unparsed."""
    root = parser()
    args, extra = root.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if extra and (stray or not hasattr(args, "overrides")):
        root.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # opd shows its own progress; per-file loading bars are noise
    from opd.distributed import exit_rank, in_process_group

    try:
        code = args.func(args)
    except OpdError as err:
        print(f"opd: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("opd: interrupted; continue a training run with `opd train --resume RUN_DIR`", file=sys.stderr)
        code = 130
    except Exception:
        if not in_process_group():
            raise  # a plain process: the usual traceback and exit status
        traceback.print_exc()  # a torchrun rank: the same traceback, then exit_rank
        code = 1
    return exit_rank(code)


if __name__ == "__main__":
    sys.exit(main())
