"""``opd serve`` answers no 5xx to any request body: a property-based test (Hypothesis) over the completions
request's fields, each drawn from its own type and from every other JSON type, NaN and the infinities included."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.models import load_model, load_tokenizer
from opd.server import ServerConfig, create_app
from opd.server.api import CompletionRequest

floats = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0]), st.floats(-3, 3),
                   st.floats(allow_nan=True, allow_infinity=True))
small_ints = st.integers(-3, 12)
ints = st.one_of(small_ints, st.integers(-2**70, 2**70))
token_ids = st.lists(st.integers(-5, 400), max_size=12)
anything = st.recursive(st.none() | st.booleans() | floats | ints | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                     max_size=3), max_leaves=6)
OWN = {"prompt": st.one_of(token_ids, st.lists(token_ids, max_size=3), st.text(max_size=8)),
       "max_tokens": small_ints, "temperature": floats, "top_p": floats, "min_p": floats, "top_k": small_ints,
       "n": st.integers(-1, 3), "best_of": st.integers(-1, 3), "logprobs": small_ints, "prompt_logprobs": small_ints,
       "seed": ints, "presence_penalty": floats, "frequency_penalty": floats, "repetition_penalty": floats,
       "logit_bias": st.dictionaries(st.text(max_size=3), floats, max_size=2), "stop": st.text(max_size=3),
       "stop_token_ids": token_ids, "echo": st.booleans(), "stream": st.booleans(), "ignore_eos": st.booleans()}
NAMES = list(CompletionRequest.model_fields) + ["unknown_field"]


VALID = {"temperature": st.floats(0, 2), "top_p": st.floats(0.1, 1), "n": st.integers(1, 2),
         "seed": st.integers(0, 9), "top_k": st.integers(0, 5), "logprobs": st.integers(0, 2), "echo": st.booleans()}


@st.composite
def bodies(draw):
    """A request that would be served (so a bad value reaches the code past the checks), or an empty one; then
    one or two fields set to a value of their own type or of any JSON type (an unknown field among them)."""
    body = {}
    if draw(st.integers(0, 4)):
        body = {"prompt": draw(st.lists(st.integers(3, 250), min_size=1, max_size=8)),
                "max_tokens": draw(st.integers(0, 3) | st.integers(1, 3))}
        body |= draw(st.fixed_dictionaries({}, optional=VALID))
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(list(OWN) if draw(st.integers(0, 3)) else NAMES))
        own = OWN.get(name)
        body[name] = draw(own) if own is not None and draw(st.integers(0, 3)) else draw(anything)
    return body


@pytest.fixture(scope="module")
def client(model_dirs):
    model = load_model(model_dirs["teacher"], torch.device("cpu"), torch.float32).eval()
    app = create_app(model, load_tokenizer(model_dirs["teacher"]),
                     ServerConfig(model_name="teacher", api_key=None, max_model_len=24, max_body_bytes=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies())
def test_no_request_body_gets_a_5xx(client, body):
    response = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_number_is_a_400_naming_the_field(client, field, value):
    response = client.post("/v1/completions", content=f'{{"prompt": [1, 2], "max_tokens": 2, "{field}": {value}}}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(f"invalid request: {field}")
