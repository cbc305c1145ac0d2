"""Real model families end to end: tiny random-weight models of real architectures (Qwen3, Llama, GPT-OSS, Gemma 3,
Phi-3; built in-process from transformers configs, hidden size 32, one layer), each with its family's chat template
from the installed TRL and a tokenizer carrying the family's special tokens (``test_templates.family_tokenizer``),
saved as a checkpoint and opened as a run: a multi-turn tool conversation is sampled through opd's conversation path
(each turn stopped on the family's stop tokens) and one training step runs on it; a family whose template has no tool
role is refused with an ``OpdError`` before any compute, and every family runs a user's follow-up and a step."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_templates import family_tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.models import save_model
from opd.setup import open_session
from opd.tasks import ArithmeticTask
from opd.trainer import training_step

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (dev extra)")
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096}
FAMILIES = {  # template -> (model class, its config with the family's own fields)
    "qwen3_8": (Qwen3ForCausalLM, lambda: Qwen3Config(**SHAPE, tie_word_embeddings=True)),
    "llama3_1": (LlamaForCausalLM, lambda: LlamaConfig(**SHAPE)),
    "gptoss": (GptOssForCausalLM, lambda: GptOssConfig(**SHAPE, num_local_experts=2, num_experts_per_tok=1,
                                                       sliding_window=16, layer_types=["sliding_attention"])),
}
NO_TOOL_ROLE = {
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**SHAPE, sliding_window=16), "cannot render"),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**{**SHAPE, "num_key_value_heads": 2}, pad_token_id=0),
             "no tool role"),
}


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


class Calculator:
    """A tool environment for a random model, which writes no call: each conversation's first turn is answered
    with the calculator's result (the template is handed one call per result), the second ends it."""

    def __init__(self) -> None:
        from opd.environments import tool_schema

        self.tools = [tool_schema(add)]

    def start(self, example):
        return AnswerOnce({"role": "tool", "name": "add", "content": "42"})


class AnswerOnce:
    """A conversation whose first turn is answered with ``message``, the second ends it."""

    def __init__(self, message: dict) -> None:
        self.message, self.turns = message, 0

    def respond(self, reply: str):
        self.turns += 1
        return [self.message] if self.turns == 1 else None

    def reward(self):
        return float(self.turns)


def checkpoint(base, name: str, model_class, config, path, tokenizer=None):
    """A random ``model_class`` on the family's tokenizer (or ``tokenizer``), saved at ``path``; its stop tokens'
    logits raised at sampling time (``ending``) so that its turns end within a few tokens."""
    tokenizer = tokenizer or family_tokenizer(base, name)
    settings = config()
    settings.vocab_size, settings.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    settings.eos_token_id, settings.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    torch.manual_seed(0)
    save_model(model_class(settings), tokenizer, path)
    return path


def ending(session) -> None:
    """Raise the stop tokens' logits by 6 (about half the mass on 330 tokens) in every forward of the student."""
    from opd.samplers.turns import stop_ids

    stops = stop_ids(session.tokenizer, session.dialogue.environment)

    def raise_stops(module, inputs, output):
        output = output.clone()
        output[..., stops] += 6.0
        return output

    session.student.get_output_embeddings().register_forward_hook(raise_stops)


def run_overrides(path, out) -> list[str]:
    return tiny_train_overrides({"student": str(path), "teacher": "self"}, out, teacher="self", steps=1,
                                prompts_per_step=2, samples_per_prompt=1, max_new_tokens=12, max_turns=3,
                                max_trajectory_tokens=3000, eval_every=10, save_every=10, dtype="float32", device="cpu")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_tool_conversation_and_a_training_step_on_a_real_architecture(tokenizer, tmp_path, name):
    model_class, config = FAMILIES[name]
    path = checkpoint(tokenizer, name, model_class, config, tmp_path / "model")
    session = open_session(load_config(None, run_overrides(path, tmp_path / "run")), task=ArithmeticTask(2),
                           environment=Calculator())
    try:
        assert type(session.student).__name__ == model_class.__name__
        ending(session)
        rollouts = session.source.rollouts(0)
        assert rollouts.conversation["turns"] > rollouts.conversation["conversations"]  # a tool turn each, at least
        texts = [session.tokenizer.decode(row) for row in rollouts.tokens.tolist()]
        assert all("42" in text for text in texts)  # the calculator's result is in every row
        before = {k: v.clone() for k, v in session.student.state_dict().items()}
        record = training_step(session, 0)
        assert torch.isfinite(torch.tensor(record["loss"]))
        assert any(not torch.equal(v, before[k]) for k, v in session.student.state_dict().items())
    finally:
        session.close()


@pytest.mark.parametrize("name", sorted(NO_TOOL_ROLE))
def test_a_tool_turn_on_a_template_without_a_tool_role_is_refused(tokenizer, tmp_path, name):
    model_class, config, reason = NO_TOOL_ROLE[name]
    path = checkpoint(tokenizer, name, model_class, config, tmp_path / "model")
    with pytest.raises(OpdError, match=rf"the {name} chat template .*{reason}"):
        open_session(load_config(None, run_overrides(path, tmp_path / "run")), task=ArithmeticTask(2),
                     environment=Calculator())


class FollowUp:
    """A user who asks once more after the first reply; no tools."""

    tools = None

    def start(self, example):
        return AnswerOnce({"role": "user", "content": "Sure? opd-follow-up"})


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(NO_TOOL_ROLE))
def test_a_user_follow_up_and_a_training_step_on_every_architecture(tokenizer, tmp_path, name):
    """Gemma 3 and Phi-3, refused a tool turn, run a user's follow-up, as the others do (their turns stop on
    <end_of_turn> / <|end|>, not their EOS)."""
    model_class, config = (FAMILIES.get(name) or NO_TOOL_ROLE[name])[:2]
    path = checkpoint(tokenizer, name, model_class, config, tmp_path / "model")
    session = open_session(load_config(None, run_overrides(path, tmp_path / "run")), task=ArithmeticTask(2),
                           environment=FollowUp())
    try:
        ending(session)
        rollouts = session.source.rollouts(0)
        assert rollouts.conversation["turns"] > rollouts.conversation["conversations"]
        texts = [session.tokenizer.decode(row) for row in rollouts.tokens.tolist()]
        assert all("opd-follow-up" in text for text in texts)  # the follow-up is in every row
        record = training_step(session, 0)
        assert torch.isfinite(torch.tensor(record["loss"]))
    finally:
        session.close()


REAL_EOS = {"phi3": ("<|endoftext|>", "<|end|>"), "gemma3": ("<eos>", "<end_of_turn>")}  # EOS, the reply's end


def real_eos_checkpoint(base, name: str, path):
    """``checkpoint`` with the family's real EOS, which is not the token its template ends a reply with."""
    eos, _ = REAL_EOS[name]
    tokenizer = family_tokenizer(base, name)
    tokenizer.add_special_tokens({"eos_token": eos})
    model_class, config = NO_TOOL_ROLE[name][:2]
    return checkpoint(base, name, model_class, config, path, tokenizer)


def raise_token(model, token: int) -> None:
    """Make ``token`` the most likely next token everywhere (its logit raised by 50)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token] += 50.0
        return output

    model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("name", sorted(REAL_EOS))
def test_a_single_reply_stops_on_the_familys_turn_end_not_only_its_eos(tokenizer, tmp_path, name, monkeypatch,
                                                                       capsys):
    """Phi-3 ends a reply with <|end|> and Gemma 3 with <end_of_turn>, not their EOS (<|endoftext|>, <eos>): a plain
    run's rollouts, its evaluation, its SFT rows and `opd sample` stop there (they ran to max_new_tokens on the EOS
    alone)."""
    import opd.models
    import opd.samplers.local
    from opd.cli import main
    from opd.evaluation import evaluate
    from opd.samplers.sources import Prompter

    path = real_eos_checkpoint(tokenizer, name, tmp_path / "model")
    session = open_session(load_config(None, run_overrides(path, tmp_path / "run")), task=ArithmeticTask(2))
    try:
        end = session.tokenizer.convert_tokens_to_ids(REAL_EOS[name][1])
        assert end != session.tokenizer.eos_token_id
        raise_token(session.student, end)
        rollouts = session.source.rollouts(0)
        assert rollouts.completion_ids() == [[end]] * 2  # stopped on the first token
        examples = ArithmeticTask(2).eval_examples(3)
        result = evaluate(session.student, session.tokenizer, ArithmeticTask(2), examples, max_new_tokens=12)
        assert result.mean_completion_tokens == 1.0
        assert Prompter(session.tokenizer, 100).completion("4", 12)[-1] == end  # SFT's rows end as replies do
    finally:
        session.close()

    drawn, real_load, real_sample = [], opd.models.load_model, opd.samplers.local.sample

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        raise_token(model, end)
        return model

    def sample(model, prompts, **kwargs):
        rollouts = real_sample(model, prompts, **kwargs)
        drawn.append(rollouts.completion_ids())
        return rollouts

    monkeypatch.setattr(opd.models, "load_model", load_model)
    monkeypatch.setattr(opd.samplers.local, "sample", sample)
    assert main(["sample", str(path), "--prompt", "2+2?", "-n", "2", "--max-new-tokens", "6", "--device", "cpu",
                 "--chat-template-kwargs", "{}"]) == 0
    assert drawn == [[[end], [end]]] and capsys.readouterr().out.count("--- sample") == 2


@pytest.mark.parametrize("name", sorted(REAL_EOS))
def test_the_aligned_teacher_reads_the_familys_turn_end_as_the_end_of_the_reply(tokenizer, name):
    """A student reply that stopped on <|end|> / <end_of_turn> reaches a teacher of another tokenizer ending with
    the teacher's own reply end, the two ends paired as one chunk (as a reply stopped on the EOS is)."""
    from opd.teachers.view import TeacherView

    student = family_tokenizer(tokenizer, name)
    student.add_special_tokens({"eos_token": REAL_EOS[name][0]})
    end = student.convert_tokens_to_ids(REAL_EOS[name][1])
    view = TeacherView(None, student, tokenizer, path="aligned")
    text = student.encode("12+3=15", add_special_tokens=False)
    for stop in (end, student.eos_token_id):
        ids, alignment = view.translate(text + [stop])
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == "12+3=15"
        assert alignment.student[-1] == alignment.teacher[-1] == alignment.count - 1  # the ends, one chunk
    ids, _ = view.translate(text)  # cut short: no end
    assert tokenizer.decode(ids) == "12+3=15"


def test_opd_serve_ends_a_sample_on_the_familys_turn_end_as_on_its_eos(tokenizer, tmp_path):
    """A client of `opd serve` gets a Phi-3 sample ended on <|end|> (finish_reason "stop", stop_reason None: one of
    the model's end tokens, as vLLM stops on every EOS of a generation config), and the whole budget with
    ignore_eos."""
    from fastapi.testclient import TestClient

    from opd.models import load_model, load_tokenizer
    from opd.server import ServerConfig, create_app

    path = real_eos_checkpoint(tokenizer, "phi3", tmp_path / "model")
    served = load_tokenizer(path)
    end = served.convert_tokens_to_ids("<|end|>")
    model = load_model(path, torch.device("cpu"), torch.float32).eval()
    raise_token(model, end)
    app = create_app(model, served, ServerConfig(model_name="phi3", api_key=None, max_model_len=256,
                                                 max_body_bytes=64 * 1024))
    body = {"model": "phi3", "prompt": [[5, 6, 7]], "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    with TestClient(app) as client:
        (choice,) = client.post("/v1/completions", json=body).json()["choices"]
        assert choice["token_ids"] == [end] and choice["finish_reason"] == "stop" and choice["stop_reason"] is None
        (choice,) = client.post("/v1/completions", json=body | {"ignore_eos": True}).json()["choices"]
        assert choice["token_ids"] == [end] * 6 and choice["finish_reason"] == "length"
