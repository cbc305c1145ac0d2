"""``Rollouts`` at its own interface: every field says what it is indexed by, and selection, column
trimming and joining carry every field (a new one cannot be forgotten by any of them)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from opd.micro_batches import trimmed
from opd.rollouts import BATCH, ROW, TOKEN, OffPolicyRows, Rollouts, Turn, concat_rollouts, pack_pairs

ROWS, WIDTH = 4, 7


def full(offset: int = 0) -> Rollouts:
    """A batch with every field set to values that tell rows (and columns) apart: two columns of left
    padding, prompts of 2 tokens, completions of 1 to 3."""
    prompts = [[10 + offset + r, 20 + r] for r in range(ROWS)]
    completions = [[30 + r] * (1 + r % 3) for r in range(ROWS)]
    packed = pack_pairs(prompts, completions, pad_id=0)
    pad = torch.zeros(ROWS, 2, dtype=torch.long)
    rows = Rollouts(torch.cat([pad, packed.tokens], 1), torch.cat([pad, packed.attention_mask], 1),
                    torch.cat([pad.float(), packed.completion_mask], 1), torch.tensor([0, 0, 1, 1]))
    shape = rows.tokens.shape
    values = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape) + offset
    for f in fields(Rollouts):
        if getattr(rows, f.name) is not None:
            continue
        if f.metadata["per"] == TOKEN:
            setattr(rows, f.name, values + len(f.name))
        elif f.name in ("rewards",):
            setattr(rows, f.name, torch.arange(ROWS, dtype=torch.float32) + offset)
        elif f.name == "on_policy":
            rows.on_policy = torch.tensor([True, False, True, False])
        elif f.name == "turns":
            rows.turns = [[Turn(4, 5, [{"role": "user", "content": f"{offset}/{r}"}])] for r in range(ROWS)]
        elif f.metadata["per"] == ROW:
            setattr(rows, f.name, [f"{f.name}{offset}/{r}" for r in range(ROWS)])
        elif f.name == "offpolicy":
            rows.offpolicy = OffPolicyRows(1 + offset, True)
        else:
            setattr(rows, f.name, {"batch": f.name, "offset": offset})
    return rows


def test_every_field_says_what_it_is_indexed_by():
    kinds = {f.name: f.metadata.get("per") for f in fields(Rollouts)}
    assert set(kinds.values()) == {TOKEN, ROW, BATCH}, kinds
    assert all(getattr(full(), name) is not None for name in kinds)  # the helper sets every field


@pytest.mark.parametrize("rows", [[2, 0], slice(1, 3), torch.tensor([3, 1]), torch.tensor([False, True, False, True])])
def test_selection_cuts_every_per_row_and_per_token_field(rows):
    batch = full()
    picked = batch.select(rows)
    index = {str([2, 0]): [2, 0], str(slice(1, 3)): [1, 2]}.get(str(rows)) or (
        rows.nonzero()[:, 0].tolist() if rows.dtype == torch.bool else rows.tolist())
    for f in fields(Rollouts):
        value, got = getattr(batch, f.name), getattr(picked, f.name)
        if f.metadata["per"] == BATCH:
            assert got is value, f.name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got, value[index]), f.name
        else:
            assert got == [value[i] for i in index], f.name


def test_column_trimming_moves_every_per_token_field_and_the_turns():
    batch = full()
    cut = trimmed(batch)
    assert cut.tokens.shape[1] == WIDTH - 2 and not (batch.attention_mask[:, :2] > 0).any()
    for f in fields(Rollouts):
        value, got = getattr(batch, f.name), getattr(cut, f.name)
        if f.metadata["per"] == TOKEN:
            assert torch.equal(got, value[:, 2:]), f.name
        elif f.name == "turns":
            assert [[(t.start, t.end) for t in row] for row in got] == [[(2, 3)]] * ROWS
            assert [row[0].before for row in got] == [row[0].before for row in value]
        else:
            assert got is value, f.name
    # a turn's columns still point at the same tokens
    for row in range(ROWS):
        turn, moved = batch.turns[row][0], cut.turns[row][0]
        assert torch.equal(batch.tokens[row, turn.start:turn.end], cut.tokens[row, moved.start:moved.end])


def test_joining_two_batches_keeps_every_field():
    first, second = full(), trimmed(full(offset=100).select(slice(0, 2)))  # a narrower part, shifted right
    shift = 2  # first's prompts end at column 4, second's at 2
    merged = concat_rollouts(first, second, pad_id=99)
    assert merged.tokens.shape == (ROWS + 2, WIDTH)
    for f in fields(Rollouts):
        a, b, got = getattr(first, f.name), getattr(second, f.name), getattr(merged, f.name)
        if f.metadata["per"] == BATCH:
            assert got is a, f.name
        elif f.name == "prompt_index":
            assert got.tolist() == [0, 0, 1, 1, 2, 2]
        elif f.name == "turns":
            assert got[:ROWS] == a and [row[0].start for row in got[ROWS:]] == [b[0][0].start + shift] * 2
        elif f.metadata["per"] == TOKEN:
            fill = {"tokens": 99, "is_weights": 1.0}.get(f.name, 0)
            assert torch.equal(got[:ROWS], a), f.name
            assert torch.equal(got[ROWS:, shift : shift + b.shape[1]], b), f.name
            outside = torch.cat([got[ROWS:, :shift], got[ROWS:, shift + b.shape[1]:]], 1)
            assert outside.numel() and (outside == fill).all(), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(got, torch.cat([a, b])), f.name
        else:
            assert got == list(a) + list(b), f.name


def test_a_per_row_list_that_one_part_lacks_is_dropped_not_misaligned():
    first, second = full(), full(offset=100)
    second.messages = None
    merged = concat_rollouts(first, second, pad_id=0)
    assert merged.messages is None and len(merged.teacher_names) == 2 * ROWS


def test_device_moves_keep_lists_and_figures():
    batch = full()
    moved = batch.to("cpu")
    assert moved.messages is batch.messages and moved.engine is batch.engine and torch.equal(moved.tokens,
                                                                                             batch.tokens)
