"""Data parallelism under ``torchrun``: PyTorch's own DDP or FSDP2, nothing of opd's own runtime.

The step's prompts are split across ranks; each rank samples, scores and back-propagates its share
with the loss normalised by the *global* completion-token count, so that the gradient averaged over
ranks is exactly the one-process gradient of the whole batch: with ``n_r`` tokens on rank ``r`` and
``N = sum_r n_r``, rank ``r`` minimises ``world * sum_{t in r} l_t / N`` and DDP's mean over ranks gives
``sum_t l_t / N``. ``prompts_per_step`` and ``lr`` therefore mean the same at any world size.

DDP needs the backward to start from its module's forward, and FSDP2 unshards the parameters of a
module in that module's forward; opd's scorer calls the student's decoder and head directly, so the
student is wrapped in ``PolicyLoss``, a module whose forward is the policy loss, and that module is what
DDP wraps, or what FSDP2 shards as the root (each decoder layer its own group).

Sampling under FSDP2: a rank holds only a shard of each weight, so sampling, evaluation and saving use
a separate full copy of the student, refreshed from the sharded weights after every optimizer step
(one all-gather). Memory: one unsharded copy of the weights per rank, on top of the shards, grads and
optimizer state that FSDP2 divides by the world size. With AdamW in float32 the sharded part is about
16 bytes per parameter / world, the copy 2-4 bytes per parameter: FSDP2 still pays off from 2 ranks.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opd.errors import OpdError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment(timeout_seconds: float, device: str, cpu_collectives: bool = False) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPU, and gloo
    beside it for CPU tensors with ``cpu_collectives``: CPU-offloaded shards' gradient norm); a plain process
    is rank 0 of 1. A collective that waits longer than ``timeout_seconds`` raises."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(local_rank)
        backend = ("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl") if gpu else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return Dist(rank, world, local_rank)


def in_process_group() -> bool:
    """Whether this process is a rank of an initialised process group (a ``torchrun`` rank)."""
    return dist.is_available() and dist.is_initialized()


def exit_rank(code: int) -> int:
    """End a ``torchrun`` rank: destroy the process group, flush, and leave with ``os._exit(code)``.

    Skipping the interpreter's and C++'s exit-time destructors is deliberate: a rank that returned
    normally was seen to abort afterwards ("terminate called without an active exception", no Python
    frame left) in about one suite run of four on this 2-core machine, both under DDP and FSDP2, which
    fails the job although its work is done. Everything opd writes is closed before this point. A plain
    process (no process group) just gets ``code`` back."""
    if not in_process_group():
        return code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard(items: list, state: Dist) -> list:
    """Rank ``r``'s contiguous share of ``items`` (sizes differ by at most one)."""
    per, extra = divmod(len(items), state.world)
    start = state.rank * per + min(state.rank, extra)
    return items[start : start + per + (state.rank < extra)]


def all_gather(obj, state: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not state.active:
        return [obj]
    out = [None] * state.world
    dist.all_gather_object(out, obj)
    return out


def barrier(state: Dist) -> None:
    """Wait until every rank gets here (at the end of a run: until rank 0 has written the run directory)."""
    if state.active:
        dist.barrier()


def broadcast(obj, state: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not state.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PolicyLoss(torch.nn.Module):
    """The student, with the run's loss (``Objective.loss``) as its forward: what DDP wraps and FSDP2 shards."""

    def __init__(self, student: torch.nn.Module, objective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, *args):
        return self.objective.loss(self.student, *args)


def decoder_layers(student: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(student.get_decoder(), "layers", None)
    if layers is None:
        raise OpdError(f"parallel=fsdp needs the decoder's layers at .layers; {type(student).__name__} has none")
    return list(layers)


def offload_policy(offload: bool):
    """FSDP2's own placement: with ``offload``, ``CPUOffloadPolicy`` (the sharded parameters and their
    gradients in CPU memory, pinned where a GPU copies them; each module's shards copied to the device for
    its all-gather, the optimizer step run on the CPU), else the default (everything on the device)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()


def wrap(student: torch.nn.Module, objective, parallel: str, state: Dist,
         offload: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module whose forward computes the loss, the full model to sample from and save); ``offload``
    (``offload=optimizer``): the FSDP2 shards, gradients and AdamW's state in CPU memory."""
    module = PolicyLoss(student, objective)
    if not state.active:
        return module, student
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module), student
    from torch.distributed.fsdp import fully_shard

    full_copy = copy.deepcopy(student).requires_grad_(False)
    for layer in decoder_layers(student):
        fully_shard(layer, offload_policy=offload_policy(offload))
    fully_shard(module, offload_policy=offload_policy(offload))
    return module, full_copy


def shard_teacher(teacher: torch.nn.Module, state: Dist, device: torch.device, offload: bool = False) -> None:
    """``teacher_parallel=fsdp``: each decoder layer of the teacher sharded across the ranks with FSDP2,
    forward only, its weights gathered for its forward and freed after it (``reshard_after_forward``).
    The embeddings, the final norm and the output head stay whole on every rank: the exact-KL loss reads
    the teacher's head outside any forward. Every rank must then run the teacher the same number of times,
    on any rows (the scorer runs one forward per call; evaluation runs on every rank). The teacher comes in
    on the CPU and leaves on ``device``; with ``offload`` (``offload=teacher``) its layer shards stay in CPU
    memory and FSDP2 copies each layer's to the device for its forward."""
    if not state.active:
        return
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(teacher)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, offload_policy=offload_policy(offload))
    decoder = teacher.get_decoder()
    decoder.layers = torch.nn.ModuleList()  # the rest to the device; the layers stay where FSDP2 put them
    teacher.to(device)
    decoder.layers = torch.nn.ModuleList(layers)


def refresh_full_copy(student: torch.nn.Module, full_copy: torch.nn.Module, parallel: str, state: Dist) -> None:
    """After an optimizer step under FSDP2: gather the sharded weights into the sampling copy."""
    if not state.active or parallel != "fsdp":
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    full_copy.load_state_dict(full)


def optimizer_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name: the same format at any world size and with
    DDP or FSDP2 (a collective under FSDP2: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))


def load_optimizer_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the gradient norm under FSDP2)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor
