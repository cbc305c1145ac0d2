"""The learning-rate schedule: a linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``.

The factor that multiplies ``lr`` at update ``k`` (0-based), with ``w = max(warmup_steps, 1)`` and ``S``
steps in all:

- warm-up, ``k < w``: ``(k + 1) / w`` (the first update already moves; update ``w - 1`` is at ``lr``);
- after it, with ``p = (k - w + 1) / max(S - w, 1)`` clipped to [0, 1] (0 at update ``w - 1``, 1 at the last,
  ``S - 1``) and ``m = min_lr_ratio``:
  ``constant``: 1; ``linear``: ``m + (1 - m)(1 - p)``; ``cosine``: ``m + (1 - m)(1 + cos(pi p)) / 2``
  (Loshchilov & Hutter 2017, SGDR, without restarts; HF's ``get_cosine_schedule_with_warmup`` and verl's
  ``min_lr_ratio`` decay the same way).

The factor depends only on ``k`` and the config, so a resumed run (the scheduler's ``last_epoch`` restored)
continues the same curve.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(k: int, warmup_steps: int, steps: int, schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    warmup = max(warmup_steps, 1)
    if k < warmup:
        return (k + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((k - warmup + 1) / max(steps - warmup, 1), 0.0), 1.0)
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
