"""A rollout server as the trainer sees it: the step's samples (drawn now, or drawn during the previous
update with ``async_rollouts=1``), the weights pushed before every draw, and the trainer's own log-probs
with the truncated importance weights and the mismatch statistics of every step.

Timeline with ``async_rollouts=1`` (``w_k``: the weights after k updates): at step k the trainer takes
the samples the server drew with ``w_{k-1}``, pushes ``w_k``, asks for step k+1's samples, and updates on
step k's while the server draws: each step trains on samples one update old, which the importance
weight corrects. Without it, step k pushes ``w_k`` and waits for samples drawn with them.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from opd import distributed
from opd.errors import OpdError
from opd.losses import truncated_importance_weights
from opd.rollouts import Rollouts
from opd.scoring import token_logprobs


class RolloutService:
    def __init__(self, sampler, sync) -> None:
        """``sampler``: a ``RemoteSampler`` (or the colocated engine); ``sync``: its ``WeightSync``."""
        self.sampler, self.sync = sampler, sync
        self.pushed: int | None = None  # the number of updates in the weights the server holds
        self.pending: tuple[int, list, Future] | None = None  # (step, examples, samples being drawn)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="opd-rollouts")
        self.sync_seconds = 0.0

    def ensure_weights(self, model: torch.nn.Module, version: int, dist: distributed.Dist) -> None:
        """The server holds the weights after ``version`` updates: rank 0 pushes them, every rank learns
        whether it worked (a failure stops all ranks with rank 0's message)."""
        if self.pushed == version:
            return
        started = time.perf_counter()
        error = None
        if dist.main:
            try:
                self.sync.push(model, version)
            except OpdError as err:
                error = str(err)
        error = distributed.broadcast(error, dist)
        if error:
            raise OpdError(f"pushing the weights after {version} updates to the rollout server failed: {error}")
        self.sampler.model = distributed.broadcast(self.sampler.model, dist)  # the adapter's new name
        self.pushed = version
        self.sync_seconds += time.perf_counter() - started

    def rollouts(self, step: int, prompts, prompter, draw, model: torch.nn.Module,
                 lookahead: bool) -> tuple[list, Rollouts]:
        """This rank's on-policy examples of ``step`` (``prompts``: a ``sources.StepPrompts``) and their
        samples; with ``lookahead`` the next step's are drawn while this one trains."""
        dist = prompts.dist
        if self.pending is not None and self.pending[0] == step:
            _, examples, future = self.pending
            rollouts = future.result()
        else:
            self.ensure_weights(model, step, dist)
            examples = prompts.split(step)[0]
            rollouts = self.draw([prompter.ids(ex.messages) for ex in examples], prompter, draw, step,
                                 dist.rank)
        self.pending = None
        if lookahead:
            self.ensure_weights(model, step, dist)
            upcoming = prompts.split(step + 1)[0]
            self.pending = (step + 1, upcoming, self.executor.submit(
                self.draw, [prompter.ids(ex.messages) for ex in upcoming], prompter, draw, step + 1,
                dist.rank))
        return examples, rollouts

    def draw(self, prompts: list[list[int]], prompter, draw, step: int, rank: int) -> Rollouts:
        return self.sampler.sample(prompts, samples_per_prompt=draw.samples_per_prompt,
                                   max_new_tokens=draw.max_new_tokens, temperature=draw.temperature,
                                   top_p=draw.top_p, eos_id=prompter.stops, pad_id=prompter.tokenizer.pad_token_id,
                                   seed=(draw.seed, step, rank))

    def lap(self) -> float:
        """Seconds spent pushing weights since the last call."""
        seconds, self.sync_seconds = self.sync_seconds, 0.0
        return seconds

    def close(self) -> None:
        if self.pending is not None:
            self.pending[2].cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.sampler.close()


@torch.no_grad()
def reweight(model: torch.nn.Module, rollouts: Rollouts, vocab_size: int, temperature: float, top_p: float,
             tis_cap: float, rows: int = 0) -> dict:
    """The trainer's log-probs of the server's samples become ``sampler_logprobs`` (the policy the update
    starts from, and the one the KL advantage is about); ``is_weights`` are the truncated importance
    weights against the server's. Returns this rank's sums for the step's mismatch statistics. ``rows``
    (``sample_batch``): the forward reads that many rows at a time (the same log-probs)."""
    mask = rollouts.completion_mask
    count = rollouts.tokens.shape[0]
    parts = [rollouts.select(slice(start, start + rows)) for start in range(0, count, rows)] \
        if 0 < rows < count else [rollouts]
    own = torch.cat([token_logprobs(model, part, vocab_size, temperature, top_p) for part in parts]) * mask
    engine = rollouts.engine_logprobs * mask
    rollouts.sampler_logprobs = own
    rollouts.is_weights = truncated_importance_weights(own, engine, mask, tis_cap)
    gap = (own - engine)[mask > 0]
    ratio = torch.exp(gap)
    if len(gap) == 0:
        return {"tokens": 0, "ratio_sum": 0.0, "ratio_max": 1.0, "ratio_min": 1.0, "truncated": 0,
                "engine_kl_sum": 0.0, "max_abs_gap": 0.0, "abs_gap_sum": 0.0}
    return {"tokens": len(gap), "ratio_sum": float(ratio.sum()), "ratio_max": float(ratio.max()),
            "ratio_min": float(ratio.min()), "truncated": int((ratio > tis_cap).sum()),
            "engine_kl_sum": float(-gap.sum()), "max_abs_gap": float(gap.abs().max()),
            "abs_gap_sum": float(gap.abs().sum())}


def merge_stats(ranks: list[dict]) -> dict:
    """The step's record fields from every rank's ``reweight`` sums."""
    tokens = max(sum(r["tokens"] for r in ranks), 1)
    return {"is_ratio_mean": round(sum(r["ratio_sum"] for r in ranks) / tokens, 6),
            "is_ratio_min": round(min(r["ratio_min"] for r in ranks), 6),
            "is_ratio_max": round(max(r["ratio_max"] for r in ranks), 6),
            "is_truncated_share": round(sum(r["truncated"] for r in ranks) / tokens, 6),
            "engine_kl": sum(r["engine_kl_sum"] for r in ranks) / tokens,  # k1 estimate of KL(engine || trainer)
            "engine_max_abs_logprob_gap": max(r["max_abs_gap"] for r in ranks),
            "engine_mean_abs_logprob_gap": sum(r["abs_gap_sum"] for r in ranks) / tokens}


def check_gap(stats: dict, limit: float, step: int, sampler_url: str) -> None:
    """Stop the run when the engine's log-probs of its own samples are far from the trainer's: the weights it
    sampled with are not the ones it was sent (a sync that failed silently) or its numbers are another
    distribution's (raw log-probs at a temperature). Peers' runs trained on with such servers (ms-swift#6478)."""
    gap = stats["engine_mean_abs_logprob_gap"]
    if limit > 0 and gap > limit:
        raise OpdError(f"step {step + 1}: the rollout server's log-probs of its samples differ from the trainer's by "
                       f"{gap:.3f} nats per token on average (engine_gap_limit={limit}): it is not sampling from the "
                       f"weights it was sent, or reports another distribution's log-probs (vLLM: start it with "
                       f"--logprobs-mode processed_logprobs). Server: {sampler_url}. The last checkpoint is kept; "
                       "fix the server, then --resume (or raise engine_gap_limit, 0 turns the check off).")
