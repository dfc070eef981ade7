"""The demo base builder is deterministic and produces a loadable model with a chat template."""

from demo.model import EOS, build
from tests.conftest import ROOT
from tunegate.config import DemoBase
from tunegate.io import read_jsonl, sha256_tree

TINY = DemoBase(
    vocab_size=400,
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    max_position=64,
    steps=3,
    batch_size=4,
    warmup_steps=1,
)


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
