"""Two tokenizations of one text, aligned on byte offsets: what a teacher with another tokenizer needs.

The student's completion is a sequence of its token ids; each id stands for a string of bytes
(``token_bytes``). The teacher reads the same text as its own tokens. Between consecutive byte offsets
where *both* tokenizations have a token boundary, a *chunk* holds one or more tokens of each side;
the log-prob of a chunk under a model is the sum of its tokens' log-probs (the chain rule), so chunks
can be compared across vocabularies where single tokens cannot. When the tokenizers agree on a span,
its chunks are single tokens and the comparison is exactly the per-token one.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import re
from dataclasses import dataclass

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
    """Chunk index of every student and every teacher token (0 .. count - 1, non-decreasing)."""

    student: list[int]
    teacher: list[int]
    count: int

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
    return Alignment([min(bisect.bisect_left(student_bounds, e), len(shared) - 1) for e in student_ends],
                     [min(bisect.bisect_left(teacher_bounds, e), len(shared) - 1) for e in teacher_ends],
                     len(shared))


def with_end_of_turn(alignment: Alignment) -> Alignment:
    """The alignment of the text, plus one more chunk pairing the student's EOS with the teacher's."""
    return Alignment(alignment.student + [alignment.count], alignment.teacher + [alignment.count],
                     alignment.count + 1)


def chunk_sums(values: list[float], chunks: list[int], count: int) -> list[float]:
    """``out[c] = sum_{i: chunks[i] = c} values[i]``: a chunk's log-prob from its tokens' (the chain rule)."""
    out = [0.0] * count
    for value, chunk in zip(values, chunks, strict=True):
        out[chunk] += value
    return out
