"""Data parallelism on CPU (gloo, 2 processes under torchrun): equivalence, rank-0 writing, resume on a
different world size, and a failing or hanging rank ending the job within a bounded time."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, tiny_train_overrides
from opd.cli import main

WORKER = Path(__file__).with_name("dist_worker.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def equivalence_overrides(model_dirs, tmp_path, **extra) -> list[str]:
    return [o for o in tiny_train_overrides(model_dirs, tmp_path / "unused", prompts_per_step=4, samples_per_prompt=2,
                                            max_new_tokens=8, grad_clip=1e9, **extra)
            if not o.startswith("out=")]


@pytest.mark.parametrize("parallel,kl,grad_accum,budget", [
    ("ddp", "sampled", 1, 0), ("ddp", "full", 2, 0), ("fsdp", "sampled", 1, 0), ("fsdp", "full", 1, 0),
    ("ddp", "sampled", 1, 45), ("fsdp", "full", 1, 45)])  # budget: max_tokens_per_micro_batch: 3 and 4 on the ranks
def test_two_ranks_update_like_one_process_on_the_whole_batch(model_dirs, tmp_path, parallel, kl, grad_accum, budget):
    overrides = equivalence_overrides(model_dirs, tmp_path, kl=kl, parallel=parallel, grad_accum=grad_accum,
                                      max_tokens_per_micro_batch=budget)
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir(), double.mkdir()
    subprocess.run([sys.executable, str(WORKER), "equivalence", str(single), *overrides], check=True,
                   capture_output=True, timeout=120)
    result = torchrun([str(WORKER), "equivalence", str(double), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = torch.load(single / "weights.pt"), torch.load(double / "weights.pt")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-6, f"{parallel}: 2 ranks differ from 1 process by {worst}"
    moved = max((one[k] - v).abs().max().item() for k, v in _initial(model_dirs).items() if k in one)
    assert moved > 1e-4  # the step did change the weights, so the comparison means something


def _initial(model_dirs) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dirs["student"] / "model.safetensors")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rank_zero_writes_and_a_two_rank_run_resumes_on_one(model_dirs, tmp_path, parallel, capsys):
    out = tmp_path / "run"
    overrides = tiny_train_overrides(model_dirs, out, steps=4, save_every=2, eval_every=2, parallel=parallel)
    command = [sys.executable, "-m", "opd", "train", "--nproc", "2", "--quiet", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"student_accuracy_after"') == 1  # one summary: rank 0's
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]  # each step logged once, by rank 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "curves.png", "final",
                                                     "metrics.jsonl", "report.md", "summary.json"]
    assert main(["train", "--resume", str(out), "--quiet", "steps=6"]) == 0  # one process now
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6] and records[-1]["accuracy"] is not None
    capsys.readouterr()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_ends_the_job_within_a_bounded_time(model_dirs, tmp_path, mode):
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", steps=4, dist_timeout=10)
    started = time.monotonic()
    result = torchrun([str(WORKER), "fail", "1", mode, *overrides], timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    if mode == "raise":
        assert "rank 1 fails on purpose" in result.stderr
    else:  # rank 0 gives up waiting for rank 1 at the next collective
        assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower(), result.stderr[-3000:]


def test_a_sharded_teacher_scores_like_the_whole_one_and_holds_half_its_layers(model_dirs, tmp_path):
    """teacher_parallel=fsdp under torchrun: each rank scores its own (unequal) rows with the layers gathered
    from both ranks; the log-probs and hidden states equal the whole teacher's to 1e-6, and each rank holds
    half of the decoder layers' parameters."""
    from conftest import unequal_batch
    from opd.config import load_config
    from opd.models import load_model
    from opd.setup import open_session
    from opd.teachers.local import LocalTeacher

    overrides = equivalence_overrides(model_dirs, tmp_path, kl="full", teacher_parallel="fsdp")
    result = torchrun([str(WORKER), "teacher", str(tmp_path), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(tmp_path / "teacher.pt", weights_only=False)
    session = open_session(load_config(None, overrides + [f"out={tmp_path / 'one'}"]))
    batch = unequal_batch(session)
    whole = LocalTeacher(load_model(model_dirs["teacher"], torch.device("cpu"), torch.float32), session.vocab_size)
    full_layers = sum(p.numel() for layer in whole.model.get_decoder().layers for p in layer.parameters())
    total = sum(p.numel() for p in whole.model.parameters())
    for got in ranks:
        rows = got["rows"]
        want_lp, want_hidden = whole.score_with_hidden(batch.select(slice(rows[0], rows[-1] + 1)))
        assert (got["logprobs"] - want_lp).abs().max() <= 1e-6
        assert (got["hidden"] - want_hidden).abs().max() <= 1e-6
        assert got["layers"] == full_layers // 2
        assert got["local"] == total - full_layers + full_layers // 2


def test_training_with_a_sharded_teacher_equals_training_with_whole_ones(model_dirs, tmp_path):
    """Two ranks, kl=full, evaluations included (every rank runs them: the teacher's forwards are collective):
    the metrics equal those of the same two ranks each holding the whole teacher."""
    runs = {}
    for mode in ("none", "fsdp"):
        out = tmp_path / mode
        overrides = tiny_train_overrides(model_dirs, out, kl="full", teacher_parallel=mode, steps=3, eval_every=2)
        command = [sys.executable, "-m", "opd", "train", "--nproc", "2", "--quiet", *overrides]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = read_jsonl(out / "metrics.jsonl")
    for a, b in zip(runs["none"], runs["fsdp"], strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl", "teacher_accuracy"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("offload", ["", "optimizer,teacher"])
def test_offload_puts_fsdp2s_cpu_policy_on_the_named_shards(model_dirs, tmp_path, offload):
    """offload=optimizer,teacher: every FSDP2 group of the student and of the teacher carries PyTorch's
    CPUOffloadPolicy (without it, the default policy); the teacher's shards stay in CPU memory."""
    overrides = equivalence_overrides(model_dirs, tmp_path, kl="full", parallel="fsdp", teacher_parallel="fsdp",
                                      offload=offload)
    result = torchrun([str(WORKER), "placement", str(tmp_path), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "placement.pt")
    want = "CPUOffloadPolicy" if offload else "OffloadPolicy"
    layers = 1  # conftest's tiny models: one decoder layer each; the student's root group holds the rest
    assert got["student"] == [want] * (layers + 1) and got["teacher"] == [want] * layers
    assert set(got["shards"]) == {"cpu"}


def test_training_with_offload_equals_training_without(model_dirs, tmp_path):
    """Two ranks, FSDP2 student and teacher, kl=full, a checkpoint and evaluations: with the shards, gradients
    and AdamW's state in CPU memory (offload=optimizer,teacher) the metrics and the final weights equal those
    without offload."""
    from safetensors.torch import load_file

    runs, weights = {}, {}
    for offload in ("", "optimizer,teacher"):
        out = tmp_path / (offload or "none")
        overrides = tiny_train_overrides(model_dirs, out, kl="full", parallel="fsdp", teacher_parallel="fsdp",
                                         offload=offload, steps=3, eval_every=2, save_every=2)
        command = [sys.executable, "-m", "opd", "train", "--nproc", "2", "--quiet", *overrides]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[offload] = read_jsonl(out / "metrics.jsonl")
        weights[offload] = load_file(out / "final" / "model.safetensors")
    for a, b in zip(runs[""], runs["optimizer,teacher"], strict=True):
        for key in ("loss", "teacher_kl", "grad_norm", "accuracy", "eval_teacher_kl"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert max((weights[""][k] - v).abs().max().item() for k, v in weights["optimizer,teacher"].items()) < 1e-6


def test_offload_names_what_it_needs():
    from opd.config import TrainConfig
    from opd.errors import OpdError

    for fields, needs in [({"offload": "optimizer"}, "parallel=fsdp"),
                          ({"offload": "teacher", "parallel": "fsdp"}, "teacher_parallel=fsdp"),
                          ({"offload": "weights"}, "optimizer and teacher")]:
        with pytest.raises(OpdError, match=needs):
            TrainConfig(**fields).validate()
    TrainConfig(offload="optimizer, teacher", parallel="fsdp", teacher_parallel="fsdp").validate()
