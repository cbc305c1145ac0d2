"""Short reference runs that a behaviour-preserving change must reproduce number for number.

    .venv/bin/python tools/reference_runs.py record DIR [--only NAME ...]   # run them, keep each run's numbers
    .venv/bin/python tools/reference_runs.py compare BEFORE AFTER           # every number equal, or a list of diffs

Each run is ``opd train`` in a fresh process with one thread per process (the numbers of a CPU run
depend on the thread count), two at a time. ``record`` keeps, per run, the numbers of every line of
``metrics.jsonl`` and of ``summary.json``, timings left out (``elapsed``, ``*_seconds``, ``*_per_second``,
``wall_*``): what the run computed, not how fast. ``compare`` says which run, step and key differ.

The set covers every source of a step's rows and every objective: the demo's config for 30 steps,
kl=sampled, kl=topk, jsd with GKD's mix and seq_kd, two teachers, a rollout server (``opd serve``, full
weights and LoRA), the other-tokenizer teacher, sft, rl, opd+rl, midtraining, a resumed run, two
ranks under torchrun, a tool conversation (in process and through a rollout server), ``teacher=self`` with
privileged context (``teacher_prompt``), and a teacher behind a server (``opd serve embedded:teacher``).

``bench/results/reference_runs/`` holds the numbers recorded on main before #40's restructuring (x86_64, torch
2.13.0 CPU, one thread per process): ``compare bench/results/reference_runs AFTER``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "opd" / "embedded" / "personalization"
SHORT = ["steps=6", "eval_every=3", "save_every=3", "eval_examples=32", "prompts_per_step=8", "samples_per_prompt=4",
         "warmup_steps=2"]
TOOLS = ["task=tools", "tools=opd.tasks.tools:calc", "tool_format=compact", "teacher=embedded:tool-teacher",
         "max_turns=3", "max_new_tokens=32", "kl=full"]
RUNS: dict[str, list[str]] = {
    "demo-30": ["steps=30", "eval_every=15", "save_every=15", "eval_examples=64"],
    "sampled": SHORT + ["kl=sampled"],
    "full": SHORT + ["kl=full"],
    "topk": SHORT + ["kl=topk", "teacher_topk=8"],
    "jsd-lmbda-seqkd": SHORT + ["kl=full", "divergence=jsd", "beta=0.5", "lmbda=0.5", "seq_kd=true"],
    "two-teachers": SHORT + ["kl=topk", "teachers=second=embedded:assistant"],
    "server-full": SHORT + ["kl=sampled", "sampler={server}"],
    "server-lora": SHORT + ["kl=sampled", "sampler={server}", "lora_rank=4"],
    "other-tokenizer": SHORT + ["teacher=embedded:teacher-bpe2", "kl=sampled"],
    "sft": SHORT + ["method=sft"],
    "rl": SHORT + ["method=rl"],
    "opd+rl": SHORT + ["method=opd+rl", "kl=sampled"],
    "midtrain": SHORT + ["method=midtrain", f"docs={EMBEDDED / 'docs.jsonl'}", f"sft_data={EMBEDDED / 'chat.jsonl'}",
                         "chat_fraction=0.25", "doc_tokens=32"],
    "resumed": SHORT + ["kl=sampled"],  # stopped after step 3's checkpoint, then resumed to step 6
    "torchrun-2": SHORT + ["kl=sampled", "--nproc", "2"],
    "conversation": SHORT + TOOLS,
    "conversation-server": SHORT + TOOLS + ["sampler={server}"],
    "self-privileged": SHORT + ["teacher=self", "task={work}/privileged.jsonl",
                                "eval_file={work}/privileged_eval.jsonl", "kl=full"],
    "teacher-server": SHORT + ["teacher={teacher_server}", "kl=topk", "teacher_topk=8"],
}
TIMING = ("elapsed", "wall_")


def is_timing(key: str) -> bool:
    return key.startswith(TIMING) or key.endswith(("_seconds", "_per_second"))


def numbers(record: dict) -> dict:
    return {key: value for key, value in record.items() if not is_timing(key)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opd(args: list[str], env: dict, log: Path) -> None:
    with log.open("a") as handle:
        done = subprocess.run([sys.executable, "-m", "opd", *args], env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"opd {' '.join(args)} failed (exit {done.returncode}); see {log}")


class Server:
    """``opd serve MODEL`` on a free port: the student for the runs that sample through a server, the teacher
    for the one that scores through a server."""

    def __init__(self, env: dict, log: Path, model: str = "embedded:student", extra: tuple = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "opd", "serve", model, "--port", str(self.port),
                                         *extra], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit(f"opd serve did not start; see {log}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def privileged_prompts(work: Path) -> None:
    """Sums whose teacher prompt holds the answer (privileged context for ``teacher=self``), training and
    held-out, disjoint."""
    for name, numbers in (("privileged", range(0, 64)), ("privileged_eval", range(64, 96))):
        rows = [{"prompt": f"Compute {n % 10}+{n // 10 % 10}", "answer": str(n % 10 + n // 10 % 10),
                 "teacher_prompt": f"Compute {n % 10}+{n // 10 % 10}. The answer is {n % 10 + n // 10 % 10}."}
                for n in numbers]
        (work / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_one(name: str, work: Path, env: dict) -> dict:
    run_dir, log = work / name, work / f"{name}.log"
    joined = " ".join(RUNS[name])
    # the teacher's server scores each request alone (--max-batch-tokens 1): requests batched as they happen to
    # arrive would pad differently from run to run, and its log-probs with them (at 1e-7)
    servers = {key: Server(env, work / f"{name}.{key}.log", model, extra)
               for key, model, extra in (("server", "embedded:student", ()),
                                         ("teacher_server", "embedded:teacher", ("--max-batch-tokens", "1")))
               if "{" + key + "}" in joined}
    if "{work}" in joined:
        privileged_prompts(work)
    args = [a.format(work=work, **{key: s.url for key, s in servers.items()}) for a in RUNS[name]]
    try:
        if name == "resumed":  # the same run in two processes: steps 1-3, then resumed to 6
            first = [a if not a.startswith("steps=") else "steps=3" for a in args]
            opd(["train", *first, "--out", str(run_dir), "--quiet"], env, log)
            opd(["train", "steps=6", "--resume", str(run_dir), "--quiet"], env, log)
        else:
            opd(["train", *args, "--out", str(run_dir), "--quiet"], env, log)
    finally:
        for server in servers.values():
            server.close()
    metrics = [numbers(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = numbers(json.loads((run_dir / "summary.json").read_text()))
    return {"args": RUNS[name], "metrics": metrics, "summary": summary}


def record(out: Path, only: list[str] | None) -> None:
    names = only or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; the runs are {list(RUNS)}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="opd-reference-"))
    started = time.time()

    def task(name: str) -> None:
        tick = time.time()
        result = run_one(name, work, env)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name}: {len(result['metrics'])} lines, {time.time() - tick:.0f} s", flush=True)

    with ThreadPoolExecutor(2) as pool:  # two processes of one thread each: this machine's two cores
        for future in [pool.submit(task, name) for name in names]:
            future.result()
    shutil.rmtree(work)
    print(f"recorded {len(names)} runs in {out} ({time.time() - started:.0f} s)")


def differences(before: dict, after: dict, where: str) -> list[str]:
    found = []
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            found.append(f"{where} {key}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}")
    return found


def compare(before_dir: Path, after_dir: Path) -> int:
    problems, compared = [], 0
    for path in sorted(before_dir.glob("*.json")):
        other = after_dir / path.name
        if not other.is_file():
            problems.append(f"{path.stem}: not recorded in {after_dir}")
            continue
        before, after = json.loads(path.read_text()), json.loads(other.read_text())
        if len(before["metrics"]) != len(after["metrics"]):
            problems.append(f"{path.stem}: {len(before['metrics'])} metrics lines, now {len(after['metrics'])}")
        for old, new in zip(before["metrics"], after["metrics"], strict=False):
            problems += differences(old, new, f"{path.stem} step {old.get('step')}")
        problems += differences(before["summary"], after["summary"], f"{path.stem} summary")
        compared += 1
    for line in problems:
        print(line)
    print(f"{compared} runs compared: " + ("every number identical" if not problems else f"{len(problems)} differ"))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the reference runs, keep their numbers in DIR")
    rec.add_argument("dir", type=Path)
    rec.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(RUNS)}")
    cmp = sub.add_parser("compare", help="every number of BEFORE equal in AFTER")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.dir, args.only)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
