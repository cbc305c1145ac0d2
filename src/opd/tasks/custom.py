"""A user's own task and reward: Python objects, or import paths (``my_pkg.tasks:MyTask``) resolved before any
compute, and every reward checked as it comes back."""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import sys
from collections.abc import Callable

from opd.errors import OpdError
from opd.tasks import Example, Task

IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
Reward = Callable[[str, Example], float]  # reward(completion, example) -> a finite number


def is_import_path(spec: str) -> bool:
    """``module.path:attribute`` (the built-in ``arithmetic:K`` and a hub dataset ``hf:NAME`` are not)."""
    return bool(IMPORT_PATH.fullmatch(spec)) and not spec.startswith(("arithmetic:", "hf:", "chain:", "paths:"))


def load_object(spec: str, field: str):
    """The object at ``module.path:attribute``, importable from the working directory as well (as
    uvicorn resolves an app); ``field`` names the setting in errors."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OpdError(f"{field}={spec}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH or "
                       "in the working directory?") from err
    target = module
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise OpdError(f"{field}={spec}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    return target


def load_task(spec: str) -> Task:
    """``task=module:Class`` (instantiated without arguments), ``module:factory`` or ``module:instance``."""
    target = load_object(spec, "task")
    task = target() if callable(target) and not has_task_methods(target) else target
    check_task(task, f"task={spec}")
    return task


TASK_METHODS = ("train_examples", "eval_examples", "reward")


def has_task_methods(obj) -> bool:
    return all(callable(getattr(obj, name, None)) for name in TASK_METHODS) and not isinstance(obj, type)


def check_task(task, where: str) -> None:
    missing = [name for name in TASK_METHODS if not callable(getattr(task, name, None))]
    if missing:
        raise OpdError(f"{where}: a task needs the methods train_examples, eval_examples and reward (the "
                       f"opd.Task protocol); {type(task).__name__} lacks {', '.join(missing)}")


def load_reward(spec: str) -> Reward:
    reward = load_object(spec, "reward")
    if not callable(reward):
        raise OpdError(f"reward={spec} is a {type(reward).__name__}, not a function reward(completion, example)")
    return reward


class UserTask:
    """A user's task, or any task with a user's reward in place of its own: every reward is checked (a
    finite real number), and one that raises or is not stops the run naming the prompt and completion."""

    def __init__(self, task, reward: Reward | None = None, reward_name: str = "") -> None:
        self.task = task
        self.custom_reward = reward
        self.name = getattr(task, "name", type(task).__name__)
        self.reward_name = reward_name or getattr(reward, "__qualname__", "reward") if reward else ""

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        return self.task.train_examples(step, count, seed)

    def eval_examples(self, count: int) -> list[Example]:
        return self.task.eval_examples(count)

    def __getattr__(self, name: str):  # validation_examples and the like, when the task has them
        return getattr(self.task, name)

    def reward(self, completion: str, example: Example) -> float:
        function = self.custom_reward or self.task.reward
        where = f"the reward {self.reward_name or f'of task {self.name}'}"
        try:
            value = function(completion, example)
        except Exception as err:
            raise OpdError(f"{where} raised {type(err).__name__}: {err}\n  prompt: {example.messages[-1]['content']!r}"
                           f"\n  completion: {completion!r}") from err
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise OpdError(f"{where} returned {value!r}, not a finite number\n  prompt: "
                           f"{example.messages[-1]['content']!r}\n  completion: {completion!r}")
        return float(value)
