"""`opd serve` against the exact request bodies that real clients send to ``/v1/completions``: the official
``openai`` client, lm-evaluation-harness's ``local-completions`` model and vLLM's benchmark client. Each body is
recorded here as the client builds it (the source file is named above it; prompts are token ids on this tiny
vocabulary), and each test reads the answer the way that client reads it."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import LiveServer

CONTEXT, CONTINUATION = [5, 6, 7, 8, 9], [10, 11, 12]
OTHER = [20, 21, 22, 23]


@pytest.fixture(scope="module")
def server(model_dirs):
    with LiveServer(model_dirs["teacher"]) as live:
        yield live


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def ok(server, body: dict) -> dict:
    response = post(server, body)
    assert response.status_code == 200, response.text
    return response.json()


def model_logprobs(server, seq: list[int]) -> list[float]:
    """log p(x_t | x_<t) for t >= 1, computed in process."""
    with torch.no_grad():
        logprobs = server.model(torch.tensor([seq])).logits[0, :-1, : len(server.tokenizer)].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()


def assert_prompt_logprobs(server, entries: list, seq: list[int]) -> None:
    """vLLM's shape for prompt_logprobs=0: null first, then a dict holding only the actual prompt token."""
    assert entries[0] is None and len(entries) == len(seq)
    for t, (entry, want) in enumerate(zip(entries[1:], model_logprobs(server, seq), strict=True), start=1):
        assert list(entry) == [str(seq[t])]
        assert entry[str(seq[t])]["logprob"] == pytest.approx(want, abs=1e-5)
        assert entry[str(seq[t])]["rank"] >= 1 and isinstance(entry[str(seq[t])]["decoded_token"], str)


# --- the official openai client (openai-python; `client.completions.create` sends exactly the arguments it is
# given, `extra_body` merged into the top level; recorded from openai 3.63.0 through an httpx.MockTransport)

# vLLM's tests/entrypoints/openai/test_completion.py::test_prompt_logprobs_completion:
# client.completions.create(model=..., prompt=[p1, p2], extra_body={"prompt_logprobs": 0}) (no max_tokens: 16)
OPENAI_PROMPT_LOGPROBS = {"model": "teacher", "prompt": [CONTEXT, OTHER], "prompt_logprobs": 0}
# client.completions.create(model=..., prompt=ids, max_tokens=8, logprobs=0, extra_body={"prompt_logprobs": 0})
OPENAI_LOGPROBS = {"model": "teacher", "prompt": CONTEXT, "logprobs": 0, "max_tokens": 8, "prompt_logprobs": 0}
# every optional argument of create() at its neutral value, as scripts written for OpenAI's API pass them
OPENAI_NEUTRAL = {"model": "teacher", "prompt": CONTEXT, "best_of": 1, "echo": False, "frequency_penalty": 0,
                  "logit_bias": {}, "logprobs": 0, "max_tokens": 8, "n": 1, "presence_penalty": 0, "seed": 3,
                  "stop": None, "stream": False, "stream_options": None, "suffix": None, "temperature": 1,
                  "top_p": 1, "user": "someone", "prompt_logprobs": 0}


def test_openai_prompt_logprobs_on_a_sampling_request_are_honoured(server):
    """The issue's request: prompt_logprobs=0 with sampling is answered as vLLM answers it, in every choice."""
    answer = ok(server, OPENAI_PROMPT_LOGPROBS)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for choice, seq in zip(answer["choices"], [CONTEXT, OTHER], strict=True):
        assert_prompt_logprobs(server, choice["prompt_logprobs"], seq)
        assert isinstance(choice["text"], str) and choice["logprobs"] is None
    assert answer["usage"]["completion_tokens"] <= 2 * 16

    answer = ok(server, OPENAI_LOGPROBS)
    choice = answer["choices"][0]
    assert_prompt_logprobs(server, choice["prompt_logprobs"], CONTEXT)
    logprobs = choice["logprobs"]
    assert 1 <= len(logprobs["tokens"]) <= 8 and len(logprobs["token_logprobs"]) == len(logprobs["tokens"])
    assert all(lp <= 0 for lp in logprobs["token_logprobs"]) and isinstance(choice["text"], str)
    scored = ok(server, {"prompt": CONTEXT, "max_tokens": 0, "prompt_logprobs": 0})["choices"][0]
    assert choice["prompt_logprobs"] == scored["prompt_logprobs"]  # the same numbers as the scoring path


def test_openai_prompt_logprobs_with_n_and_top_k(server):
    body = {"model": "teacher", "prompt": [CONTEXT, OTHER], "n": 2, "max_tokens": 4, "prompt_logprobs": 2}
    choices = ok(server, body)["choices"]
    scored = ok(server, {"prompt": [CONTEXT, OTHER], "max_tokens": 0, "prompt_logprobs": 2})["choices"]
    assert [c["prompt_logprobs"] for c in choices] == [scored[i // 2]["prompt_logprobs"] for i in range(4)]
    assert all(2 <= len(entry) <= 3 for entry in choices[0]["prompt_logprobs"][1:])


def test_openai_neutral_arguments_change_nothing(server):
    plain = {"model": "teacher", "prompt": CONTEXT, "logprobs": 0, "max_tokens": 8, "seed": 3,
             "prompt_logprobs": 0}
    assert ok(server, OPENAI_NEUTRAL)["choices"] == ok(server, plain)["choices"]


def test_the_recorded_bodies_are_what_the_installed_openai_client_sends(server):
    openai = pytest.importorskip("openai")
    sent = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.post(f"{server.url}{request.url.path}", content=request.content,
                          headers={"content-type": "application/json"}, timeout=60)

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(record)))
    first = client.completions.create(model="teacher", prompt=[CONTEXT, OTHER], extra_body={"prompt_logprobs": 0})
    client.completions.create(model="teacher", prompt=CONTEXT, max_tokens=8, logprobs=0,
                              extra_body={"prompt_logprobs": 0})
    neutral = {k: v for k, v in OPENAI_NEUTRAL.items() if k not in ("model", "prompt", "prompt_logprobs")}
    client.completions.create(model="teacher", prompt=CONTEXT, **neutral, extra_body={"prompt_logprobs": 0})
    assert sent == [OPENAI_PROMPT_LOGPROBS, OPENAI_LOGPROBS, OPENAI_NEUTRAL]
    assert first.choices[1].model_extra["prompt_logprobs"][1][str(OTHER[1])]["logprob"] < 0


# --- lm-evaluation-harness, `--model local-completions` (lm_eval/models/openai_completions.py,
# LocalCompletionsAPI._create_payload, at EleutherAI/lm-evaluation-harness 0064c3a0; tokenized_requests=True, its
# default, sends token ids, a batch of them with batch_size > 1)

# loglikelihood (multiple-choice tasks): one greedy token, the prompt echoed with its log-probs
LM_EVAL_LOGLIKELIHOOD = {"model": "teacher", "prompt": [CONTEXT + CONTINUATION, OTHER], "temperature": 0,
                         "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
# the older local-completions (OpenaiCompletionsLM, through the openai client; lm_eval/models/openai_completions.py
# at 802b7236): loglikelihood scores with max_tokens=0 and the top 10, get_result sums token_logprobs[ctxlen:]
LM_EVAL_LOGLIKELIHOOD_OLD = {"model": "teacher", "prompt": [CONTEXT + CONTINUATION, OTHER], "echo": True,
                             "max_tokens": 0, "temperature": 0.0, "logprobs": 10, "seed": 1234}
# generate_until (e.g. gsm8k: until ["Question:", "</s>", "<|im_end|>"], do_sample false, temperature 0.0,
# max_gen_toks 32), the tokenizer's EOS appended to `stop` by handle_stop_sequences
LM_EVAL_GENERATE = {"prompt": [CONTEXT, OTHER], "model": "teacher", "max_tokens": 32, "temperature": 0.0,
                    "stop": ["Question:", "</s>", "<|im_end|>", "<|endoftext|>"], "seed": 1234}


def test_lm_eval_loglikelihood(server):
    """What LocalCompletionsAPI.parse_logprobs reads: choices by index, token_logprobs[ctxlen:-1] summed, and
    whether each equals the max of its top_logprobs (is_greedy)."""
    answer = ok(server, LM_EVAL_LOGLIKELIHOOD)
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    for choice, (seq, ctxlen) in zip(choices, [(CONTEXT + CONTINUATION, len(CONTEXT)), (OTHER, 1)], strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(seq) + 1 and token_logprobs[0] is None
        assert sum(token_logprobs[ctxlen:-1]) == pytest.approx(sum(model_logprobs(server, seq)[ctxlen - 1 :]),
                                                               abs=1e-4)
        is_greedy = all(lp == max(top.values()) for lp, top in
                        zip(token_logprobs[ctxlen:-1], choice["logprobs"]["top_logprobs"][ctxlen:-1], strict=True))
        with torch.no_grad():
            argmax = server.model(torch.tensor([seq])).logits[0, :-1, : len(server.tokenizer)].argmax(-1).tolist()
        assert is_greedy == (argmax[ctxlen - 1 :] == seq[ctxlen:])


def test_lm_eval_loglikelihood_older_client(server):
    choices = ok(server, LM_EVAL_LOGLIKELIHOOD_OLD)["choices"]
    for choice, (seq, ctxlen) in zip(choices, [(CONTEXT + CONTINUATION, len(CONTEXT)), (OTHER, 1)], strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(seq) == len(logprobs["top_logprobs"])
        assert sum(logprobs["token_logprobs"][ctxlen:]) == pytest.approx(sum(model_logprobs(server, seq)[ctxlen - 1 :]),
                                                                         abs=1e-4)
        assert all(1 <= len(top) <= 10 for top in logprobs["top_logprobs"][1:])


def test_lm_eval_generate_until(server, tokenizer):
    """What LocalCompletionsAPI.parse_generations reads: each choice's text, placed by its index; the stop
    strings are honoured (none can be in the text)."""
    answer = ok(server, LM_EVAL_GENERATE)
    texts = [None] * len(answer["choices"])
    for choice in answer["choices"]:
        texts[choice["index"]] = choice["text"]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert not any(stop in text for text in texts for stop in LM_EVAL_GENERATE["stop"])
    # greedy, so the same request answers the same
    assert [c["text"] for c in ok(server, LM_EVAL_GENERATE)["choices"]] == [c["text"] for c in answer["choices"]]


def test_stop_strings_end_a_sample_as_vllm_ends_it(server, tokenizer):
    """vLLM's rule: the sample ends at the token whose text completes a stop string (kept in the tokens and
    their log-probs), its text ends before the stop string, finish_reason "stop", stop_reason the string."""
    common = {"prompt": CONTEXT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 0,
              "return_token_ids": True}
    free = ok(server, common)["choices"][0]
    text = free["text"]
    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a string the greedy sample does produce
    answer = ok(server, {**common, "stop": ["never in this text \u2603", stop]})
    choice = answer["choices"][0]
    first = next(k for k in range(1, len(free["token_ids"]) + 1)
                 if stop in tokenizer.decode(free["token_ids"][:k], skip_special_tokens=True))
    assert choice["token_ids"] == free["token_ids"][:first]
    assert choice["logprobs"]["token_logprobs"] == free["logprobs"]["token_logprobs"][:first]
    assert choice["text"] == text[: text.index(stop)]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert answer["usage"]["completion_tokens"] == first
    # one stop string (not a list), and on one greedy token (which the sampler now answers)
    assert ok(server, {**common, "stop": stop})["choices"][0]["token_ids"] == choice["token_ids"]
    one = ok(server, {"prompt": CONTEXT, "max_tokens": 1, "temperature": 0, "stop": ["\n"], "stop_token_ids": [3]})
    assert len(one["choices"]) == 1 and one["usage"]["completion_tokens"] == 1


# --- vLLM's benchmark client (`vllm bench serve --backend vllm`/`openai`): it always streams, which this server
# does not do token by token, so its requests are refused with a 400 that names what to change

# vllm/benchmarks/lib/endpoint_request_func.py, async_request_openai_completions (vLLM 0.11+), with
# `vllm bench serve`'s default temperature 0.0 and --ignore-eos merged in; the prompt is the dataset's text
VLLM_BENCH = {"model": "teacher", "prompt": "Compute 1+2", "repetition_penalty": 1.0, "max_tokens": 16,
              "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
              "temperature": 0.0}
# benchmarks/backend_request_func.py, async_request_openai_completions (vLLM 0.4-0.6)
VLLM_BENCH_OLD = {"model": "teacher", "prompt": "Compute 1+2", "temperature": 0.0, "best_of": 1,
                  "max_tokens": 16, "logprobs": None, "stream": True}


@pytest.mark.parametrize("body", [VLLM_BENCH, VLLM_BENCH_OLD])
def test_vllm_benchmark_requests_are_refused_by_name(server, body):
    response = post(server, body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("invalid request: prompt: text prompts are not implemented")
    with_ids = post(server, {**body, "prompt": CONTEXT})
    assert with_ids.status_code == 400
    assert with_ids.json()["error"]["message"] == ("stream=True: this server answers in one body; it does not "
                                                   "stream: send stream=false")
    # everything else in it is neutral, or honoured: without streaming it is answered
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    answer = ok(server, {**plain, "prompt": CONTEXT})
    drawn = answer["usage"]["completion_tokens"]
    assert drawn == 16 if body.get("ignore_eos") else 1 <= drawn <= 16
    assert ok(server, {**plain, "prompt": CONTEXT, "stream": False, "stream_options": {}})["choices"]
