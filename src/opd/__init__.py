"""opd: on-policy distillation of language models.

The Python surface (everything else is internal and may change):

- ``opd.train(config=None, *, task=None, reward=None, **fields) -> dict``: a training run, its summary.
- ``opd.evaluate(model, task="arithmetic", *, examples=256, samples=0, reward=None, ...) -> EvalResult``.
- ``opd.TrainConfig``: every setting of a run (the fields of ``opd train --help``).
- ``opd.Task`` (protocol) and ``opd.Example``: a task of your own; ``opd.ArithmeticTask`` and
  ``opd.JsonlTask`` are the built-in ones.
- ``opd.OpdError``: what opd raises for bad input, with a message that says what to do.

Names load on first use, so ``import opd`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_PUBLIC = {
    "train": "opd.api", "evaluate": "opd.api", "TrainConfig": "opd.config", "Task": "opd.tasks",
    "Example": "opd.tasks", "ArithmeticTask": "opd.tasks", "JsonlTask": "opd.tasks.jsonl", "OpdError": "opd.errors",
    "EvalResult": "opd.evaluation",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'opd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
