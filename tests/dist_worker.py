"""Run by the distributed tests, under torchrun or as one plain process (not a test module itself).

``equivalence OUT key=value...``: build one fixed batch (the same on every rank), let each rank
update on its share, and save the student's weights after the step to OUT/weights.pt (rank 0).
``fail RANK MODE key=value...``: train, with rank RANK raising ("raise") or hanging ("hang") at step 1.
``teacher OUT key=value...``: score one fixed batch with the session's teacher, each rank its share of the
rows; rank 0 saves every rank's log-probs, hidden states and local parameter counts to OUT/teacher.pt.
``nonfinite RANK WHAT key=value...``: train, with rank RANK's step 3 made non-finite by a planted hook (WHAT:
"sampling": NaN in its sampling copy of the student, on that rank only; "loss": its loss times NaN).
``placement OUT key=value...``: open a session and save (rank 0) the FSDP2 offload policy of each of the
student's and the teacher's sharded modules, and where their shards are, to OUT/placement.pt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from conftest import sgd_update, unequal_batch
from opd import distributed
from opd.config import load_config
from opd.setup import open_session
from opd.trainer import train


def equivalence(out: Path, overrides: list[str]) -> None:
    torch.manual_seed(0)
    session = open_session(load_config(None, overrides + [f"out={out / 'run'}"]))
    state = session.dist
    batch = unequal_batch(session)
    rows = distributed.shard(list(range(batch.tokens.shape[0])), state)
    mine = batch.select(slice(rows[0], rows[-1] + 1))
    sgd_update(session, mine, int(batch.completion_mask.sum()))  # grad_clip is off: the change is the gradient
    if state.main:
        weights = {k: v.detach().clone() for k, v in session.full_model.state_dict().items()}
        torch.save(weights, out / "weights.pt")


def teacher(out: Path, overrides: list[str]) -> None:
    session = open_session(load_config(None, overrides + [f"out={out / 'run'}"]))
    state = session.dist
    batch = unequal_batch(session)
    rows = distributed.shard(list(range(batch.tokens.shape[0])), state)
    mine = batch.select(slice(rows[0], rows[-1] + 1))
    if state.rank == 1:  # unequal work: one row fewer on rank 1, still one forward per call
        mine = mine.select(slice(0, len(rows) - 1))
    logprobs, hidden = session.teacher_view.teacher.score_with_hidden(mine)
    teacher = session.teacher_view.model
    local = sum(getattr(p, "_local_tensor", p).numel() for p in teacher.parameters())
    layers = sum(getattr(p, "_local_tensor", p).numel() for layer in distributed.decoder_layers(teacher)
                 for p in layer.parameters())
    gathered = distributed.all_gather({"rows": rows[: len(mine.tokens)], "logprobs": logprobs, "hidden": hidden,
                                       "local": local, "layers": layers}, state)
    if state.main:
        torch.save(gathered, out / "teacher.pt")


def placement(out: Path, overrides: list[str]) -> None:
    session = open_session(load_config(None, overrides + [f"out={out / 'run'}"]))

    def policies(model: torch.nn.Module) -> list[str]:
        groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if hasattr(m, "_get_fsdp_state")]
        return [type(g.offload_policy).__name__ for g in groups if g is not None]

    teacher = session.teacher_view.model
    shards = [p.to_local().device.type for p in teacher.parameters() if hasattr(p, "to_local")]
    if session.dist.main:
        torch.save({"student": policies(session.loss_module), "teacher": policies(teacher), "shards": shards},
                   out / "placement.pt")


def fail(rank: int, mode: str, overrides: list[str]) -> None:
    import opd.trainer

    real_step = opd.trainer.training_step

    def step(session, index):
        if index == 1 and session.dist.rank == rank:
            if mode == "raise":
                raise RuntimeError(f"rank {rank} fails on purpose")
            time.sleep(3600)
        return real_step(session, index)

    opd.trainer.training_step = step
    train(load_config(None, overrides), progress=False)


def nonfinite(rank: int, what: str, overrides: list[str]) -> None:
    from test_nonfinite import plant

    plant(what, at=2, rank=rank)
    train(load_config(None, overrides), progress=False)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "equivalence":
        equivalence(Path(args[0]), args[1:])
    elif command == "teacher":
        teacher(Path(args[0]), args[1:])
    elif command == "placement":
        placement(Path(args[0]), args[1:])
    elif command == "nonfinite":
        nonfinite(int(args[0]), args[1], args[2:])
    else:
        fail(int(args[0]), args[1], args[2:])
    distributed.exit_rank(0)
