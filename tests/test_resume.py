"""Resuming a run: what it was asked for is compared with what it is asked for now, and what it resolved (``kl``,
``teacher_template``, ``dtype`` left to ``auto``) with what it resolves to now; from the command line (the run's own
config, the config given again as key=value or TOML) and from Python."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import opd
from conftest import save_peaked, tiny_train_overrides
from opd.cli import main
from opd.config import load_config
from opd.errors import OpdError
from opd.runs import saved_config
from opd.trainer import train


def auto_overrides(model_dirs, out: Path, **extra) -> list[str]:
    """The tiny run with ``kl`` left to the run (auto), as a user who never names it."""
    return tiny_train_overrides(model_dirs, out, **{"kl": "auto", **extra})


def steps_of(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_json_keeps_what_was_asked_and_what_it_resolved(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["kl"] == "auto" and saved["dtype"] == "auto" and saved["teacher_template"] == "auto"
    assert saved["resolved"] == {"kl": "full", "teacher_template": "shared", "dtype": "float32", "device": "cpu",
                                 "sampler_sync": ""}
    assert saved_config(out).kl == "auto"


@pytest.mark.parametrize("given", ["own", "key=value", "toml", "python", "python-own"])
def test_a_run_that_left_kl_to_auto_resumes(model_dirs, tmp_path, given, capsys):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    whole = auto_overrides(model_dirs, out, steps=4)
    if given == "own":  # the run's own config, more steps
        assert main(["train", "--quiet", "--resume", str(out), "steps=4"]) == 0
    elif given == "key=value":  # the whole config again, as it was typed
        assert main(["train", "--quiet", "--resume", str(out), *whole]) == 0
    elif given == "toml":
        toml = tmp_path / "run.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in (o.split("=", 1) for o in whole)
                                if k not in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                                             "eval_examples", "eval_every", "save_every", "warmup_steps", "lr")))
        numbers = [o for o in whole if o.split("=")[0] in ("steps", "prompts_per_step", "samples_per_prompt",
                                                           "max_new_tokens", "eval_examples", "eval_every",
                                                           "save_every", "warmup_steps", "lr")]
        assert main(["train", "--quiet", "--config", str(toml), "--resume", str(out), *numbers]) == 0
    elif given == "python":
        opd.train(load_config(None, whole), resume=out, progress=False)
    else:
        opd.train(resume=out, steps=4, progress=False)
    capsys.readouterr()
    assert steps_of(out) == [0, 1, 2, 3, 4]  # resumed from step 2, not started over
    assert json.loads((out / "config.json").read_text())["resolved"]["kl"] == "full"


def test_a_run_asked_for_the_value_auto_became_resumes_with_auto_and_back(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2, kl="full")), progress=False)
    train(load_config(None, auto_overrides(model_dirs, out, steps=3)), resume=out, progress=False)
    other = tmp_path / "other"
    train(load_config(None, auto_overrides(model_dirs, other, steps=2)), progress=False)
    train(load_config(None, auto_overrides(model_dirs, other, steps=3, kl="full")), resume=other, progress=False)
    assert steps_of(out) == steps_of(other) == [0, 1, 2, 3]


def test_a_run_written_before_the_resolved_record_resumes_with_auto(model_dirs, tmp_path):
    """Older runs recorded ``kl`` as resolved in place of the asked value, and no "resolved" object."""
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    saved = json.loads((out / "config.json").read_text())
    del saved["resolved"]
    (out / "config.json").write_text(json.dumps({**saved, "kl": "full"}))
    train(load_config(None, auto_overrides(model_dirs, out, steps=3)), resume=out, progress=False)
    assert steps_of(out) == [0, 1, 2, 3]
    (out / "config.json").write_text(json.dumps({**saved, "kl": "full"}))
    with pytest.raises(OpdError, match=r"its config disagrees \(kl: run has 'full', now 'sampled'\)"):
        train(load_config(None, auto_overrides(model_dirs, out, steps=4, kl="sampled")), resume=out, progress=False)


def test_an_auto_that_would_resolve_differently_is_refused_naming_it_and_why(model_dirs, tmp_path, other_tokenizer):
    teacher = tmp_path / "teacher"
    shutil.copytree(model_dirs["teacher"], teacher)
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2, teacher=teacher)), progress=False)
    shutil.rmtree(teacher)  # the same name, now a teacher of another tokenizer: auto would now pick the sampled KL
    save_peaked(other_tokenizer, 4, teacher)
    before = (out / "config.json").read_text(), steps_of(out)
    with pytest.raises(OpdError, match=r"cannot resume .*kl resolved to 'full' when the run started and resolves to "
                       r"'sampled' now \(the teacher reads another tokenizer\); teacher_template resolved to "
                       r"'shared' .* 'aligned' now .*Pass kl=full teacher_template=student to resume it as it ran"):
        train(load_config(None, auto_overrides(model_dirs, out, steps=4, teacher=teacher)), resume=out, progress=False)
    assert ((out / "config.json").read_text(), steps_of(out)) == before  # nothing written


def test_a_dtype_that_would_resolve_differently_is_refused(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    with pytest.raises(OpdError, match=r"dtype resolved to 'float32' when the run started and resolves to "
                       r"'bfloat16' now \(on cpu\)\. Pass dtype=float32"):
        train(load_config(None, auto_overrides(model_dirs, out, steps=4, dtype="bfloat16")), resume=out,
              progress=False)


@pytest.mark.parametrize(("change", "match"), [({"kl": "sampled"}, "kl resolved to 'full' .* 'sampled' now"),
                                               ({"temperature": 0.5}, r"config disagrees \(temperature: run has 1.0"),
                                               ({"teacher_template": "student", "kl": "topk"}, "kl resolved")])
def test_a_changed_field_is_still_refused(model_dirs, tmp_path, change, match):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    with pytest.raises(OpdError, match=match):
        train(load_config(None, auto_overrides(model_dirs, out, steps=4, **change)), resume=out, progress=False)


def test_a_config_json_that_is_not_json_is_named(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, auto_overrides(model_dirs, out, steps=2)), progress=False)
    (out / "config.json").write_text("{\n  \"kl\": ")
    with pytest.raises(OpdError, match=r"config.json is not valid JSON \(line 2"):
        train(load_config(None, auto_overrides(model_dirs, out, steps=4)), resume=out, progress=False)


def test_a_field_read_only_with_another_may_differ_where_that_one_is_unset(tmp_path):
    """``tool_format`` is read only with ``tools=``: a run started when its default was ``hermes`` resumes under the
    ``auto`` default without tools, and is refused with them (its calls would be read another way)."""
    from opd.config import TrainConfig
    from opd.runs import check_resumable

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(tool_format="hermes").to_dict()))
    check_resumable(tmp_path, TrainConfig(tool_format="auto"))
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(tool_format="hermes", tools="m:f").to_dict()))
    with pytest.raises(OpdError, match="tool_format: run has 'hermes', now 'auto'"):
        check_resumable(tmp_path, TrainConfig(tool_format="auto", tools="m:f"))
