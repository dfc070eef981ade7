"""Estimate peak training memory before spending compute, and refuse runs that cannot fit.

The estimate is the usual accounting for a decoder-only transformer (all in bytes):

    weights      params x bytes/param (fp32 4, bf16 2, NF4 0.5 + 1/64 for block scales)
                 (a bf16 checkpoint without mixed precision: 16-bit weights, fp32-sized
                 activations, since norms and softmax upcast; measured in benchmarks/train.py)
    trainable    trainable params x (weight 4 + grad 4 + optimizer states: AdamW 8, 8-bit AdamW 2)
    activations  batch x seq x layers x hidden x k, k = 34 bytes (fp32 ~2x) without gradient
                 checkpointing, 2 x bytes/value with it (one hidden state kept per layer)
                 + batch x seq x vocab x 4 (logits in fp32) x 2 (logits and their gradient)

It is deliberately simple and errs on the high side; the train stage prints it next to the measured
peak so it can be checked on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunegate.adapters import ADAPTERS
from tunegate.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden: int
    vocab: int


@dataclass(frozen=True)
class Plan:
    adapter: str  # lora | qlora | dora | full
    trainable: int
    batch: int
    seq: int
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    bf16: bool = False  # mixed-precision training (train.args bf16 / fp16): 16-bit activations
    weights_16bit: bool = False  # the base itself is loaded in bf16 / fp16


def estimate(shape: Shape, plan: Plan) -> dict[str, float]:
    """Bytes per component and in total."""
    value_bytes = 2 if plan.bf16 else 4
    weight_bytes = 0.5 + 1 / 64 if ADAPTERS[plan.adapter].quantize_4bit else 2 if plan.weights_16bit else value_bytes
    weights = shape.params * weight_bytes
    optimizer = 2 if "8bit" in plan.optim else 8
    trainable = plan.trainable * (4 + 4 + optimizer)
    tokens = plan.batch * plan.seq
    per_layer = 2 * value_bytes if plan.gradient_checkpointing else 34 * value_bytes / 2
    activations = tokens * shape.layers * shape.hidden * per_layer + tokens * shape.vocab * 4 * 2
    total = weights + trainable + activations
    return {"weights": weights, "trainable": trainable, "activations": activations, "total": total}


def available_bytes() -> tuple[str, float]:
    """(device name, bytes free for training) of the device training will use."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), float(free)
    import psutil

    return "cpu", float(psutil.virtual_memory().available)


def check(shape: Shape, plan: Plan, device: str, free: float, headroom: float = 0.9) -> dict[str, float]:
    """The estimate, or a one-line refusal that says what to change."""
    est = estimate(shape, plan)
    if est["total"] > headroom * free:
        hints = []
        if plan.batch > 1:
            hints.append(
                f"per_device_train_batch_size {plan.batch} -> {max(1, plan.batch // 2)} "
                "(raise gradient_accumulation_steps)"
            )
        if not plan.gradient_checkpointing:
            hints.append("gradient_checkpointing: true")
        if not ADAPTERS[plan.adapter].quantize_4bit:
            hints.append("train.adapter: qlora")
        if "8bit" not in plan.optim:
            hints.append("optim: adamw_bnb_8bit")
        raise UserError(
            f"train: estimated peak memory {est['total'] / GIB:.1f} GiB exceeds {headroom:.0%} "
            f"of the {free / GIB:.1f} GiB free on {device}; "
            f"try {'; '.join(hints) or 'a smaller max_length'}"
        )
    return est
