"""The run's task from its config: a built-in task, a prompts file or folder, a hub dataset, or a user's own
(``module:Class``, or a Python object from ``opd.train``), with a user's reward in place of the task's."""

from __future__ import annotations

from pathlib import Path

from opd.config import TrainConfig
from opd.errors import OpdError
from opd.tasks import ArithmeticTask, Task
from opd.tasks.sources import DataOptions, is_dataset_spec


def make_task(config: TrainConfig, task: Task | None = None, reward=None) -> Task:
    """The run's task: ``task`` when given (a Python object), else ``config.task``; with ``reward`` (a
    function) or ``config.reward`` (its import path) in place of the task's own. A user's task or reward
    comes back wrapped (``tasks.custom.UserTask``) so that every reward is checked."""
    from opd.tasks.custom import UserTask, check_task, is_import_path, load_reward, load_task

    if config.verifier != "exact" and (task is not None or not is_file_task(config.task)):
        raise OpdError(f"verifier={config.verifier} grades a prompts file; task={config.task} has its own verifier "
                       "(give your own with reward=module:function)")
    if task is not None:
        check_task(task, "task")
    elif is_import_path(config.task):
        task = load_task(config.task)
    base = task if task is not None else builtin_task(config)
    if reward is None and config.reward.startswith(PYTHON_OBJECT):
        raise OpdError(f"reward={config.reward}: this run's reward was a Python function; pass it again "
                       "(opd.train(..., reward=...)) or give its import path, reward=module:function")
    if reward is None and config.reward:
        reward = load_reward(config.reward)
    if task is None and reward is None:
        return base
    return UserTask(base, reward, config.reward)


def is_file_task(name: str) -> bool:
    """Prompts from a file, a folder or a hub dataset (not a built-in task or an import path)."""
    return Path(name).is_file() or is_dataset_spec(name)


def regime_task(spec: str) -> Task:
    """The regime map's tasks (``opd.regimes``), each with an exact teacher: ``chain:K[:fatal|recoverable[:N]]``
    (pointer chasing, K hops through a cycle of N states) and ``paths:L[:TAU]`` (walks of L steps to a target,
    the teacher's temperature TAU: 0 one walk, inf uniform over valid walks)."""
    from opd.regimes.tasks import ChainTask, PathsTask

    kind, *values = spec.split(":")
    usage = ("chain:K[:fatal|recoverable[:N]] (K hops, N states)" if kind == "chain" else
             "paths:L[:TAU] (L steps, the teacher's temperature TAU >= 0 or inf)")
    try:
        if kind == "chain" and 1 <= len(values) <= 3 and values[0].isdigit() and values[1:2] in ([], ["fatal"],
                                                                                                  ["recoverable"]):
            states = int(values[2]) if len(values) == 3 else 8
            if 1 <= int(values[0]) <= 64 and 3 <= states <= 26:
                return ChainTask(hops=int(values[0]), states=states, arm=values[1] if len(values) > 1 else "fatal")
        if kind == "paths" and 1 <= len(values) <= 2 and values[0].isdigit() and 1 <= int(values[0]) <= 16:
            tau = float(values[1]) if len(values) == 2 else 1.0
            if tau >= 0:
                return PathsTask(length=int(values[0]), tau=tau)
    except ValueError:
        pass
    raise OpdError(f"task={spec!r}: write {usage}")


PYTHON_OBJECT = "python:"  # how config.json records a task or reward given as a Python object


def builtin_task(config: TrainConfig) -> Task:
    if config.task.startswith(PYTHON_OBJECT):
        raise OpdError(f"task={config.task}: this run's task was a Python object; pass it again "
                       "(opd.train(..., task=...)) or give its import path, task=module:Class")
    if config.task == "arithmetic":
        return ArithmeticTask()
    if config.task == "tools":
        from opd.tasks.tools import ToolTask

        return ToolTask()
    if config.task.startswith("arithmetic:"):  # arithmetic:K, K operators: a longer horizon
        operators = config.task.partition(":")[2]
        if not operators.isdigit() or not 1 <= int(operators) <= 12:
            raise OpdError(f"task={config.task!r}: arithmetic:K takes K operators, an integer from 1 to 12")
        return ArithmeticTask(int(operators))
    if config.task.startswith(("chain:", "paths:")):
        return regime_task(config.task)
    if is_file_task(config.task):
        from opd.tasks.jsonl import JsonlTask

        return JsonlTask(config.task, config.eval_file or None, config.verifier, DataOptions.of(config))
    raise OpdError(f"task={config.task!r} is neither a built-in task (arithmetic), a prompts file or folder that "
                   "exists, a hub dataset (hf:ORG/NAME), nor module:Class of your own")
