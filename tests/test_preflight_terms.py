"""The memory preflight term by term: what it reads of each config.json style, the layer shapes and LoRA
sizes it derives, each component of the estimate against the formula its docstrings state, and the order
and content of the changes a refusal suggests. (tests/test_preflight.py holds the estimate against
measured peaks.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tunegate.errors import UserError
from tunegate.preflight import (
    ACT_PER_HIDDEN,
    ACT_PER_INTERMEDIATE,
    ATT_PER_SCORE,
    CALIBRATION,
    GIB,
    LLAMA_1B_DEMO_VOCAB,
    MARGIN,
    QLORA_ACTIVATIONS,
    Plan,
    Shape,
    _remedies,
    calibration_plan,
    check,
    estimate,
)

# (config.json keys, expected Shape fields) for the key styles the estimate reads
CONFIGS = [
    (  # Llama / Qwen / Mistral names, grouped-query attention, explicit head_dim, transformers 5 `dtype`
        {
            "hidden_size": 512,
            "num_hidden_layers": 3,
            "vocab_size": 1000,
            "intermediate_size": 1536,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 80,
            "dtype": "bfloat16",
            "tie_word_embeddings": False,
        },
        {
            "layers": 3,
            "hidden": 512,
            "vocab": 1000,
            "intermediate": 1536,
            "heads": 8,
            "kv_heads": 2,
            "head_dim": 80,
            "weights_16bit": True,
        },
    ),
    (  # GPT-2 names, float16 under the older key
        {"n_embd": 256, "n_layer": 4, "vocab_size": 500, "n_inner": 1024, "n_head": 4, "torch_dtype": "float16"},
        {
            "layers": 4,
            "hidden": 256,
            "vocab": 500,
            "intermediate": 1024,
            "heads": 4,
            "kv_heads": 0,
            "head_dim": 0,
            "weights_16bit": True,
        },
    ),
    (  # encoder-decoder style names, float32
        {"d_model": 128, "num_layers": 2, "vocab_size": 300, "ffn_dim": 512, "torch_dtype": "float32"},
        {
            "layers": 2,
            "hidden": 128,
            "vocab": 300,
            "intermediate": 512,
            "heads": 0,
            "kv_heads": 0,
            "head_dim": 0,
            "weights_16bit": False,
        },
    ),
    (  # multimodal: the text model's settings, the checkpoint's dtype at the top
        {
            "dtype": "float16",
            "vision_config": {"hidden_size": 9999},
            "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "num_attention_heads": 4},
        },
        {
            "layers": 2,
            "hidden": 64,
            "vocab": 100,
            "intermediate": 0,
            "heads": 4,
            "kv_heads": 0,
            "head_dim": 0,
            "weights_16bit": True,
        },
    ),
    (  # the dtype only inside text_config; a zero in the first key falls through to the next name
        {
            "hidden_size": 0,
            "text_config": {"n_embd": 96, "n_layer": 1, "vocab_size": 50, "torch_dtype": "bfloat16"},
        },
        {
            "layers": 1,
            "hidden": 96,
            "vocab": 50,
            "intermediate": 0,
            "heads": 0,
            "kv_heads": 0,
            "head_dim": 0,
            "weights_16bit": True,
        },
    ),
    (  # no dtype at all: float32
        {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10},
        {
            "layers": 1,
            "hidden": 64,
            "vocab": 10,
            "intermediate": 0,
            "heads": 0,
            "kv_heads": 0,
            "head_dim": 0,
            "weights_16bit": False,
        },
    ),
]


@pytest.mark.parametrize(("config", "fields"), CONFIGS, ids=["llama", "gpt2", "t5", "multimodal", "fallback", "fp32"])
def test_every_config_style_is_read_field_by_field(config, fields):
    shape = Shape.from_config(config)
    assert {k: getattr(shape, k) for k in fields} == fields
    c = config.get("text_config") or config
    tied = c.get("tie_word_embeddings", True)
    embeddings = shape.vocab * shape.hidden * (1 if tied else 2)
    assert shape.params == shape.linear_params + embeddings + shape.layers * 2 * shape.hidden


def test_untied_embeddings_count_twice():
    tied = Shape.from_config({**CONFIGS[0][0], "tie_word_embeddings": True})
    untied = Shape.from_config(CONFIGS[0][0])
    assert untied.params - tied.params == 1000 * 512


@pytest.mark.parametrize("missing", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_a_config_without_the_essentials_is_one_line(missing):
    config = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}
    del config[missing]
    with pytest.raises(UserError, match="^config.json: no hidden_size / num_hidden_layers / vocab_size; cannot"):
        Shape.from_config(config)


def test_layer_shapes_with_grouped_query_attention_and_defaults():
    gqa = Shape(params=0, layers=2, hidden=512, vocab=10, intermediate=1536, heads=8, kv_heads=2, head_dim=80)
    assert gqa.linear_shapes() == {
        "q_proj": (512, 640),
        "k_proj": (512, 160),
        "v_proj": (512, 160),
        "o_proj": (640, 512),
        "gate_proj": (512, 1536),
        "up_proj": (512, 1536),
        "down_proj": (1536, 512),
    }
    assert gqa.linear_params == 2 * sum(a * b for a, b in gqa.linear_shapes().values())
    # defaults: heads = hidden / 64, kv heads = heads, head_dim = hidden / heads, intermediate = 4 x hidden
    plain = Shape(params=0, layers=1, hidden=256, vocab=10)
    assert plain.ffn == 1024 and plain._heads() == (4, 4, 64)
    assert plain.linear_shapes()["k_proj"] == (256, 256) and plain.linear_shapes()["down_proj"] == (1024, 256)
    assert Shape(params=0, layers=1, hidden=32, vocab=10)._heads() == (1, 1, 32)  # at least one head
    assert Shape(params=0, layers=1, hidden=256, vocab=10, heads=8)._heads() == (8, 8, 32)


def test_lora_size_by_target_modules():
    shape = Shape(params=0, layers=3, hidden=512, vocab=10, intermediate=1536, heads=8, kv_heads=2, head_dim=80)
    sizes = {n: a + b for n, (a, b) in shape.linear_shapes().items()}
    every = 3 * 4 * sum(sizes.values())
    assert shape.lora_params(4) == shape.lora_params(4, "all-linear") == every
    assert shape.lora_params(4, ["q_proj", "v_proj"]) == 3 * 4 * (sizes["q_proj"] + sizes["v_proj"])
    assert shape.lora_params(8, ("down_proj",)) == 3 * 8 * sizes["down_proj"]
    # a prefix ("gate" -> gate_proj) and a full module path (".. .self_attn.o_proj") name layers too
    assert shape.lora_params(2, ["gate"]) == 3 * 2 * sizes["gate_proj"]
    assert shape.lora_params(2, ["model.layers.0.self_attn.o_proj"]) == 3 * 2 * sizes["o_proj"]
    # names the estimate does not know, or none: every layer (the conservative count)
    assert (
        shape.lora_params(2, ["c_attn"])
        == shape.lora_params(2, [])
        == shape.lora_params(2, None)
        == 3 * 2 * sum(sizes.values())
    )


SHAPE = Shape.from_config(CONFIGS[0][0])
OTHER = SHAPE.params - SHAPE.linear_params


def _plan(**kw) -> Plan:
    return Plan(**{"adapter": "lora", "trainable": 1000, "batch": 2, "seq": 64, **kw})


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("weights_16bit", [False, True])
@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora", "full"])
@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_8bit"])
def test_weights_and_trainable_state_follow_the_stated_formula(bf16, weights_16bit, adapter, optim):
    plan = _plan(adapter=adapter, bf16=bf16, weights_16bit=weights_16bit, optim=optim)
    est = estimate(SHAPE, plan)
    loaded = 2 if weights_16bit else 4
    if adapter == "qlora":
        weights = SHAPE.linear_params * (0.5 + 1 / 64) + OTHER * 4  # NF4 + one fp32 scale per 64; fp32 rest
    else:
        weights = SHAPE.params * loaded
    eight = optim == "paged_adamw_8bit"
    if adapter == "full":  # the loaded weights train: gradient and two optimizer states at their precision
        trainable = 1000 * (loaded + (2 if eight else 2 * loaded))
    else:  # fp32 adapter weights and gradients, and 2 x fp32 (or 2 x 8-bit) optimizer states
        trainable = 1000 * (4 + 4 + (2 if eight else 8))
    assert est["weights"] == pytest.approx(weights * MARGIN, rel=1e-12)
    assert est["trainable"] == pytest.approx(trainable * MARGIN, rel=1e-12)
    assert est["total"] == pytest.approx(est["weights"] + est["trainable"] + est["activations"], rel=1e-12)


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("bf16", [False, True])
def test_activations_follow_the_stated_formula(method, checkpointing, adapter, bf16):
    plan = _plan(adapter=adapter, method=method, gradient_checkpointing=checkpointing, bf16=bf16, batch=3, seq=40)
    value = 2 if bf16 else 4
    rows = 3 * (2 if method == "dpo" else 1)  # DPO forwards chosen and rejected
    tokens = rows * 40
    scores = rows * SHAPE.heads * 40 * 40 * ATT_PER_SCORE * value
    per_layer = tokens * (ACT_PER_HIDDEN * SHAPE.hidden + ACT_PER_INTERMEDIATE * SHAPE.ffn) * value + scores
    if checkpointing:  # one hidden state per layer kept, one layer's worth recomputed
        activations = tokens * SHAPE.layers * SHAPE.hidden * value + per_layer
    else:
        activations = per_layer * SHAPE.layers
    if adapter == "qlora":
        activations *= QLORA_ACTIVATIONS
    logits = tokens * SHAPE.vocab * (value + 8) * (1.5 if method == "dpo" else 1)
    assert estimate(SHAPE, plan)["activations"] == pytest.approx((activations + logits) * MARGIN, rel=1e-12)


@pytest.mark.parametrize("processes", [1, 4])
@pytest.mark.parametrize("sharded", [False, True])
def test_only_sharding_over_several_processes_splits_weights_and_states(processes, sharded):
    one = estimate(SHAPE, _plan(adapter="full", trainable=SHAPE.params))
    many = estimate(SHAPE, _plan(adapter="full", trainable=SHAPE.params, processes=processes, sharded=sharded))
    split = processes if sharded and processes > 1 else 1
    assert many["weights"] == pytest.approx(one["weights"] / split)
    assert many["trainable"] == pytest.approx(one["trainable"] / split)
    assert many["activations"] == one["activations"]


def test_remedies_in_order_each_on_top_of_the_last():
    plan = _plan(batch=8)
    steps = _remedies(SHAPE, plan)
    assert [change for change, _ in steps] == [
        "train.args.gradient_checkpointing: true",
        "train.args.per_device_train_batch_size: 4 with gradient_accumulation_steps x2",
        "train.args.per_device_train_batch_size: 2 with gradient_accumulation_steps x4",
        "train.args.per_device_train_batch_size: 1 with gradient_accumulation_steps x8",
        "train.adapter: qlora",
        "train.args.optim: paged_adamw_8bit",
    ]
    final = steps[-1][1]
    assert final == replace(
        plan, gradient_checkpointing=True, batch=1, adapter="qlora", optim="paged_adamw_8bit", trainable=1000
    )
    assert [p.batch for _, p in steps] == [8, 4, 2, 1, 1, 1]
    # full fine-tuning becomes a rank-16 QLoRA; what is already set is not suggested again
    full = _remedies(SHAPE, _plan(adapter="full", trainable=SHAPE.params, batch=3))
    assert dict(full)["train.adapter: qlora"].trainable == SHAPE.lora_params(16)
    assert [c for c, _ in full][1] == "train.args.per_device_train_batch_size: 1 with gradient_accumulation_steps x3"
    done = _remedies(SHAPE, _plan(adapter="qlora", batch=1, gradient_checkpointing=True, optim="paged_adamw_8bit"))
    assert done == []


def test_check_fits_at_the_headroom_boundary_and_refuses_above_it():
    plan = _plan()
    total = estimate(SHAPE, plan)["total"]
    assert check(SHAPE, plan, "cpu", total / 0.9) == estimate(SHAPE, plan)
    assert check(SHAPE, plan, "cpu", total, headroom=1.0)["total"] == total
    with pytest.raises(UserError) as err:
        check(SHAPE, plan, "GPU X", total * 0.999, headroom=1.0)
    msg = str(err.value)
    gib = f"{total / GIB:.1f} GiB"
    assert msg.startswith(f"train: estimated peak memory {gib} exceeds 100% of the ") and " free on GPU X; try " in msg
    fitted = estimate(SHAPE, replace(plan, gradient_checkpointing=True))["total"]
    assert msg.endswith(f"train.args.gradient_checkpointing: true -> {fitted / GIB:.1f} GiB, fits")
    with pytest.raises(UserError, match="; try nothing left to change still needs more; use a smaller max_length"):
        check(SHAPE, _plan(adapter="qlora", batch=1, gradient_checkpointing=True, optim="paged_adamw_8bit"), "x", 1.0)


@pytest.mark.parametrize("row", CALIBRATION[:3] + [{**CALIBRATION[0], "adapter": "full", "optim": "adamw_bnb_8bit"}])
def test_calibration_rows_become_the_plans_they_measured(row):
    plan = calibration_plan(row)
    trainable = LLAMA_1B_DEMO_VOCAB.params if row["adapter"] == "full" else LLAMA_1B_DEMO_VOCAB.lora_params(16)
    assert plan == Plan(
        row["adapter"],
        trainable,
        row["batch"],
        row["seq"],
        gradient_checkpointing=row["gc"],
        optim=row.get("optim", "adamw_torch"),
        bf16=True,
        weights_16bit=True,
        method=row["method"],
    )
    assert calibration_plan({**row, "r": 8, "bf16": False}).bf16 is False
    if row["adapter"] != "full":
        assert calibration_plan({**row, "r": 8}).trainable == LLAMA_1B_DEMO_VOCAB.lora_params(8)


def test_more_config_and_shape_details():
    # an older multimodal config: torch_dtype at the top, the text model below
    old = Shape.from_config(
        {"torch_dtype": "bfloat16", "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 9}}
    )
    assert old.weights_16bit
    assert all(type(x) is int for x in Shape(params=0, layers=1, hidden=256, vocab=10)._heads())
    shape = Shape(params=0, layers=3, hidden=512, vocab=10, intermediate=1536, heads=8, kv_heads=2, head_dim=80)
    q = sum(shape.linear_shapes()["q_proj"])
    assert shape.lora_params(2, "q_proj") == 3 * 2 * q  # one name as a string


def test_a_hand_made_shape_with_fewer_params_than_its_layers_has_no_other_weights():
    shape = Shape(params=1000, layers=2, hidden=64, vocab=10)
    assert shape.linear_params > shape.params
    est = estimate(shape, _plan(adapter="qlora"))
    assert est["weights"] == pytest.approx(shape.linear_params * (0.5 + 1 / 64) * MARGIN, rel=1e-12)


def test_sharding_over_two_processes_halves_the_states():
    one = estimate(SHAPE, _plan(adapter="full", trainable=SHAPE.params))
    two = estimate(SHAPE, _plan(adapter="full", trainable=SHAPE.params, processes=2, sharded=True))
    assert two["weights"] == pytest.approx(one["weights"] / 2) and two["trainable"] == pytest.approx(
        one["trainable"] / 2
    )


def test_a_refusal_lists_every_change_tried_and_the_free_memory():
    big = Shape.from_config(
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "vocab_size": 128256,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "torch_dtype": "bfloat16",
        }
    )
    plan = Plan("full", big.params, 8, 4096, bf16=True, weights_16bit=True)
    steps = _remedies(big, plan)
    # the first point in the list at which the plan fits 40 GiB, so the message names two or more changes
    fits = next(i for i, (_, p) in enumerate(steps) if estimate(big, p)["total"] <= 0.9 * 40 * GIB)
    assert fits >= 1
    with pytest.raises(UserError) as err:
        check(big, plan, "GPU", 40 * GIB)
    msg = str(err.value)
    assert "of the 40.0 GiB free on GPU; try " in msg
    assert "; ".join(change for change, _ in steps[: fits + 1]) in msg
    with pytest.raises(UserError) as err:
        check(big, plan, "GPU", 1 * GIB)
    assert "; ".join(change for change, _ in steps) + " still needs more" in str(err.value)
