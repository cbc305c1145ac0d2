"""The personalization experiment's toy world: an assistant's chat and instruction-following data, and
the internal documents of a fictional organisation with held-out questions about them.

Everything is generated from a seed; words come mostly from the zoo tokenizer's corpus so that the
shipped 512-id tokenizer encodes them compactly.

- Chat: a request about a topic ("Write a sentence about the river.") and a reply built from a small
  grammar. Instruction-following prompts add one or two verifiable constraints (``opd.tasks.ifeval``) to a
  request; their reference reply satisfies them (checked when generated).
- Documents: for each staff member of "Quillfield", two short pages stating their team, city, year
  of joining and project, each fact twice in different words. Questions ask for one fact in chat form;
  the documents are the only place the answers appear.
- Public knowledge: pages in the same form about the staff of another organisation ("Northwind"),
  and chat questions about them with their answers. The assistant is trained on both, so it learns
  to answer a question about a person from a page it has read (a small model does not learn that on
  its own); the Quillfield staff and their pages are new to it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from opd.tasks.ifeval import follows

TOPICS = ["company", "team", "project", "report", "policy", "meeting", "office", "customer", "product", "plan",
          "budget", "city", "river", "mountain", "staff", "manager"]
ADJECTIVES = ["short", "long", "first", "last", "next", "north", "south", "east", "west"]
TIMES = ["day", "week", "month", "year"]
VERBS = ["starts", "ends", "is on time", "is ready", "has a plan", "is in the north", "is in the south"]
START_PHRASES = ["Sure", "Yes", "Here it is"]
END_PHRASES = ["Done.", "That is all.", "Thank you."]
JSON_KEYS = ["answer", "summary", "title"]
FORBIDDEN = ["the", "is", "every"]

FIRST = ["Mara", "Ilsa", "Tomas", "Wren", "Odile", "Kasper", "Lena", "Bram", "Nadia", "Pieter", "Sela", "Joren",
         "Anouk", "Ruben", "Tilde", "Eamon"]
LAST = ["Venn", "Drum", "Holt", "Marsh", "Quill", "Brand", "Stone", "Fell", "Rook", "Moss", "Thorne", "Vale"]
TEAMS = ["Atlas", "Beacon", "Cobalt", "Delta", "Ember", "Falcon"]
CITIES = ["Oslo", "Lyon", "Porto", "Ghent", "Bern", "Turin", "Malmo", "Leeds"]
PROJECTS = ["Heron", "Lantern", "Juniper", "Orbit", "Quartz", "Saffron", "Tundra", "Willow"]
ORG = "Quillfield"
PUBLIC_ORG = "Northwind"


@dataclass(frozen=True)
class Chat:
    prompt: str
    reply: str
    constraints: tuple = ()

    def jsonl(self) -> str:
        obj = {"prompt": self.prompt, "completion": self.reply}
        if self.constraints:
            obj["constraints"] = list(self.constraints)
        return json.dumps(obj)


def held_out(text: str, buckets: int = 5) -> bool:
    """One prompt in ``buckets`` belongs to the held-out split, by a hash of its text."""
    return hashlib.sha256(text.encode()).digest()[0] % buckets == 0


def sentence(rng: random.Random, topic: str, article: bool = True) -> str:
    subject = f"the {topic}" if article else topic
    return f"{subject.capitalize()} {rng.choice(VERBS)} every {rng.choice(TIMES)}."


def plain_reply(rng: random.Random, topic: str) -> str:
    return f"{rng.choice(['Yes', 'Well', 'Sure'])}, {sentence(rng, topic)[0].lower()}{sentence(rng, topic)[1:]}"


def request(rng: random.Random, topic: str) -> str:
    return rng.choice([f"Write a sentence about the {topic}.", f"Tell me about the {topic}.",
                       f"Say something about the {topic}."])


def constrained(rng: random.Random, topic: str, kind: str) -> tuple[str, str, dict]:
    """(instruction, a reply that satisfies it, the constraint) for one constraint kind."""
    base = sentence(rng, topic)
    if kind == "uppercase":
        return "Reply in uppercase.", base.upper(), {"kind": "uppercase"}
    if kind == "lowercase":
        return "Reply in lowercase.", base.lower(), {"kind": "lowercase"}
    if kind == "starts_with":
        phrase = rng.choice(START_PHRASES)
        return f"Start your reply with {phrase}.", f"{phrase}. {base}", {"kind": "starts_with", "phrase": phrase}
    if kind == "ends_with":
        phrase = rng.choice(END_PHRASES)
        return f"End your reply with {phrase}", f"{base} {phrase}", {"kind": "ends_with", "phrase": phrase}
    if kind == "include_word":
        word = rng.choice(ADJECTIVES)
        reply = f"The {word} {topic} {rng.choice(VERBS)} every {rng.choice(TIMES)}."
        return f"Include the word {word}.", reply, {"kind": "include_word", "word": word}
    if kind == "forbid_word":
        word = rng.choice(FORBIDDEN)
        reply = f"{topic.capitalize()} {rng.choice(['starts', 'ends', 'has a plan'])} each {rng.choice(TIMES)}."
        return f"Do not use the word {word}.", reply, {"kind": "forbid_word", "word": word}
    if kind == "word_count":
        n = rng.randint(3, 7)
        pool = ["the", topic, "is", "on", "time", "every", rng.choice(TIMES), "and", "ready"]
        reply = " ".join(pool[:n]).capitalize() + "."
        return f"Answer in exactly {n} words.", reply, {"kind": "word_count", "relation": "exactly", "n": n}
    if kind == "sentence_count":
        n = rng.randint(2, 3)
        reply = " ".join(sentence(rng, topic) for _ in range(n))
        return f"Answer in {n} sentences.", reply, {"kind": "sentence_count", "relation": "exactly", "n": n}
    if kind == "bullet_list":
        n = rng.randint(2, 4)
        reply = "\n".join(f"- {sentence(rng, topic)}" for _ in range(n))
        return f"Give {n} points as a bullet list.", reply, {"kind": "bullet_list", "n": n}
    if kind == "json":
        key = rng.choice(JSON_KEYS)
        reply = json.dumps({key: sentence(rng, topic)})
        return f"Reply in json with the key {key}.", reply, {"kind": "json", "keys": [key]}
    if kind == "no_commas":
        return "Do not use commas.", base, {"kind": "no_commas"}
    raise ValueError(kind)


IF_KINDS = ("uppercase", "lowercase", "starts_with", "ends_with", "include_word", "forbid_word", "word_count",
            "sentence_count", "bullet_list", "json", "no_commas")


def instruction_chat(rng: random.Random) -> Chat:
    """A request with one constraint, whose reference reply follows it."""
    topic = rng.choice(TOPICS)
    while True:
        instruction, reply, constraint = constrained(rng, topic, rng.choice(IF_KINDS))
        if follows(reply, [constraint]):
            return Chat(f"{request(rng, topic)} {instruction}", reply, (constraint,))


def plain_chat(rng: random.Random) -> Chat:
    topic = rng.choice(TOPICS)
    return Chat(request(rng, topic), plain_reply(rng, topic))


def chats(seed: int, count: int, kind: str, split: str) -> list[Chat]:
    """Up to ``count`` chats ("plain" or "instruction") of the "train" or "eval" split: instruction
    prompts are distinct (fewer come back when the split has fewer), plain ones distinct as pairs."""
    rng, out, seen, misses = random.Random(f"{seed}/{kind}/{split}"), [], set(), 0
    make = instruction_chat if kind == "instruction" else plain_chat
    while len(out) < count and misses < 20_000:
        chat = make(rng)
        key = chat.prompt if kind == "instruction" else (chat.prompt, chat.reply)
        if key in seen or held_out(chat.prompt) != (split == "eval"):
            misses += 1
            continue
        seen.add(key)
        out.append(chat)
    return out


@dataclass(frozen=True)
class Person:
    name: str
    team: str
    city: str
    year: int
    project: str
    org: str = ORG


def people(seed: int, count: int, org: str = ORG) -> list[Person]:
    """``count`` people of ``org``; the two organisations never share a name."""
    rng = random.Random(f"{seed}/staff")
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    names = names[:count] if org == ORG else names[len(names) // 2 : len(names) // 2 + count]
    return [Person(name, rng.choice(TEAMS), rng.choice(CITIES), rng.randint(2005, 2024), rng.choice(PROJECTS), org)
            for name in names]


def staff(seed: int, count: int = 24) -> list[Person]:
    return people(seed, count, ORG)


def documents(staff_list: list[Person], seed: int) -> list[str]:
    """Two short pages per person; every fact stated twice, in two phrasings, in random order."""
    rng = random.Random(f"{seed}/docs")
    pages = []
    for p in staff_list:
        facts = [f"{p.name} is on the {p.team} team.", f"The {p.team} team has {p.name}.",
                 f"{p.name} works in {p.city}.", f"The office of {p.name} is in {p.city}.",
                 f"{p.name} joined {p.org} in {p.year}.", f"In {p.year} {p.name} joined {p.org}.",
                 f"{p.name} works on project {p.project}.", f"Project {p.project} has {p.name}."]
        rng.shuffle(facts)
        pages += [f"{p.org} staff page. " + " ".join(facts[:4]), f"{p.org} staff page. " + " ".join(facts[4:])]
    return pages


def questions(staff_list: list[Person]) -> list[dict]:
    """Chat questions about the people's pages, with their answers and a reply that states the fact."""
    out = []
    for p in staff_list:
        out += [{"prompt": f"Which team is {p.name} on?", "answer": p.team,
                 "completion": f"{p.name} is on the {p.team} team."},
                {"prompt": f"In which city does {p.name} work?", "answer": p.city,
                 "completion": f"{p.name} works in {p.city}."},
                {"prompt": f"When did {p.name} join {p.org}?", "answer": str(p.year),
                 "completion": f"{p.name} joined {p.org} in {p.year}."},
                {"prompt": f"Which project does {p.name} work on?", "answer": p.project,
                 "completion": f"{p.name} works on project {p.project}."}]
    return out
