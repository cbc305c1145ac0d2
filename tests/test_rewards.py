"""Each completion's task reward is its own prompt's: on every path that attaches rewards (the student's
samples, the teacher's for sft and seq_kd, GKD's mix, a rollout server's samples), with several samples
per prompt, so that rewards paired with another prompt's samples (``[ex for _ in n for ex in examples]``
in place of ``[ex for ex in examples for _ in n]``) fail."""

from __future__ import annotations

import pytest
import torch

from conftest import LiveServer, tiny_train_overrides
from opd.config import load_config
from opd.evaluation import completions_text
from opd.setup import open_session


class PairRegistry:
    """A reward that names what it was given: a distinct number for each (completion, prompt) pair."""

    def __init__(self):
        self.codes: dict[tuple[str, str], float] = {}

    def __call__(self, completion, example) -> float:
        return self.codes.setdefault((completion, example.messages[-1]["content"]), float(len(self.codes)))


def assert_each_row_rewarded_for_its_own_prompt(session, rollouts, registry):
    # which prompt a row answers, read off its own tokens (not its prompt_index): the prompt part of the row
    rows = rollouts.tokens.shape[0]
    prompts = [rollouts.tokens[i][(rollouts.attention_mask[i] > 0) & (rollouts.completion_mask[i] == 0)].tolist()
               for i in range(rows)]
    step_examples = {tuple(session.prompt_ids(messages)): messages for messages in rollouts.messages}
    assert len(step_examples) >= 2, "the step must hold several prompts for a pairing to be wrong"
    texts = completions_text(session.tokenizer, rollouts.completion_ids())
    for i in range(rows):
        messages = step_examples[tuple(prompts[i])]
        assert rollouts.messages[i] == messages, f"row {i} answers another conversation"
        assert rollouts.rewards[i].item() == registry.codes[(texts[i], messages[-1]["content"])], f"row {i}"


@pytest.mark.parametrize("extra", [
    {"method": "rl"},
    {"method": "opd+rl"},
    {"method": "sft"},  # the teacher samples samples_per_prompt completions of each prompt
    {"method": "opd", "lmbda": 0.0, "seq_kd": "true", "kl": "full"},  # every row off-policy, the teacher's samples
    {"method": "opd", "lmbda": 0.5, "seq_kd": "true", "kl": "full"},  # GKD's mix: the student's rows, the teacher's
], ids=["rl", "opd+rl", "sft", "seq_kd", "lmbda-mix"])
def test_every_row_is_rewarded_for_its_own_prompt(model_dirs, tmp_path, extra):
    registry = PairRegistry()
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", samples_per_prompt=3,
                                                    temperature=1.0, **extra))
    session = open_session(config, reward=registry)
    rollouts = session.source.rollouts(1)
    assert rollouts.tokens.shape[0] >= 6
    assert_each_row_rewarded_for_its_own_prompt(session, rollouts, registry)


def test_a_rollout_servers_rows_are_rewarded_for_their_own_prompts(model_dirs, tmp_path):
    registry = PairRegistry()
    with LiveServer(model_dirs["student"]) as live:
        config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", samples_per_prompt=3,
                                                        method="rl") + [f"sampler={live.url}"])
        session = open_session(config, reward=registry)
        rollouts = session.source.rollouts(1)
    assert rollouts.tokens.shape[0] == 12 and torch.equal(rollouts.prompt_index,
                                                          torch.arange(4).repeat_interleave(3))
    assert_each_row_rewarded_for_its_own_prompt(session, rollouts, registry)
