"""A million prompts: the memory and the time to the first step's batch of each way opd reads them. The same rows
as JSONL (opd's own reader: a list in memory), as parquet read as a table (memory-mapped Arrow, every row
checked first), and as parquet streamed (`streaming=true`: read as needed through a shuffle buffer).

    .venv/bin/python bench/datasets_memory.py [--rows 1000000] [--out bench/results/datasets_memory.json]

Each way runs in its own process; memory is the peak resident set less the resident set after the imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

READ = """
import json, sys, time
import datasets, pyarrow
from opd.probe import reset_peak, rss_bytes
from opd.tasks.jsonl import JsonlTask
from opd.tasks.sources import DataOptions
path, streaming = sys.argv[1], sys.argv[2] == "1"
reset_peak(); base = rss_bytes("VmRSS"); started = time.perf_counter()
task = JsonlTask(path, options=DataOptions(streaming=streaming))
batch = task.train_examples(0, 32, 0)
ready = time.perf_counter() - started
task.train_examples(1, 32, 0)
print(json.dumps({"seconds_to_first_batch": ready, "peak_memory": rss_bytes("VmHWM") - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", default="bench/results/datasets_memory.json")
    args = parser.parse_args()
    import datasets

    with tempfile.TemporaryDirectory(prefix="opd-datasets-") as tmp:
        root = Path(tmp)
        rows = [{"prompt": f"What is {i} + {i % 97} * 3? Show the steps, then give the answer.",
                 "answer": str(i + (i % 97) * 3)} for i in range(args.rows)]
        with (root / "prompts.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        datasets.Dataset.from_list(rows).to_parquet(str(root / "prompts.parquet"))
        del rows
        results = []
        env_cache = {"HF_DATASETS_CACHE": str(root / "cache")}
        import os

        for name, path, streaming in (("jsonl, in memory", "prompts.jsonl", "0"),
                                      ("parquet, table", "prompts.parquet", "0"),
                                      ("parquet, streaming", "prompts.parquet", "1")):
            done = subprocess.run([sys.executable, "-c", READ, str(root / path), streaming], capture_output=True,
                                  text=True, env={**os.environ, **env_cache})
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            result = {"way": name, "rows": args.rows, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(json.dumps(result), flush=True)
            results.append(result)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
