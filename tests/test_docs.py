"""The docs say what the code does: every ``key=value`` shown in a code block of the README or the docs is one
the config loader accepts, and ``opd train --help`` prints every field's whole help (no wrapped comment cut)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from opd.cli import config_help
from opd.config import TrainConfig, apply_values
from opd.domains import check
from opd.errors import OpdError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # reference/: generated from the code
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PLACEHOLDER = re.compile(r"[A-Z]{2,}|<|\$|\.\.\.|\{|\[|^N$|^K$")  # DIR, PATH, <x>, $VAR, ...: not a value


def documented_settings() -> list[tuple[str, str, str]]:
    """(page, key, value) for every key=value of a TrainConfig field in a fenced code block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            if "opd " not in block or re.search(r"opd (zoo|serve|export|sample|chat|eval)\b", block):
                continue  # only the commands whose key=value are config fields
            for key, value in re.findall(r"(?<![\w-])([a-z_0-9]+)=(\S+)", block):
                if key in FIELDS and not PLACEHOLDER.search(value):
                    found.append((page.relative_to(ROOT).as_posix(), key, value.strip("'\"`,\\")))
    return found


def test_the_docs_show_settings_at_all():
    assert len(documented_settings()) > 50


@pytest.mark.parametrize("page, key, value", documented_settings())
def test_every_documented_setting_is_accepted(page, key, value):
    config = TrainConfig()
    try:
        apply_values(config, {key: value}, page)
    except OpdError as err:
        pytest.fail(f"{page}: {key}={value} is refused: {err}")
    problem = check(FIELDS[key].metadata.get("domain"), key, getattr(config, key))
    assert problem is None, f"{page}: {problem}"


def test_train_help_prints_every_fields_whole_help():
    text = config_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] in text, f.name
    assert "each copied to the device for its forward" in text  # offload's, cut when it was a wrapped comment


def test_the_committed_references_are_what_the_code_generates(monkeypatch):
    """docs/reference/config.md and cli.md are generated (``make docs``) and committed, so that they read on
    GitHub too: a field or an option changed without regenerating them fails here."""
    import sys

    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the help to the terminal's width
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    sys.modules.pop("gen_docs", None)
    import gen_docs

    reference = ROOT / "docs" / "reference"
    assert (reference / "config.md").read_text() == gen_docs.config_reference(), "run make docs"
    assert (reference / "cli.md").read_text() == gen_docs.cli_reference(), "run make docs"
