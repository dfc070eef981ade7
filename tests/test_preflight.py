"""The memory preflight: estimated from config.json, held against measured peaks, and a one-line refusal
that names the change that would make the run fit."""

import pytest

from tunegate.errors import UserError
from tunegate.preflight import (
    CALIBRATION,
    GIB,
    LLAMA_1B_DEMO_VOCAB,
    Plan,
    Shape,
    calibration_plan,
    check,
    estimate,
)

# Llama-3.1-8B's config.json, as published (the keys the estimate reads)
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA_8B = Shape.from_config(LLAMA_8B_CONFIG)


@pytest.mark.parametrize(
    "row",
    CALIBRATION,
    ids=lambda r: f"{r['adapter']}-{r['method']}-gc{int(r['gc'])}-{r['batch']}x{r['seq']}-{r['source']}",
)
def test_estimate_is_never_more_than_10pct_under_nor_50pct_over_a_measured_peak(row):
    est = estimate(LLAMA_1B_DEMO_VOCAB, calibration_plan(row))["total"] / GIB
    assert 0.9 * row["measured_gib"] <= est <= 1.5 * row["measured_gib"], (est, row)


def test_shape_from_config_counts_the_published_parameters():
    assert LLAMA_8B.params == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B: 8.03B
    qwen_05b = Shape.from_config(
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "num_hidden_layers": 24,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        }
    )
    assert qwen_05b.params == pytest.approx(0.494e9, rel=0.02)  # Qwen2.5-0.5B: 0.49B (biases left out)
    assert LLAMA_8B.weights_16bit and LLAMA_8B.lora_params(16) == pytest.approx(41.9e6, rel=0.01)  # PEFT's count
    with pytest.raises(UserError, match="config.json: no hidden_size"):
        Shape.from_config({"model_type": "mystery"})


def test_qlora_quantises_the_linear_layers_only():
    lora = estimate(LLAMA_8B, Plan("lora", 40_000_000, 1, 1024, bf16=True, weights_16bit=True))
    qlora = estimate(LLAMA_8B, Plan("qlora", 40_000_000, 1, 1024, bf16=True, weights_16bit=True))
    embeddings = LLAMA_8B.params - LLAMA_8B.linear_params
    expected = (LLAMA_8B.linear_params * (0.5 + 1 / 64) + embeddings * 4) / (LLAMA_8B.params * 2)
    assert qlora["weights"] / lora["weights"] == pytest.approx(expected)
    # PEFT's prepare_model_for_kbit_training upcasts the (untied, 128k x 4096) embeddings to fp32: half the total
    assert 0.45 < expected < 0.5


def test_dpo_counts_chosen_and_rejected_and_sharding_splits_the_states():
    sft = estimate(LLAMA_8B, Plan("lora", 40_000_000, 4, 2048, bf16=True, weights_16bit=True))
    dpo = estimate(LLAMA_8B, Plan("lora", 40_000_000, 4, 2048, bf16=True, weights_16bit=True, method="dpo"))
    assert dpo["activations"] > 1.9 * sft["activations"] and dpo["weights"] == sft["weights"]
    full = Plan("full", LLAMA_8B.params, 1, 2048, bf16=True, weights_16bit=True, gradient_checkpointing=True)
    one = estimate(LLAMA_8B, full)
    ddp = estimate(LLAMA_8B, Plan(**{**full.__dict__, "processes": 8}))
    zero3 = estimate(LLAMA_8B, Plan(**{**full.__dict__, "processes": 8, "sharded": True}))
    assert ddp == one  # a whole replica per process
    assert zero3["weights"] == pytest.approx(one["weights"] / 8) and zero3["trainable"] == pytest.approx(
        one["trainable"] / 8
    )
    assert zero3["activations"] == one["activations"]


def test_checkpointing_and_8bit_optimizer_reduce_the_estimate():
    base = estimate(LLAMA_8B, Plan("full", LLAMA_8B.params, 4, 2048, bf16=True, weights_16bit=True))
    leaner = estimate(
        LLAMA_8B,
        Plan(
            "full",
            LLAMA_8B.params,
            4,
            2048,
            gradient_checkpointing=True,
            optim="adamw_bnb_8bit",
            bf16=True,
            weights_16bit=True,
        ),
    )
    assert leaner["activations"] < base["activations"] / 3 and leaner["trainable"] < base["trainable"]


def test_refusal_names_the_changes_that_fit_with_the_new_estimate():
    plan = Plan("lora", LLAMA_8B.lora_params(16), 8, 4096, bf16=True, weights_16bit=True)
    with pytest.raises(UserError) as err:
        check(LLAMA_8B, plan, "NVIDIA A10G", 22 * GIB)
    msg = str(err.value)
    assert "exceeds" in msg and "gradient_checkpointing: true" in msg and "fits" in msg and "\n" not in msg
    suggested = float(msg.split("-> ")[1].split(" GiB")[0])
    assert suggested <= 0.9 * 22  # the named change really fits
    with pytest.raises(UserError, match="still needs more"):
        check(LLAMA_8B, plan, "tiny GPU", 2 * GIB)


def test_small_run_fits():
    est = check(Shape(1_000_000, 4, 128, 1031), Plan("lora", 160_000, 16, 128), "cpu", 8 * GIB)
    assert est["total"] < 1 * GIB
