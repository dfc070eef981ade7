"""The methods table: every `train.method` the config accepts is a row, and what a row says decides the
stage's data, the trainer arguments, the preflight's memory terms and the config's checks."""

from __future__ import annotations

import typing

import pytest

from tunegate.config import Train
from tunegate.methods import METHODS


def test_the_config_accepts_exactly_the_methods_of_the_table():
    assert set(typing.get_args(Train.model_fields["method"].annotation)) == set(METHODS)


def test_each_row_says_what_it_trains_on_and_what_it_holds_in_memory():
    sft, dpo, orpo, kto = (METHODS[m] for m in ("sft", "dpo", "orpo", "kto"))
    assert (sft.preference, sft.probe, sft.sequences_per_row, sft.logits_factor) == (False, True, 1, 1.0)
    assert (dpo.preference, dpo.probe, dpo.sequences_per_row, dpo.logits_factor) == (True, False, 2, 1.5)
    assert orpo.preference and not orpo.reference and not orpo.unpaired  # no reference model: ORPO's point
    assert kto.preference and kto.reference and kto.unpaired  # pairs read as desirable / undesirable rows
    assert [m.args_field for m in (sft, dpo, orpo, kto)] == [None, "dpo_args", "orpo_args", "kto_args"]
    for name, second in (("sft+dpo", dpo), ("sft+kto", kto)):
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
