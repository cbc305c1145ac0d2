"""`opd serve` and the remote teacher, on loopback only, every request loop bounded."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import LiveServer, read_jsonl, rollouts_of, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.server import free_port
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.trainer import train

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(model_dirs):
    with LiveServer(model_dirs["teacher"]) as live:
        yield live


def test_remote_scoring_equals_in_process_scoring(server, tokenizer):
    rollouts = rollouts_of(tokenizer)
    local = LocalTeacher(server.model, len(tokenizer)).score(rollouts)
    with RemoteTeacher(server.url, rows_per_request=2) as remote:
        remote.connect(tokenizer, 200)
        assert remote.model == "teacher"
        assert (remote.score(rollouts) - local).abs().max() <= 1e-5


def test_the_openai_client_reads_the_log_probs(server, tokenizer):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        ids = tokenizer.encode("Compute 1+2", add_special_tokens=False)
        result = client.completions.create(model="teacher", prompt=ids, max_tokens=1, echo=True, logprobs=2,
                                           temperature=0, extra_body={"prompt_logprobs": 1})
        listed = [m.id for m in client.models.list().data]
    choice = result.choices[0]
    assert len(choice.logprobs.token_logprobs) == len(ids) + 1 and choice.logprobs.token_logprobs[0] is None
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None
    assert prompt_logprobs[1][str(ids[1])]["logprob"] == pytest.approx(choice.logprobs.token_logprobs[1])
    with torch.no_grad():
        expected = server.model(torch.tensor([ids])).logits.log_softmax(-1)[0, 0, ids[1]].item()
    assert choice.logprobs.token_logprobs[1] == pytest.approx(expected, abs=1e-5)
    assert listed == ["teacher"]


def test_many_concurrent_clients_all_get_correct_answers(server, tokenizer):
    sequences = [tokenizer.encode(f"Compute {i}+{i % 7}*3", add_special_tokens=False) for i in range(50)]
    with torch.no_grad():
        expected = [server.model(torch.tensor([s])).logits.log_softmax(-1)[0, :-1]
                    .gather(-1, torch.tensor(s[1:])[:, None])[:, 0] for s in sequences]
    batches_before = server.app.state.scorer.batches_run

    def client(_: int) -> float:
        worst = 0.0
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for seq, want in zip(sequences, expected, strict=True):
                body = {"prompt": seq, "max_tokens": 0, "prompt_logprobs": 0}
                entries = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
                got = torch.tensor([entries[t][str(seq[t])]["logprob"] for t in range(1, len(seq))])
                worst = max(worst, (got - want).abs().max().item())
        return worst

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(client, range(8)))
    assert time.time() - started < 120
    assert max(errors) <= 1e-5
    assert server.app.state.scorer.batches_run - batches_before < 400  # requests were batched together


NOT_IMPLEMENTED = "not implemented by this server"
TEXT_PROMPT = ("invalid request: prompt: text prompts are not implemented by this server; send token ids (a list of "
               "ints, or a list of lists for a batch), e.g. from POST /tokenize")


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": [1, 2, 99999]}, 400, "prompt[0] holds token id 99999, outside the vocabulary [0, 300)"),
    ({"prompt": [1, -1]}, 400, "prompt[0] holds token id -1, outside the vocabulary [0, 300)"),
    ({"prompt": [1, 300]}, 400, "prompt[0] holds token id 300, outside the vocabulary [0, 300)"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": [[1, 2], []]}, 400, "prompt[1] is empty"),
    ({"prompt": [5] * 300}, 400,
     "prompt[0] has 300 tokens; with max_tokens=0 that is over this model's maximum context length of 256"),
    ({"prompt": [5] * 256, "max_tokens": 1}, 400,
     "prompt[0] has 256 tokens; with max_tokens=1 that is over this model's maximum context length of 256"),
    ({"prompt": "Compute 1+2"}, 400, TEXT_PROMPT),
    ({"prompt": ["Compute 1+2", "x"]}, 400, TEXT_PROMPT),
    ({"prompt": [1.5, 2]}, 400, "invalid request: prompt.list[int].0: Input should be a valid integer"),
    ({"prompt": [1, 2], "max_tokens": "one"}, 400, "invalid request: max_tokens: Input should be a valid integer"),
    ({"prompt": [1, 2], "max_tokens": -1}, 400, "max_tokens=-1: must be at least 0 (0 scores the prompt)"),
    ({"prompt": [1, 2], "prompt_logprobs": 100}, 400, "prompt_logprobs=100 must be between 0 and 20"),
    ({"prompt": [1, 2], "logprobs": -1}, 400, "logprobs=-1 must be between 0 and 20"),
    ({"prompt": [1, 2], "model": "gpt-9"}, 404, "The model `gpt-9` does not exist; this server has `teacher`"),
    ({}, 400, "invalid request: prompt: Field required"),
    ({"prompt": [1, 2], "stream": True}, 400,
     "stream=True: this server answers in one body; it does not stream: send stream=false"),
    ({"prompt": [1, 2], "stream_options": {"include_usage": True}}, 400,
     "stream_options={'include_usage': True}: only valid with stream=true, which this server does not implement"),
    ({"prompt": [1, 2], "n": -3}, 400, "n=-3: must be at least 1"),
    ({"prompt": [1, 2], "n": 0}, 400, "n=0: must be at least 1"),
    ({"prompt": [1, 2], "n": 2}, 400, "n=2: must be 1 when scoring (max_tokens=0)"),
    ({"prompt": [1, 2], "best_of": 3}, 400, "best_of=3: must equal n (or be absent)"),
    ({"prompt": [1, 2], "max_tokens": 4, "n": 300}, 400, "n=300: at most 256 samples per prompt"),
    ({"prompt": [1, 2], "top_p": "x"}, 400, "invalid request: top_p.float: Input should be a valid number"),
    ({"prompt": [1, 2], "top_p": 0}, 400, "top_p=0: must be in (0, 1]"),
    ({"prompt": [1, 2], "top_p": 1.5}, 400, "top_p=1.5: must be in (0, 1]"),
    ({"prompt": [1, 2], "top_k": -2}, 400, "top_k=-2: must be -1 or 0 (off) or at least 1"),
    ({"prompt": [1, 2], "min_p": 2}, 400, "min_p=2: must be in [0, 1]"),
    ({"prompt": [1, 2], "min_p": -0.1}, 400, "min_p=-0.1: must be in [0, 1]"),
    ({"prompt": [1, 2], "stop": 5}, 400, "invalid request: stop.str: Input should be a valid string"),
    ({"prompt": [1, 2], "max_tokens": 4, "stop": ["x", ""]}, 400,
     "stop=['x', '']: cannot hold an empty string (vLLM's rule); leave it out for no stop string"),
    ({"prompt": [1, 2], "stop": ""}, 400,
     "stop='': cannot hold an empty string (vLLM's rule); leave it out for no stop string"),
    ({"prompt": [1, 2], "max_tokens": 4, "echo": True}, 400,
     "echo=True: not implemented when sampling: ask for prompt_logprobs, or send a scoring request (max_tokens=0) "
     "with echo"),
    ({"prompt": [1, 2], "max_tokens": 4, "logprobs": 2}, 400,
     "logprobs=2: when sampling, this server returns the sampled token's log-prob only (logprobs=0)"),
    ({"prompt": [1, 2], "max_tokens": 4, "top_k": 5}, 400, "top_k=5: not implemented when sampling; leave it at -1"),
    ({"prompt": [1, 2], "max_tokens": 4, "min_p": 0.5}, 400, "min_p=0.5: not implemented when sampling; leave it at 0"),
    ({"prompt": [1, 2], "temperature": -1}, 400, "temperature=-1: must be at least 0"),
    ({"prompt": [1, 2], "presence_penalty": 5}, 400, "presence_penalty=5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "presence_penalty": -2.5}, 400, "presence_penalty=-2.5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "presence_penalty": 2.5}, 400, "presence_penalty=2.5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "presence_penalty": 2}, 400, f"presence_penalty=2: {NOT_IMPLEMENTED}; leave it at 0"),
    ({"prompt": [1, 2], "frequency_penalty": 5}, 400, "frequency_penalty=5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "frequency_penalty": -2.5}, 400, "frequency_penalty=-2.5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "frequency_penalty": 2.5}, 400, "frequency_penalty=2.5: must be in [-2, 2]"),
    ({"prompt": [1, 2], "frequency_penalty": -2}, 400, f"frequency_penalty=-2: {NOT_IMPLEMENTED}; leave it at 0"),
    ({"prompt": [1, 2], "repetition_penalty": 0}, 400, "repetition_penalty=0: must be positive"),
    ({"prompt": [1, 2], "repetition_penalty": 1.2}, 400, f"repetition_penalty=1.2: {NOT_IMPLEMENTED}; leave it at 1"),
    ({"prompt": [1, 2], "logit_bias": {"5": 1.0}}, 400, f"logit_bias={{'5': 1.0}}: {NOT_IMPLEMENTED}"),
    ({"prompt": [1, 2], "suffix": "x"}, 400, f"suffix='x': {NOT_IMPLEMENTED}"),
    ({"prompt": [1, 2], "frobnicate": 1}, 400, "invalid request: frobnicate: not a parameter this server implements"),
    ({"prompt": [1, 2], "echo": "yes"}, 400, "invalid request: echo: Input should be a valid boolean"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, message):
    body = {"max_tokens": 0, **body} if body else body
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["message"] == message
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_what_clients_send_by_default_is_accepted(server):
    """Neutral values of every sampling parameter, as OpenAI's and vLLM's clients send them."""
    body = {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 1.0,
            "n": 1, "best_of": 1, "stream": False, "stop": None, "stop_token_ids": [], "seed": 7,
            "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
            "user": "me", "skip_special_tokens": True, "echo": True, "logprobs": 2, "prompt_logprobs": 1}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1, "echo": True,
                                                             "temperature": 0, "logprobs": 2, "prompt_logprobs": 1},
                       timeout=30).json()
    assert response.json()["choices"][0]["logprobs"] == plain["choices"][0]["logprobs"]  # neutral: no effect
    assert response.json()["choices"][0]["prompt_logprobs"] == plain["choices"][0]["prompt_logprobs"]
    scoring = {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 0, "temperature": 1.0, "stop": ["\n"], "top_p": 0.9,
               "top_k": 0, "prompt_logprobs": 20, "presence_penalty": 0, "repetition_penalty": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=scoring, timeout=30).status_code == 200
    for edge in ({"min_p": 0.0}, {"min_p": 0.5}, {"prompt": [0, 299, 5]}, {"prompt": [5] * 256}):  # all valid
        body = {"prompt": [1, 2], "max_tokens": 0, **edge}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200, edge


def test_malformed_json_and_oversized_bodies(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "invalid request" in response.json()["error"]["message"]
    huge = json.dumps({"prompt": [1] * 40000})
    response = httpx.post(f"{server.url}/v1/completions", content=huge,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 0},
                      timeout=30).status_code == 200


def test_api_key_is_required_when_set(model_dirs):
    with LiveServer(model_dirs["teacher"], api_key=API_KEY) as live:
        body = {"prompt": [1, 2], "max_tokens": 0}
        assert httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{live.url}/v1/completions", json=body, headers=wrong, timeout=30).status_code == 401
        right = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(f"{live.url}/v1/completions", json=body, headers=right, timeout=30).status_code == 200
        with RemoteTeacher(live.url) as anonymous, pytest.raises(OpdError, match="HTTP 401"):
            anonymous.connect(live.tokenizer, 10)
        with RemoteTeacher(live.url, api_key=API_KEY) as keyed:
            keyed.connect(live.tokenizer, 10)


def test_a_server_that_is_down_or_dies_gives_a_clear_error(model_dirs, tokenizer):
    port = free_port()
    with RemoteTeacher(f"http://127.0.0.1:{port}", model="teacher", retries=2, backoff=0.01) as down, \
            pytest.raises(OpdError, match=rf"127.0.0.1:{port} did not answer .* after 3 tries; last failure: Connect"):
        down.score(rollouts_of(tokenizer))
    live = LiveServer(model_dirs["teacher"])
    with RemoteTeacher(live.url, retries=1, backoff=0.01) as teacher:
        with live:
            teacher.connect(tokenizer, 10)
            teacher.score(rollouts_of(tokenizer))
        with pytest.raises(OpdError, match="did not answer"):  # the server has stopped
            teacher.score(rollouts_of(tokenizer))


def test_training_against_the_server_matches_the_in_process_teacher(server, model_dirs, tmp_path):
    local = tmp_path / "local"
    train(load_config(None, tiny_train_overrides(model_dirs, local)), progress=False)
    remote = tmp_path / "remote"
    overrides = tiny_train_overrides(model_dirs, remote) + [f"teacher={server.url}"]
    summary = train(load_config(None, overrides), progress=False)
    assert summary["teacher_accuracy"] is None  # a server only scores
    assert summary["teacher_flops"] is None and summary["student_flops"] > 0  # its architecture is unknown
    for a, b in zip(read_jsonl(local / "metrics.jsonl"), read_jsonl(remote / "metrics.jsonl"), strict=True):
        for key in ("loss", "teacher_kl", "accuracy", "eval_teacher_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_remote_teacher_is_refused_with_the_full_estimator(server, model_dirs, tmp_path):
    overrides = tiny_train_overrides(model_dirs, tmp_path / "run", kl="full") + [f"teacher={server.url}"]
    with pytest.raises(OpdError, match="kl=full needs the teacher's whole distribution"):
        train(load_config(None, overrides), progress=False)
