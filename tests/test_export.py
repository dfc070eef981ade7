"""The export (tunegate.export, tunegate.llamacpp, tunegate.gguf_lm) on a tiny base with a random LoRA adapter:
what each format holds, that merged and GGUF answer like the model they came from, and every refusal in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.model import CHAT_TEMPLATE
from tests.tiny import build_base, tiny
from tunegate.errors import UserError
from tunegate.export import (
    Source,
    artifacts,
    commands,
    modelfile,
    run,
    strip_generation_tags,
    turns_of,
    verify,
    vllm_problem,
)
from tunegate.gguf_convert import pre_tokenizer_of

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|end|>"}
PROMPTS = ["Where is my order 51973?", "I want my money back for the lamp.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny base, a LoRA adapter with random (non-zero) weights saved as train saves it, and its export."""
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("export")
    manifest = build_base(root / "base", tiny(hidden_size=64, layers=2, max_position=128, vocab_size=512))
    model = load_model(manifest)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(root / "adapter", safe_serialization=True)
    load_tokenizer(manifest).save_pretrained(root / "adapter")
    source = Source(manifest, root / "adapter", True, "tiny-demo")
    record = run(source, ["merged", "gguf", "ollama", "vllm"], ["f16", "q8_0", "q4_k_m"], root / "export")
    return {"root": root, "manifest": manifest, "source": source, "record": record, "folder": root / "export"}


def _rendered(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _greedy_hf(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    import torch

    ids = tokenizer(_rendered(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def test_every_format_is_written_and_listed_with_its_sha256(exported):
    folder, record = exported["folder"], exported["record"]
    assert record["formats"] == ["merged", "gguf", "ollama", "vllm"]
    assert [a["name"] for a in record["artifacts"]] == ["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    for rel in ("merged/model.safetensors", "merged/chat_template.jinja", "gguf/model-f16.gguf", "ollama/Modelfile"):
        assert rel in record["files"], rel
    assert "vllm/adapter/adapter_model.safetensors" in record["files"] and (folder / "vllm/serve.sh").is_file()
    assert not list((folder / "merged").glob("adapter_*")), "merged loads without PEFT"
    assert verify(folder, record) == []
    sizes = {t: (folder / f"gguf/model-{t}.gguf").stat().st_size for t in ("f16", "q8_0", "q4_k_m")}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]


def test_a_changed_or_missing_file_is_named(exported, tmp_path):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(exported["folder"], copy)
    (copy / "ollama/Modelfile").write_text("FROM elsewhere\n")
    (copy / "gguf/model-q8_0.gguf").unlink()
    bad = verify(copy, exported["record"])
    assert bad == ["gguf/model-q8_0.gguf (missing)", "ollama/Modelfile (sha256 differs)"]
    assert verify(copy, exported["record"], only="merged") == []


def test_merged_answers_exactly_like_the_adapter_folded_in_memory(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunegate.models import load_with_adapter

    in_memory = load_with_adapter(exported["manifest"], exported["root"] / "adapter", merge=True).eval()
    merged = AutoModelForCausalLM.from_pretrained(exported["folder"] / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(exported["folder"] / "merged")
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the training template, {% generation %} included
    for prompt in PROMPTS:
        assert _greedy_hf(merged, tokenizer, prompt) == _greedy_hf(in_memory, tokenizer, prompt)


def test_gguf_f16_in_llama_cpp_answers_like_transformers(exported):
    """Same token ids for every rendered prompt, next-token log-probabilities within f16 rounding, and the same
    greedy continuation (or, where a near tie flips, the first divergence late)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunegate.gguf_lm import GGUFModel

    tokenizer = AutoTokenizer.from_pretrained(exported["folder"] / "merged")
    model = AutoModelForCausalLM.from_pretrained(exported["folder"] / "merged").eval()
    lm = GGUFModel(exported["folder"] / "gguf/model-f16.gguf", tokenizer, max_length=127, max_gen_toks=12)
    for prompt in PROMPTS:
        text = lm.apply_chat_template([{"role": "user", "content": prompt}])
        assert text == _rendered(tokenizer, prompt).replace("{% generation %}", "")  # the template in the GGUF
        ids = lm.tokens(text)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        got = lm._logits(ids).astype(np.float64)
        got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
        assert np.abs(got - reference).max() < 0.05
        hf, cpp = _greedy_hf(model, tokenizer, prompt), lm.greedy(ids, 12)
        first = next((i for i, (a, b) in enumerate(zip(hf, cpp, strict=False)) if a != b), None)
        assert first is None or first >= 6, f"{prompt!r}: llama.cpp and transformers diverge at token {first}"
    assert lm.tokenizer_mismatches == 0


def test_gguf_carries_the_template_without_training_tags_and_special_tokens(exported):
    from tunegate.llamacpp import open_gguf

    meta = open_gguf(exported["folder"] / "gguf/model-q8_0.gguf").metadata
    assert meta["tokenizer.chat_template"] == strip_generation_tags(CHAT_TEMPLATE)
    assert "{% generation %}" not in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["general.architecture"] == "llama"
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.bos_token_id"]) == ("2", "1")


def test_the_modelfile_renders_like_the_chat_template(exported):
    text = (exported["folder"] / "ollama/Modelfile").read_text()
    assert text.startswith("FROM ../gguf/model-q4_k_m.gguf\n")
    assert 'eq .Role "user" }}<|user|>{{ .Content }}<|end|>{{ else if eq .Role "assistant" }}' in text
    assert text.count('PARAMETER stop "<|end|>"') == 1 and "PARAMETER num_ctx 128" in text


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 2's template: the system prompt goes inside the first user turn, so no per-message wrapper exists.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>' + messages[0]['content'] + '<</SYS>>' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ sys if loop.first else '' }}"
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "user", "assistant", "generation"),
    [
        (CHAT_TEMPLATE, ("<|user|>", "<|end|>"), ("<|assistant|>", "<|end|>"), "<|assistant|>"),
        (
            CHATML,
            ("<|im_start|>user\n", "<|im_end|>\n"),
            ("<|im_start|>assistant\n", "<|im_end|>\n"),
            "<|im_start|>assistant\n",
        ),
    ],
)
def test_per_message_templates_become_ollama_turns(template, user, assistant, generation):
    turns = turns_of(strip_generation_tags(template), SPECIAL)
    assert turns.roles["user"] == user and turns.roles["assistant"] == assistant and turns.generation == generation
    text = modelfile(turns, "model-f16.gguf", "<|end|>", 4096)
    assert f'PARAMETER stop "{assistant[1].strip()}"' in text


def test_a_template_that_is_not_per_message_is_refused_for_ollama():
    with pytest.raises(UserError, match="not one fixed wrapper per message .*system prompt inside the first user"):
        turns_of(LLAMA2.replace("messages[0]['role']", "(messages or [{}])[0].get('role')"), SPECIAL)
    with pytest.raises(UserError, match="not one fixed wrapper per message .*fails: .*roles must alternate"):
        turns_of("{{ raise_exception('roles must alternate') }}", SPECIAL)


def test_pre_tokenizer_is_read_from_the_structure_only_where_it_is_unambiguous(exported):
    doc = json.loads((Path(exported["manifest"]["path"]) / "tokenizer.json").read_text())
    assert pre_tokenizer_of(doc) == "gpt-2"
    assert pre_tokenizer_of({**doc, "normalizer": {"type": "NFC"}}) is None
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split"}, doc["pre_tokenizer"]]}
    assert pre_tokenizer_of({**doc, "pre_tokenizer": split}) is None
    assert pre_tokenizer_of({**doc, "model": {"type": "Unigram"}}) is None
    # Qwen2's own layout: NFC, then its split regex, then byte-level without GPT-2's split
    qwen_regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    qwen = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen_regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    assert pre_tokenizer_of({**doc, "normalizer": {"type": "NFC"}, "pre_tokenizer": qwen}) == "qwen2"
    llama3 = json.loads(json.dumps(qwen).replace("p{N}|", "p{N}{1,3}|"))
    assert pre_tokenizer_of({**doc, "pre_tokenizer": llama3}) == "llama-bpe"
    other = json.loads(json.dumps(qwen).replace("p{N}|", "p{N}+|"))
    assert pre_tokenizer_of({**doc, "pre_tokenizer": other}) is None


def test_vllm_refuses_what_its_lora_loader_cannot_load():
    assert vllm_problem({"r": 8, "target_modules": ["q_proj"]}) is None
    assert "DoRA" in vllm_problem({"use_dora": True})
    assert "modules_to_save" in vllm_problem({"modules_to_save": ["lm_head"]})


def test_refusals_come_before_any_work(exported, tmp_path):
    import shutil

    base = tmp_path / "strange"
    shutil.copytree(exported["manifest"]["path"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    source = Source({**exported["manifest"], "path": str(base)}, exported["root"] / "adapter", True, "x")
    with pytest.raises(UserError, match="converter refused .*NoSuchForCausalLM"):
        run(source, ["gguf"], ["f16"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    dora = tmp_path / "dora"
    shutil.copytree(exported["root"] / "adapter", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="export.formats vllm: vLLM does not load DoRA"):
        run(Source(exported["manifest"], dora, True, "x"), ["merged", "vllm"], ["f16"], tmp_path / "out")
    with pytest.raises(UserError, match="export.gguf: unknown type"):
        run(exported["source"], ["gguf"], ["q9_9"], tmp_path / "out")


def test_a_full_fine_tune_is_exported_as_it_is(exported, tmp_path):
    source = Source(exported["manifest"], exported["folder"] / "merged", False, "full")
    record = run(source, ["merged", "vllm"], ["f16"], tmp_path / "out")
    assert record["files"]["merged/model.safetensors"] == exported["record"]["files"]["merged/model.safetensors"]
    assert "vllm serve ../merged" in (tmp_path / "out/vllm/serve.sh").read_text()
    assert not (tmp_path / "out/vllm/adapter").exists()


def test_nothing_to_merge_loads_no_model(exported, tmp_path):
    """No format that needs merged weights (none, or only vLLM's adapter): the model is never loaded, so a
    base whose weights are gone does not matter; the record lists no artifact for eval_export to load."""
    manifest = {**exported["manifest"], "path": str(tmp_path / "no-base")}
    (tmp_path / "no-base").mkdir()
    source = Source(manifest, exported["source"].trained, True, "tiny-demo")
    for formats in ([], ["vllm"]):
        out = tmp_path / f"out-{len(formats)}"
        record = run(source, formats, ["f16"], out)
        assert record["artifacts"] == [] and not (out / "merged").exists()
        assert sorted(p.name for p in out.iterdir()) == (["export.json", "vllm"] if formats else ["export.json"])


def test_commands_name_each_runtime_with_the_export_folder(exported):
    every = commands(exported["record"], "models/export")
    assert set(every) == {"transformers", "llama.cpp", "lm-studio", "ollama", "vllm"}
    assert every["ollama"] == "ollama create tiny-demo -f models/export/ollama/Modelfile && ollama run tiny-demo"
    assert set(commands(exported["record"], "f", only="gguf")) == {"llama.cpp", "lm-studio"}
    assert [a.name for a in artifacts(["ollama"], ["q8_0"])] == ["gguf-q8_0"]
    assert artifacts(["vllm"], ["f16"]) == []


def test_export_settings_are_checked_at_load():
    from pydantic import ValidationError

    from tunegate.config import Export

    assert Export(gguf=["f16", "f16", "q4_k_m"]).gguf == ["f16", "q4_k_m"]
    with pytest.raises(ValidationError, match="unknown GGUF type"):
        Export(gguf=["q3_xl"])
    with pytest.raises(ValidationError):
        Export(formats=["onnx"])


def test_gguf_without_llama_cpp_is_refused_before_training(monkeypatch):
    from tunegate.config import load_config
    from tunegate.consistency import export_problems

    cfg = load_config()
    gguf = cfg.model_copy(update={"export": cfg.export.model_copy(update={"formats": ["merged", "gguf"]})})
    assert export_problems(gguf) == [] and export_problems(cfg) == []
    monkeypatch.setenv("TUNEGATE_LLAMA_CPP", "/nowhere")
    assert export_problems(gguf) == [
        "export.formats gguf/ollama: llama.cpp's converter not found in /nowhere: `make setup-export` (or "
        "`python -m tunegate.llamacpp`) or set TUNEGATE_LLAMA_CPP to a llama.cpp checkout"
    ]
    assert export_problems(cfg) == []  # merged needs no llama.cpp


def test_gguf_scores_perplexity_windows_like_transformers(exported):
    """loglikelihood_rolling: a text longer than the context, in lm-eval's disjoint windows, sums to the
    log-probability transformers gives the same windows (to f16 rounding)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunegate.gguf_lm import GGUFModel

    tokenizer = AutoTokenizer.from_pretrained(exported["folder"] / "merged")
    model = AutoModelForCausalLM.from_pretrained(exported["folder"] / "merged").eval()
    lm = GGUFModel(exported["folder"] / "gguf/model-f16.gguf", tokenizer, max_length=32, max_gen_toks=8)
    text = " ".join(PROMPTS * 4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 64  # three windows or more
    expected = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, lm.eos_id, 32, 1)):
        whole = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(whole).logits[0, :-1].double(), -1)
        expected += float(logp[-len(cont) :].gather(1, torch.tensor(cont)[:, None]).sum())
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (got,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    assert abs(got - expected) < 0.02 * abs(expected)
