"""Config loading: defaults, experiment files, overrides, errors that name the key."""

import pytest

from pdmer.config import ConfigError, config_hash, from_dict, load_config, to_dict


def test_defaults_and_override():
    cfg = load_config(None, ["train.iterations=7", "model.hidden=32", "meta.first_order=false"])
    assert cfg.train.iterations == 7 and cfg.model.hidden == 32 and cfg.meta.first_order is False


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.iteratons=3", "train.iteratons"),
        ("modle.hidden=3", "modle.hidden"),
        ("train.iterations=many", "train.iterations"),
        ("problem=xyz", "problem"),
        ("model.hidden=30", "model.hidden"),  # not divisible by heads
        ("no_equals_sign", "no_equals_sign"),
    ],
)
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  iterationz: 3\n")
    with pytest.raises(ConfigError, match="iterationz"):
        load_config(str(p))


def test_unknown_experiment():
    with pytest.raises(ConfigError, match="unknown experiment"):
        load_config("no.such.experiment")


def test_hash_ignores_runtime_and_name_but_not_results_relevant_keys():
    a = load_config(None)
    b = load_config(None, ["runtime.device=cpu", "runtime.threads=1", "name=other"])
    c = load_config(None, ["train.seed=1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_paper_size_and_round_trip():
    cfg = load_config(None, ["size=paper", "model.layers=2"])
    assert cfg.model.hidden == 1024 and cfg.model.layers == 2
    assert from_dict(to_dict(cfg)) == cfg


def test_skip_hidden_enters_the_hash_only_where_it_changes_the_model():
    from pdmer.config import _drop_inactive

    linear, mlp = (load_config("pdmer.vgmidi.dsaml", [f"model.skip_hidden={n}"]) for n in (0, 64))  # linear_skip
    assert config_hash(linear) != config_hash(mlp)
    d = to_dict(linear)
    _drop_inactive(d)
    assert "skip_hidden" not in d["model"]  # 0: hashed as before the option existed (earlier runs keep their hash)
    plain = load_config("pdmer.synthetic.dsaml")  # no skip path: the width cannot matter
    assert config_hash(load_config("pdmer.synthetic.dsaml", ["model.skip_hidden=64"])) == config_hash(plain)
