"""The run's teacher, built once at setup: its tokenizer, how it reads the student's rollouts (``view``'s
paths), loaded in process (sharded with ``teacher_parallel=fsdp``) or connected behind a server, and with
``teachers=`` several teachers routed by each prompt's name."""

from __future__ import annotations

import os

import torch

from opd import distributed
from opd.chat_settings import with_template_kwargs
from opd.config import TrainConfig
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer, resolve_model_path
from opd.teachers.local import LocalTeacher
from opd.teachers.programmatic import ProgrammaticTeacher, load_program
from opd.teachers.remote import RemoteTeacher
from opd.teachers.routed import DEFAULT, RoutedTeacherView, parse_teachers
from opd.teachers.view import TeacherView, choose_path, tokenizer_differences


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


def build_teacher(config: TrainConfig, tokenizer, teacher_tokenizer, teacher_path: str | None, path_kind: str,
                  device: torch.device, dtype: torch.dtype, dist: distributed.Dist, context: int,
                  opened: list, task=None) -> TeacherView:
    """``teacher=``: connected (a server: its name, context and tokenizer checked), a program (given the
    student's tokenizer and the run's ``task``), or loaded in process; a connection goes into ``opened``
    before it is checked, so that a refusal closes it."""
    if config.program_teacher:
        program = load_program(config.teacher, teacher_tokenizer, task)
        teacher = ProgrammaticTeacher(program, len(teacher_tokenizer), config.teacher, device)
    elif config.remote_teacher:
        teacher = RemoteTeacher(config.teacher, config.teacher_model or None,
                                api_key=os.environ.get("OPD_TEACHER_API_KEY"))
        opened.append(teacher)
        teacher.connect(teacher_tokenizer, context, "teacher_tokenizer" if config.teacher_tokenizer else "student")
    else:
        sharded = config.teacher_parallel == "fsdp" and dist.active
        model = load_model(teacher_path, torch.device("cpu") if sharded else device, dtype)
        if sharded:  # shard on the CPU, then only this rank's layer shards go to the device (or stay: offload)
            distributed.shard_teacher(model, dist, device, "teacher" in config.offloaded())
        teacher = LocalTeacher(model, len(teacher_tokenizer), sharded)
    return TeacherView(teacher, tokenizer, teacher_tokenizer, config.teacher_template, path_kind)


def route_teachers(default: TeacherView, config: TrainConfig, tokenizer, student_path: str, device: torch.device,
                   dtype: torch.dtype, context: int, opened: list) -> RoutedTeacherView:
    """``teachers=``: every named teacher loaded (or connected), each read through its own ``TeacherView``;
    the routed view sends each row to the teacher its prompt names (``teacher=`` for the rest)."""
    views = {DEFAULT: default}
    for name, spec in parse_teachers(config.teachers).items():
        if spec.startswith(("http://", "https://")):
            teacher = RemoteTeacher(spec, None, api_key=os.environ.get("OPD_TEACHER_API_KEY"))
            opened.append(teacher)
            teacher.connect(tokenizer, context)
            views[name] = TeacherView(teacher, tokenizer)
            continue
        path = resolve_model_path(spec, f"teachers={name}")
        their_tokenizer = with_template_kwargs(load_tokenizer(path),
                                               config.template_kwargs("teacher_chat_template_kwargs"))
        kind = check_teacher_path(config, tokenizer, their_tokenizer, student_path, path)
        model = load_model(path, device, dtype)
        views[name] = TeacherView(LocalTeacher(model, len(their_tokenizer)), tokenizer, their_tokenizer,
                                  config.teacher_template, kind)
    return RoutedTeacherView(views)
