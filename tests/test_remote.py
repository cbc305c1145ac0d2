"""The remote teacher against a live `opd serve` that misbehaves on purpose: 5xx answers, timeouts, and
servers that fail each connection check. Every wait is bounded."""

import asyncio
import json

import pytest
import torch
from fastapi.responses import JSONResponse, PlainTextResponse

from conftest import LiveServer, rollouts_of, with_bos
from opd.errors import OpdError
from opd.http import PROBE_TEXT
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.zoo import build_tokenizer


class DropsAChoice(LiveServer):
    """``opd serve`` whose completions answers leave out their last choice."""

    def __init__(self, model_dir):
        super().__init__(model_dir)

        @self.app.middleware("http")
        async def drop(request, call_next):
            response = await call_next(request)
            if request.url.path != "/v1/completions":
                return response
            body = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
            body["choices"] = body["choices"][:-1]
            return JSONResponse(body)


def test_an_answer_with_a_choice_missing_is_refused(model_dirs, tokenizer):
    with DropsAChoice(model_dirs["teacher"]) as server:
        with RemoteTeacher(server.url, model="teacher", retries=0) as teacher, pytest.raises(OpdError) as refused:
            teacher.score(rollouts_of(tokenizer))
    assert str(refused.value) == (f"teacher server {server.url} answered 2 choices for 3 prompts (one each expected): "
                                  "is it an OpenAI-compatible completions server?")


class Misbehaving(LiveServer):
    """``opd serve`` whose first ``fail_first`` completion requests answer ``status`` (or, with
    ``delay``, come back only after ``delay`` seconds), and whose model listing can be replaced."""

    def __init__(self, model_dir, fail_first=0, status=503, delay=0.0, listing=None, body=None):
        super().__init__(model_dir)
        self.completion_calls = 0

        @self.app.middleware("http")
        async def misbehave(request, call_next):
            if request.url.path == "/v1/models" and listing is not None:
                return JSONResponse(listing)
            if request.url.path == "/v1/completions":
                self.completion_calls += 1
                if self.completion_calls <= fail_first:
                    if delay:
                        await asyncio.sleep(delay)
                    elif body is not None:
                        return PlainTextResponse(body, status_code=status)
                    else:
                        return JSONResponse({"error": {"message": "overloaded"}}, status_code=status)
            return await call_next(request)


def local_scores(model_dirs, tokenizer, rollouts):
    from opd.models import load_model

    teacher = load_model(model_dirs["teacher"], torch.device("cpu"), torch.float32)
    return LocalTeacher(teacher, len(tokenizer)).score(rollouts)


@pytest.mark.parametrize("misbehaviour", [{"status": 500}, {"status": 503}, {"delay": 1.5}])
def test_the_remote_teacher_recovers_from_5xx_and_timeouts(model_dirs, tokenizer, misbehaviour):
    rollouts = rollouts_of(tokenizer)
    with Misbehaving(model_dirs["teacher"], fail_first=2, **misbehaviour) as server:
        with RemoteTeacher(server.url, model="teacher", retries=3, backoff=0.01, timeout=0.5,
                           rows_per_request=8) as teacher:
            scores = teacher.score(rollouts)
        assert server.completion_calls == 3  # two failures, then the answer
    assert torch.allclose(scores, local_scores(model_dirs, tokenizer, rollouts), atol=1e-5)


def test_retries_run_out_with_the_last_failure_named(model_dirs, tokenizer):
    long_error = "x" * 1000  # an error body is quoted up to 300 characters
    with Misbehaving(model_dirs["teacher"], fail_first=100, status=503, body=long_error) as server:
        with RemoteTeacher(server.url, model="teacher", retries=2, backoff=0.01, rows_per_request=8) as teacher, \
                pytest.raises(OpdError) as stopped:
            teacher.score(rollouts_of(tokenizer))
        assert server.completion_calls == 3
    assert str(stopped.value) == (
        f"teacher server {server.url} did not answer POST /v1/completions after 3 tries; last failure: HTTP 503: "
        f"{long_error[:300]}. Is it running? The run's last checkpoint is kept; continue with "
        "`opd train --resume RUN_DIR` once the server is back.")


@pytest.mark.parametrize("status", [400, 422])
def test_a_4xx_is_not_retried(model_dirs, tokenizer, status):
    long_error = "y" * 1000  # quoted up to 500 characters
    with Misbehaving(model_dirs["teacher"], fail_first=100, status=status, body=long_error) as server:
        with RemoteTeacher(server.url, model="teacher", retries=3, backoff=0.01) as teacher, \
                pytest.raises(OpdError) as refused:
            teacher.score(rollouts_of(tokenizer))
        assert server.completion_calls == 1
    assert str(refused.value) == (f"teacher server {server.url}/v1/completions refused the request: HTTP {status}: "
                                  f"{long_error[:500]}")


def listing(**entry):
    return {"object": "list", "data": [{"id": "teacher", "max_model_len": 256, "vocab_size": 300, **entry}]}


@pytest.mark.parametrize("model, served, needed, message", [
    (None, {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}, 10,
     r"serves \['a', 'b'\]; choose one with teacher_model="),
    ("other", None, 10, r"does not serve 'other'; it serves \['teacher'\]"),
    (None, None, 300, r"has a context of 256 tokens, but prompts plus max_new_tokens need up to 300"),
    (None, listing(vocab_size=100), 10, r"has 100 token ids, the student's tokenizer \d+"),
    (None, {"object": "list"}, 10, r"serves \[\]; choose one with teacher_model="),
])
def test_each_connection_check_refuses_with_its_reason(model_dirs, tokenizer, model, served, needed, message):
    with Misbehaving(model_dirs["teacher"], listing=served) as server:
        with RemoteTeacher(server.url, model=model, retries=0) as teacher, pytest.raises(OpdError, match=message):
            teacher.connect(tokenizer, needed)
        if served is None:  # the same server passes with a sane request
            with RemoteTeacher(server.url, retries=0) as teacher:
                teacher.connect(tokenizer, 10)


def test_a_teacher_with_another_tokenizer_is_refused(model_dirs, tokenizer):
    other = build_tokenizer(seed=5, vocab_size=280, operators=2, corpus_lines=200)
    with Misbehaving(model_dirs["teacher"]) as server:
        with RemoteTeacher(server.url, retries=0) as teacher, pytest.raises(OpdError) as refused:
            teacher.connect(other, 10)
    there, here = (t.encode(PROBE_TEXT, add_special_tokens=False)[:12] for t in (tokenizer, other))
    assert str(refused.value) == (
        f"the tokenizer of teacher teacher at {server.url} differs from the student's: a probe text encodes to "
        f"{there}... there and {here}... here. If the teacher's tokenizer differs from the student's, give it as "
        "teacher_tokenizer=DIR (a directory or hub id with its tokenizer files): opd then aligns the two on the text.")


def test_the_tokenizer_probe_adds_no_special_tokens_on_either_side(model_dirs, tokenizer, tmp_path):
    """A tokenizer that adds a BOS to every encoding (as Llama's does) is the same on both sides: the
    probe asks the server, and encodes here, without special tokens."""
    from opd.models import load_tokenizer, save_model
    from opd.zoo import make_model

    bos_tokenizer, bos = with_bos(model_dirs["teacher"])
    save_model(make_model(bos_tokenizer, layers=1, width=16, seed=1), bos_tokenizer, tmp_path / "bos")
    with Misbehaving(tmp_path / "bos") as server:
        teacher = RemoteTeacher(server.url, retries=0)
        sent = []
        real_request = teacher.http.request
        teacher.http.request = lambda method, path, json=None: sent.append((path, json)) or real_request(method, path,
                                                                                                         json)
        teacher.connect(load_tokenizer(tmp_path / "bos"), 10)
        probe = [body for path, body in sent if path == "/tokenize"]
        assert probe == [{"model": "teacher", "prompt": PROBE_TEXT, "add_special_tokens": False}]
        served = real_request("POST", "/tokenize", probe[0])["tokens"]
        teacher.close()
    assert served == bos_tokenizer.encode(PROBE_TEXT, add_special_tokens=False) and served[0] != bos


@pytest.mark.parametrize("body", [{"prompt": "x", "modle": "teacher"}, {"prompt": "x", "add_special_token": False},
                                  {"prompt": 5}])
def test_tokenize_refuses_what_it_does_not_implement(model_dirs, body):
    import httpx

    with Misbehaving(model_dirs["teacher"]) as server:
        response = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert response.status_code == 400 and "invalid request" in response.json()["error"]["message"]


def test_the_defaults_retry_four_times_with_exponential_backoff(tokenizer, monkeypatch):
    import opd.http
    from opd.server import free_port

    slept = []
    monkeypatch.setattr(opd.http.time, "sleep", slept.append)
    port = free_port()
    with RemoteTeacher(f"http://127.0.0.1:{port}/", model="teacher") as down, pytest.raises(  # trailing / dropped
            OpdError, match=rf"teacher server http://127.0.0.1:{port} did not answer POST /v1/completions "
                            r"after 5 tries; last failure: Connect"):
        down.score(rollouts_of(tokenizer))
    assert slept == [0.5, 1.0, 2.0, 4.0]


def test_rows_go_out_sixteen_to_a_request_and_come_back_in_order(model_dirs, tokenizer):
    from opd.rollouts import pack_pairs

    rollouts = rollouts_of(tokenizer)
    many = pack_pairs([r[m > 0].tolist() for r, m in zip(rollouts.tokens, rollouts.attention_mask, strict=True)] * 11,
                      [[tokenizer.eos_token_id]] * 33, tokenizer.pad_token_id)  # 33 rows, each a whole sequence
    with Misbehaving(model_dirs["teacher"]) as server:
        with RemoteTeacher(server.url, model="teacher") as teacher:
            scores = teacher.score(many)
        assert server.completion_calls == 3  # 16 + 16 + 1
    assert torch.allclose(scores, local_scores(model_dirs, tokenizer, many), atol=1e-5)


def test_a_run_closes_its_teacher_servers_connections_when_it_ends_or_a_check_refuses(model_dirs, cross_dirs,
                                                                                       tmp_path, monkeypatch):
    from conftest import LiveServer, tiny_train_overrides
    from opd.config import load_config
    from opd.trainer import train

    made = []
    real_init = RemoteTeacher.__init__
    monkeypatch.setattr(RemoteTeacher, "__init__", lambda self, *a, **k: made.append(self) or real_init(self, *a, **k))
    with LiveServer(model_dirs["teacher"]) as live:
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", steps=1, teacher=live.url)),
              progress=False)
        assert len(made) == 1 and made[0].http.client.is_closed
        with pytest.raises(OpdError, match="exceeds max_prompt_tokens"):  # a check after connecting refuses
            train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "long", steps=1, teacher=live.url,
                                                         max_prompt_tokens=3)), progress=False)
        assert len(made) == 2 and made[1].http.client.is_closed
    with LiveServer(cross_dirs["teacher"]) as other, pytest.raises(OpdError, match="tokenizer"):  # connect refuses
        train(load_config(None, tiny_train_overrides(model_dirs, tmp_path / "other", steps=1, teacher=other.url)),
              progress=False)
    assert len(made) == 3 and made[2].http.client.is_closed


def test_the_first_id_past_the_tokenizer_is_refused_naming_the_engine_and_the_fix():
    from opd.samplers.remote import check_ids

    check_ids([[0, 7], []], 8, "engine", "fix it")  # the tokenizer's last id is its own
    check_ids([[99]], None, "engine", "fix it")  # the tokenizer's size unknown: nothing to check
    with pytest.raises(OpdError, match=r"^engine sampled token id 8, past the student tokenizer's 8 ids: the model's "
                       r"embedding is padded past its tokenizer \(e\.g\. Qwen's 151,936 rows for 151,669 tokens\) and "
                       r"the engine samples the padded rows; fix it$"):
        check_ids([[1], [0, 8]], 8, "engine", "fix it")
