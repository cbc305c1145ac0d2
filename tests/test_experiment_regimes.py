"""``opd experiment regimes``: each sweep's points, the smoke version of a sweep through the CLI (one knob value,
one seed, a few steps) with its table, plot and summary, run again without training anything, and the
compute-to-target arithmetic on known curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.cli import main
from opd.experiments.regimes import RegimesPlan, data_lengths, points, rate_score
from opd.experiments.regimes_report import mean_se, parts_at, ratio_cell, ratio_entry, to_target
from opd.flops import ModelShape
from opd.regimes.vocab import char_tokenizer
from opd.zoo import make_model


def test_each_sweep_turns_one_knob():
    horizon = points(RegimesPlan(Path("x"), "horizon"))
    assert [p.task for p in horizon][:2] == ["chain:4:fatal:8", "chain:4:recoverable:8"] and len(horizon) == 8
    assert [p.methods for p in horizon[:2]] == [("opd", "sft-fresh", "sft-fixed"), ("opd", "sft-fresh", "sft-fixed",
                                                                                     "rl")]
    assert [p.task for p in points(RegimesPlan(Path("x"), "entropy"))] == ["paths:5:0", "paths:5:0.3", "paths:5:1",
                                                                         "paths:5:inf"]
    capacity = points(RegimesPlan(Path("x"), "capacity"))
    assert {p.task for p in capacity} == {"chain:8:recoverable:8"} and [p.width for p in capacity] == [16, 32, 64, 128]
    assert [p.train_prompts for p in points(RegimesPlan(Path("x"), "reuse"))] == [1, 16, 0]
    noise = points(RegimesPlan(Path("x"), "noise"))
    assert [p.noise for p in noise] == [0.0, 0.02, 0.05, 0.1] and {p.task for p in noise} == {"chain:8:recoverable:8"}
    assert noise[0].methods == ("opd", "sft-fresh", "sft-fixed", "dart")


def test_the_noise_sweep_runs_every_arm_under_its_noise_and_darts_data_marks_it(tmp_path, capsys):
    out = tmp_path / "noise"
    assert main(["experiment", "regimes", "--sweep", "noise", "--knobs", "0.3", "--seeds", "1", "--steps", "2",
                 "--warm-steps", "2", "--base-steps", "2", "--eval-every", "2", "--eval-examples", "8", "--prompts",
                 "2", "--samples", "2", "--fixed-pairs", "8", "--lrs", "0.003", "--width", "16", "--layers", "1",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["points"][0]["final"]) == {"opd", "sft-fresh", "sft-fixed", "dart"}
    for method in ("opd", "sft-fresh", "sft-fixed", "dart", "warm"):
        config = json.loads((out / "runs" / "noise0.3" / "s0" / method / "config.json").read_text())
        assert config["sample_noise"] == 0.3
    assert json.loads((out / "runs" / "base" / "w16-s0" / "config.json").read_text())["sample_noise"] == 0.0
    dart = [json.loads(line) for line in (out / "data" / "noise0.3-s0-dart.jsonl").read_text().splitlines()]
    clean = [json.loads(line) for line in (out / "data" / "noise0.3-s0-sft-fresh.jsonl").read_text().splitlines()]
    assert sum(len(row["untrained"]) for row in dart) > 0 and all("untrained" not in row for row in clean)
    assert "| noise0.3 |" in (out / "report.md").read_text()
    plan = RegimesPlan(out, "noise", seeds=1, knobs=(0.3,))
    lengths = data_lengths(plan, points(plan)[0], 0, "dart")  # the teacher's writing of DART's data is charged
    assert lengths is not None and len(lengths) == len(dart)
    capsys.readouterr()


def test_of_two_rates_that_end_equal_the_faster_is_chosen():
    def records(accuracies):
        return [{"step": 10 * i, "accuracy": a} for i, a in enumerate(accuracies)] + [{"step": 99, "loss": 0.1}]

    slow, fast, lower = records([0.5, 0.6, 0.8, 1.0]), records([0.5, 0.9, 1.0, 0.998]), records([0.5, 0.5, 0.5, 0.9])
    assert rate_score(fast) > rate_score(slow) > rate_score(records([0.5, 0.9, 0.95, 0.97]))
    assert rate_score(lower) < rate_score(slow)  # a lower end is worse, however it got there


def test_compute_to_target_reads_the_first_evaluation_that_reaches_it():
    curve = [(0, 0.0, 0.0), (10, 0.3, 5.0), (20, 0.6, 9.0), (30, 0.5, 12.0)]
    assert to_target(curve, 0.3) == (10, 5.0) and to_target(curve, 0.55) == (20, 9.0)
    assert to_target(curve, 0.7) is None
    assert mean_se([0.2, 0.4]) == pytest.approx((0.3, 0.1))


def test_the_compute_to_a_target_is_split_into_the_students_training_and_sampling_and_the_teachers():
    run = {"records": [{"step": 0, "accuracy": 0.2, "student_flops_total": 0.0, "teacher_flops_total": 0.0},
                       {"step": 10, "accuracy": 0.8, "student_flops_total": 400.0, "teacher_flops_total": 50.0}],
           "data": None}
    assert parts_at(run, "opd", None, 4, 0.5) == {"student_training": 300.0, "student_sampling": 100.0,
                                                  "teacher": 50.0}
    assert parts_at(run, "opd", None, 4, 0.9) is None
    assert parts_at(run | {"data": []}, "sft-fixed", None, 4, 0.5) == {"student_training": 400.0,
                                                                       "student_sampling": 0.0, "teacher": 0.0}


def test_a_ratio_counts_the_seeds_only_one_method_brings_to_the_target_and_the_blogs_two_bases():
    def run(accuracies, flops, data=None):
        return {"records": [{"step": 10 * i, "accuracy": a, "student_flops_total": f, "teacher_flops_total": 0.0}
                            for i, (a, f) in enumerate(zip(accuracies, flops, strict=True))], "data": data}

    opd = [run([0.2, 0.9], [0.0, 100.0]), run([0.2, 0.9], [0.0, 100.0])]
    sft = [run([0.2, 0.9], [0.0, 200.0], [(4, 4)] * 2), run([0.2, 0.5], [0.0, 200.0], [(4, 4)] * 2)]
    shape = ModelShape.of(make_model(char_tokenizer(), layers=1, width=16, seed=0))
    charged = ratio_entry(opd, sft, "sft-fixed", shape, 4, 1, 0.9, 6 / 7)  # target 0.2 + 6/7 x 0.7 = 0.8
    given = ratio_entry(opd, sft, "sft-fixed", shape, 4, 1, 0.9, 6 / 7, given=True)
    assert (charged["seeds_reaching_both"], charged["opd_only"], charged["other_only"]) == (1, 1, 0)
    assert given["values"] == [2.0] and charged["values"][0] > 2.0  # writing the two pairs charged
    assert ratio_cell(charged).endswith("(1, 1 opd only)")
    # a seed whose warm start is past the best has no target: no ratio (not an infinite one: a fixed dataset
    # written up front against opd's nothing at step 0)
    ahead = ratio_entry([run([0.95, 0.9], [0.0, 1.0])], [run([0.95, 0.9], [0.0, 2.0], [(4, 4)])], "sft-fixed",
                        shape, 4, 1, 0.9, 0.5)
    assert (ahead["geomean"], ahead["seeds_at_best"]) == (None, 1)


def test_a_sweeps_smoke_version_runs_reports_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "regimes"
    argv = ["experiment", "regimes", "--sweep", "horizon", "--knobs", "3", "--seeds", "1", "--steps", "2",
            "--warm-steps", "2", "--base-steps", "2", "--eval-every", "2", "--eval-examples", "8", "--prompts", "2",
            "--samples", "2",
            "--fixed-pairs", "8", "--lrs", "0.003", "--width", "16", "--layers", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["fatal-k3", "recoverable-k3"]
    base = json.loads((out / "runs" / "base" / "w16-s0" / "config.json").read_text())
    assert base["task"] == "chain:3:fatal:8" and base["steps"] == 2  # the seed's student taught the chains first
    warm = json.loads((out / "runs" / "fatal-k3" / "s0" / "warm" / "config.json").read_text())
    assert warm["student"] == str(out / "runs" / "base" / "w16-s0" / "final")
    assert set(summary["points"][1]["final"]) == {"opd", "sft-fresh", "sft-fixed", "rl"}
    assert summary["epsilon"] > 0 and summary["scales"] == [1, 4, 16]
    report = (out / "report.md").read_text()
    assert "| recoverable-k3 |" in report and "epsilon" in report and (out / "regimes.png").stat().st_size > 0
    table = (out / "table.md").read_text().splitlines()  # the docs' compact table: accuracies, then ratios
    header = next(line for line in table if line.startswith("| point | sft-fresh @0.5 x1"))
    assert "sft-fixed @0.9 x16 given" in header and header.endswith("rl/opd steps @0.5 | rl/opd steps @0.9 |")
    rows = [line for line in table if line.startswith("| recoverable-k3 |")]
    assert len(rows) == 2 and rows[1].count("|") == header.count("|")
    for method in ("opd", "sft-fresh", "sft-fixed", "rl"):
        records = [json.loads(line) for line in (out / "runs" / "recoverable-k3" / "s0" / method / "metrics.jsonl")
                   .read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/s0/*/metrics.jsonl")}
    assert main(argv) == 0  # again: every run reused
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/s0/*/metrics.jsonl")} == stamps
    # a report of the runs finished so far, training nothing: a point missing one method's run is pending
    whole = json.loads((out / "summary.json").read_text())
    (out / "runs" / "fatal-k3" / "s0" / "opd" / "summary.json").unlink()
    assert main(argv + ["--report-only"]) == 0
    partial = json.loads((out / "summary.json").read_text())
    assert partial["pending"] == ["fatal-k3"] and [p["point"] for p in partial["points"]] == ["recoverable-k3"]
    assert partial["points"][0]["final"] == whole["points"][1]["final"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/s0/*/metrics.jsonl")} == stamps
    capsys.readouterr()


def test_the_entropy_sweep_reports_path_diversity(tmp_path, capsys):
    out = tmp_path / "entropy"
    assert main(["experiment", "regimes", "--sweep", "entropy", "--knobs", "inf", "--seeds", "1", "--steps", "2",
                 "--warm-steps", "2", "--base-steps", "2", "--eval-every", "2", "--eval-examples", "8",
                 "--prompts", "2", "--samples", "2",
                 "--fixed-pairs", "8", "--lrs", "0.003", "--width", "16", "--layers", "1", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    diversity = summary["points"][0]["diversity"]
    assert set(diversity) == {"opd", "sft-fresh", "sft-fixed"} and all(0 <= d[0] <= 1 for d in diversity.values())
    assert "Path diversity" in (out / "report.md").read_text()
    cached = json.loads((out / "runs" / "tauinf" / "s0" / "opd" / "diversity.json").read_text())
    assert cached["samples"] == 8 and cached["diversity"] == diversity["opd"][0]
    capsys.readouterr()


def test_the_reuse_sweeps_sft_data_holds_the_prompts_its_sampled_arms_train_on():
    from opd.experiments.regimes import teacher_pairs
    from opd.tasks.choose import regime_task

    pairs = teacher_pairs("paths:5:inf", 12, seed=7920, prompts=3, run_seed=1)
    pool = [ex.messages[-1]["content"] for ex in regime_task("paths:5:inf").train_examples(0, 3, 1)]
    assert [p["prompt"] for p in pairs] == pool * 4
    assert len({p["prompt"] for p in teacher_pairs("paths:5:inf", 12, seed=7920)}) > 3  # fresh prompts otherwise


def test_a_run_is_finished_once_it_has_trained_the_steps_asked(tmp_path):
    """What an experiment reuses as is (``run_once``) and reports (``--report-only``): a run asked for more steps
    than it trained is resumed, not reused."""
    from opd.experiments import finished

    assert not finished(tmp_path, 2)  # no summary: never finished
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 2}))
    assert finished(tmp_path, 2) and not finished(tmp_path, 3)
