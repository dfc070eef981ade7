"""The preference methods beyond DPO on a tiny demo base: ORPO (no reference model), KTO (unpaired rows, from the
demo's pairs) and the SFT -> KTO chain each move the answers the way their data says, log their own metrics, and
read the rows exactly as tokenised for DPO."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from stages import train
from tests.conftest import ROOT
from tests.stages.test_train import ARGS, _dpo_margin, base, rows  # noqa: F401 - module fixtures, shared
from tunegate.config import Lora, Train
from tunegate.methods import METHODS


@pytest.fixture(scope="module")
def zero_margin(base, rows, tmp_path_factory):  # noqa: F811
    """The chosen-over-rejected margin of the base itself (an adapter that has not moved)."""
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model

    folder = tmp_path_factory.mktemp("untrained")
    get_peft_model(load_model(base), LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")).save_pretrained(folder)
    return _dpo_margin(base, rows[1], folder)


@pytest.mark.parametrize(
    "method, logged",
    [
        ("orpo", {"orpo_reward_margin", "orpo_reward_accuracy", "orpo_log_odds_ratio"}),
        ("kto", {"kto_reward_chosen", "kto_reward_rejected"}),
        ("sft+kto", {"kto_reward_chosen", "kto_reward_rejected"}),
    ],
)
def test_each_method_moves_the_margin_towards_chosen(base, rows, tmp_path, zero_margin, method, logged):  # noqa: F811
    sft_rows, prefs = rows
    cfg = Train(
        truncate=True, method=method, lora=Lora(r=8, alpha=16), args={**ARGS, "max_steps": 12, "learning_rate": 1e-2}
    )
    metrics = train.run(
        cfg,
        1,
        train.Inputs(base, sft_rows, prefs, []),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "p.csv"),
    )
    assert metrics["method"] == method and metrics["steps"] == 12 and logged <= set(metrics), metrics
    if method != "orpo":  # KTO: desirable answers rewarded above undesirable ones
        assert metrics["kto_reward_chosen"] > metrics["kto_reward_rejected"]
    assert _dpo_margin(base, prefs, tmp_path / "out" / train.ADAPTER) > zero_margin + 1.0
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["method"] == method
    adapter = tmp_path / "out" / train.ADAPTER
    assert [p.name for p in adapter.iterdir() if p.is_dir()] == []  # no reference adapter left behind


def test_kto_reads_each_pair_as_one_desirable_and_one_undesirable_row_in_a_seeded_order():
    pairs = [{"prompt_ids": [i], "chosen_ids": [100 + i], "rejected_ids": [200 + i]} for i in range(40)]
    unpaired = train.unpaired_examples(pairs, seed=1)
    assert len(unpaired) == 80
    for pair in pairs:
        mine = [r for r in unpaired if r["prompt_ids"] == pair["prompt_ids"]]
        assert sorted((r["completion_ids"], r["label"]) for r in mine) == [
            (pair["chosen_ids"], True),
            (pair["rejected_ids"], False),
        ]
    assert unpaired == train.unpaired_examples(pairs, seed=1) and unpaired != train.unpaired_examples(pairs, seed=2)
    first_batch = {r["label"] for r in unpaired[:8]}
    assert first_batch == {True, False}  # KTO reads in order: batches mix both labels


def test_labelled_answers_from_a_file_train_exactly_the_model_the_pairs_train(base, rows, tmp_path):  # noqa: F811
    """KTO's own layout (TRL's prompt/completion/label rows, read through tunegate.formats like any source) is the
    pairs' unpaired rows written out: the same examples in the same seeded order, so the same adapter, byte for
    byte. DPO given the same file trains on no labelled answer (it needs pairs)."""
    from safetensors.torch import load_file

    from tunegate.formats import load_source

    _, prefs = rows
    lines = [
        json.dumps({"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"})
        for pair in prefs
        for side in ("chosen", "rejected")
    ]
    (tmp_path / "feedback.jsonl").write_text("\n".join(lines) + "\n")
    labelled, problems, fmt = load_source("feedback", tmp_path / "feedback.jsonl")
    assert fmt == "unpaired" and not problems and {r["kind"] for r in labelled} == {"unpaired"}
    cfg = Train(truncate=True, method="kto", lora=Lora(r=8, alpha=16), args={**ARGS, "max_steps": 6})
    adapters = []
    for name, pref_rows in (("pairs", prefs), ("labelled", labelled)):
        out = tmp_path / name
        train.run(cfg, 1, train.Inputs(base, [], pref_rows, []), train.Outputs(out, out / "ckpt", out / "p.csv"))
        adapters.append(load_file(out / train.ADAPTER / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[0][k].equal(adapters[1][k]) for k in adapters[0])
    both = train.Inputs(base, [], prefs + labelled, [])
    assert both.rows_for(METHODS["dpo"]) == prefs and both.rows_for(METHODS["kto"]) == prefs + labelled


def test_orpo_trains_on_the_answer_tokens_only_and_cuts_answers_not_prompts(base):  # noqa: F811
    from tunegate.methods import METHODS

    _, trainer_cls = METHODS["orpo"].classes()
    trainer = trainer_cls.__new__(trainer_cls)  # tokenize_row reads max_length only
    trainer.max_length = 8
    row = trainer.tokenize_row({"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9, 10, 11]})
    assert row["chosen_input_ids"] == [1, 2, 3, 4, 5] and row["chosen_labels"] == [-100, -100, -100, 4, 5]
    assert row["rejected_input_ids"] == [1, 2, 3, 6, 7, 8, 9, 10]  # cut to max_length from the answer's end
    assert row["rejected_labels"] == [-100, -100, -100, 6, 7, 8, 9, 10]
    assert row["prompt_input_ids"] == [1, 2, 3] and row["chosen_attention_mask"] == [1] * 5


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_a_typo_in_the_methods_own_overrides_is_named_before_any_weights_load(method, tmp_path):
    field = f"{method}_args"
    cfg = Train(truncate=True, method=method, args=ARGS, **{field: {"bta": 0.1}})
    from tunegate.errors import UserError

    with pytest.raises(UserError, match=rf"train.args / train.{field}: .*bta"):
        train._trainer_config(cfg, train._trainer_args(cfg, 1, tmp_path, False))


def short_reward(prompt, completion, reference) -> float:
    """A reward the tiny base can earn (it writes no JSON): shorter completions, up to 60 characters."""
    return 1.0 - min(len(completion), 60) / 60


def test_grpo_raises_the_reward_it_is_given(base, rows, tmp_path):  # noqa: F811
    """12 GRPO steps, 4 completions sampled per prompt: the logged mean reward of the last third of the steps is
    above the first third's (CPU training is deterministic: the same numbers every run). `packing: auto` (what
    `tunegate init` writes) packs SFT rows only: GRPO trains its sampled completions unpacked."""
    from tunegate.config import RewardSpec
    from tunegate.rewards import build

    spec = {"function": "tests.stages.test_train_methods:short_reward"}
    cfg = Train(
        truncate=True,
        method="grpo",
        lora=Lora(r=8, alpha=16),
        args={**ARGS, "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 1e-2},
        grpo_args={"num_generations": 4, "max_completion_length": 16},
        grpo={"rewards": [spec]},
        packing="auto",
    )
    plot = tmp_path / "p.csv"
    metrics = train.run(
        cfg,
        1,
        train.Inputs(base, rows[0], [], [], rewards=build([RewardSpec(**spec)], ROOT / "evals/tasks")),
        train.Outputs(
            tmp_path / "out", tmp_path / "ckpt", plot, plot_fields=train.PLOT_FIELDS + ("reward", "reward_std")
        ),
    )
    logged = [float(r["reward"]) for r in csv.DictReader(plot.open())]
    assert len(logged) == 12 and metrics["grpo_reward_first"] == pytest.approx(logged[0], abs=1e-4)
    assert sum(logged[-4:]) / 4 > sum(logged[:4]) / 4 + 0.02, logged
    assert set(metrics["grpo_rewards"]) == {spec["function"]} and metrics["reward_errors"] == {}
    assert len(metrics["reward_code"][spec["function"]]) == 64
    assert metrics["packing"] is False and metrics["packing_layout"] is None


def test_grpo_prompts_are_the_conversation_before_its_last_answer_and_that_answer_the_reference():
    conversations = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
                {"role": "user", "content": "q3"},
                {"role": "assistant", "content": "a3"},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "tools": [{}]},
    ]
    prompts, skipped = train.prompt_examples(conversations)
    assert skipped == 2  # a tool call for an answer, and a row with tools: no text to compare with
    assert [p["reference"] for p in prompts] == ["a1", "a3"]
    assert [m["content"] for m in prompts[1]["prompt"]] == ["s", "q2", "a2", "q3"]


def test_grpo_with_vllm_is_refused_in_one_line_where_it_cannot_run(base, rows, tmp_path):  # noqa: F811
    import torch

    from tunegate.errors import UserError

    if torch.cuda.is_available() and importlib.util.find_spec("vllm"):
        pytest.skip("a CUDA device and vLLM are here: test_grpo_generates_with_vllm_on_cuda runs instead")
    grpo = {"rewards": [{"format": "json"}]}
    cfg = Train(truncate=True, method="grpo", args=ARGS, grpo_args={"use_vllm": True, "num_generations": 4}, grpo=grpo)
    out = train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "p.csv")
    with pytest.raises(UserError, match=r"train.grpo_args.use_vllm: vLLM needs .*use_vllm: false"):
        train._check(cfg, 1, train.Inputs(base, rows[0], []), out)


@pytest.mark.skipif(
    not (importlib.util.find_spec("vllm") and __import__("torch").cuda.is_available()),
    reason="GRPO generating with vLLM needs a CUDA device and vLLM installed (none here; run on a GPU machine)",
)
def test_grpo_generates_with_vllm_on_cuda(base, rows, tmp_path):  # noqa: F811
    """`use_vllm` with vLLM colocated in the training process: the steps run and the reward is logged."""
    cfg = Train(
        method="grpo",
        grpo={"rewards": [{"function": "tests.stages.test_train_methods:short_reward"}]},
        truncate=True,
        args={**ARGS, "max_steps": 4, "per_device_train_batch_size": 8},
        grpo_args={
            "use_vllm": True,
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": 0.2,
            "num_generations": 4,
            "max_completion_length": 12,
        },
    )
    from tunegate.config import RewardSpec
    from tunegate.rewards import build

    rewards = build([RewardSpec(function="tests.stages.test_train_methods:short_reward")], ROOT / "evals/tasks")
    metrics = train.run(
        cfg,
        1,
        train.Inputs(base, rows[0], [], [], rewards=rewards),
        train.Outputs(tmp_path / "out", tmp_path / "ckpt", tmp_path / "p.csv"),
    )
    assert metrics["steps"] == 4 and "grpo_reward_last" in metrics
