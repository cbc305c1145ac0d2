"""``opd plan``: before a run, what it will need: parameters, memory per device for each ``parallel=``
choice and process count, FLOPs per step and for the run, and the compatibility checks. Read from the
models' config.json alone (a meta-device model: no weights are loaded); the measured time estimate is
``opd.probe``.

Memory per device, in bytes, with ``b`` the bytes of the training dtype, ``N`` the processes, ``T`` the
trainable parameters (the adapters under LoRA) and ``S`` = N under ``parallel=fsdp`` (FSDP2 shards
weights, gradients and AdamW's two moments) and 1 under ddp:

- weights ``P_student b / S``, and under fsdp the full copy that samples, evaluates and saves
  (``+ P_student b``); the teacher's ``P_teacher b`` on every rank (unless ``teacher_parallel=fsdp``);
- gradients ``T b / S`` and AdamW's moments ``2 T b / S`` (torch's AdamW keeps them in the
  parameters' dtype);
- under fsdp, during a training step, what FSDP2 holds unsharded (``fsdp_gathered``): the root group
  (embeddings, final norm, head: gathered at the loss's forward, kept to the end of its backward) and two
  decoder layers (the one running, the next prefetched), and as much again in gradients before their
  reduce-scatter: ``2 (P_student - layers P_layer + 2 P_layer) b``;
- the largest of four phases:
  sampling, the KV cache ``rows (P + C) layers 2 d_kv b`` of the rank's rows at once (and their last
  logits, twice in float32), or while it reads the prompts their cache and a forward over them
  (``no_grad_forward``), whichever is larger;
  evaluation (rank 0), the same for ``min(eval_examples, eval_batch) x eval_samples`` rows, the student's or
  at step 0 the teacher's, whichever is larger;
  scoring, the teacher's hidden states at completion positions (kept for ``kl=full``), its forward over the
  rows it grades at once (``no_grad_forward``: ``(3 I + 7 h) b`` per token and the attention mask) and one
  chunk of its logits;
  training, the activations autograd saves for one micro-batch: per token and layer
  ``(10 h + 4 d_kv + 4 I) b`` and per token ``2 h b`` (the embedding's output, the final norm) for a
  Llama/Qwen layer (RMSNorms that keep their input and output, q/k norms, rotary embeddings, a fused
  attention kernel's q, k, v and output, the gated MLP's four intermediates: the count of Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4, done for this
  layer; ``tests/test_plan.py`` checks it against what autograd saves), plus the gradients and the
  logits of one chunk in float32 (``scoring.LOGITS_BUDGET``; three copies: logits, log-softmax, its
  gradient; five with the teacher's for ``kl=full``), plus a padded micro-batch's attention mask
  (``attention_mask``: ``rows (P + C)^2`` booleans, and the float copy torch's SDPA keeps in every layer).

The settings for long completions change those terms: ``gradient_checkpointing`` keeps per token one hidden
state per layer, plus the larger of the loss's chunk of logits and one layer's activations (the one being
recomputed, with its float mask: ``recomputed``), and reads each row's prompt (no shared prompt);
``max_tokens_per_micro_batch=N`` takes ``N // (P + C)`` rows (one at least) per micro-batch (one row: no
padding, no mask); ``sample_batch`` sizes the KV cache and the teacher's grading for that many rows (whole
prompts); ``teacher_parallel=fsdp`` shards the teacher's layers (``+ 2`` layers gathered), its embeddings and
head whole; ``offload=teacher`` keeps those layer shards in CPU memory and ``offload=optimizer`` (fsdp) the
student's weight shards, gradients and AdamW's moments (FSDP2's ``CPUOffloadPolicy``: ``host_offload``, per
process, not in the device's peak). ``fitting_advice`` adds them, cheapest first (offload last), until a
layout fits.

Not counted: the CUDA context and the allocator's caching (about 0.5-1 GB on a GPU), the process itself
on a CPU. ``P`` is the padded prompt length and ``C`` = ``max_new_tokens``; with an environment (``environment=``,
``tools=``) a row is a whole conversation, ``C`` = ``max_trajectory_tokens`` (or the student's context) - ``P``,
the most it may hold (a teacher that reads it turn by turn re-reads each turn's prefix: not counted).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from opd.config import TrainConfig
from opd.errors import OpdError
from opd.flops import ModelShape, step_flops
from opd.objective import kl_of, step_kind
from opd.scoring import LOGITS_BUDGET

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


@dataclass
class ModelFacts:
    """A model's size and shape, from its config alone."""

    name: str
    params: int
    trainable: int
    layer_params: int
    shape: ModelShape
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int
    context: int

    @classmethod
    def of(cls, name: str, hf_config, model: torch.nn.Module | None = None, lora: TrainConfig | None = None):
        """From ``hf_config`` (a meta-device model is built to count parameters exactly), or a loaded ``model``;
        ``lora``: the run's config when it trains adapters (``lora_rank`` > 0)."""
        built = model is None
        if built:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = {id(p): p for p in base.parameters()}  # tied weights once
        total = sum(p.numel() for p in params.values())
        embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
        tied = head is embed or (head.device.type != "meta" and head.data_ptr() == embed.data_ptr())
        body = total - embed.numel() - (0 if tied else head.numel())
        config = base.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = config.num_hidden_layers
        trainable = total
        if lora is not None and lora.lora_rank > 0:  # from a config, its targets; a loaded PeftModel counts its own
            trainable = lora_parameters(base, lora) if built else sum(p.numel() for p in model.parameters()
                                                                      if p.requires_grad)
        blocks = getattr(getattr(base, "model", base), "layers", None)  # a decoder layer, exactly, where named so
        layer = sum(p.numel() for p in blocks[0].parameters()) if blocks is not None and len(blocks) else body // layers
        return cls(name, total, trainable, layer,
                   ModelShape(body, config.hidden_size, heads * head_dim, layers, head.shape[0]),
                   config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                   kv_heads * head_dim, layers, head.shape[0], getattr(config, "max_position_embeddings", 2048))


def lora_parameters(model: torch.nn.Module, config: TrainConfig) -> int:
    """The adapters' parameters: ``r (in + out)`` for every linear layer whose name ends in a target."""
    targets = {t.strip() for t in config.lora_targets.split(",") if t.strip()}
    return sum(config.lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets)


def training_dtype(config: TrainConfig) -> str:
    """What ``opd train`` picks: bf16 on a GPU (``device=cuda``, or auto where one is present), else float32."""
    if config.dtype != "auto":
        names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        return names.get(config.dtype, config.dtype)
    on_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_gpu else "float32"


@dataclass
class Memory:
    """Bytes per device of one layout (``parallel`` x ``processes``)."""

    parallel: str
    processes: int
    parts: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        p = self.parts
        phases = max(p["sampling_kv_cache"], p["scoring"],
                     p["training_activations"] + p["gradients"] + p["fsdp_gathered"], p["evaluation"])
        return p["student_weights"] + p["optimizer"] + p["teacher_weights"] + phases  # not host_offload: CPU memory


def memory(student: ModelFacts, teacher: ModelFacts | None, config: TrainConfig, processes: int, parallel: str,
           prompt_tokens: int) -> Memory:
    """The estimate above for ``processes`` ranks under ``parallel``."""
    b = DTYPE_BYTES[training_dtype(config)]
    shard = processes if parallel == "fsdp" else 1
    offload = {name.strip() for name in config.offload.split(",")} if processes > 1 else set()
    student_host = shard > 1 and "optimizer" in offload  # FSDP2's CPUOffloadPolicy: shards, gradients, moments
    rows = config.prompts_per_step * config.samples_per_prompt // processes  # this rank's rows
    completion = config.max_new_tokens
    if config.environment or config.tools:  # a conversation: every turn and the environment's messages in one row
        completion = max(1, (config.max_trajectory_tokens or student.context) - prompt_tokens)
    micro_rows = max(rows // config.grad_accum, 1)
    if config.max_tokens_per_micro_batch:  # as many whole rows as the budget holds (one at least)
        micro_rows = min(rows, max(1, config.max_tokens_per_micro_batch // (prompt_tokens + completion)))
    prompts = max(micro_rows // config.samples_per_prompt, 1)
    tokens = prompts * prompt_tokens + micro_rows * completion  # a prompt is read once for its samples
    layer_values = activation_values(student.hidden, student.kv_dim, student.intermediate)
    per_token = student.layers * layer_values + 2 * student.hidden
    if config.gradient_checkpointing:  # each layer's input kept (one layer's activations during its recompute,
        tokens = micro_rows * (prompt_tokens + completion)  # below); no shared prompt (its cache is dropped)
        per_token = student.layers * student.hidden + 2 * student.hidden
    sample_rows = rows  # the rows sampled, and graded by the teacher, at once
    width = prompt_tokens + completion
    if config.sample_batch:
        sample_rows = min(rows, max(1, config.sample_batch // config.samples_per_prompt) * config.samples_per_prompt)
    chunk_rows = min(micro_rows * completion, max(1, LOGITS_BUDGET // student.vocab))
    # kl=auto as a run resolves it; opd plan's gather resolved it already where it read both tokenizers
    kl = kl_of(config, aligned=False)
    logit_copies = 5 if kl == "full" and config.distils else 3
    logits = chunk_rows * student.vocab * 4 * logit_copies  # one chunk of the loss's logits, float32
    teacher_hidden = 0 if teacher is None or kl != "full" else rows * completion * teacher.hidden * b
    eval_rows = min(config.eval_examples, config.eval_batch) * max(config.eval_samples, 1)
    eval_models = [student] + ([teacher] if teacher is not None else [])  # step 0 evaluates the teacher too
    sharded = (student.params + 3 * student.trainable) * b // shard  # weights, gradients, AdamW's two moments
    parts = {
        "student_weights": (0 if student_host else student.params * b // shard)
        + (student.params * b if shard > 1 else 0),  # fsdp: the full copy that samples, evaluates and saves
        "gradients": 0 if student_host else student.trainable * b // shard,
        "optimizer": 0 if student_host else 2 * student.trainable * b // shard,
        "teacher_weights": teacher_weights(teacher, config, processes, b),
        "sampling_kv_cache": max(kv_cache(student, sample_rows, prompt_tokens + completion, b)
                                 + 2 * sample_rows * student.vocab * 4,  # decoding, the cache full
                                 kv_cache(student, sample_rows, prompt_tokens, b)  # or reading the prompts
                                 + no_grad_forward(student, sample_rows, prompt_tokens, b)),
        "evaluation": max(kv_cache(m, eval_rows, prompt_tokens + completion, b) + 2 * eval_rows * m.vocab * 4
                          for m in eval_models),
        "scoring": 0 if teacher is None else teacher_hidden + no_grad_forward(teacher, sample_rows, width, b)
        + min(sample_rows * completion, max(1, LOGITS_BUDGET // teacher.vocab)) * teacher.vocab * 4 * 2,
        "training_activations": tokens * per_token * b + teacher_hidden
        + (recomputed(tokens * layer_values * b, logits, micro_rows, width, b) if config.gradient_checkpointing
           else logits + attention_mask(micro_rows, width, b, student.layers)),
        "fsdp_gathered": 2 * fsdp_gathered(student) * b if shard > 1 else 0,  # weights, and their gradients
        "host_offload": (sharded if student_host else 0) + teacher_host(teacher, config, processes, b),
    }
    return Memory(parallel, processes, parts)


def fsdp_gathered(model: ModelFacts) -> int:
    """Parameters FSDP2 holds unsharded during a training step: the root group (embeddings, final norm,
    head: gathered at the loss's forward, kept to the end of the backward) and two decoder layers (the one
    running and the next prefetched); their gradients are as large before the reduce-scatter."""
    return model.params - model.layers * model.layer_params + 2 * model.layer_params


def teacher_weights(teacher: ModelFacts | None, config: TrainConfig, processes: int, b: int) -> int:
    """The teacher on every rank, or with ``teacher_parallel=fsdp`` its decoder layers sharded (one gathered
    and the next prefetched at a time; with ``offload=teacher`` the shards in CPU memory) and its embeddings,
    final norm and head whole."""
    if teacher is None:
        return 0
    if config.teacher_parallel != "fsdp" or processes < 2:
        return teacher.params * b
    layers = teacher.layers * teacher.layer_params
    return (teacher.params - layers) * b + 2 * teacher.layer_params * b + layers * b // processes \
        - teacher_host(teacher, config, processes, b)


def teacher_host(teacher: ModelFacts | None, config: TrainConfig, processes: int, b: int) -> int:
    """``offload=teacher``: this rank's shards of the teacher's layers, in CPU memory."""
    offloaded = "teacher" in {name.strip() for name in config.offload.split(",")}
    if teacher is None or not offloaded or config.teacher_parallel != "fsdp" or processes < 2:
        return 0
    return teacher.layers * teacher.layer_params * b // processes


def no_grad_forward(model: ModelFacts, rows: int, length: int, b: int) -> int:
    """A forward without gradients (the teacher's grading, the sampler reading its prompts) over ``rows`` x
    ``length`` tokens: per token the residual stream and one layer's intermediates, ``(3 I + 7 h) b``
    (on this project's CPU, for the Qwen3 models of ``bench/long_sequences.py``: 0.94x and 1.07x what
    torch's allocator peaked at), plus a padded batch's attention mask."""
    return rows * length * (3 * model.intermediate + 7 * model.hidden) * b + attention_mask(rows, length, b, 0)


def recomputed(layer: int, logits: int, rows: int, length: int, b: int) -> int:
    """Under ``gradient_checkpointing``, what the backward holds beyond the kept layer inputs: the loss's chunk
    of logits (its backward runs first) or one decoder layer's recomputed activations ``layer`` and its float
    mask, never both at once; the mask's booleans (an input of every layer) throughout. At 8k-token rows
    (two, one padded) the layer's recompute is the larger: counting both overstated the peak by 40%
    (``bench/long_sequences.py --plan-check``)."""
    booleans = rows * length * length if rows > 1 else 0  # one row: no padding, no mask
    return booleans + max(logits, layer + booleans * b)


def attention_mask(rows: int, length: int, b: int, kept: int) -> int:
    """A padded batch's attention mask: transformers builds ``(rows, 1, length, length)`` booleans and torch's
    SDPA turns them into an additive mask in the compute dtype, which autograd keeps for each of ``kept``
    layers (and one more while it converts the next): ``rows length^2 (1 + (kept + 1) b)``. One row has no
    padding and no mask (SDPA's causal kernel). Quadratic in the length: one reason long rows go one per
    micro-batch (``max_tokens_per_micro_batch``)."""
    return 0 if rows < 2 else rows * length * length * (1 + (kept + 1) * b)


def kv_cache(model: ModelFacts, rows: int, length: int, b: int) -> int:
    """Keys and values of every layer for ``rows`` sequences of ``length`` tokens."""
    return rows * length * model.layers * 2 * model.kv_dim * b


def activation_values(hidden: int, kv_dim: int, intermediate: int) -> int:
    """Values autograd keeps per token in one Llama/Qwen decoder layer (see the module's docstring)."""
    return 10 * hidden + 4 * kv_dim + 4 * intermediate


def run_flops(student: ModelFacts, teacher: ModelFacts | None, config: TrainConfig, prompt_tokens: float,
              completion_tokens: float) -> dict:
    """FLOPs of one step at these lengths (``flops.step_flops``, as ``opd train`` counts them) and of the run."""
    rows = config.prompts_per_step * config.samples_per_prompt
    one = step_flops(student.shape, teacher.shape if teacher else None, [max(1, round(prompt_tokens))] * rows,
                     [max(1, round(completion_tokens))] * rows, step_kind(config), config.samples_per_prompt)
    teacher_flops = one["teacher_flops"] or 0.0
    return {"student_per_step": one["student_flops"], "teacher_per_step": teacher_flops,
            "per_step": one["student_flops"] + teacher_flops,
            "run": (one["student_flops"] + teacher_flops) * config.steps}


@dataclass
class Plan:
    config: dict
    student: ModelFacts
    teacher: ModelFacts | None
    dtype: str
    prompt_tokens: int  # the longest prompt (the padded width the memory is planned for)
    mean_prompt_tokens: float  # for the FLOPs
    completion_tokens: float  # max_new_tokens, or after the probe the mean it measured
    layouts: list[Memory]
    flops: dict
    checks: list[tuple[str, str]]  # (ok | note | error, text)
    probe: dict | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for layout, memory_ in zip(out["layouts"], self.layouts, strict=True):
            layout["peak"] = memory_.peak
        return out


def make_plan(config: TrainConfig, student: ModelFacts, teacher: ModelFacts | None,
              prompt_tokens: tuple[float, int], processes: list[int], checks: list[tuple[str, str]]) -> Plan:
    """``prompt_tokens``: the prompts' (mean, longest) length in tokens."""
    mean, longest = prompt_tokens
    layouts = [memory(student, teacher, config, n, parallel, longest)
               for n in processes for parallel in ("ddp", "fsdp") if n > 1 or parallel == "ddp"]
    if config.lora_rank > 0:  # opd refuses fsdp with LoRA: nothing worth sharding
        layouts = [m for m in layouts if m.parallel == "ddp"]
    bad = [n for n in processes if config.prompts_per_step % n]
    if bad:
        checks.append(("note", f"prompts_per_step={config.prompts_per_step} does not split over "
                               f"{', '.join(map(str, bad))} processes: opd train refuses those"))
    flops = run_flops(student, teacher, config, mean, config.max_new_tokens)
    return Plan(config.to_dict(), student, teacher, training_dtype(config), longest, mean, config.max_new_tokens,
                layouts, flops, checks)


def with_probe(plan: Plan, config: TrainConfig, measured: dict) -> Plan:
    """The plan after the probe: its timings, and the FLOPs at the completion length it measured."""
    plan.probe = measured
    plan.completion_tokens = measured["completion_tokens"]
    plan.flops = run_flops(plan.student, plan.teacher, config, plan.mean_prompt_tokens, plan.completion_tokens)
    return plan


def session_plan(session) -> Plan:
    """The plan of an opened run (``opd train`` prints its short form as it starts)."""
    config = session.config
    student = ModelFacts.of(config.student, None, model=session.student, lora=config)
    view = session.teacher_view
    teacher = None if view is None or view.model is None else ModelFacts.of(config.teacher_spec, None, model=view.model)
    examples = session.task.train_examples(0, config.prompts_per_step, config.seed) + session.eval_set[:8]
    lengths = [len(session.prompt_ids(ex.messages)) for ex in examples]
    return make_plan(config, student, teacher, (sum(lengths) / len(lengths), max(lengths)),
                     [session.dist.world if session.dist.active else 1], [])


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024**2:.1f} MiB"


def short_form(plan: Plan) -> str:
    """One line for ``opd train``'s start."""
    layout = next((m for m in plan.layouts if m.parallel == plan.config["parallel"]), plan.layouts[0])
    teacher = f", teacher {plan.teacher.params / 1e6:.1f}M" if plan.teacher else ""
    return (f"plan: student {plan.student.params / 1e6:.1f}M parameters ({plan.student.trainable / 1e6:.2f}M trained)"
            f"{teacher}, {plan.dtype}; about {gib(layout.peak)} per device ({layout.parallel}, {layout.processes} "
            f"process{'es' if layout.processes > 1 else ''}); {plan.flops['per_step']:.3g} FLOPs per step at "
            f"{plan.completion_tokens:.0f} completion tokens, {plan.flops['run']:.3g} for {plan.config['steps']} steps")


def render(plan: Plan, device_memory: float | None = None) -> str:
    """The long form ``opd plan`` prints."""
    s, t = plan.student, plan.teacher
    lines = [f"student {plan.config['student']}: {s.params:,} parameters ({s.trainable:,} trained), "
             f"{s.layers} layers, hidden {s.hidden}, vocabulary {s.vocab}, context {s.context}"]
    if t:
        lines.append(f"teacher {plan.config['teacher']}: {t.params:,} parameters, {t.layers} layers, hidden "
                     f"{t.hidden}, vocabulary {t.vocab}")
    lines += ["", f"memory per device ({plan.dtype}; prompts of {plan.prompt_tokens} tokens, completions of "
              f"{plan.completion_tokens:.0f}):"]
    names = [name for name in plan.layouts[0].parts if name != "host_offload"]
    header = f"  {'':22}" + "".join(f"{f'{m.parallel} x{m.processes}':>13}" for m in plan.layouts)
    lines.append(header)
    for name in names:
        lines.append(f"  {name:22}" + "".join(f"{gib(m.parts[name]):>13}" for m in plan.layouts))
    lines.append(f"  {'peak':22}" + "".join(f"{gib(m.peak):>13}" for m in plan.layouts))
    if any(m.parts["host_offload"] for m in plan.layouts):
        lines.append(f"  {'CPU memory (offload)':22}" + "".join(f"{gib(m.parts['host_offload']):>13}"
                                                               for m in plan.layouts))
    if device_memory:
        fits = ["fits" if m.peak <= device_memory else "too big" for m in plan.layouts]
        lines.append(f"  {f'on {device_memory / GIB:.0f} GiB':22}" + "".join(f"{f:>13}" for f in fits))
        for layout in plan.layouts:
            if layout.peak > device_memory:
                lines.append(f"  {layout.parallel} x{layout.processes}: " + fitting_advice(plan, layout, device_memory))
    f = plan.flops
    lines += ["", f"FLOPs: {f['student_per_step']:.3g} student + {f['teacher_per_step']:.3g} teacher per step "
              f"(at {plan.completion_tokens:.0f} completion tokens per sample); {f['run']:.3g} for "
              f"{plan.config['steps']} steps", "", "checks:"]
    lines += [f"  [{kind}] {text}" for kind, text in plan.checks]
    if plan.probe:
        p = plan.probe
        lines += ["", f"time (probe of {p['steps']} steps on {p['device']}): {p['step_seconds']:.3f} s per step, "
                  f"{p['eval_seconds']:.1f} s per evaluation, {p['setup_seconds']:.1f} s to start; completions "
                  f"averaged {p['completion_tokens']:.1f} tokens",
                  f"  estimated wall time: {p['wall_seconds']:.0f} s ({p['wall_seconds'] / 3600:.2f} h) for "
                  f"{plan.config['steps']} steps, {p['evaluations']} evaluations",
                  f"  measured peak memory in the probe: {gib(p['peak_memory'])} ({p['memory_source']})"]
    return "\n".join(lines)


def memory_savers(config: TrainConfig, prompt_tokens: int, processes: int, has_teacher: bool,
                  parallel: str = "ddp") -> list[tuple[str, object]]:
    """The settings that lower the peak, in the order ``opd plan`` adds them: what costs least first
    (offload last: it moves every step's weights over the host link)."""
    savers: list[tuple[str, object]] = [("gradient_checkpointing", True),
                                        ("max_tokens_per_micro_batch", prompt_tokens + config.max_new_tokens),
                                        ("sample_batch", config.samples_per_prompt), ("eval_batch", 1)]
    offload = {name.strip() for name in config.offload.split(",") if name.strip()}
    if has_teacher and processes > 1 and not config.teachers:
        savers.append(("teacher_parallel", "fsdp"))
        offload.add("teacher")
        savers.append(("offload", ",".join(sorted(offload))))
    if parallel == "fsdp" and processes > 1:
        offload.add("optimizer")
        savers.append(("offload", ",".join(sorted(offload))))
    return [(name, value) for name, value in savers if getattr(config, name) != value]


def fitting_advice(plan: Plan, layout: Memory, device_memory: float) -> str:
    """The fewest of ``memory_savers`` (added in order) that bring ``layout`` under ``device_memory``, with
    the resulting peak; or what all of them leave."""
    config = TrainConfig(**plan.config)
    chosen: dict[str, str] = {}  # a setting added twice (offload) keeps its place and its last value
    peak = layout.peak
    for name, value in memory_savers(config, plan.prompt_tokens, layout.processes, plan.teacher is not None,
                                     layout.parallel):
        if getattr(config, name) == value:
            continue
        setattr(config, name, value)
        chosen[name] = str(value).lower() if isinstance(value, bool) else str(value)
        peak = memory(plan.student, plan.teacher, config, layout.processes, layout.parallel, plan.prompt_tokens).peak
        if peak <= device_memory:
            return f"fits with {settings(chosen)}: {gib(peak)}"
    tried = f" even with {settings(chosen)} ({gib(peak)})" if chosen else ""
    return f"does not fit{tried}: use more devices, LoRA, or a teacher behind a server"


def settings(chosen: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in chosen.items())


def check_vocab(facts: ModelFacts, tokenizer, who: str) -> tuple[str, str]:
    if facts.vocab < len(tokenizer):
        return "error", (f"{who}'s output layer has {facts.vocab} rows but its tokenizer {len(tokenizer)} ids: some "
                         "tokens have no logit")
    if facts.vocab > len(tokenizer):
        return "note", (f"{who}'s vocabulary is padded: {facts.vocab} rows for {len(tokenizer)} tokens (opd scores "
                        "and samples over the tokenizer's ids only)")
    return "ok", f"{who}'s vocabulary: {facts.vocab} ids, as its tokenizer"




def available_memory(device: torch.device) -> tuple[float, str]:
    """What a run may use on ``device``, in bytes, and its name: a GPU's total memory, or on a CPU the host's
    available RAM (``MemAvailable`` of /proc/meminfo, else the physical RAM)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), f"{device}'s memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "the host's available RAM"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the host's RAM"


def check_fits(config: TrainConfig, student: ModelFacts, teacher: ModelFacts | None, lengths: list[int],
               processes: int, device: torch.device) -> None:
    """Refuse, before the models are loaded, a run whose plan (from the models' configs) exceeds the memory of
    ``device`` (on a CPU, what all ``processes`` of this host need together against its RAM); the error gives the
    estimate, what would fit (``fitting_advice``) and the override, ``check_memory=false``."""
    if not config.check_memory:
        return
    plan = make_plan(config, student, teacher, (sum(lengths) / len(lengths), max(lengths)), [processes], [])
    layout = next((m for m in plan.layouts if m.parallel == config.parallel), plan.layouts[0])
    available, what = available_memory(device)
    sharing = processes if device.type == "cpu" else 1  # the ranks of one host share its RAM
    if layout.peak * sharing <= available:
        return
    each = f" ({gib(layout.peak)} per process x {sharing})" if sharing > 1 else ""
    raise OpdError(f"this run needs about {gib(layout.peak * sharing)}{each} by opd plan's estimate from the models' "
                   f"configs, more than {what} ({gib(available)}): it "
                   f"{fitting_advice(plan, layout, available / sharing)}. Lower what sizes it (lora_rank, eval_batch x "
                   "eval_samples, prompts_per_step x samples_per_prompt, max_new_tokens), or pass check_memory=false "
                   "to run it anyway (`opd plan` shows the whole estimate)")
