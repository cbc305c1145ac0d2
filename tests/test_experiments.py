"""The experiments: target/milestone arithmetic, the validation split, and tiny end-to-end runs."""

import json

import pytest

from conftest import tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.experiments import evals, on_metric, run_config, run_once
from opd.experiments.dense_sparse import DenseSparsePlan, gain_levels, level_rows, run_dense_vs_sparse
from opd.experiments.reasoning import (
    ReasoningPlan,
    comparisons,
    default_target,
    extend_rl,
    first_reaching,
    run_reasoning,
)
from opd.experiments.variants import DataReusePlan, LoraPlan, reuse_reading, run_data_reuse, run_lora
from opd.setup import open_session
from opd.tasks import ArithmeticTask
from opd.tasks.arithmetic import is_eval_expression


def curve(points):
    """Evaluation records at (step, accuracy), with 10 student + 5 teacher FLOPs per step."""
    return [{"step": s, "accuracy": a, "student_flops_total": 10.0 * s, "teacher_flops_total": 5.0 * s}
            for s, a in points]


def test_default_target_closes_the_fraction_of_the_gap():
    assert default_target(0.5, 1.0) == pytest.approx(0.9)
    assert default_target(0.2, 0.6, 0.25) == pytest.approx(0.3)


def test_first_reaching_is_the_first_evaluation_at_or_over_the_target():
    records = curve([(0, 0.5), (10, 0.7), (20, 0.65), (30, 0.9)])
    assert first_reaching(records, 0.7)["step"] == 10
    assert first_reaching(records, 0.8)["step"] == 30
    assert first_reaching(records, 0.95) is None
    assert first_reaching([{"step": 1, "loss": 1.0}] + records, 0.5)["step"] == 0  # non-eval records skipped


def test_comparisons_give_the_blogs_ratios():
    curves = {"sft": curve([(0, 0.5), (40, 0.9)]), "rl": curve([(0, 0.5), (80, 0.9)]),
              "opd": curve([(0, 0.5), (10, 0.9)])}
    rows = comparisons(curves, start=0.5, teacher=1.0, target=0.9)
    target = rows[0]
    assert target["level"] == "target" and target["opd"]["steps"] == 10
    assert target["opd_compute_efficiency_vs_sft"] == pytest.approx((40 * 15) / (10 * 15))
    assert target["opd_compute_efficiency_vs_sft_data_given"] == pytest.approx((40 * 10) / (10 * 15))
    assert target["rl_steps_over_opd_steps"] == pytest.approx(8.0)
    unreached = comparisons({"sft": curve([(0, 0.5)]), "opd": curve([(0, 0.5), (5, 0.95)])}, 0.5, 1.0, 0.9)[0]
    assert unreached["sft"] is None and "opd_compute_efficiency_vs_sft" not in unreached


def test_validation_split_is_held_out_and_disjoint_from_the_reported_prompts():
    task = ArithmeticTask()
    reported = task.eval_examples(300)
    validation = task.validation_examples(300, reported)
    texts = [ex.messages[-1]["content"] for ex in validation]
    assert len(set(texts)) == 300
    assert not set(texts) & {ex.messages[-1]["content"] for ex in reported}
    assert all(is_eval_expression(t.removeprefix("Compute ")) for t in texts)


def test_train_prompts_reuses_the_first_steps_prompts(model_dirs, tmp_path):
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "r", train_prompts=1, prompts_per_step=3))
    session = open_session(config)
    prompts = {ex.messages[-1]["content"] for step in range(4) for ex in session.source.prompts.all(step)}
    assert len(prompts) == 1
    fresh = open_session(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "f", prompts_per_step=3)))
    assert len({ex.messages[-1]["content"] for ex in fresh.source.prompts.all(1)}) > 1


def test_reasoning_experiment_end_to_end(model_dirs, tmp_path):
    overrides = [o for o in tiny_train_overrides(model_dirs, tmp_path / "unused", warmup_steps=1)
                 if not o.startswith(("out=", "steps=", "eval_every=", "lr=", "save_every="))]
    plan = ReasoningPlan(tmp_path / "exp", steps=2, eval_every=1, validation_examples=4, overrides=overrides,
                         lrs={"sft": (1e-3,), "rl": (1e-3,), "opd": (1e-3, 1e-2)}, sft_sizes=(8, 16), sft_epochs=1,
                         sft_batch=4, sft_rates=(1e-3,))
    summary = run_reasoning(plan, progress=False)
    for method in ("sft", "rl", "opd"):
        row = summary[method]
        assert {"final_accuracy", "teacher_flops", "student_flops", "steps_to_target", "flops_to_target"} <= set(row)
        assert row["student_flops"] > 0
    assert summary["rl"]["teacher_flops"] == 0 and summary["opd"]["teacher_flops"] > 0
    assert summary["opd"]["lr"] in (1e-3, 1e-2) and len(summary["sweep"]) == 4
    assert "validation split" in summary["selection"]
    saved = json.loads((plan.out / "summary.json").read_text())
    assert saved["target_accuracy"] == summary["target_accuracy"] and "teacher_accuracy" in saved
    for name in ("accuracy_vs_steps.png", "accuracy_vs_flops.png", "report.md"):
        assert (plan.out / name).stat().st_size > 0
    report = (plan.out / "report.md").read_text()
    assert "SFT as the blog ran it" in report and "Against the blog" in report
    assert saved["metric"] == "sampled" and [p["examples"] for p in saved["sft_fixed_data"]["points"]] == [8, 16]
    assert {"intercept", "slope", "covariance"} <= set(saved["sft_fixed_data"]["fit"])
    assert len((plan.out / "sft-data" / "teacher-16.jsonl").read_text().splitlines()) == 16
    assert " ± " in (plan.out / "report.md").read_text()
    # the same command again reuses the finished runs: no run trains again
    metrics = plan.out / "runs" / "opd-lr0.001" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    run_reasoning(plan, progress=False)
    assert metrics.stat().st_mtime_ns == before


def test_data_reuse_and_lora_experiments_end_to_end(model_dirs, tmp_path):
    overrides = [o for o in tiny_train_overrides(model_dirs, tmp_path / "unused")
                 if not o.startswith(("out=", "steps=", "eval_every=", "save_every=", "prompts_per_step=",
                                      "samples_per_prompt="))]
    reuse = run_data_reuse(DataReusePlan(tmp_path / "reuse", steps=2, samples=4, eval_every=1,
                                         overrides=overrides), progress=False)
    assert reuse["single_prompt"]["steps"] == 2 and reuse["fresh_prompts"]["steps"] == 2
    assert (tmp_path / "reuse" / "accuracy.png").is_file()
    lora = run_lora(LoraPlan(tmp_path / "lora", rank=2, steps=2, eval_every=1, overrides=overrides,
                             lora_lr_scales=(1.0, 3.0)), progress=False)
    assert {"sft_full", "sft_lora_x1", "sft_lora_x3", "opd_full", "opd_lora_x3", "sft_gap_points",
            "opd_gap_points"} <= set(lora)
    assert lora["sft_best_lora_scale"] in (1.0, 3.0) and lora["metric"] == "sampled"
    assert "LoRA rank 2" in (tmp_path / "lora" / "report.md").read_text()
    assert " ± " in (tmp_path / "lora" / "report.md").read_text()


def test_the_data_reuse_reading_says_which_way_the_student_moved():
    up = reuse_reading(0.5, 0.75, 0.5, 0.76, 20)
    assert "closed 50.0% of its gap" in up and "did as well as fresh prompts" in up
    down = reuse_reading(0.5, 0.1, -0.8, 0.6, 20)
    assert "fell from 50.0% to 10.0%" in down and "did worse than" in down and "closed" not in down
    assert "did better than" in reuse_reading(0.5, 0.7, None, 0.5, 20)


def test_comparisons_read_the_fixed_data_curve_and_bound_an_unfinished_rl():
    curves = {"sft": curve([(0, 0.5), (40, 0.6)]), "rl": curve([(0, 0.5), (100, 0.55)]),
              "opd": curve([(0, 0.5), (10, 0.6), (20, 0.7)])}
    fixed = {"levels": [{"level": "opd's final", "accuracy": 0.7, "examples": 1e6, "low": 5e5, "high": 2e6,
                         "extrapolated": True, "student_flops": 3000.0, "teacher_flops": 1500.0}]}
    rows = {r["level"]: r for r in comparisons(curves, start=0.5, teacher=1.0, target=0.9, sft_fixed=fixed)}
    final = rows["opd's final"]
    assert final["accuracy"] == 0.7 and final["opd"]["steps"] == 20
    assert final["opd_compute_efficiency_vs_sft_fixed_data_given"] == pytest.approx(3000 / (20 * 15))
    assert final["opd_compute_efficiency_vs_sft_fixed_charged"] == pytest.approx(4500 / (20 * 15))
    assert final["sft_fixed"]["extrapolated"] and "rl_steps_over_opd_steps" not in final
    assert final["rl_steps_lower_bound"] == pytest.approx(100 / 20)  # RL ran 100 steps without reaching it
    assert "rl_steps_lower_bound" not in rows["target"]  # opd did not reach the target either


def test_extend_rl_runs_on_to_its_budget_when_it_does_not_reach_the_level(model_dirs, tmp_path):
    overrides = [o for o in tiny_train_overrides(model_dirs, tmp_path / "unused", warmup_steps=1)
                 if not o.startswith(("out=", "steps=", "eval_every=", "lr=", "save_every="))]
    plan = ReasoningPlan(tmp_path / "exp", steps=2, eval_every=1, overrides=overrides, rl_budget_factor=2.5)
    out = plan.out / "runs" / "rl-lr0.001"
    records = run_once(run_config(overrides, out, method="rl", lr=1e-3, steps=2, eval_every=1, save_every=4),
                       progress=False)
    entry = {"run": "runs/rl-lr0.001", "lr": 1e-3, "records": on_metric(records, "sampled")}
    result = extend_rl(plan, entry, level=2.0, opd_steps=2, progress=False)  # 2.0: never reached
    assert result == {"level": 2.0, "opd_steps": 2, "budget_steps": 5, "steps_run": 5, "reached": False,
                      "steps_to_level": None}
    assert [r["step"] for r in evals(entry["records"])] == [0, 1, 2, 3, 4, 5]  # one run, resumed, not restarted
    reached = extend_rl(plan, entry, level=0.0, opd_steps=2, progress=False)
    assert reached["reached"] and reached["steps_to_level"] == 0


def test_level_rows_time_rl_and_distillation_to_the_rl_models_gain():
    rl = curve([(0, 0.3), (25, 0.4), (50, 0.5), (75, 0.6)])
    opd = curve([(0, 0.3), (5, 0.5), (10, 0.62)])
    rows = level_rows(rl, opd, gain_levels(0.3, 0.6))
    assert [r["level"] for r in rows] == ["50% of RL's gain", "80% of RL's gain", "100% of RL's gain"]
    half, full = rows[0], rows[2]
    assert half["accuracy"] == pytest.approx(0.45) and half["rl"]["steps"] == 50 and half["opd"]["steps"] == 5
    assert half["rl_steps_over_opd_steps"] == pytest.approx(10.0)
    assert full["rl_steps_over_opd_steps"] == pytest.approx(7.5) and full["rl_flops_over_opd_flops"] == 7.5
    slow = level_rows(rl, curve([(0, 0.3), (20, 0.4)]), gain_levels(0.3, 0.6, (1.0,)))[0]
    assert slow["opd"] is None and slow["rl_steps_upper_bound"] == pytest.approx(75 / 20)


def test_dense_vs_sparse_end_to_end(model_dirs, tmp_path):
    overrides = [o for o in tiny_train_overrides(model_dirs, tmp_path / "unused")
                 if not o.startswith(("out=", "steps=", "eval_every=", "save_every=", "prompts_per_step=",
                                      "samples_per_prompt="))]
    plan = DenseSparsePlan(tmp_path / "ds", rl_steps=2, opd_steps=2, rl_eval_every=1, opd_eval_every=1,
                           reuse_steps=2, reuse_samples=4, overrides=overrides)
    summary = run_dense_vs_sparse(plan, progress=False)
    teacher = json.loads((plan.out / "runs" / "opd" / "config.json").read_text())["teacher"]
    assert teacher == str((plan.out / "runs" / "rl" / "final").resolve())  # the RL checkpoint teaches
    reuse_teacher = json.loads((plan.out / "reuse" / "runs" / "single_prompt" / "config.json").read_text())["teacher"]
    assert reuse_teacher == teacher
    assert summary["rl"]["steps"] == 2 and summary["opd"]["steps"] == 2 and len(summary["levels"]) == 3
    assert summary["reuse"]["single_prompt"]["steps"] == 2
    report = (plan.out / "report.md").read_text()
    assert "Data reuse in the blog's setting" in report and (plan.out / "accuracy.png").stat().st_size > 0
    assert "RL-trained copy" in (plan.out / "reuse" / "report.md").read_text()


def test_a_run_without_the_sampled_accuracy_is_refused_by_name_not_with_an_index_error():
    records = [{"step": 0, "accuracy": 0.5, "teacher_accuracy": 0.9}, {"step": 5, "loss": 1.0},
               {"step": 10, "accuracy": 0.6}]
    with pytest.raises(OpdError, match="runs/old has no sampled accuracy at step 0.*--metric greedy"):
        on_metric(records, "sampled", "runs/old")
    greedy = on_metric(records, "greedy")
    assert [r.get("accuracy") for r in greedy] == [0.5, None, 0.6] and greedy[0]["teacher_accuracy"] == 0.9
    sampled = on_metric([{"step": 0, "accuracy": 0.5, "sampled_accuracy": 0.3, "teacher_accuracy": 0.9,
                          "teacher_sampled_accuracy": 0.8}], "sampled")[0]
    assert (sampled["accuracy"], sampled["greedy_accuracy"], sampled["teacher_accuracy"],
            sampled["teacher_greedy_accuracy"]) == (0.3, 0.5, 0.8, 0.9)
