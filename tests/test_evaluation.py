"""lm-eval wrapper: unknown tasks and built-in tasks without cached data end in one clear line."""

import os

import pytest

from tests.conftest import ROOT
from tunegate.config import DemoBase, Eval
from tunegate.errors import UserError
from tunegate.evaluation import evaluate
from tunegate.io import read_jsonl

TINY = DemoBase(
    vocab_size=400,
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    max_position=64,
    steps=2,
    batch_size=4,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from demo.model import build
    from tunegate.models import describe

    out = tmp_path_factory.mktemp("base")
    build(read_jsonl(ROOT / "data/pretrain/general.jsonl")[:300], TINY, 1, out)
    return {**describe(out, "demo", "seeded", "seed-1"), "path": str(out)}


def test_unknown_task_is_named(manifest, tmp_path):
    with pytest.raises(UserError, match="eval.tasks: unknown task.*no_such_task"):
        evaluate(Eval(tasks=["no_such_task"]), manifest, ROOT / "evals/tasks", tmp_path / "out", 1)


def test_builtin_task_offline_is_one_line(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(UserError) as err:
        evaluate(Eval(tasks=["arc_easy"], limit=2), manifest, ROOT / "evals/tasks", tmp_path / "out", 1)
    assert "built-in tasks need their dataset in the local HF cache" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_local_tasks_score_and_keep_per_sample_outcomes(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = evaluate(
        Eval(tasks=["general_mc", "support_gen"], limit=8), manifest, ROOT / "evals/tasks", tmp_path / "out", 1
    )
    assert set(result["scores"]) == {"general_mc", "support_gen"}
    samples = read_jsonl(tmp_path / "out" / "samples" / "support_gen.jsonl")
    assert len(samples) == 8 and {"doc_id", "json_exact", "json_fields"} <= set(samples[0])


def test_adapter_merged_in_memory_scores_like_lm_eval_peft(manifest, tmp_path, monkeypatch):
    """eval.merge_adapter (the default, faster) gives the same per-sample outcomes as lm-eval's peft=."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model, load_tokenizer

    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter really changes the outputs
    model = get_peft_model(
        load_model(manifest),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(manifest).save_pretrained(adapter)
    tasks = ["general_mc", "support_gen"]
    evaluate(Eval(tasks=tasks, limit=8), manifest, ROOT / "evals/tasks", tmp_path / "base", 1)
    merged = evaluate(
        Eval(tasks=tasks, limit=8), manifest, ROOT / "evals/tasks", tmp_path / "merged", 1, adapter=adapter
    )
    peft = evaluate(
        Eval(tasks=tasks, limit=8, merge_adapter=False),
        manifest,
        ROOT / "evals/tasks",
        tmp_path / "peft",
        1,
        adapter=adapter,
    )
    assert merged["scores"] == peft["scores"]
    for task in tasks:
        assert read_jsonl(tmp_path / "merged" / "samples" / f"{task}.jsonl") == read_jsonl(
            tmp_path / "peft" / "samples" / f"{task}.jsonl"
        )
    base_samples = [read_jsonl(tmp_path / "base" / "samples" / f"{t}.jsonl") for t in tasks]
    assert base_samples != [read_jsonl(tmp_path / "merged" / "samples" / f"{t}.jsonl") for t in tasks]
