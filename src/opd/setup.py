"""Everything a run needs before its first step: models, tokenizer, task, teacher, optimizer, run
directory, and the state to continue from when resuming. All input checks happen here, before any
compute."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd import distributed, runs
from opd.config import TrainConfig
from opd.flops import ModelShape
from opd.models import (
    OpdError,
    add_lora,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    quiet_peft,
)
from opd.objective import Objective, resolve_kl
from opd.samplers.sources import (
    DataPairs,
    Documents,
    Draw,
    InProcess,
    Mixed,
    OffPolicy,
    Prompter,
    Rewards,
    RolloutSource,
    Sampled,
    Served,
    StepPrompts,
)
from opd.tasks import ArithmeticTask, Example, Task
from opd.tasks.sources import DataOptions, is_dataset_spec
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.view import TeacherView, choose_path, tokenizer_differences
from opd.trackers import check_installed as check_trackers

EMBEDDED_PREFIX = "embedded:"


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_path(name: str, field: str = "model") -> str:
    """``embedded:NAME`` is a model shipped with opd; a local directory must hold a model (config.json);
    anything else must look like a hub id (``ORG/NAME``), whose loading then says if the hub lacks it.
    ``field`` names the setting in errors (``student``, ``teacher``)."""
    if name.startswith(EMBEDDED_PREFIX):
        from opd.zoo import EMBEDDED_DIR

        path = EMBEDDED_DIR / name[len(EMBEDDED_PREFIX):]
        if not (path / "config.json").is_file():
            raise OpdError(f"the embedded model {name} is missing at {path}; rebuild it with `opd zoo build` "
                           "(`opd zoo assistant` for the assistant)")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OpdError(f"{field}={name}: the directory has no config.json, so it is not a Hugging Face model "
                           "directory (one written by save_pretrained, or an opd run's final/ or checkpoint)")
        return str(path)
    if path.exists():
        raise OpdError(f"{field}={name} is a file; give a model directory or a hub id")
    if not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise OpdError(f"{field}={name}: the directory {path} does not exist. Give a Hugging Face model directory "
                       "or a hub id such as Qwen/Qwen3-1.7B")
    return name  # a hub id: load_tokenizer and load_model say if the hub does not have it


def make_task(config: TrainConfig, task: Task | None = None, reward=None) -> Task:
    """The run's task: ``task`` when given (a Python object), else ``config.task``; with ``reward`` (a
    function) or ``config.reward`` (its import path) in place of the task's own. A user's task or reward
    comes back wrapped (``tasks.custom.UserTask``) so that every reward is checked."""
    from opd.tasks.custom import UserTask, check_task, is_import_path, load_reward, load_task

    if config.verifier != "exact" and (task is not None or not is_file_task(config.task)):
        raise OpdError(f"verifier={config.verifier} grades a prompts file; task={config.task} has its own verifier "
                       "(give your own with reward=module:function)")
    if task is not None:
        check_task(task, "task")
    elif is_import_path(config.task):
        task = load_task(config.task)
    base = task if task is not None else builtin_task(config)
    if reward is None and config.reward.startswith(PYTHON_OBJECT):
        raise OpdError(f"reward={config.reward}: this run's reward was a Python function; pass it again "
                       "(opd.train(..., reward=...)) or give its import path, reward=module:function")
    if reward is None and config.reward:
        reward = load_reward(config.reward)
    if task is None and reward is None:
        return base
    return UserTask(base, reward, config.reward)


def is_file_task(name: str) -> bool:
    """Prompts from a file, a folder or a hub dataset (not a built-in task or an import path)."""
    return Path(name).is_file() or is_dataset_spec(name)


PYTHON_OBJECT = "python:"  # how config.json records a task or reward given as a Python object


def builtin_task(config: TrainConfig) -> Task:
    if config.task.startswith(PYTHON_OBJECT):
        raise OpdError(f"task={config.task}: this run's task was a Python object; pass it again "
                       "(opd.train(..., task=...)) or give its import path, task=module:Class")
    if config.task == "arithmetic":
        return ArithmeticTask()
    if config.task.startswith("arithmetic:"):  # arithmetic:K, K operators: a longer horizon
        operators = config.task.partition(":")[2]
        if not operators.isdigit() or not 1 <= int(operators) <= 12:
            raise OpdError(f"task={config.task!r}: arithmetic:K takes K operators, an integer from 1 to 12")
        return ArithmeticTask(int(operators))
    if is_file_task(config.task):
        from opd.tasks.jsonl import JsonlTask

        return JsonlTask(config.task, config.eval_file or None, config.verifier, DataOptions.of(config))
    raise OpdError(f"task={config.task!r} is neither a built-in task (arithmetic), a prompts file or folder that "
                   "exists, a hub dataset (hf:ORG/NAME), nor module:Class of your own")


def teacher_tokenizer_for(config: TrainConfig, tokenizer, teacher_path: str | None):
    """The teacher's tokenizer: ``teacher_tokenizer=`` when set, else the teacher's directory; a teacher
    behind a server without ``teacher_tokenizer=`` is taken to share the student's (``connect`` checks)."""
    if config.teacher_tokenizer:
        return load_tokenizer(resolve_model_path(config.teacher_tokenizer, "teacher_tokenizer"))
    return tokenizer if teacher_path is None else load_tokenizer(teacher_path)


def check_teacher_path(config: TrainConfig, student, teacher, student_path: str, teacher_path: str | None) -> str:
    """How the teacher will read the rollouts (``view.choose_path``). A teacher with another tokenizer is
    read through the text alignment, which scores sampled tokens only: refuse what needs one vocabulary
    (the exact KL, the teacher writing SFT data), naming the difference."""
    path = choose_path(student, teacher, config.teacher_template)
    if path != "aligned":
        return path
    differences = "; ".join(tokenizer_differences(student, teacher))
    where = f"the student ({student_path}) and the teacher ({teacher_path or config.teacher})"
    if config.kl in ("full", "topk") and config.distils:
        raise OpdError(f"the tokenizers of {where} differ ({differences}). kl={config.kl} compares the two models' "
                       "distributions over one vocabulary: use kl=sampled, which aligns the teacher's tokens "
                       "with the student's on the text (teacher_tokenizer and teacher_template say how the "
                       "teacher reads it)")
    if config.method == "sft" and not config.sft_data:
        raise OpdError(f"the tokenizers of {where} differ ({differences}). method=sft trains on the teacher's "
                       "sampled token ids, which the student cannot read: write the teacher's completions to "
                       "a JSONL file and pass sft_data=, or use method=opd with kl=sampled")
    return path


@dataclass
class Session:
    config: TrainConfig
    run_dir: Path
    device: torch.device
    tokenizer: object
    student: torch.nn.Module
    teacher_model: torch.nn.Module | None  # None when the teacher is behind a server
    teacher: LocalTeacher | RemoteTeacher | None
    task: Task
    eval_set: list[Example]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[torch.nn.Parameter]
    vocab_size: int
    max_prompt_tokens: int
    start_step: int = 0
    records: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    student_shape: ModelShape | None = None
    teacher_shape: ModelShape | None = None  # None for a teacher behind a server
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    loss_module: torch.nn.Module | None = None  # forward = policy loss; DDP- or FSDP2-wrapped under torchrun
    full_model: torch.nn.Module | None = None  # the whole student to sample from, evaluate and save
    teacher_view: TeacherView | None = None  # how the teacher reads the student's rollouts (its template, tokens)
    teacher_tokenizer: object = None
    source: RolloutSource | None = None  # where each step's rows come from (samplers.sources)
    prompter: Prompter | None = None  # a conversation as the student's prompt ids, within the context
    teacher_shapes: dict | None = None  # teachers=: each teacher's ModelShape by name ("" for teacher=)
    objective: Objective | None = None  # what the run optimises: the teacher's part, advantages, loss

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


def document_chunks(path: str, tokenizer, length: int, options: DataOptions) -> list[list[int]]:
    """Each document's tokens, EOS appended, cut into pieces of ``length`` (pieces under 2 tokens dropped)."""
    from opd.tasks.jsonl import load_documents

    chunks = []
    for text in load_documents(path, options):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        chunks += [ids[i : i + length] for i in range(0, len(ids), length) if len(ids[i : i + length]) >= 2]
    return chunks


def check_prompts(session: Session) -> None:
    """Every held-out prompt and the first training prompts must fit, before any compute."""
    for example in session.eval_set + session.task.train_examples(0, session.config.prompts_per_step,
                                                                  session.config.seed):
        session.prompt_ids(example.messages)


def route_teachers(session: Session, device: torch.device, dtype: torch.dtype, student_path: str,
                   context: int, opened: list) -> None:
    """``teachers=``: every named teacher loaded (or connected), each read through its own ``TeacherView``;
    the session's view routes each row to the teacher its prompt names (``teacher=`` for the rest)."""
    from opd.teachers.routed import DEFAULT, RoutedTeacherView, parse_teachers

    config = session.config
    views = {DEFAULT: session.teacher_view}
    session.teacher_shapes = {DEFAULT: None if session.teacher_model is None else ModelShape.of(session.teacher_model)}
    for name, spec in parse_teachers(config.teachers).items():
        if spec.startswith(("http://", "https://")):
            teacher = RemoteTeacher(spec, None, api_key=os.environ.get("OPD_TEACHER_API_KEY"))
            opened.append(teacher)
            teacher.connect(session.tokenizer, context)
            views[name] = TeacherView(teacher, session.tokenizer)
            session.teacher_shapes[name] = None
            continue
        path = resolve_model_path(spec, f"teachers={name}")
        their_tokenizer = load_tokenizer(path)
        kind = check_teacher_path(config, session.tokenizer, their_tokenizer, student_path, path)
        model = load_model(path, device, dtype)
        views[name] = TeacherView(LocalTeacher(model, len(their_tokenizer)), session.tokenizer, their_tokenizer,
                                  config.teacher_template, kind)
        session.teacher_shapes[name] = ModelShape.of(model)
    session.teacher_view = RoutedTeacherView(views)
    for example in session.eval_set + session.task.train_examples(0, config.prompts_per_step, config.seed):
        session.teacher_view.view(example.teacher)  # a prompt naming an unknown teacher: refused before compute


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
    if session.teacher_model is None:
        raise OpdError(f"lmbda={config.lmbda} with {why}: the off-policy rows are the teacher's samples, and a teacher "
                       "behind a server only scores. Give prompts with a completion field (and seq_kd=false), or "
                       "load the teacher in process")
    if config.teacher_parallel == "fsdp" and session.dist.active:
        raise OpdError(f"lmbda={config.lmbda} with {why}: a sharded teacher cannot sample (its ranks' samples "
                       "differ in length, its forwards are collectives); use teacher_parallel=none or prompts with "
                       "completions")


def open_session(config: TrainConfig, resume: str | Path | None = None, task: Task | None = None,
                 reward=None) -> Session:
    """Everything a run needs; ``task`` and ``reward`` are a user's Python objects (``opd.train``). The
    caller closes it (``Session.close``); when a check refuses, what was connected is closed here."""
    opened: list = []  # what holds connections (servers' clients), closed if a later check refuses
    try:
        return build_session(config, resume, task, reward, opened)
    except BaseException:
        for thing in reversed(opened):
            thing.close()
        raise


def build_session(config: TrainConfig, resume: str | Path | None, task: Task | None, reward,
                  opened: list) -> Session:
    config.validate()
    check_trackers(config.report_to)
    state = distributed.from_environment(config.dist_timeout, config.device)
    device = pick_device(config.device)
    if state.active:
        if config.prompts_per_step % state.world:
            raise OpdError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the {state.world} "
                           "ranks: each rank takes an equal share of the step's prompts")
        if config.parallel == "fsdp" and config.lora_rank > 0:
            raise OpdError("parallel=fsdp with LoRA: the adapters and their optimizer state are small, so there is "
                           "nothing worth sharding; use parallel=ddp")
    dtype = pick_dtype(config.dtype, device)
    midtrain = config.method == "midtrain"  # no teacher: next-token cross-entropy on documents
    remote = not midtrain and config.teacher.startswith(("http://", "https://"))
    if remote and config.method == "sft":
        raise OpdError("method=sft has the teacher write the completions, which a scoring server cannot: "
                       "load the teacher in-process")
    student_path = resolve_model_path(config.student, "student")
    teacher_path = None if midtrain or remote else resolve_model_path(config.teacher, "teacher")
    tokenizer = load_tokenizer(student_path)
    teacher_tokenizer = None if midtrain else teacher_tokenizer_for(config, tokenizer, teacher_path)
    aligned = teacher_tokenizer is not None and choose_path(tokenizer, teacher_tokenizer,
                                                            config.teacher_template) == "aligned"
    config.kl = resolve_kl(config.kl, remote=remote, several=bool(config.teachers), aligned=aligned)
    config.validate()  # what the resolved kl allows (divergence=, lmbda=)
    if remote and config.kl == "full" and config.distils:
        raise OpdError("kl=full needs the teacher's whole distribution, which a server does not send: "
                       "use kl=topk (the teacher's top-k per position, teacher_topk=20) or kl=sampled with a remote "
                       "teacher, or load the teacher in-process")
    teacher_path_kind = None if teacher_tokenizer is None else check_teacher_path(
        config, tokenizer, teacher_tokenizer, student_path, teacher_path)
    task = make_task(config, task, reward)
    eval_set = task.eval_examples(config.eval_examples)
    if not eval_set:
        raise OpdError(f"task {task.name} has no held-out prompts; pass eval_file=PATH.jsonl")
    if config.rewarded and any(not ex.verifiable for ex in task.train_examples(0, config.prompts_per_step,
                                                                                     config.seed)):
        raise OpdError(f"method={config.method} needs a reward: every training prompt of {task.name} needs an "
                       "'answer' or 'constraints' for the verifier")

    if resume is not None:
        run_dir = Path(resume)
        runs.check_resumable(run_dir, config)
    else:
        run_dir = None  # created after the checks below pass, so bad input leaves nothing behind
    checkpoint = runs.latest_checkpoint(run_dir) if run_dir else None

    torch.manual_seed(config.seed)
    if checkpoint and config.lora_rank == 0:
        student = load_model(checkpoint[1], device, dtype)
    else:
        student = load_model(student_path, device, dtype)
    if config.lora_rank > 0:
        if checkpoint:
            from peft import PeftModel

            with quiet_peft():
                student = PeftModel.from_pretrained(student, str(checkpoint[1]), is_trainable=True)
        else:
            student = add_lora(student, config.lora_rank, config.lora_alpha, config.lora_targets)
    vocab_size = len(tokenizer)
    context = getattr(student.config, "max_position_embeddings", 2048)
    max_prompt = context - config.max_new_tokens
    if max_prompt < 1:
        raise OpdError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
                       f"student's context of {context} tokens")
    if config.max_prompt_tokens:
        max_prompt = min(max_prompt, config.max_prompt_tokens)
    if midtrain:
        teacher_model, teacher = None, None
    elif remote:
        teacher_model = None
        teacher = RemoteTeacher(config.teacher, config.teacher_model or None,
                                api_key=os.environ.get("OPD_TEACHER_API_KEY"))
        opened.append(teacher)
        teacher.connect(teacher_tokenizer, max_prompt + config.max_new_tokens,
                        "teacher_tokenizer" if config.teacher_tokenizer else "student")
    else:
        sharded = config.teacher_parallel == "fsdp" and state.active
        teacher_model = load_model(teacher_path, torch.device("cpu") if sharded else device, dtype)
        if sharded:  # shard on the CPU, then only this rank's layer shards go to the device
            distributed.shard_teacher(teacher_model, state)
            teacher_model.to(device)
        teacher = LocalTeacher(teacher_model, len(teacher_tokenizer), sharded)

    rollout_sampler = None
    if config.remote_sampler:
        from opd.samplers.remote import RemoteSampler

        rollout_sampler = RemoteSampler(config.sampler, config.sampler_model or None,
                                        api_key=os.environ.get("OPD_SAMPLER_API_KEY"))
        opened.append(rollout_sampler)
        rollout_sampler.connect(tokenizer, max_prompt + config.max_new_tokens)
    elif config.sampler == "vllm":
        from opd.samplers.colocated import ColocatedSampler

        rollout_sampler = ColocatedSampler(student_path, dtype, config.vllm_memory, max_prompt + config.max_new_tokens,
                                           config.seed)
        opened.append(rollout_sampler)

    objective = Objective.of(config, len(tokenizer))
    loss_module, full_model = distributed.wrap(student, objective, config.parallel, state)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(config.beta1, config.beta2),
                                  weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    session = Session(config, run_dir or Path(), device, tokenizer, student, teacher_model,
                      teacher, task, eval_set, optimizer, scheduler,
                      trainable, vocab_size, max_prompt, dist=state, loss_module=loss_module,
                      full_model=full_model, teacher_tokenizer=teacher_tokenizer, objective=objective,
                      prompter=Prompter(tokenizer, max_prompt, config.truncate_prompts))
    if teacher is not None:
        session.teacher_view = TeacherView(teacher, tokenizer, teacher_tokenizer, config.teacher_template,
                                           teacher_path_kind)
    if config.teachers:
        route_teachers(session, device, dtype, student_path, max_prompt + config.max_new_tokens, opened)
    pairs, chunks = [], []
    if config.sft_data:
        from opd.tasks.jsonl import load_sft_pairs

        pairs = load_sft_pairs(config.sft_data, DataOptions.of(config))
        for example, _ in pairs:
            session.prompt_ids(example.messages)
    if midtrain:
        chunks = document_chunks(config.docs, tokenizer, config.doc_tokens, DataOptions.of(config))
    check_off_policy(session)
    session.student_shape = ModelShape.of(full_model)
    session.teacher_shape = ModelShape.of(teacher_model) if teacher_model is not None else None
    check_prompts(session)

    if run_dir is None:  # rank 0 alone writes the run directory; the others learn its path
        session.run_dir = Path(distributed.broadcast(str(runs.new_run_dir(config)) if state.main else None, state))
    else:
        restore(session, checkpoint)
    service = None
    if rollout_sampler is not None:
        from opd.samplers.service import RolloutService
        from opd.samplers.sync import make_sync

        directory = Path(config.sampler_sync_dir) if config.sampler_sync_dir else session.run_dir / "sampler"
        if config.sampler == "vllm":
            from opd.samplers.colocated import ColocatedSync

            sync = ColocatedSync(rollout_sampler)
        else:
            sync = make_sync(config.sync_kind, rollout_sampler, directory, f"opd-{session.run_dir.name}")
        service = RolloutService(rollout_sampler, sync)
    session.source = rollout_source(session, service, pairs, chunks)
    return session


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
    draw = Draw(config.samples_per_prompt, config.max_new_tokens, config.temperature, config.top_p, config.seed)
    prompts = StepPrompts(session.task, config.prompts_per_step, config.train_prompts, config.seed, session.dist,
                          config.lmbda if config.method == "opd" else 1.0)
    view = session.teacher_view

    def teacher(seed_offset: int) -> InProcess:  # the teacher in its own template when its view reads one
        own = view is not None and view.path == "own"
        return InProcess(session.teacher_model, session.prompter, draw, session.vocab_size, device, rank, seed_offset,
                         view.teacher_prompt if own else None)

    if service is not None:
        on = Served(service, prompts, session.prompter, draw, rewards, session.full_model, session.vocab_size,
                    config.tis_cap, config.steps, bool(config.async_rollouts), device)
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
