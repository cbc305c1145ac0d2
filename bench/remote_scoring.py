"""Teacher scoring throughput: in-process against `opd serve` on loopback, same batch, alternating; and
through the server, one log-prob per token (K=0) against the teacher's top-K as well (kl=topk).

    .venv/bin/python bench/remote_scoring.py [--teacher embedded:teacher] [--rows 128] [--repeats 5] [--topk 20]

Prints completion tokens scored per second for each path and their ratio, and the response bytes per
request and per completion token at K=0 and K=``--topk``; writes bench/results/remote_scoring.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from opd.models import chat_prompt_ids, load_model, load_tokenizer, resolve_model_path
from opd.samplers.local import sample
from opd.server import BackgroundServer, ServerConfig, create_app
from opd.tasks import ArithmeticTask
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:teacher")
    parser.add_argument("--student", default="embedded:student")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--out", default="bench/results/remote_scoring.json")
    args = parser.parse_args()

    teacher_path, student_path = resolve_model_path(args.teacher), resolve_model_path(args.student)
    tokenizer = load_tokenizer(teacher_path)
    cpu = torch.device("cpu")
    teacher = load_model(teacher_path, cpu, torch.float32).eval()
    student = load_model(student_path, cpu, torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, ex.messages) for ex in ArithmeticTask().train_examples(0, args.rows, 0)]
    rollouts = sample(student, prompts, max_new_tokens=48, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id,
                      vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(0))
    tokens = rollouts.num_completion_tokens

    paths = ("in-process", "opd serve", f"opd serve top-{args.topk}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    received: dict[str, list[int]] = {name: [] for name in paths[1:]}
    with BackgroundServer(create_app(teacher, tokenizer, ServerConfig("teacher", None, 256))) as server:
        local, remote = LocalTeacher(teacher, len(tokenizer)), RemoteTeacher(server.url)
        remote.connect(tokenizer, 200)
        sizes: list[int] = []

        def count(response) -> None:
            response.read()
            sizes.append(len(response.content))

        remote.http.client.event_hooks["response"].append(count)
        scorers = {paths[0]: lambda: local.score(rollouts), paths[1]: lambda: remote.score(rollouts),
                   paths[2]: lambda: remote.score_topk(rollouts, args.topk)}
        for _ in range(args.repeats):
            for name, scorer in scorers.items():
                sizes.clear()
                started = time.perf_counter()
                scorer()
                times[name].append(time.perf_counter() - started)
                if name in received:
                    received[name].append(sum(sizes) // max(len(sizes), 1))
        difference = (local.score(rollouts) - remote.score(rollouts)).abs().max().item()

    requests = -(-args.rows // remote.rows_per_request)
    print(f"{args.rows} rows, {tokens} completion tokens, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads; max |difference| {difference:.2e}; {requests} requests of "
          f"{remote.rows_per_request} rows")
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"rows": args.rows, "completion_tokens": tokens, "threads": torch.get_num_threads(),
              "rows_per_request": remote.rows_per_request, "topk": args.topk, "paths": {}}
    for name, median in medians.items():
        per_request = statistics.median(received[name]) if name in received else None
        per_token = per_request * requests / tokens if per_request else None
        extra = f"  {per_request / 1024:8.1f} KiB per request, {per_token:6.0f} B per completion token" if per_request \
            else ""
        print(f"  {name:18} median {median * 1000:7.1f} ms  {tokens / median:9.0f} tokens/s{extra}")
        result["paths"][name] = {"median_seconds": median, "tokens_per_second": tokens / median,
                                 "bytes_per_request": per_request, "bytes_per_completion_token": per_token}
    print(f"  server / in-process throughput: {medians[paths[0]] / medians[paths[1]]:.2f}; top-{args.topk} / "
          f"K=0 through the server: {medians[paths[1]] / medians[paths[2]]:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
