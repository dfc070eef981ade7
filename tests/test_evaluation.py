"""lm-eval wrapper: unknown tasks and built-in tasks without cached data end in one clear line."""

import json
import os

import pytest

from tests.conftest import ROOT
from tests.tiny import tiny
from tunegate.config import Eval
from tunegate.errors import UserError
from tunegate.evaluation import evaluate
from tunegate.io import read_jsonl

TINY = tiny()


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


def test_scores_are_the_means_of_the_per_sample_outcomes_the_gate_reads(manifest, tmp_path, monkeypatch):
    """The gate decides on samples/<task>.jsonl and the reports quote results.json: they must agree."""
    from tunegate.io import read_json
    from tunegate.paths import RESULTS, SAMPLES

    monkeypatch.chdir(ROOT)
    tasks = ["general_mc", "support_mc", "support_gen"]
    returned = evaluate(Eval(tasks=tasks, limit=12), manifest, ROOT / "evals/tasks", tmp_path / "out", 1)["scores"]
    written = read_json(tmp_path / "out" / RESULTS)["scores"]
    assert written == returned and set(written) == set(tasks)
    for task in tasks:
        samples = read_jsonl(tmp_path / "out" / SAMPLES / f"{task}.jsonl")
        assert written[task]["n"] == len(samples) == 12
        metrics = set(written[task]) - {"n"}
        assert metrics and all(metrics <= set(s) for s in samples)
        for metric in metrics:
            mean = sum(s[metric] for s in samples) / len(samples)
            assert written[task][metric] == pytest.approx(mean, abs=1e-6), (task, metric)
    # not all-zero or all-one, or the equality above would hold for any pairing of scores and outcomes
    assert any(0 < written[t][m] < 1 for t in tasks for m in written[t] if m != "n")


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


def _tasks(tmp_path, edit):
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "evals/tasks", tasks)
    path = tasks / "general_mc.yaml"
    path.write_bytes(edit(path.read_bytes()))
    return tasks, path


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda b: b + b"\n  bad: [unclosed\n", "not valid YAML"),
        (lambda b: b + b"\n# caf\xe9\n", "not UTF-8 (byte"),
        (lambda b: b"- just\n- a list\n", "expected a mapping of lm-eval task settings, got a list"),
    ],
    ids=["yaml", "encoding", "shape"],
)
def test_a_broken_task_file_is_named(manifest, tmp_path, monkeypatch, edit, expected):
    """lm-eval skips a task file it cannot read, and the task would then be reported unknown."""
    monkeypatch.chdir(ROOT)
    tasks, path = _tasks(tmp_path, edit)
    with pytest.raises(UserError) as err:
        evaluate(Eval(tasks=["general_mc"], limit=2), manifest, tasks, tmp_path / "out", 1)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_a_misspelt_task_setting_is_named(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    tasks, path = _tasks(tmp_path, lambda b: b.replace(b"doc_to_text:", b"doc_to_txt:"))
    with pytest.raises(UserError) as err:
        evaluate(Eval(tasks=["general_mc"], limit=2), manifest, tasks, tmp_path / "out", 1)
    assert str(err.value) == f"{path}: 'doc_to_txt' is not an lm-eval task setting (a typo? see lm-eval's task guide)"


def test_a_task_whose_data_file_is_missing_names_it(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    tasks, _ = _tasks(tmp_path, lambda b: b.replace(b"evals/data/general_mc.jsonl", b"evals/data/nope.jsonl"))
    with pytest.raises(UserError) as err:
        evaluate(Eval(tasks=["general_mc"], limit=2), manifest, tasks, tmp_path / "out", 1)
    assert "nope.jsonl" in str(err.value) and "dataset_kwargs.data_files" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


VLLM_HERE = __import__("importlib").util.find_spec("vllm") is not None and __import__("torch").cuda.is_available()


@pytest.mark.skipif(VLLM_HERE, reason="vLLM can run here: the refusal is for machines where it cannot")
def test_the_vllm_backend_where_vllm_cannot_run_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    from tunegate import baselines
    from tunegate.config import parse_config

    monkeypatch.chdir(ROOT)
    nowhere = {"model": "demo", "path": str(tmp_path / "no-model-here")}  # loading it would fail otherwise
    expected = r"^eval.backend: vLLM needs a CUDA device.*; set eval.backend: hf$"
    with pytest.raises(UserError, match=expected):
        evaluate(Eval(tasks=["support_gen"], backend="vllm"), nowhere, ROOT / "evals/tasks", tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()
    sources = {"domain": {"path": "d.jsonl", "role": "domain"}}
    cfg = parse_config({"data": {"sources": sources}, "eval": {"tasks": ["support_gen"], "backend": "vllm"}})
    with pytest.raises(UserError, match=expected):  # the baselines run on the same backend as the evals
        baselines.prompted_model(cfg, nowhere)


def test_an_unknown_backend_is_named_at_load():
    with pytest.raises(ValueError, match="backend"):
        Eval(tasks=["t"], backend="tpu")


@pytest.mark.skipif(not VLLM_HERE, reason="the vLLM backend needs a CUDA device and vLLM installed (none here)")
def test_the_vllm_backend_gives_the_outcomes_of_the_hf_backend_on_cuda(manifest, tmp_path, monkeypatch):
    """Greedy on both: at least 90% of the per-sample outcomes the gate pairs are the same, for the base and for
    base + adapter. The kernels differ (FlashAttention 3 in vLLM, SDPA in transformers) and bfloat16 rounds, so a
    near tie breaks the other way now and then, and the tiny base's answers are mostly near ties: measured on an
    H200 (2026-12-04, vLLM 0.26.0, torch 2.11.0+cu130), 522 of the base's 550 outcomes agreed (94.9%). The base
    is saved in bfloat16, as hub models are: vLLM's dtype "auto" scores float32 weights in bfloat16, lm-eval's hf
    model as saved."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model, load_tokenizer

    monkeypatch.chdir(ROOT)
    load_model(manifest).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    load_tokenizer(manifest).save_pretrained(tmp_path / "bf16")
    manifest = {**manifest, "path": str(tmp_path / "bf16")}
    torch.manual_seed(0)
    model = get_peft_model(load_model(manifest), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(manifest).save_pretrained(tmp_path / "adapter")
    tasks = ["general_mc", "general_gen", "support_gen"]
    for adapter in (None, tmp_path / "adapter"):
        outcomes = {}
        for backend in ("hf", "vllm"):
            out = tmp_path / f"{backend}-{bool(adapter)}"
            evaluate(Eval(tasks=tasks, backend=backend), manifest, ROOT / "evals/tasks", out, 1, adapter=adapter)
            outcomes[backend] = [s for t in tasks for s in read_jsonl(out / "samples" / f"{t}.jsonl")]
        same = sum(
            {k: v for k, v in a.items() if k not in ("prompt", "output")}
            == {k: v for k, v in b.items() if k not in ("prompt", "output")}
            for a, b in zip(outcomes["hf"], outcomes["vllm"], strict=True)
        )
        assert same >= 0.90 * len(outcomes["hf"]), (adapter, same, len(outcomes["hf"]))


def test_task_templates_are_compiled_once_and_render_as_before():
    """lm-eval's Jinja templates compiled once per template text (evaluation._compile_templates_once): every
    document renders exactly as lm-eval renders it uncompiled-each-time, with its own filters and strictness."""
    import jinja2
    from lm_eval import utils

    from tunegate import evaluation

    template = "Ticket: {{ text }}\nAnswer:{{ ' ' ~ (label | string | regex_replace('_', ' ')) }}"
    docs = [{"text": f"order {i} late", "label": f"ship_{i}"} for i in range(6)]
    each_time = getattr(utils.env.from_string, "__wrapped__", utils.env.from_string)  # lm-eval's own compilation
    before = [each_time(template).render(**doc) for doc in docs]
    evaluation._compile_templates_once()
    evaluation._compile_templates_once()  # once per process, however often an eval runs
    compiled = utils.env.from_string.cache_info().misses
    assert [utils.apply_template(template, doc) for doc in docs] == before
    assert before[0] == "Ticket: order 0 late\nAnswer: ship 0"
    assert utils.env.from_string.cache_info().misses == compiled + 1  # six documents, one compilation
    with pytest.raises(jinja2.UndefinedError):  # a missing field still fails as lm-eval's StrictUndefined says
        utils.apply_template(template, {"text": "no label"})


GEMMA_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _base_and_tasks(manifest, tmp_path, template: str):
    """A copy of the tiny base (with a Gemma-like template that refuses a system turn, or its own) and of the
    project's lm-eval tasks, for a task written into it."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(manifest["path"], base)
    if template == "refuses_system":
        (base / "chat_template.jinja").write_text(GEMMA_LIKE)
    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "evals/tasks", tasks)
    return base, tasks


@pytest.mark.parametrize("template", ["takes_system", "refuses_system"])
def test_items_are_asked_with_their_system_turn_folded_where_the_template_refuses_one(
    manifest, tmp_path, monkeypatch, template
):
    """A held-out task written by init with its rows' system turns (lm-eval's `description` naming the items'
    field): a real lm-eval run puts each item's own system text before it, as a system turn where the template
    takes one and before the user's text in the first user turn where it does not (lm-eval alone would drop it)."""

    from tunegate.project import task_yaml

    base, tasks = _base_and_tasks(manifest, tmp_path, template)
    items = [
        {"id": f"t-{i}", "prompt": f"Ticket {i}: parcel late", "answer": "shipping", "system": f"You are desk {i}."}
        for i in range(4)
    ]
    items[3]["system"] = ""  # a row without one is asked without one
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tasks / "tickets.yaml").write_text(
        task_yaml("tickets", "items.jsonl", "exact", ["exact"], ["\n"], "t", system=True)
    )
    monkeypatch.chdir(tmp_path)
    evaluate(Eval(tasks=["tickets"], limit=4), {**manifest, "path": str(base)}, tasks, tmp_path / "out", 1)
    prompts = {s["doc_id"]: s["prompt"] for s in read_jsonl(tmp_path / "out" / "samples" / "tickets.jsonl")}
    for i, item in enumerate(items[:3]):
        if template == "refuses_system":
            assert f"<start_of_turn>user\n{item['system']}\n\nTicket {i}: parcel late" in prompts[i]
        else:
            assert prompts[i].index(item["system"]) < prompts[i].index(f"Ticket {i}") and "<|system|>" in prompts[i]
    assert "desk" not in prompts[3] and "system" not in prompts[3]


@pytest.mark.parametrize("template", ["takes_system", "refuses_system"])
def test_items_held_out_of_conversations_are_asked_after_their_own_earlier_turns(
    manifest, tmp_path, monkeypatch, template
):
    """A held-out task written by init for multi-turn rows (each item's `history`, drawn by utils.EarlierTurns): a
    real lm-eval run renders each item as the chat template renders its conversation up to the last user turn, its
    own earlier exchanges and system turn included (folded into the first user turn where the template refuses
    one, as validate folds the training rows), and no other item's."""

    from transformers import AutoTokenizer

    from tunegate.chat import Renderer, fold_system
    from tunegate.project import task_yaml

    base, tasks = _base_and_tasks(manifest, tmp_path, template)
    items = [
        {
            "id": f"t-{i}",
            "prompt": f"And parcel {i}, where is it now?",
            "answer": "shipping",
            "system": f"You are desk {i}." if i != 2 else "",
            "history": [
                {"user": f"Ticket {i}.{k}: my order {k} is late", "assistant": f"Sorry, order {k} is on its way."}
                for k in range(i)
            ],
        }
        for i in range(4)
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tasks / "tickets.yaml").write_text(
        task_yaml("tickets", "items.jsonl", "exact", ["exact"], ["\n"], "t", system=True, earlier=3)
    )
    monkeypatch.chdir(tmp_path)
    evaluate(Eval(tasks=["tickets"], limit=4), {**manifest, "path": str(base)}, tasks, tmp_path / "out", 1)
    prompts = {s["doc_id"]: s["prompt"] for s in read_jsonl(tmp_path / "out" / "samples" / "tickets.jsonl")}
    render = Renderer(AutoTokenizer.from_pretrained(base))
    for i, item in enumerate(items):
        turns = [{"role": "system", "content": item["system"]}] if item["system"] else []
        for exchange in item["history"]:
            turns += [
                {"role": "user", "content": exchange["user"]},
                {"role": "assistant", "content": exchange["assistant"]},
            ]
        turns.append({"role": "user", "content": item["prompt"]})
        expected = render(fold_system(turns) if template == "refuses_system" else turns, generation=True)
        assert prompts[i] == expected
        assert all(f"Ticket {j}." not in prompts[i] for j in range(4) if j != i)  # no other item's turns
