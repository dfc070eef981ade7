"""Base model resolution: offline hub ids, pickle-only folders and tokenizer-less folders fail in one line."""

import json

import pytest

from tunegate.errors import UserError
from tunegate.models import describe, snapshot


def test_hub_model_offline_names_the_setting():
    with pytest.raises(UserError) as err:
        snapshot("some-org/some-model-that-is-not-cached", "main")
    msg = str(err.value)
    assert msg.startswith("base.model 'some-org/some-model-that-is-not-cached'") and "\n" not in msg


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle-based weights are not loaded"):
        describe(tmp_path, str(tmp_path), "main", "local")


def test_local_folder_is_fingerprinted(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    path, rev = snapshot(str(tmp_path), "main")
    m = describe(path, str(tmp_path), "main", rev)
    assert len(rev) == 40 and set(m["weights_sha256"]) == {"model.safetensors"} and m["chat_template_sha256"]


def test_the_fingerprinted_template_is_the_one_the_tokenizer_loads(tmp_path):
    """A folder with a chat_template.jinja beside an older template in tokenizer_config.json: transformers loads the
    .jinja file, so that is the template the provenance names."""
    from demo.model import train_tokenizer
    from tunegate.io import sha256_of
    from tunegate.models import load_tokenizer

    tok = train_tokenizer(["hello there", "general kenobi"] * 50, 300)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"w")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'old' }}"}))
    (tmp_path / "chat_template.jinja").write_text("{{ 'new' }}")
    path, rev = snapshot(str(tmp_path), "main")
    assert load_tokenizer({"path": str(tmp_path)}).chat_template == "{{ 'new' }}"
    assert describe(path, str(tmp_path), "main", rev)["chat_template_sha256"] == sha256_of("{{ 'new' }}")


def test_tokenizer_without_chat_template_gets_the_documented_default(tmp_path):
    from demo.model import train_tokenizer
    from tunegate.models import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    tok = train_tokenizer(["hello there", "general kenobi"] * 50, 300)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer({"path": str(tmp_path)})
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = [{"role": "user", "content": "Hi"}]
    full = loaded.apply_chat_template(prompt + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    head = loaded.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert full.startswith(head) and full == f"user: Hi\nassistant: Hello.{loaded.eos_token}\n"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A real (tiny) model folder as save_pretrained writes it."""
    from demo.model import build
    from tests.conftest import ROOT
    from tests.test_evaluation import TINY
    from tunegate.io import read_jsonl

    out = tmp_path_factory.mktemp("model")
    build(read_jsonl(ROOT / "data/pretrain/general.jsonl")[:300], TINY, 1, out)
    return out


def _damaged(model_folder, tmp_path, damage):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    damage(folder)
    return folder


def _set_vocab(folder, size):
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": size}))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: (f / "config.json").unlink(), "no config.json in"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda f: (f / "tokenizer.json").write_text("not a tokenizer"), "the tokenizer cannot be loaded"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors is not a readable"),
        (lambda f: _set_vocab(f, 10), "has 400 tokens but the model's embeddings have 10"),
    ],
    ids=["no_config", "broken_config", "broken_tokenizer", "broken_weights", "mismatched_vocab"],
)
def test_a_damaged_model_folder_is_one_line(model_folder, tmp_path, damage, expected):
    from tunegate.models import check_loadable

    folder = _damaged(model_folder, tmp_path, damage)
    with pytest.raises(UserError) as err:
        check_loadable(folder, str(folder))
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_intact_model_folder_passes_and_the_base_stage_checks_it(model_folder, tmp_path):
    from stages import base
    from tunegate.config import Base
    from tunegate.models import check_loadable

    check_loadable(model_folder, "tiny")  # no error
    broken = _damaged(model_folder, tmp_path, lambda f: _set_vocab(f, 10))
    with pytest.raises(UserError, match="embeddings have 10"):
        base.run(Base(model=str(broken)), 1, tmp_path / "pretrain.jsonl", tmp_path / "base")
    assert not (tmp_path / "base").exists()  # nothing half-made for the next stage
