"""Progress that reads well where it is kept: tqdm's bar on a terminal; written to a file or a CI log, a plain
line every few percent (and at the end) instead of thousands of carriage-return frames on one line, as TRL's
and Lightning's loggers do."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINES = 20  # lines a run prints when its output is not a terminal: one every 5%


def progress(iterable=None, *, total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0,
             unit: str = "it", stream=None):
    """A progress bar over ``iterable`` (or ``total`` manual ``update``s): tqdm when ``stream`` (stderr) is a
    terminal, else ``Lines``. Both take ``set_postfix(**figures)``, ``update(n)`` and ``close()``."""
    stream = stream or sys.stderr
    if disable or stream.isatty():
        return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial, unit=unit, file=stream,
                    dynamic_ncols=True)
    return Lines(iterable, total if total is not None else len(iterable), desc, initial, unit, stream)


class Lines:
    """tqdm's interface, printing ``desc: n/total (p%) figures, elapsed, left`` at every ``1/LINES`` of the work
    and at its end."""

    def __init__(self, iterable, total: int, desc: str, initial: int, unit: str, stream):
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n = self.start = initial
        self.every = max(1, (total - initial) // LINES) if total else 1
        self.postfix: dict[str, str] = {}
        self.started = time.perf_counter()
        self.printed = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, **figures) -> None:
        self.postfix = {k: str(v) for k, v in figures.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self.printed >= self.every or (self.total and self.n >= self.total > self.printed):
            self.line()

    def line(self) -> None:
        self.printed = self.n
        seconds = time.perf_counter() - self.started
        done = self.n - self.start
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and done:
            left = f", {duration(seconds / done * (self.total - self.n))} left"
        figures = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total or '?'} {self.unit}{share}{figures} [{duration(seconds)}{left}]",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.printed:
            self.line()

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
