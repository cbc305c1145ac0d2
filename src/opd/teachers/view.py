"""How the teacher reads the student's rollouts, on one of three paths chosen when a run opens:

- ``shared``: one tokenizer and one chat template: the teacher scores the student's token ids as they
  are (the reference setting; ``kl=full`` works).
- ``own``: one tokenizer, but the teacher's chat template differs (a system prompt, thinking tags):
  the teacher reads the prompt in its own rendering, followed by the student's completion ids. The
  completion's tokens are the same ids in both renderings, so the per-token signal (and ``kl=full``)
  stays exact; only the context the teacher conditions on changes, to the one it was trained on.
- ``aligned``: another tokenizer. The completion is decoded to text, read by the teacher in its own
  tokens after its own rendering of the prompt, and the two tokenizations are aligned on byte offsets
  (``alignment.align``). Each student token gets the teacher's log-prob of its text given the text
  before it (``alignment.Events``, ``alignment.conditional_shares``): the token's own log-prob where the
  two tokenizations agree, summing to the teacher's log-prob of the whole completion. ``kl=full`` is
  refused: the two distributions are over different vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from opd.chat_settings import chat_template_of, template_kwargs
from opd.errors import OpdError
from opd.flops import ModelShape
from opd.models import chat_prompt_ids, chat_prompt_text
from opd.rollouts import Rollouts, pack_pairs
from opd.teachers.alignment import Alignment, Events, align, conditional_shares, token_bytes, with_end_of_turn
from opd.teachers.base import Teacher
from opd.templates import reply_stops

TEMPLATES = ("auto", "own", "student")
SERVED_TOP_K = 20  # top log-probs asked of a server per position (vLLM's default --max-logprobs)


def tokenizer_differences(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> list[str]:
    """How two tokenizers' token-to-id maps (and EOS) differ; empty when the teacher can read the student's
    ids as they are (embedding sizes may differ: only the ids matter)."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    lines = []
    if student_vocab == teacher_vocab and student.eos_token_id == teacher.eos_token_id:
        return lines
    only_student = sorted(set(student_vocab) - set(teacher_vocab))
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
    moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])
    if only_student:
        lines.append(f"{len(only_student)} tokens only in the student, e.g. {only_student[:5]}")
    if only_teacher:
        lines.append(f"{len(only_teacher)} tokens only in the teacher, e.g. {only_teacher[:5]}")
    if moved:
        t = moved[0]
        lines.append(f"{len(moved)} tokens with different ids, e.g. {t!r}: student {student_vocab[t]}, "
                     f"teacher {teacher_vocab[t]}")
    if student.eos_token_id != teacher.eos_token_id:
        lines.append(f"EOS differs: student {student.eos_token!r}, teacher {teacher.eos_token!r}")
    return lines


def choose_path(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, template: str) -> str:
    """``aligned`` for another tokenizer; else ``own`` when the teacher's template differs from the
    student's and ``template`` is not ``student``; else ``shared``."""
    if template not in TEMPLATES:
        raise OpdError(f"teacher_template={template!r} must be one of {', '.join(TEMPLATES)}")
    if tokenizer_differences(student, teacher):
        return "aligned"
    differs = (chat_template_of(student) != chat_template_of(teacher)
               or template_kwargs(student) != template_kwargs(teacher))  # chat_template_kwargs
    if template != "student" and differs:
        return "own"
    return "shared"


def teacher_conversations(rollouts: Rollouts) -> tuple[list[list[dict]], bool]:
    """What the teacher reads for each row (``rollouts.teacher_messages``, else the student's messages), and
    whether any row's differs from the student's (privileged context)."""
    student = rollouts.messages
    teacher = rollouts.teacher_messages if rollouts.teacher_messages is not None else student
    return teacher, any(t is not s and t != s for t, s in zip(teacher, student, strict=True))


@dataclass
class Scored:
    """The teacher's signal in the student's layout (B, T). ``logprobs``: the teacher's log-prob of each
    completion token; on the ``aligned`` path, of each student token's text given the text before it
    (``alignment.conditional_shares``: the token's own log-prob where the tokenizations agree, and a row's
    sum is the teacher's log-prob of the whole completion). ``chunks`` (``aligned``
    only): the chunk of each completion token, numbered across the batch, -1 elsewhere. ``hidden``: the
    teacher's final hidden states at the completion positions, in ``scoring.completion_hidden``'s order
    (``kl=full``)."""

    logprobs: torch.Tensor
    chunks: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, k) ids and log-probs at the completion positions
    teacher_prompt_lengths: list[int] | None = None  # the tokens the teacher read, for its FLOPs
    teacher_completion_lengths: list[int] | None = None
    chunk_count: int = 0
    single_token_chunks: int = 0


class TeacherView:
    """The teacher (a ``base.Teacher``) reading rollouts the way it was trained to."""

    def __init__(self, teacher: Teacher, student_tokenizer: PreTrainedTokenizerBase,
                 teacher_tokenizer: PreTrainedTokenizerBase | None = None, template: str = "auto",
                 path: str | None = None) -> None:
        """``path`` forces one (``aligned`` works for any pair, e.g. to check it against ``shared``);
        by default ``choose_path`` picks it."""
        self.teacher = teacher
        self._shape: ModelShape | None = None
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer or student_tokenizer
        self.template = template
        self.path = path or choose_path(student_tokenizer, self.teacher_tokenizer, template)
        if self.path == "aligned":
            # a reply's end: any of the student's stop tokens, read as the teacher's own reply end
            self.student_stops = set(reply_stops(student_tokenizer))
            self.teacher_end = reply_stops(self.teacher_tokenizer)[-1]
            self.student_bytes = token_bytes(student_tokenizer)
            self.teacher_bytes = token_bytes(self.teacher_tokenizer)
            self.events = Events(self.student_bytes, self.teacher_bytes, set(student_tokenizer.added_tokens_decoder),
                                 set(self.teacher_tokenizer.added_tokens_decoder))

    several = False  # one teacher (RoutedTeacherView: several, each row to its own)

    def close(self) -> None:
        self.teacher.close()

    @property
    def head(self) -> torch.nn.Module:
        return self.teacher.head

    @property
    def model(self) -> torch.nn.Module | None:
        """The teacher's model when it runs in this process (it evaluates and samples); None behind a server."""
        return self.teacher.local_model

    @property
    def sharded(self) -> bool:
        """Its layers are sharded across the ranks (every rank runs each of its forwards)."""
        return self.teacher.sharded

    def charge(self, shape: ModelShape) -> None:
        """A teacher with no architecture (a program) has its FLOPs counted as a model of ``shape``."""
        self._shape = shape

    @property
    def shape(self) -> ModelShape | None:
        """Its architecture, for its FLOPs; None behind a server (unknown there)."""
        if self._shape is None and self.model is not None:
            self._shape = ModelShape.of(self.model)
        return self._shape

    def teacher_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt as the teacher reads it: its own template's rendering, or (``template=student`` on
        the aligned path) the student's rendering as text, in the teacher's tokens."""
        if self.path != "aligned" or self.template != "student":
            return chat_prompt_ids(self.teacher_tokenizer, messages)
        text, special = chat_prompt_text(self.student_tokenizer, messages)
        return self.teacher_tokenizer.encode(text, add_special_tokens=special)

    def translate(self, completion: list[int]) -> tuple[list[int], Alignment]:
        """A student completion (ids, its stop token last when it was sampled: ``templates.reply_stops``) as the
        teacher's ids, aligned; the stop token becomes the one the teacher's template ends a reply with."""
        ended = bool(completion) and completion[-1] in self.student_stops
        pieces = [self.student_bytes[i] for i in (completion[:-1] if ended else completion)]
        text = b"".join(pieces).decode("utf-8", errors="replace")
        ids = self.teacher_tokenizer.encode(text, add_special_tokens=False)
        alignment = align(pieces, [self.teacher_bytes[i] for i in ids])
        if ended:
            return ids + [self.teacher_end], with_end_of_turn(alignment)
        return ids, alignment

    def describe(self, texts: list[str]) -> str:
        """One line for the start of a run: the path, and on ``aligned`` how often the tokenizers agree on
        ``texts`` (their share of single-token chunks)."""
        if self.path == "shared":
            return "teacher reads the student's tokens (one tokenizer, one chat template)"
        if self.path == "own":
            return ("teacher's chat template differs: it reads the prompt in its own template, then the student's "
                    "completion ids (teacher_template=student keeps the student's rendering)")
        single = chunks = 0
        for text in texts:
            ids = self.student_tokenizer.encode(text, add_special_tokens=False)
            alignment = self.translate(ids)[1]
            single, chunks = single + alignment.single_token_chunks(), chunks + alignment.count
        return (f"teacher tokenizer differs: aligning on text, {100 * single / max(chunks, 1):.0f}% of chunks "
                f"are single tokens on the prompts' text ({self.path} path; per step in metrics.jsonl)")

    def reading(self, privileged: bool) -> str:
        """The path for one batch: a teacher that reads other messages than the student's (privileged context)
        cannot read the student's tokens as they are; it reads its prompt rendered, then the completions."""
        return "own" if privileged and self.path == "shared" else self.path

    def score(self, rollouts: Rollouts, messages: list[list[dict]], hidden: bool = False, topk: int = 0,
              privileged: bool = False) -> Scored:
        """The teacher's signal for ``rollouts``, whose row ``b`` answers the conversation ``messages[b]`` (the
        teacher's: ``teacher_conversations``; ``privileged`` when they are not all the student's prompts);
        with ``topk``, also its ``topk`` most likely tokens at every completion position."""
        path = self.reading(privileged)
        if (hidden or topk) and self.path == "aligned":
            raise OpdError("kl=full and kl=topk need the teacher's distribution over the student's vocabulary; this "
                           "teacher's tokenizer differs: use kl=sampled")
        if topk:
            return self.score_topk(rollouts, messages, topk, hidden, privileged)
        if path == "shared":
            if hidden:
                logprobs, states = self.teacher.score_with_hidden(rollouts)
                return Scored(logprobs, hidden=states)
            return Scored(self.teacher.score(rollouts))
        if len(messages) != rollouts.tokens.shape[0]:
            raise ValueError(f"{len(messages)} conversations for {rollouts.tokens.shape[0]} rows")
        rendered: dict[int, list[int]] = {}  # the samples of one prompt share its messages object
        for m in messages:
            if id(m) not in rendered:
                rendered[id(m)] = self.teacher_prompt(m)
        prompts = [rendered[id(m)] for m in messages]
        completions = rollouts.completion_ids()
        if path == "own":
            translated = [(ids, None) for ids in completions]
        else:
            translated = [self.translate(ids) for ids in completions]
        pad = self.teacher_tokenizer.pad_token_id
        theirs = pack_pairs(prompts, [ids for ids, _ in translated], pad)
        theirs.prompt_index = rollouts.prompt_index.cpu()  # rows of one prompt share its forward pass
        theirs = theirs.to(rollouts.tokens.device)
        in_process = self.teacher.in_process  # its full distribution is here
        if hidden or (path == "aligned" and in_process):
            logprobs, states = self.teacher.score_with_hidden(theirs)
        else:
            logprobs, states = self.teacher.score(theirs), None
        values = logprobs[theirs.completion_mask > 0]  # row by row, in completion order
        lengths = dict(teacher_prompt_lengths=[len(p) for p in prompts],
                       teacher_completion_lengths=[len(ids) for ids, _ in translated])
        mask = rollouts.completion_mask > 0
        out = torch.zeros(rollouts.tokens.shape, dtype=values.dtype, device=rollouts.tokens.device)
        if path == "own":
            out[mask] = values
            return Scored(out, hidden=states, **lengths)
        alignments = [alignment for _, alignment in translated]
        per_row, start = [], 0
        for ids, _ in translated:
            per_row.append(values[start : start + len(ids)].tolist())
            start += len(ids)
        wanted = self.wanted_events(completions, translated)
        if in_process:
            covers = self.cover_logprobs(wanted, [len(ids) for ids, _ in translated], states)
        else:
            covers = self.served_covers(wanted, [p + ids for p, (ids, _) in zip(prompts, translated, strict=True)],
                                        [len(p) for p in prompts])
        chunks = torch.full(rollouts.tokens.shape, -1, dtype=torch.long, device=out.device)
        first = single = 0
        for row, alignment in enumerate(alignments):
            marks: list[tuple[int, float] | None] = []
            for k, reach in enumerate(alignment.reach):
                if reach is None:
                    marks.append(None)
                elif wanted[row][k] is None:  # the event is the teacher token itself
                    marks.append((reach[0], per_row[row][reach[0]]))
                else:  # an event of several tokens: its mass in the distribution at j (none: no image)
                    marks.append((reach[0], covers[(row, k)]) if (row, k) in covers else None)
            closed = len(alignment.student) > len(alignment.reach)  # the EOS pair closes the row
            columns = mask[row].nonzero()[:, 0]
            shares = conditional_shares(per_row[row], marks, closed)
            out[row, columns] = torch.tensor(shares, dtype=out.dtype, device=out.device)
            chunks[row, columns] = torch.tensor(alignment.student, dtype=torch.long, device=out.device) + first
            first += alignment.count
            single += alignment.single_token_chunks()
        return Scored(out, chunks, chunk_count=first, single_token_chunks=single, **lengths)

    def score_topk(self, rollouts: Rollouts, messages: list[list[dict]], k: int, hidden: bool,
                   privileged: bool = False) -> Scored:
        """``score`` with the teacher's top-k at every completion position: from its full distribution in
        process, or through a server's ``prompt_logprobs=k`` (the same tokens and template paths)."""
        theirs, lengths = rollouts, {}
        if self.reading(privileged) == "own":
            prompts = [self.teacher_prompt(m) for m in messages]
            lengths = dict(teacher_prompt_lengths=[len(p) for p in prompts],
                           teacher_completion_lengths=[len(c) for c in rollouts.completion_ids()])
            theirs = pack_pairs(prompts, rollouts.completion_ids(), self.teacher_tokenizer.pad_token_id)
            theirs.prompt_index = rollouts.prompt_index.cpu()
            theirs = theirs.to(rollouts.tokens.device)
        if self.teacher.in_process:
            logprobs, states = self.teacher.score_with_hidden(theirs)
            top = self.teacher.topk(states, k)
        else:
            logprobs, *top = self.teacher.score_topk(theirs, k)
            states = None
        if theirs is not rollouts:  # the teacher's rows back in the student's columns
            out = torch.zeros(rollouts.tokens.shape, dtype=logprobs.dtype, device=rollouts.tokens.device)
            out[rollouts.completion_mask > 0] = logprobs[theirs.completion_mask > 0]
            logprobs = out
        return Scored(logprobs, hidden=states if hidden else None, topk=tuple(top), **lengths)

    def wanted_events(self, completions: list[list[int]],
                      translated: list[tuple[list[int], Alignment]]) -> list[list[tuple[int, list[int]] | None]]:
        """Per row and student token: ``(j, ids)``, the teacher position its text reaches and the teacher
        token ids of its event (``Events``), when the event is more than the teacher token read at ``j``;
        else None (that token's own log-prob is the answer)."""
        out = []
        for completion, (ids, alignment) in zip(completions, translated, strict=True):
            row = []
            for k, reach in enumerate(alignment.reach):
                event = None if reach is None else self.events(reach[1], completion[k])
                row.append(None if event is None or event == [ids[reach[0]]] else (reach[0], event))
            out.append(row)
        return out

    def served_covers(self, wanted: list[list[tuple[int, list[int]] | None]], sequences: list[list[int]],
                      prompt_lengths: list[int]) -> dict[tuple[int, int], float]:
        """``cover_logprobs`` for a teacher behind a server, from the top ``SERVED_TOP_K`` log-probs it sends
        at each position (vLLM's ``prompt_logprobs``; the token read is always among them): the event's
        mass among those, a lower bound of its whole mass (the rest of the vocabulary is unseen)."""
        needed = [row for row, events in enumerate(wanted) if any(e is not None for e in events)]
        tops = dict(zip(needed, self.teacher.top_logprobs([sequences[r] for r in needed], SERVED_TOP_K),
                        strict=True))
        out = {}
        for row in needed:
            for k, want in enumerate(wanted[row]):
                if want is None:
                    continue
                j, event = want
                entry = tops[row][prompt_lengths[row] + j - 1]  # entries start at the sequence's second token
                members = set(event)
                mass = [lp for token, lp in entry.items() if token in members]
                if mass:
                    out[(row, k)] = float(torch.logsumexp(torch.tensor(mass, dtype=torch.float64), 0))
        return out

    def cover_logprobs(self, wanted: list[list[tuple[int, list[int]] | None]], teacher_lengths: list[int],
                       hidden: torch.Tensor) -> dict[tuple[int, int], float]:
        """``{(row, k): log sum_{v in event} p_teacher(v)}`` at the teacher position each wanted event is
        read at, from the teacher's full distribution there (``hidden``: ``completion_hidden``'s rows)."""
        rows, sets, keys = [], [], []
        offset = 0
        for row, events in enumerate(wanted):
            for k, want in enumerate(events):
                if want is not None and want[1]:
                    rows.append(offset + want[0])
                    sets.append(want[1])
                    keys.append((row, k))
            offset += teacher_lengths[row]
        if not rows:
            return {}
        values = self.teacher.cover_logprobs(hidden[torch.tensor(rows, device=hidden.device)], sets)
        return dict(zip(keys, values, strict=True))
