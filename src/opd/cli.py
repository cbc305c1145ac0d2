"""``opd``: the command line. Every subcommand has --help; errors are one clear line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from opd.config import TrainConfig, config_help, load_config
from opd.domains import Number, apply_domains, check
from opd.errors import OpdError
from opd.experiments.cli import add_experiment_parser


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
        from opd.runs import saved_config

        config = load_config(args.config, overrides, base=saved_config(args.resume))
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


def other_tokenizer(config: TrainConfig) -> bool:
    """Whether the teacher's tokenizer differs from the student's (a served teacher's: ``teacher_tokenizer=``)."""
    if (config.remote_teacher or config.program_teacher) and not config.teacher_tokenizer:
        return False
    from opd.models import load_tokenizer, resolve_model_path
    from opd.teachers.view import tokenizer_differences

    student = load_tokenizer(resolve_model_path(config.student, "student"))
    teacher = load_tokenizer(resolve_model_path(config.teacher_tokenizer or config.teacher_spec, "teacher"))
    return bool(tokenizer_differences(student, teacher))


def cmd_demo(args: argparse.Namespace) -> int:
    from opd.trainer import train

    overrides = list(args.overrides)  # the config's defaults are the demo's settings
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(None, overrides + [f"out={out}"])
    if config.kl == "auto":  # resolved here, as the run would, to pick the estimator's learning rate
        from opd.objective import kl_of

        config.kl = kl_of(config, aligned=other_tokenizer(config))
        if config.kl == "sampled" and not any(item.startswith("lr=") for item in overrides):
            config.lr = 3e-4  # the sampled estimator's rate (README: the cross-tokenizer demo, both rates)
    if not any(item.startswith("lr_schedule=") for item in overrides):
        config.lr_schedule = "cosine"  # measured on the demo: 78.9% greedy at step 800 against constant's 69.5%
    print(f"opd demo: on-policy distillation of {config.student} from {config.teacher} "
          f"({config.steps} steps, kl={config.kl}, lr={config.lr}, lr_schedule={config.lr_schedule})")
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
    from opd.api import evaluate
    from opd.tasks.custom import load_reward

    if args.teacher_template != "auto" and not args.teacher:
        raise OpdError("--teacher-template needs --teacher")
    result = evaluate(args.model, args.task, examples=args.examples, samples=args.samples, temperature=args.temperature,
                      eval_file=args.eval_file or "", verifier=args.verifier,
                      reward=load_reward(args.reward) if args.reward else None, teacher=args.teacher,
                      teacher_template=args.teacher_template, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      device=args.device, data=dict(item.partition("=")[::2] for item in args.data))
    print(json.dumps({"model": args.model, "examples": result.examples, "accuracy": result.accuracy,
                      "sampled_accuracy": result.sampled_accuracy, "samples": args.samples,
                      "temperature": args.temperature,
                      "teacher_kl": result.teacher_kl,
                      "mean_completion_tokens": result.mean_completion_tokens}, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from opd.chat_settings import with_template_kwargs
    from opd.config import parse_template_kwargs
    from opd.evaluation import completions_text
    from opd.models import chat_prompt_ids, load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
    from opd.samplers.local import sample
    from opd.templates import reply_stops

    kwargs = parse_template_kwargs(args.chat_template_kwargs, "--chat-template-kwargs ", "--chat-template-kwargs ")
    device = pick_device(args.device)
    path = resolve_model_path(args.model, "model")
    tokenizer = with_template_kwargs(load_tokenizer(path), kwargs)
    model = load_model(path, device, pick_dtype("auto", device)).eval()
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    rollouts = sample(model, [prompt], samples_per_prompt=args.n, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, eos_id=reply_stops(tokenizer),
                      pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      generator=torch.Generator(device).manual_seed(args.seed))
    for i, text in enumerate(completions_text(tokenizer, rollouts.completion_ids())):
        print(f"--- sample {i + 1}\n{text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from opd.chat import chat
    from opd.chat_settings import with_template_kwargs
    from opd.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise OpdError("--temperature must be at least 0 (0: greedy) and --top-p in (0, 1]")
    from opd.config import parse_template_kwargs

    kwargs = parse_template_kwargs(args.chat_template_kwargs, "--chat-template-kwargs ", "--chat-template-kwargs ")
    device = pick_device(args.device)
    path = resolve_model_path(args.model, "model")
    tokenizer = with_template_kwargs(load_tokenizer(path), kwargs)
    model = load_model(path, device, pick_dtype("auto", device)).eval()
    return chat(model, tokenizer, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, system=args.system or "", seed=args.seed)


def with_overrides(config, items: list[str], what: str):
    """A build dataclass with ``key=value`` items applied (each value cast to the field's type)."""
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(config, name):
            raise OpdError(f"{what} override {item!r}: expected key=value with key one of "
                           f"{', '.join(config.__dataclass_fields__)}")
        kind, default = type(getattr(config, name)), getattr(config, name)
        try:
            parsed = kind(value)
        except ValueError:
            raise OpdError(f"{what} override {item!r}: {value!r} is not a valid {kind.__name__}") from None
        if kind in (int, float):  # a size, a count, a rate or a seed: finite, and positive where its default is
            problem = check(Number(0, low_open=default > 0, integer=kind is int), name, parsed, f"{what} override")
            if problem:
                raise OpdError(problem)
        setattr(config, name, parsed)
    return config


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from opd.zoo import EMBEDDED_DIR, ZooConfig, build

    config = with_overrides(ZooConfig(), args.overrides, "zoo")
    card = build(Path(args.out) if args.out else EMBEDDED_DIR, config, reuse_teacher=args.reuse_teacher)
    print(json.dumps(card, indent=2))
    return 0


def cmd_zoo_teacher2(args: argparse.Namespace) -> int:
    from opd.zoo import EMBEDDED_DIR, ZooConfig, build_second_teacher

    config = with_overrides(ZooConfig(), args.overrides, "zoo")
    print(json.dumps(build_second_teacher(Path(args.out) if args.out else EMBEDDED_DIR, config, args.vocab_size),
                     indent=2))
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


def cmd_zoo_tools(args: argparse.Namespace) -> int:
    from opd.zoo import EMBEDDED_DIR
    from opd.zoo_tools import ToolZooConfig, build_tool_teacher

    config = with_overrides(ToolZooConfig(), args.overrides, "zoo tools")
    print(json.dumps(build_tool_teacher(Path(args.out) if args.out else EMBEDDED_DIR, config), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from opd.server import serve

    print(f"opd serve: {args.model} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    serve(args.model, args.host, args.port, args.api_key, args.name, args.device, args.dtype,
          args.max_batch_tokens)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from opd.plan import GIB, render, with_probe
    from opd.probe import gather, probe

    config = load_config(args.config, args.overrides)
    try:
        processes = sorted({int(n) for n in args.nproc.split(",") if n.strip()})
    except ValueError:
        raise OpdError(f"--nproc {args.nproc!r} must be a comma list of process counts, e.g. 1,2,4,8") from None
    plan, runnable = gather(config, processes, args.prompt_tokens or 0)
    if runnable and not args.no_probe:
        plan = with_probe(plan, config, probe(config, args.probe_steps, progress=not args.json))
    device_memory = args.device_memory * GIB if args.device_memory else torch_cuda_memory()
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(render(plan, device_memory))
    return 2 if any(kind == "error" for kind, _ in plan.checks) else 0


def torch_cuda_memory() -> float | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def cmd_export(args: argparse.Namespace) -> int:
    from opd.export import export

    facts = export(args.source, args.out, adapter=args.adapter, dtype=args.dtype)
    print(json.dumps({"out": args.out, **facts}, indent=2))
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
                          description="Distil the embedded student from the embedded teacher and print the "
                          "figures before and after. `opd demo teacher=embedded:teacher-bpe2` distils it from a "
                          "teacher with another tokenizer and chat template (kl=sampled, aligned on the text).",
                          formatter_class=fmt, epilog=config_help())
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    demo.add_argument("--out", help="run directory (default runs/demo-<time>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="held-out accuracy (and teacher KL) of a model")
    ev.add_argument("model", help="HF model directory, hub id, or embedded:student / embedded:teacher")
    ev.add_argument("--teacher", help="also report the per-token reverse KL to this teacher")
    ev.add_argument("--verifier", default="exact", choices=("exact", "math", "ifeval"),
                    help="how a prompts file's answers are graded (default exact; math: math-verify)")
    ev.add_argument("--reward", help="module:function(completion, example) -> float, your own verifier")
    ev.add_argument("--teacher-template", default="auto", choices=("auto", "own", "student"),
                    help="how the teacher reads the prompt: auto (its own chat template when it differs), own, "
                    "student (the student's rendering)")
    ev.add_argument("--task", default="arithmetic", help="built-in task, a prompts file or folder (JSONL, parquet, "
                    "csv, json, save_to_disk) or a hub dataset hf:ORG/NAME[:SUBSET][@SPLIT]")
    ev.add_argument("--data", action="append", default=[], metavar="FIELD=VALUE",
                    help="a dataset setting of opd train: prompt_field=, answer_field=, messages_field=, split=, "
                         "eval_split=, subset=, streaming= (repeatable)")
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
    sm.add_argument("--chat-template-kwargs", metavar="JSON",
                    help="variables for the chat template, as a JSON object (as opd train's chat_template_kwargs), "
                    "e.g. '{\"enable_thinking\": false}' to turn a Qwen3 model's thinking off")
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
    ch.add_argument("--max-new-tokens", type=int, default=None,
                    help="longest reply in tokens (default: 256, or half the model's context when that is smaller)")
    ch.add_argument("--chat-template-kwargs", metavar="JSON",
                    help="variables for the chat template, as a JSON object (as opd train's chat_template_kwargs), "
                    "e.g. '{\"enable_thinking\": false}' to turn a Qwen3 model's thinking off")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a model over vLLM's OpenAI-compatible API: a teacher's log-probs, a "
                        "student's samples (sampler=http://), runtime LoRA adapters, full-weight reloads")
    sv.add_argument("model", help="HF model directory, hub id, or embedded:teacher / embedded:student")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require this bearer token (default: $OPD_API_KEY, else none)")
    sv.add_argument("--name", help="model name to answer to (default: the MODEL argument)")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--dtype", default="auto")
    sv.add_argument("--max-batch-tokens", type=int, default=8192,
                    help="most prompt tokens scored in one forward pass across queued requests")
    sv.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", help="before a run: parameters, memory per device, FLOPs, checks, a timed probe",
                        formatter_class=fmt, epilog=config_help(),
                        description="Read the same configuration as opd train and say, before any training: the "
                        "models' parameters, the memory per device for each parallel= choice and process count, "
                        "the FLOPs per step and for the run, the compatibility checks (tokenizers, chat templates, "
                        "padded vocabularies, the teacher server, the data), and from a probe of a few real steps "
                        "(in a temporary directory) the wall time. Needs only config.json when the weights are "
                        "not there (no probe then). Exit status 2 when a check fails.")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for opd train")
    pl.add_argument("--config", help="TOML file of config fields (overrides still win)")
    pl.add_argument("--nproc", default="1,2,4,8", help="process counts to plan memory for (default 1,2,4,8)")
    pl.add_argument("--probe-steps", type=int, default=3, help="steps the probe times, after one warm-up (default 3)")
    pl.add_argument("--no-probe", action="store_true", help="no probe: sizes, memory, FLOPs and checks only")
    pl.add_argument("--prompt-tokens", type=int, help="prompt length to plan for (default: measured on the task's "
                    "prompts; needed when the student has no tokenizer here)")
    pl.add_argument("--device-memory", type=float, metavar="GIB",
                    help="memory of one device, to say what fits (default: this machine's GPU, if any)")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    ex = sub.add_parser("export", help="a run as a standalone Hugging Face model directory (or PEFT adapter) with a "
                        "model card", description="Write a model directory that transformers and vllm serve load as "
                        "they are: safetensors, tokenizer and chat template, generation config, a LoRA merged in "
                        "float32, and README.md (the run's teacher, method, steps, FLOPs, evaluation). The export is "
                        "loaded back and its log-probs compared with the run's model before it is kept.")
    ex.add_argument("source", help="a run directory (its final/ model), one of its checkpoints, or its final/")
    ex.add_argument("out", help="the directory to write (must not exist, or be empty)")
    ex.add_argument("--adapter", action="store_true",
                    help="a LoRA run: the PEFT adapter files (for vllm serve --enable-lora) instead of merged weights")
    ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the weights' dtype (default float32; the merge is always done in float32)")
    ex.set_defaults(func=cmd_export)

    add_experiment_parser(sub, fmt, config_help())

    zoo = sub.add_parser("zoo", help="the embedded tiny models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="rebuild tokenizer, teacher and student from scratch")
    build.add_argument("overrides", nargs="*", metavar="key=value", help="ZooConfig overrides, e.g. seed=1")
    build.add_argument("--out", help="output directory (default: the package's embedded/)")
    build.add_argument("--reuse-teacher", action="store_true",
                       help="keep the tokenizer and teacher already in the output directory; rebuild the student")
    build.set_defaults(func=cmd_zoo_build)
    second = zoo_sub.add_parser("teacher-bpe2", help="build embedded:teacher-bpe2, a teacher on another tokenizer "
                                "(other vocabulary, merges, special tokens and chat template)")
    second.add_argument("overrides", nargs="*", metavar="key=value",
                        help="ZooConfig overrides for the teacher, e.g. teacher_steps=3000")
    second.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary to learn (default 1024)")
    second.add_argument("--out", help="zoo directory (default: the package's embedded/)")
    second.set_defaults(func=cmd_zoo_teacher2)
    assistant = zoo_sub.add_parser("assistant", help="build the chat assistant and the personalization data "
                                   "(reuses the zoo's tokenizer)")
    assistant.add_argument("overrides", nargs="*", metavar="key=value",
                           help="AssistantConfig overrides, e.g. steps=2000")
    assistant.add_argument("--out", help="zoo directory (default: the package's embedded/)")
    assistant.set_defaults(func=cmd_zoo_assistant)
    tools = zoo_sub.add_parser("tools", help="build embedded:tool-teacher, the teacher taught to use a calculator")
    tools.add_argument("overrides", nargs="*", metavar="key=value", help="ToolZooConfig overrides, e.g. steps=400")
    tools.add_argument("--out", help="zoo directory (default: the package's embedded/)")
    tools.set_defaults(func=cmd_zoo_tools)
    return root


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also come after options that follow a
    positional argument (``opd midtrain MODEL --docs F steps=100``), which argparse leaves unparsed."""
    root = parser()
    apply_domains(root)
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
