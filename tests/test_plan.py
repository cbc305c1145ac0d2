"""opd plan: parameter counts from config.json alone, the memory model's terms against what torch actually
holds (autograd's saved tensors, the KV cache, a real peft model's trainable count), FSDP's sharding, the
checks, the probe, and the short form opd train prints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from conftest import tiny_train_overrides
from opd.cli import main
from opd.config import TrainConfig, load_config
from opd.models import add_lora
from opd.plan import ModelFacts, activation_values, kv_cache, memory, no_grad_forward
from opd.trainer import train


def qwen3(h: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int = 512) -> Qwen3Config:
    return Qwen3Config(hidden_size=h, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=h // heads, num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=512, tie_word_embeddings=False)


@pytest.mark.parametrize("shape", [(96, 288, 3, 3, 2), (256, 2048, 4, 1, 3), (128, 1024, 2, 2, 4)])
def test_parameters_from_the_config_alone_and_the_lora_count_match_real_models(shape):
    config = qwen3(*shape)
    facts = ModelFacts.of("m", config, lora=TrainConfig(lora_rank=4, lora_targets="q_proj,v_proj,down_proj"))
    model = AutoModelForCausalLM.from_config(config)
    assert facts.params == model.num_parameters()
    assert facts.layer_params * facts.layers == facts.shape.body_params - model.model.norm.weight.numel()
    h, intermediate, heads, kv_heads, layers = shape
    got = (facts.hidden, facts.intermediate, facts.layers, facts.vocab, facts.context)
    assert got == (h, intermediate, layers, 512, 512)
    assert facts.kv_dim == kv_heads * (h // heads) and facts.shape.d_attn == h
    peft = add_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
    lora = TrainConfig(lora_rank=4, lora_targets="q_proj,v_proj,down_proj")
    assert facts.trainable == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert ModelFacts.of("m", None, model=peft, lora=lora).trainable == facts.trainable  # a loaded PeftModel


def test_tied_embeddings_count_once_and_the_head_stays_out_of_the_body():
    tied = qwen3(64, 128, 2, 2, 2)
    tied.tie_word_embeddings = True
    facts, model = ModelFacts.of("m", tied), AutoModelForCausalLM.from_config(tied)
    assert facts.params == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert facts.shape.body_params == facts.params - 512 * 64
    assert ModelFacts.of("m", None, model=model).shape.body_params == facts.shape.body_params


@pytest.mark.parametrize("device, dtype, want", [("cuda", "auto", "bfloat16"), ("cuda:1", "auto", "bfloat16"),
                                                 ("cpu", "auto", "float32"), ("cpu", "bf16", "bfloat16"),
                                                 ("cuda", "fp32", "float32"), ("cpu", "fp16", "float16"),
                                                 ("cpu", "float16", "float16")])
def test_the_planned_dtype_is_what_opd_train_picks(device, dtype, want):
    from opd.plan import training_dtype

    assert training_dtype(TrainConfig(device=device, dtype=dtype)) == want


def test_every_memory_term_in_a_worked_example():
    """A 4-layer student (hidden 64, MLP 128, 2 kv heads of 32), an 8-layer teacher (hidden 128), float32,
    16 prompts x 4 samples on 2 ddp ranks, grad_accum 2, prompts of 20 tokens, 10 new, kl=full: each term
    by hand."""
    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    config = TrainConfig(prompts_per_step=16, samples_per_prompt=4, grad_accum=2, max_new_tokens=10, kl="full",
                         device="cpu", eval_examples=300, eval_batch=50, eval_samples=2)
    parts = memory(student, teacher, config, 2, "ddp", 20).parts
    assert parts["student_weights"] == 4 * student.params and parts["teacher_weights"] == 4 * teacher.params
    assert parts["gradients"] == 4 * student.params and parts["optimizer"] == 8 * student.params
    rows = 32  # this rank's: 16 x 4 / 2
    # sampling: the cache of 30 positions and two float32 logit rows, or reading the prompts: the cache of 20,
    # per token 3 I + 7 h values, and the padded prompts' mask (booleans and one float32 conversion)
    decoding = rows * 30 * 4 * 2 * 64 * 4 + 2 * rows * 512 * 4
    prompts = rows * 20 * 4 * 2 * 64 * 4 + rows * 20 * (3 * 128 + 7 * 64) * 4 + rows * 20 * 20 * (1 + 4)
    assert parts["sampling_kv_cache"] == max(decoding, prompts)
    # scoring: the teacher's hidden states at completion positions, its forward over the 32 rows of 30 tokens and
    # their mask, and one chunk of its logits (twice: logits, log-softmax)
    kept_hidden = rows * 10 * 128 * 4
    assert parts["scoring"] == kept_hidden + rows * 30 * (3 * 256 + 7 * 128) * 4 + rows * 30 * 30 * 5 \
        + rows * 10 * 512 * 4 * 2
    # a micro-batch: 16 rows, 4 prompts read once; per token 4 layers x (10 h + 4 d_kv + 4 I) + 2 h values
    tokens = 4 * 20 + 16 * 10
    values = 4 * (10 * 64 + 4 * 64 + 4 * 128) + 2 * 64
    logits = 16 * 10 * 512 * 4 * 5  # one chunk (all 160 rows fit), five float32 copies under kl=full
    mask = 16 * 30 * 30 * (1 + (4 + 1) * 4)  # booleans, and a float32 copy kept by each of the 4 layers (+1)
    assert parts["training_activations"] == tokens * values * 4 + logits + kept_hidden + mask
    # evaluation: 50 prompts x 2 samples of the teacher (the larger cache) at step 0
    assert parts["evaluation"] == 100 * 30 * 8 * 2 * 128 * 4 + 2 * 100 * 512 * 4
    sampled = TrainConfig(**{**config.to_dict(), "kl": "sampled"})
    assert memory(student, teacher, sampled, 2, "ddp", 20).parts["training_activations"] == \
        tokens * values * 4 + 16 * 10 * 512 * 4 * 3 + mask
    alone = memory(student, None, config, 2, "ddp", 20).parts
    assert alone["teacher_weights"] == alone["scoring"] == 0


@pytest.mark.parametrize("shape", [(96, 288, 3, 3, 2), (256, 2048, 4, 1, 3), (384, 512, 6, 6, 1)])
def test_the_activation_term_is_what_autograd_saves_for_qwen3_layers(shape):
    h, intermediate, heads, kv_heads, layers = shape
    model = AutoModelForCausalLM.from_config(qwen3(*shape))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows, length = 4, 64
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=torch.randint(0, 512, (rows, length)))
    measured = sum(size for ptr, size in saved.items() if ptr not in params)
    kv_dim = kv_heads * (h // heads)
    estimate = rows * length * (layers * activation_values(h, kv_dim, intermediate) + 2 * h) * 4
    assert estimate == pytest.approx(measured, rel=0.05)


def test_the_kv_cache_term_is_the_cache_a_forward_builds():
    config = qwen3(128, 256, 4, 2, 3)
    model = AutoModelForCausalLM.from_config(config)
    facts = ModelFacts.of("m", config)
    train_config = TrainConfig(prompts_per_step=3, samples_per_prompt=2, max_new_tokens=10)
    cache = model(input_ids=torch.randint(0, 512, (6, 20 + 10)), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache(facts, 6, 30, 4) == held
    parts = memory(facts, None, train_config, 1, "ddp", 20).parts
    decoding = held + 2 * 6 * 512 * 4  # and the last position's logits, twice
    assert parts["sampling_kv_cache"] == max(decoding, kv_cache(facts, 6, 20, 4) + no_grad_forward(facts, 6, 20, 4))


def test_fsdp_shards_weights_gradients_and_moments_and_ddp_does_not():
    facts = ModelFacts.of("m", qwen3(128, 256, 4, 2, 3))
    config = TrainConfig(prompts_per_step=8, device="cpu", eval_examples=8)  # training, not evaluation, peaks
    one, ddp, fsdp = (memory(facts, facts, config, n, p, 20) for n, p in ((1, "ddp"), (4, "ddp"), (4, "fsdp")))
    for name in ("gradients", "optimizer"):
        assert ddp.parts[name] == one.parts[name] == 4 * fsdp.parts[name]
    # the shards and the full copy that samples; in a step the root group and two layers unsharded, and grads
    assert fsdp.parts["student_weights"] == one.parts["student_weights"] // 4 + one.parts["student_weights"]
    root = facts.params - 3 * facts.layer_params
    assert fsdp.parts["fsdp_gathered"] == 2 * (root + 2 * facts.layer_params) * 4 and one.parts["fsdp_gathered"] == 0
    assert fsdp.parts["teacher_weights"] == one.parts["teacher_weights"]  # the teacher is whole on every rank
    assert ddp.parts["sampling_kv_cache"] * 4 == one.parts["sampling_kv_cache"]  # a quarter of the rows each
    assert ddp.parts["evaluation"] == one.parts["evaluation"]  # rank 0 evaluates the whole held-out set
    assert one.parts["optimizer"] == 2 * one.parts["gradients"] == 2 * facts.params * 4  # float32 on a CPU
    assert one.peak > ddp.peak > fsdp.peak
    big = TrainConfig(eval_examples=256, eval_samples=4)
    small = TrainConfig(eval_examples=256, eval_samples=4, eval_batch=16)
    assert memory(facts, facts, big, 1, "ddp", 20).parts["evaluation"] > 15 * memory(
        facts, facts, small, 1, "ddp", 20).parts["evaluation"]  # 1024 rows at once, or 64


def test_opd_plan_probes_a_run_and_writes_nowhere(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_train_overrides(model_dirs, tmp_path / "never") if not a.startswith("out=")]
    assert main(["plan", *args, "--nproc", "1,2", "--probe-steps", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(m["parallel"], m["processes"]) for m in plan["layouts"]] == [("ddp", 1), ("ddp", 2), ("fsdp", 2)]
    assert plan["probe"]["step_seconds"] > 0 and plan["probe"]["wall_seconds"] > 4 * plan["probe"]["step_seconds"]
    assert plan["probe"]["evaluations"] == 3  # steps 0, 2 and 4
    assert plan["student"]["params"] == AutoModelForCausalLM.from_pretrained(model_dirs["student"]).num_parameters()
    assert all(kind == "ok" for kind, _ in plan["checks"])
    assert not (tmp_path / "never").exists() and not (tmp_path / "runs").exists()


def test_config_only_models_plan_without_a_probe_and_failed_checks_exit_2(model_dirs, cross_dirs, tmp_path, capsys):
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
        shutil.copy(model_dirs[name] / "config.json", tmp_path / name / "config.json")
    args = [f"student={tmp_path / 'student'}", f"teacher={tmp_path / 'teacher'}"]
    assert main(["plan", *args]) == 2
    assert "--prompt-tokens" in capsys.readouterr().err
    assert main(["plan", *args, "--prompt-tokens", "40", "--device-memory", "1"]) == 0
    printed = capsys.readouterr().out
    assert "no probe, no time estimate" in printed and "no tokenizer in" in printed and "fits" in printed
    assert "time (probe" not in printed
    cross = [f"student={cross_dirs['student']}", f"teacher={cross_dirs['teacher']}", "kl=full"]
    assert main(["plan", *cross, "--no-probe"]) == 2
    assert "[error] the tokenizers of the student" in capsys.readouterr().out


def test_opd_train_prints_the_short_form_as_it_starts(model_dirs, tmp_path, capsys):
    config = load_config(None, tiny_train_overrides(model_dirs, tmp_path / "run", steps=1, lora_rank=2,
                                                    lora_targets="q_proj"))
    train(config, progress=False)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("opd: plan:"))
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    trained = 2 * sum(layer.self_attn.q_proj.in_features + layer.self_attn.q_proj.out_features
                      for layer in student.model.layers)
    assert f"({trained / 1e6:.2f}M trained)" in line and "per device (ddp, 1 process)" in line
    assert "FLOPs per step" in line


def test_the_planned_flops_are_opd_trains_accounting_per_step_and_for_the_run():
    from opd.flops import StepKind, step_flops
    from opd.plan import run_flops

    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    config = TrainConfig(prompts_per_step=6, samples_per_prompt=3, steps=7)
    want = step_flops(student.shape, teacher.shape, [20] * 18, [10] * 18, StepKind.DISTIL, 3)
    got = run_flops(student, teacher, config, 20.4, 9.6)  # mean lengths, rounded to whole tokens
    assert got["student_per_step"] == want["student_flops"] and got["teacher_per_step"] == want["teacher_flops"]
    assert got["per_step"] == want["student_flops"] + want["teacher_flops"] and got["run"] == 7 * got["per_step"]
    assert run_flops(student, None, config, 20, 10)["teacher_per_step"] == 0.0  # a served teacher: not counted
    sft = TrainConfig(prompts_per_step=6, samples_per_prompt=3, method="sft", sft_data="pairs.jsonl")
    assert run_flops(student, teacher, sft, 20, 10)["teacher_per_step"] == 0.0  # given data: no teacher compute


def test_the_long_sequence_settings_each_change_their_term_by_hand():
    """The worked example's student and teacher: checkpointing keeps one hidden state per layer and token
    (and one layer's activations while it is recomputed) and reads each row's prompt; a token budget of
    70 holds two rows of 20 + 10; sample_batch=8 sizes the cache for 8 rows; teacher_parallel=fsdp shards
    the teacher's layers (one gathered, the next prefetched) and keeps the rest whole."""
    from opd.plan import teacher_weights

    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    base = dict(prompts_per_step=16, samples_per_prompt=4, grad_accum=2, max_new_tokens=10, kl="sampled",
                device="cpu", eval_examples=300, eval_batch=50, eval_samples=2)
    logits = 16 * 10 * 512 * 4 * 3
    layer = activation_values(64, 64, 128)
    checkpointed = memory(student, teacher, TrainConfig(**base, gradient_checkpointing=True), 2, "ddp", 20).parts
    # the layer inputs and the mask's booleans kept; then the loss's chunk of logits, or one layer recomputed with
    # its float32 mask (here the larger), not both at once
    recompute = 16 * 30 * layer * 4 + 16 * 30 * 30 * 4
    assert recompute > logits
    assert checkpointed["training_activations"] == 16 * 30 * (4 * 64 + 2 * 64) * 4 + 16 * 30 * 30 + recompute
    wide = memory(student, teacher, TrainConfig(**{**base, "max_new_tokens": 10, "kl": "full"},
                                                gradient_checkpointing=True), 2, "ddp", 20).parts
    hidden = 32 * 10 * 128 * 4  # the teacher's hidden states of the rank's 32 rows (kl=full), kept
    assert wide["training_activations"] == 16 * 30 * (4 * 64 + 2 * 64) * 4 + hidden + 16 * 30 * 30 \
        + max(logits * 5 // 3, recompute)
    budget = memory(student, teacher, TrainConfig(**base, max_tokens_per_micro_batch=70), 2, "ddp", 20).parts
    assert budget["training_activations"] == (1 * 20 + 2 * 10) * (4 * layer + 2 * 64) * 4 + 2 * 10 * 512 * 4 * 3 \
        + 2 * 30 * 30 * (1 + 5 * 4)
    one_row = memory(student, teacher, TrainConfig(**base, max_tokens_per_micro_batch=30), 2, "ddp", 20).parts
    assert one_row["training_activations"] == 30 * (4 * layer + 2 * 64) * 4 + 10 * 512 * 4 * 3  # no mask
    sampled = memory(student, teacher, TrainConfig(**base, sample_batch=9), 2, "ddp", 20).parts
    assert sampled["sampling_kv_cache"] == max(8 * 30 * 4 * 2 * 64 * 4 + 2 * 8 * 512 * 4,  # whole prompts: 2 x 4
                                               8 * 20 * 4 * 2 * 64 * 4 + 8 * 20 * 832 * 4 + 8 * 20 * 20 * 5)
    # the teacher grades 8 rows at a time: its forward and mask for 8 rows, the hidden states of all 32 (none:
    # kl=sampled) and one chunk of its logits
    assert sampled["scoring"] == 8 * 30 * (3 * 256 + 7 * 128) * 4 + 8 * 30 * 30 * 5 + 8 * 10 * 512 * 4 * 2
    layers = 8 * teacher.layer_params
    sharded = TrainConfig(**base, teacher_parallel="fsdp")
    assert teacher_weights(teacher, sharded, 4, 4) == (teacher.params - layers) * 4 + layers * 4 // 4 \
        + 2 * teacher.layer_params * 4
    assert teacher_weights(teacher, sharded, 1, 4) == teacher.params * 4 == teacher_weights(
        teacher, TrainConfig(**base), 4, 4)


def test_offload_moves_the_named_shards_out_of_the_device_peak_by_hand():
    """offload=optimizer,teacher under fsdp x4: the student's weight shards, gradients and AdamW's moments and
    the teacher's layer shards leave the device (the sampling copy, the gathered layers and the teacher's
    embeddings and head stay) and are counted in CPU memory instead; one process offloads nothing."""
    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    base = dict(prompts_per_step=8, device="cpu", parallel="fsdp", teacher_parallel="fsdp", eval_examples=8,
                eval_batch=1)  # training, not evaluation, peaks
    plain = memory(student, teacher, TrainConfig(**base), 4, "fsdp", 20)
    off = memory(student, teacher, TrainConfig(**base, offload="optimizer,teacher"), 4, "fsdp", 20)
    layers = 8 * teacher.layer_params
    assert off.parts["gradients"] == off.parts["optimizer"] == 0 and off.parts["student_weights"] == student.params * 4
    assert off.parts["teacher_weights"] == (teacher.params - layers + 2 * teacher.layer_params) * 4
    moved = (student.params + 3 * student.trainable) * 4 // 4 + layers * 4 // 4
    assert off.parts["host_offload"] == moved and plain.parts["host_offload"] == 0
    assert plain.peak - off.peak == pytest.approx(moved, abs=4)  # integer division per term
    only_teacher = memory(student, teacher, TrainConfig(**base, offload="teacher"), 4, "fsdp", 20).parts
    assert only_teacher["host_offload"] == layers and only_teacher["optimizer"] == plain.parts["optimizer"]
    for processes, parallel in ((1, "ddp"), (4, "ddp")):  # nothing sharded, nothing offloaded
        one = memory(student, teacher, TrainConfig(**base, offload="optimizer"), processes, parallel, 20).parts
        assert one["host_offload"] == 0 and one["optimizer"] > 0


def test_a_conversation_is_planned_as_a_row_of_max_trajectory_tokens():
    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    base = dict(prompts_per_step=16, samples_per_prompt=4, kl="sampled", device="cpu", eval_examples=300,
                eval_batch=50, eval_samples=2)
    talk = memory(student, teacher, TrainConfig(**base, max_new_tokens=10, tools="m:f", max_trajectory_tokens=60),
                  2, "ddp", 20).parts
    assert talk == memory(student, teacher, TrainConfig(**base, max_new_tokens=40), 2, "ddp", 20).parts
    whole = memory(student, teacher, TrainConfig(**base, max_new_tokens=10, environment="m:E"), 2, "ddp", 20).parts
    assert whole == memory(student, teacher, TrainConfig(**base, max_new_tokens=student.context - 20), 2, "ddp",
                           20).parts


def test_a_plan_that_does_not_fit_names_the_fewest_settings_that_make_it_fit():
    from opd.plan import fitting_advice, make_plan

    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    config = TrainConfig(prompts_per_step=64, samples_per_prompt=4, max_new_tokens=400, kl="sampled", device="cpu",
                         eval_batch=1, eval_samples=1, sample_batch=4)  # the teacher grades 4 rows at a time
    plan = make_plan(config, student, teacher, (20, 20), [1], [])
    peak = plan.layouts[0].peak
    checkpointed = memory(student, teacher, TrainConfig(**{**config.to_dict(), "gradient_checkpointing": True}), 1,
                          "ddp", 20).peak
    both = memory(student, teacher, TrainConfig(**{**config.to_dict(), "gradient_checkpointing": True,
                                                   "max_tokens_per_micro_batch": 420}), 1, "ddp", 20).peak
    assert peak > checkpointed > both
    advice = fitting_advice(plan, plan.layouts[0], (checkpointed + both) / 2)  # checkpointing alone is not enough
    assert advice == f"fits with gradient_checkpointing=true max_tokens_per_micro_batch=420: {gib_of(both)}"
    assert fitting_advice(plan, plan.layouts[0], checkpointed) == \
        f"fits with gradient_checkpointing=true: {gib_of(checkpointed)}"
    assert fitting_advice(plan, plan.layouts[0], 1).startswith("does not fit even with gradient_checkpointing=true")


def gib_of(value):
    from opd.plan import gib

    return gib(value)


def test_the_advice_offloads_last_and_names_offload_once():
    from opd.plan import fitting_advice, make_plan

    student, teacher = ModelFacts.of("s", qwen3(64, 128, 2, 2, 4)), ModelFacts.of("t", qwen3(128, 256, 4, 4, 8))
    config = TrainConfig(prompts_per_step=64, samples_per_prompt=4, max_new_tokens=400, kl="sampled", device="cpu",
                         eval_batch=1, eval_samples=1, parallel="fsdp")
    plan = make_plan(config, student, teacher, (20, 20), [4], [])
    layout = next(m for m in plan.layouts if m.parallel == "fsdp")
    savers = {**config.to_dict(), "gradient_checkpointing": True, "max_tokens_per_micro_batch": 420,
              "sample_batch": 4, "teacher_parallel": "fsdp"}
    peaks = [memory(student, teacher, TrainConfig(**{**savers, "offload": offload}), 4, "fsdp", 20).peak
             for offload in ("", "teacher", "optimizer,teacher")]
    assert peaks[0] > peaks[1] > peaks[2]
    named = "gradient_checkpointing=true max_tokens_per_micro_batch=420 sample_batch=4 teacher_parallel=fsdp offload="
    assert fitting_advice(plan, layout, peaks[2]) == f"fits with {named}optimizer,teacher: {gib_of(peaks[2])}"
    assert fitting_advice(plan, layout, peaks[1]) == f"fits with {named}teacher: {gib_of(peaks[1])}"
    ddp = next(m for m in plan.layouts if m.parallel == "ddp" and m.processes == 4)  # nothing to offload there
    assert "optimizer" not in fitting_advice(plan, ddp, 1)


def test_a_padded_batch_keeps_a_float_mask_per_layer_as_the_plan_counts():
    """What autograd saves beyond an unpadded batch's activations, once a row is padded: the (rows, 1, T, T)
    additive mask in float32, once per layer (torch's SDPA with a mask), as ``attention_mask`` counts it
    (its booleans and the copy being converted are not saved: the rest of the term)."""
    from opd.plan import attention_mask

    layers, rows, length = 2, 2, 256
    model = AutoModelForCausalLM.from_config(qwen3(128, 256, 4, 4, layers))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    for padded in (False, True):
        held: dict[int, int] = {}

        def keep(tensor: torch.Tensor, held=held) -> torch.Tensor:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, :10] = 0 if padded else 1
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.model(input_ids=torch.randint(0, 512, (rows, length)), attention_mask=mask)
        saved.append(sum(size for ptr, size in held.items() if ptr not in params))
    assert saved[1] - saved[0] == pytest.approx(attention_mask(rows, length, 4, layers)
                                                - attention_mask(rows, length, 4, 0), rel=0.02)
    assert attention_mask(1, length, 4, layers) == 0  # one row: no padding, no mask


def test_a_forward_without_gradients_peaks_near_the_planned_bytes():
    """The teacher's grading and the sampler's prompt reading: torch's CPU allocator's peak during a no-grad
    forward (rows of 512 tokens, one padded) is within 20% of ``no_grad_forward``."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    config = qwen3(128, 384, 4, 4, 2)
    model, facts = AutoModelForCausalLM.from_config(config), ModelFacts.of("m", config)
    rows, length = 2, 512
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :100] = 0
    ids = torch.randint(0, 512, (rows, length))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.model(input_ids=ids, attention_mask=mask)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp, "trace.json")
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    peak = max(e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]")
    assert no_grad_forward(facts, rows, length, 4) == pytest.approx(peak, rel=0.2)
