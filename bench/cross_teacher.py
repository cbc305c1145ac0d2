"""What a teacher on another tokenizer costs per step: scoring the same student samples with the embedded
teacher (one tokenizer: the direct path) and with ``embedded:teacher-bpe2`` (the aligned path), alternating,
in one process; the aligned path's Python work (decode, re-tokenize, align, events) timed on its own.

    .venv/bin/python bench/cross_teacher.py [--rows 128] [--repeats 7] [--json bench/results/cross_teacher.json]

Both teachers have the same architecture (4 x 128), so the difference is the alignment, the teacher's own
rendering and the covers read from its full distribution. Not a test.
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
from opd.tasks import ArithmeticTask
from opd.teachers import LocalTeacher, TeacherView


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="embedded:student")
    parser.add_argument("--rows", type=int, default=128, help="samples per step (32 prompts x 4 by default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    student_path = resolve_model_path(args.student)
    student_tokenizer = load_tokenizer(student_path)
    student = load_model(student_path, cpu, torch.float32).eval()
    examples = ArithmeticTask().train_examples(0, args.rows // 4, 0)
    messages = [ex.messages for ex in examples for _ in range(4)]
    prompts = [chat_prompt_ids(student_tokenizer, ex.messages) for ex in examples]
    with torch.no_grad():
        rollouts = sample(student, prompts, samples_per_prompt=4, max_new_tokens=48,
                          eos_id=student_tokenizer.eos_token_id, pad_id=student_tokenizer.pad_token_id,
                          vocab_size=len(student_tokenizer), generator=torch.Generator().manual_seed(0))
    views = {}
    for name in ("embedded:teacher", "embedded:teacher-bpe2"):
        path = resolve_model_path(name)
        tokenizer = load_tokenizer(path)
        views[name] = TeacherView(LocalTeacher(load_model(path, cpu, torch.float32), len(tokenizer)),
                                  student_tokenizer, tokenizer)
    aligned = views["embedded:teacher-bpe2"]
    times: dict[str, list[float]] = {name: [] for name in views}
    times["alignment alone"] = []
    completions = rollouts.completion_ids()
    for _ in range(args.repeats):
        for name, view in views.items():
            started = time.perf_counter()
            with torch.no_grad():
                scored = view.score(rollouts, messages)
            times[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        aligned.events.cache.clear()  # as a step with new text would: events are cached by (prefix, token)
        translated = [aligned.translate(ids) for ids in completions]
        aligned.wanted_events(completions, translated)
        times["alignment alone"].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["embedded:teacher"]
    tokens = rollouts.num_completion_tokens
    print(f"{args.rows} rows, {tokens} completion tokens, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads; single-token chunks "
          f"{scored.single_token_chunks / max(scored.chunk_count, 1):.1%}")
    for name, median in medians.items():
        print(f"  {name:22} median {median * 1000:7.1f} ms  {median / base:5.2f}x the direct path")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "completion_tokens": tokens,
                                               "repeats": args.repeats, "median_seconds": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
