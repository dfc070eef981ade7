"""Estimate peak training memory from the base's config.json, before any weights load, and refuse runs
that cannot fit, naming the change that would make them fit.

The estimate (bytes, per device) for a decoder-only transformer:

    weights      decoder linear layers x bytes/param (fp32 4, 16-bit 2, NF4 0.5 + 1/64 for block
                 scales); embeddings and norms at the checkpoint's precision, fp32 for QLoRA (PEFT's
                 prepare_model_for_kbit_training upcasts every non-quantised parameter)
    trainable    PEFT adapters in fp32: weight 4 + grad 4 + AdamW states 8 (8-bit optimizers: 2);
                 full fine-tuning trains the loaded weights: grad + states at their precision
    activations  tokens x layers x (8 x hidden + 2.75 x intermediate) values, plus one value per
                 attention score (rows x heads x seq^2) and layer, 2 bytes each with mixed precision,
                 else 4; with gradient checkpointing one hidden state per layer plus one layer's
                 full set while it is recomputed; QLoRA x 1.35 (fp32 norms and de-quantised weights
                 around each layer); DPO and ORPO count chosen + rejected per row, KTO each answer
                 and its mismatched KL answer
    logits       tokens x vocab x (value bytes + 8): the logits, their fp32 copy in the loss and its
                 gradient; preference methods hold the log-probabilities too (x 1.5)
    reference    DPO and KTO of a full model keep a frozen copy of the weights as the reference (an
                 adapter's reference is the base with the adapter switched off: no copy); GRPO only
                 with beta > 0
    generation   GRPO samples its generation batch (num_generations completions per prompt) with a KV
                 cache: completions x (prompt + max_completion_length) x layers x 2 x kv heads x head dim
    sharding     FSDP / ZeRO-3 divide weights, gradients and optimizer states by the processes
                 (DDP keeps a whole replica per process); activations stay per device

The activation constants were fitted on peak GPU memory (`torch.cuda.max_memory_allocated`) of a
1B-parameter Llama-shaped model at 128 to 2,048 tokens per row (the score term is what long rows
add: without it 1,024-token rows were under-estimated by 16%, 2,048-token QLoRA rows by 25%); the
whole estimate carries a 10% margin. `tests/test_preflight.py`
holds it against the calibration table (`CALIBRATION`): never more than 10% under a measured peak,
at most 1.5x over it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tunegate.adapters import ADAPTERS
from tunegate.errors import UserError
from tunegate.methods import METHODS

GIB = 1024**3
MARGIN = 1.10  # on the whole estimate: allocator rounding and short-lived buffers the terms leave out
ACT_PER_HIDDEN = 8.0  # stored activation values per token and layer, per hidden unit ...
ACT_PER_INTERMEDIATE = 2.75  # ... and per MLP intermediate unit (gate, up, activation, product)
QLORA_ACTIVATIONS = 1.35  # fp32 norms and de-quantised weights around each 4-bit layer
ATT_PER_SCORE = 1.0  # stored values per attention score (batch x heads x seq^2) and layer: measured, see below
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, read from its config.json."""

    params: int
    layers: int
    hidden: int
    vocab: int
    intermediate: int = 0  # 0: 4 x hidden
    heads: int = 0  # 0: hidden / 64
    kv_heads: int = 0  # 0: heads (no grouped-query attention)
    head_dim: int = 0  # 0: hidden / heads
    weights_16bit: bool = False  # the checkpoint is stored (and loaded) in bf16 / fp16

    @property
    def ffn(self) -> int:
        return self.intermediate or 4 * self.hidden

    def _heads(self) -> tuple[int, int, int]:
        heads = self.heads or max(1, self.hidden // 64)
        return heads, self.kv_heads or heads, self.head_dim or self.hidden // heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear layer, by its usual name (Llama / Qwen / Mistral naming)."""
        heads, kv, dim = self._heads()
        h, i = self.hidden, self.ffn
        return {
            "q_proj": (h, heads * dim),
            "k_proj": (h, kv * dim),
            "v_proj": (h, kv * dim),
            "o_proj": (heads * dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def lora_params(self, r: int, target_modules: Any = "all-linear") -> int:
        """Parameters of a LoRA of rank r on the targeted decoder linear layers (all of them for 'all-linear'
        or names this estimate does not know)."""
        shapes = self.linear_shapes()
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
        chosen = [n for n in shapes if any(n == t or n.startswith(t) or t.endswith(n) for t in names)]
        chosen = chosen or list(shapes)
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in chosen)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        """From a transformers config.json (Llama-style keys, GPT-2-style fallbacks; multimodal configs
        contribute their text_config)."""
        c = config.get("text_config") or config

        def first(*keys: str, default: int = 0) -> int:
            return next((int(c[k]) for k in keys if c.get(k)), default)

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        vocab = first("vocab_size")
        if not (hidden and layers and vocab):
            raise UserError("config.json: no hidden_size / num_hidden_layers / vocab_size; cannot estimate memory")
        dtype = str(config.get("dtype") or config.get("torch_dtype") or c.get("torch_dtype") or "float32")
        shape = cls(
            params=0,
            layers=layers,
            hidden=hidden,
            vocab=vocab,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim"),
            heads=first("num_attention_heads", "n_head"),
            kv_heads=first("num_key_value_heads"),
            head_dim=first("head_dim"),
            weights_16bit=dtype in ("bfloat16", "float16"),
        )
        embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
        return replace(shape, params=shape.linear_params + embeddings + layers * 2 * hidden)


@dataclass(frozen=True)
class Plan:
    adapter: str  # lora | qlora | dora | full
    trainable: int  # parameters that train (the LoRA's, or all of them)
    batch: int  # per device
    seq: int  # max_length
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    bf16: bool = False  # mixed-precision training (train.args bf16 / fp16): 16-bit activations
    weights_16bit: bool = False  # the base itself is loaded in bf16 / fp16
    method: str = "sft"  # a row of tunegate.methods: its sequences per row, logits and reference model
    processes: int = 1
    sharded: bool = False  # FSDP / DeepSpeed ZeRO-3: weights, grads and optimizer states split over processes
    generated: int = 0  # GRPO: completions sampled at once (the generation batch), each seq tokens in the KV cache
    kl: bool = False  # GRPO with beta > 0: a reference model scores the completions


def estimate(shape: Shape, plan: Plan) -> dict[str, float]:
    """Bytes per component and in total (per device)."""
    kind = ADAPTERS[plan.adapter]
    value = 2 if plan.bf16 else 4
    other = shape.params - shape.linear_params if shape.linear_params < shape.params else 0
    loaded = 2 if plan.weights_16bit else 4
    if kind.quantize_4bit:
        weights = shape.linear_params * (0.5 + 1 / 64) + other * 4
    else:
        weights = shape.params * loaded
    eight_bit = "8bit" in plan.optim
    if kind.peft:
        trainable = plan.trainable * (4 + 4 + (2 if eight_bit else 8))
    else:  # the loaded weights train: their gradient and optimizer states, at their precision
        trainable = plan.trainable * (loaded + (2 if eight_bit else 2 * loaded))
    method = METHODS[plan.method]
    if (method.reference or plan.kl) and not kind.peft:  # DPO / KTO / GRPO with KL of a full model: a frozen copy
        weights *= 2
    if plan.sharded and plan.processes > 1:
        weights /= plan.processes
        trainable /= plan.processes
    tokens = plan.batch * plan.seq * method.sequences_per_row
    rows = plan.batch * method.sequences_per_row
    scores = rows * shape._heads()[0] * plan.seq * plan.seq * ATT_PER_SCORE * value
    per_layer = tokens * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.ffn) * value + scores
    if plan.gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * value + per_layer
    else:
        activations = per_layer * shape.layers
    if kind.quantize_4bit:
        activations *= QLORA_ACTIVATIONS
    logits = tokens * shape.vocab * (value + 8) * method.logits_factor
    _, kv, dim = shape._heads()
    cache = plan.generated * plan.seq * shape.layers * 2 * kv * dim * (2 if plan.weights_16bit or plan.bf16 else 4)
    parts = {"weights": weights, "trainable": trainable, "activations": activations + logits + cache}
    return {**{k: v * MARGIN for k, v in parts.items()}, "total": sum(parts.values()) * MARGIN}


def available_bytes() -> tuple[str, float]:
    """(device name, bytes free for training) of the device training will use."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), float(free)
    import psutil

    return "cpu", float(psutil.virtual_memory().available)


def _remedies(shape: Shape, plan: Plan) -> list[tuple[str, Plan]]:
    """Changes a user can make in params.yaml, each applied on top of the ones before it."""
    steps: list[tuple[str, Plan]] = []
    current = plan
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("train.args.gradient_checkpointing: true", current))
    while current.batch > 1:
        current = replace(current, batch=max(1, current.batch // 2))
        grow = plan.batch // current.batch
        steps.append(
            (
                f"train.args.per_device_train_batch_size: {current.batch} with gradient_accumulation_steps x{grow}",
                current,
            )
        )
    if not ADAPTERS[current.adapter].quantize_4bit:
        trainable = current.trainable if ADAPTERS[current.adapter].peft else shape.lora_params(16)
        current = replace(current, adapter="qlora", trainable=trainable)
        steps.append(("train.adapter: qlora", current))
    if "8bit" not in current.optim:
        current = replace(current, optim="paged_adamw_8bit")
        steps.append(("train.args.optim: paged_adamw_8bit", current))
    return steps


def check(shape: Shape, plan: Plan, device: str, free: float, headroom: float = 0.9) -> dict[str, float]:
    """The estimate, or a one-line refusal that names the changes that would make it fit, with the new estimate."""
    est = estimate(shape, plan)
    budget = headroom * free
    if est["total"] <= budget:
        return est
    tried = []
    for change, changed in _remedies(shape, plan):
        tried.append(change)
        new = estimate(shape, changed)["total"]
        if new <= budget:
            suggestion = f"{'; '.join(tried)} -> {new / GIB:.1f} GiB, fits"
            break
    else:
        tried_all = "; ".join(tried) or "nothing left to change"
        suggestion = f"{tried_all} still needs more; use a smaller max_length or a larger device"
    raise UserError(
        f"train: estimated peak memory {est['total'] / GIB:.1f} GiB exceeds {headroom:.0%} of the "
        f"{free / GIB:.1f} GiB free on {device}; try {suggestion}"
    )


# Measured peaks the estimate is held against (tests/test_preflight.py). All on an NVIDIA H200 with
# torch 2.11 + CUDA 13, transformers 5.17, TRL 1.16, PEFT 0.21, bitsandbytes 0.50.2, a random-init
# model of Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8, intermediate 8192) with a
# 1,024-token vocabulary, bf16 weights, `bf16: true`, LoRA r16 on all linear layers, peak =
# torch.cuda.max_memory_allocated. "h200-2026-11" rows: the demo's rows at batch 16 x max_length 128;
# "h200-2026-11-27" rows: `python -m benchmarks.gpu memory`, rows filling max_length.
LLAMA_1B_DEMO_VOCAB = Shape(
    params=0, layers=16, hidden=2048, vocab=1024, intermediate=8192, heads=32, kv_heads=8, weights_16bit=True
)
LLAMA_1B_DEMO_VOCAB = replace(
    LLAMA_1B_DEMO_VOCAB, params=LLAMA_1B_DEMO_VOCAB.linear_params + 1024 * 2048 + 16 * 2 * 2048
)
CALIBRATION: list[dict[str, Any]] = [
    {
        "adapter": "lora",
        "method": "sft",
        "gc": False,
        "batch": 16,
        "seq": 128,
        "measured_gib": 4.38,
        "source": "h200-2026-11",
    },
    {
        "adapter": "qlora",
        "method": "sft",
        "gc": False,
        "batch": 16,
        "seq": 128,
        "measured_gib": 3.84,
        "source": "h200-2026-11",
    },
    {
        "adapter": "lora",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 2.25,
        "source": "h200-2026-11",
    },
    {
        "adapter": "qlora",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 0.99,
        "source": "h200-2026-11",
    },
    {
        "adapter": "full",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 7.37,
        "source": "h200-2026-11",
    },
    {
        "adapter": "qlora",
        "method": "dpo",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 1.42,
        "source": "h200-2026-11",
    },
    {
        "adapter": "lora",
        "method": "sft",
        "gc": False,
        "batch": 16,
        "seq": 128,
        "measured_gib": 4.006,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "qlora",
        "method": "sft",
        "gc": False,
        "batch": 16,
        "seq": 128,
        "measured_gib": 3.353,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "lora",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 2.257,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "qlora",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 0.972,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "full",
        "method": "sft",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 7.399,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "qlora",
        "method": "dpo",
        "gc": True,
        "batch": 16,
        "seq": 128,
        "measured_gib": 1.511,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "lora",
        "method": "sft",
        "gc": False,
        "batch": 4,
        "seq": 1024,
        "measured_gib": 8.915,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "lora",
        "method": "sft",
        "gc": True,
        "batch": 4,
        "seq": 1024,
        "measured_gib": 2.874,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "qlora",
        "method": "sft",
        "gc": True,
        "batch": 4,
        "seq": 2048,
        "measured_gib": 3.217,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "lora",
        "method": "dpo",
        "gc": True,
        "batch": 4,
        "seq": 1024,
        "measured_gib": 3.735,
        "source": "h200-2026-11-27",
    },
    {
        "adapter": "full",
        "method": "sft",
        "gc": False,
        "batch": 4,
        "seq": 512,
        "measured_gib": 8.512,
        "source": "h200-2026-11-27",
    },
]


def calibration_plan(row: dict[str, Any], shape: Shape = LLAMA_1B_DEMO_VOCAB) -> Plan:
    trainable = shape.params if not ADAPTERS[row["adapter"]].peft else shape.lora_params(row.get("r", 16))
    return Plan(
        row["adapter"],
        trainable,
        row["batch"],
        row["seq"],
        gradient_checkpointing=row["gc"],
        optim=row.get("optim", "adamw_torch"),
        bf16=row.get("bf16", True),
        weights_16bit=shape.weights_16bit,
        method=row["method"],
    )
