"""The teacher's grades of a step's rows, conversations included (``grade``, what the trainer calls).

A multi-turn row (``samplers.turns``) is read as it is when the teacher reads the student's tokens (one
tokenizer, one template, the student's prompt): its forward sees the whole conversation before each sampled
token. Otherwise (its own template, another tokenizer, privileged context, behind a server) each assistant
turn becomes a row of its own, ``by_turns``: the conversation before the turn as the teacher renders it (its
context in place of the student's prompt), then the turn's tokens, scored on the view's single-turn path; the
grades go back to the sampled tokens in order. A turn's prefix is re-read once per later turn, so the
teacher's compute grows with the square of the turns there (its FLOPs are counted as read).

``rows`` (``sample_batch``): the rows are graded that many at a time, so that the teacher's forward holds
its activations (and a padded batch's attention mask) for those rows only; the grades are the same.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opd.objective import LOGPROBS, Grading
from opd.rollouts import Rollouts, pack_pairs
from opd.teachers.view import Scored, teacher_conversations


def grade(view, rollouts: Rollouts, request: Grading = LOGPROBS) -> Scored:
    """The teacher's signal for a step's rows (what ``request``, the objective's, asks for): each row graded
    after the conversation it answers; ``request.rows`` at a time when given (every rank grades as many
    parts: a sharded teacher's forwards are collectives)."""
    count, rows, hidden, topk = rollouts.tokens.shape[0], request.rows, request.hidden, request.topk
    if 0 < rows < count:
        whole = replace(request, rows=0)
        return joined([grade(view, rollouts.select(slice(start, start + rows)), whole)
                       for start in range(0, count, rows)])
    conversations, privileged = teacher_conversations(rollouts)
    if rollouts.turns is not None and (privileged or view.several or view.reading(False) != "shared"):
        return by_turns(view, rollouts, conversations, hidden, topk)
    return view.score(rollouts, conversations, hidden=hidden, topk=topk, privileged=privileged)


def by_turns(view, rollouts: Rollouts, conversations: list[list[dict]], hidden: bool, topk: int) -> Scored:
    """Every assistant turn of every row as a (prompt, completion) row of its own: the student's tokens before
    it and the turn (for the student's layout), the teacher's conversation before it (its context, then the
    conversation after the student's prompt) for the teacher's rendering."""
    prompts, completions, messages, owners = [], [], [], []
    tokens = rollouts.tokens.tolist()
    firsts = rollouts.attention_mask.argmax(-1).tolist()  # where each row's left padding ends
    for row, (turns, theirs) in enumerate(zip(rollouts.turns, conversations, strict=True)):
        opening = len(rollouts.messages[row])  # the student's prompt messages
        for start, end, before in turns:
            if end <= start:
                continue
            prompts.append(tokens[row][firsts[row]:start])
            completions.append(tokens[row][start:end])
            messages.append(theirs + before[opening:])
            owners.append(row)
    device = rollouts.tokens.device
    expanded = pack_pairs(prompts, completions, 0).to(device)  # the padding is masked: any id
    expanded.prompt_index = torch.arange(len(prompts), device=device)
    names = rollouts.teacher_names
    if names:
        expanded.teacher_names = [names[row] for row in owners]
    scored = view.score(expanded, messages, hidden=hidden, topk=topk, privileged=True)
    mask, theirs = rollouts.completion_mask > 0, expanded.completion_mask > 0
    logprobs = torch.zeros(rollouts.tokens.shape, dtype=scored.logprobs.dtype, device=device)
    logprobs[mask] = scored.logprobs[theirs]  # both in (row, position) order: the turns are in order
    chunks = None
    if scored.chunks is not None:
        chunks = torch.full(rollouts.tokens.shape, -1, dtype=torch.long, device=device)
        chunks[mask] = scored.chunks[theirs]
    lengths = {}
    for key in ("teacher_prompt_lengths", "teacher_completion_lengths"):  # what the teacher read, per turn
        totals = [0] * rollouts.tokens.shape[0]
        for row, value in zip(owners, getattr(scored, key), strict=True):
            totals[row] += value
        lengths[key] = totals
    return Scored(logprobs, chunks, hidden=scored.hidden, topk=scored.topk, chunk_count=scored.chunk_count,
                  single_token_chunks=scored.single_token_chunks, **lengths)


def joined(parts: list[Scored]) -> Scored:
    """The grades of consecutive row parts as one: rows concatenated, the aligned path's chunks renumbered
    across the batch."""
    def cat(values: list) -> torch.Tensor | None:
        return None if values[0] is None else torch.cat(values)

    chunks, offset = [], 0
    for part in parts:
        if part.chunks is not None:
            chunks.append(torch.where(part.chunks >= 0, part.chunks + offset, part.chunks))
        offset += part.chunk_count
    topk = None if parts[0].topk is None else (cat([p.topk[0] for p in parts]), cat([p.topk[1] for p in parts]))
    lengths = {key: None if getattr(parts[0], key) is None else [n for p in parts for n in getattr(p, key)]
               for key in ("teacher_prompt_lengths", "teacher_completion_lengths")}
    return Scored(cat([p.logprobs for p in parts]), cat(chunks) if chunks else None, cat([p.hidden for p in parts]),
                  topk, chunk_count=offset, single_token_chunks=sum(p.single_token_chunks for p in parts), **lengths)
