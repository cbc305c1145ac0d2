"""The request and response shapes of ``opd serve``: OpenAI's completions API with vLLM's extensions
(token-id prompts, ``prompt_logprobs``, ``return_token_ids``, ``return_tokens_as_token_ids``), the runtime
LoRA endpoints' bodies, and the checks that refuse, with a 400 naming the field, what the server does not
honour."""

from __future__ import annotations

from typing import Annotated

from pydantic import AllowInfNan, BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from opd.server.worker import ApiError

MAX_TOP_K = 20


Number = Annotated[StrictFloat, AllowInfNan(False)] | StrictInt  # NaN and the infinities: a 400 naming the field


class CompletionRequest(BaseModel):
    """The completions API's parameters (OpenAI's and vLLM's sampling extensions). An unknown field, a
    value of the wrong type, or a value this server does not honour is a 400 naming the field
    (``check_sampling``), never silently ignored: a client must not read something it did not ask for."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False  # vLLM: each choice's token_ids (and prompt_token_ids)
    return_tokens_as_token_ids: StrictBool = False  # vLLM: logprobs' tokens as "token_id:N"

    @property
    def sampling(self) -> bool:
        """A generation request, answered by the sampler: anything but scoring (``max_tokens=0``) and one
        greedy token for one prompt (``max_tokens=1, temperature=0, n=1``: the scoring path's next token)."""
        greedy_one = self.max_tokens == 1 and self.temperature == 0 and self.n == 1
        return self.max_tokens > 0 and not (greedy_one and not self.stop and not self.stop_token_ids)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class LoadLoraRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_path: StrictStr
    load_inplace: StrictBool = False  # replace an adapter of the same name (vLLM's newer flag)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


class ReloadRequest(BaseModel):
    """opd's own ``/opd/reload_weights``: a directory of safetensors on the server's filesystem."""

    model_config = ConfigDict(extra="forbid")
    path: StrictStr


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True




def check_sampling(body: CompletionRequest) -> None:
    """Refuse what this server does not honour. It scores (``max_tokens=0``, with ``prompt_logprobs`` or
    ``echo`` + ``logprobs``), extends one prompt by one greedy token with the same log-probs, or samples
    (``n``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stop_token_ids``, ``ignore_eos``; the sampled
    tokens' log-probs, ``logprobs=0``; the prompt's, ``prompt_logprobs``). Neutral values of everything else
    are accepted."""

    def refuse(name: str, why: str) -> None:
        raise ApiError(400, f"{name}={getattr(body, name)!r}: {why}")

    if body.max_tokens < 0:
        refuse("max_tokens", "must be at least 0 (0 scores the prompt)")
    if body.stream:
        refuse("stream", "this server answers in one body; it does not stream: send stream=false")
    if body.stream_options:  # vLLM's rule: an empty or null stream_options is accepted without stream
        refuse("stream_options", "only valid with stream=true, which this server does not implement")
    if body.n < 1:
        refuse("n", "must be at least 1")
    if body.best_of not in (None, body.n):
        refuse("best_of", "must equal n (or be absent)")
    if body.temperature is not None and body.temperature < 0:
        refuse("temperature", "must be at least 0")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        refuse("top_p", "must be in (0, 1]")
    if body.top_k is not None and body.top_k < -1:
        refuse("top_k", "must be -1 or 0 (off) or at least 1")
    if body.min_p is not None and not 0 <= body.min_p <= 1:
        refuse("min_p", "must be in [0, 1]")

    def within(value, low: float, high: float) -> bool:
        return value is None or low <= value <= high

    penalties = (("presence_penalty", 0, within(body.presence_penalty, -2, 2), "must be in [-2, 2]"),
                 ("frequency_penalty", 0, within(body.frequency_penalty, -2, 2), "must be in [-2, 2]"),
                 ("repetition_penalty", 1, body.repetition_penalty is None or body.repetition_penalty > 0,
                  "must be positive"))
    for name, neutral, valid, rule in penalties:
        if not valid:
            refuse(name, rule)
        if getattr(body, name) not in (None, neutral):
            refuse(name, f"not implemented by this server; leave it at {neutral}")
    if body.logit_bias:
        refuse("logit_bias", "not implemented by this server")
    if body.suffix is not None:
        refuse("suffix", "not implemented by this server")
    if "" in body.stop_strings:
        refuse("stop", "cannot hold an empty string (vLLM's rule); leave it out for no stop string")
    if not body.sampling:
        if body.n > 1:
            refuse("n", "must be 1 when scoring (max_tokens=0)")
        return
    if body.echo:
        refuse("echo", "not implemented when sampling: ask for prompt_logprobs, or send a scoring request "
               "(max_tokens=0) with echo")
    if body.logprobs not in (None, 0):
        refuse("logprobs", "when sampling, this server returns the sampled token's log-prob only (logprobs=0)")
    if body.top_k not in (None, -1, 0):
        refuse("top_k", "not implemented when sampling; leave it at -1")
    if body.min_p not in (None, 0):
        refuse("min_p", "not implemented when sampling; leave it at 0")


def validate_prompt(body: CompletionRequest, vocab_size: int, max_model_len: int) -> list[list[int]]:
    check_sampling(body)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(body, name)
        if value is not None and not 0 <= value <= MAX_TOP_K:
            raise ApiError(400, f"{name}={value} must be between 0 and {MAX_TOP_K}")
    prompt = body.prompt
    sequences = [prompt] if prompt and isinstance(prompt[0], int) else prompt
    if not sequences:
        raise ApiError(400, "prompt is empty")
    for i, seq in enumerate(sequences):
        if not seq:
            raise ApiError(400, f"prompt[{i}] is empty")
        if len(seq) + body.max_tokens > max_model_len:
            raise ApiError(400, f"prompt[{i}] has {len(seq)} tokens; with max_tokens={body.max_tokens} that is "
                           f"over this model's maximum context length of {max_model_len}")
        bad = next((t for t in seq if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt[{i}] holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return sequences


def make_choice(index: int, seq: list[int], res: dict, body: CompletionRequest, tokenizer) -> dict:
    decode = tokenizer.decode
    choice: dict = {"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                    "stop_reason": None, "prompt_token_ids": seq}
    generated = res["top_ids"][-1][0] if body.max_tokens == 1 else None
    if generated is not None:
        choice["text"] = decode([generated])
    if body.prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_entries(seq, res, body.prompt_logprobs, decode)
    if body.logprobs is not None:
        ids, lps, tops = [], [], []
        if body.echo:
            ids = list(seq)
            lps = [None] + res["token_logprobs"]
            tops = [None] + [top_dict(res, t - 1, body.logprobs, decode) for t in range(1, len(seq))]
        if generated is not None:
            ids.append(generated)
            lps.append(res["top_logprobs"][-1][0])
            tops.append(top_dict(res, len(seq) - 1, body.logprobs, decode))
        texts = [decode([i]) for i in ids]
        offsets, position = [], 0
        for text in texts:
            offsets.append(position)
            position += len(text)
        choice["logprobs"] = {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops,
                              "text_offset": offsets}
    if body.echo:
        choice["text"] = decode(seq) + choice["text"]
    return choice


def prompt_entries(seq: list[int], res: dict, k: int, decode) -> list:
    """vLLM's ``prompt_logprobs``: ``None`` for the first token, then per token a dict from token id to
    ``{logprob, rank, decoded_token}`` holding the actual token and the top ``k``."""
    entries: list = [None]
    for t in range(1, len(seq)):
        entry = {str(seq[t]): {"logprob": res["token_logprobs"][t - 1], "rank": res["ranks"][t - 1],
                               "decoded_token": decode([seq[t]])}}
        for rank, (tid, lp) in enumerate(zip(res["top_ids"][t - 1][:k], res["top_logprobs"][t - 1], strict=False),
                                         start=1):
            entry.setdefault(str(tid), {"logprob": lp, "rank": rank, "decoded_token": decode([tid])})
        entries.append(entry)
    return entries


def top_dict(res: dict, position: int, k: int, decode) -> dict:
    return {decode([tid]): lp for tid, lp in zip(res["top_ids"][position][:k], res["top_logprobs"][position],
                                                  strict=False)}




MAX_N = 256


def stop_ids(body: CompletionRequest, eos_ids: list[int]) -> list[int]:
    """The tokens that end a sample: the model's end tokens ``eos_ids`` (``templates.reply_stops``: its EOS, and
    the token its template ends a reply with, as vLLM stops on every EOS of a model's generation config) unless
    ``ignore_eos``, and ``stop_token_ids``."""
    if body.n > MAX_N:
        raise ApiError(400, f"n={body.n}: at most {MAX_N} samples per prompt")
    return sorted((set(eos_ids) if not body.ignore_eos else set()) | set(body.stop_token_ids or []))


def stop_at_string(completion: list[int], logprobs: list[float], stop: list[str], decode):
    """vLLM's stop strings, applied to a drawn sample: it ends at the first token whose text completes one
    of ``stop`` (checked in their order), which stays in the tokens and log-probs; its text ends before the
    stop string. Returns the tokens, their log-probs, the text and the stop string (``None`` if none)."""

    def found(k: int) -> str | None:
        text = decode(completion[:k])
        return next((s for s in stop if s in text), None)

    if not stop or found(len(completion)) is None:
        return completion, logprobs, decode(completion), None
    low, high = 1, len(completion)  # the first k whose text holds a stop string (a longer prefix holds it too)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if found(middle) is not None else (middle + 1, high)
    text, hit = decode(completion[:low]), found(low)
    return completion[:low], logprobs[:low], text[: text.index(hit)], hit


def sampled_choice(index: int, prompt: list[int], completion: list[int], logprobs: list[float], text: str,
                   stop_string: str | None, body: CompletionRequest, tokenizer, stops: list[int],
                   eos_ids: list[int]) -> dict:
    """One sample (as ``stop_at_string`` left it) in vLLM's choice shape. A sample ended by a stop token
    keeps it (in ``token_ids`` and the log-probs; ``finish_reason`` "stop", ``stop_reason`` the token id, or
    None for one of the model's end tokens ``eos_ids``); one ended by a stop string has ``stop_reason`` the
    string."""
    stopped = stop_string is not None or (bool(completion) and completion[-1] in stops)
    reason = stop_string
    if stop_string is None and stopped and completion[-1] not in eos_ids:
        reason = completion[-1]
    choice: dict = {"index": index, "text": text, "logprobs": None, "finish_reason": "stop" if stopped else "length",
                    "stop_reason": reason}
    if body.logprobs is not None:
        tokens = ([f"token_id:{t}" for t in completion] if body.return_tokens_as_token_ids
                  else [tokenizer.decode([t]) for t in completion])
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": logprobs,
                              "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)],
                              "text_offset": offsets}
    if body.return_token_ids:
        choice["token_ids"], choice["prompt_token_ids"] = completion, prompt
    return choice
