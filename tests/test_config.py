import pytest

from opd.config import TrainConfig, load_config
from opd.errors import OpdError


def test_defaults_then_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 2e-4\nsteps = 7\nkl = "full"\ntruncate_prompts = true\n')
    config = load_config(str(path), ["steps=9", "temperature=0.7"])
    assert (config.lr, config.steps, config.kl, config.temperature) == (2e-4, 9, "full", 0.7)
    assert config.truncate_prompts is True
    assert config.prompts_per_step == TrainConfig().prompts_per_step


@pytest.mark.parametrize("overrides, message", [
    (["nope=1"], "unknown config field 'nope'"),
    (["steps=many"], "command line: config field steps='many' must be an integer"),
    (["kl=exact"], "kl='exact' must be one of auto, sampled, full, topk"),
    (["lr=0"], r"config field lr=0.0 must be a finite number > 0"),
    (["steps"], "must look like key=value"),
    (["grad_accum=3"], "grad_accum=3 must divide"),
    (["truncate_prompts=maybe"], "must be true or false"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(OpdError, match=message):
        load_config(None, overrides)


def test_bad_toml_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = \n")
    with pytest.raises(OpdError, match="bad.toml is not valid TOML"):
        load_config(str(path))
    path.write_text('steps = "ten"\n')
    with pytest.raises(OpdError, match="bad.toml: config field steps='ten' must be an integer"):
        load_config(str(path))
