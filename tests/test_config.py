import copy

import pytest
import yaml

from tunegate.config import flatten, load_config, parse_config
from tunegate.errors import UserError


@pytest.fixture
def raw(root):
    return yaml.safe_load((root / "params.yaml").read_text())


def test_committed_params_load(root):
    cfg = load_config(root / "params.yaml")
    assert cfg.base.is_demo
    assert cfg.mix.general_ratio == 0.2
    assert cfg.validate_.max_invalid_share > 0


@pytest.mark.parametrize(
    "path, value, key",
    [
        (("train", "lora", "r"), 0, "train.lora.r"),
        (("train", "adapter"), "qlora4", "train.adapter"),
        (("mix", "general_ratio"), 1.5, "mix.general_ratio"),
        (("dedup", "bands"), 7, "dedup"),
        (("train", "lora", "rank"), 8, "train.lora.rank"),
        (("validate", "pii"), "shout", "validate.pii"),
    ],
)
def test_bad_key_or_value_names_the_key(raw, path, value, key):
    bad = copy.deepcopy(raw)
    node = bad
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(UserError) as err:
        parse_config(bad, "params.yaml")
    assert f"params.yaml: {key}" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_section_rejected(raw):
    with pytest.raises(UserError, match="trian"):
        parse_config({**raw, "trian": {}})


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_nested():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": "x", "e": "[1, 2]"}


def test_config_defaults_are_the_shipped_params(root):
    """params.yaml and the typed defaults cannot drift apart: every value params.yaml sets (other than the
    pass-through trainer settings) is also the default, so a section left out behaves as shipped."""
    import yaml

    from tunegate.config import flatten, parse_config

    raw = yaml.safe_load((root / "params.yaml").read_text())
    shipped = flatten(parse_config(raw))
    defaults = flatten(parse_config({"data": raw["data"], "eval": raw["eval"]}))
    differ = {
        k: (v, defaults.get(k)) for k, v in shipped.items() if not k.startswith("train.args.") and defaults.get(k) != v
    }
    assert not differ
