"""The student's rollouts from a server (``sampler=http://``): ``opd serve`` samples in vLLM's shapes, the
weights reach it after every step (LoRA adapter or full reload), the truncated importance weights, and
what happens when the server misbehaves."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import LiveServer, read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.losses import importance_sampling_loss, sampling_logprobs, truncated_importance_weights
from opd.samplers.remote import RemoteSampler, choice_tokens
from opd.scoring import token_logprobs
from opd.server.worker import ApiError, ServedModel
from opd.trainer import train


@pytest.fixture(scope="module")
def student_server(model_dirs):
    with LiveServer(model_dirs["student"]) as live:
        yield live


def completions(server, **body) -> list[dict]:
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_served_samples_carry_the_sampling_distributions_log_probs(student_server, tokenizer):
    """n samples per prompt, grouped by prompt; each token's log-prob is the one under the tempered,
    top-p distribution it was drawn from (what the trainer recomputes), EOS kept and reported."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    choices = completions(student_server, model="teacher", prompt=prompts, n=3, max_tokens=12, temperature=0.8,
                          top_p=0.9, logprobs=0, seed=3, return_token_ids=True, skip_special_tokens=False)
    assert [c["index"] for c in choices] == list(range(6))
    model = student_server.model
    for choice in choices:
        prompt = prompts[choice["index"] // 3]
        ids, values = choice_tokens(choice, "test")
        assert choice["prompt_token_ids"] == prompt and 1 <= len(ids) <= 12
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1, : len(tokenizer)]
        expected = sampling_logprobs(logits, 0.8, 0.9).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(values), expected, atol=1e-5)
        ended = ids[-1] == tokenizer.eos_token_id
        assert choice["finish_reason"] == ("stop" if ended else "length") and choice["stop_reason"] is None
        assert len(ids) == 12 or ended
        assert tokenizer.eos_token_id not in ids[:-1]


def test_a_seed_repeats_a_draw_and_token_id_strings_parse(student_server):
    body = {"prompt": [[5, 6, 7]], "n": 4, "max_tokens": 10, "logprobs": 0, "seed": 11,
            "return_tokens_as_token_ids": True}
    first, again = completions(student_server, **body), completions(student_server, **body)
    assert [choice_tokens(c, "x") for c in first] == [choice_tokens(c, "x") for c in again]
    assert all(t.startswith("token_id:") for t in first[0]["logprobs"]["tokens"])
    other = completions(student_server, **{**body, "seed": 12})
    assert [choice_tokens(c, "x") for c in first] != [choice_tokens(c, "x") for c in other]


def test_stop_token_ids_end_a_sample_and_are_reported(student_server):
    common = {"prompt": [5, 6, 7], "n": 8, "max_tokens": 16, "logprobs": 0, "seed": 1, "return_token_ids": True}
    free = completions(student_server, **common, ignore_eos=True)
    stop = free[0]["token_ids"][2]  # a token the model does draw here
    stopped = completions(student_server, **common, stop_token_ids=[stop], ignore_eos=True)
    hits = [c for c in stopped if c["finish_reason"] == "stop"]
    assert hits and all(c["token_ids"][-1] == stop and c["stop_reason"] == stop for c in hits)
    assert all(stop not in c["token_ids"][:-1] for c in stopped)


def test_the_rollouts_of_a_server_equal_the_trainers_layout(student_server, tokenizer):
    sampler = RemoteSampler(student_server.url, rows_per_request=4)
    try:
        sampler.connect(tokenizer, 64)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        rollouts = sampler.sample(prompts, samples_per_prompt=2, max_new_tokens=8, temperature=1.0, top_p=1.0,
                                  eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=(0, 0, 0))
    finally:
        sampler.close()
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    own = token_logprobs(student_server.model, rollouts, len(tokenizer)).detach()
    assert (own - rollouts.engine_logprobs).mul(rollouts.completion_mask).abs().max() <= 1e-5
    assert rollouts.completion_mask.sum() == sum(len(c) for c in rollouts.completion_ids())


def test_a_conversation_turns_stop_ids_go_to_the_server(student_server, tokenizer):
    """A turn's stop ids beyond the EOS (``templates.turn_stops``) reach the server as ``stop_token_ids``: a row
    ends on the first of them it draws, which it keeps."""
    free = completions(student_server, prompt=[5, 6, 7], n=8, max_tokens=16, logprobs=0, seed=1,
                       return_token_ids=True, ignore_eos=True)
    stop = free[0]["token_ids"][2]  # a token the model does draw here
    sampler = RemoteSampler(student_server.url, rows_per_request=8)
    try:
        sampler.connect(tokenizer, 64)
        rollouts = sampler.sample([[5, 6, 7]], samples_per_prompt=8, max_new_tokens=16, temperature=1.0, top_p=1.0,
                                  eos_id=[tokenizer.eos_token_id, stop], pad_id=tokenizer.pad_token_id, seed=(1, 0, 0))
    finally:
        sampler.close()
    rows = rollouts.completion_ids()
    assert any(ids[-1] == stop for ids in rows)
    assert all(stop not in ids[:-1] and tokenizer.eos_token_id not in ids[:-1] for ids in rows)


def test_a_server_that_samples_past_the_tokenizer_is_named(student_server, tokenizer):
    """vLLM samples every row of a padded embedding (Qwen: 151,936 rows, 151,669 tokens); a token past the
    tokenizer has no text and no row in the trainer's scoring: the run stops naming the server, not a gather."""
    sampler = RemoteSampler(student_server.url, rows_per_request=4)
    try:
        sampler.connect(tokenizer, 64)
        assert sampler.vocab_size == len(tokenizer)
        sampler.vocab_size = 8  # as if the tokenizer had 8 ids and the model more rows: the ids drawn are past it
        with pytest.raises(OpdError, match=r"sampled token id \d+, past the student tokenizer's 8 ids"):
            sampler.sample([[5, 6, 7]], samples_per_prompt=4, max_new_tokens=8, temperature=1.0, top_p=1.0,
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=(0, 0, 0))
    finally:
        sampler.close()


def test_truncated_importance_weights_and_the_loss_that_uses_them():
    trainer = torch.tensor([[0.0, -1.0, -2.0, -0.5]], dtype=torch.float64)
    engine = torch.tensor([[0.0, -2.5, -1.0, -0.4]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    weights = truncated_importance_weights(trainer, engine, mask, cap=2.0)
    expected = [1.0, 2.0, float(torch.exp(torch.tensor(-1.0))), float(torch.exp(torch.tensor(-0.1)))]
    assert torch.allclose(weights[0], torch.tensor(expected, dtype=torch.float64))
    # the gradient: -(1/N) sum_t w_t A_t d log pi(x_t) at pi = pi_old
    learner = trainer.clone().requires_grad_(True)
    advantages = torch.tensor([[0.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    importance_sampling_loss(learner, trainer, advantages, mask, weights=weights).backward()
    assert torch.allclose(learner.grad, -(weights * advantages * mask) / 3)


def run_against(server, model_dirs, out, **extra) -> list[dict]:
    overrides = tiny_train_overrides(model_dirs, out, **extra) + [f"sampler={server.url}"]
    train(load_config(None, overrides), progress=False)
    return read_jsonl(out / "metrics.jsonl")[1:]


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 4}], ids=["full", "lora"])
def test_after_every_step_the_server_scores_like_the_trainer(model_dirs, tmp_path, extra):
    """The weights reach the server before every draw: its log-probs of the step's samples equal the trainer's
    (which moved at every step) to 1e-5, the importance weights are 1; and the server ends with the trained
    student: a probe it scores (the adapter by its name) equals the final model's."""
    from opd.models import load_model

    with LiveServer(model_dirs["student"]) as live:
        records = run_against(live, model_dirs, tmp_path / "run", **extra)
        assert all(r["engine_max_abs_logprob_gap"] <= 1e-5 for r in records)
        assert all(r["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5) for r in records)
        assert all(r["is_truncated_share"] == 0 for r in records)
        served = live.app.state.served
        name = next(iter(served.adapters)) if extra else served.name
        assert len(served.adapters) == (1 if extra else 0) and (served.reloads == 5) != bool(extra)
        probe = [5, 6, 7, 8, 9, 10]
        body = {"model": name, "prompt": probe, "max_tokens": 0, "prompt_logprobs": 0}
        entries = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
        got = torch.tensor([entries["prompt_logprobs"][t][str(probe[t])]["logprob"] for t in range(1, len(probe))])
    final = load_model(tmp_path / "run" / "final", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = final(torch.tensor([probe])).logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(probe[1:])[:, None])
    assert (got - want[:, 0]).abs().max() <= 1e-5
    assert not any((tmp_path / "run" / "sampler").glob("*.tmp"))  # only the newest weights are kept
    assert len(list((tmp_path / "run" / "sampler").iterdir())) == 1


def test_async_rollouts_train_on_samples_one_update_old(model_dirs, tmp_path):
    with LiveServer(model_dirs["student"]) as live:
        records = run_against(live, model_dirs, tmp_path / "run", async_rollouts=1)
        assert live.app.state.served.reloads == 4  # w0 for steps 1-2, w1 for 3, w2 for 4, and the final w4
    assert records[0]["engine_max_abs_logprob_gap"] <= 1e-5  # step 1: drawn with the weights it starts from
    assert all(r["engine_max_abs_logprob_gap"] > 1e-3 for r in records[1:])  # later: one update behind
    assert all(r["is_ratio_max"] <= 2.0 or r["is_truncated_share"] > 0 for r in records)


def test_an_unreachable_or_wrong_server_is_refused_before_any_compute(model_dirs, cross_dirs, tmp_path):
    from opd.server import free_port

    out = tmp_path / "run"
    overrides = tiny_train_overrides(model_dirs, out) + [f"sampler=http://127.0.0.1:{free_port()}"]
    with pytest.raises(OpdError, match="rollout server .* did not answer GET /v1/models"):
        train(load_config(None, overrides), progress=False)
    assert not out.exists()
    with LiveServer(model_dirs["student"]) as live:
        with pytest.raises(OpdError, match=r"rollout server .* does not serve 'nope'; it serves \['teacher'\]"):
            train(load_config(None, tiny_train_overrides(model_dirs, out) + [f"sampler={live.url}",
                                                                              "sampler_model=nope"]), progress=False)
    assert not out.exists()
    with LiveServer(cross_dirs["teacher"]) as wrong:  # another model, another tokenizer
        with pytest.raises(OpdError, match="the tokenizer of sampler teacher at .* differs from the student's"):
            train(load_config(None, tiny_train_overrides(model_dirs, out) + [f"sampler={wrong.url}"]), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method, extra, message", [
    ("reload", {}, "pushing the weights after 0 updates to the rollout server failed: .*HTTP 400.*disk full"),
    ("load_adapter", {"lora_rank": 4}, "failed: .*HTTP 400.*no LoRA here.*--enable-lora"),
])
def test_a_failed_weight_push_stops_at_the_step_and_the_checkpoint_is_kept(model_dirs, tmp_path, monkeypatch,
                                                                          method, extra, message):
    real = getattr(ServedModel, method)
    calls = []

    def failing(self, *args):
        calls.append(args)
        if len(calls) > 2:  # the first two pushes (before steps 1 and 2) work
            raise ApiError(400, "disk full" if method == "reload" else "no LoRA here")
        return real(self, *args)

    monkeypatch.setattr(ServedModel, method, failing)
    out = tmp_path / "run"
    with LiveServer(model_dirs["student"]) as live:
        with pytest.raises(OpdError, match=message.replace("0 updates", "2 updates")):
            run_against(live, model_dirs, out, **extra)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    assert (out / "checkpoints" / "step_000002").is_dir()
    monkeypatch.setattr(ServedModel, method, real)
    with LiveServer(model_dirs["student"]) as live:  # the server is fixed: --resume finishes the run
        overrides = tiny_train_overrides(model_dirs, out, **extra) + [f"sampler={live.url}"]
        train(load_config(None, overrides), resume=out, progress=False)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_server_that_dies_mid_run_is_retried_then_stops_the_run(model_dirs, tmp_path, monkeypatch):
    import opd.http

    slept = []
    monkeypatch.setattr(opd.http.time, "sleep", slept.append)
    out = tmp_path / "run"
    live = LiveServer(model_dirs["student"])
    served_requests = []
    with live:
        real = live.app.state.scorer.submit

        def dying(job):
            if job.kind == "sample":
                served_requests.append(job)
                if len(served_requests) > 2:
                    raise RuntimeError("the machine went away")
            return real(job)

        live.app.state.scorer.submit = dying
        # a 500 or a reset connection, as the dying server's thread ends the request
        with pytest.raises(OpdError, match=r"rollout server .* did not answer POST /v1/completions after 5 tries; "
                                           r"last failure: (HTTP 500|ReadError|RemoteProtocolError).*--resume"):
            run_against(live, model_dirs, out)
    assert [s for s in slept if s >= 0.5] == [0.5, 1.0, 2.0, 4.0]  # the backoff (time.sleep is patched for all)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("method", ["opd", "rl"])
def test_the_update_weights_each_tokens_advantage_by_its_importance_weight(model_dirs, tmp_path, method):
    """The loss the trainer builds multiplies every token's advantage by ``is_weights``: weights of 2 on every
    token double the gradient, and weights of 0 on one row remove that row's part."""
    from conftest import unequal_batch
    from opd.setup import open_session

    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", method=method))
    session = open_session(config)
    rollouts = unequal_batch(session)
    rollouts.teacher_logprobs = session.teacher_view.teacher.score(rollouts)
    rollouts.advantages = session.objective.advantages(rollouts)

    def gradient(weights) -> torch.Tensor:
        session.student.zero_grad()
        rollouts.is_weights = weights
        session.loss_module(rollouts, rollouts.num_completion_tokens).backward()
        return torch.cat([p.grad.flatten() for p in session.trainable])

    plain = gradient(None)
    assert plain.abs().max() > 0
    assert torch.allclose(gradient(torch.full_like(rollouts.completion_mask, 2.0)), 2 * plain, rtol=1e-5, atol=1e-10)
    first_row_only = torch.zeros_like(rollouts.completion_mask)
    first_row_only[0] = 1.0
    rollouts.is_weights = None
    alone = rollouts.select(slice(0, 1))
    session.student.zero_grad()
    session.loss_module(alone, rollouts.num_completion_tokens).backward()
    expected = torch.cat([p.grad.flatten() for p in session.trainable])
    assert torch.allclose(gradient(first_row_only), expected, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(expected, plain, rtol=1e-2)


def test_a_real_opd_serve_process_samples_for_a_lora_run(model_dirs, tmp_path):
    """The whole server mode end to end as a user runs it: `opd serve` in its own process, then a LoRA run
    whose samples it draws from the adapter loaded after every step."""
    import subprocess
    import sys

    from opd.http import wait_until_healthy
    from opd.server import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "opd", "serve", str(model_dirs["student"]), "--port", str(port),
                               "--name", "student"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=60, every=0.2)
        live = type("Live", (), {"url": f"http://127.0.0.1:{port}"})
        records = run_against(live, model_dirs, tmp_path / "run", lora_rank=4)
        listing = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["engine_max_abs_logprob_gap"] <= 1e-5 for r in records)
    run_name = (tmp_path / "run").name
    assert [m["id"] for m in listing] == ["student", f"opd-{run_name}-step-4"]
    assert listing[1]["parent"] == "student"


def test_a_server_that_ignores_the_weights_it_is_sent_stops_the_run(model_dirs, tmp_path, monkeypatch):
    """A sync that fails silently (the server answers 200 but keeps its old weights) is caught by comparing its
    log-probs with the trainer's, before an update on its samples."""
    monkeypatch.setattr(ServedModel, "reload", lambda self, path: 0)  # accepts, applies nothing
    out = tmp_path / "run"
    with LiveServer(model_dirs["student"]) as live:
        with pytest.raises(OpdError, match=r"step 2: the rollout server's log-probs of its samples differ from the "
                                           r"trainer's by 0\.\d+ nats per token .*engine_gap_limit=0.01"):
            run_against(live, model_dirs, out, engine_gap_limit=0.01)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert read_jsonl(out / "metrics.jsonl")[1]["engine_mean_abs_logprob_gap"] < 1e-5  # step 1: the same weights
