"""The memory preflight: sensible estimates, and a one-line refusal with what to change."""

import pytest

from tunegate.errors import UserError
from tunegate.preflight import GIB, Plan, Shape, check, estimate

LLAMA_8B = Shape(params=8_030_000_000, layers=32, hidden=4096, vocab=128_256)


def test_qlora_weights_are_about_an_eighth_of_fp32():
    lora = estimate(LLAMA_8B, Plan("lora", 40_000_000, 1, 1024, bf16=True))
    qlora = estimate(LLAMA_8B, Plan("qlora", 40_000_000, 1, 1024, bf16=True))
    assert qlora["weights"] / lora["weights"] == pytest.approx((0.5 + 1 / 64) / 2)


def test_checkpointing_and_8bit_optimizer_reduce_the_estimate():
    base = estimate(LLAMA_8B, Plan("full", LLAMA_8B.params, 4, 2048, bf16=True))
    leaner = estimate(
        LLAMA_8B, Plan("full", LLAMA_8B.params, 4, 2048, gradient_checkpointing=True, optim="adamw_bnb_8bit", bf16=True)
    )
    assert leaner["activations"] < base["activations"] / 3 and leaner["trainable"] < base["trainable"]


def test_refusal_names_what_to_change():
    with pytest.raises(UserError) as err:
        check(LLAMA_8B, Plan("full", LLAMA_8B.params, 8, 4096, bf16=True), "NVIDIA A10G", 22 * GIB)
    msg = str(err.value)
    assert (
        "exceeds" in msg and "gradient_checkpointing: true" in msg and "train.adapter: qlora" in msg and "\n" not in msg
    )


def test_small_run_fits():
    est = check(Shape(1_000_000, 4, 128, 1031), Plan("lora", 160_000, 16, 128), "cpu", 8 * GIB)
    assert est["total"] < 1 * GIB


def test_a_16bit_checkpoint_halves_the_weights_not_the_activations():
    fp32 = estimate(LLAMA_8B, Plan("lora", 40_000_000, 1, 1024))
    bf16_weights = estimate(LLAMA_8B, Plan("lora", 40_000_000, 1, 1024, weights_16bit=True))
    assert bf16_weights["weights"] == pytest.approx(fp32["weights"] / 2)
    assert bf16_weights["activations"] == fp32["activations"]  # no mixed precision: norms and softmax run in fp32
