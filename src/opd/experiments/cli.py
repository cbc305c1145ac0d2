"""``opd experiment ...``: the experiments' subcommands, their options and how each is run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


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
    elif args.experiment == "tools":
        from opd.experiments.tools import ToolsPlan, run_tools

        summary = run_tools(ToolsPlan(out, args.steps, args.prompts, args.samples, args.lr_opd, args.lr_sft,
                                      args.eval_every, args.eval_examples, args.overrides, args.sft_start), progress)
    elif args.experiment == "personalization":
        from opd.personalization.experiment import PersonalizationPlan, run_personalization

        summary = run_personalization(PersonalizationPlan(
            out, args.assistant, Path(args.data) if args.data else PersonalizationPlan.data, args.midtrain_steps,
            args.midtrain_lr, args.chat_fraction, args.distill_steps, args.distill_lr, args.segments,
            overrides=args.overrides), progress)
    elif args.experiment == "regimes":
        from opd.experiments.regimes import RegimesPlan, run_regimes

        summary = run_regimes(RegimesPlan(out, args.sweep, args.seeds, tuple(args.knobs or ()), args.steps,
                                          args.warm_steps, args.base_steps, args.base_lr, args.eval_every,
                                          args.eval_examples, args.prompts, args.samples, args.fixed_pairs,
                                          tuple(args.lrs), args.width, args.layers, args.overrides,
                                          args.report_only), progress)
    else:
        from opd.experiments.variants import LoraPlan, run_lora

        summary = run_lora(LoraPlan(out, args.rank, args.steps, args.lr, tuple(args.lora_lr_scale), args.eval_every,
                                    args.overrides, args.metric), progress)
    print((out / "report.md").read_text())
    print(f"summary: {out / 'summary.json'} (wall time {summary['wall_seconds']:.0f} s)")
    return 0


def add_experiment_parser(sub, fmt, epilog: str) -> None:
    """The ``experiment`` subcommand and one subcommand per experiment, under ``sub``."""
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
    rs = ex_sub.add_parser("reasoning", parents=[common], formatter_class=fmt, epilog=epilog,
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
    ds = ex_sub.add_parser("dense-vs-sparse", parents=[common], formatter_class=fmt, epilog=epilog,
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
    dr = ex_sub.add_parser("data-reuse", parents=[common], formatter_class=fmt, epilog=epilog,
                           help="on-policy distillation on one prompt reused every step vs fresh prompts")
    dr.add_argument("--steps", type=int, default=20, help="gradient steps (default 20, as in the blog)")
    dr.add_argument("--samples", type=int, default=128, help="sequences sampled per step (default 128)")
    dr.add_argument("--lr", type=float, default=6e-4)
    dr.add_argument("--warmup-steps", type=int, default=2)
    dr.add_argument("--eval-every", type=int, default=5)
    dr.set_defaults(func=cmd_experiment)
    lo = ex_sub.add_parser("lora", parents=[common], formatter_class=fmt, epilog=epilog,
                           help="LoRA vs full fine-tuning after SFT and after on-policy distillation")
    lo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    lo.add_argument("--steps", type=int, default=200, help="gradient steps per run (default 200)")
    lo.add_argument("--lr", type=float, default=6e-4, help="full fine-tuning's learning rate (default 6e-4)")
    lo.add_argument("--lora-lr-scale", type=rates, default=rates("3,10"),
                    help="LoRA's learning rates = lr x each (default 3,10; ~10x is the usual advice); the gap is "
                    "read at LoRA's best")
    lo.add_argument("--eval-every", type=int, default=25)
    lo.set_defaults(func=cmd_experiment)
    tl = ex_sub.add_parser("tools", parents=[common], formatter_class=fmt, epilog=epilog,
                           help="tool use: on-policy distillation vs SFT on the teacher's transcripts, equal compute",
                           description="The embedded student learns to use a calculator (task=tools) from "
                           "embedded:tool-teacher: on-policy distillation against SFT on the teacher's "
                           "conversations; accuracy, valid tool calls and tool use at equal FLOPs.")
    tl.add_argument("--steps", type=int, default=200, help="gradient steps per arm (default 200)")
    tl.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    tl.add_argument("--samples", type=int, default=2, help="conversations per prompt (default 2)")
    tl.add_argument("--lr-opd", type=float, default=2e-3, help="on-policy distillation's rate (default 2e-3)")
    tl.add_argument("--lr-sft", type=float, default=1e-3, help="SFT's rate (default 1e-3)")
    tl.add_argument("--eval-every", type=int, default=25)
    tl.add_argument("--eval-examples", type=int, default=256)
    tl.add_argument("--sft-start", type=int, default=25, help="the sft+opd arm's SFT steps (default 25)")
    tl.set_defaults(func=cmd_experiment)
    pe = ex_sub.add_parser("personalization", parents=[common], formatter_class=fmt, epilog=epilog,
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
    rg = ex_sub.add_parser("regimes", parents=[common], formatter_class=fmt, epilog=epilog,
                           help="where on-policy distillation beats SFT: one knob at a time, an exact teacher",
                           description="Synthetic tasks with an exact teacher (opd.regimes): on-policy distillation "
                           "against SFT on fresh and on fixed teacher samples (and RL on the recoverable horizon "
                           "arm, DART in the noise sweep), from a shared SFT warm start, FLOPs to a ladder of targets.")
    rg.add_argument("--sweep", default="horizon", choices=("horizon", "entropy", "capacity", "reuse", "noise"),
                    help="the knob: chain length (errors fatal / recoverable), the teacher's temperature over "
                    "valid walks, the student's width, the number of training prompts, or the injected errors' "
                    "rate (sample_noise; with DART's control)")
    rg.add_argument("--knobs", type=float, nargs="+", help="the knob's values (default: the sweep's own)")
    rg.add_argument("--seeds", type=int, default=3)
    rg.add_argument("--steps", type=int, default=150, help="steps per arm (default 150)")
    rg.add_argument("--warm-steps", type=int, default=30, help="each point's shared SFT warm start's steps "
                    "(default 30)")
    rg.add_argument("--base-steps", type=int, default=None, help="SFT steps that first teach each seed's student the "
                    "sweep's basic skill (default: 300 for the chain sweeps, horizon, capacity and noise, 600 for the "
                    "walks, entropy and reuse; 0: none)")
    rg.add_argument("--base-lr", type=float, default=1e-3, help="the base's and the warm starts' rate (default 1e-3)")
    rg.add_argument("--eval-every", type=int, default=10)
    rg.add_argument("--eval-examples", type=int, default=256)
    rg.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    rg.add_argument("--samples", type=int, default=4, help="samples per prompt for opd and rl (default 4)")
    rg.add_argument("--fixed-pairs", type=int, default=256, help="sft-fixed's dataset size (default 256)")
    rg.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="the learning-rate grid")
    rg.add_argument("--width", type=int, default=128, help="the student's width (the capacity sweep: its knob)")
    rg.add_argument("--layers", type=int, default=2)
    rg.add_argument("--report-only", action="store_true", help="train nothing: the table and plot of the runs "
                    "finished so far (a point with every method finished for at least one seed), while a sweep runs")
    rg.set_defaults(func=cmd_experiment)
