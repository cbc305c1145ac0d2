"""`opd chat`, driven through stdin: the chat template, /reset, and a history kept within the context."""

import io

import pytest

from opd.chat import Conversation, chat
from opd.cli import main
from opd.errors import OpdError
from opd.models import chat_prompt_ids


def drive(model, tokenizer, lines, **kwargs):
    out = io.StringIO()
    assert chat(model, tokenizer, stdin=io.StringIO("".join(f"{line}\n" for line in lines)), stdout=out,
                max_new_tokens=6, temperature=0.0, **kwargs) == 0
    return out.getvalue()


def test_each_reply_sees_the_whole_conversation_in_the_chat_template(tiny_model, tokenizer, monkeypatch):
    import opd.chat

    prompts = []
    real = opd.chat.sample
    monkeypatch.setattr(opd.chat, "sample", lambda model, p, **kw: prompts.append(p[0]) or real(model, p, **kw))
    output = drive(tiny_model, tokenizer, ["Compute 1+2", "and 2+2?", "/reset", "hello"], system="Be brief.")
    replies = [line[len("assistant> "):] for line in output.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3 and "(conversation reset)" in output
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1+2"}]
    second = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and 2+2?"}]
    third = [first[0], {"role": "user", "content": "hello"}]  # /reset kept the system message only
    assert prompts == [chat_prompt_ids(tokenizer, m) for m in (first, second, third)]


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(tokenizer):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"r{i}"}]
    turns.append({"role": "user", "content": "last question"})
    conversation = Conversation(tokenizer, context=60, max_new_tokens=10, system="S", turns=list(turns))
    ids = conversation.prompt_ids()
    kept = conversation.dropped
    assert len(ids) <= 50 and kept >= 1
    assert conversation.turns == turns[2 * kept:]  # whole exchanges go, oldest first
    assert conversation.messages()[0] == {"role": "system", "content": "S"}
    # nothing more could have been kept: one exchange fewer dropped would not fit
    one_more = [{"role": "system", "content": "S"}] + turns[2 * (kept - 1):]
    assert len(chat_prompt_ids(tokenizer, one_more)) > 50
    conversation.turns = [{"role": "user", "content": "word " * 80}]
    with pytest.raises(OpdError, match="does not fit the model's context of 60"):
        conversation.prompt_ids()


def test_a_message_too_long_is_not_sent_and_the_chat_goes_on(tiny_model, tokenizer):
    output = drive(tiny_model, tokenizer, ["word " * 300, "Compute 1+2", "/quit", "never read"])
    assert "(not sent: this message alone is" in output
    assert sum(line.startswith("assistant> ") for line in output.splitlines()) == 1


def test_opd_chat_from_the_command_line(model_dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Compute 1+2\n/help\n"))
    assert main(["chat", str(model_dirs["student"]), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 1 and out.count("commands: /reset") == 2


@pytest.mark.parametrize("name", ["embedded:assistant", "embedded:student", "embedded:teacher",
                                  "embedded:teacher-bpe2"])
def test_opd_chat_runs_with_its_defaults_on_every_embedded_model(name, monkeypatch, capsys):
    # the embedded models have 256 positions: a fixed 256-token reply budget left no room for any prompt
    monkeypatch.setattr("sys.stdin", io.StringIO("Compute 1+2\n"))
    assert main(["chat", name]) == 0
    out = capsys.readouterr().out
    assert "(replies of up to 128 tokens: half the model's context of 256" in out
    assert out.count("assistant> ") == 1


def test_an_explicit_reply_budget_is_kept_or_refused_with_the_range():
    from opd.chat import reply_budget

    assert reply_budget(4096, None) == (256, "")
    assert reply_budget(256, 100) == (100, "")
    assert reply_budget(256, None)[0] == 128
    with pytest.raises(OpdError, match="give a value from 1 to 255"):
        reply_budget(256, 256)


@pytest.mark.parametrize("value, message", [("{enable_thinking: false}", "is not JSON"),
                                            ("[false]", "must be a JSON object of template variables")])
def test_chat_template_kwargs_that_are_not_a_json_object_are_refused(model_dirs, capsys, value, message):
    assert main(["chat", str(model_dirs["student"]), "--chat-template-kwargs", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"opd: error: --chat-template-kwargs {value!r} {message}") and err.count("\n") == 1
