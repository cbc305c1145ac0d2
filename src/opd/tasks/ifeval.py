"""Instruction following checked by verifiable constraints, in the manner of IFEval (Zhou et al. 2023,
"Instruction-Following Evaluation for Large Language Models"): each prompt carries constraints that a
program can check on the response, and a prompt counts as followed when every constraint holds.

A constraint is a JSON object with a ``kind`` and its parameters:

| kind | parameters | holds when the response ... |
| --- | --- | --- |
| ``word_count`` | ``relation`` (exactly, at_least, at_most), ``n`` | has that many words |
| ``sentence_count`` | ``relation``, ``n`` | has that many sentences (ended by . ! or ?) |
| ``include_word`` | ``word`` | contains the word (case-insensitive, whole word) |
| ``forbid_word`` | ``word`` | does not contain the word |
| ``uppercase`` | — | has letters, none of them lowercase |
| ``lowercase`` | — | has letters, none of them uppercase |
| ``starts_with`` | ``phrase`` | starts with the phrase (case-insensitive, after leading spaces) |
| ``ends_with`` | ``phrase`` | ends with the phrase (case-insensitive, before trailing spaces) |
| ``bullet_list`` | ``n`` | is exactly ``n`` lines, each starting with ``- `` or ``* `` |
| ``json`` | ``keys`` (optional list) | parses as a JSON object holding those keys |
| ``no_commas`` | — | contains no comma |
"""

from __future__ import annotations

import json
import re

from opd.errors import OpdError

WORD_RE = re.compile(r"[A-Za-z0-9']+")
RELATIONS = ("exactly", "at_least", "at_most")
KINDS = {  # kind -> required parameters and their types
    "word_count": {"relation": str, "n": int},
    "sentence_count": {"relation": str, "n": int},
    "include_word": {"word": str},
    "forbid_word": {"word": str},
    "uppercase": {},
    "lowercase": {},
    "starts_with": {"phrase": str},
    "ends_with": {"phrase": str},
    "bullet_list": {"n": int},
    "json": {},
    "no_commas": {},
}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if WORD_RE.search(s)]


def compare(count: int, relation: str, n: int) -> bool:
    return {"exactly": count == n, "at_least": count >= n, "at_most": count <= n}[relation]


def check(response: str, constraint: dict) -> bool:
    """Whether ``response`` satisfies one constraint (see the table in this module's docstring)."""
    kind, text = constraint["kind"], response.strip()
    if kind == "word_count":
        return compare(len(words(text)), constraint["relation"], constraint["n"])
    if kind == "sentence_count":
        return compare(len(sentences(text)), constraint["relation"], constraint["n"])
    if kind in ("include_word", "forbid_word"):
        found = constraint["word"].lower() in (w.lower() for w in words(text))
        return found if kind == "include_word" else not found
    if kind == "uppercase":
        return any(c.isalpha() for c in text) and not any(c.islower() for c in text)
    if kind == "lowercase":
        return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)
    if kind == "starts_with":
        return text.lower().startswith(constraint["phrase"].lower().strip())
    if kind == "ends_with":
        return text.lower().endswith(constraint["phrase"].lower().strip())
    if kind == "bullet_list":
        lines = [line for line in text.splitlines() if line.strip()]
        return len(lines) == constraint["n"] and all(line.lstrip().startswith(("- ", "* ")) for line in lines)
    if kind == "json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and all(key in value for key in constraint.get("keys", []))
    if kind == "no_commas":
        return "," not in text
    raise OpdError(f"unknown constraint kind {kind!r}")


def follows(response: str, constraints: list[dict]) -> bool:
    """Prompt-level: every constraint holds."""
    return all(check(response, c) for c in constraints)


def parse_constraints(value, where: str) -> tuple[dict, ...]:
    """Validate a prompts-file ``constraints`` field; errors name ``where`` (file:line) and the field."""
    if not isinstance(value, list) or not value:
        raise OpdError(f"{where}: field 'constraints' must be a non-empty list of objects")
    out = []
    for i, constraint in enumerate(value):
        field = f"constraints[{i}]"
        if not isinstance(constraint, dict) or constraint.get("kind") not in KINDS:
            raise OpdError(f"{where}: field '{field}' must be an object whose 'kind' is one of {', '.join(KINDS)}")
        for name, kind in KINDS[constraint["kind"]].items():
            if not isinstance(constraint.get(name), kind) or isinstance(constraint.get(name), bool):
                raise OpdError(f"{where}: field '{field}.{name}' must be {'an integer' if kind is int else 'a string'}")
        if "relation" in constraint and constraint["relation"] not in RELATIONS:
            raise OpdError(f"{where}: field '{field}.relation' must be one of {', '.join(RELATIONS)}")
        if constraint["kind"] == "json" and not isinstance(constraint.get("keys", []), list):
            raise OpdError(f"{where}: field '{field}.keys' must be a list of strings")
        out.append(constraint)
    return tuple(out)
