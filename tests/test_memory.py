"""What keeps long sequences in memory (gradient checkpointing; #29) changes the memory, never the
gradient: each setting against the same update with it off, for every objective."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_train_overrides, unequal_batch
from opd.config import load_config
from opd.setup import open_session

OBJECTIVES = {"sampled": {"kl": "sampled"}, "full": {"kl": "full"}, "topk": {"kl": "topk", "teacher_topk": 5},
              "jsd": {"kl": "full", "divergence": "jsd", "beta": 0.3}, "sft": {"method": "sft"},
              "opd+rl": {"method": "opd+rl", "kl": "sampled"}, "lora": {"kl": "full", "lora_rank": 4}}


def gradient(session, batch, calls: list[int] | None = None) -> torch.Tensor:
    """The loss's gradient on ``batch`` through the trainer's own pieces: the teacher's part the objective
    asks for, the advantages, and the wrapped loss module (what ``update`` backpropagates). ``calls``: a
    counter that is reset between the forward and the backward pass."""
    objective, view, signal = session.objective, session.teacher_view, None
    needs = objective.teacher_needs
    if needs != "nothing":
        messages = [[{"role": "user", "content": "unused on the shared path"}]] * batch.tokens.shape[0]
        graded = view.score(batch, messages, hidden=needs == "distribution", topk=5 if needs == "topk" else 0)
        batch.teacher_logprobs = graded.logprobs
        signal = objective.signal(graded, view.head if needs == "distribution" else None)
    batch.advantages = objective.advantages(batch)
    session.student.train()
    session.student.zero_grad(set_to_none=True)
    loss = session.loss_module(batch, batch.num_completion_tokens, signal)
    if calls is not None:
        calls[0] = 0  # from here on, the backward pass's forwards only
    loss.backward()
    return torch.cat([p.grad.flatten() for p in session.trainable])


def layer_forwards(session) -> list[int]:
    """A counter of the first decoder layer's MLP forward calls, inside the checkpointed layer (a forward
    hook would not see the recompute: torch runs it without hooks)."""
    calls = [0]
    mlp = session.student.get_decoder().layers[0].mlp
    real = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    mlp.forward = counted
    return calls


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradient(peaked_teacher, tmp_path, name):
    grads, forwards = {}, {}
    for on in (False, True):
        config = load_config(None, tiny_train_overrides(peaked_teacher, tmp_path / str(on), samples_per_prompt=3,
                                                        gradient_checkpointing=str(on).lower(), **OBJECTIVES[name]))
        session = open_session(config)
        batch = unequal_batch(session)
        calls = layer_forwards(session)
        grads[on] = gradient(session, batch, calls)
        forwards[on] = calls[0]
        session.close()
    assert grads[False].abs().max() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert forwards == {False: 0, True: 1}  # checkpointed, the layer runs again in the backward pass
