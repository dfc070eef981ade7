"""The path a real user takes, command by command as the README's "Using your own model and data" shows:
a base of another architecture and chat template than the demo (a tiny random Qwen2 with ChatML, a local
folder), their own OpenAI chat JSONL outside data/raw, `tunegate init`, `dvc repro` through `register`.

Then: the held-out eval rows reach no training row, the gate checks the generated target task and a
general task, editing the data file makes validate (and what follows) stale, and a base without a chat
template gets the documented default one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import copy_project, sh
from tunegate.io import read_jsonl

pytestmark = pytest.mark.slow

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2(out: Path, texts: list[str], chat_template: str | None = CHATML) -> Path:
    """A random-init Qwen2-style model with its own byte-level BPE tokenizer, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


OWN_SYSTEM = {"role": "system", "content": "You turn support messages into JSON tickets."}


def own_data(path: Path, rows_wanted: int = 400) -> int:
    """The demo's support tickets as a user would have them: OpenAI chat JSONL, some with a system turn, every
    fourth a conversation of two tickets (400 rows: enough for a 60-row eval and a training set, few enough to
    train in a minute on CPU)."""
    from tunegate.formats import load_source

    rows, _, _ = load_source("domain", ROOT / "data/raw/domain.jsonl")
    system = OWN_SYSTEM
    lines, earlier = [], []
    for i, row in enumerate(rows):
        msgs = row["messages"]
        if [m["role"] for m in msgs] != ["user", "assistant"] or not msgs[1]["content"].startswith("{"):
            continue
        turns = (earlier if len(lines) % 4 == 3 else []) + msgs
        earlier = msgs
        lines.append(json.dumps({"messages": ([system] if i % 3 == 0 else []) + turns}))
        if len(lines) == rows_wanted:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("own"))
    texts = [r["prompt"] + " " + r["completion"] for r in read_jsonl(ROOT / "data/pretrain/general.jsonl")[:3000]]
    texts += (ROOT / "data/raw/domain.jsonl").read_text().splitlines()[:1000]
    tiny_qwen2(project / "models/tiny-qwen", texts)
    n = own_data(project / "data/my_tickets.jsonl")
    init = sh(
        project,
        "tunegate",
        "init",
        "--model",
        "models/tiny-qwen",
        "--data",
        "data/my_tickets.jsonl",
        "--general-tasks",
        "general_mc",
        "--eval-size",
        "60",
    )
    check = sh(project, "tunegate", "check")
    # private data: tracked by DVC (cache, remote), not by git; the project state is committed
    sh(project, "dvc", "add", "data/my_tickets.jsonl")
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tunegate init")
    repro = sh(project, "dvc", "repro")
    return project, n, init.stdout, check.stdout, repro.stdout + repro.stderr


def test_init_writes_an_eval_a_policy_and_params_for_the_model_and_data(own):
    import yaml

    project, n, init_out, check_out, _ = own
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["base"]["model"] == "models/tiny-qwen"
    assert params["data"]["sources"]["my_tickets"] == {"path": "data/my_tickets.jsonl", "role": "domain"}
    assert params["eval"]["tasks"] == ["my_tickets_gen", "general_mc"]
    assert params["train"]["args"]["max_length"] >= params["validate"]["max_tokens"]
    assert params["train"]["args"]["learning_rate"] == 2.0e-4 and params["train"]["lora"]["dropout"] == 0.05
    # GRPO is one setting away, rewarded by the held-out task's own scorer (the reward is built as the stage would)
    assert params["train"]["grpo"] == {"rewards": [{"scorer": "my_tickets_gen/json_fields"}]}
    from tunegate.config import RewardSpec
    from tunegate.rewards import build

    (reward,) = build([RewardSpec(scorer="my_tickets_gen/json_fields")], project / "evals/tasks")
    assert (
        reward.one(
            [], held_reference := read_jsonl(project / "evals/data/my_tickets_gen.jsonl")[0]["answer"], held_reference
        )
        == 1.0
    )
    held_out = read_jsonl(project / "evals/data/my_tickets_gen.jsonl")
    assert len(held_out) == 60 and all(set(r) >= {"id", "prompt", "answer"} for r in held_out)
    assert "stratified by 'urgency'" in init_out  # the JSON answers' label with fewest values
    task = (project / "evals/tasks/my_tickets_gen.yaml").read_text()
    assert "utils.json_fields" in task and '"<|im_end|>"' in task  # ChatML's end of turn stops generation
    # a third of the rows have a system turn: their held-out items are asked with it (lm-eval's description)
    assert "description: system" in task and {r["system"] for r in held_out} == {"", OWN_SYSTEM["content"]}
    # a quarter of the rows are two-ticket conversations: their items are asked after their first ticket
    assert "sampler: !function utils.EarlierTurns" in task and {len(r["history"]) for r in held_out} == {0, 1}
    assert re.search(r"its earlier turns \(\d+ items\)", init_out)
    policy = yaml.safe_load((project / "evals/gates.yaml").read_text())
    assert [(c["task"], c["metric"], c["role"]) for c in policy["checks"]] == [
        ("my_tickets_gen", "json_fields", "target"),
        ("general_mc", "acc", "general"),
    ]
    assert params["baselines"] == {"tasks": ["my_tickets_gen"], "prompt": True, "few_shot": 5, "retrieval": 5}
    assert policy["baselines"] == {"beat": True, "min_gain": 0.0}
    prompt = (project / "evals/prompt.md").read_text()  # written from the answers' own keys
    assert prompt.startswith("Reply with one JSON object with the keys ") and "urgency" in prompt
    assert "data/my_tickets.jsonl" in (project / "dvc.yaml").read_text()
    assert check_out.startswith("ok:") and "warning" not in check_out


def test_dvc_repro_runs_through_register_and_the_gate_checks_both_tasks(own):
    project, _, _, _, repro = own
    stages = ("base", "validate", "dedup", "mix", "train", "eval_base", "eval_baselines", "eval_candidate", "gate")
    for stage in (*stages, "register"):
        assert f"Running stage '{stage}'" in repro
    verdict = json.loads((project / "reports/gate/verdict.json").read_text())
    assert list(verdict["baselines"]) == ["prompt", "few_shot-5", "retrieval-5"]
    assert sum(re.search(r"my_tickets_gen/json_fields vs (prompt|few_shot-5|retrieval-5):", line) is not None
               for line in verdict["lines"]) == 1  # fmt: skip
    checked = {(c["task"], c["metric"], c["role"]) for c in verdict["checks"] if c.get("against", "base") == "base"}
    assert {("my_tickets_gen", "json_fields", "target"), ("general_mc", "acc", "general")} <= checked
    assert all(c["n"] == 60 for c in verdict["checks"] if c["task"] == "my_tickets_gen")
    status = sh(project, "tunegate", "status").stdout
    assert re.search(r"tiny-qwen-my-tickets-gen", status)
    # items held out of two-ticket conversations were asked after their first ticket, by the base, the candidate and
    # every baseline (ChatML: the earlier ticket's user turn, then its answer, then the item)
    items = read_jsonl(project / "evals/data/my_tickets_gen.jsonl")
    runs = [project / "reports/eval_base", project / "reports/eval_candidate"]
    runs += [project / "reports/eval_baselines" / name for name in verdict["baselines"]]
    for run in runs:
        for sample in read_jsonl(run / "samples/my_tickets_gen.jsonl"):
            item = items[sample["doc_id"]]
            for turn in item["history"]:
                asked = sample["prompt"]
                assert asked.index(f"<|im_start|>user\n{turn['user']}<|im_end|>") < asked.index(item["prompt"])


def test_held_out_rows_reach_no_training_row(own):
    project, *_ = own
    prompts = {r["prompt"] for r in read_jsonl(project / "evals/data/my_tickets_gen.jsonl")}
    trained = [m["content"].strip() for r in read_jsonl(project / "data/mix/train.jsonl") for m in r["messages"]]
    assert not prompts & set(trained)
    leaks = [d for d in read_jsonl(project / "data/dedup/dropped.jsonl") if d["reason"] == "eval_leak"]
    # every held-out item's own row is dropped; a conversation holding two items is dropped naming one of them
    held = [d for d in leaks if d["of"].startswith("my_tickets_gen:")]
    assert len({d["id"] for d in held}) >= len(prompts) and len({d["of"] for d in held}) > len(prompts) * 0.9


def test_editing_the_data_file_makes_validate_and_what_follows_stale(own):
    project, *_ = own
    path = project / "data/my_tickets.jsonl"
    original = path.read_text()
    try:
        row = {
            "messages": [{"role": "user", "content": "Where is order 99999?"}, {"role": "assistant", "content": "{}"}]
        }
        path.write_text(original + json.dumps(row) + "\n")
        status = sh(project, "dvc", "status").stdout
        assert re.search(r"validate:\s*\n\s*changed deps:\s*\n\s*modified:\s*data/my_tickets.jsonl", status), status
    finally:
        path.write_text(original)


def test_a_base_without_a_chat_template_gets_the_default_one(tmp_path):
    """A pretrained-only checkpoint: init measures rows with the documented default template."""
    from tunegate.models import DEFAULT_CHAT_TEMPLATE, load_tokenizer
    from tunegate.project import _tokenizer

    texts = [r["prompt"] for r in read_jsonl(ROOT / "data/pretrain/general.jsonl")[:500]]
    folder = tiny_qwen2(tmp_path / "plain", texts, chat_template=None)
    assert load_tokenizer({"path": str(folder)}).chat_template == DEFAULT_CHAT_TEMPLATE
    assert _tokenizer(str(folder), "main", {}).chat_template == DEFAULT_CHAT_TEMPLATE


def test_reproduce_restores_the_private_data_from_the_dvc_cache(own):
    """The data file is not in git; `tunegate reproduce` clones the recorded commit and gets the data back
    from the DVC cache (`dvc add`), then re-trains to the same adapter bytes."""
    project, *_ = own
    assert "my_tickets.jsonl" in (project / "data/.gitignore").read_text()
    out = sh(project, "tunegate", "reproduce", "1", "--workdir", str(project.parent / "reproduced"))
    assert "MATCH" in out.stdout and "MISMATCH" not in out.stdout
    assert (project.parent / "reproduced/data/my_tickets.jsonl").read_bytes() == (
        project / "data/my_tickets.jsonl"
    ).read_bytes()


def test_a_registered_qwen2_chatml_version_exports_to_gguf_and_ollama_and_answers_alike(own, tmp_path):
    """`tunegate export` on the registered version of another architecture and template: Qwen2 with ChatML goes
    through llama.cpp's converter (its tokenizer's pre-tokenizer read from tokenizer.json), the Modelfile's
    TEMPLATE is ChatML's turns, and llama.cpp scores the eval prompts as transformers does."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunegate.gguf_lm import GGUFModel

    project, *_ = own
    out = tmp_path / "shipped"
    args = ("--formats", "merged,gguf,ollama", "--gguf", "f16", "--to", str(out))
    printed = sh(project, "tunegate", "export", "1", *args).stdout
    assert "ollama create tiny-qwen-my-tickets-gen -f" in printed, printed
    modelfile = (out / "ollama/Modelfile").read_text()
    assert 'eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    lm = GGUFModel(out / "gguf/model-f16.gguf", tokenizer, 255, 16)
    for row in read_jsonl(project / "evals/data/my_tickets_gen.jsonl")[:5]:
        text = lm.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        assert text == tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = lm.tokens(text)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        got = lm._logits(ids).astype(np.float64)
        got = got - got.max(-1, keepdims=True)
        got = got - np.log(np.exp(got).sum(-1, keepdims=True))
        assert np.abs(got - reference).max() < 0.05
    assert lm.tokenizer_mismatches == 0
    from tunegate.registry import client, resolve_version

    c = client(f"sqlite:///{project / 'mlflow.db'}")
    assert "gguf-f16 (unchecked)" in resolve_version(c, "tiny-qwen-my-tickets-gen", "1").tags["exports"]
    fetched = sh(project, "tunegate", "fetch", "1", "--format", "gguf", "--to", str(tmp_path / "again")).stdout
    assert "sha256 checked" in fetched and (tmp_path / "again/gguf/model-f16.gguf").is_file()
