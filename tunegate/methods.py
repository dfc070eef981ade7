"""The training methods `train.method` can name, as one table the train stage, the training plan, the
preflight and the config read: a method is asked what it needs, never compared as a string.

sft      supervised fine-tuning on the mixed set (every weighted assistant turn)
dpo      direct preference optimisation on preference pairs (TRL's DPOTrainer)
sft+dpo  a chain: SFT, then DPO from (and against) that adapter, as one stage run
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _sft_classes() -> tuple[type, type]:
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def _dpo_classes() -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL's DPO trainer on pairs tokenised by `preference_examples` (the rendering every stage uses,
        tools included); TRL's own preparation would pass the messages through Arrow, which gives every
        tool call's arguments the keys of all the others."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL: no signal left
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    return DPOConfig, PreTokenizedDPOTrainer


@dataclass(frozen=True)
class MethodKind:
    """One trainer method: TRL's config and trainer classes and what data it trains on; or a chain of them."""

    name: str
    classes: Callable[[], tuple[type, type]] | None  # (TRL config, TRL trainer), imported on use; None: a chain
    preference: bool = False  # trains on preference pairs (prompt/chosen/rejected) instead of the mixed set
    probe: bool = False  # the held-out general probe loss (an SFT-style loss) applies
    phases: tuple[str, ...] = ()  # a chain: the methods it runs, in order, each a row of this table
    needs_adapter: bool = False  # a chain continues one PEFT adapter from phase to phase (no `full`)
    min_rows: int = 32  # fewer training rows (pairs) than this: the stage stops before any step (train.min_rows)

    @property
    def sequences_per_row(self) -> int:
        """Sequences forwarded per training row: chosen and rejected for a preference method."""
        return 2 if self.preference else 1

    @property
    def logits_factor(self) -> float:
        """Logits kept alive per forwarded token, relative to SFT (DPO also holds the log-probabilities)."""
        return 1.5 if self.preference else 1.0

    @property
    def uses_preference_args(self) -> bool:
        """Whether `train.dpo_args` applies: to a preference method, or to a chain that runs one."""
        return self.preference or any(METHODS[p].preference for p in self.phases)

    @property
    def runs_probe(self) -> bool:
        """Whether the forgetting probe can run: in this method, or in a phase of the chain."""
        return self.probe or any(METHODS[p].probe for p in self.phases)

    def needs(self) -> list[MethodKind]:
        """The methods whose training rows the run reads: itself, or each phase of a chain."""
        return [METHODS[p] for p in self.phases] if self.phases else [self]

    def first(self) -> MethodKind:
        """The method that plans the run's memory: itself, or a chain's first phase."""
        return METHODS[self.phases[0]] if self.phases else self


METHODS: dict[str, MethodKind] = {
    "sft": MethodKind("sft", _sft_classes, probe=True),
    "dpo": MethodKind("dpo", _dpo_classes, preference=True),
    "sft+dpo": MethodKind("sft+dpo", None, phases=("sft", "dpo"), needs_adapter=True),
}
