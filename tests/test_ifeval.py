"""Every instruction-following constraint kind accepts and rejects hand-written responses; the QA
matcher normalises answers the way a reader would."""

import pytest

from opd.tasks.ifeval import KINDS, check, follows
from opd.tasks.jsonl import answer_matches, normalise

CASES = [  # (constraint, responses that satisfy it, responses that do not)
    ({"kind": "word_count", "relation": "exactly", "n": 3}, ["one two three", "It's a dog."], ["one two", "a b c d"]),
    ({"kind": "word_count", "relation": "at_most", "n": 2}, ["hi", "hi there"], ["hi there you"]),
    ({"kind": "word_count", "relation": "at_least", "n": 2}, ["hi there", "a b c"], ["hi"]),
    ({"kind": "sentence_count", "relation": "exactly", "n": 2}, ["I ran. You sat!", "Yes? No."],
     ["I ran.", "A. B. C."]),
    ({"kind": "include_word", "word": "blue"}, ["The sky is Blue.", "blue"], ["bluebird", "red"]),
    ({"kind": "forbid_word", "word": "blue"}, ["The sky is grey.", "bluebird"], ["so blue", "BLUE sky"]),
    ({"kind": "uppercase"}, ["HELLO THERE!", "OK 42"], ["Hello", "42"]),
    ({"kind": "lowercase"}, ["hello there", "ok, 42"], ["Hello", "..."]),
    ({"kind": "starts_with", "phrase": "Sure"}, ["Sure, here it is.", "  sure thing"], ["I am sure", "Surely"[1:]]),
    ({"kind": "ends_with", "phrase": "Done."}, ["All finished. Done.", "done.  "], ["Done. More", "Done"]),
    ({"kind": "bullet_list", "n": 2}, ["- apple\n- pear", "* a\n\n* b"], ["- apple", "- a\n- b\n- c", "apple\npear"]),
    ({"kind": "json", "keys": ["name"]}, ['{"name": "Ada"}', ' {"name": 1, "x": 2} '],
     ['{"nom": "Ada"}', "name: Ada", "[1, 2]"]),
    ({"kind": "json"}, ["{}"], ["{"]),
    ({"kind": "no_commas"}, ["a b c"], ["a, b"]),
]


def test_every_kind_is_covered():
    assert {case[0]["kind"] for case in CASES} == set(KINDS) and len(KINDS) >= 8


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c[0]["kind"] for c in CASES])
def test_constraint_accepts_and_rejects(constraint, good, bad):
    for response in good:
        assert check(response, constraint), (constraint, response)
    for response in bad:
        assert not check(response, constraint), (constraint, response)


def test_a_prompt_is_followed_only_when_every_constraint_holds():
    constraints = [{"kind": "uppercase"}, {"kind": "word_count", "relation": "exactly", "n": 2}]
    assert follows("BLUE SKY", constraints)
    assert not follows("BLUE SKY TODAY", constraints) and not follows("blue sky", constraints)


@pytest.mark.parametrize("text, expected", [
    ("  The  Answer, is: Paris! ", "answer is paris"),
    ("An apple a day", "apple day"),
    ("-3.5 degrees.", "-3.5 degrees"),
    ("state-of-the-art", "state of art"),
])
def test_normalise(text, expected):
    assert normalise(text) == expected


@pytest.mark.parametrize("completion, answer, correct", [
    ("Mara Venn founded it.", "Mara Venn", True),
    ("It was founded by the Mara Venn", "mara venn.", True),
    ("Answer: 1998", "1998", True),
    ("Answer: 12", "2", False),  # a whole-word match only
    ("Answer: -3", "3", False),  # the sign counts
    ("Mara Vennson", "Mara Venn", False),
    ("", "Mara Venn", False),
    ("anything", "", False),
])
def test_answer_matches(completion, answer, correct):
    assert answer_matches(completion, answer) is correct
