"""Math answers graded as the field grades them: Hugging Face's ``math-verify`` (the verifier of
open-r1 and of TRL's accuracy reward), which extracts the final answer of a completion (``\\boxed{}``,
LaTeX, a plain number) and compares it with the gold answer symbolically, so that ``\\frac{1}{2}`` equals
``0.5`` and ``\\boxed{70}`` equals ``70`` where string equality fails either way."""

from __future__ import annotations

import functools

from opd.errors import OpdError


@functools.cache
def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise OpdError("verifier=math needs Hugging Face's math-verify: pip install 'opd[math]' "
                       "(or pip install math-verify)") from err
    return math_verify


def check_installed() -> None:
    """Fail before any compute when ``verifier=math`` cannot run."""
    _math_verify()


@functools.lru_cache(maxsize=4096)
def _gold(answer: str):
    return _math_verify().parse(answer)


def math_correct(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals ``answer`` mathematically (``math_verify.verify`` of
    the two parses; the completion's text after its last ``Answer:`` is read when it has one)."""
    verify = _math_verify()
    said = completion.rsplit("Answer:", 1)[1] if "Answer:" in completion else completion
    gold = _gold(answer)
    if not gold:
        return False
    return bool(verify.verify(gold, verify.parse(said)))
