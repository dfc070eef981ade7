"""The demo base builder is deterministic and produces a loadable model with a chat template."""

from demo.model import EOS, build
from tests.conftest import ROOT
from tests.tiny import tiny
from tunegate.io import read_jsonl, sha256_tree

TINY = tiny(steps=3)


def test_same_seed_same_bytes(tmp_path):
    rows = read_jsonl(ROOT / "data/pretrain/general.jsonl")[:500]
    build(rows, TINY, 7, tmp_path / "a")
    build(rows, TINY, 7, tmp_path / "b")
    build(rows, TINY, 8, tmp_path / "c")
    a, b, c = (sha256_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_model_loads_with_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build(read_jsonl(ROOT / "data/pretrain/general.jsonl")[:300], TINY, 1, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert tok.eos_token == EOS and model.config.eos_token_id == tok.eos_token_id
