"""Multi-step integer arithmetic with a chain of thought, checked by a verifier.

A problem is an expression over single digits with ``+``, ``-`` and ``*`` (and parentheses where the
tree needs them), e.g. ``5+(2*3)-4``. The reference solution rewrites the expression one operation at a
time, always reducing the operation a person would do first (innermost, then by precedence, then
leftmost), so that the right answer needs the intermediate steps in the right order::

    = 5+6-4
    = 11-4
    = 7
    Answer: 7

Every intermediate value stays in [0, 99], so a step is at most a two-digit by one-digit operation.
The train and evaluation splits are disjoint by construction: a problem belongs to the evaluation split
exactly when a hash of its expression text falls in the evaluation bucket.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

Node = int | tuple[str, "Node", "Node"]

PRECEDENCE = {"+": 1, "-": 1, "*": 2}
MAX_VALUE = 99
EVAL_BUCKETS = 10  # one bucket in ten is the held-out split
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)\s*$")


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def evaluate(node: Node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    return apply(op, evaluate(left), evaluate(right))


def render(node: Node) -> str:
    """The expression with the fewest parentheses that still parses back to ``node``."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    # a right child of equal precedence needs parentheses: 8-(3-1) is not 8-3-1
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def reduce_once(node: Node) -> Node:
    """Replace the first operation a person would do (leftmost innermost) with its value."""
    if isinstance(node, int):
        return node
    op, left, right = node
    if isinstance(left, int) and isinstance(right, int):
        return apply(op, left, right)
    if not isinstance(left, int):
        return (op, reduce_once(left), right)
    return (op, left, reduce_once(right))


def values_in_range(node: Node) -> bool:
    if isinstance(node, int):
        return True
    _, left, right = node
    value = evaluate(node)
    return 0 <= value <= MAX_VALUE and values_in_range(left) and values_in_range(right)


def random_tree(rng: random.Random, operators: int) -> Node:
    if operators == 0:
        return rng.randint(0, 9)
    left_ops = rng.randint(0, operators - 1)
    op = rng.choice("+-*")
    return (op, random_tree(rng, left_ops), random_tree(rng, operators - 1 - left_ops))


def solution(node: Node) -> str:
    """The reference chain of thought and final answer for an expression tree."""
    lines = []
    while not isinstance(node, int):
        node = reduce_once(node)
        lines.append(f"= {render(node)}")
    lines.append(f"Answer: {node}")
    return "\n".join(lines)


RETRY = "retry"  # the marker a correcting teacher writes after a wrong line, before the right one


def wrong_line(rng: random.Random, correct: str) -> str:
    """A plausible mistake in a rewrite line: one number of ``correct`` (``= 11-4``) off by 1 to 3."""
    numbers = list(re.finditer(r"\d+", correct))
    pick = rng.choice(numbers)
    value = int(pick.group())
    wrong = max(0, value + rng.choice([-3, -2, -1, 1, 2, 3]))
    if wrong == value:
        wrong = value + 1
    return correct[: pick.start()] + str(wrong) + correct[pick.end():]


def solution_with_retries(node: Node, rng: random.Random, rate: float) -> list[tuple[str, bool]]:
    """The reference solution as (text, trained) segments, where before each rewrite line, with
    probability ``rate``, a wrong version of it is injected (not trained: a teacher learns to recover
    from mistakes, never to make them), followed by the retry marker and the right line (trained)::

        = 5+6-4
        = 12-4      <- injected, masked out of the loss
        retry
        = 11-4
        = 7
        Answer: 7

    Joined, the trained segments with the retry lines dropped are ``solution(node)``."""
    segments = []
    while not isinstance(node, int):
        node = reduce_once(node)
        line = f"= {render(node)}"
        if rng.random() < rate:
            segments.append((wrong_line(rng, line) + "\n", False))
            segments.append((f"{RETRY}\n", True))
        segments.append((line + "\n", True))
    segments.append((f"Answer: {node}", True))
    return segments


def is_eval_expression(expression: str) -> bool:
    digest = hashlib.sha256(expression.encode()).digest()
    return digest[0] % EVAL_BUCKETS == 0


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # the final answer the verifier expects
    solution: str  # the reference chain of thought (used to train the zoo's teacher)
    tree: Node = 0  # the expression (for traces other than the reference, e.g. with retries)


def make_tree(rng: random.Random, operators: int, split: str) -> Node:
    """Draw expression trees until one is valid and belongs to ``split`` ("train" or "eval")."""
    want_eval = split == "eval"
    while True:
        tree = random_tree(rng, operators)
        if values_in_range(tree) and is_eval_expression(render(tree)) == want_eval:
            return tree


def make_problem(rng: random.Random, operators: int, split: str) -> Problem:
    """Draw problems until one is valid and belongs to ``split`` ("train" or "eval")."""
    tree = make_tree(rng, operators, split)
    return Problem(f"Compute {render(tree)}", str(evaluate(tree)), solution(tree), tree)


def extract_answer(completion: str) -> str | None:
    """The integer after the last ``Answer:``, if the completion ends with one."""
    match = ANSWER_RE.search(completion.strip())
    return match.group(1) if match else None


def reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals ``answer``, else 0.0."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0
