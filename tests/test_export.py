"""opd export: a LoRA run merged (float32 and bf16), its adapter for vLLM, a full run, and the model card;
each export loads with transformers (peft for the adapter) and gives the run's log-probs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_train_overrides
from opd.cli import main
from opd.config import load_config
from opd.export import log_probs, probe_ids
from opd.models import load_model, quiet_peft
from opd.trainer import train


@pytest.fixture(scope="module")
def lora_run(model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    train(load_config(None, tiny_train_overrides(model_dirs, out, lora_rank=4, lora_targets="q_proj,v_proj",
                                                 lr=5e-2, steps=3, save_every=2)), progress=False)
    return out


def checkpoint_logprobs(run: Path, student: Path, ids: torch.Tensor) -> torch.Tensor:
    """The LoRA checkpoint as training left it: the base student with the adapter applied, unmerged."""
    from peft import PeftModel

    base = load_model(student, torch.device("cpu"), torch.float32)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(run / "checkpoints" / "step_000003")).eval()
    return log_probs(model, ids)


def test_a_lora_run_exports_merged_weights_that_transformers_loads_with_its_logprobs(lora_run, model_dirs, tmp_path,
                                                                                     capsys):
    assert main(["export", str(lora_run / "checkpoints" / "step_000003"), str(tmp_path / "fp32")]) == 0
    facts = json.loads(capsys.readouterr().out)
    exported = tmp_path / "fp32"
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= {
        p.name for p in exported.iterdir()}
    assert not (exported / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()  # transformers alone
    ids = probe_ids(model.config.vocab_size, 64)
    want = checkpoint_logprobs(lora_run, model_dirs["student"], ids)
    base = log_probs(load_model(model_dirs["student"], torch.device("cpu"), torch.float32).eval(), ids)
    assert (want - base).abs().max() > 1e-3  # the adapter moved the model: the comparison below means something
    assert (log_probs(model, ids) - want).abs().max() < 1e-5
    assert facts["max_logprob_difference"] < 1e-5 and facts["step"] == 3
    card = (exported / "README.md").read_text()
    assert f"base_model: {model_dirs['student']}" in card and "method `opd`" in card and "LoRA rank 4" in card
    assert "exported at step 3 of 3" in card and "FLOPs" in card and " ± " in card
    generation = json.loads((exported / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    assert (generation["eos_token_id"], generation.get("pad_token_id")) == (tokenizer.eos_token_id,
                                                                            tokenizer.pad_token_id)
    # bf16: the merge still in float32, the weights rounded once; the card says how far it moved
    assert main(["export", str(lora_run), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    assert 1e-5 < bf16["max_logprob_difference"] < 0.5 and f"{bf16['max_logprob_difference']:.2e}" in (
        tmp_path / "bf16" / "README.md").read_text()


def test_the_adapter_export_loads_on_its_base_in_a_fresh_process(lora_run, model_dirs, tmp_path):
    assert main(["export", str(lora_run), str(tmp_path / "adapter"), "--adapter"]) == 0
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dirs["student"]) and config["r"] == 4
    assert "library_name: peft" in (adapter / "README.md").read_text()
    script = ("import sys, torch; from peft import AutoPeftModelForCausalLM; "
              "from opd.export import log_probs, probe_ids; "
              "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
              "torch.save(log_probs(m, probe_ids(m.config.vocab_size, 64)), sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(adapter), str(tmp_path / "lp.pt")], check=True,
                   capture_output=True)
    got = torch.load(tmp_path / "lp.pt")
    want = checkpoint_logprobs(lora_run, model_dirs["student"], probe_ids(got.shape[-1], 64))
    assert (got - want).abs().max() < 1e-6


def test_a_full_run_exports_its_final_model_and_bad_input_is_refused(model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(None, tiny_train_overrides(model_dirs, run, steps=2)), progress=False)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["max_logprob_difference"] == 0.0 and facts["step"] == 2  # final/, at the summary's step
    assert "exported at step 2 of 2" in (tmp_path / "out" / "README.md").read_text()
    final = load_model(run / "final", torch.device("cpu"), torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), exported.state_dict().values(),
                                                  strict=True))
    for args, message in (([str(run), str(tmp_path / "out")], "already exists"),
                          ([str(run), str(tmp_path / "adapter"), "--adapter"],
                           "--adapter exports a LoRA run's adapter; .* trained all weights"),
                          ([str(model_dirs["student"]), str(tmp_path / "other")], "is not in an opd run directory")):
        assert main(["export", *args]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "other").exists()
