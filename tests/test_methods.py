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
    sft, dpo, chain = METHODS["sft"], METHODS["dpo"], METHODS["sft+dpo"]
    assert (sft.preference, sft.probe, sft.sequences_per_row, sft.logits_factor) == (False, True, 1, 1.0)
    assert (dpo.preference, dpo.probe, dpo.sequences_per_row, dpo.logits_factor) == (True, False, 2, 1.5)
    assert chain.phases == ("sft", "dpo") and chain.classes is None and chain.needs_adapter
    assert chain.first() is sft and sft.first() is sft  # the chain plans its memory as its first phase
    assert chain.uses_preference_args and chain.runs_probe  # it has a DPO phase and an SFT phase
    assert all(set(m.phases) <= set(METHODS) for m in METHODS.values())


@pytest.mark.parametrize(
    "method, field, value, allowed",
    [
        ("sft", "dpo_args", {"beta": 0.1}, False),
        ("dpo", "dpo_args", {"beta": 0.1}, True),
        ("sft+dpo", "dpo_args", {"beta": 0.1}, True),
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


def test_preflight_counts_both_sequences_of_a_preference_pair():
    from tests.test_preflight import LLAMA_8B
    from tunegate.preflight import Plan, estimate

    sft = estimate(LLAMA_8B, Plan("lora", 40_000_000, 2, 512, method="sft"))
    dpo = estimate(LLAMA_8B, Plan("lora", 40_000_000, 2, 512, method="dpo"))
    assert dpo["activations"] > 1.9 * sft["activations"] and dpo["weights"] == sft["weights"]
