"""``sampler=vllm``: an in-process ``vllm.LLM`` on the training GPU (placeholder until written)."""

from __future__ import annotations

from opd.models import OpdError


def check_available() -> None:
    raise OpdError("sampler=vllm is not available yet")
