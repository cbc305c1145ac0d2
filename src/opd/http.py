"""One JSON-over-HTTP client for the servers opd talks to (a teacher, a rollout server): retries with
exponential backoff on connection errors, timeouts and 5xx answers; a 4xx is the caller's error and
is reported at once, with the server's message."""

from __future__ import annotations

import time

import httpx

from opd.errors import OpdError


class JsonClient:
    def __init__(self, url: str, role: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, concurrency: int = 8) -> None:
        self.url, self.role = url.rstrip("/"), role
        self.retries, self.backoff = retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))

    def request(self, method: str, path: str, json: dict | None = None) -> dict:
        last: str  # the latest failure; set by every failed attempt (there is at least one)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.request(method, path, json=json)
            except httpx.TransportError as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise OpdError(f"{self.role} {self.url}{path} refused the request: HTTP "
                               f"{response.status_code}: {response.text[:500]}")
            if "json" not in response.headers.get("content-type", ""):
                return {"text": response.text}  # vLLM's LoRA endpoints answer in plain text
            return response.json()
        raise OpdError(f"{self.role} {self.url} did not answer {method} {path} after {self.retries + 1} "
                       f"tries; last failure: {last}. Is it running? The run's last checkpoint is kept; "
                       "continue with `opd train --resume RUN_DIR` once the server is back.")

    def close(self) -> None:
        self.client.close()


PROBE_TEXT = "Compute 12+(3*4)-5\nAnswer: 19. The quick brown fox, über café ✓"


def check_served(http: JsonClient, who: str, model: str | None, field: str, tokenizer, context_needed: int,
                 source: str = "student", tokenizer_fix: str = "") -> str:
    """Check a served model before training and return its name: ``model`` (or the one base model the
    server lists, when ``None``; ``field`` names the setting that chooses), its context length against
    ``context_needed``, and its tokenizer against ``tokenizer`` (the ``source``'s) on a probe text."""
    listing = http.request("GET", "/v1/models")
    models = {m["id"]: m for m in listing.get("data", [])}
    if model is None:
        bases = [name for name, entry in models.items() if not entry.get("parent")]
        if len(bases) != 1:
            raise OpdError(f"{http.role} {http.url} serves {sorted(models)}; choose one with {field}=")
        model = bases[0]
    if model not in models:
        raise OpdError(f"{http.role} {http.url} does not serve {model!r}; it serves {sorted(models)}")
    max_len = models[model].get("max_model_len")
    if max_len is not None and max_len < context_needed:
        raise OpdError(f"{who} {model} at {http.url} has a context of {max_len} tokens, but prompts plus "
                       f"max_new_tokens need up to {context_needed}")
    served = http.request("POST", "/tokenize", {"model": model, "prompt": PROBE_TEXT,
                                                "add_special_tokens": False})["tokens"]
    local = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if served != local:
        raise OpdError(f"the tokenizer of {who} {model} at {http.url} differs from the {source}'s: a probe text "
                       f"encodes to {served[:12]}... there and {local[:12]}... here. {tokenizer_fix}".rstrip())
    vocab = models[model].get("vocab_size")
    if vocab is not None and vocab < len(tokenizer):
        raise OpdError(f"{who} {model} at {http.url} has {vocab} token ids, the {source}'s tokenizer {len(tokenizer)}")
    return model


def wait_until_healthy(url: str, process=None, timeout: float = 120.0, every: float = 0.5) -> None:
    """Wait for ``url/health`` to answer 200 (a server just started, e.g. ``opd serve`` or ``vllm serve``);
    a ``process`` (``subprocess.Popen``) that exits first, or the timeout, is an error."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url.rstrip('/')}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            raise OpdError(f"the server for {url} exited with code {process.returncode} before it answered")
        if time.time() > deadline:
            raise OpdError(f"{url} did not answer /health within {timeout:.0f} s")
        time.sleep(every)
