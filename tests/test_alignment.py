"""Aligning two tokenizations on byte offsets: hand-made cases, token bytes of both tokenizer kinds, what a
student token means in the teacher's tokens, and the teacher's conditionals built from it."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd.teachers.alignment import (
    Alignment,
    Events,
    align,
    conditional_shares,
    token_bytes,
    with_end_of_turn,
)
from opd.zoo import GEMMA_STYLE, build_tokenizer

CHECK = "é"  # two bytes in UTF-8: c3 a9
TICK = "✓".encode()  # three bytes: e2 9c 93


@pytest.mark.parametrize("student, teacher, want_student, want_teacher", [
    # the same split: every chunk is one token on each side
    ([b"= ", b"4", b"2"], [b"= ", b"4", b"2"], [0, 1, 2], [0, 1, 2]),
    # the teacher merges what the student splits ("42" is one teacher token)
    ([b"= ", b"4", b"2"], [b"= ", b"42"], [0, 1, 1], [0, 1]),
    # the student merges what the teacher splits
    ([b"Answer", b":"], [b"Ans", b"wer", b":"], [0, 1], [0, 0, 1]),
    # splits that cross: no shared boundary inside "abc"
    ([b"ab", b"c", b"d"], [b"a", b"bc", b"d"], [0, 0, 1], [0, 0, 1]),
    # a leading space attached to the word on one side, a token of its own on the other
    ([b" the", b" cat"], [b" ", b"the", b" ", b"cat"], [0, 1], [0, 0, 1, 1]),
    # a multi-byte character split inside on one side only: it stays in one chunk
    ([b"caf", CHECK.encode()[:1], CHECK.encode()[1:]], [b"caf", CHECK.encode()], [0, 1, 1], [0, 1]),
    # both split the tick after the same byte: the boundary is shared even inside the character
    ([TICK[:1], TICK[1:]], [TICK[:1], TICK[1:2], TICK[2:]], [0, 1], [0, 1, 1]),
    # a special token the student has as one id, the teacher as plain text in pieces
    ([b"<|im_start|>", b"x"], [b"<|", b"im", b"_start", b"|>", b"x"], [0, 1], [0, 0, 0, 0, 1]),
    # bytes that are no UTF-8: the teacher read U+FFFD (ef bf bd) in their place
    ([b"a", b"\xff", b"b"], [b"a", "\ufffd".encode(), b"b"], [0, 1, 2], [0, 1, 2]),
    ([b"a", b"\xff\xfe", b"b"], [b"a", "\ufffd".encode(), "\ufffd".encode(), b"b"], [0, 1, 2], [0, 1, 1, 2]),
    # a leading space the teacher's tokenizer drops (SentencePiece's decoders strip one)
    ([b" Hi", b" there"], [b"Hi", b" there"], [0, 1], [0, 1]),
    # a zero-byte token joins the chunk before it
    ([b"a", b"", b"b"], [b"a", b"b"], [0, 0, 1], [0, 1]),
])
def test_hand_made_alignments(student, teacher, want_student, want_teacher):
    alignment = align(student, teacher)
    assert (alignment.student, alignment.teacher) == (want_student, want_teacher)
    assert alignment.count == max(want_student) + 1


def test_empty_text_and_the_end_of_turn_chunk():
    assert align([], []) == Alignment([], [], 0)
    eos = with_end_of_turn(align([b"4", b"2"], [b"42"]))
    assert eos == Alignment([0, 0, 1], [0, 1], 2, [(0, b"4"), (0, b"42")])  # the EOS pair is a chunk of its own
    assert eos.single_token_chunks() == 1


TEXTS = ["= 3*(8+6)\n= 3*14\n= 42\nAnswer: 42", " leading space and  two", f"caf{CHECK} {TICK.decode()} über",
         "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("style", ["qwen", "gemma"])
def test_byte_level_token_bytes_spell_the_text(style):
    kwargs = {"style": GEMMA_STYLE} if style == "gemma" else {}
    tokenizer = build_tokenizer(seed=1, vocab_size=300, operators=2, corpus_lines=200, **kwargs)
    table = token_bytes(tokenizer)
    assert len(table) == len(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode()
    assert table[tokenizer.eos_token_id] == tokenizer.eos_token.encode()


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Llama 2, Gemma): ``\u2581`` for spaces and ``<0xNN>`` byte fallback."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ["\u2581", "H", "i", "t", "h", "e", "r", "\u2581t", "\u2581th", "\u2581the", "\u2581ther",
                  "\u2581there", "\u2581H", "\u2581Hi"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ("\u2581the", "r"), ("\u2581ther", "e"),
              ("\u2581", "H"), ("\u2581H", "i")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_token_bytes_and_their_alignment_with_byte_level_tokens():
    sp = sentencepiece_tokenizer()
    assert "Metaspace" not in json.loads(sp.backend_tokenizer.to_str())["decoder"]  # Replace + ByteFallback
    table = token_bytes(sp)
    ids = sp.encode(f"Hi there {CHECK}", add_special_tokens=False)
    assert sp.convert_ids_to_tokens(ids)[-2:] == ["<0xC3>", "<0xA9>"]  # the accent falls back to its bytes
    assert b"".join(table[i] for i in ids) == f" Hi there {CHECK}".encode()  # the prepended space included
    byte_level = build_tokenizer(seed=1, vocab_size=300, operators=2, corpus_lines=200)
    other = [token_bytes(byte_level)[i] for i in byte_level.encode(f"Hi there {CHECK}", add_special_tokens=False)]
    mine = [table[i] for i in ids]
    alignment = align(mine, other)
    chunks = [(b"".join(p for p, c in zip(mine, alignment.student, strict=True) if c == k),
               b"".join(p for p, c in zip(other, alignment.teacher, strict=True) if c == k))
              for k in range(alignment.count)]
    # the space SentencePiece prepends rides with the first chunk; both split the accent into its bytes
    assert chunks == [(b" Hi", b"Hi"), (b" there", b" there"), (b" ", b" "), (b"\xc3", b"\xc3"), (b"\xa9", b"\xa9")]


def test_reach_names_the_teacher_token_and_the_bytes_reached():
    alignment = align([b"= ", b"4", b"2", b"\n"], [b"= ", b"42", b"\n"])
    assert alignment.reach == [(0, b"= "), (1, b"4"), (1, b"42"), (2, b"\n")]
    # a student token ending inside bytes the teacher read otherwise has no image
    replaced = "\ufffd".encode()
    assert align([b"a", b"\xff", b"\xfe", b"b"], [b"a", replaced, replaced, b"b"]).reach == [
        (0, b"a"), None, (2, replaced), (3, b"b")]


def test_events_keep_what_the_student_token_means():
    #            0     1      2      3     4
    teacher = [b"1", b"12", b"17", b"2", b"<eot>"]
    digits = [b"1", b"2", b"7"]
    with_twelve = digits + [b"12"]
    # the student's "1" says nothing about a next digit: every teacher token that begins with "1"
    assert Events(digits, teacher, set(), {4})(b"1", 0) == [0, 1, 2]
    # a student that has "12" itself means "not 12" by its "1": the teacher's "12" is that token's event
    assert Events(with_twelve, teacher, set(), {4})(b"1", 0) == [0, 2]
    # one vocabulary: the event is the token itself (the direct path)
    assert Events(teacher, teacher, {4}, {4})(b"1", 0) == [0]
    # a student token ending inside a teacher token: the teacher tokens that begin with the bytes reached
    assert Events(digits, teacher, set(), {4})(b"1", 0) == Events(digits, teacher, set(), {4})(b"1", 0)
    assert Events([b"x1"], teacher, set(), {4})(b"1", 0) == [0, 1, 2]  # the prefix, not the student token


def test_conditional_shares_of_one_tokenization_are_the_token_log_probs_exactly():
    generator = torch.Generator().manual_seed(1)
    lp = (-torch.rand(9, generator=generator, dtype=torch.float64) * 5).tolist()
    marks = [(j, lp[j]) for j in range(8)]  # student token k ends at teacher token k; the last is EOS
    assert conditional_shares(lp, marks, closed=True) == lp


@pytest.mark.parametrize("closed", [True, False])
def test_conditional_shares_telescope_to_the_teacher_log_prob_of_the_text(closed):
    generator = torch.Generator().manual_seed(2)
    lp = (-torch.rand(7, generator=generator, dtype=torch.float64) * 5).tolist()
    # student tokens ending: inside teacher token 1, at its end, inside 3 twice, nowhere (no image), at 5's end
    marks = [(1, lp[1] + 0.4), (1, lp[1]), (3, -0.2), (3, -0.9), None, (5, lp[5])]
    shares = conditional_shares(lp, marks, closed)
    assert len(shares) == len(marks) + closed and shares[4] == 0.0
    want = sum(lp) if closed else sum(lp[:5]) + lp[5]  # the whole completion, or the text up to the end
    assert sum(shares) == pytest.approx(want, abs=1e-12)
    assert shares[1] == pytest.approx(-0.4, abs=1e-12) and shares[3] == pytest.approx(-0.7, abs=1e-12)


@pytest.mark.parametrize("student, teacher, want_student, want_teacher", [
    ([b"a"], [], [0], []),  # one side empty (a normalizer dropped the text): one chunk holds it all
    ([b"", b"ab"], [b"", b"ab"], [0, 0], [0, 0]),  # zero-byte tokens at the start share no boundary at 0
])
def test_alignment_edges(student, teacher, want_student, want_teacher):
    alignment = align(student, teacher)
    assert (alignment.student, alignment.teacher, alignment.count) == (want_student, want_teacher, 1)


def test_long_texts_that_differ_still_align_token_by_token():
    """difflib's junk heuristic (on by default past 200 elements) would drop the frequent bytes and with them
    the matching blocks: a long text with one replaced byte must still align everywhere else."""
    student = [b"ab "] * 100 + [b"\xff"] + [b"cd "] * 100
    teacher = [b"ab "] * 100 + ["\ufffd".encode()] + [b"cd "] * 100
    alignment = align(student, teacher)
    assert alignment.student == alignment.teacher == list(range(201))


def test_events_exclude_by_every_byte_of_the_continuation_and_skip_special_tokens():
    #            0     1      2      3      4         5       6
    teacher = [b"1", b"12", b"17", b"2", b"<eot>", b"123", b"1x9"]
    student = [b"1", b"2", b"7", b"12", b"x"]
    events = Events(student, teacher, set(), {4})
    # "12" and "123" go on into the student's own "12"; "17" and "1x9" do not
    assert events(b"1", 0) == [0, 2, 6]
    assert events(b"<", 0) == []  # the teacher's special token is no text the student can write
    assert events(b"17", 2) == [2]  # past a student token's start: the bytes reached, the token's own extensions


def test_a_truncated_row_whose_last_token_has_no_image_takes_the_rest():
    lp = [-1.0, -2.0, -3.0]
    shares = conditional_shares(lp, [(0, -0.5), None], closed=False)
    assert shares == [-0.5, -6.0 + 0.5]
    assert conditional_shares(lp, [(0, -0.5), None], closed=True) == [-0.5, 0.0, -6.0 + 0.5]


def test_token_bytes_of_metaspace_and_of_word_level_tokenizers():
    vocab = {"<unk>": 0, "\u2581Hi": 1, "\u2581there": 2, "\u2581": 3, "H": 4, "i": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    metaspace = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    assert token_bytes(metaspace)[1:3] == [b" Hi", b" there"]
    plain = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "x\u2581y": 3}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="<unk>", eos_token="<unk>")
    # no decoder: each token's decoded text (a "\u2581" stays itself, it is no SentencePiece space here)
    assert token_bytes(words) == [b"<unk>", b"hello", b"world", "x\u2581y".encode()]
