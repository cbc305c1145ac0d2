"""``sampler=vllm``: an in-process ``vllm.LLM`` sharing the training GPU, the way TRL's colocate mode and
verl's hybrid engine run it. GPU only; NOT YET RUN ON A GPU HERE (no device was lent to the sessions that
wrote it): the tests skip without CUDA and vLLM.

- The engine runs in this process (``distributed_executor_backend="external_launcher"``), so its model's
  ``load_weights`` takes the trainer's tensors directly after each update (``ColocatedSync``).
- Its log-probs are those of the distribution it samples from (``logprobs_mode="processed_logprobs"``:
  after temperature and top-p), the quantity the trainer recomputes.
- Between draws it sleeps (``enable_sleep_mode``: KV cache dropped, weights offloaded) so the update has
  the memory; ``vllm_memory`` (``gpu_memory_utilization``) bounds it while it samples. After a weight
  load its prefix cache is reset (it holds keys and values of the old weights). TRL's colocate mode
  (``trl/generation/vllm_generation.py``) runs the same sequence with sleep level 2.
"""

from __future__ import annotations

import os

import torch

from opd.errors import OpdError
from opd.models import plain_model
from opd.rollouts import Rollouts, pack_pairs
from opd.samplers.remote import check_ids, request_seed, stop_list


def check_available() -> None:
    if not torch.cuda.is_available():
        raise OpdError("sampler=vllm runs vLLM inside the trainer on its GPU; there is no CUDA device here. Use "
                       "sampler=local, or sampler=http://HOST:PORT with a rollout server")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise OpdError("sampler=vllm needs vLLM: pip install vllm (a version matching your torch)") from None


class ColocatedSampler:
    def __init__(self, student_path: str, dtype: torch.dtype, memory: float, max_model_len: int, seed: int,
                 vocab_size: int | None = None) -> None:
        check_available()
        self.vocab_size = vocab_size  # the student tokenizer's ids: a token past them has no text
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        from vllm import LLM

        self.llm = LLM(model=student_path, dtype=dtype, gpu_memory_utilization=memory, max_model_len=max_model_len,
                       enable_sleep_mode=True, distributed_executor_backend="external_launcher", seed=seed,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        self.llm.sleep(level=1)
        self.awake = False
        self.model = self.base_model = "colocated"
        self.url = "in-process vLLM"

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    def engine_model(self) -> torch.nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def sample(self, prompts: list[list[int]], *, samples_per_prompt: int, max_new_tokens: int, temperature: float,
               top_p: float, eos_id: int | list[int], pad_id: int, seed: tuple[int, ...]) -> Rollouts:
        from vllm import SamplingParams, TokensPrompt

        self.wake()
        params = SamplingParams(n=samples_per_prompt, temperature=temperature, top_p=top_p,
                                max_tokens=max_new_tokens, logprobs=0, seed=request_seed(*seed),
                                stop_token_ids=stop_list(eos_id), detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        self.llm.sleep(level=1)
        self.awake = False
        completions, values = [], []
        for output in outputs:
            for sample in output.outputs:
                ids = list(sample.token_ids)
                completions.append(ids)
                values.append([step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)])
        check_ids(completions, self.vocab_size, "the colocated vLLM engine (sampler=vllm)", "sample with "
                  "sampler=local or a rollout server of opd serve, which sample the tokenizer's ids only")
        rollouts = pack_pairs([p for p in prompts for _ in range(samples_per_prompt)], completions, pad_id)
        rollouts.prompt_index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        width = max(len(p) for p in prompts)
        engine = torch.zeros(rollouts.tokens.shape)
        for row, row_values in enumerate(values):
            engine[row, width : width + len(row_values)] = torch.tensor(row_values)
        rollouts.engine_logprobs = engine
        return rollouts

    def close(self) -> None:
        del self.llm


class ColocatedSync:
    """The trainer's weights into the in-process engine after each update (LoRA merged first)."""

    kind = "colocated"

    def __init__(self, sampler: ColocatedSampler) -> None:
        self.sampler = sampler

    def release(self) -> None:
        """Nothing to undo: the engine keeps the last weights pushed."""

    @torch.no_grad()
    def push(self, model: torch.nn.Module, version: int) -> None:
        self.sampler.wake()
        weights = plain_model(model).state_dict()
        self.sampler.engine_model().load_weights(weights=list(weights.items()))
        self.sampler.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
        torch.cuda.synchronize()
