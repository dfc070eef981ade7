"""train on a tiny demo base: every adapter kind learns, QLoRA is really 4-bit, DPO moves margins,
bad args are named."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from stages import train
from tests.conftest import ROOT
from tests.tiny import TRAINABLE, build_base, tiny
from tunegate.config import Lora, Train
from tunegate.errors import UserError
from tunegate.io import sha256_tree

TINY = tiny(**TRAINABLE, max_position=64, steps=30, batch_size=8, warmup_steps=2)
ARGS = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
    "logging_steps": 1,
    "save_steps": 2,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("base"), TINY, rows=2000, seed=3)


@pytest.fixture(scope="module")
def rows():
    from tunegate.formats import load_source

    sft, _, _ = load_source("domain", ROOT / "data/raw/domain.jsonl")
    prefs, _, _ = load_source("preferences", ROOT / "data/raw/preferences.jsonl")
    good = [
        r
        for r in sft
        if [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"].strip()
    ]
    good_prefs = [r for r in prefs if r["chosen"] != r["rejected"]]
    return good[:64], good_prefs[:32]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora", "full"])
def test_each_adapter_trains_and_saves_safetensors(base, rows, tmp_path, adapter):
    cfg = Train(truncate=True, adapter=adapter, lora=Lora(r=4, alpha=8), args=ARGS)
    metrics = train.run(
        cfg,
        1,
        train.Inputs(base, rows[0], [], rows[0][:8]),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots.csv"),
    )
    saved = tmp_path / "out" / train.ADAPTER
    assert metrics["steps"] == 4 and metrics["trainable_parameters"] > 0
    assert not list(saved.glob("*.bin")) and not (saved / "training_args.bin").exists()
    assert not (tmp_path / "ckpt").exists()  # removed once the run completed
    files = sha256_tree(saved, "*.safetensors")
    assert files
    if adapter == "full":
        tensors = weights(saved / "model.safetensors")
        before = weights(next(Path(base["path"]).glob("*.safetensors")))
        assert any(not (tensors[k] == before[k]).all() for k in before if k in tensors)
    else:
        tensors = weights(saved / "adapter_model.safetensors")
        lora_b = [t for k, t in tensors.items() if "lora_B" in k]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means it learned
        config = json.loads((saved / "adapter_config.json").read_text())
        assert config["use_dora"] is (adapter == "dora") and config["base_model_name_or_path"] == "demo"
    assert (tmp_path / "plots.csv").read_text().startswith("step,loss")


def test_qlora_loads_nf4_with_double_quantisation_and_bf16_compute(base):
    """What the README promises for train.adapter: qlora, read from the layers themselves: every linear
    layer is a 4-bit NF4 layer whose quantisation constants are quantised again, computing in bf16."""
    import bitsandbytes as bnb
    import torch

    from tunegate.models import load_model

    model = load_model(base, quantize_4bit=True)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == TINY.layers * 7  # q, k, v, o, gate, up, down in every decoder layer
    for layer in four_bit:
        state = layer.weight.quant_state
        assert (layer.weight.quant_type, state.quant_type) == ("nf4", "nf4")
        assert state.nested and state.state2 is not None  # double quantisation
        assert layer.compute_dtype == torch.bfloat16
    config = model.config.quantization_config
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


def test_sft_batches_mask_the_prompt_so_the_loss_is_on_the_answer_only(base, rows, tmp_path):
    """The batches the stage's SFT trainer sees: every prompt token's label is -100 and every answer token
    keeps its id (loss on the prompt too would teach the model to write support messages)."""
    from tunegate.models import load_model, load_tokenizer

    cfg = Train(truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args=ARGS)
    config = train._trainer_config(cfg, train._trainer_args(cfg, 1, tmp_path / "ckpt", with_probe=False))
    sft_rows = rows[0][:4]
    tokenizer = load_tokenizer(base)
    train_ds, _ = train._datasets(train.METHODS["sft"], train.Inputs(base, sft_rows), tokenizer)
    _, trainer_cls = train.METHODS["sft"].classes()
    trainer = trainer_cls(
        model=load_model(base),
        args=config,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=train.peft_config(cfg),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(sft_rows))])
    for ids, labels, attention, row in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(), sft_rows, strict=True
    ):
        first = next(j for j, label in enumerate(labels) if label != -100)
        prompt = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids[:first]) == prompt  # everything before the first real label is the prompt
        real = [j for j in range(first, len(ids)) if attention[j]]
        assert [labels[j] for j in real] == [ids[j] for j in real]  # every answer token is a target
        targets = tokenizer.decode([ids[j] for j in real], skip_special_tokens=True)
        assert targets and row["messages"][1]["content"].startswith(targets)  # the answer (max_length may cut it)


def test_checkpoint_folder_changes_with_any_train_setting_seed_data_or_base(tmp_path):
    """A resume must never continue a checkpoint of another config: the folder is keyed by all of them."""
    data = (tmp_path / "train.jsonl", tmp_path / "preferences.jsonl")
    for path in data:
        path.write_text('{"id": "a"}\n')
    cfg, weights = Train(truncate=True, args=ARGS), {"model.safetensors": "aa"}
    folder = train.checkpoint_folder(cfg, 1, data, weights)
    assert folder == train.checkpoint_folder(
        Train(truncate=True, args=dict(ARGS)), 1, data, dict(weights)
    )  # same inputs
    changed = [
        train.checkpoint_folder(Train(truncate=True, args={**ARGS, "learning_rate": 1e-4}), 1, data, weights),
        train.checkpoint_folder(Train(truncate=True, args=ARGS, lora=Lora(r=4)), 1, data, weights),
        train.checkpoint_folder(cfg, 2, data, weights),
        train.checkpoint_folder(cfg, 1, data, {"model.safetensors": "bb"}),
    ]
    data[1].write_text('{"id": "b"}\n')
    changed.append(train.checkpoint_folder(cfg, 1, data, weights))
    data[1].write_text('{"id": "a"}\n')
    data[0].write_text('{"id": "a"}\n{"id": "c"}\n')
    changed.append(train.checkpoint_folder(cfg, 1, data, weights))
    assert len({folder, *changed}) == 1 + len(changed), changed


def test_same_params_same_adapter_bytes(base, rows, tmp_path):
    cfg = Train(truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args=ARGS)
    shas = []
    for run in ("a", "b"):
        train.run(
            cfg,
            5,
            train.Inputs(base, rows[0], [], []),
            train.Outputs(tmp_path / run, tmp_path / f"ckpt-{run}", tmp_path / f"{run}.csv"),
        )
        shas.append(sha256_tree(tmp_path / run / train.ADAPTER, "*.safetensors"))
    assert shas[0] == shas[1]


def test_dpo_moves_margins_towards_chosen(base, rows, tmp_path):
    import torch
    from peft import PeftModel

    from tunegate.models import load_model, load_tokenizer

    prefs = rows[1]
    cfg = Train(
        truncate=True,
        method="dpo",
        adapter="lora",
        lora=Lora(r=8, alpha=16),
        args={**ARGS, "learning_rate": 1e-2},
        dpo_args={"max_steps": 12, "beta": 0.1},
    )
    metrics = train.run(
        cfg,
        1,
        train.Inputs(base, [], prefs, []),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "p.csv"),
    )
    assert metrics["steps"] == 12  # train.dpo_args overrides train.args
    tok = load_tokenizer(base)

    def margin(model) -> float:
        total = 0.0
        for r in prefs[:16]:
            prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            scores = []
            for answer in (r["chosen"][0]["content"], r["rejected"][0]["content"]):
                ids = tok(prompt + answer + tok.eos_token, return_tensors="pt", add_special_tokens=False)["input_ids"]
                n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
                scores.append(logp[n_prompt - 1 :].sum().item())
            total += scores[0] - scores[1]
        return total / 16

    before = margin(load_model(base))
    after = margin(PeftModel.from_pretrained(load_model(base), str(tmp_path / "out" / train.ADAPTER)))
    assert after > before


def test_empty_training_set_is_refused(base, tmp_path):
    with pytest.raises(UserError, match="training set is empty"):
        train.run(
            Train(truncate=True),
            1,
            train.Inputs(base, [], [], []),
            train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
        )


def test_unknown_trainer_arg_is_named(base, rows, tmp_path):
    with pytest.raises(UserError, match="train.args: .*learnin_rate"):
        train.run(
            Train(truncate=True, args={"learnin_rate": 1e-3}),
            1,
            train.Inputs(base, rows[0], [], []),
            train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
        )


def test_preflight_refuses_a_run_that_cannot_fit(base, rows, tmp_path):
    cfg = Train(truncate=True, args={**ARGS, "per_device_train_batch_size": 100_000, "max_length": 4096})
    with pytest.raises(
        UserError, match="estimated peak memory .* exceeds .* try train.args.gradient_checkpointing: true"
    ):
        train.run(
            cfg,
            1,
            train.Inputs(base, rows[0], [], []),
            train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
        )


def resume_run(base: dict, out: Path, ckpt: Path, method: str) -> None:
    """The run the resume test kills and resumes, and runs straight through, each in a process of its own."""
    from tunegate.config import Lora, RewardSpec
    from tunegate.formats import load_source
    from tunegate.rewards import build

    rows = load_source("domain", ROOT / "data/raw/domain.jsonl")[0]
    rows = [r for r in rows if [m["role"] for m in r["messages"]] == ["user", "assistant"]][:64]
    prefs = load_source("preferences", ROOT / "data/raw/preferences.jsonl")[0]
    prefs = [r for r in prefs if r["chosen"] != r["rejected"]][:32]
    args = {"max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1}
    args |= {"save_steps": 5, "max_length": 64}
    second, rewards, extra = method.split("+")[-1], [], {}
    own = {"max_steps": 20, "beta": 0.1}
    if second == "grpo":  # 4 sampled completions per prompt, the shorter ones rewarded (the tiny base writes no JSON)
        spec = {"function": "tests.stages.test_train_methods:short_reward"}
        extra = {"grpo": {"rewards": [spec]}}
        rewards = build([RewardSpec(**spec)], ROOT / "evals/tasks")
        own = {"max_steps": 20, "num_generations": 4, "max_completion_length": 12}
    if method.startswith("sft+"):  # a chain: a short SFT phase, then its second method (its own overrides)
        phases = {f"{second}_args": own, **extra}
        cfg = Train(truncate=True, method=method, lora=Lora(r=4, alpha=8), args={**args, "max_steps": 10}, **phases)
    else:
        cfg = Train(truncate=True, method=method, adapter="lora", lora=Lora(r=4, alpha=8), args=args)
    inputs = train.Inputs(base, rows, prefs, [], rewards=rewards)
    train.run(cfg, 1, inputs, train.Outputs(out, ckpt, out.parent / (out.name + ".csv")))


def _run_in_fork(base: dict, out: Path, ckpt: Path, method: str, log: Path):
    """`resume_run` in a process of its own, forked from this one (its libraries already imported: a new
    interpreter would spend most of the test importing them again); its log goes to `log`. The child computes on
    one thread, as every run of this test does: GNU OpenMP's threads do not survive a fork."""
    import multiprocessing

    def child() -> None:
        import logging
        import sys

        import torch

        sys.stdout = sys.stderr = stream = log.open("a", buffering=1)  # not pytest's capture, inherited from here
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=stream, force=True)
        resume_run(base, out, ckpt, method)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    return proc


@pytest.mark.parametrize(
    "method, kill_at",
    [
        ("sft", "checkpoint-10"),
        ("sft", "checkpoint-1[05]/trainer_state.json"),
        ("sft+dpo", "dpo/checkpoint-10"),
        ("orpo", "checkpoint-10"),
        ("sft+kto", "kto/checkpoint-10"),
        ("sft+grpo", "grpo/checkpoint-10"),
    ],
)
@pytest.mark.heavy
def test_killed_run_resumes_to_the_same_adapter(base, tmp_path, method, kill_at):
    """SIGKILL mid-run (also while a checkpoint is being written, in ORPO, and in the second phase of the
    SFT -> DPO, SFT -> KTO and SFT -> GRPO chains), run again: it resumes from the last complete checkpoint and ends
    byte-identical to an uninterrupted run. Each run is a process of its own."""
    import time

    def start(name: str):
        return _run_in_fork(base, tmp_path / name, tmp_path / f"ckpt-{name}", method, tmp_path / f"{name}.log")

    straight = start("straight")  # the reference, beside the run that is killed
    killed = start("killed")
    deadline = time.time() + 600
    while not list((tmp_path / "ckpt-killed").glob(kill_at)) and time.time() < deadline:
        assert killed.is_alive(), (tmp_path / "killed.log").read_text()[-2000:]
        time.sleep(0.05)
    killed.kill()  # SIGKILL
    killed.join()
    assert not (tmp_path / "killed").exists()  # nothing half-written where the adapter goes
    (tmp_path / "killed.log").unlink()
    resumed = start("killed")
    for proc in (resumed, straight):
        proc.join(600)
    err = (tmp_path / "killed.log").read_text()
    assert resumed.exitcode == 0, err[-2000:]
    assert straight.exitcode == 0, (tmp_path / "straight.log").read_text()[-2000:]
    assert "resuming from" in err
    if "+" in method:
        assert "SFT phase already complete" in err
    assert sha256_tree(tmp_path / "killed" / train.ADAPTER, "*.safetensors") == sha256_tree(
        tmp_path / "straight" / train.ADAPTER, "*.safetensors"
    )
    # rows logged between the last checkpoint and the kill are not doubled in the DVC plot
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "straight.csv").read_text()


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_merged_model_matches_base_plus_adapter(base, rows, tmp_path, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunegate.models import load_model

    cfg = Train(truncate=True, adapter=adapter, lora=Lora(r=4, alpha=8), args=ARGS, merge=True)
    train.run(
        cfg,
        1,
        train.Inputs(base, rows[0], [], []),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "p.csv"),
    )
    merged_dir = tmp_path / "out" / train.MERGED
    assert (merged_dir / "model.safetensors").exists() and not list(merged_dir.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    with_adapter = PeftModel.from_pretrained(load_model(base), str(tmp_path / "out" / train.ADAPTER)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    good, cut = tmp_path / "checkpoint-5", tmp_path / "checkpoint-10"
    good.mkdir()
    (good / "trainer_state.json").write_text('{"global_step": 5}')
    cut.mkdir()
    (cut / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert train._last_checkpoint(tmp_path) == str(good)
    assert cut.exists()  # only the main process removes: the others merely skip it
    assert train._last_checkpoint(tmp_path, clean=True) == str(good)
    assert not cut.exists()


def test_probe_rise_stops_training_early(base, rows, tmp_path, caplog):
    """A learning rate far too high makes the held-out probe loss climb: the run stops and says where."""
    general = [
        r
        for r in __import__("tunegate.formats", fromlist=["load_source"]).load_source(
            "general", ROOT / "data/raw/general.jsonl"
        )[0]
        if [m["role"] for m in r.get("messages", [])] == ["user", "assistant"]
    ][:16]
    args = {
        **ARGS,
        "max_steps": 12,
        "learning_rate": 0.05,
        "eval_steps": 1,
        "save_steps": 100,
        "per_device_eval_batch_size": 16,
    }
    stopped = train.run(
        Train(truncate=True, lora=Lora(r=4, alpha=8), args=args, probe_max_rise=0.2),
        1,
        train.Inputs(base, rows[0], [], general),
        train.Outputs(tmp_path / "a", tmp_path / "ck-a", tmp_path / "a.csv"),
    )
    assert stopped["stopped_early_at"] is not None and stopped["steps"] == stopped["stopped_early_at"] < 12
    warned = [r.getMessage() for r in caplog.records if "forgetting probe loss" in r.getMessage()]
    assert (
        len(warned) == 1
        and f"stopping at step {stopped['steps']}" in warned[0]
        and "train.probe_max_rise 20%" in warned[0]
    )
    assert (tmp_path / "a" / train.ADAPTER / "adapter_model.safetensors").exists()
    full = train.run(
        Train(truncate=True, lora=Lora(r=4, alpha=8), args=args),
        1,
        train.Inputs(base, rows[0], [], general),
        train.Outputs(tmp_path / "b", tmp_path / "ck-b", tmp_path / "b.csv"),
    )
    assert full["stopped_early_at"] is None and full["steps"] == 12


@pytest.mark.parametrize(
    "train_section, message",
    [
        ({"probe_max_rise": 0}, "train.probe_max_rise: Input should be greater than 0"),
        ({"method": "dpo", "probe_max_rise": 0.25}, "train.probe_max_rise: .*SFT only"),
        ({"dpo_args": {"beta": 0.1}}, "train.dpo_args: .*only used when train.method is dpo or sft\\+dpo"),
        ({"method": "sft+dpo", "dpo_args": [0.1]}, "train.dpo_args: Input should be a valid dictionary"),
        ({"method": "dpo+sft"}, "train.method: Input should be 'sft', 'dpo', 'orpo', .* or 'sft\\+grpo'"),
        ({"method": "sft+dpo", "dpo": {"beta": 0.1}}, "train.dpo: Extra inputs are not permitted"),
    ],
)
def test_bad_train_settings_are_named(train_section, message):
    from tunegate.config import parse_config

    with pytest.raises(UserError, match=f"^params.yaml: {message}"):
        parse_config(
            {
                "data": {"sources": {"d": {"path": "x", "role": "domain"}}},
                "eval": {"tasks": ["t"]},
                "train": train_section,
            }
        )


def _dpo_margin(base, prefs, adapter) -> float:
    """Mean log-probability margin of chosen over rejected answers under base + adapter."""
    import torch
    from peft import PeftModel

    from tunegate.models import load_model, load_tokenizer

    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base), str(adapter))
    total = 0.0
    for r in prefs[:16]:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        scores = []
        for answer in (r["chosen"][0]["content"], r["rejected"][0]["content"]):
            ids = tok(prompt + answer + tok.eos_token, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            scores.append(logp[n_prompt - 1 :].sum().item())
        total += scores[0] - scores[1]
    return total / 16


def test_sft_then_dpo_continues_the_sft_adapter(base, rows, tmp_path):
    import csv

    sft_rows, prefs = rows
    lora = Lora(r=8, alpha=16)
    args = {**ARGS, "completion_only_loss": True}  # an SFT-only key: the DPO phase goes without it
    sft_only = train.run(
        Train(truncate=True, lora=lora, args=args),
        1,
        train.Inputs(base, sft_rows, [], []),
        train.Outputs(tmp_path / "sft", tmp_path / "ck1", tmp_path / "a.csv"),
    )
    cfg = Train(
        truncate=True,
        method="sft+dpo",
        lora=lora,
        args=args,
        dpo_args={"max_steps": 12, "learning_rate": 1e-2, "beta": 0.1},
    )
    chain = train.run(
        cfg,
        1,
        train.Inputs(base, sft_rows, prefs, []),
        train.Outputs(tmp_path / "chain", tmp_path / "ck2", tmp_path / "b.csv"),
    )
    assert chain["method"] == "sft+dpo" and chain["steps"] == 12 and chain["sft"]["steps"] == 4
    assert chain["sft"]["adapter_sha256"] == sft_only["adapter_sha256"]  # the same SFT phase, deterministically
    assert chain["adapter_sha256"] != sft_only["adapter_sha256"]
    assert (
        chain["sft"]["final_loss"] > 0
        and isinstance(chain["dpo_reward_margin"], float)
        and 0 <= chain["dpo_reward_accuracy"] <= 1
    )
    adapter = tmp_path / "chain" / train.ADAPTER
    assert sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []  # no leftover DPO reference adapter
    assert json.loads((tmp_path / "chain" / "train_config.json").read_text())["method"] == "sft+dpo"
    assert not (tmp_path / "ck2").exists()
    # one plot, the DPO phase's steps following the SFT phase's
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "b.csv").open())] == list(range(1, 17))
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["a.csv", "b.csv"]
    assert _dpo_margin(base, prefs, adapter) > _dpo_margin(base, prefs, tmp_path / "sft" / train.ADAPTER)


@pytest.mark.parametrize("adapter", ["dora", "qlora"])
def test_sft_then_dpo_with_other_adapters(base, rows, tmp_path, adapter):
    """The chain works for every adapter kind: one adapter out, loadable on the base, not the SFT phase's."""
    from peft import PeftModel

    from tunegate.models import load_model

    cfg = Train(
        truncate=True,
        method="sft+dpo",
        adapter=adapter,
        lora=Lora(r=4, alpha=8),
        args={**ARGS, "max_steps": 2},
        dpo_args={"max_steps": 2, "learning_rate": 1e-2},
    )
    chain = train.run(
        cfg,
        1,
        train.Inputs(base, rows[0], rows[1], []),
        train.Outputs(tmp_path / "out", tmp_path / "ck", tmp_path / "p.csv"),
    )
    assert (
        chain["steps"] == 2 and chain["sft"]["steps"] == 2 and chain["adapter_sha256"] != chain["sft"]["adapter_sha256"]
    )
    saved = tmp_path / "out" / train.ADAPTER
    assert [p.name for p in saved.iterdir() if p.is_dir()] == []
    assert json.loads((saved / "adapter_config.json").read_text())["use_dora"] is (adapter == "dora")
    model = PeftModel.from_pretrained(load_model(base), str(saved))
    assert list(model.peft_config) == ["default"]


def test_sft_then_dpo_checks_the_dpo_settings_before_training(base, rows, tmp_path):
    """A typo in dpo_args (or an SFT-only key there) stops the chain before the SFT phase spends anything."""
    for dpo_args, bad in (({"bta": 0.1}, "bta"), ({"packing": True}, "packing")):
        cfg = Train(truncate=True, method="sft+dpo", args=ARGS, dpo_args=dpo_args)
        with pytest.raises(UserError, match=f"train.args / train.dpo_args: .*'{bad}'"):
            train.run(
                cfg,
                1,
                train.Inputs(base, rows[0], rows[1], []),
                train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
            )
    assert not (tmp_path / "c").exists() and not (tmp_path / "p.csv").exists()


def test_sft_then_dpo_needs_an_adapter_and_preferences(base, rows, tmp_path):
    with pytest.raises(UserError, match="train.method sft\\+dpo: needs an adapter"):
        train.run(
            Train(truncate=True, method="sft+dpo", adapter="full", args=ARGS),
            1,
            train.Inputs(base, rows[0], rows[1], []),
            train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
        )
    with pytest.raises(UserError, match="no preference rows"):
        train.run(
            Train(truncate=True, method="sft+dpo", args=ARGS),
            1,
            train.Inputs(base, rows[0], [], []),
            train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv"),
        )


def test_missing_mixed_data_stops_in_one_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == "tunegate train: error: data/mix/train.jsonl: missing; run the mix stage first (dvc repro mix)"
    )


def test_tokens_per_second_are_logged_apart_from_the_tracked_plot(base, rows, tmp_path):
    import csv

    train.run(
        Train(truncate=True, lora=Lora(r=4, alpha=8), args=ARGS),
        1,
        train.Inputs(base, rows[0], [], []),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "train.csv", speed_path=tmp_path / "speed.csv"),
    )
    speed = list(csv.DictReader((tmp_path / "speed.csv").open()))
    assert len(speed) == ARGS["max_steps"] - 1 and all(float(r["tokens_per_second"]) > 0 for r in speed)
    assert [int(r["tokens"]) for r in speed] == sorted(int(r["tokens"]) for r in speed)
    assert "tokens" not in (tmp_path / "train.csv").read_text().splitlines()[0]  # the DVC plot holds no timings


def test_plot_rows_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """A resumed run logs again the steps between its checkpoint and the kill: the plot keeps one copy."""
    from types import SimpleNamespace

    plot = tmp_path / "train.csv"
    plot.write_text("step,loss,learning_rate,grad_norm,probe_loss\n" + "".join(f"{i},1.0,,,\n" for i in range(1, 9)))
    train._plot_callback(plot).on_train_begin(None, SimpleNamespace(global_step=5, is_world_process_zero=True), None)
    assert [line.split(",")[0] for line in plot.read_text().splitlines()] == ["step", "1", "2", "3", "4", "5"]
    # the DPO phase of sft+dpo, resumed at its step 1, continues after the SFT phase's 3 steps
    train._plot_callback(plot, step_offset=3).on_train_begin(
        None, SimpleNamespace(global_step=1, is_world_process_zero=True), None
    )
    assert [line.split(",")[0] for line in plot.read_text().splitlines()] == ["step", "1", "2", "3", "4"]
    train._plot_callback(plot).on_train_begin(None, SimpleNamespace(global_step=0, is_world_process_zero=True), None)
    assert plot.read_text() == "step,loss,learning_rate,grad_norm,probe_loss\n"  # a fresh run starts a fresh plot


def _project(tmp_path: Path, base: dict, rows: list, launch: dict, args: dict) -> Path:
    """A project folder the train stage's main() runs in: params.yaml, the base and the mixed data."""
    import shutil

    import yaml

    from tunegate.io import write_json, write_jsonl

    project = tmp_path / "project"
    shutil.copytree(base["path"], project / "models/base")
    write_json(project / "models/base/base.json", {**base, "path": "."})
    for name, data in (("train", rows[0]), ("preferences", []), ("probe", [])):
        write_jsonl(project / f"data/mix/{name}.jsonl", data)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(lora={"r": 4, "alpha": 8}, args=args, launch=launch, truncate=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def _stage(project: Path, **popen):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=env, text=True, **popen)


@pytest.mark.heavy
def test_two_processes_through_train_launch_write_one_adapter_and_resume_after_a_kill(base, rows, tmp_path):
    """train.launch: {processes: 2} runs the stage under `accelerate launch` (gloo on CPU): one adapter,
    written by the main process only, loadable; the effective batch counts both processes; a killed
    2-process run resumes from its last checkpoint."""
    import signal
    import subprocess

    from peft import PeftModel

    from tunegate.models import load_model

    args = {**ARGS, "max_steps": 12, "save_steps": 3}
    launch = {"processes": 2, "config": str(ROOT / "infra/accelerate/multi_gpu.yaml")}
    project = _project(tmp_path, base, rows, launch, args)
    killed = _stage(project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = project / "checkpoints"
    deadline = time.time() + 600
    while not list(ckpts.glob("train-*/checkpoint-6/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.1)
    import psutil  # the training processes run in sessions of their own: kill the whole tree, as a crash would

    for proc in [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (project / "models/candidate").exists()

    resumed = _stage(project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and "2 processes" in out
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 12
    assert metrics["effective_batch_size"] == 2 * args["per_device_train_batch_size"]
    assert metrics["resumed_from"] == "checkpoint-6"
    adapters = sorted(p.relative_to(project) for p in project.rglob("adapter_model.safetensors"))
    assert adapters == [Path("models/candidate/adapter/adapter_model.safetensors")]  # one, and no partial copies
    assert not list((project / "models").glob(".*partial*")) and not list(ckpts.glob("train-*"))
    PeftModel.from_pretrained(
        load_model({"path": str(project / "models/base")}), str(project / "models/candidate/adapter")
    )


def test_saved_configs_do_not_depend_on_the_hash_seed_or_offline_mode(tmp_path):
    """PEFT writes target_modules from a set (order = the process's hash seed) and transformers records
    local_files_only: either would make two identical runs' outputs differ for DVC."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "k_proj", "q_proj"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"local_files_only": True, "model_max_length": 9}))
    train._portable(tmp_path, "models/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["target_modules"] == ["k_proj", "q_proj", "v_proj"]
        and config["base_model_name_or_path"] == "models/base"
    )
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"model_max_length": 9}


@pytest.mark.parametrize(
    "method, sft, pairs, refused",
    [("sft", 31, 0, "sft has 31 training rows"), ("dpo", 0, 10, "dpo has 10 preference pairs"),
     ("sft+dpo", 400, 5, "dpo has 5 preference pairs"), ("sft+dpo", 400, 40, None), ("sft", 32, 0, None)],
)  # fmt: skip
def test_too_few_rows_for_the_method_stop_the_stage_naming_the_sources(method, sft, pairs, refused):
    from stages.train import Inputs, enough_rows, loss_line
    from tunegate.config import Train
    from tunegate.errors import UserError
    from tunegate.methods import METHODS

    data = Inputs(
        manifest={},
        train_rows=[{"source": "domain" if i % 4 else "general"} for i in range(sft)],
        pref_rows=[{"source": "prefs"} for _ in range(pairs)],
    )
    if refused is None:
        enough_rows(Train(method=method), data)
    else:
        with pytest.raises(UserError) as err:
            enough_rows(Train(method=method), data)
        assert refused in str(err.value) and "fewer than min_rows 32" in str(err.value) and "\n" not in str(err.value)
        assert "from prefs" in str(err.value) or "from domain" in str(err.value)
    if all(data.pref_rows if m.preference else data.train_rows for m in METHODS[method].needs()):
        enough_rows(Train(method=method, min_rows=1), data)  # train.min_rows lowers the floor
    assert loss_line({"final_loss": None, "train_loss": 0.6931}).startswith("mean loss 0.693 (no step logged")
    assert loss_line({"final_loss": 0.25, "train_loss": 0.4}) == "loss 0.250"


def test_labelled_answers_count_for_kto_and_are_named_when_dpo_lacks_pairs():
    from stages.train import Inputs, enough_rows
    from tunegate.config import Train
    from tunegate.errors import UserError

    labelled = [{"source": "feedback", "kind": "unpaired", "label": i % 2 == 0} for i in range(40)]
    data = Inputs(manifest={}, train_rows=[], pref_rows=[*labelled, {"source": "prefs", "kind": "preference"}])
    enough_rows(Train(method="kto"), data)  # 41: 40 labelled answers and one pair
    with pytest.raises(UserError, match=r"dpo has 1 preference pairs \(1 from prefs\).*the 40 labelled answers are "
                       r"read by kto only"):  # fmt: skip
        enough_rows(Train(method="dpo"), data)


@pytest.mark.parametrize("rows_packed", [False, True], ids=["padding-free", "rows"])
def test_packed_batches_keep_rows_apart_and_their_answer_masks(base, rows, tmp_path, rows_packed):
    """Packing (TRL's best-fit decreasing) in both layouts: one padding-free sequence per batch (TRL's, for flash
    attention), or the packed sequences as separate, right-padded batch rows (tunegate.methods.row_packed_batch,
    for SDPA and eager). Either way a packed batch computes, for each row in it, exactly the logits and the loss of
    that row alone (no row attends to another: transformers builds the document mask from the restarting position
    ids, since TRL trains with the cache off), every trained token is an answer token of that row, and the tokens
    counted are the rows' own."""
    import torch

    from tunegate.models import load_model, load_tokenizer

    cfg = Train(
        truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args={**ARGS, "packing": True, "max_length": 256}
    )
    config = train._trainer_config(cfg, train._trainer_args(cfg, 1, tmp_path / "ckpt", with_probe=False))
    sft_rows = rows[0][:24]
    tokenizer = load_tokenizer(base)
    train_ds, _ = train._datasets(train.METHODS["sft"], train.Inputs(base, sft_rows), tokenizer, config.to_dict())
    _, trainer_cls = train.METHODS["sft"].classes()
    trainer = trainer_cls(
        model=load_model(base), args=config, train_dataset=train_ds, processing_class=tokenizer, rows_packed=rows_packed
    )
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    assert "attention_mask" not in batch
    lengths = [e["seq_lengths"] for e in examples]
    if rows_packed:  # one batch row per packed sequence, right-padded to the longest
        assert batch["input_ids"].shape == (3, max(sum(n) for n in lengths))
        assert int(batch.pop("packed_tokens")) == sum(map(sum, lengths))
    else:  # the whole batch in one sequence
        assert batch["input_ids"].shape[0] == 1 and "packed_tokens" not in batch
        lengths = [[n for ns in lengths for n in ns]]
    model = trainer.model.eval()
    answers = {r["messages"][1]["content"] for r in sft_rows}
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    segments = 0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, seq_lengths in enumerate(lengths):
            ends = list(itertools.accumulate(seq_lengths))
            for a, b in zip([0, *ends[:-1]], ends, strict=True):
                segments += 1
                ids, labels = batch["input_ids"][row : row + 1, a:b], batch["labels"][row, a:b]
                alone = model(input_ids=ids, use_cache=False).logits[0]
                assert torch.allclose(packed[row, a:b], alone, atol=1e-5), (row, a, b)
                row_loss = loss(alone[:-1], labels[1:]), loss(packed[row, a : b - 1], labels[1:])
                assert torch.isclose(*row_loss, rtol=1e-5)
                trained = tokenizer.decode([t for t in labels.tolist() if t != -100], skip_special_tokens=True)
                assert trained.strip() in answers  # the row's answer, and nothing of its prompt
    assert segments > 3  # several rows per packed sequence


def test_rows_packed_by_the_stage_count_the_real_tokens_and_are_recorded(base, rows, tmp_path):
    """`train.packing: true` on CPU (SDPA) packs in rows no longer than the longest row (short rows fill the room
    long ones leave); an epoch's logged token count is exactly the training rows' tokens (TRL would count a batch
    without an attention mask by its width), in fewer batches than unpacked; the layout is in the metrics and in
    the version's provenance."""
    from tunegate import provenance
    from tunegate.config import load_config
    from tunegate.models import load_tokenizer

    short = [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
        for i in range(16)
    ]
    data = rows[0][:32] + short
    args = {k: v for k, v in ARGS.items() if k != "max_steps"} | {"num_train_epochs": 1, "max_length": 256}
    cfg = Train(packing=True, truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args=args)
    out = train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots.csv")
    metrics = train.run(cfg, 1, train.Inputs(base, data), out)
    assert metrics["packing"] is True and metrics["packing_layout"] == "rows"
    examples, _ = train.sft_examples(data, load_tokenizer(base))
    assert metrics["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert metrics["steps"] < len(examples) / ARGS["per_device_train_batch_size"]
    base_record = {"model": "demo", "resolved_revision": "r", "weights_sha256": {}, "tokenizer_sha256": {}}
    mix = {"train_sha256": "t", "rows": 1, "by": "tokens", "general_share_tokens": 0.2, "sources": {}}
    passed = {"passed": True, "failed": []}
    params = load_config(ROOT / "params.yaml")
    assert provenance.record(params, base_record, mix, passed, {}, "f", metrics)[provenance.PACKED] == "rows"
    unpacked = provenance.record(params, base_record, mix, passed, {}, "f", {"packing": False})
    assert unpacked[provenance.PACKED] == "false"


def test_rows_are_packed_no_longer_than_the_longest_row():
    """The packed sequences' length: the longest row of the training and probe sets, within max_length."""
    from types import SimpleNamespace

    from datasets import Dataset

    sets = [Dataset.from_dict({"input_ids": [[1] * 30, [1] * 12]}), None, Dataset.from_dict({"input_ids": [[1] * 41]})]
    for limit, packed in ((256, 41), (35, 35), (None, 41)):
        args = SimpleNamespace(max_length=limit)
        train._pack_to_longest(args, *sets)
        assert args.max_length == packed


@pytest.mark.parametrize("setting, plan, packed", [("auto", True, True), ("auto", False, False), (True, False, True)])
def test_packing_auto_packs_only_where_it_is_exact(base, rows, tmp_path, monkeypatch, setting, plan, packed):
    """`train.packing: auto` asks the loaded model (tunegate.training.packing_plan) and says what it decided; `true`
    packs regardless. The tiny base is exact and runs SDPA on CPU: auto packs it in rows with block-diagonal
    masks; the same model given flash attention gets one padding-free sequence per batch."""
    from tunegate import training

    model = load_model_for(base)
    assert training.packing_exact(model)  # the real check on the real (tiny) model
    on, why = training.packing_plan(model)
    assert on and "rows packed with block-diagonal masks for sdpa attention" in why
    assert training.packing_layout(model) == training.ROWS
    from types import SimpleNamespace

    with monkeypatch.context() as patched:  # the same (exact) model with flash attention: the decision only
        patched.setattr(training, "packing_exact", lambda model: True)
        flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
        assert training.packing_plan(flash)[0] and training.packing_layout(flash) == training.PADDING_FREE
    monkeypatch.setattr(training, "packing_plan", lambda model: (plan, "decided"))
    cfg = Train(
        packing=setting, truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args={**ARGS, "max_length": 256}
    )
    out = train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots.csv")
    metrics = train.run(cfg, 1, train.Inputs(base, rows[0][:32]), out)
    assert metrics["packing"] is packed and metrics["packing_layout"] == ("rows" if packed else None)


@pytest.mark.parametrize("setting, used", [("auto", "sdpa"), ("eager", "eager")])
def test_attention_and_kernels_are_chosen_said_and_recorded(base, rows, tmp_path, caplog, setting, used):
    """`train.attn_implementation` loads the model with that attention (auto on CPU: transformers' choice, SDPA)
    and `train.kernels: auto` leaves Liger off on CPU; both decisions are said in one line each and recorded in the
    metrics the registry's provenance reads."""
    cfg = Train(attn_implementation=setting, truncate=True, adapter="lora", lora=Lora(r=4, alpha=8), args=ARGS)
    out = train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots.csv")
    with caplog.at_level("INFO", logger="stages.train"):
        metrics = train.run(cfg, 1, train.Inputs(base, rows[0][:32]), out)
    assert metrics["attn_implementation"] == used and metrics["liger_kernels"] is False
    said = [r.getMessage() for r in caplog.records if r.name == "stages.train"]
    assert f"train: attention {used} (" in "\n".join(said), said
    assert "train: Liger kernels off (auto: Liger's kernels run on CUDA only)" in said


def test_flash_attention_where_it_cannot_run_is_refused_before_the_model_loads(base, rows, tmp_path, monkeypatch):
    from tunegate import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = Train(attn_implementation="flash_attention_2", truncate=True, adapter="lora", args=ARGS)
    out = train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "plots.csv")
    with pytest.raises(UserError, match="^train.attn_implementation flash_attention_2: needs a CUDA device"):
        train.run(cfg, 1, train.Inputs(base, rows[0][:32]), out)


def load_model_for(manifest):
    from tunegate.models import load_model

    return load_model(manifest)


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_a_row_the_template_refuses_stops_train_in_one_line_naming_it(tokenizer, monkeypatch, kind):
    """Validate quarantines such rows; one that reaches train anyway (a file edited by hand) is named, not a
    traceback from inside the template."""
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    turns = [{"role": "user", "content": "Where is my parcel?"}]
    answer = [{"role": "assistant", "content": "On its way."}]
    row = {"id": "domain-0a1b2c3d4e5f", "source": "domain", "line": 7}
    with pytest.raises(UserError, match=r"^the chat template refuses the row from domain line 7 \(id domain-0a1b2c"):
        if kind == "sft":
            train.sft_examples([{**row, "messages": turns + answer}], tokenizer)
        else:
            train.preference_examples([{**row, "prompt": turns, "chosen": answer, "rejected": answer}], tokenizer)
