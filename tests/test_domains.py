"""Bad values stopped at the door: every config field's declared domain, fed NaN, both infinities and a negative
value through the CLI's own ``main``; each ends in ``opd: error:`` naming the field, or is accepted (validated and
planned) only where the field's declaration says that value means something."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import tiny_train_overrides
from opd.cli import main
from opd.config import TrainConfig, load_config
from opd.domains import COUNT, SHARE, Choice, Number, argtype
from opd.errors import OpdError

NUMERIC = [f for f in fields(TrainConfig) if f.type in ("int", "float")]
BAD = ("nan", "inf", "-inf", "-1")


def test_every_field_declares_its_help_and_every_number_its_domain():
    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        if f.name in [n.name for n in NUMERIC]:
            assert isinstance(f.metadata.get("domain"), Number), f"{f.name} declares no domain"


def test_a_number_domain_reads_its_interval():
    assert Number(0, low_open=True).check(0.0) == "must be a finite number > 0"
    assert Number(0, low_open=True).check(1e-9) is None
    assert SHARE.check(1.0) is None and SHARE.check(1.0000001) == "must be a finite number in [0, 1]"
    assert Number(0, 1, high_open=True).check(1.0) and Number(0, 1, low_open=True).check(0.0)
    assert COUNT.check(0) == "must be an integer >= 1" and COUNT.check(1) is None
    for bad in (math.nan, math.inf, -math.inf):
        assert Number().check(bad) == "must be a finite number"
    assert Number(0, inf_ok=True).check(math.inf) is None and Number(0, inf_ok=True).check(-math.inf)
    assert Number(0, inf_ok=True).check(math.nan)
    assert Number(integer=True).check(1.5) and Number().check("1") and Number().check(True)
    assert Choice(("a", "b")).check("c") == "must be one of a, b"


def plan_argv(model_dirs, tmp_path, name: str, value: str) -> list[str]:
    overrides = [o for o in tiny_train_overrides(model_dirs, tmp_path / "run") if not o.startswith(f"{name}=")]
    return ["plan", "--no-probe", "--json", "--nproc", "1", *overrides, f"{name}={value}"]


@pytest.mark.parametrize("name", [f.name for f in NUMERIC])
def test_every_numeric_field_refuses_nan_infinities_and_negatives_or_declares_them(name, model_dirs, tmp_path,
                                                                                  capsys):
    domain = next(f for f in NUMERIC if f.name == name).metadata["domain"]
    kind = next(f for f in NUMERIC if f.name == name).type
    for value in BAD:
        if kind == "int" and value != "-1":
            code = main(plan_argv(model_dirs, tmp_path, name, value))  # not an integer: the parser says so
            assert code == 2 and f"config field {name}='{value}' must be an integer" in capsys.readouterr().err
            continue
        code = main(plan_argv(model_dirs, tmp_path, name, value))
        captured = capsys.readouterr()
        if domain.check(float(value) if kind == "float" else int(value)) is None:  # declared meaningful
            assert code == 0, (name, value, captured.err)
            assert json.loads(captured.out)["student"]  # validated and planned
        else:
            assert code == 2, (name, value, captured.err)
            assert captured.err.startswith(f"opd: error: config field {name}=") and "must be" in captured.err
            assert "\n" == captured.err[-1] and captured.err.count("\n") == 1  # one line
        assert not (tmp_path / "run").exists()  # nothing written


def test_grad_clip_inf_is_no_clipping_and_accepted():
    assert load_config(None, ["grad_clip=inf"]).grad_clip == math.inf


@pytest.mark.parametrize("text, message", [("lr = nan\n", r"config field lr=nan must be a finite number > 0"),
                                           ("temperature = inf\n", r"temperature=inf must be a finite number > 0"),
                                           ("beta1 = 1.5\n", r"beta1=1.5 must be a finite number in \[0, 1\)"),
                                           ("gamma = -inf\n", r"gamma=-inf must be a finite number in \[0, 1\]")])
def test_a_toml_files_literal_nan_and_inf_go_through_the_same_checks(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(OpdError, match=message):
        load_config(str(path))


def test_a_resumed_runs_config_json_goes_through_the_same_checks(model_dirs, tmp_path, capsys):
    from opd.trainer import train

    out = tmp_path / "run"
    train(load_config(None, tiny_train_overrides(model_dirs, out, steps=2)), progress=False)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "lr": math.nan}))  # json writes NaN
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["train", "--quiet", "--resume", str(out), "steps=4"]) == 2
    assert "opd: error: config field lr=nan must be a finite number > 0" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    import opd

    with pytest.raises(OpdError, match="config field lr=nan"):
        opd.train(resume=out, steps=4, progress=False)


def test_the_python_api_checks_the_same_domains():
    import opd

    with pytest.raises(OpdError, match=r"config field warmup_steps=-1 must be an integer >= 0"):
        opd.train(warmup_steps=-1, progress=False)
    with pytest.raises(OpdError, match=r"config field lora_alpha=nan must be a finite number > 0"):
        opd.train(lora_alpha=math.nan, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["train", "temperature=nan"], "opd: error: config field temperature=nan must be a finite number > 0"),
    (["train", "weight_decay=-1"], "opd: error: config field weight_decay=-1.0 must be a finite number >= 0"),
    (["sample", "embedded:student", "--prompt", "Compute 1+2", "--temperature", "nan"],
     "argument --temperature: nan must be a finite number >= 0"),
    (["sample", "embedded:student", "--prompt", "Compute 1+2", "-n", "-2"], "argument -n: -2 must be an integer >= 1"),
])
def test_a_real_process_refuses_with_exit_2_and_one_line(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "opd", *argv], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_argtype_names_what_is_allowed():
    import argparse

    parse = argtype(Number(0, 1, low_open=True))
    assert parse("0.5") == 0.5
    for bad in ("nan", "0", "2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_a_run_that_cannot_fit_is_refused_before_loading_the_models(model_dirs, tmp_path, monkeypatch):
    import opd.plan
    from opd.trainer import train

    loaded = []
    monkeypatch.setattr("opd.setup.load_model", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    out = tmp_path / "run"
    with pytest.raises(OpdError, match=r"this run needs about .* by opd plan's estimate from the models' configs, "
                       r"more than the host's (available )?RAM .*it (fits with|does not fit).*check_memory=false"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, lora_rank=10**7)), progress=False)
    with pytest.raises(OpdError, match=r"this run needs about"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, eval_samples=10**7)), progress=False)
    assert not loaded and not out.exists()
    monkeypatch.undo()
    # a device of 64 KiB: the tiny run needs more; check_memory=false runs it anyway
    monkeypatch.setattr(opd.plan, "available_memory", lambda device: (2.0**16, "a 64 KiB device's memory"))
    with pytest.raises(OpdError, match=r"more than a 64 KiB device's memory \(0.1 MiB\): it (fits with|does not)"):
        train(load_config(None, tiny_train_overrides(model_dirs, out, steps=1)), progress=False)
    summary = train(load_config(None, tiny_train_overrides(model_dirs, out, steps=1, check_memory="false")),
                    progress=False)
    assert summary["steps"] == 1
