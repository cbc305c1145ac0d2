"""Two synthetic task kinds whose teacher is exact: the right next-character distribution is known for any
prefix, the student's invented ones included. Every state or node is one lowercase letter (one token of
``opd.regimes.vocab``); the prompt (the user message) determines the problem completely.

**Chain** (pointer chasing, horizon K). The successor table ``f`` is a random single cycle through the
first n letters (a permutation, so two different states never lead to the same state: one wrong state
makes every later one wrong). Prompt: the table, the start ``s0`` and K, e.g. ``a>c,b>d,c>b,d>a;a:3``
(``u>v`` means f(u) = v, listed in letter order; then ``;start:K``). Truth: ``s_i = f(s_{i-1})``. The
completion writes states one letter each, no separators, then EOS; the teacher's own path is
``s1 s2 ... sK`` (``cbd`` above). Reading a completion: a letter appends a state; in the recoverable arm
the marker ``!`` followed by a letter replaces the last state instead (``!`` must follow a letter).
Malformed: a character other than a table state (or ``!`` in the recoverable arm), ``!`` first or
twice in a row, more than K states. Reward: 1 iff well formed, no ``!`` left pending, exactly K states,
and the last one is ``s_K``. The arms differ in the teacher only where the student erred:

- ``fatal``: after states ``w_1..w_m`` the next state is ``f(w_m)`` (``w_0 = s0``), and EOS after K
  states: the teacher continues the student's chain, never mends it (``!`` is not in its language).
- ``recoverable``: if the last state ``w_m`` is wrong (``w_m != s_m``) the next character is ``!``,
  then ``s_m``; a right last state is followed by ``s_{m+1}`` (EOS after K right states).

**Paths** (teacher entropy). A random directed graph on n letters, out-degree d, no self-loops, in the
prompt as adjacency lists, then start, target and length L, e.g. ``a:bc,b:ac,c:ab;a>c:2``. The completion
is a walk's nodes after the start, ``v_1..v_L`` (revisits allowed), then EOS; any walk of exactly L
edges ending at the target earns 1. Each ordered pair of letters has a score ``score(u, v) ~ U[0, 1)``
fixed by the task's ``score_seed`` (shared by all problems, so a student can learn it), and the teacher
samples whole walks with ``p(walk) = exp(score(walk) / tau) / Z``, ``score(walk) = sum of its edges'
scores``. Its next-character marginals come from the dynamic programme over (node, steps left)::

    Z(u, 0) = [u == target],   Z(u, r) = sum_{v in out(u)} exp(score(u, v) / tau) * Z(v, r - 1)
    p(v | prefix ending at u, r steps left) = exp(score(u, v) / tau) * Z(v, r - 1) / Z(u, r)

``tau = inf`` is uniform over valid walks; ``tau = 0`` is the limit: the best continuation
``argmax_v score(u, v) + best(v, r - 1)``, ties to the earliest letter, so all mass sits on one walk and a
student off that walk is led along the best completion of its own prefix.

**Off the support** (a malformed prefix: a character that is no state or node, too many of them) the teacher
says EOS with probability 1: stop. A Paths student that is lost but well formed (a non-edge step, or a node
from which no walk of the remaining length reaches the target) is continued from the node it reached, as
the fatal chain continues a wrong state: the teacher finishes a walk of the remaining length as if any end
were allowed, ``p(v | u, r) = exp(score(u, v) / tau) * F(v, r - 1) / F(u, r)`` with ``F(u, 0) = 1`` (the
same programme, free end; ``tau = 0``: its best walk), then EOS after L steps. It never stops a walk
early: a teacher that did (this module's first version) taught the on-policy student to end its walks a
step short whenever it might be lost (docs/experiments.md).
The train and evaluation splits are disjoint by construction: a problem is held out exactly when a hash
of its prompt falls in the evaluation bucket (as in ``opd.tasks.arithmetic``).
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from opd.regimes.vocab import EOS
from opd.tasks import Example, step_rng

MARKER = "!"  # the recoverable chain's correction: "!" then the right state for the index just written
ARMS = ("fatal", "recoverable")
LETTERS = string.ascii_lowercase
EVAL_BUCKETS = 10  # one bucket in ten is the held-out split
OFF_SUPPORT: dict[str, float] = {EOS: 1.0}  # the teacher's distribution after a prefix it cannot continue
MAX_DRAWS = 10_000  # problem draws before giving up on a split (a setting with too few problems)


def is_eval_prompt(prompt: str) -> bool:
    """Whether the problem ``prompt`` states belongs to the held-out split: ``sha256(prompt)[0] % 10 == 0``."""
    return hashlib.sha256(prompt.encode()).digest()[0] % EVAL_BUCKETS == 0


def in_split(prompt: str, split: str) -> bool:
    return is_eval_prompt(prompt) == (split == "eval")


def certain(char: str) -> dict[str, float]:
    return {char: 1.0}


def roll_out(next_probs: Callable[[str], dict[str, float]], rng: random.Random | None = None,
             max_chars: int = 256) -> str:
    """The text a next-character distribution writes until EOS: greedy (the most likely character, ties to
    the first in sorted order) without ``rng``, sampled with it."""
    text = ""
    for _ in range(max_chars + 1):
        probs = sorted(next_probs(text).items(), key=lambda item: (-item[1], item[0]) if rng is None else item[0])
        char = probs[0][0] if rng is None else sample_key(probs, rng.random())
        if char == EOS:
            return text
        text += char
    raise RuntimeError(f"no EOS after {max_chars} characters: {text[:40]}...")


def sample_key(probs: list[tuple[str, float]], u: float) -> str:
    """The first key whose cumulative probability exceeds ``u`` (the last positive one if rounding leaves none)."""
    total = 0.0
    for key, p in probs:
        total += p
        if u < total:
            return key
    return [key for key, p in probs if p > 0][-1]


def distinct_held_out(draw: Callable[[random.Random], Example], seed: int, count: int,
                      exclude: list[Example]) -> list[Example]:
    """``count`` prompts ``draw`` makes from ``random.Random(seed)``, none of them in ``exclude``, no repeats
    (fewer when ``MAX_DRAWS + 10 * count`` draws do not find that many: a setting with few problems)."""
    taken = {ex.messages[-1]["content"] for ex in exclude}
    rng, out = random.Random(seed), []
    for _ in range(MAX_DRAWS + 10 * count):
        if len(out) == count:
            break
        example = draw(rng)
        if example.messages[-1]["content"] not in taken:
            taken.add(example.messages[-1]["content"])
            out.append(example)
    return out


# ---------------------------------------------------------------------------------------------- chain


@dataclass(frozen=True)
class Chain:
    successor: dict[str, str]  # f: state -> next state
    start: str
    hops: int

    @property
    def truth(self) -> str:
        """``s_1 .. s_K`` with ``s_i = f(s_{i-1})``, ``s_0 = start``."""
        states, state = [], self.start
        for _ in range(self.hops):
            state = self.successor[state]
            states.append(state)
        return "".join(states)


def chain_prompt(chain: Chain) -> str:
    table = ",".join(f"{state}>{chain.successor[state]}" for state in sorted(chain.successor))
    return f"{table};{chain.start}:{chain.hops}"


@lru_cache(maxsize=4096)
def parse_chain_prompt(prompt: str) -> Chain:
    """The problem ``chain_prompt`` wrote (ValueError when ``prompt`` is not one)."""
    table, _, rest = prompt.partition(";")
    start, _, hops = rest.partition(":")
    successor = dict(entry.split(">") for entry in table.split(","))
    if start not in successor or not hops.isdigit() or any(v not in successor for v in successor.values()):
        raise ValueError(f"not a chain prompt: {prompt!r}")
    return Chain(successor, start, int(hops))


def random_cycle(rng: random.Random, states: int) -> dict[str, str]:
    """A successor table that is one cycle through the first ``states`` letters (in a random order)."""
    order = list(LETTERS[:states])
    rng.shuffle(order)
    return {order[i]: order[(i + 1) % states] for i in range(states)}


def read_chain(text: str, states: dict[str, str], recoverable: bool) -> tuple[str, bool] | None:
    """The states ``text`` writes after corrections and whether a ``!`` awaits its state, or None when
    malformed (a character that is no state nor, in the recoverable arm, ``!``; ``!`` first or doubled)."""
    written, pending = "", False
    for char in text:
        if char == MARKER and recoverable and written and not pending:
            pending = True
        elif char in states and pending:
            written, pending = written[:-1] + char, False
        elif char in states:
            written += char
        else:
            return None
    return written, pending


def chain_next_probs(chain: Chain, prefix: str, recoverable: bool) -> dict[str, float]:
    """The exact teacher's next character after ``prefix`` (see the module docstring)."""
    read = read_chain(prefix, chain.successor, recoverable)
    if read is None or len(read[0]) > chain.hops:
        return OFF_SUPPORT
    written, pending = read
    m, truth = len(written), chain.truth
    if not recoverable:
        return certain(EOS) if m == chain.hops else certain(chain.successor[written[-1] if m else chain.start])
    if pending:
        return certain(truth[m - 1])
    if m and written[-1] != truth[m - 1]:
        return certain(MARKER)
    return certain(EOS) if m == chain.hops else certain(truth[m])


def chain_reward(chain: Chain, completion: str, recoverable: bool) -> float:
    """1.0 iff ``completion`` is well formed, has no pending ``!`` and writes (after corrections) exactly the true
    chain s_1..s_K. Every state is graded, not the last alone: the table is one cycle of N states, so
    s_K = s_0 whenever N divides K, and a final-state grade would pay a student that copies the start."""
    read = read_chain(completion, chain.successor, recoverable)
    if read is None:
        return 0.0
    written, pending = read
    return float(not pending and written == chain.truth)


class Splits:
    """The splits every regime task draws its problems from (``problem(rng, split)`` and ``example``): the
    training prompts of a step a pure function of (seed, step), the held-out ones fixed."""

    EVAL_SEED = 1234
    VALIDATION_SEED = 4321

    def train_examples(self, step: int, count: int, seed: int) -> list[Example]:
        rng = step_rng(seed, step)
        return [self.example(self.problem(rng, "train")) for _ in range(count)]

    def eval_examples(self, count: int) -> list[Example]:
        rng = random.Random(self.EVAL_SEED)
        return [self.example(self.problem(rng, "eval")) for _ in range(count)]

    def validation_examples(self, count: int, exclude: list[Example]) -> list[Example]:
        """Held-out prompts disjoint from ``exclude`` (as ``ArithmeticTask.validation_examples``)."""
        return distinct_held_out(lambda rng: self.example(self.problem(rng, "eval")), self.VALIDATION_SEED,
                                 count, exclude)


class ChainTask(Splits):
    """Pointer chasing over ``states`` letters for ``hops`` steps; ``arm`` is "fatal" or "recoverable"."""

    def __init__(self, hops: int = 6, states: int = 8, arm: str = "fatal") -> None:
        if arm not in ARMS or not 2 <= states <= len(LETTERS) or not 1 <= hops:
            raise ValueError(f"chain task: arm in {ARMS}, 2 <= states <= 26, hops >= 1 (got {arm}, {states}, {hops})")
        self.hops, self.states, self.arm = hops, states, arm
        self.recoverable = arm == "recoverable"
        self.name = f"chain-{arm}-k{hops}-n{states}"
        self.noise_tokens = LETTERS[:states]  # sample_noise replaces a character by a state drawn uniformly

    def problem(self, rng: random.Random, split: str) -> Chain:
        for _ in range(MAX_DRAWS):
            successor = random_cycle(rng, self.states)
            chain = Chain(successor, rng.choice(sorted(successor)), self.hops)
            if in_split(chain_prompt(chain), split):
                return chain
        raise ValueError(f"{self.name}: no {split} problem in {MAX_DRAWS} draws")

    @staticmethod
    def example(chain: Chain) -> Example:
        return Example([{"role": "user", "content": chain_prompt(chain)}], chain.truth[-1], completion=chain.truth)

    def next_char_probs(self, prompt: str, prefix: str) -> dict[str, float]:
        return chain_next_probs(parse_chain_prompt(prompt), prefix, self.recoverable)

    def reward(self, completion: str, example: Example) -> float:
        return chain_reward(parse_chain_prompt(example.messages[-1]["content"]), completion, self.recoverable)


# ---------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Graph:
    out: dict[str, str]  # node -> its out-neighbours, in letter order
    start: str
    target: str
    length: int


def paths_prompt(graph: Graph) -> str:
    lists = ",".join(f"{node}:{graph.out[node]}" for node in sorted(graph.out))
    return f"{lists};{graph.start}>{graph.target}:{graph.length}"


@lru_cache(maxsize=4096)
def parse_paths_prompt(prompt: str) -> Graph:
    """The problem ``paths_prompt`` wrote (ValueError when ``prompt`` is not one)."""
    lists, _, rest = prompt.partition(";")
    ends, _, length = rest.partition(":")
    start, _, target = ends.partition(">")
    out = dict(entry.split(":") for entry in lists.split(","))
    nodes = set(out)
    if start not in nodes or target not in nodes or not length.isdigit() or any(set(v) - nodes for v in out.values()):
        raise ValueError(f"not a paths prompt: {prompt!r}")
    return Graph(out, start, target, int(length))


def edge_scores(score_seed: int) -> dict[tuple[str, str], float]:
    """``score(u, v) ~ U[0, 1)`` for every ordered pair of letters, a function of ``score_seed`` alone."""
    rng = random.Random(f"paths-scores/{score_seed}")
    return {(u, v): rng.random() for u in LETTERS for v in LETTERS}


def walk_counts(graph: Graph) -> list[dict[str, int]]:
    """``N[r][u]``: walks of exactly r edges from u to the target: ``N[0][u] = [u == target]``,
    ``N[r][u] = sum_{v in out(u)} N[r-1][v]``."""
    counts = [{u: int(u == graph.target) for u in graph.out}]
    for _ in range(graph.length):
        counts.append({u: sum(counts[-1][v] for v in graph.out[u]) for u in graph.out})
    return counts


def log_partition(graph: Graph, scores: dict[tuple[str, str], float], tau: float,
                  free: bool = False) -> list[dict[str, float]]:
    """``log Z(u, r)`` (module docstring) in log space: ``logsumexp_v score(u, v) / tau + log Z(v, r - 1)``;
    ``-inf`` where no walk exists. For ``tau = inf`` the exponent is 0 and Z counts walks. ``free``: walks
    that may end anywhere (``log F``: ``F(u, 0) = 1``), the teacher's continuation of a lost student."""
    table = [{u: 0.0 if free or u == graph.target else -math.inf for u in graph.out}]
    for _ in range(graph.length):
        previous = table[-1]
        table.append({u: logsumexp([edge_weight(scores[u, v], tau) + previous[v] for v in graph.out[u]])
                      for u in graph.out})
    return table


def best_scores(graph: Graph, scores: dict[tuple[str, str], float], free: bool = False) -> list[dict[str, float]]:
    """``best(u, r)``: the highest score of a walk of r edges from u to the target (``-inf`` if none):
    ``best(u, 0) = 0 if u == target``, ``best(u, r) = max_v score(u, v) + best(v, r - 1)``; ``free``: of any
    walk of r edges from u (``best(u, 0) = 0`` for every u)."""
    table = [{u: 0.0 if free or u == graph.target else -math.inf for u in graph.out}]
    for _ in range(graph.length):
        previous = table[-1]
        table.append({u: max(scores[u, v] + previous[v] for v in graph.out[u]) for u in graph.out})
    return table


def edge_weight(score: float, tau: float) -> float:
    """``score / tau``, 0 for ``tau = inf``."""
    return 0.0 if math.isinf(tau) else score / tau


def logsumexp(values: list[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


@dataclass(frozen=True)
class PathsSolver:
    """One problem's dynamic programme for one tau: the exact teacher's conditionals."""

    graph: Graph
    scores: dict[tuple[str, str], float]
    tau: float
    counts: list[dict[str, int]]
    table: list[dict[str, float]]  # best(u, r) for tau = 0, log Z(u, r) otherwise: walks to the target
    free: list[dict[str, float]]  # the same over walks that end anywhere: a lost student's continuation

    @classmethod
    def build(cls, graph: Graph, scores: dict[tuple[str, str], float], tau: float) -> PathsSolver:
        def tables(free: bool) -> list[dict[str, float]]:
            return best_scores(graph, scores, free) if tau == 0 else log_partition(graph, scores, tau, free)

        return cls(graph, scores, tau, walk_counts(graph), tables(False), tables(True))

    def walk(self, prefix: str) -> tuple[str, bool] | None:
        """The node ``prefix`` has walked to, taking each letter as the next node (a non-edge step too: the
        teacher goes on from where the student is), and whether it is still on a walk to the target (every step
        an edge, the target reachable in the steps left); None when it is malformed: a letter that is no node, or
        more than L of them."""
        if len(prefix) > self.graph.length:
            return None
        node, edges = self.graph.start, True
        for char in prefix:
            if char not in self.graph.out:
                return None
            edges, node = edges and char in self.graph.out[node], char
        return node, edges and self.counts[self.graph.length - len(prefix)][node] > 0

    def next_probs(self, prefix: str) -> dict[str, float]:
        walked = self.walk(prefix)
        if walked is None:
            return OFF_SUPPORT
        node, on_path = walked
        left = self.graph.length - len(prefix)
        if left == 0:
            return certain(EOS)  # a walk of L steps ends here, on the target or not
        if on_path:
            table, steps = self.table, [v for v in self.graph.out[node] if self.counts[left - 1][v] > 0]
        else:  # lost: finish a walk of the remaining length, any end (module docstring)
            table, steps = self.free, list(self.graph.out[node])
        if self.tau == 0:
            return certain(max(steps, key=lambda v: (self.scores[node, v] + table[left - 1][v], -ord(v))))
        logits = [edge_weight(self.scores[node, v], self.tau) + table[left - 1][v] for v in steps]
        norm = logsumexp(logits)
        weights = [math.exp(x - norm) for x in logits]
        total = math.fsum(weights)
        return {v: w / total for v, w in zip(steps, weights, strict=True)}


@lru_cache(maxsize=4096)
def paths_solver(prompt: str, tau: float, score_seed: int) -> PathsSolver:
    return PathsSolver.build(parse_paths_prompt(prompt), edge_scores(score_seed), tau)


def random_graph(rng: random.Random, nodes: int, degree: int, length: int) -> Graph:
    """Each of the first ``nodes`` letters gets ``degree`` distinct out-neighbours (not itself); start and
    target uniform."""
    letters = LETTERS[:nodes]
    out = {u: "".join(sorted(rng.sample([v for v in letters if v != u], degree))) for u in letters}
    return Graph(out, rng.choice(letters), rng.choice(letters), length)


def is_walk(graph: Graph, completion: str) -> bool:
    """Whether ``completion`` is ``v_1..v_L``: L nodes, each an out-neighbour of the one before
    (``v_0 = start``), ending on the target."""
    node = graph.start
    for char in completion:
        if char not in graph.out.get(node, ""):
            return False
        node = char
    return len(completion) == graph.length and node == graph.target


class PathsTask(Splits):
    """Walks of ``length`` edges on random graphs of ``nodes`` letters and out-degree ``degree``; the exact
    teacher's temperature ``tau`` in [0, inf] sets its entropy; every problem has >= ``min_paths`` walks."""

    def __init__(self, length: int = 4, nodes: int = 8, degree: int = 3, tau: float = 1.0, score_seed: int = 0,
                 min_paths: int = 2) -> None:
        if not (1 <= degree < nodes <= len(LETTERS)) or length < 1 or not tau >= 0:
            raise ValueError(f"paths task: 1 <= degree < nodes <= 26, length >= 1, tau >= 0 "
                             f"(got {degree}, {nodes}, {length}, {tau})")
        self.length, self.nodes, self.degree, self.tau = length, nodes, degree, float(tau)
        self.score_seed, self.min_paths = score_seed, min_paths
        self.name = f"paths-l{length}-n{nodes}-d{degree}-tau{self.tau:g}"
        self.noise_tokens = LETTERS[:nodes]  # sample_noise replaces a character by a node drawn uniformly

    def solver(self, prompt: str) -> PathsSolver:
        return paths_solver(prompt, self.tau, self.score_seed)

    def problem(self, rng: random.Random, split: str) -> Graph:
        for _ in range(MAX_DRAWS):
            graph = random_graph(rng, self.nodes, self.degree, self.length)
            if walk_counts(graph)[-1][graph.start] >= self.min_paths and in_split(paths_prompt(graph), split):
                return graph
        raise ValueError(f"{self.name}: no {split} problem with >= {self.min_paths} walks in {MAX_DRAWS} draws")

    def example(self, graph: Graph) -> Example:
        prompt = paths_prompt(graph)
        greedy = roll_out(self.solver(prompt).next_probs)
        return Example([{"role": "user", "content": prompt}], greedy, completion=greedy)

    def next_char_probs(self, prompt: str, prefix: str) -> dict[str, float]:
        return self.solver(prompt).next_probs(prefix)

    def reward(self, completion: str, example: Example) -> float:
        """1.0 for any walk of exactly L edges from the start to the target, whatever its score."""
        return float(is_walk(parse_paths_prompt(example.messages[-1]["content"]), completion))

    def walk_probs(self, example: Example) -> dict[str, float]:
        """The teacher's probability of every valid walk: the product of its next-character probabilities."""
        solver = self.solver(example.messages[-1]["content"])
        walks = {"": 1.0}
        for _ in range(self.length):
            walks = {w + v: p * q for w, p in walks.items() for v, q in solver.next_probs(w).items() if q > 0}
        return walks

    def teacher_entropy(self, example: Example) -> float:
        """The entropy of the teacher's walk distribution in nats: ``-sum_w p(w) log p(w)``."""
        return 0.0 - math.fsum(p * math.log(p) for p in self.walk_probs(example).values() if p > 0)

    def path_diversity(self, completions: list[str], example: Example) -> float:
        """Distinct valid walks / valid completions among ``completions`` of ``example`` (0.0 if none is valid)."""
        valid = [c for c in completions if self.reward(c, example)]
        return len(set(valid)) / len(valid) if valid else 0.0
