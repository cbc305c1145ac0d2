"""report_to=tensorboard / wandb / trackio: the trackers hold exactly the series metrics.jsonl holds, at the same
steps, also across an interrupted and resumed run; each read back with the tracker's own reader."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import interrupt_at

from conftest import read_jsonl, tiny_train_overrides
from opd.config import chosen_trackers as chosen
from opd.config import load_config
from opd.errors import OpdError
from opd.trackers import series
from opd.trainer import train


def expected_series(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in series(record).items():
            out.setdefault(key, {})[record["step"]] = value
    return out


def interrupted_then_resumed(model_dirs, out: Path, monkeypatch, **extra) -> None:
    """4 steps, checkpoints every 2; killed as step 4 starts (step 3 logged past the checkpoint), resumed."""
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_train_overrides(model_dirs, out, **extra)), progress=False)
    monkeypatch.undo()
    train(load_config(None, tiny_train_overrides(model_dirs, out, **extra)), resume=out, progress=False)


def test_tensorboard_holds_the_metrics_series_across_a_resume(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    interrupted_then_resumed(model_dirs, out, monkeypatch, report_to="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags["scalars"]
           if not tag.startswith("hparam/")}
    want = expected_series(out)
    assert set(got) == set(want)
    for tag, steps in want.items():
        assert [e.step for e in events.Scalars(tag)] == sorted(steps)  # each step once: the rerun one purged
        assert got[tag] == pytest.approx(steps, rel=1e-6), tag
    assert "curves" in tags["images"] and [e.step for e in events.Images("curves")] == [4]  # the last step
    config_tags = [t for t in tags["tensors"] if t.startswith("config")]
    assert len(config_tags) == 1 and [e.step for e in events.Tensors(config_tags[0])] == [0]  # once, fresh run
    assert {"hparam/student_accuracy_after", "hparam/wall_seconds"} <= set(tags["scalars"])


def wandb_records(path: Path):
    """The records of a wandb transaction log (``run-ID.wandb``): a 7-byte header (``:W&B``, magic, version)
    then LevelDB log blocks of 32 KiB, each record a 7-byte header (crc32c, length, type) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_holds_the_metrics_series_and_the_config_across_a_resume(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny_train_overrides(model_dirs, out, report_to="wandb")), progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(load_config(None, tiny_train_overrides(model_dirs, out, report_to="wandb")), resume=out, progress=False)
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and len({p.name for p in logs}) == 1  # one run, reopened by its id
    got: dict[str, dict[int, float]] = {}
    config, images, projects, summary = {}, set(), set(), {}
    for log in logs:
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                keys = [(i.key,) if i.key else tuple(i.nested_key) for i in record.history.item]
                items = {k[0]: json.loads(i.value_json) for k, i in zip(keys, record.history.item, strict=True)
                         if len(k) == 1}
                images |= {k[0] for k in keys if len(k) > 1}  # media: curves/width, curves/path, ...
                for key, value in items.items():
                    if key not in ("_step", "_runtime", "_timestamp") and isinstance(value, int | float):
                        assert items["_step"] not in got.get(key, {}), (key, items["_step"])  # never twice
                        got.setdefault(key, {})[items["_step"]] = value
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
                projects.add(record.run.project)
            elif kind == "summary":
                summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    want = expected_series(out)
    assert set(got) == set(want)
    for key, steps in want.items():
        assert sorted(got[key]) == sorted(steps), key
        if key != "elapsed" and not key.endswith("_seconds"):  # step 3 ran twice: wandb keeps its first timing
            assert got[key] == pytest.approx(steps, rel=1e-9), key
    assert config["lr"] == 1e-2 and config["report_to"] == "wandb"
    assert images == {"curves"} and projects == {"opd"}
    assert summary["student_accuracy_after"] == json.loads((out / "summary.json").read_text())["student_accuracy_after"]


def test_trackio_holds_the_metrics_series(model_dirs, tmp_path):
    pytest.importorskip("trackio")
    out, store = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store)}
    args = tiny_train_overrides(model_dirs, out, report_to="trackio", tracker_project="opdtest", steps=2)
    subprocess.run([sys.executable, "-m", "opd", "train", *args, "--quiet"], env=env, check=True,
                   capture_output=True, text=True)
    run_id = json.loads((out / "trackers.json").read_text())["trackio"]["id"]
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs(sys.argv[1], sys.argv[2])))")
    logs = json.loads(subprocess.run([sys.executable, "-c", read, "opdtest", run_id], env=env, check=True,
                                     capture_output=True, text=True).stdout)
    got: dict[str, dict[int, float]] = {}
    for row in logs:
        for key, value in row.items():
            if isinstance(value, int | float) and not key.startswith("_") and key not in ("step", "timestamp"):
                got.setdefault(key, {})[row["step"]] = value
    want = expected_series(out)
    assert set(want) <= set(got)
    for key, steps in want.items():
        assert got[key] == pytest.approx(steps, rel=1e-9), key


def test_report_to_lists_trackers_and_none_is_none():
    assert chosen("none") == chosen("") == chosen(" none ") == []
    assert chosen(" tensorboard , wandb,") == ["tensorboard", "wandb"]


def test_unknown_or_missing_trackers_are_refused_before_any_compute(model_dirs, tmp_path, monkeypatch):
    with pytest.raises(OpdError, match=r"report_to='tensorboard,comet': 'comet' is not one of none, tensorboard"):
        load_config(None, ["report_to=tensorboard,comet"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(OpdError, match=r"report_to=wandb needs the wandb package: pip install 'opd\[wandb\]'"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, report_to="wandb")), progress=False)
    assert not out.exists()


def test_mlflow_holds_the_metrics_series_across_a_resume_without_a_server(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    interrupted_then_resumed(model_dirs, out, monkeypatch, report_to="mlflow")
    state = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert state["uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"  # a database in the run directory
    client = MlflowClient(tracking_uri=state["uri"])
    run = client.get_run(state["id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "opd"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume reopened the same run
    want = expected_series(out)
    assert {k for k in run.data.metrics if not k.startswith("summary/")} == set(want)
    for key, steps in want.items():
        history = client.get_metric_history(state["id"], key)
        assert sorted(m.step for m in history) == sorted(steps), key  # each step once, across the resume
        if key != "elapsed" and not key.endswith("_seconds"):  # step 3 ran twice: the first timing is kept
            assert {m.step: m.value for m in history} == pytest.approx(steps, rel=1e-9), key
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["summary/student_accuracy_after"] == summary["student_accuracy_after"]
    assert run.data.params["lr"] == "0.01" and run.data.params["report_to"] == "mlflow"
    assert [a.path for a in client.list_artifacts(state["id"])] == ["curves.png"]
