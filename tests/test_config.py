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
    pass-through trainer settings) is also the default, so a section left out behaves as shipped. The project's
    own task names (eval, baselines.tasks, the scorers in train.grpo.rewards) have no default: a params.yaml
    without baselines runs none, and GRPO asks for its rewards."""
    import yaml

    from tunegate.config import flatten, parse_config

    raw = yaml.safe_load((root / "params.yaml").read_text())
    shipped = flatten(parse_config(raw))
    own = {"data": raw["data"], "eval": raw["eval"], "baselines": {"tasks": raw["baselines"]["tasks"]}}
    own["train"] = {"grpo": raw["train"]["grpo"]}
    defaults = flatten(parse_config(own))
    differ = {
        k: (v, defaults.get(k)) for k, v in shipped.items() if not k.startswith("train.args.") and defaults.get(k) != v
    }
    assert not differ


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"seed: 1\ndata: {sources: [unclosed\n", "not valid YAML ("),
        (b"seed: 1\n# caf\xe9\n", "not UTF-8 (byte"),
        (b"- a list\n", "expected a mapping of sections"),
    ],
)
def test_unreadable_params_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_params_path_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot be read (Is a directory)"


def test_settings_come_from_the_argument_then_tunegate_params_then_the_working_folder(tmp_path, monkeypatch, raw):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder, seed in ((here, 1), (elsewhere, 2)):
        folder.mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump({**raw, "seed": seed}))
    monkeypatch.chdir(here)
    monkeypatch.delenv("TUNEGATE_PARAMS", raising=False)
    assert load_config().seed == 1
    monkeypatch.setenv("TUNEGATE_PARAMS", str(elsewhere / "params.yaml"))
    assert load_config().seed == 2
    assert load_config(here / "params.yaml").seed == 1


def test_a_params_file_with_several_mistakes_names_the_file_the_first_key_and_counts_the_rest(tmp_path, raw):
    path = tmp_path / "params.yaml"
    first = "seed: Input should be a valid integer, unable to parse string as an integer"
    for lora_r, more in [("y", " (+1 more)"), (16, "")]:
        bad = copy.deepcopy(raw)
        bad["seed"], bad["train"]["lora"]["r"] = "x", lora_r
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(UserError) as err:
            load_config(path)
        assert str(err.value) == f"{path}: {first}{more}"
    with pytest.raises(UserError) as err:
        parse_config(["a list"], "p.yaml")
    assert str(err.value) == "p.yaml: (top level): Input should be a valid dictionary or instance of Config"


def test_a_yaml_error_in_params_is_yamls_words_on_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ndata: {sources: [unclosed\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f'{path}: not valid YAML (while parsing a flow sequence in "<unicode string>", ')

    def unreadable(self, *args, **kwargs):
        raise OSError  # an OSError without strerror: the message names its type instead

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: cannot be read (OSError)"


def test_flatten_uses_the_params_yaml_names_and_keeps_empty_sections(root):
    flat = flatten(load_config(root / "params.yaml"))
    assert flat["register.tracking_uri"] == "sqlite:///mlflow.db" and not any(k.startswith("register_") for k in flat)
    assert flat["train.dpo_args"] == "{}" and flat["train.lora.r"] == 16
