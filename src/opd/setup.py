"""Everything a run needs before its first step, built once: the student, the teacher (behind its view), the
rollout source, the objective and the optimizer, the run directory, and the state to continue from when
resuming. All input checks happen here, before any compute; what a refusal leaves connected is closed."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from opd import distributed, runs
from opd.chat_settings import with_template_kwargs
from opd.config import TrainConfig
from opd.environments import Dialogue, load_environment
from opd.errors import OpdError
from opd.flops import ModelShape
from opd.models import (
    add_lora,
    chat_prompt_ids,
    checkpoint_layers,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    quiet_peft,
    resolve_model_path,
)
from opd.objective import Objective, kl_of
from opd.samplers.local import Noise, task_noise
from opd.samplers.sources import (
    Conversations,
    DataPairs,
    Documents,
    Draw,
    InProcess,
    Mixed,
    OffPolicy,
    OnServer,
    Prompter,
    Rewards,
    RolloutSource,
    Sampled,
    ServerSamples,
    StepPrompts,
    document_chunks,
)
from opd.schedule import lr_factor
from opd.tasks import Example, Task
from opd.tasks.choose import make_task
from opd.tasks.sources import DataOptions
from opd.teachers.build import build_teacher, check_teacher_path, route_teachers, teacher_tokenizer_for
from opd.teachers.view import TeacherView, choose_path
from opd.templates import choose_templates
from opd.trackers import check_installed as check_trackers


@dataclass
class Session:
    config: TrainConfig
    run_dir: Path
    device: torch.device
    dist: distributed.Dist
    tokenizer: object  # the student's
    prompter: Prompter  # a conversation as the student's prompt ids, within its context
    student: torch.nn.Module  # what the optimizer updates (LoRA-wrapped; sharded under FSDP2)
    full_model: torch.nn.Module  # the whole student to sample from, evaluate and save
    loss_module: torch.nn.Module  # forward = the objective's loss; DDP- or FSDP2-wrapped under torchrun
    objective: Objective  # what the run optimises: the teacher's part, the advantages, the loss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task: Task
    eval_set: list[Example]
    teacher_view: TeacherView | None  # the teacher (its model, tokenizer, shape) as it reads the student's rows
    source: RolloutSource | None = None  # where each step's rows come from
    dialogue: Dialogue | None = None  # conversations: the environment that answers each turn, and its bounds
    noise: Noise | None = None  # sample_noise: the environment's replacements of sampled tokens (rollouts, evaluation)
    start_step: int = 0
    records: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None

    @property
    def vocab_size(self) -> int:
        """The student tokenizer's ids: a padded head's extra rows are never sampled or scored."""
        return self.objective.vocab_size

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    @cached_property
    def student_shape(self) -> ModelShape:
        return ModelShape.of(self.full_model)

    def trainer_state(self) -> dict:
        """Optimizer (keyed by parameter name, any world size) and scheduler state; every rank calls it."""
        return {"optimizer": distributed.optimizer_state(self.student, self.optimizer),
                "scheduler": self.scheduler.state_dict()}

    def close(self) -> None:
        """Close the connections to servers (teachers, the rollout server): once, when the run ends."""
        if self.teacher_view is not None:
            self.teacher_view.close()
        if self.source is not None:
            self.source.close()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.prompter.ids(messages)


def open_session(config: TrainConfig, resume: str | Path | None = None, task: Task | None = None,
                 reward=None, environment=None) -> Session:
    """Everything a run needs; ``task`` and ``reward`` are a user's Python objects (``opd.train``). The
    caller closes it (``Session.close``); when a check refuses, what was connected is closed here."""
    opened: list = []  # what holds connections (servers' clients), closed if a later check refuses
    try:
        return build_session(config, resume, task, reward, opened, environment)
    except BaseException:
        for thing in reversed(opened):
            thing.close()
        raise


@dataclass
class Inputs:
    """What the config names, read and checked before anything is loaded."""

    dist: distributed.Dist
    device: torch.device
    dtype: torch.dtype
    student_path: str
    teacher_path: str | None  # None: no teacher (midtraining) or one behind a server
    tokenizer: object
    teacher_tokenizer: object  # None without a teacher
    path_kind: str | None  # how the teacher reads the student's rows (teachers.view.choose_path)
    task: Task
    eval_set: list[Example]
    environment: tuple | None = None  # (the environment, its name): conversations


def read_inputs(config: TrainConfig, task: Task | None, reward, environment=None) -> Inputs:
    config.validate()
    check_trackers(config.report_to)
    dist = distributed.from_environment(config.dist_timeout, config.device, cpu_collectives=bool(config.offloaded()))
    device = pick_device(config.device)
    if dist.active:
        if config.prompts_per_step % dist.world:
            raise OpdError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the {dist.world} "
                           "ranks: each rank takes an equal share of the step's prompts")
        if config.parallel == "fsdp" and config.lora_rank > 0:
            raise OpdError("parallel=fsdp with LoRA: the adapters and their optimizer state are small, so there is "
                           "nothing worth sharding; use parallel=ddp")
    midtrain = config.method == "midtrain"  # no teacher: next-token cross-entropy on documents
    remote = not midtrain and config.remote_teacher
    if remote and config.method == "sft":
        raise OpdError("method=sft has the teacher write the completions, which a scoring server cannot: "
                       "load the teacher in-process")
    student_path = resolve_model_path(config.student, "student")
    if config.program_teacher and config.method == "sft" and not config.sft_data:
        raise OpdError(f"method=sft has the teacher write the completions; teacher={config.teacher} is a program, "
                       "which only grades: write its completions to a JSONL file and pass sft_data=")
    teacher_path = None if midtrain or remote or config.program_teacher else resolve_model_path(config.teacher_spec,
                                                                                              "teacher")
    talk = load_environment(config.environment, config.tools, config.tool_format, given=environment)
    tools = {"tools": talk[0].tools} if talk[0] is not None and getattr(talk[0], "tools", None) else {}
    tokenizer = with_template_kwargs(load_tokenizer(student_path), config.template_kwargs() | tools)
    teacher_tokenizer = None if midtrain else with_template_kwargs(
        teacher_tokenizer_for(config, tokenizer, teacher_path),
        config.template_kwargs("teacher_chat_template_kwargs") | tools)
    tokenizer, teacher_tokenizer, notes = choose_templates(tokenizer, teacher_tokenizer, config.chat_template,
                                                           config.teacher_chat_template, talk[0])
    for note in notes if dist.rank == 0 else []:  # the run's log: which template conversations use
        print(f"opd: {note}", file=sys.stderr)
    aligned = teacher_tokenizer is not None and choose_path(tokenizer, teacher_tokenizer,
                                                            config.teacher_template) == "aligned"
    config.kl = kl_of(config, aligned)
    config.validate()  # what the resolved kl allows (divergence=, lmbda=)
    if remote and config.kl == "full" and config.distils:
        raise OpdError("kl=full needs the teacher's whole distribution, which a server does not send: "
                       "use kl=topk (the teacher's top-k per position, teacher_topk=20) or kl=sampled with a remote "
                       "teacher, or load the teacher in-process")
    path_kind = None if teacher_tokenizer is None else check_teacher_path(
        config, tokenizer, teacher_tokenizer, student_path, teacher_path)
    if talk[0] is not None and config.method == "sft" and path_kind != "shared":
        raise OpdError("method=sft with an environment trains on the teacher's conversations token for token: "
                       "the teacher must be in process with the student's tokenizer and chat template")
    task = make_task(config, task, reward)
    eval_set = task.eval_examples(config.eval_examples)
    if not eval_set:
        raise OpdError(f"task {task.name} has no held-out prompts; pass eval_file=PATH.jsonl")
    if config.rewarded and any(not ex.verifiable for ex in task.train_examples(0, config.prompts_per_step,
                                                                               config.seed)):
        raise OpdError(f"method={config.method} needs a reward: every training prompt of {task.name} needs an "
                       "'answer' or 'constraints' for the verifier")
    return Inputs(dist, device, pick_dtype(config.dtype, device), student_path, teacher_path, tokenizer,
                  teacher_tokenizer, path_kind, task, eval_set, talk if talk[0] is not None else None)


def check_memory(config: TrainConfig, inputs: Inputs) -> None:
    """``check_memory``: the run's plan from the models' configs (no weights loaded) against the device's memory,
    or the host's RAM on a CPU (``plan.check_fits``); the prompts' lengths from the first step's and the held-out
    prompts."""
    if not config.check_memory:
        return
    from transformers import AutoConfig

    from opd.plan import ModelFacts, check_fits

    student = ModelFacts.of(config.student, AutoConfig.from_pretrained(inputs.student_path), lora=config)
    teacher = None if inputs.teacher_path is None else ModelFacts.of(
        config.teacher_spec, AutoConfig.from_pretrained(inputs.teacher_path))
    examples = inputs.task.train_examples(0, config.prompts_per_step, config.seed) + inputs.eval_set[:8]
    lengths = [len(chat_prompt_ids(inputs.tokenizer, ex.messages)) for ex in examples]
    check_fits(config, student, teacher, lengths, inputs.dist.world if inputs.dist.active else 1, inputs.device)


def resolution(config: TrainConfig, inputs: Inputs) -> tuple[dict, dict]:
    """What this run resolved each of ``runs.RESOLVED`` to (config.json's "resolved"), and why, in words."""
    remote = config.remote_teacher
    kl_why = ("the teacher reads another tokenizer" if inputs.path_kind == "aligned" else
              "the teacher is behind a server" if remote else "several teachers" if config.teachers else
              "one teacher in process" if inputs.path_kind else "no teacher")
    template_why = {"aligned": "the teacher's tokenizer differs from the student's",
                    "own": "the teacher's chat template differs from the student's",
                    "shared": "the teacher reads the student's rendering"}.get(inputs.path_kind or "", "")
    resolved = {"kl": config.kl, "teacher_template": inputs.path_kind or "", "dtype": str(inputs.dtype).removeprefix(
        "torch."), "device": inputs.device.type, "sampler_sync": config.sync_kind if config.remote_sampler else ""}
    reasons = {"kl": kl_why, "teacher_template": template_why, "dtype": f"on {inputs.device.type}"}
    return resolved, reasons


def build_student(config: TrainConfig, path: str, checkpoint: tuple[int, Path] | None, device: torch.device,
                  dtype: torch.dtype) -> torch.nn.Module:
    """The student from its directory (or the checkpoint it resumes from), with LoRA adapters when asked."""
    student = load_model(checkpoint[1] if checkpoint and config.lora_rank == 0 else path, device, dtype)
    if config.lora_rank > 0:
        if checkpoint:
            from peft import PeftModel

            with quiet_peft():
                student = PeftModel.from_pretrained(student, str(checkpoint[1]), is_trainable=True)
        else:
            student = add_lora(student, config.lora_rank, config.lora_alpha, config.lora_targets)
    if config.gradient_checkpointing:
        checkpoint_layers(student)
    return student


def prompt_budget(config: TrainConfig, student: torch.nn.Module) -> int:
    """The longest prompt: the student's context less ``max_new_tokens`` (or ``max_prompt_tokens``)."""
    context = getattr(student.config, "max_position_embeddings", 2048)
    budget = context - config.max_new_tokens
    if budget < 1:
        raise OpdError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
                       f"student's context of {context} tokens")
    return min(budget, config.max_prompt_tokens) if config.max_prompt_tokens else budget


def connect_sampler(config: TrainConfig, tokenizer, student_path: str, dtype: torch.dtype, context: int,
                    opened: list):
    """``sampler=http://``: the rollout server, its model, context and tokenizer checked; ``sampler=vllm``: the
    colocated engine; None for the in-process sampler."""
    if config.remote_sampler:
        from opd.samplers.remote import RemoteSampler

        sampler = RemoteSampler(config.sampler, config.sampler_model or None,
                                api_key=os.environ.get("OPD_SAMPLER_API_KEY"))
        opened.append(sampler)
        sampler.connect(tokenizer, context)
        return sampler
    if config.sampler == "vllm":
        from opd.samplers.colocated import ColocatedSampler

        sampler = ColocatedSampler(student_path, dtype, config.vllm_memory, context, config.seed, len(tokenizer))
        opened.append(sampler)
        return sampler
    return None


def build_optimizer(config: TrainConfig, student: torch.nn.Module):
    """AdamW over the trainable parameters; the rate warmed up linearly over ``warmup_steps``, then
    ``lr_schedule`` (``schedule.lr_factor``)."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(config.beta1, config.beta2),
                                  weight_decay=config.weight_decay)
    factor = functools.partial(lr_factor, warmup_steps=config.warmup_steps, steps=config.steps,
                               schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_session(config: TrainConfig, resume: str | Path | None, task: Task | None, reward,
                  opened: list, environment=None) -> Session:
    requested = config.to_dict()  # config.json keeps what was asked for; read_inputs resolves kl in place
    inputs = read_inputs(config, task, reward, environment)
    device, dtype, dist, tokenizer = inputs.device, inputs.dtype, inputs.dist, inputs.tokenizer
    resolved, reasons = resolution(config, inputs)
    check_memory(config, inputs)  # before anything is loaded
    run_dir = None  # created after the checks below pass, so bad input leaves nothing behind
    if resume is not None:
        run_dir = Path(resume)
        runs.check_resumable(run_dir, TrainConfig(**requested))
        runs.check_resolution(run_dir, resolved, reasons)
    checkpoint = runs.latest_checkpoint(run_dir) if run_dir else None

    torch.manual_seed(config.seed)
    student = build_student(config, inputs.student_path, checkpoint, device, dtype)
    prompter = Prompter(tokenizer, prompt_budget(config, student), config.truncate_prompts)
    context = prompter.max_prompt_tokens + config.max_new_tokens
    view = None if inputs.teacher_tokenizer is None else build_teacher(
        config, tokenizer, inputs.teacher_tokenizer, inputs.teacher_path, inputs.path_kind, device, dtype, dist,
        context, opened, inputs.task)
    if view is not None and config.program_teacher:  # a program has no size: charged as the student's
        view.charge(ModelShape.of(student))
    rollout_sampler = connect_sampler(config, tokenizer, inputs.student_path, dtype, context, opened)
    objective = Objective.of(config, len(tokenizer))
    loss_module, full_model = distributed.wrap(student, objective, config.parallel, dist,
                                               offload="optimizer" in config.offloaded())
    optimizer, scheduler = build_optimizer(config, student)
    if config.teachers:
        view = route_teachers(view, config, tokenizer, inputs.student_path, device, dtype, context, opened)
    session = Session(config, run_dir or Path(), device, dist, tokenizer, prompter, student, full_model, loss_module,
                      objective, optimizer, scheduler, inputs.task, inputs.eval_set, view)
    session.noise = task_noise(config.sample_noise, inputs.task, tokenizer, session.vocab_size)
    if inputs.environment is not None:
        session.dialogue = Dialogue(*inputs.environment, config.max_turns, config.max_trajectory_tokens or context)
    pairs, chunks = [], []
    if config.sft_data:
        from opd.tasks.jsonl import load_sft_pairs

        pairs = load_sft_pairs(config.sft_data, DataOptions.of(config))
        for example, *_ in pairs:
            prompter.ids(example.messages)
    if config.method == "midtrain":
        chunks = document_chunks(config.docs, tokenizer, config.doc_tokens, DataOptions.of(config))
    check_off_policy(session)
    check_prompts(session)

    if run_dir is None:  # rank 0 alone writes the run directory; the others learn its path
        made = str(runs.new_run_dir(config, requested, resolved)) if dist.main else None
        session.run_dir = Path(distributed.broadcast(made, dist))
    else:
        restore(session, checkpoint)
    session.source = rollout_source(session, rollout_service(config, rollout_sampler, session.run_dir), pairs,
                                    chunks)
    return session


def check_prompts(session: Session) -> None:
    """Every held-out prompt and the first training prompts must fit, and name a teacher that
    ``teachers=`` defines, before any compute."""
    config = session.config
    for example in session.eval_set + session.task.train_examples(0, config.prompts_per_step, config.seed):
        session.prompt_ids(example.messages)
        if session.teacher_view is not None and session.teacher_view.several:
            session.teacher_view.view(example.teacher)


def check_off_policy(session: Session) -> None:
    """GKD's off-policy rows (``lmbda < 1``) that need the teacher's samples (``seq_kd``, or prompts without a
    reference completion) need a teacher that can write them: in process, and not sharded (its samples'
    lengths differ by rank)."""
    config = session.config
    if config.lmbda >= 1:
        return
    examples = session.task.train_examples(0, config.prompts_per_step, config.seed)
    if not (config.seq_kd or any(not ex.completion for ex in examples)):
        return
    why = "seq_kd=true" if config.seq_kd else "the prompts carry no completion"
    if config.teachers:
        raise OpdError(f"lmbda={config.lmbda} with {why}: with several teachers the off-policy rows must come from "
                       "the data (prompts with a completion, seq_kd=false)")
    if session.teacher_view is None or session.teacher_view.model is None:
        raise OpdError(f"lmbda={config.lmbda} with {why}: the off-policy rows are the teacher's samples, and a teacher "
                       "behind a server only scores. Give prompts with a completion field (and seq_kd=false), or "
                       "load the teacher in process")
    if config.teacher_parallel == "fsdp" and session.dist.active:
        raise OpdError(f"lmbda={config.lmbda} with {why}: a sharded teacher cannot sample (its ranks' samples "
                       "differ in length, its forwards are collectives); use teacher_parallel=none or prompts with "
                       "completions")


def rollout_service(config: TrainConfig, sampler, run_dir: Path):
    """A rollout server (or the colocated engine) with the way the weights reach it after every update."""
    if sampler is None:
        return None
    from opd.samplers.service import RolloutService
    from opd.samplers.sync import make_sync

    if config.sampler == "vllm":
        from opd.samplers.colocated import ColocatedSync

        return RolloutService(sampler, ColocatedSync(sampler))
    directory = Path(config.sampler_sync_dir) if config.sampler_sync_dir else run_dir / "sampler"
    return RolloutService(sampler, make_sync(config.sync_kind, sampler, directory, f"opd-{run_dir.name}"))


def rollout_source(session: Session, service, pairs: list, chunks: list[list[int]]) -> RolloutSource:
    """Where the run's rows come from (``samplers.sources``): documents (midtraining), data pairs
    (``sft_data``), or samples of the task's prompts, by the student in process or on a rollout server (the
    teacher for ``method=sft``), mixed with GKD's off-policy rows when ``lmbda < 1``."""
    config, tokenizer, device, rank = session.config, session.tokenizer, session.device, session.dist.rank
    rewards = Rewards(tokenizer, session.task)
    data = DataPairs(pairs, config.prompts_per_step, session.prompter, config.max_new_tokens, config.seed, rewards,
                     session.dist, device)
    if config.method == "midtrain":
        return Documents(chunks, data, config.prompts_per_step, config.chat_fraction, config.seed, session.dist,
                         device)
    if pairs:
        return data
    draw = Draw(config.samples_per_prompt, config.max_new_tokens, config.temperature, config.top_p, config.seed,
                config.sample_batch, session.noise)
    prompts = StepPrompts(session.task, config.prompts_per_step, config.train_prompts, config.seed, session.dist,
                          config.lmbda if config.method == "opd" else 1.0)
    view = session.teacher_view
    server = None if service is None else OnServer(service, session.full_model, session.vocab_size, draw,
                                                   config.tis_cap, session.dist)
    if session.dialogue is not None:  # whole conversations: the student's, or for sft the teacher's transcripts
        model = view.model if config.method == "sft" else session.full_model
        if server is not None:
            server.model = model
        return Conversations(prompts, session.prompter, draw, session.dialogue, session.task, model,
                             session.vocab_size, device, rank, server)

    def teacher(seed_offset: int) -> InProcess:  # the teacher in its own template and context when it has them
        return InProcess(view.model, session.prompter, draw, session.vocab_size, device, rank, seed_offset,
                         getattr(view, "teacher_prompt", None), own=view.path == "own")  # routed: the default's model

    if server is not None:
        on = ServerSamples(server, prompts, session.prompter, rewards, config.steps, bool(config.async_rollouts),
                           device)
    elif config.method == "sft":  # the teacher writes the completions
        on = Sampled(prompts, teacher(0), rewards)
    else:
        on = Sampled(prompts, InProcess(session.full_model, session.prompter, draw, session.vocab_size, device, rank),
                     rewards)
    if prompts.on_policy_share == 1.0:
        return on
    off = OffPolicy(prompts, teacher(104_729), session.prompter, rewards, config.seq_kd)  # not the student's draws
    return Mixed(on, off, tokenizer.pad_token_id, device)


def restore(session: Session, checkpoint: tuple[int, Path] | None) -> None:
    """Continue a run from its latest checkpoint: the optimizer's and the scheduler's state, the step, and
    the metrics up to it (lines logged after the checkpoint are dropped, since those steps run again). A
    run interrupted before its first checkpoint starts over in the same directory. The weights were
    loaded from the checkpoint with the model."""
    main = session.dist.main
    if checkpoint is None:
        if main:
            runs.rewrite_metrics(session.run_dir, [])
        return
    step, path = checkpoint
    saved = torch.load(path / "trainer_state.pt", weights_only=True)  # tensors and numbers only: no pickled code
    distributed.load_optimizer_state(session.student, session.optimizer, saved["optimizer"])
    session.scheduler.load_state_dict(saved["scheduler"])
    session.start_step, session.last_checkpoint = step, path
    session.records = runs.read_metrics(session.run_dir, up_to_step=step)
    if main:
        runs.rewrite_metrics(session.run_dir, session.records)
