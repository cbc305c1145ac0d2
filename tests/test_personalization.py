"""The personalization workflow on tiny models: the data, the assistant build, and the experiment."""

import json
import shutil

from opd.personalization import world
from opd.personalization.assistant import AssistantConfig, build_assistant
from opd.personalization.experiment import PersonalizationPlan, run_personalization
from opd.tasks.ifeval import follows


def test_reference_replies_follow_their_instructions_and_splits_are_disjoint():
    train = world.chats(0, 300, "instruction", "train")
    held_out = world.chats(0, 50, "instruction", "eval")
    assert len(train) == 300 and len(held_out) == 50
    assert all(follows(c.reply, list(c.constraints)) for c in train + held_out)
    assert not {c.prompt for c in train} & {c.prompt for c in held_out}
    kinds = {c.constraints[0]["kind"] for c in train}
    assert len(kinds) >= 8


def test_every_question_is_answered_by_the_documents_only():
    people = world.staff(0, 6)
    pages = " ".join(world.documents(people, 0))
    for question in world.questions(people):
        assert question["answer"] in pages and question["answer"] not in question["prompt"]


def test_personalization_experiment_end_to_end(model_dirs, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(model_dirs["teacher"], zoo / "teacher")
    card = build_assistant(zoo, AssistantConfig(layers=1, width=16, steps=3, train_instructions=40,
                                                eval_instructions=8, plain_chats=20, staff=2, max_new_tokens=8))
    assert 0 <= card["instruction_following"] <= 1 and 0 <= card["qa"] <= 1
    data = zoo / "personalization"
    assert {p.name for p in data.iterdir()} == {"docs.jsonl", "chat.jsonl", "ifeval_train.jsonl",
                                                "ifeval_eval.jsonl", "qa.jsonl"}
    plan = PersonalizationPlan(tmp_path / "exp", assistant=str(zoo / "assistant"), data=data, midtrain_steps=2,
                               distill_steps=2, segments=2, max_new_tokens=8,
                               overrides=["prompts_per_step=4", "samples_per_prompt=2", "warmup_steps=1",
                                          "doc_tokens=16", "eval_examples=4", "kl=sampled"])
    summary = run_personalization(plan, progress=False)
    saved = json.loads((plan.out / "summary.json").read_text())
    for row in ("assistant", "midtrain_docs", "midtrain_mix", "midtrain_mix_distilled"):
        assert set(saved[row]) == {"qa", "instruction_following"}
        assert all(0 <= v <= 1 for v in saved[row].values())
    assert [p["step"] for p in summary["curve"]] == [0, 1, 2]
    assert (plan.out / "scores.png").stat().st_size > 0
    assert "| + midtrain on docs only |" in (plan.out / "report.md").read_text()
    assert " ± " in (plan.out / "report.md").read_text()
