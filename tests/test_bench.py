"""A short form of bench/vs_trl.py (the README's comparison with TRL), so the bench cannot rot unseen: 3 steps
of 2 prompts x 2 samples on the embedded pair, every system in its own process as the bench runs them. opd's
two systems always run; TRL's when ``trl`` is installed (the dev extra installs it)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vs_trl.py"
OPD_SYSTEMS = ("opd-sampled", "opd-full")
HAS_TRL = importlib.util.find_spec("trl") is not None
MEDIANS = ("median_step_seconds", "tokens_per_second", "peak_memory_mb", "accuracy", "teacher_kl")


@pytest.fixture(scope="module")
def short_bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "vs_trl.json"
    systems = [*OPD_SYSTEMS, *(["trl"] if HAS_TRL else [])]
    done = subprocess.run([sys.executable, str(BENCH), "--steps=3", "--repeats=1", "--prompts=2", "--samples=2",
                           "--max-new-tokens=16", "--warmup=1", "--eval-examples=4", f"--out={out}",
                           "--systems", *systems], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def check_system(summary: dict, system: str) -> None:
    row = summary["medians"][system]
    assert set(MEDIANS) <= set(row)
    assert all(math.isfinite(row[key]) for key in MEDIANS), row
    assert row["median_step_seconds"] > 0 and row["tokens_per_second"] > 0 and row["peak_memory_mb"] > 0
    assert 0.0 <= row["accuracy"] <= 1.0
    [run] = [r for r in summary["runs"] if r["system"] == system]
    assert run["step_seconds"] and run["device"] == summary["device"]


def test_the_bench_runs_opd_both_ways_and_writes_what_the_readme_reads(short_bench):
    assert short_bench["steps"] == 3 and short_bench["repeats"] == 1 and short_bench["pair"] == "zoo"
    assert short_bench["prompts_per_step"] == 2 and short_bench["samples_per_prompt"] == 2
    for system in OPD_SYSTEMS:
        check_system(short_bench, system)
    if not HAS_TRL:
        assert short_bench["tokens_per_second_ratio"] is None
        assert short_bench["tokens_per_second_ratio_sampled"] is None


def test_the_bench_runs_trl_on_the_same_work_and_gives_the_ratio(short_bench):
    pytest.importorskip("trl")  # the opd systems are checked above either way
    check_system(short_bench, "trl")
    medians = short_bench["medians"]
    assert short_bench["tokens_per_second_ratio"] == pytest.approx(
        medians["opd-full"]["tokens_per_second"] / medians["trl"]["tokens_per_second"])
    assert short_bench["tokens_per_second_ratio_sampled"] == pytest.approx(
        medians["opd-sampled"]["tokens_per_second"] / medians["trl"]["tokens_per_second"])


def test_too_few_steps_to_time_are_refused():
    done = subprocess.run([sys.executable, str(BENCH), "--steps=2", "--systems", "opd-full"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--steps must be at least 3" in done.stderr
