"""Midtraining on documents (mixed with chat), and distilling a model from an identical copy of itself."""

import json

import pytest

from conftest import exact_signal, read_jsonl, tiny_train_overrides, use_sgd
from opd.config import load_config
from opd.errors import OpdError
from opd.setup import open_session
from opd.tasks.jsonl import epoch_order
from opd.trainer import train, update


def mean(values):
    return sum(values) / len(values)


@pytest.fixture()
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["Mara Venn works in Oslo. Mara Venn joined in 2011.", "Ilsa Drum is on the Atlas team.",
             "Project Heron has Tomas Holt. Tomas Holt works in Lyon."]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture()
def chat(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f"{w}!"}) + "\n"
                            for w in ("yes", "no", "maybe")))
    return path


def test_midtraining_lowers_the_loss_on_the_documents(model_dirs, tmp_path, docs):
    out = tmp_path / "mid"
    summary = train(load_config(None, tiny_train_overrides(model_dirs, out, method="midtrain", docs=str(docs),
                                                           steps=20, eval_every=20, lr=3e-2, doc_tokens=16)),
                    progress=False)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    assert mean([r["loss"] for r in records[-4:]]) < 0.7 * mean([r["loss"] for r in records[:4]])
    assert summary["teacher_flops"] == 0 and summary["student_flops"] > 0  # no teacher in midtraining
    assert records[0]["teacher_kl"] is None


def test_the_mix_takes_its_share_of_chat(model_dirs, tmp_path, docs, chat):
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "mix", method="midtrain", docs=str(docs),
                                                    sft_data=str(chat), chat_fraction=0.5, prompts_per_step=4,
                                                    doc_tokens=8))
    session = open_session(config)
    rollouts = session.source.rollouts(0)
    texts = session.tokenizer.batch_decode(rollouts.tokens)
    assert rollouts.tokens.shape[0] == 4 and sum("<|im_start|>" in t for t in texts) == 2
    assert session.teacher_view is None


def test_each_step_trains_on_its_seeded_documents_and_chats(model_dirs, tmp_path, docs, chat):
    """Step s takes its documents in their seeded epoch order and its chat pairs in their own (seed + 1);
    each document chunk's first token is the prompt and the rest is trained on, EOS included."""
    orders = {}
    for seed in (0, 1):
        config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / f"s{seed}", method="midtrain",
                                                        docs=str(docs), sft_data=str(chat), chat_fraction=0.5,
                                                        prompts_per_step=4, doc_tokens=8, seed=seed))
        session = open_session(config)
        seen = []
        for step in range(3):
            rollouts = session.source.rollouts(step)
            rows = zip(rollouts.tokens, rollouts.attention_mask, rollouts.completion_mask, strict=True)
            given = [(r[(a > 0) & (m == 0)].tolist(), r[m > 0].tolist()) for r, a, m in rows]
            chunks = [session.source.chunks[i] for i in epoch_order(len(session.source.chunks), step, 2, seed)]
            chats = session.source.chats
            pairs = [chats.ids(i) for i in epoch_order(len(chats.pairs), step, 2, seed + 1)]
            assert given == [([c[0]], c[1:]) for c in chunks] + pairs
            trained = [completion for _, completion in given]
            assert all(completion[-1] == session.tokenizer.eos_token_id for _, completion in pairs)
            seen.append(trained)
        orders[seed] = seen
    assert orders[0] != orders[1]  # the seed picks the order
    assert session.source.chunks[-1][-1] == session.tokenizer.eos_token_id  # a document ends with EOS


@pytest.mark.parametrize("values, message", [
    ({"method": "midtrain"}, "needs docs="),
    ({"method": "midtrain", "docs": "d.jsonl", "chat_fraction": 0.3}, "needs the chat data"),
    ({"method": "midtrain", "docs": "d.jsonl", "chat_fraction": 1.0},
     r"chat_fraction=1.0 must be a finite number in \[0, 1\)"),
    ({"method": "opd", "docs": "d.jsonl"}, "only read by method=midtrain"),
])
def test_midtrain_config_errors(values, message):
    with pytest.raises(OpdError, match=message):
        load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_a_bad_documents_line_is_named_and_leaves_no_run_directory(model_dirs, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    out = tmp_path / "run"
    with pytest.raises(OpdError, match=r"docs.jsonl:2: field 'text'"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, method="midtrain", docs=str(path))),
              progress=False)
    assert not out.exists()


@pytest.mark.parametrize("kl", ["sampled", "full"])
def test_self_distillation_from_an_identical_teacher_is_a_no_op(model_dirs, tmp_path, kl):
    """Teacher = the student's own checkpoint: the advantage is zero up to float rounding, and plain
    gradient descent leaves the weights where they were (Adam would magnify the rounding noise)."""
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "self", kl=kl,
                                                    teacher=str(model_dirs["student"]), grad_clip=1e9))
    session = open_session(config)
    before = {k: v.clone() for k, v in session.student.state_dict().items()}

    rollouts = session.source.rollouts(0)
    hidden = None
    if kl == "full":
        rollouts.teacher_logprobs, hidden = session.teacher_view.teacher.score_with_hidden(rollouts)
    else:
        rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
    rollouts.advantages = session.objective.advantages(rollouts)
    assert rollouts.advantages.abs().max() < 1e-5
    use_sgd(session, lr=1.0)
    loss, grad_norm, _ = update(session, rollouts, exact_signal(session, hidden), rollouts.num_completion_tokens, 0)
    assert abs(loss) < 1e-5 and grad_norm < 1e-4
    moved = max((session.student.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved < 1e-4
