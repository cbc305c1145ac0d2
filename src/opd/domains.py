"""What values a setting may take: one declaration per config field (its ``metadata["domain"]``), read by the
config's checks, the CLI's options and the server's request fields alike, so a NaN, an infinity or a negative
count is refused at the door with the field, the value and the allowed range named.

A domain is a small object: ``check(value)`` returns None when the value is allowed, else what is wrong in words
(``"must be a finite number > 0"``); ``describe()`` says what is allowed, for help texts and the docs."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """A number in ``[low, high]`` (each end open with ``low_open`` / ``high_open``; None: unbounded on that side),
    finite unless ``inf_ok`` (then +inf is allowed: a limit that is off); NaN never. ``integer``: whole numbers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    inf_ok: bool = False
    note: str = ""  # what a special value means, e.g. "0: off"

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number" if not self.inf_ok else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = kind
        if self.inf_ok:
            text += " (inf allowed)"
        return text + (f"; {self.note}" if self.note else "")

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self.describe()}"
        if math.isnan(value) or (math.isinf(value) and not (self.inf_ok and value > 0)):
            return f"must be {self.describe()}"
        if self.integer and not (isinstance(value, int) or value.is_integer()):
            return f"must be {self.describe()}"
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}" if low_bad or high_bad else None


@dataclass(frozen=True)
class Choice:
    """One of the listed strings."""

    values: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)

    def check(self, value) -> str | None:
        return None if value in self.values else f"must be {self.describe()}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# the domains most fields share
COUNT = Number(1, integer=True)  # at least one
OPTIONAL_COUNT = Number(0, integer=True, note="0: off / all / no limit")
POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)
SHARE = Number(0, 1)  # a probability, a share, a discount
HALF_OPEN_SHARE = Number(0, 1, high_open=True)  # AdamW's betas, chat_fraction
SEED = Number(0, 2**63 - 1, integer=True)


def check(domain, name: str, value, what: str = "config field") -> str | None:
    """``"config field NAME=VALUE must be ..."`` when ``value`` is outside ``domain``, else None."""
    problem = None if domain is None else domain.check(value)
    return None if problem is None else f"{what} {name}={value!r} {problem}"


def argtype(domain, kind: type = float):
    """An argparse ``type=`` that parses ``kind`` and refuses values outside ``domain`` (argparse then exits 2,
    naming the option and what it allows)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        problem = domain.check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


# the values each numeric option of the CLI may take, by the option's name; "COMMAND.name" for one command's
# option where it differs. Any other integer option is a count (>= 1), any other number positive and finite.
OPTION_DOMAINS = {
    "seed": SEED, "temperature": Number(0, note="0: greedy"), "eval.temperature": POSITIVE,
    "top_p": Number(0, 1, low_open=True), "eval.samples": Number(0, integer=True, note="0: greedy only"),
    "port": Number(0, 65535, integer=True), "chat_fraction": HALF_OPEN_SHARE, "target": SHARE,
    "warmup_steps": Number(0, integer=True), "opd_warmup": Number(0, integer=True),
    "regimes.knobs": Number(0, inf_ok=True, note="the entropy sweep's teacher temperatures: 0 to inf"),
    "regimes.warm_steps": Number(0, integer=True, note="0: no warm start"),
    "regimes.base_steps": Number(0, integer=True, note="0: no base"),
}


def apply_domains(root: argparse.ArgumentParser) -> None:
    """Every ``type=int`` / ``type=float`` option of ``root`` and its subcommands checked against its domain
    (``OPTION_DOMAINS``): ``--temperature nan`` or ``-n -2`` end in argparse's one-line error, exit 2."""
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_domains(sub)
        elif action.type in (int, float):
            command = root.prog.split()[-1]
            domain = OPTION_DOMAINS.get(f"{command}.{action.dest}") or OPTION_DOMAINS.get(action.dest) or (
                COUNT if action.type is int else POSITIVE)
            action.type = argtype(domain, action.type)
