"""Experiment trackers: ``report_to=tensorboard,wandb,trackio,mlflow`` logs the series metrics.jsonl holds, at the same
steps, with the config as hyperparameters and the report's plots at the end.

A resumed run continues the same tracker run: TensorBoard's writer purges the steps after the checkpoint
(they run again), wandb, trackio and mlflow reopen the run by the id kept in the run directory
(``trackers.json``) and skip steps they already hold (a resumed run repeats them exactly). Rank 0 alone logs.

mlflow logs to ``$MLFLOW_TRACKING_URI`` when it is set (a tracking server, or a shared database), else to
a SQLite database in the run directory (``mlflow.db``, artifacts beside it): no server to start.

Each tracker is an optional dependency: ``pip install 'opd[tensorboard]'``, ``'opd[wandb]'``, ``'opd[trackio]'``,
``'opd[mlflow]'``.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import time
from pathlib import Path

from opd.config import chosen_trackers
from opd.errors import OpdError

MLFLOW_PARAM_CHARS = 6000  # mlflow refuses a longer parameter value
STATE_FILE = "trackers.json"


def check_installed(report_to: str) -> None:
    """Before any compute: every chosen tracker's package (named as the tracker) can be imported."""
    for name in chosen_trackers(report_to):
        if importlib.util.find_spec(name) is None:
            raise OpdError(f"report_to={name} needs the {name} package: pip install 'opd[{name}]'")


def series(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line (``step`` is the axis; nulls are left out)."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def hyperparameters(config: dict) -> dict:
    return {key: value for key, value in config.items() if isinstance(value, str | int | float | bool)}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, purge_from: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what an earlier process logged from this step on (it runs again)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_from)
        self.config = config
        if purge_from is None:
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()), 0)

    def log(self, record: dict) -> None:
        for key, value in series(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def finish(self, images: dict[str, Path], summary: dict) -> None:
        import matplotlib.pyplot as plt

        for tag, path in images.items():
            self.writer.add_image(tag, plt.imread(path)[..., :3], summary["steps"], dataformats="HWC")
        metrics = {f"hparam/{k}": v for k, v in series(summary).items()}
        self.writer.add_hparams(hyperparameters(self.config), metrics, run_name=".", global_step=summary["steps"])
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()


class KeyedRun:
    """wandb and trackio: one run per run directory, found again on resume by the id kept there; steps the
    tracker already holds are not sent twice."""

    def __init__(self, name: str, run_dir: Path, config: dict, project: str, run_name: str) -> None:
        self.name, self.run_dir = name, run_dir
        state = read_state(run_dir).get(name, {})
        self.last_step = state.get("last_step", -1)
        self.module = importlib.import_module(name)
        self.run_id = run_id = state.get("id") or f"{run_dir.resolve().name}-{os.urandom(3).hex()}".replace(".", "-")
        if name == "wandb":
            self.run = self.module.init(project=project, name=run_name, id=run_id, resume="allow", config=config,
                                        dir=str(run_dir))
        else:
            self.run = self.module.init(project=project, name=run_id, resume="allow", config=config, embed=False,
                                        auto_log_cpu=False, auto_log_gpu=False)
        self.save_state()

    def save_state(self) -> None:
        write_state(self.run_dir, self.name, {"id": self.run_id, "last_step": self.last_step})

    def log(self, record: dict) -> None:
        if record["step"] <= self.last_step:
            return
        self.run.log(series(record), step=record["step"])
        self.last_step = record["step"]
        self.save_state()

    def finish(self, images: dict[str, Path], summary: dict) -> None:
        if self.name == "wandb":
            self.run.summary.update(series(summary))
        self.run.log({tag: self.module.Image(str(path)) for tag, path in images.items()}, step=self.last_step)
        self.run.finish()

    def abort(self) -> None:
        """The process is stopping with an error: close the run (resuming reopens it)."""
        self.run.finish(exit_code=1) if self.name == "wandb" else self.run.finish()


class MLflow:
    """One mlflow run per run directory, found again on resume by the id kept there; steps it already holds
    are not sent twice. mlflow's client object, not its module-global active run."""

    def __init__(self, run_dir: Path, config: dict, project: str, run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        state = read_state(run_dir).get("mlflow", {})
        self.last_step = state.get("last_step", -1)
        if state.get("id"):
            self.run_id = state["id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                project, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ
                else (run_dir / "mlflow-artifacts").resolve().as_uri())
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(key, str(value)[:MLFLOW_PARAM_CHARS]) for key, value in hyperparameters(config).items()]
            for start in range(0, len(params), 100):  # mlflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.save_state()

    def save_state(self) -> None:
        write_state(self.run_dir, "mlflow", {"id": self.run_id, "last_step": self.last_step, "uri": self.uri})

    def send(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log(self, record: dict) -> None:
        if record["step"] <= self.last_step:
            return
        self.send(series(record), record["step"])
        self.last_step = record["step"]
        self.save_state()

    def finish(self, images: dict[str, Path], summary: dict) -> None:
        self.send({f"summary/{k}": v for k, v in series(summary).items()}, self.last_step)
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def read_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, name: str, value: dict) -> None:
    from opd.runs import write_json

    write_json(run_dir / STATE_FILE, {**read_state(run_dir), name: value})


class Trackers:
    """The run's trackers (none: every call does nothing)."""

    def __init__(self, report_to: str, run_dir: Path, config: dict, purge_from: int | None, project: str,
                 run_name: str) -> None:
        """``purge_from``: None for a fresh run; resuming, the first step that runs again (0: started over)."""
        self.open = []
        for name in chosen_trackers(report_to):
            if name == "tensorboard":
                self.open.append(TensorBoard(run_dir, config, purge_from))
            elif name == "mlflow":
                self.open.append(MLflow(run_dir, config, project, run_name or run_dir.resolve().name))
            else:
                self.open.append(KeyedRun(name, run_dir, config, project, run_name or run_dir.resolve().name))

    def log(self, record: dict) -> None:
        for tracker in self.open:
            tracker.log(record)

    def finish(self, images: dict[str, Path], summary: dict) -> None:
        for tracker in self.open:
            tracker.finish(images, summary)

    def abort(self) -> None:
        for tracker in self.open:
            tracker.abort()
