"""opd as a library: the docs' Python example as written, a user's task and reward from Python and by
import path (also under torchrun), their errors, and the math verifier."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import opd
from conftest import read_jsonl, tiny_train_overrides
from opd.cli import main
from opd.config import load_config
from opd.tasks.jsonl import JsonlTask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the examples package
from examples.custom_task import ShortSums  # noqa: E402
from examples.rewards import brevity  # noqa: E402


def test_the_docs_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    page = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "brevity on held-out prompts:" in printed and "arithmetic: greedy " in printed
    assert (tmp_path / "runs" / "python-rl" / "final" / "config.json").is_file()


def first_and_last_rewards(run: Path) -> tuple[float, float]:
    rewards = [r["train_reward"] for r in read_jsonl(run / "metrics.jsonl")[1:]]
    return sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2


RL = {"method": "rl", "lr": 1e-3, "warmup_steps": 1, "steps": 6, "prompts_per_step": 16, "eval_every": 6,
      "eval_examples": 8, "eval_samples": 0}


def test_a_reward_from_python_and_by_import_path_trains_rl_and_rises(tmp_path, monkeypatch, capsys):
    summary = opd.train(reward=brevity, out=str(tmp_path / "python"), progress=False, **RL)
    first, last = first_and_last_rewards(tmp_path / "python")
    assert last > first + 0.2, (first, last)
    assert json.loads((tmp_path / "python" / "config.json").read_text())["reward"] == \
        "python:examples.rewards.brevity"
    assert summary["final"] == str(tmp_path / "python" / "final")
    monkeypatch.chdir(ROOT)  # the command line imports from the working directory
    args = [f"{k}={v}" for k, v in RL.items()] + ["reward=examples.rewards:brevity", f"out={tmp_path / 'cli'}"]
    assert main(["train", "--quiet", *args]) == 0
    assert first_and_last_rewards(tmp_path / "cli") == (first, last)  # the same run, step for step
    with pytest.raises(opd.OpdError, match="this run's reward was a Python function; pass it again"):
        opd.train(resume=tmp_path / "python", **{**RL, "steps": 8}, progress=False)
    opd.train(resume=tmp_path / "python", reward=brevity, **{**RL, "steps": 8}, progress=False)
    assert read_jsonl(tmp_path / "python" / "metrics.jsonl")[-1]["step"] == 8
    capsys.readouterr()


def test_a_task_of_ones_own_from_python_and_by_import_path(tmp_path, monkeypatch, capsys):
    calls = []

    def counting(completion, example):
        calls.append(completion)
        return 1.0

    summary = opd.train(task=ShortSums(), reward=counting, steps=2, prompts_per_step=4, samples_per_prompt=2,
                        eval_every=2, eval_examples=4, eval_samples=0, out=str(tmp_path / "own"), progress=False)
    # each sampled completion scored once: 2 steps x 4 x 2, plus the evaluations (student twice, teacher once)
    assert len(calls) == 2 * 4 * 2 + 3 * 4
    assert summary["student_accuracy_after"] == 1.0
    monkeypatch.chdir(ROOT)
    assert main(["train", "--quiet", "task=examples.custom_task:ShortSums", "steps=1", "prompts_per_step=4",
                 "eval_examples=4", "eval_samples=0", f"out={tmp_path / 'cli'}"]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["steps"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("bad, message", [
    (lambda c, e: 1 / 0, r"the reward .* raised ZeroDivisionError: division by zero\n  prompt: 'Compute .*'\n"
                         r"  completion: '.*'"),
    (lambda c, e: "1.0", r"the reward .* returned '1.0', not a finite number\n  prompt: 'Compute "),
    (lambda c, e: math.nan, r"returned nan, not a finite number"),
])
def test_a_reward_that_fails_stops_the_run_naming_the_prompt_and_completion(model_dirs, tmp_path, bad, message):
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run"))
    with pytest.raises(opd.OpdError, match=message):
        opd.train(config, reward=bad, method="rl", progress=False)


def test_bad_import_paths_and_verifier_choices_are_refused_before_any_compute(model_dirs, tmp_path):
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run")
    for extra, message in (("task=no_such_module:Task", r"task=no_such_module:Task: cannot import module"),
                           ("reward=examples.rewards:nothing", "has no attribute 'nothing'"),
                           ("verifier=math", "verifier=math grades a prompts file")):
        with pytest.raises(opd.OpdError, match=message):
            opd.train(load_config(None, [*overrides, extra]), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("answer, completion, exact, math_", [
    ("0.5", "= 1/2\nAnswer: \\frac{1}{2}", 0.0, 1.0),  # exact match rejects a right answer
    ("70", "the total is \\boxed{70.0}", 0.0, 1.0),
    ("\\frac{1}{2}", "Answer: 0.5", 0.0, 1.0),
    ("2", "Answer: 2/3", 1.0, 0.0),  # exact match accepts a wrong one ("2" as a whole word of "2 3")
    ("42", "Answer: 41", 0.0, 0.0),
    ("42", "= 6*7\nAnswer: 42", 1.0, 1.0),
])
def test_the_math_verifier_against_exact_match(tmp_path, answer, completion, exact, math_):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "q", "answer": answer}) + "\n")
    plain, mathy = JsonlTask(prompts, prompts), JsonlTask(prompts, prompts, "math")
    example = plain.eval_examples(1)[0]
    assert (plain.reward(completion, example), mathy.reward(completion, example)) == (exact, math_)


def test_verifier_ifeval_needs_constraints_on_every_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    with pytest.raises(opd.OpdError, match="has no 'constraints', which verifier=ifeval grades by"):
        JsonlTask(prompts, None, "ifeval")


USER_CODE = '''
import os, random
import opd

class Sums:
    name = "sums"
    def train_examples(self, step, count, seed):
        rng = random.Random(f"{seed}/{step}")
        return [opd.Example([{"role": "user", "content": f"Compute {rng.randrange(10)}+1"}], "1") for _ in range(count)]
    def eval_examples(self, count):
        return [opd.Example([{"role": "user", "content": "Compute 1+1"}], "2")] * count
    def reward(self, completion, example):
        return 0.0

def reward(completion, example):
    with open(os.path.join(os.environ["COUNT_DIR"], f"rank{os.environ.get('RANK', '0')}.txt"), "a") as out:
        out.write("x")  # one mark per call
    return float(len(completion) % 2)
'''


def test_a_users_task_and_reward_run_on_every_rank_under_torchrun(model_dirs, tmp_path):
    (tmp_path / "user_code.py").write_text(USER_CODE)
    out = tmp_path / "run"
    overrides = tiny_train_overrides(model_dirs, out, steps=2, eval_every=2, eval_examples=2, eval_samples=0,
                                     method="opd+rl", task="user_code:Sums", reward="user_code:reward")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "COUNT_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "opd", "train", "--nproc", "2", "--quiet", *overrides],
                            capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert len(rank1) == 2 * (4 // 2) * 2  # rank 1 scores its half of every step's completions, once each
    assert len((tmp_path / "rank0.txt").read_text()) > len(rank1)  # rank 0 also evaluates
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]


def test_opd_evaluate_is_the_evaluation_of_a_run_with_its_defaults(model_dirs, tokenizer, tmp_path):
    import torch

    from opd.evaluation import evaluate as internal
    from opd.models import load_model
    from opd.tasks import ArithmeticTask
    from opd.teachers import LocalTeacher, TeacherView

    cpu = torch.device("cpu")
    student, teacher = (load_model(model_dirs[n], cpu, torch.float32) for n in ("student", "teacher"))
    held_out = ArithmeticTask().eval_examples(256)
    view = TeacherView(LocalTeacher(teacher, len(tokenizer)), tokenizer, tokenizer)
    want = internal(student, tokenizer, ArithmeticTask(), held_out, max_new_tokens=48, teacher=view, seed=0)
    got = opd.evaluate(model_dirs["student"], teacher=model_dirs["teacher"])
    assert got == want and got.examples == 256 and got.sampled_accuracy is None
    want = internal(student, tokenizer, ArithmeticTask(), held_out[:8], max_new_tokens=48, seed=0, samples=2,
                    sample_temperature=1.0)
    assert opd.evaluate(model_dirs["student"], examples=8, samples=2) == want
    # a prompts file as the task (its own held-out prompts), a Python task, and a reward in place of the verifier
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Compute {i}+0", "answer": f"\\frac{{{2 * i}}}{{2}}"}) + "\n"
                               for i in range(3)))
    assert opd.evaluate(model_dirs["student"], str(prompts), verifier="math").examples == 3
    assert opd.evaluate(model_dirs["student"], ShortSums(), examples=4, reward=lambda c, e: 1.0).accuracy == 1.0
    assert opd.evaluate(model_dirs["student"], "arithmetic", eval_file=str(prompts), examples=2).examples == 2
    for bad in ({"samples": -1}, {"temperature": 0.0}, {"temperature": float("nan")}, {"examples": 0}):
        (name, value), = bad.items()
        with pytest.raises(opd.OpdError, match=rf"^opd.evaluate argument {name}={value!r} must be "):
            opd.evaluate(model_dirs["student"], **bad)


def test_train_from_a_toml_file_with_the_default_run_name_and_task_record(model_dirs, tmp_path, monkeypatch, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f"student = {json.dumps(str(model_dirs['student']))}\n"
                    f"teacher = {json.dumps(str(model_dirs['teacher']))}\n")
    monkeypatch.chdir(tmp_path)
    summary = opd.train(toml, task=ShortSums(), steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                        eval_examples=2, eval_samples=0, progress=False)
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == Path("runs") and re.fullmatch(r"\d{8}-\d{6}-opd", run_dir.name)
    assert summary["final"] == str(run_dir / "final") and (run_dir / "final" / "config.json").is_file()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task"] == "python:examples.custom_task.ShortSums" and saved["student"] == str(model_dirs["student"])
    with pytest.raises(opd.OpdError, match=r"^unknown config field\(s\) stepz, warmup; `opd train --help` lists"):
        opd.train(stepz=1, warmup=2)
    capsys.readouterr()


def test_user_tasks_pass_on_their_arguments_and_name_themselves(tmp_path):
    from opd.tasks import ArithmeticTask
    from opd.tasks.custom import UserTask

    wrapped = UserTask(ShortSums())
    assert wrapped.name == "short-sums"
    assert wrapped.train_examples(3, 4, 7) == ShortSums().train_examples(3, 4, 7) != wrapped.train_examples(3, 4, 8)
    assert wrapped.train_examples(3, 4, 7) != wrapped.train_examples(2, 4, 7)
    assert UserTask(ArithmeticTask(), brevity).validation_examples(2, []) == ArithmeticTask().validation_examples(2, [])
    example = ShortSums.example(1, 2)

    class Nameless:  # a task without a name attribute: named by its class
        train_examples, eval_examples = ShortSums.train_examples, ShortSums.eval_examples

        def reward(self, completion, example):
            raise KeyError("x")

    with pytest.raises(opd.OpdError, match=r"^the reward of task Nameless raised KeyError: 'x'\n"):
        UserTask(Nameless()).reward("= 3", example)
    with pytest.raises(opd.OpdError, match=r"^the reward brevity returned None"):
        UserTask(ShortSums(), lambda c, e: None, "brevity").reward("= 3", example)
    with pytest.raises(opd.OpdError, match=r"^the reward test_user_tasks_pass_on_their_arguments_and_name_themselves"
                                           r"\.<locals>\.<lambda> returned 'x'"):
        UserTask(ShortSums(), lambda c, e: "x").reward("= 3", example)
    assert UserTask(ShortSums(), lambda c, e: True).reward("", example) == 1.0  # a bool counts as 0/1


FACTORIES = '''
from examples.custom_task import ShortSums
instance = ShortSums()
def factory():
    return ShortSums()
class Holder:
    Nested = ShortSums
not_a_task = 3
def score(completion, example):
    return 0.5
'''


def test_import_paths_resolve_classes_factories_instances_and_nested_names(tmp_path, monkeypatch):
    from opd.tasks.custom import load_object, load_reward, load_task

    (tmp_path / "user_tasks_mod.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for spec in ("user_tasks_mod:instance", "user_tasks_mod:factory", "user_tasks_mod:Holder.Nested",
                 "examples.custom_task:ShortSums"):
        task = load_task(spec)
        assert isinstance(task, ShortSums), spec
    assert load_object("user_tasks_mod:score", "reward")("", None) == 0.5 and sys.path[0] == str(tmp_path)
    with pytest.raises(opd.OpdError, match=r"^task=user_tasks_mod:not_a_task: a task needs the methods "
                                           r"train_examples, eval_examples and reward \(the opd.Task protocol\); "
                                           r"int lacks train_examples, eval_examples, reward$"):
        load_task("user_tasks_mod:not_a_task")
    with pytest.raises(opd.OpdError, match=r"^reward=user_tasks_mod:not_a_task is a int, not a function"):
        load_reward("user_tasks_mod:not_a_task")
    with pytest.raises(opd.OpdError, match=r"^reward=user_tasks_mod:nothing: module 'user_tasks_mod' has no "
                                           r"attribute 'nothing'$"):
        load_reward("user_tasks_mod:nothing")
    with pytest.raises(opd.OpdError, match=r"^reward=no_module_here:f: cannot import module 'no_module_here' "
                                           r".*; is it on PYTHONPATH or in the working directory\?$"):
        load_reward("no_module_here:f")


def test_the_math_verifier_reads_the_text_after_the_last_answer_marker():
    from opd.tasks.math import math_correct

    assert math_correct("\\boxed{3} was my first try.\nAnswer: 4", "4")  # the boxed 3 is not the final answer
    assert not math_correct("Answer: 4", "")  # an empty gold answer parses to nothing: never correct


def test_opd_evaluate_passes_on_every_setting(model_dirs, cross_dirs, tokenizer, other_tokenizer, tmp_path):
    import torch

    from opd.evaluation import evaluate as internal
    from opd.models import load_model
    from opd.tasks import ArithmeticTask
    from opd.tasks.custom import UserTask
    from opd.teachers import LocalTeacher, TeacherView

    cpu = torch.device("cpu")
    student = load_model(model_dirs["student"], cpu, torch.float32)

    def parity(completion, example):  # a reward the random tiny student scores on, so that settings show
        return float(len(completion) % 2)

    task = UserTask(ArithmeticTask(), parity)
    held_out = task.eval_examples(6)
    want = internal(student, tokenizer, task, held_out, max_new_tokens=7, seed=3, samples=3, sample_temperature=0.5)
    got = opd.evaluate(model_dirs["student"], reward=parity, examples=6, max_new_tokens=7, seed=3, samples=3,
                       temperature=0.5)
    assert got == want and 0 < got.sampled_accuracy < 1
    teacher = LocalTeacher(load_model(cross_dirs["teacher"], cpu, torch.float32), len(other_tokenizer))
    for template in ("auto", "student"):
        view = TeacherView(teacher, tokenizer, other_tokenizer, template)
        want = internal(student, tokenizer, ArithmeticTask(), held_out, max_new_tokens=48, teacher=view, seed=0)
        assert opd.evaluate(model_dirs["student"], examples=6, teacher=cross_dirs["teacher"],
                            teacher_template=template) == want

    class TwoPrompts(ShortSums):
        def eval_examples(self, count):
            return super().eval_examples(min(count, 2))

    assert opd.evaluate(model_dirs["student"], TwoPrompts(), examples=5).examples == 2
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Compute {i}+0", "answer": str(i)}) + "\n" for i in range(3)))
    assert opd.evaluate(model_dirs["student"], "arithmetic", eval_file=str(prompts), examples=10).examples == 3
