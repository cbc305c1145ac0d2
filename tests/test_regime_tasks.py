"""The regime tasks' exact teacher (opd.regimes): distributions, grading, splits, the character tokenizer.

The truths here come from the test's own reading of the prompt (``truth_chain``, ``brute_walks``), not
from the code under test.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from opd.models import EMBEDDED_DIR
from opd.regimes.exact import EOS, ExactTeacher, next_char_probs, reference_completion
from opd.regimes.tasks import MARKER, ChainTask, PathsTask, edge_scores, is_eval_prompt
from opd.regimes.vocab import ALPHABET, CHAT_TEMPLATE, char_tokenizer, save_tokenizer

ARMS = ("fatal", "recoverable")
INF = math.inf


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def prompt_of(example) -> str:
    return example.messages[-1]["content"]


def truth_chain(prompt: str) -> tuple[dict[str, str], str]:
    """The successor table and the true states s_1..s_K, read from the prompt by the test itself."""
    table, start, hops = re.fullmatch(r"((?:\w>\w,?)+);(\w):(\d+)", prompt).groups()
    successor = dict(re.findall(r"(\w)>(\w)", table))
    states, state = "", start
    for _ in range(int(hops)):
        state = successor[state]
        states += state
    return successor, states


def shifted(letter: str, letters: str) -> str:
    """The off-by-one: the next letter of ``letters`` (cyclically)."""
    return letters[(letters.index(letter) + 1) % len(letters)]


def assert_distribution(dist: dict[str, float], allowed: set[str]) -> None:
    assert set(dist) <= allowed, dist
    assert all(p >= 0 for p in dist.values()), dist
    assert math.fsum(dist.values()) == pytest.approx(1.0, abs=1e-12), dist


def sequence_prob(task, prompt: str, text: str) -> float:
    """The teacher's probability of the whole completion ``text`` then EOS, from its conditionals (float64)."""
    return continuation_prob(task, prompt, "", text)


def continuation_prob(task, prompt: str, prefix: str, text: str) -> float:
    """The teacher's probability of writing ``text`` then EOS after ``prefix`` (float64)."""
    prob = 1.0
    for i, char in enumerate([*text, EOS]):
        prob *= next_char_probs(task, prompt, prefix + text[:i]).get(char, 0.0)
    return prob


def brute_walks(prompt: str) -> tuple[str, list[str]]:
    """All sequences of L letters that are walks start -> target along the prompt's edges (brute force)."""
    lists, start, target, length = re.fullmatch(r"(.+);(\w)>(\w):(\d+)", prompt).groups()
    out = dict(entry.split(":") for entry in lists.split(","))
    walks = []
    for seq in itertools.product(sorted(out), repeat=int(length)):
        steps = zip((start, *seq[:-1]), seq, strict=True)
        if seq[-1] == target and all(v in out[u] for u, v in steps):
            walks.append("".join(seq))
    return start, walks


def walk_score(start: str, walk: str, scores) -> float:
    return math.fsum(scores[u, v] for u, v in zip(start + walk[:-1], walk, strict=True))


# ---------------------------------------------------------------------------------------------- tokenizer


def test_every_character_is_one_token_and_decodes_back(tokenizer, tmp_path):
    for char in ALPHABET:
        ids = tokenizer.encode(char, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, char
        assert tokenizer.decode(ids) == char
    text = ALPHABET + " , ;\n" + ALPHABET[::-1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert len(set(tokenizer.encode(ALPHABET, add_special_tokens=False))) == len(ALPHABET)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1
    assert tokenizer.encode("A", add_special_tokens=False) == [tokenizer.unk_token_id]

    # the ChatML turns of the project's embedded models, and a saved copy that loads back the same
    messages = [{"role": "user", "content": "a>b,b>a;a:2"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\na>b,b>a;a:2<|im_end|>\n<|im_start|>assistant\n"
    embedded = AutoTokenizer.from_pretrained(str(EMBEDDED_DIR / "student"))
    assert rendered == embedded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.decode(ids) == rendered
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode(rendered, add_special_tokens=False) == ids and loaded.chat_template == CHAT_TEMPLATE
    assert loaded.decode(ids) == rendered and len(loaded) == len(tokenizer)


# ---------------------------------------------------------------------------------------------- chain


@pytest.mark.parametrize("arm", ARMS)
def test_chain_distribution_sums_to_one_on_every_prefix(arm):
    task = ChainTask(hops=3, states=4, arm=arm)
    prompt = prompt_of(task.train_examples(0, 1, seed=0)[0])
    allowed = set("abcd") | {EOS} | ({MARKER} if arm == "recoverable" else set())
    for length in range(6):
        for prefix in itertools.product("abcd!x", repeat=length):
            assert_distribution(next_char_probs(task, prompt, "".join(prefix)), allowed)


@pytest.mark.parametrize("arm", ARMS)
def test_the_teachers_own_chain_is_certain_and_scores_one(arm):
    task = ChainTask(hops=5, states=8, arm=arm)
    for example in task.train_examples(0, 20, seed=1):
        prompt = prompt_of(example)
        _, truth = truth_chain(prompt)
        path = reference_completion(task, example)
        assert path == truth == example.completion and example.answer == truth[-1] and MARKER not in path
        assert task.reward(path, example) == 1.0
        for i in range(len(path)):
            assert next_char_probs(task, prompt, path[:i]) == {path[i]: 1.0}
        assert next_char_probs(task, prompt, path) == {EOS: 1.0}
        assert reference_completion(task, example, random.Random(0)) == path  # sampling a certain teacher


@pytest.mark.parametrize("arm", ARMS)
def test_an_off_by_one_successor_is_caught(arm):
    task = ChainTask(hops=5, states=8, arm=arm)
    letters = "abcdefgh"
    for example in task.train_examples(1, 20, seed=1):
        prompt = prompt_of(example)
        successor, truth = truth_chain(prompt)
        start = prompt.split(";")[1][0]
        # a solver that reads the row below: s_i = f(next letter of s_{i-1})
        buggy, state = "", start
        for _ in range(len(truth)):
            state = successor[shifted(state, letters)]
            buggy += state
        first = next(i for i, (a, b) in enumerate(zip(buggy, truth, strict=True)) if a != b)
        assert next_char_probs(task, prompt, buggy[:first]).get(buggy[first], 0.0) == 0.0
        assert sequence_prob(task, prompt, buggy) == 0.0
        # the last state off by one: never a right answer
        last_wrong = truth[:-1] + shifted(truth[-1], letters)
        assert task.reward(last_wrong, example) == 0.0
        assert next_char_probs(task, prompt, truth[:-1]).get(last_wrong[-1], 0.0) == 0.0


def test_fatal_and_recoverable_differ_exactly_as_specified():
    fatal, recoverable = ChainTask(hops=5, states=8, arm="fatal"), ChainTask(hops=5, states=8, arm="recoverable")
    letters = "abcdefgh"
    for example in fatal.train_examples(2, 10, seed=3):
        prompt = prompt_of(example)
        successor, truth = truth_chain(prompt)
        for j in range(len(truth)):  # the state at index j+1 written wrong
            wrong = shifted(truth[j], letters)
            prefix = truth[:j] + wrong
            # fatal: continue from the wrong state; the answer is then wrong (f is a permutation)
            after = successor[wrong] if j < len(truth) - 1 else EOS
            assert next_char_probs(fatal, prompt, prefix) == {after: 1.0}
            fatal_tail, state = "", wrong
            for _ in range(len(truth) - j - 1):
                state = successor[state]
                fatal_tail += state
            for i, char in enumerate(fatal_tail):
                assert next_char_probs(fatal, prompt, prefix + fatal_tail[:i]) == {char: 1.0}
            assert next_char_probs(fatal, prompt, prefix + fatal_tail) == {EOS: 1.0}
            assert fatal.reward(prefix + fatal_tail, example) == 0.0
            assert next_char_probs(fatal, prompt, prefix + MARKER) == {EOS: 1.0}  # "!" is off its support
            # recoverable: "!" then the right state, then the chain goes on; the answer is right
            assert next_char_probs(recoverable, prompt, prefix) == {MARKER: 1.0}
            assert next_char_probs(recoverable, prompt, prefix + MARKER) == {truth[j]: 1.0}
            assert next_char_probs(recoverable, prompt, prefix + MARKER + wrong) == {MARKER: 1.0}  # mended wrong
            mended = prefix + MARKER + truth[j:]
            for i in range(len(prefix), len(mended)):
                assert next_char_probs(recoverable, prompt, mended[:i]) == {mended[i]: 1.0}
            assert next_char_probs(recoverable, prompt, mended) == {EOS: 1.0}
            assert recoverable.reward(mended, example) == 1.0
            assert fatal.reward(mended, example) == 0.0  # no "!" in the fatal arm's language
            assert recoverable.reward(prefix + fatal_tail, example) == 0.0
        # on the teacher's path both arms say the same
        for i in range(len(truth) + 1):
            assert next_char_probs(fatal, prompt, truth[:i]) == next_char_probs(recoverable, prompt, truth[:i])


@pytest.mark.parametrize("arm", ARMS)
def test_the_chain_grade_reads_every_state(arm):
    task = ChainTask(hops=4, states=6, arm=arm)
    example = task.eval_examples(1)[0]
    _, truth = truth_chain(prompt_of(example))
    other = shifted(truth[1], "abcdef")
    assert task.reward(truth, example) == 1.0
    assert task.reward(truth[0] + other + truth[2:], example) == 0.0  # a wrong middle state: wrong
    mended = truth[0] + other + MARKER + truth[1] + truth[2:]  # the same state corrected
    assert task.reward(mended, example) == float(arm == "recoverable")
    for bad in ("", truth[:-1], truth + truth[-1], truth + MARKER, MARKER + truth, truth + " ", truth.upper(),
                truth[:-1] + "z", truth[:2] + "!!" + truth[2:]):
        assert task.reward(bad, example) == 0.0, bad
    marked = truth[:2] + MARKER + truth[1] + truth[2:]  # a "correction" of a right state: 5 writes, 4 states
    assert task.reward(marked, example) == float(arm == "recoverable")


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("tau", [0.0, 0.5, INF])
def test_paths_distribution_sums_to_one_on_every_prefix(tau):
    task = PathsTask(length=3, nodes=4, degree=2, tau=tau)
    for example in task.eval_examples(2):
        prompt = prompt_of(example)
        for length in range(5):
            for prefix in itertools.product("abcd!", repeat=length):
                assert_distribution(next_char_probs(task, prompt, "".join(prefix)), set("abcd") | {EOS})
        assert next_char_probs(task, prompt, "!") == {EOS: 1.0}  # malformed: stop
        assert next_char_probs(task, prompt, "abcd") == {EOS: 1.0}  # longer than L: stop


def test_tau_sets_the_teachers_walk_distribution_exactly():
    """Against brute-force enumeration of all L-letter sequences: uniform at tau=inf, Boltzmann at tau, one
    best walk at tau=0; no mass on anything that is not a walk."""
    scores = edge_scores(0)
    for example in PathsTask(length=3, nodes=5, degree=2, tau=INF, min_paths=3).eval_examples(4):
        prompt = prompt_of(example)
        start, walks = brute_walks(prompt)
        assert len(walks) >= 3
        nodes = sorted(set(prompt.split(";")[0].replace(":", "").replace(",", "")))
        everything = ["".join(seq) for seq in itertools.product(nodes, repeat=3)]
        grader = PathsTask(length=3, nodes=5, degree=2)
        assert [seq for seq in everything if grader.reward(seq, example)] == walks  # non-edges, wrong ends: 0
        for tau in (INF, 0.7, 0.0):
            task = PathsTask(length=3, nodes=5, degree=2, tau=tau, min_paths=3)
            probs = {seq: sequence_prob(task, prompt, seq) for seq in everything}
            assert math.fsum(probs.values()) == pytest.approx(1.0, abs=1e-12)
            assert all(probs[seq] == 0.0 for seq in everything if seq not in walks)
            if tau == INF:
                assert all(probs[w] == pytest.approx(1 / len(walks), abs=1e-12) for w in walks)
            elif tau > 0:
                norm = math.fsum(math.exp(walk_score(start, w, scores) / tau) for w in walks)
                for w in walks:
                    assert probs[w] == pytest.approx(math.exp(walk_score(start, w, scores) / tau) / norm, rel=1e-9)
            else:
                (best,) = [w for w in walks if probs[w] > 0]
                assert probs[best] == pytest.approx(1.0, abs=1e-12)
                top = max(walk_score(start, w, scores) for w in walks)
                assert walk_score(start, best, scores) == pytest.approx(top, abs=1e-12)
                assert task.reward(reference_completion(task, example), example) == 1.0
            assert task.walk_probs(example) == pytest.approx({w: probs[w] for w in walks if probs[w] > 0})


def test_tau_zero_writes_one_walk_and_tau_inf_many():
    rng = random.Random(0)
    cold, hot = PathsTask(tau=0.0), PathsTask(tau=INF)
    example = cold.eval_examples(1)[0]
    cold_samples = [reference_completion(cold, example, rng) for _ in range(40)]
    hot_samples = [reference_completion(hot, example, rng) for _ in range(40)]
    assert len(set(cold_samples)) == 1 and cold.path_diversity(cold_samples, example) == 1 / 40
    assert cold.teacher_entropy(example) == 0.0
    assert all(hot.reward(s, example) == 1.0 for s in hot_samples)
    assert hot.path_diversity(hot_samples, example) > 0.1
    _, walks = brute_walks(prompt_of(example))
    assert hot.teacher_entropy(example) == pytest.approx(math.log(len(walks)), abs=1e-12)
    assert 0 < PathsTask(tau=1.0).teacher_entropy(example) < math.log(len(walks))
    assert hot.path_diversity(["", "zz"], example) == 0.0
    assert hot.path_diversity([walks[0], walks[0], walks[-1], "x"], example) == len({walks[0], walks[-1]}) / 3


def test_paths_off_by_one_and_non_edges_are_caught():
    task = PathsTask(tau=1.0)
    for example in task.eval_examples(10):
        prompt = prompt_of(example)
        walk = reference_completion(task, example, random.Random(1))
        assert task.reward(walk, example) == 1.0
        last_wrong = walk[:-1] + shifted(walk[-1], "abcdefgh")
        assert task.reward(last_wrong, example) == 0.0 and sequence_prob(task, prompt, last_wrong) == 0.0
        for bad in (walk[:-1], walk + walk[-1], walk + "!", "", walk.upper()):
            assert task.reward(bad, example) == 0.0, bad
        _, walks = brute_walks(prompt)
        assert all(task.reward(w, example) == 1.0 for w in walks)


def test_a_lost_walker_is_continued_to_length_l_never_stopped():
    """Off the target's walks (a wrong turn, a non-edge step) the teacher finishes a walk of the remaining
    length from the student's node, free end, as the brute force over every continuation says: Boltzmann
    over the free walks at tau, uniform at inf, the best one at 0; never EOS before L letters."""
    scores = edge_scores(0)
    for tau in (INF, 0.7, 0.0):
        task = PathsTask(length=4, nodes=5, degree=2, tau=tau, min_paths=2)
        lost_seen = 0
        for example in task.eval_examples(3):
            prompt = prompt_of(example)
            _, walks = brute_walks(prompt)
            lists, _, _ = prompt.partition(";")
            out = dict(entry.split(":") for entry in lists.split(","))
            for cut in range(1, 4):
                for prefix in ("".join(seq) for seq in itertools.product(sorted(out), repeat=cut)):
                    if any(w.startswith(prefix) for w in walks):
                        continue  # on a walk to the target: the tests above
                    lost_seen += 1
                    node, left = prefix[-1], 4 - cut
                    free = ["".join(seq) for seq in itertools.product(sorted(out), repeat=left)
                            if all(v in out[u] for u, v in zip((node, *seq[:-1]), seq, strict=True))]
                    probs = {w: continuation_prob(task, prompt, prefix, w) for w in free}
                    for i in range(left):
                        assert EOS not in next_char_probs(task, prompt, prefix + free[0][:i])  # never stops early
                    given = math.fsum(probs.values())
                    assert given == pytest.approx(1.0, abs=1e-12), (prefix, tau)
                    if tau == INF:
                        assert all(p == pytest.approx(1 / len(free), abs=1e-12) for p in probs.values())
                    elif tau > 0:
                        norm = math.fsum(math.exp(walk_score(node, w, scores) / tau) for w in free)
                        for w in free:
                            assert probs[w] == pytest.approx(math.exp(walk_score(node, w, scores) / tau) / norm,
                                                             rel=1e-9)
                    else:
                        (best,) = [w for w in free if probs[w] > 0]
                        assert walk_score(node, best, scores) == pytest.approx(
                            max(walk_score(node, w, scores) for w in free), abs=1e-12)
        assert lost_seen > 10


# ---------------------------------------------------------------------------------------------- exact teacher


@pytest.mark.parametrize("task", [ChainTask(arm="fatal"), ChainTask(arm="recoverable"), PathsTask(tau=0.5)],
                         ids=["fatal", "recoverable", "paths"])
def test_floored_logprobs_are_finite_and_normalised(tokenizer, task):
    epsilon = 0.01
    teacher = ExactTeacher(task, tokenizer, epsilon)
    vocab = len(tokenizer)
    example = task.eval_examples(1)[0]
    prompt = prompt_of(example)
    path = reference_completion(task, example)
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    for text, tail in ((path, special[:2]), ("z!" + path, special), (path[:1] + "!", [tokenizer.unk_token_id, 5])):
        ids = tokenizer.encode(text, add_special_tokens=False) + tail
        logprobs = teacher.logprobs(prompt, ids)
        assert logprobs.shape == (len(ids), vocab) and logprobs.dtype == torch.float32
        assert torch.isfinite(logprobs).all()
        assert torch.allclose(logprobs.logsumexp(-1), torch.zeros(len(ids)), atol=1e-5)
        assert logprobs.min() >= math.log(epsilon / vocab) - 1e-5
        for t in range(len(ids)):
            prefix = tokenizer.decode(ids[:t])
            if any(i in special or i == tokenizer.unk_token_id for i in ids[:t]):
                dist = {EOS: 1.0}  # after a token that is no character: off the support
            else:
                dist = next_char_probs(task, prompt, prefix)
            expected = torch.full((vocab,), epsilon / vocab, dtype=torch.float64)
            for key, p in dist.items():
                expected[tokenizer.convert_tokens_to_ids(key)] += (1 - epsilon) * p
            assert torch.allclose(logprobs[t].double().exp(), expected, atol=1e-6)
    # the teacher's own path with EOS: every token near-certain
    ids = tokenizer.encode(path, add_special_tokens=False) + [tokenizer.eos_token_id]
    if not isinstance(task, PathsTask):
        chosen = teacher.logprobs(prompt, ids).gather(1, torch.tensor(ids)[:, None]).exp()
        assert torch.allclose(chosen, torch.full_like(chosen, 1 - epsilon + epsilon / vocab))


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("task", [ChainTask(arm="fatal"), ChainTask(hops=3, states=4, arm="recoverable"),
                                  PathsTask(length=3, nodes=5, degree=2)], ids=["chain", "small-chain", "paths"])
def test_splits_are_disjoint_and_training_data_is_a_function_of_seed_and_step(task):
    """Also for a setting so small (24 chains) that the held-out split has only a few distinct problems."""
    train = {prompt_of(e) for step in range(20) for e in task.train_examples(step, 16, seed=0)}
    held_out = [prompt_of(e) for e in task.eval_examples(100)]
    assert not train & set(held_out)
    assert all(is_eval_prompt(p) for p in held_out) and not any(is_eval_prompt(p) for p in train)
    assert task.eval_examples(100) == task.eval_examples(100) and task.eval_examples(7) == task.eval_examples(100)[:7]
    assert task.train_examples(3, 8, seed=7) == task.train_examples(3, 8, seed=7)
    assert task.train_examples(3, 8, seed=7) != task.train_examples(4, 8, seed=7)
    assert task.train_examples(3, 8, seed=7) != task.train_examples(3, 8, seed=8)
    reported = {prompt_of(e) for e in task.eval_examples(5)}
    validation = [prompt_of(e) for e in task.validation_examples(10, exclude=task.eval_examples(5))]
    assert all(is_eval_prompt(p) for p in validation) and not set(validation) & reported
    assert len(set(validation)) == len(validation) == (10 if len(held_out) == len(set(held_out)) else len(validation))


def test_settings_are_checked_and_named():
    assert ChainTask(hops=6, states=8, arm="recoverable").name == "chain-recoverable-k6-n8"
    assert PathsTask(length=4, nodes=8, degree=3, tau=INF).name == "paths-l4-n8-d3-tauinf"
    for bad in (lambda: ChainTask(arm="soft"), lambda: ChainTask(states=27), lambda: PathsTask(tau=-1.0),
                lambda: PathsTask(nodes=3, degree=3)):
        with pytest.raises(ValueError):
            bad()


def test_copying_the_start_is_no_answer_when_the_cycle_divides_the_chain():
    """One cycle of N states: s_K = s_0 whenever N divides K. A student that writes any K states ending on the
    start must not be paid (the final-state grade did, and a one-layer student found it)."""
    task = ChainTask(hops=8, states=4, arm="fatal")
    example = task.eval_examples(1)[0]
    _, truth = truth_chain(prompt_of(example))
    start = prompt_of(example).split(";")[1][0]
    assert truth[-1] == start and task.reward(truth, example) == 1.0
    assert task.reward(start * 8, example) == 0.0
