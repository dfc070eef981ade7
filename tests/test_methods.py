"""The methods table: every `train.method` the config accepts is a row, and what a row says decides the
stage's data, the trainer arguments, the preflight's memory terms and the config's checks."""

from __future__ import annotations

import typing
from dataclasses import replace

import pytest

from tunegate.config import Train
from tunegate.methods import METHODS


def test_the_config_accepts_exactly_the_methods_of_the_table():
    assert set(typing.get_args(Train.model_fields["method"].annotation)) == set(METHODS)


def test_each_row_says_what_it_trains_on_and_what_it_holds_in_memory():
    sft, dpo, orpo, kto, grpo = (METHODS[m] for m in ("sft", "dpo", "orpo", "kto", "grpo"))
    assert (sft.preference, sft.probe, sft.sequences_per_row, sft.logits_factor) == (False, True, 1, 1.0)
    assert (dpo.preference, dpo.probe, dpo.sequences_per_row, dpo.logits_factor) == (True, False, 2, 1.5)
    assert orpo.preference and not orpo.reference and not orpo.unpaired  # no reference model: ORPO's point
    assert kto.preference and kto.reference and kto.unpaired  # pairs read as desirable / undesirable rows
    assert grpo.rewarded and not grpo.preference and not grpo.reference  # its reference: only with beta > 0
    assert grpo.plot_fields == ("reward", "reward_std") and not any(m.rewarded for m in (sft, dpo, orpo, kto))
    assert [m.args_field for m in (sft, dpo, orpo, kto, grpo)] == [
        None,
        "dpo_args",
        "orpo_args",
        "kto_args",
        "grpo_args",
    ]
    for name, second in (("sft+dpo", dpo), ("sft+kto", kto), ("sft+grpo", grpo)):
        chain = METHODS[name]
        assert chain.phases == ("sft", second.name) and chain.classes is None and chain.needs_adapter
        assert chain.first() is sft and chain.last is second  # plans its memory as SFT, finishes as the second
        assert chain.args_fields == (second.args_field,) and chain.runs_probe
    assert sft.first() is sft and sft.last is sft
    assert all(set(m.phases) <= set(METHODS) for m in METHODS.values())
    assert set(Train.model_fields) >= {m.args_field for m in METHODS.values() if m.args_field}


@pytest.mark.parametrize(
    "method, field, value, allowed",
    [
        ("sft", "dpo_args", {"beta": 0.1}, False),
        ("dpo", "dpo_args", {"beta": 0.1}, True),
        ("sft+dpo", "dpo_args", {"beta": 0.1}, True),
        ("orpo", "dpo_args", {"beta": 0.1}, False),
        ("orpo", "orpo_args", {"beta": 0.1}, True),
        ("dpo", "orpo_args", {"beta": 0.1}, False),
        ("kto", "kto_args", {"desirable_weight": 1.3}, True),
        ("sft+kto", "kto_args", {"beta": 0.1}, True),
        ("sft+kto", "dpo_args", {"beta": 0.1}, False),
        ("kto", "probe_max_rise", 0.25, False),
        ("sft+kto", "probe_max_rise", 0.25, True),
        ("dpo", "probe_max_rise", 0.25, False),
        ("sft", "probe_max_rise", 0.25, True),
        ("sft+dpo", "probe_max_rise", 0.25, True),
    ],
)
def test_a_setting_the_method_would_ignore_is_refused(method, field, value, allowed):
    from pydantic import ValidationError

    settings = {"method": method, "adapter": "lora", "args": {}, field: value}
    if allowed:
        assert getattr(Train.model_validate(settings), field) == value
    else:
        with pytest.raises(ValidationError, match=field):
            Train.model_validate(settings)


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_preflight_counts_both_sequences_of_a_preference_row(method):
    from tests.test_preflight import LLAMA_8B
    from tunegate.preflight import Plan, estimate

    sft = estimate(LLAMA_8B, Plan("lora", 40_000_000, 2, 512, method="sft"))
    pref = estimate(LLAMA_8B, Plan("lora", 40_000_000, 2, 512, method=method))
    assert pref["activations"] > 1.9 * sft["activations"] and pref["weights"] == sft["weights"]


@pytest.mark.parametrize("method, copies", [("sft", 1), ("orpo", 1), ("dpo", 2), ("kto", 2)])
def test_preflight_holds_a_frozen_reference_copy_only_for_a_full_model_scored_against_one(method, copies):
    from tests.test_preflight import LLAMA_8B
    from tunegate.preflight import Plan, estimate

    full = estimate(LLAMA_8B, Plan("full", LLAMA_8B.params, 1, 512, weights_16bit=True, method=method))
    lora = estimate(LLAMA_8B, Plan("lora", 40_000_000, 1, 512, weights_16bit=True, method=method))
    one = estimate(LLAMA_8B, Plan("full", LLAMA_8B.params, 1, 512, weights_16bit=True, method="sft"))["weights"]
    assert full["weights"] == pytest.approx(copies * one) and lora["weights"] == pytest.approx(one)


def test_preflight_counts_grpos_generation_batch_and_its_reference_only_with_kl():
    from tests.test_preflight import LLAMA_8B
    from tunegate.preflight import Plan, estimate

    base = Plan("lora", 40_000_000, 8, 512 + 256, weights_16bit=True, method="grpo")
    sampled = estimate(LLAMA_8B, Plan("lora", 40_000_000, 8, 512 + 256, weights_16bit=True, method="grpo", generated=8))
    more = estimate(LLAMA_8B, Plan("lora", 40_000_000, 8, 512 + 256, weights_16bit=True, method="grpo", generated=16))
    cache = sampled["activations"] - estimate(LLAMA_8B, base)["activations"]
    _, kv, dim = LLAMA_8B._heads()
    assert cache == pytest.approx(8 * 768 * LLAMA_8B.layers * 2 * kv * dim * 2 * 1.10)  # K and V, bf16, margin
    assert more["activations"] - sampled["activations"] == pytest.approx(cache)
    full = Plan("full", LLAMA_8B.params, 1, 512, weights_16bit=True, method="grpo")
    assert estimate(LLAMA_8B, replace(full, kl=True))["weights"] == pytest.approx(
        2 * estimate(LLAMA_8B, full)["weights"]
    )


def test_the_plan_of_a_grpo_chain_is_its_larger_phase():
    from tests.test_preflight import LLAMA_8B
    from tunegate.preflight import estimate
    from tunegate.training import largest_plan, plan

    cfg = Train.model_validate(
        {
            "method": "sft+grpo",
            "args": {"per_device_train_batch_size": 8, "max_length": 512},
            "grpo_args": {"max_completion_length": 1024, "num_generations": 8},
            "grpo": {"rewards": [{"format": "json"}]},
        }
    )
    chosen = largest_plan(cfg, dict(cfg.args), LLAMA_8B)
    assert chosen.method == "grpo" and chosen.seq == 512 + 1024 and chosen.generated == 8
    assert estimate(LLAMA_8B, chosen)["total"] > estimate(LLAMA_8B, plan(cfg, dict(cfg.args), LLAMA_8B))["total"]
