"""Two tokenizations of one text, aligned on byte offsets: what a teacher with another tokenizer needs.

The student's completion is a sequence of its token ids; each id stands for a string of bytes
(``token_bytes``). The teacher reads the same text as its own tokens. Between consecutive byte offsets
where *both* tokenizations have a token boundary, a *chunk* holds one or more tokens of each side
(when the tokenizers agree on a span, its chunks are single tokens). Each student token is then read in
the teacher's tokens as an *event* (``Events``: what the token means, not where the teacher's token
ends), and the teacher's log-probs of the events become its conditionals (``conditional_shares``),
which sum over a completion to the teacher's log-prob of the whole text.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import re
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The kinds of the fast tokenizer's decoder steps (``ByteLevel``, ``Metaspace``, ``ByteFallback``...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {step.get("type", "") for step in steps}


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token id stands for, ``len(tokenizer)`` entries. Byte-level BPE (GPT-2, Llama 3,
    Qwen): a token's characters map back to bytes one to one, so a token may hold part of a UTF-8
    character. SentencePiece (Llama 2, Gemma, Mistral): ``\u2581`` is a space and ``<0xNN>`` one byte.
    Special and added tokens stand for their text. Other tokenizers: each token's decoded text."""
    kinds = _decoder_types(tokenizer)
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    if "ByteLevel" in kinds:
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes:
            if all(c in to_byte for c in piece):
                return bytes(to_byte[c] for c in piece)
            return piece.encode()
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:

        def piece_bytes(piece: str) -> bytes:
            fallback = BYTE_FALLBACK.fullmatch(piece)
            if fallback and "ByteFallback" in kinds:
                return bytes([int(fallback.group(1), 16)])
            return piece.replace("\u2581", " ").encode()
    else:
        return [added[i].encode() if i in added else tokenizer.decode([i]).encode() for i in ids]
    return [added[i].encode() if i in added else piece_bytes(piece or "") for i, piece in zip(ids, pieces,
                                                                                                strict=True)]


@dataclass
class Alignment:
    """Chunk index of every student and every teacher token (0 .. count - 1, non-decreasing), and where
    each student token's text ends in the teacher's tokens: ``reach[k] = (j, prefix)`` when it ends
    inside or at the end of teacher token ``j`` (of the completion), ``prefix`` being the bytes of token
    ``j``'s span that the text has reached there (all of them at its end); None where the text has no
    image in the teacher's (bytes the teacher read otherwise, e.g. invalid UTF-8) or nothing is reached."""

    student: list[int]
    teacher: list[int]
    count: int
    reach: list[tuple[int, bytes] | None] = field(default_factory=list)

    def single_token_chunks(self) -> int:
        """Chunks made of exactly one student token and one teacher token."""
        sizes = [[0, 0] for _ in range(self.count)]
        for side, chunks in enumerate((self.student, self.teacher)):
            for chunk in chunks:
                sizes[chunk][side] += 1
        return sum(size == [1, 1] for size in sizes)


def ends(pieces: list[bytes]) -> list[int]:
    """Byte offset where each token ends."""
    return list(itertools.accumulate(len(p) for p in pieces))


def offset_map(student: bytes, teacher: bytes) -> dict[int, int] | None:
    """Student byte offset -> teacher byte offset where the two texts match; None when they are equal
    (the map is then the identity). Unequal texts (bytes that are no valid UTF-8 become U+FFFD when the
    student's bytes are decoded for the teacher; a tokenizer's normalizer may rewrite text) are matched
    with ``difflib``'s longest common blocks; offsets inside a changed span have no image."""
    if student == teacher:
        return None
    mapping: dict[int, int] = {}
    for i, j, n in difflib.SequenceMatcher(None, student, teacher, autojunk=False).get_matching_blocks():
        for k in range(n + 1):
            mapping.setdefault(i + k, j + k)
    return mapping


def align(student_pieces: list[bytes], teacher_pieces: list[bytes]) -> Alignment:
    """Chunks between consecutive shared token boundaries of two tokenizations of one text.

    A boundary is shared when a student token and a teacher token both end at the same place in the
    text (byte offsets, through ``offset_map`` when the byte strings differ); the end of the text is
    always one. A token belongs to the chunk whose closing boundary is the first at or after its end,
    so every chunk holds at least one token of each side (unless a side is empty), a multi-byte
    character split across tokens stays inside one chunk unless both sides split it at the same byte,
    and a zero-byte token joins the chunk before it. A non-canonical tokenization (the student sampled
    ``"a" "b"`` where its tokenizer would write ``"ab"``) is just another split of the same bytes."""
    student_ends, teacher_ends = ends(student_pieces), ends(teacher_pieces)
    student_text, teacher_text = b"".join(student_pieces), b"".join(teacher_pieces)
    mapping = offset_map(student_text, teacher_text)
    teacher_set = set(teacher_ends)
    shared: list[tuple[int, int]] = []
    for end in sorted(set(student_ends)):
        image = end if mapping is None else mapping.get(end)
        if end > 0 and image is not None and image in teacher_set:
            shared.append((end, image))
    final = (len(student_text), len(teacher_text))
    if (student_pieces or teacher_pieces) and (not shared or shared[-1] != final):
        shared = [b for b in shared if b[0] < final[0] and b[1] < final[1]] + [final]
    student_bounds = [s for s, _ in shared]
    teacher_bounds = [t for _, t in shared]
    reach: list[tuple[int, bytes] | None] = []
    for end in student_ends:
        image = end if mapping is None else mapping.get(end)
        j = bisect.bisect_left(teacher_ends, image) if image else len(teacher_ends)  # the token ending at or after
        start = teacher_ends[j - 1] if j else 0
        reach.append((j, teacher_text[start:image]) if j < len(teacher_ends) else None)
    return Alignment([min(bisect.bisect_left(student_bounds, e), len(shared) - 1) for e in student_ends],
                     [min(bisect.bisect_left(teacher_bounds, e), len(shared) - 1) for e in teacher_ends],
                     len(shared), reach)


def with_end_of_turn(alignment: Alignment) -> Alignment:
    """The alignment of the text, plus one more chunk pairing the student's EOS with the teacher's."""
    return Alignment(alignment.student + [alignment.count], alignment.teacher + [alignment.count],
                     alignment.count + 1, alignment.reach)


class PrefixIndex:
    """The ids of the ordinary (not special or added) tokens whose bytes begin with a given prefix: a
    contiguous range of the tokens sorted by their bytes, found by bisection and kept once asked."""

    def __init__(self, table: list[bytes], skip: set[int]) -> None:
        pairs = sorted((data, i) for i, data in enumerate(table) if i not in skip and data)
        self.keys = [data for data, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.cache: dict[bytes, list[int]] = {}

    def __call__(self, prefix: bytes) -> list[int]:
        if prefix not in self.cache:
            lo = bisect.bisect_left(self.keys, prefix)
            hi = lo
            while hi < len(self.keys) and self.keys[hi].startswith(prefix):
                hi += 1
            self.cache[prefix] = self.ids[lo:hi]
        return self.cache[prefix]


class Events:
    """The teacher tokens that, read at one teacher position, mean what a student token means: "the text
    goes on with exactly my bytes, and no longer student token's".

    A token commits to where it ends: the student's ``"1"`` (its digits are single tokens) says nothing
    about the next digit, while the teacher's token ``"1"`` (in a vocabulary with ``"12"``) says the
    number ends. Scoring the student's ``"1"`` with the teacher's token ``"1"`` would charge the
    student's first digit for a second digit it never chose: measured, that drives a student away from
    every number of two digits. So the student's token ``x``, ending where the teacher's text has
    reached ``prefix`` of the token at position ``j``, is scored with the teacher's probability at ``j``
    of any token that begins with ``prefix`` (the prefix cover of Phan et al. 2024, "Exact Byte-Level
    Probabilities from Tokenized Language Models", one token deep), less the tokens whose further
    bytes would continue into a longer student token that extends ``x`` (those are that token's event,
    not ``x``'s). With one tokenizer this leaves exactly the token itself: the direct path."""

    def __init__(self, student_table: list[bytes], teacher_table: list[bytes], student_skip: set[int],
                 teacher_skip: set[int]) -> None:
        self.student_table, self.teacher_table = student_table, teacher_table
        self.student_cover = PrefixIndex(student_table, student_skip)
        self.teacher_cover = PrefixIndex(teacher_table, teacher_skip)
        self.cache: dict[tuple[bytes, int], list[int]] = {}

    def __call__(self, prefix: bytes, student_token: int) -> list[int]:
        key = (prefix, student_token)
        if key not in self.cache:
            own = self.student_table[student_token]
            longer = {self.student_table[y][len(own):] for y in self.student_cover(own)
                      if len(self.student_table[y]) > len(own)}
            started = {d[:i] for d in longer for i in range(1, len(d) + 1)}
            keep = []
            for token in self.teacher_cover(prefix):
                rest = self.teacher_table[token][len(prefix):]
                if rest and (rest in started or any(rest[:i] in longer for i in range(1, len(rest)))):
                    continue  # its bytes go on into a longer student token's
                keep.append(token)
            self.cache[key] = keep
        return self.cache[key]


def conditional_shares(teacher_logprobs: list[float], marks: list[tuple[int, float] | None],
                       closed: bool) -> list[float]:
    """The teacher's log-prob of each student token's text given the text before it, from the teacher's
    log-probs of its own completion tokens and, per student token, ``marks[k] = (j, c)``: its text ends in
    teacher token ``j``, and ``c`` is the teacher's log-prob at ``j`` of the token's event (``Events``).
    The teacher's log-prob of the text up to there is ``C_k = sum_{i < j} lp_i + c``, and token ``k`` gets
    ``C_k - C_{k-1}``, computed as ``(sum_{j_{k-1} <= i < j} lp_i - c_{k-1}) + c`` (exact, not rounded,
    when a token and its teacher token agree). A token without a mark gets 0 and passes its share on.
    ``closed`` (the student's EOS, read as the teacher's, is the last token): EOS gets the rest, so the
    shares sum to the teacher's log-prob of its whole completion; else the last marked token's ``C`` is
    the sum: the teacher's probability that its text begins so (a truncated completion)."""
    shares, j_before, c_before = [], 0, 0.0
    for k, mark in enumerate(marks):
        if mark is None:
            if closed or k + 1 < len(marks):
                shares.append(0.0)
                continue
            mark = (len(teacher_logprobs), 0.0)  # a truncated row's last token without an image: the rest
        j, c = mark
        shares.append((sum(teacher_logprobs[j_before:j]) - c_before) + c)
        j_before, c_before = j, c
    if closed:
        shares.append(sum(teacher_logprobs[j_before:]) - c_before)
    return shares
