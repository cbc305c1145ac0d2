"""The one typed config of ``opd train``: a dataclass, loadable from TOML, overridable as key=value.

Defaults run the embedded demo on a CPU (the settings come from the sweep in the README). Every field is declared
once, with ``opt(default, help, domain)``: its help text (``opd train --help``, the docs' reference) and the values
it may take (``opd.domains``), checked by ``validate`` before anything is loaded.
``embedded:teacher`` and ``embedded:student`` name the models shipped in the package (built by
``opd zoo build``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from opd.domains import COUNT, HALF_OPEN_SHARE, NON_NEGATIVE, POSITIVE, SEED, SHARE, Choice, Number, check
from opd.errors import OpdError

DISTILLING = ("opd", "opd+rl")  # methods where a teacher grades the student's tokens
REWARDED = ("rl", "opd+rl")  # methods where the task's reward enters the advantage
PROGRAM = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # module.path:Name
TEMPLATE_KWARGS_FIELDS = ("chat_template_kwargs", "teacher_chat_template_kwargs")
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # report_to= (opd.trackers logs to them)


def chosen_trackers(report_to: str) -> list[str]:
    """``report_to`` as a list of trackers (``none`` or empty: none); unknown names are refused."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise OpdError(f"config field report_to={report_to!r}: {name!r} is not one of none, {', '.join(TRACKERS)}")
    return names


_GROUP = ["models and data"]  # the section the fields declared next belong to


def section(title: str) -> None:
    """Start a group of fields (in the class body): the help and the docs list fields under it."""
    _GROUP[0] = title


def opt(default, help: str, domain=None):
    """A config field: its default, its help text and the values it may take (``opd.domains``; None: any)."""
    return dataclasses.field(default=default, metadata={"help": help, "domain": domain, "group": _GROUP[0]})


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class TrainConfig:
    section("models and data")
    student: str = opt("embedded:student", "HF model directory or hub id")
    teacher: str = opt("embedded:teacher", "HF model directory, hub id, http://HOST:PORT of a log-prob server, or self")
    teacher_model: str = opt("", "model name on the teacher server (default: the one it serves)")
    teachers: str = opt("", "several teachers: NAME=DIR_OR_URL,...; a prompt's \"teacher\" field picks one (else "
                            "teacher=)")
    teacher_tokenizer: str = opt("", "the teacher's tokenizer (default: the teacher's directory; a server's: the "
                                     "student's)")
    teacher_template: str = opt("auto", "auto: the teacher's own chat template when it differs | own | student",
                                        Choice(("auto", "own", "student")))
    chat_template_kwargs: str = opt("", "JSON object for the student's chat template, e.g. {\"enable_thinking\": "
                                        "false}")
    teacher_chat_template_kwargs: str = opt("", "the same for the teacher's template (its own: not the student's)")
    chat_template: str = opt("", "a Jinja file: the student's chat template for every rendering (default: its own; "
                                 "in a conversation, TRL's training variant when its own is not prefix-preserving)")
    teacher_chat_template: str = opt("", "a Jinja file: the teacher's chat template (default: its own)")
    task: str = opt("arithmetic", "built-in task; prompts: JSONL, parquet/csv/json, a folder, hf:ORG/NAME; "
                                  "module:Class")
    eval_file: str = opt("", "held-out prompts when task is a file or dataset (same forms; hf:NAME@test)")
    section("datasets (task=, eval_file=, sft_data=, docs=): columns, split and subset, streaming")
    prompt_field: str = opt("prompt", "the prompt's column (a string, or OpenAI messages)")
    answer_field: str = opt("answer", "the reference answer's column (what the verifier checks)")
    messages_field: str = opt("messages", "OpenAI messages; ShareGPT \"conversations\" is found by itself")
    completion_field: str = opt("completion", "sft_data (else a messages row's last assistant turn)")
    text_field: str = opt("text", "docs")
    split: str = opt("train", "the split of a hub dataset or folder (hf:NAME@SPLIT overrides)")
    eval_split: str = opt("test", "eval_file's split")
    subset: str = opt("", "a hub dataset's configuration (hf:NAME:SUBSET overrides)")
    streaming: bool = opt(False, "task= read as a stream: nothing downloaded or converted first")
    verifier: str = opt("exact", "how a prompts file's answers are graded: exact | math (math-verify) | ifeval",
                                 Choice(("exact", "math", "ifeval")))
    reward: str = opt("", "module:function(completion, example) -> float: your reward, in place of the task's")
    section("conversations: an environment answers each assistant turn (opd.environments)")
    environment: str = opt("", "module:Name of an environment (start(example) -> conversation)")
    tools: str = opt("", "module:function,...: the built-in tool-calling environment with these functions")
    tool_format: str = opt("auto", "tools=: how calls are read: auto (the family's response template, else hermes) | "
                                   "hermes (<tool_call>JSON</tool_call>) | compact ([calc 3*4])",
                                   Choice(("auto", "hermes", "compact")))
    max_turns: int = opt(4, "assistant turns per conversation at most", COUNT)
    max_trajectory_tokens: int = opt(0, "a conversation's tokens at most, prompt included (0: the student's context)",
                                        Number(0, integer=True, note="0: the student's context"))
    section("the method")
    method: str = opt("opd", "opd | sft (teacher samples; cross-entropy) | rl (task reward) | opd+rl | midtrain",
                             Choice(("opd", "sft", "rl", "opd+rl", "midtrain")))
    reward_coef: float = opt(1.0, "weight of the group-centred task reward (rl, opd+rl)", NON_NEGATIVE)
    sft_data: str = opt("", "method=sft: JSONL of prompt + completion instead of teacher samples; midtrain: the chat")
    docs: str = opt("", "method=midtrain: JSONL of {\"text\": ...} documents (next-token cross-entropy on all tokens)")
    chat_fraction: float = opt(0.0, "method=midtrain: share of each step's sequences taken from sft_data",
                                    HALF_OPEN_SHARE)
    doc_tokens: int = opt(128, "method=midtrain: tokens per document chunk", Number(2, integer=True))
    kl: str = opt("auto", "auto: full, topk for a teacher behind a server (or several), sampled across tokenizers; "
                          "\"sampled\": per-token reverse-KL advantage; \"full\": exact KL over the vocabulary; "
                          "\"topk\": the teacher's top-k", Choice(("auto", "sampled", "full", "topk")))
    teacher_topk: int = opt(20, "kl=topk: the teacher's K most likely tokens per position (+ a tail bucket)", COUNT)
    divergence: str = opt("reverse_kl", "kl=full: reverse_kl | forward_kl | jsd (GKD's generalized JSD at beta)",
                                        Choice(("reverse_kl", "forward_kl", "jsd")))
    beta: float = opt(0.5, "divergence=jsd: 0 is the forward KL, 1 the reverse KL (TRL's and ms-swift's convention)",
                           SHARE)
    lmbda: float = opt(1.0, "GKD's on-policy share: the student answers this share of each step's prompts, the rest",
                            SHARE)
    seq_kd: bool = opt(False, "the off-policy rows are the teacher's samples even when the data has completions")
    kl_coef: float = opt(1.0, "weight of the teacher's per-token signal in the advantage (the reference used 1)",
                              NON_NEGATIVE)
    gamma: float = opt(0.0, "discount of the per-token advantage (0: no future terms, as in the reference)", SHARE)
    ppo_clip: float = opt(0.0, "PPO clip epsilon; 0 turns clipping off", Number(0, note="0: off"))
    section("sampling")
    steps: int = opt(800, "gradient steps (a resumed run may be given more)", COUNT)
    train_prompts: int = opt(0, "0: fresh training prompts every step; N: reuse only the N prompts step 0 draws",
                                Number(0, integer=True, note="0: fresh prompts every step"))
    prompts_per_step: int = opt(32, "prompts drawn per step (across all ranks)", COUNT)
    samples_per_prompt: int = opt(4, "completions sampled per prompt (G)", COUNT)
    max_new_tokens: int = opt(48, "a completion's tokens at most (a conversation's: per assistant turn)", COUNT)
    temperature: float = opt(1.0, "the sampling temperature of training rollouts", POSITIVE)
    top_p: float = opt(1.0, "nucleus sampling for training rollouts (1: off)", Number(0, 1, low_open=True))
    sample_noise: float = opt(0.0, "injected errors: the environment replaces each sampled token (not a stop token) "
                                   "with probability q by one drawn uniformly from the task's noise tokens (a regime "
                                   "task's states; else every ordinary token), in training rollouts and evaluation; a "
                                   "replaced token is context, not trained on", Number(0, 1, high_open=True))
    sample_batch: int = opt(0, "rows (prompts x samples) sampled in process at once, its KV cache sized for them (0: "
                               "all)", Number(0, integer=True, note="0: all rows at once"))
    sampler: str = opt("local", "who samples the student's rollouts: local | http://HOST:PORT (vLLM or opd serve) | "
                                "vllm")
    sampler_model: str = opt("", "the served student's name (default: the one base model the server lists)")
    sampler_sync: str = opt("auto", "weights to the server after each step: auto | lora | reload | nccl",
                                    Choice(("auto", "lora", "reload", "nccl")))
    sampler_sync_dir: str = opt("", "where weights are written for the server to read (default: RUN_DIR/sampler)")
    tis_cap: float = opt(2.0, "truncated importance sampling: cap C of the trainer / engine ratio (remote sampler)",
                              Number(1))
    async_rollouts: int = opt(0, "1: the server samples step k+1 while the trainer updates on step k",
                                 Number(0, 1, integer=True))
    engine_gap_limit: float = opt(0.5, "stop when the server's log-probs differ from the trainer's by more "
                                       "(nats/token)", Number(0, note="0: off"))
    vllm_memory: float = opt(0.3, "sampler=vllm: the share of GPU memory the in-process engine may take",
                                  Number(0, 1, low_open=True, high_open=True))
    max_prompt_tokens: int = opt(0, "0: the model's context length minus max_new_tokens",
                                    Number(0, integer=True, note="0: the context less max_new_tokens"))
    truncate_prompts: bool = opt(False, "cut over-long prompts from the left instead of refusing them")
    section("optimisation")
    lr: float = opt(6e-4, "AdamW's peak learning rate", POSITIVE)
    warmup_steps: int = opt(50, "steps of linear warm-up from 0 to lr", Number(0, integer=True))
    lr_schedule: str = opt("constant", "after the warm-up: constant | linear | cosine (decay to min_lr_ratio x lr)",
                                       Choice(("constant", "linear", "cosine")))
    min_lr_ratio: float = opt(0.0, "lr_schedule=linear or cosine: the last step's rate as a share of lr", SHARE)
    weight_decay: float = opt(0.0, "AdamW's decoupled weight decay", NON_NEGATIVE)
    beta1: float = opt(0.9, "AdamW's first-moment decay", HALF_OPEN_SHARE)
    beta2: float = opt(0.95, "AdamW's second-moment decay (0.95, as the reference)", HALF_OPEN_SHARE)
    grad_clip: float = opt(1.0, "clip the gradient's global norm to this (inf: no clipping)",
                                Number(0, low_open=True, inf_ok=True, note="inf: no clipping"))
    grad_accum: int = opt(1, "micro-batches per step (the step's rows are split evenly)", COUNT)
    max_tokens_per_micro_batch: int = opt(0, "micro-batches by token budget instead: rows grouped by length so that "
                                             "one holds at most N positions, padding included (0: off, grad_accum "
                                             "decides); the same gradient either way",
                                             Number(0, integer=True, note="0: off"))
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer in the backward pass instead of keeping "
                                              "its activations (transformers' own mechanism): the student's training "
                                              "memory no longer grows with depth")
    lora_rank: int = opt(0, "0: full fine-tuning", Number(0, integer=True, note="0: full fine-tuning"))
    lora_alpha: float = opt(32.0, "LoRA's scale numerator (the update is scaled by lora_alpha / lora_rank)", POSITIVE)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "the module names LoRA adapts, "
                                                                                       "a comma list")
    section("several processes (torchrun --nproc_per_node=N -m opd train ..., or opd train --nproc N)")
    parallel: str = opt("ddp", "ddp: weights replicated on every rank | fsdp: FSDP2, weights and optimizer sharded",
                               Choice(("ddp", "fsdp")))
    teacher_parallel: str = opt("none", "none: the whole teacher on every rank | fsdp: its layers sharded (FSDP2)",
                                        Choice(("none", "fsdp")))
    offload: str = opt("", "a comma list, FSDP2's CPUOffloadPolicy (several processes): optimizer (parallel=fsdp: the "
                           "student's shards, gradients and AdamW moments in CPU memory, the step run there) | teacher"
                           " (teacher_parallel=fsdp: its layer shards in CPU memory, each copied to the device for its"
                           " forward)")
    dist_timeout: float = opt(600.0, "seconds a rank waits for the others (e.g. rank 0 evaluating) before failing",
                                     POSITIVE)
    section("evaluation, logging, checkpoints")
    eval_every: int = opt(100, "held-out evaluation every N steps (and at the last)", COUNT)
    eval_examples: int = opt(256, "held-out prompts evaluated (the accuracies' N)", COUNT)
    eval_samples: int = opt(4, "sampled accuracy: completions drawn per held-out prompt (0: greedy accuracy only)",
                               Number(0, integer=True, note="0: greedy accuracy only"))
    eval_temperature: float = opt(1.0, "the sampled accuracy's temperature", POSITIVE)
    eval_batch: int = opt(256, "held-out prompts sampled at once (x eval_samples rows): lower it for big models", COUNT)
    save_every: int = opt(100, "a checkpoint every N steps (and at the last); only the newest is kept", COUNT)
    report_to: str = opt("none", "trackers, a comma list: none | tensorboard | wandb | trackio | mlflow")
    tracker_project: str = opt("opd", "the wandb / trackio project")
    run_name: str = opt("", "the tracker run's name (default: the run directory's)")
    seed: int = opt(0, "seeds sampling, prompt order and initialisation (a resumed run continues the same streams)",
                       SEED)
    device: str = opt("auto", "auto (cuda when there is one, else cpu) | cpu | cuda | cuda:N")
    dtype: str = opt("auto", "auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 | float16",
                     Choice(DTYPES))
    on_nonfinite: str = opt("stop", "a step whose loss, gradient or sampling distribution is not finite: stop (the run"
                            " ends naming the step; the last checkpoint is good) | skip (the update is not applied, "
                            "counted as nonfinite_skipped in metrics.jsonl)", Choice(("stop", "skip")))
    check_memory: bool = opt(True, "refuse, before loading the models, a run whose planned memory (opd plan, from the "
                                   "models' configs) exceeds the device's (the host's RAM on a CPU)")
    out: str = opt("", "run directory; default runs/<time>-<method>")

    @property
    def distils(self) -> bool:
        return self.method in DISTILLING

    @property
    def teacher_spec(self) -> str:
        """``teacher``, with ``teacher=self`` read as the student's initial weights: a frozen copy of ``student``
        (never a checkpoint of the run), so the student distils its own starting point (self-distillation with
        privileged context: the teacher reads ``teacher_messages``)."""
        return self.student if self.teacher == "self" else self.teacher

    @property
    def rewarded(self) -> bool:
        return self.method in REWARDED

    def validate(self) -> None:
        """Each field against its declared domain, then what fields mean together; raises ``OpdError``."""
        for f in fields(self):
            problem = check(f.metadata.get("domain"), f.name, getattr(self, f.name))
            if problem:
                raise OpdError(problem)
        if self.sft_data and self.method not in ("sft", "midtrain"):
            raise OpdError(f"sft_data is only read by method=sft or midtrain (method is {self.method!r})")
        if self.method == "midtrain":
            if not self.docs:
                raise OpdError("method=midtrain needs docs=FILE.jsonl (one {\"text\": ...} document per line)")
            if self.chat_fraction > 0 and not self.sft_data:
                raise OpdError("chat_fraction > 0 needs the chat data: sft_data=FILE.jsonl (prompt + completion)")
        elif self.docs or self.chat_fraction:
            raise OpdError(f"docs and chat_fraction are only read by method=midtrain (method is {self.method!r})")
        self.validate_sampler()
        if self.divergence != "reverse_kl" and not (self.kl in ("auto", "full", "topk") and self.distils):
            raise OpdError(f"divergence={self.divergence} compares the two distributions over the vocabulary: it needs "
                           f"kl=full or kl=topk and method opd or opd+rl (kl={self.kl}, method={self.method}); "
                           "kl=sampled estimates the reverse KL from the sampled tokens")
        if self.teachers:
            from opd.teachers.routed import parse_teachers

            parse_teachers(self.teachers)
            if self.kl == "full" or self.method in ("sft", "midtrain") or self.teacher_parallel == "fsdp":
                raise OpdError("teachers= (several teachers) works with kl=sampled or kl=topk (exact when teacher_topk "
                               "covers the vocabulary), method opd, opd+rl or rl, and whole teachers "
                               f"(kl={self.kl}, method={self.method}, teacher_parallel={self.teacher_parallel})")
        if self.lmbda < 1 and not (self.method == "opd" and self.kl in ("auto", "full", "topk")):
            raise OpdError(f"lmbda={self.lmbda}: the off-policy rows train on the teacher's distribution at each "
                           f"position, which needs method=opd with kl=full or kl=topk (method={self.method}, "
                           f"kl={self.kl})")
        if self.teacher_parallel == "fsdp" and (self.method in ("sft", "midtrain")
                                                or self.remote_teacher):
            raise OpdError("teacher_parallel=fsdp shards an in-process teacher that scores (method opd, rl, opd+rl); "
                           f"method={self.method} with teacher={self.teacher} has none to shard")
        self.offloaded()
        chosen_trackers(self.report_to)
        for name in TEMPLATE_KWARGS_FIELDS:
            self.template_kwargs(name)
        if self.environment or self.tools:
            self.validate_conversations()
        if (self.prompts_per_step * self.samples_per_prompt) % self.grad_accum:
            raise OpdError(f"grad_accum={self.grad_accum} must divide prompts_per_step * samples_per_prompt")

    def offloaded(self) -> set[str]:
        """``offload``'s names, each checked against the sharding it rides on."""
        names = {name.strip() for name in self.offload.split(",") if name.strip()}
        if names - {"optimizer", "teacher"}:
            raise OpdError(f"offload={self.offload!r}: the names are optimizer and teacher (a comma list, or empty)")
        if "optimizer" in names and self.parallel != "fsdp":
            raise OpdError("offload=optimizer keeps the student's FSDP2 shards and AdamW's state in CPU memory: it "
                           f"needs parallel=fsdp (parallel is {self.parallel})")
        if "teacher" in names and self.teacher_parallel != "fsdp":
            raise OpdError("offload=teacher keeps the teacher's FSDP2 layer shards in CPU memory: it needs "
                           f"teacher_parallel=fsdp (teacher_parallel is {self.teacher_parallel})")
        return names

    def template_kwargs(self, name: str = "chat_template_kwargs") -> dict:
        """``chat_template_kwargs`` (or ``teacher_chat_template_kwargs``) as the dict the template receives."""
        return parse_template_kwargs(getattr(self, name), f"config field {name}=", f"{name}=")

    def validate_conversations(self) -> None:
        if self.method not in ("opd", "rl", "opd+rl", "sft"):
            raise OpdError(f"environment=/tools=: conversations are sampled (by the student; by the teacher for sft), "
                           f"which method={self.method} does not (use opd, rl, opd+rl or sft)")
        if self.lmbda < 1 or self.sampler == "vllm" or self.async_rollouts:
            raise OpdError("environment=/tools= runs with the in-process sampler or a rollout server "
                           "(sampler=local or http://), lmbda=1 and async_rollouts=0")

    @property
    def remote_teacher(self) -> bool:
        """The teacher is behind a server (``teacher=http(s)://HOST:PORT``): it scores; it is not loaded here."""
        return self.teacher.startswith(("http://", "https://"))

    @property
    def program_teacher(self) -> bool:
        """The teacher is a program (``teacher=module.path:Name``, ``teachers.programmatic``): it grades, it
        is no model (``embedded:NAME`` and ``hf:`` specs are models)."""
        return bool(PROGRAM.fullmatch(self.teacher)) and not self.teacher.startswith(("embedded:", "hf:"))

    @property
    def remote_sampler(self) -> bool:
        return self.sampler.startswith(("http://", "https://"))

    def validate_sampler(self) -> None:
        if self.sampler not in ("local", "vllm") and not self.remote_sampler:
            raise OpdError(f"config field sampler={self.sampler!r} must be local, vllm, or http://HOST:PORT of a "
                           "rollout server (vllm serve, opd serve)")
        if self.sampler != "local" and self.method in ("sft", "midtrain"):
            raise OpdError(f"sampler={self.sampler}: method={self.method} trains on given or teacher-written "
                           "completions; a rollout server samples the student (opd, rl, opd+rl)")
        if self.sample_noise and (self.sampler != "local" or self.environment or self.tools):
            raise OpdError(f"sample_noise={self.sample_noise}: the injected errors are made by the in-process sampler "
                           "of single-turn rollouts (sampler=local, no environment= or tools=)")
        if self.async_rollouts and not self.remote_sampler:
            raise OpdError("async_rollouts=1 needs a rollout server (sampler=http://HOST:PORT): the in-process "
                           "sampler and the update share one model")
        if self.sampler_sync == "lora" and self.lora_rank == 0:
            raise OpdError("sampler_sync=lora needs a LoRA run (lora_rank > 0); full fine-tuning uses "
                           "sampler_sync=reload (opd serve) or nccl (vLLM on GPUs)")

    @property
    def sync_kind(self) -> str:
        """How weights reach a rollout server: ``sampler_sync``, or for auto LoRA's adapter or a full reload."""
        if self.sampler_sync != "auto":
            return self.sampler_sync
        return "lora" if self.lora_rank > 0 else "reload"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_template_kwargs(text: str | None, given: str, example: str) -> dict:
    """``text``, a JSON object of chat template variables, as a dict ({} when empty); ``given`` names where it
    was given in an error (``config field chat_template_kwargs=``), ``example`` how to give it."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise OpdError(f"{given}{text!r} is not JSON ({err.msg}); give an object, e.g. "
                       f"{example}'{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise OpdError(f"{given}{text!r} must be a JSON object of template variables, e.g. "
                       f"{example}'{{\"enable_thinking\": false}}'")
    return value


def field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(TrainConfig)}


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def parse_value(name: str, text: str, kind: type, source: str):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise OpdError(f"{source}: config field {name}={text!r} must be true or false")
    try:
        return kind(text)
    except ValueError:
        raise OpdError(f"{source}: config field {name}={text!r} must be {KIND_NAMES[kind]}") from None


def apply_values(config: TrainConfig, values: dict, source: str) -> TrainConfig:
    types = field_types()
    for name, value in values.items():
        if name == "teachers" and isinstance(value, dict):  # a TOML table: [teachers] math = "DIR"
            value = ",".join(f"{k}={v}" for k, v in value.items())
        if name in TEMPLATE_KWARGS_FIELDS and isinstance(value, dict):  # a TOML table
            value = json.dumps(value)
        if name not in types:
            raise OpdError(f"{source}: unknown config field {name!r}; known fields: {', '.join(types)}")
        kind = types[name]
        if isinstance(value, str) and kind is not str:
            value = parse_value(name, value, kind, source)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind):
            raise OpdError(f"{source}: config field {name}={value!r} must be {KIND_NAMES[kind]}")
        setattr(config, name, value)
    return config


def load_config(toml_path: str | None = None, overrides: list[str] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then ``key=value`` overrides; validated."""
    config = base or TrainConfig()
    if toml_path:
        path = Path(toml_path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise OpdError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise OpdError(f"config file {path} is not valid TOML: {err}") from None
        apply_values(config, values, str(path))
    parsed = {}
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise OpdError(f"override {item!r} must look like key=value")
        parsed[name.strip()] = value.strip()
    apply_values(config, parsed, "command line")
    config.validate()
    return config


def config_help() -> str:
    """The config fields, grouped, with their defaults, help and allowed values (``opd train --help``): each
    field's own declaration."""
    lines, group = ["config fields (key=value):"], None
    for f in fields(TrainConfig):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f" {group}:")
        domain = f.metadata.get("domain")
        allowed = f" [{domain.describe()}]" if domain is not None and not isinstance(domain, Choice) else ""
        lines.append(f"  {f.name}={json.dumps(f.default)}  {f.metadata['help']}{allowed}")
    return "\n".join(lines)
