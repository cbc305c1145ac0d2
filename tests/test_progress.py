"""Progress where it is kept: on a terminal tqdm's bar; written to a file or a CI log (``make demo > log``), a
plain line every 5% and at the end, never a carriage return."""

from __future__ import annotations

import io
import subprocess
import sys

from conftest import tiny_train_overrides
from opd.progress import Lines, duration, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_a_line_every_five_percent_and_at_the_end():
    stream = io.StringIO()
    bar = progress(range(100), desc="opd", unit="step", stream=stream)
    assert isinstance(bar, Lines)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in stream.getvalue()
    assert lines[0].startswith("opd: 5/100 step (5%) loss=0.200 [") and lines[-1].startswith("opd: 100/100 step (100%)")


def test_a_resumed_run_counts_from_where_it_starts_and_an_odd_total_ends_with_its_line():
    stream = io.StringIO()
    bar = progress(range(40, 47), desc="x", initial=40, total=47, stream=stream)
    for _ in bar:
        pass
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("x: 41/47 it (87%)") and lines[-1].startswith("x: 47/47 it (100%)")
    assert len(lines) == 7


def test_a_terminal_gets_the_bar():
    assert not isinstance(progress(range(3), stream=Terminal()), Lines)
    assert duration(5) == "5s" and duration(125) == "2m05s" and duration(7322) == "2h02m"


def test_a_training_run_written_to_a_file_reads_line_by_line(model_dirs, tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-m", "opd", "train", *tiny_train_overrides(
            model_dirs, tmp_path / "run", steps=40, eval_every=40, save_every=40, prompts_per_step=2,
            samples_per_prompt=1, max_new_tokens=2)], stdout=handle, stderr=subprocess.STDOUT, check=True,
            timeout=300)
    text = log.read_text()
    assert "\r" not in text
    steps = [line for line in text.splitlines() if line.startswith("opd: ") and "/40 step (" in line]
    assert len(steps) == 20 and steps[-1].startswith("opd: 40/40 step (100%) loss=")
