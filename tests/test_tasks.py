import json
import random
import re

import pytest

from opd.errors import OpdError
from opd.tasks import ArithmeticTask, arithmetic
from opd.tasks.jsonl import JsonlTask, load_examples


def test_every_step_of_the_reference_solution_is_a_correct_reduction():
    rng = random.Random(0)
    for _ in range(300):
        problem = arithmetic.make_problem(rng, 3, "train")
        expression = problem.prompt.removeprefix("Compute ")
        value = eval(expression)  # independent check with Python's own parser
        steps = re.findall(r"^= (.+)$", problem.solution, re.M)
        assert len(steps) == 3  # one operation per step
        assert all(eval(step) == value for step in steps)
        assert steps[-1] == str(value) == problem.answer
        assert all(0 <= eval(s) <= 99 for s in steps)


def test_splits_are_disjoint_and_fixed():
    task = ArithmeticTask()
    held_out = {ex.messages[-1]["content"] for ex in task.eval_examples(300)}
    train = {ex.messages[-1]["content"] for step in range(20) for ex in task.train_examples(step, 50, 0)}
    assert not held_out & train
    assert [e.messages for e in task.eval_examples(5)] == [e.messages for e in ArithmeticTask().eval_examples(5)]
    assert task.train_examples(3, 4, 0) == task.train_examples(3, 4, 0)
    assert task.train_examples(3, 4, 0) != task.train_examples(4, 4, 0)


def test_verifier():
    assert arithmetic.reward("= 3\nAnswer: 42", "42") == 1.0
    assert arithmetic.reward("= 3\nAnswer: 42\n", "42") == 1.0
    assert arithmetic.reward("Answer: 41", "42") == 0.0
    assert arithmetic.reward("Answer: 42 and more", "42") == 0.0
    assert arithmetic.reward("42", "42") == 0.0


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_prompts_and_messages(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "What is 2+2?", "answer": 4}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Capital of France?"}], "answer": "Paris"}),
    ])
    examples = load_examples(path)
    assert examples[0].answer == "4" and examples[1].messages[0]["role"] == "system"
    task = JsonlTask(path, path)
    capital = examples[1]
    assert task.reward("It is\nAnswer: paris.", capital) == 1.0
    assert task.reward("Lyon", capital) == 0.0
    assert len(task.train_examples(0, 5, 0)) == 5  # wraps around the file


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "ok"', r"p.jsonl:2: not valid JSON"),
    ('["a list"]', r"p.jsonl:2: each line must be a JSON object"),
    ('{"question": "hi"}', r"p.jsonl:2: missing field 'prompt'"),
    ('{"prompt": ""}', r"p.jsonl:2: field 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"p.jsonl:2: field 'messages\[0\]'"),
    ('{"prompt": "x", "answer": [1]}', r"p.jsonl:2: field 'answer'"),
    ('{"prompt": "x", "constraints": []}', r"p.jsonl:2: field 'constraints' must be a non-empty list"),
    ('{"prompt": "x", "constraints": [{"kind": "shout"}]}', r"p.jsonl:2: field 'constraints\[0\]' must be"),
    ('{"prompt": "x", "constraints": [{"kind": "word_count", "n": 3}]}',
     r"p.jsonl:2: field 'constraints\[0\].relation'"),
    ('{"prompt": "x", "constraints": [{"kind": "bullet_list", "n": "3"}]}', r"p.jsonl:2: field 'constraints\[0\].n'"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": "fine"}), line])
    with pytest.raises(OpdError, match=message):
        load_examples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(OpdError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(OpdError, match="holds nothing"):
        load_examples(write(tmp_path / "empty.jsonl", [""]))


def test_arithmetic_k_sets_the_number_of_operators():
    from opd.config import TrainConfig
    from opd.errors import OpdError
    from opd.tasks.choose import make_task

    task = make_task(TrainConfig(task="arithmetic:5"))
    assert task.operators == 5 and task.name == "arithmetic:5"
    prompt = task.eval_examples(1)[0].messages[-1]["content"]
    assert sum(prompt.count(op) for op in "+-*") == 5
    for bad in ("arithmetic:0", "arithmetic:x", "arithmetic:13"):
        with pytest.raises(OpdError, match="arithmetic:K"):
            make_task(TrainConfig(task=bad))
