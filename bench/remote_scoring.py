"""Teacher scoring throughput: in-process against `opd serve` on loopback, same batch, alternating.

    .venv/bin/python bench/remote_scoring.py [--teacher embedded:teacher] [--rows 128] [--repeats 5]

Prints completion tokens scored per second for each path and their ratio; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opd.models import chat_prompt_ids, load_model, load_tokenizer
from opd.sampler import sample
from opd.server import BackgroundServer, ServerConfig, create_app
from opd.setup import resolve_model_path
from opd.tasks import ArithmeticTask
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:teacher")
    parser.add_argument("--student", default="embedded:student")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
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

    times: dict[str, list[float]] = {"in-process": [], "opd serve": []}
    with BackgroundServer(create_app(teacher, tokenizer, ServerConfig("teacher", None, 256))) as server:
        local, remote = LocalTeacher(teacher, len(tokenizer)), RemoteTeacher(server.url)
        remote.connect(tokenizer, 200)
        for _ in range(args.repeats):
            for name, scorer in (("in-process", local), ("opd serve", remote)):
                started = time.perf_counter()
                scorer.score(rollouts)
                times[name].append(time.perf_counter() - started)
        difference = (local.score(rollouts) - remote.score(rollouts)).abs().max().item()

    print(f"{args.rows} rows, {tokens} completion tokens, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads; max |difference| {difference:.2e}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"  {name:11} median {median * 1000:7.1f} ms  {tokens / median:9.0f} tokens/s")
    print(f"  server / in-process throughput: {medians['in-process'] / medians['opd serve']:.2f}")


if __name__ == "__main__":
    main()
