"""The adapter kinds `train.adapter` can name, as one table every stage and the preflight read.

lora   PEFT LoRA on a full-precision (or bf16) base
qlora  PEFT LoRA on the base loaded as bitsandbytes NF4 (double quantisation, bf16 compute)
dora   PEFT DoRA (weight-decomposed LoRA)
full   every weight trained; no adapter, the result is a full model
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterKind:
    name: str
    peft: bool  # trains a PEFT adapter on a frozen base (False: every weight is trained)
    quantize_4bit: bool = False  # the frozen base is loaded in 4-bit NF4
    dora: bool = False  # weight-decomposed LoRA


ADAPTERS: dict[str, AdapterKind] = {
    "lora": AdapterKind("lora", peft=True),
    "qlora": AdapterKind("qlora", peft=True, quantize_4bit=True),
    "dora": AdapterKind("dora", peft=True, dora=True),
    "full": AdapterKind("full", peft=False),
}
