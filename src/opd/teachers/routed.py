"""Several teachers in one run: each prompt names its teacher (a prompts line's ``"teacher": "math"``), and
``teachers=math=DIR_OR_URL,chat=DIR_OR_URL`` maps the names to models in process or servers; prompts that
name none go to ``teacher=``. A step's batch mixes prompts of several teachers: each teacher scores its
own rows, and the signals are put back in the batch's order (the Tinker cookbook's teacher per dataset,
ms-swift's teachers by tag, verl's ``teacher_key`` column)."""

from __future__ import annotations

import torch

from opd.errors import OpdError
from opd.flops import StepKind, step_flops
from opd.rollouts import Rollouts
from opd.teachers.view import Scored, TeacherView

DEFAULT = ""  # the name of ``teacher=``, for prompts that name no teacher


def parse_teachers(spec: str) -> dict[str, str]:
    """``name=DIR_OR_URL,name=DIR_OR_URL`` -> {name: spec}; names are unique and non-empty."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, sep, where = item.partition("=")
        name, where = name.strip(), where.strip()
        if not sep or not name or not where:
            raise OpdError(f"teachers={spec!r}: {item!r} must look like NAME=DIR_OR_URL")
        if name in out:
            raise OpdError(f"teachers={spec!r}: the name {name!r} is given twice")
        out[name] = where
    return out


class RoutedTeacherView:
    """The ``TeacherView`` interface over several views, routing each row to the view its prompt names
    (``rollouts.teacher_names``, one name per row)."""

    path = "routed"

    def __init__(self, views: dict[str, TeacherView]) -> None:
        self.views = views

    several = True

    def close(self) -> None:
        for view in self.views.values():
            view.close()

    @property
    def default(self) -> TeacherView:
        """``teacher=``'s view: the one that evaluates in its own tokens and writes samples."""
        return self.views[DEFAULT]

    @property
    def model(self) -> torch.nn.Module | None:
        return self.default.model

    @property
    def sharded(self) -> bool:
        return self.default.sharded

    @property
    def shape(self):
        return self.default.shape

    @property
    def teacher_tokenizer(self):
        return self.default.teacher_tokenizer

    def view(self, name: str | None) -> TeacherView:
        key = name or DEFAULT
        if key not in self.views:
            known = ", ".join(sorted(n for n in self.views if n)) or "none"
            raise OpdError(f"a prompt names the teacher {key!r}, which teachers= does not define (it has: {known})")
        return self.views[key]

    @property
    def head(self) -> torch.nn.Module:
        raise OpdError("kl=full with several teachers: each row has another teacher's head; use kl=topk "
                       "(exact when teacher_topk covers the vocabulary) or kl=sampled")

    def describe(self, texts: list[str]) -> str:
        names = ", ".join(f"{name or 'default'}: {view.describe(texts)}" for name, view in self.views.items())
        return f"{len(self.views)} teachers ({names})"

    def score(self, rollouts: Rollouts, messages: list[list[dict]], hidden: bool = False, topk: int = 0,
              privileged: bool = False) -> Scored:
        if hidden:
            self.head  # noqa: B018 - raises the explanation
        names = rollouts.teacher_names or [DEFAULT] * rollouts.tokens.shape[0]
        out = torch.zeros(rollouts.tokens.shape, dtype=torch.float32, device=rollouts.tokens.device)
        counts = (rollouts.completion_mask[:, 1:] > 0).sum(-1).tolist()  # completion positions per row
        per_row_ids: list = [None] * len(names)
        per_row_lps: list = [None] * len(names)
        lengths: dict[str, list] = {"teacher_prompt_lengths": [0] * len(names),
                                    "teacher_completion_lengths": [0] * len(names)}
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            index = torch.tensor(rows, device=rollouts.tokens.device)
            part = rollouts.select(index)
            scored = self.view(name).score(part, [messages[i] for i in rows], topk=topk, privileged=privileged)
            out[index] = scored.logprobs.to(out.dtype)
            if topk:
                start = 0
                for row in rows:
                    per_row_ids[row] = scored.topk[0][start : start + counts[row]]
                    per_row_lps[row] = scored.topk[1][start : start + counts[row]]
                    start += counts[row]
            for key in lengths:
                given = getattr(scored, key)
                for j, row in enumerate(rows):
                    lengths[key][row] = given[j] if given is not None else (
                        counts[row] if key == "teacher_completion_lengths"
                        else int(rollouts.attention_mask[row].sum()) - counts[row])
        top = (torch.cat(per_row_ids), torch.cat(per_row_lps)) if topk else None
        return Scored(out, topk=top, **lengths)


def per_teacher_kl(rollouts: Rollouts, on_policy: torch.Tensor) -> dict:
    """This rank's sampled-KL sums and token counts per teacher name (on-policy rows)."""
    if rollouts.sampler_logprobs is None or rollouts.teacher_logprobs is None:  # no student samples (lmbda=0)
        return {}
    gap = ((rollouts.sampler_logprobs - rollouts.teacher_logprobs) * rollouts.completion_mask).sum(-1).tolist()
    tokens = rollouts.completion_mask.sum(-1).tolist()
    out: dict[str, list[float]] = {}
    for name, on, row_gap, row_tokens in zip(rollouts.teacher_names, on_policy.tolist(), gap, tokens, strict=True):
        if on:
            total = out.setdefault(name, [0.0, 0.0])
            total[0] += row_gap
            total[1] += row_tokens
    return out


def routed_step_flops(view: RoutedTeacherView, student_shape, samples_per_prompt: int, ranks: list[dict],
                      merged: dict) -> dict:
    """teachers=: from every rank's ``per_teacher_kl`` and the step's lengths, ``teacher_kl/NAME`` and
    ``teacher_flops/NAME`` (scoring its rows), and the total teacher FLOPs (None when a teacher is behind a
    server: its architecture is unknown)."""
    names = [n for r in ranks for n in r["names"]]
    out: dict = {}
    total = 0.0
    for name in sorted(set(names)):
        sums = [r["teachers"].get(name, [0.0, 0.0]) for r in ranks]
        tokens = sum(s[1] for s in sums)
        label = name or "default"
        out[f"teacher_kl/{label}"] = sum(s[0] for s in sums) / tokens if tokens else None
        rows = [i for i, n in enumerate(names) if n == name]
        shape = view.view(name).shape
        flops = None if shape is None else step_flops(
            student_shape, shape, [merged["prompt_lengths"][i] for i in rows],
            [merged["completion_lengths"][i] for i in rows], StepKind.DISTIL, samples_per_prompt,
            trained_tokens=sum(merged["trained_lengths"][i] for i in rows))["teacher_flops"]
        out[f"teacher_flops/{label}"] = flops
        total = None if flops is None or total is None else total + flops
    out["teacher_flops"] = total
    return out
