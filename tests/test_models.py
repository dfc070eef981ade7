"""Base model resolution: offline hub ids, pickle-only folders and tokenizer-less folders fail in one line."""

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
    assert rev == "local" and set(m["weights_sha256"]) == {"model.safetensors"} and m["chat_template_sha256"]


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
