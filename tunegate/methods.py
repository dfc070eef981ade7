"""The training methods `train.method` can name, as one table the train stage, the training plan, the
preflight and the config read: a method is asked what it needs, never compared as a string.

sft      supervised fine-tuning on the mixed set (every weighted assistant turn)
dpo      direct preference optimisation on preference pairs, against a frozen reference (TRL's DPOTrainer)
orpo     odds-ratio preference optimisation: SFT on the chosen answer and a preference term in one stage, no
         reference model (TRL's ORPOTrainer, in TRL's experimental package in the pinned TRL 1.16)
kto      Kahneman-Tversky optimisation on unpaired answers labelled desirable or not, against a frozen
         reference; preference pairs give one desirable and one undesirable row each (TRL's KTOTrainer)
grpo     group relative policy optimisation: completions sampled per prompt, rewarded by train.grpo.rewards (the
         gate's own scorers among them), the policy pushed toward the better ones of each group (TRL's GRPOTrainer)
sft+dpo  a chain: SFT, then DPO from (and against) that adapter, as one stage run
sft+kto  a chain: SFT, then KTO from (and against) that adapter
sft+grpo a chain: SFT, then GRPO from that adapter (the usual order: RL needs a model that already answers)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

PACKED_TOKENS = "packed_tokens"  # the real (unpadded) tokens of a row-packed batch, for TRL's token count


def row_packed_batch(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """A batch of TRL's packed sequences (best-fit decreasing: several rows end to end, `seq_lengths` saying where
    each ends) kept as separate batch rows, right-padded, with position ids that restart at every row and no
    attention mask: transformers then builds each sequence's block-diagonal causal mask from the position ids
    (masking_utils.find_packed_sequence_indices), on SDPA and eager attention alike, so no row attends to another.
    TRL's own padding-free layout puts a whole batch in one sequence, which pays only with flash attention's
    variable-length kernels; this one pays without them. The first token of each row is not trained (as in the
    row alone, where nothing precedes it)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import pad

    ids = [torch.tensor(e["input_ids"]) for e in examples]
    labels = [torch.tensor(e.get("labels", e["input_ids"])) for e in examples]
    positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(
        [e["seq_lengths"] for e in examples]
    )
    out = {
        "input_ids": pad(ids, padding_value=pad_token_id, padding_side="right", pad_to_multiple_of=pad_to_multiple_of),
        "labels": pad(labels, padding_value=-100, padding_side="right", pad_to_multiple_of=pad_to_multiple_of),
        "position_ids": pad(positions, padding_value=0, padding_side="right", pad_to_multiple_of=pad_to_multiple_of),
    }
    out["labels"][out["position_ids"] == 0] = -100
    out[PACKED_TOKENS] = torch.tensor(sum(len(i) for i in ids))
    return out


def _sft_classes() -> tuple[type, type]:
    from trl import SFTConfig, SFTTrainer

    class RowPackingSFTTrainer(SFTTrainer):
        """TRL's SFT trainer; `rows_packed=True` (with `packing`) batches the packed sequences as separate rows with
        block-diagonal masks (`row_packed_batch`) instead of TRL's one padding-free sequence per batch, and counts
        the tokens trained as the rows' real tokens (TRL counts a batch without an attention mask by its width)."""

        def __init__(self, *args, rows_packed: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.rows_packed = rows_packed and bool(self.args.packing)
            if self.rows_packed:
                pad_id, multiple = self.data_collator.pad_token_id, self.args.pad_to_multiple_of
                self.data_collator = partial(row_packed_batch, pad_token_id=pad_id, pad_to_multiple_of=multiple)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens = inputs.pop(PACKED_TOKENS, None)
            counted = self._total_train_tokens
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if tokens is not None and self.model.training:
                self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(tokens).sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    return SFTConfig, RowPackingSFTTrainer


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


def _orpo_classes() -> tuple[type, type]:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class PreTokenizedORPOTrainer(ORPOTrainer):
        """TRL's ORPO trainer on the pairs `preference_examples` tokenised (the same rendering as DPO's): the
        prompt, then each answer, the loss on the answer's tokens only, cut to max_length from the end as TRL
        cuts (the prompt kept)."""

        def tokenize_row(self, feature, model=None) -> dict:
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            prompt = list(feature["prompt_ids"])
            batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(feature[f"{side}_ids"])[: max(0, self.max_length - len(prompt))]
                ids = prompt + answer
                batch |= {
                    f"{side}_input_ids": ids,
                    f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(prompt) + answer,
                }
            return batch

    return ORPOConfig, PreTokenizedORPOTrainer


def _kto_classes() -> tuple[type, type]:
    from trl import KTOConfig, KTOTrainer

    class PreTokenizedKTOTrainer(KTOTrainer):
        """TRL's KTO trainer on unpaired rows tokenised by `unpaired_examples` (prompt_ids, completion_ids, label);
        what TRL does after its own tokenisation is kept: rows whose prompt fills max_length dropped, the KL
        completions rotated by one within each batch."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "completion_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None:
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            if self.calculate_KL:

                def rotate(examples):
                    completions = examples["completion_ids"]
                    return {"KL_completion_ids": [completions[-1], *completions[:-1]]}

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

    return KTOConfig, PreTokenizedKTOTrainer


def _grpo_classes() -> tuple[type, type]:
    from trl import GRPOConfig, GRPOTrainer

    return GRPOConfig, GRPOTrainer


@dataclass(frozen=True)
class MethodKind:
    """One trainer method: TRL's config and trainer classes and what data it trains on; or a chain of them."""

    name: str
    classes: Callable[[], tuple[type, type]] | None  # (TRL config, TRL trainer), imported on use; None: a chain
    preference: bool = False  # trains on the preference pairs (prompt/chosen/rejected) instead of the mixed set
    unpaired: bool = False  # reads the pairs as unpaired rows: the chosen answer desirable, the rejected not
    reference: bool = False  # scores against a frozen reference model (the base, or the adapter it starts from)
    rewarded: bool = False  # samples completions of the domain prompts and trains toward train.grpo.rewards
    args_field: str | None = None  # the train.<field> of overrides of train.args for this method (dpo_args, ...)
    probe: bool = False  # the held-out general probe loss (an SFT-style loss) applies
    phases: tuple[str, ...] = ()  # a chain: the methods it runs, in order, each a row of this table
    needs_adapter: bool = False  # a chain continues one PEFT adapter from phase to phase (no `full`)
    min_rows: int = 32  # fewer training rows (pairs) than this: the stage stops before any step (train.min_rows)
    sequences_per_row: int = 1  # sequences forwarded per training row (DPO, ORPO: chosen and rejected; KTO: the
    # answer and its mismatched KL answer)
    logits_factor: float = 1.0  # logits kept alive per forwarded token, relative to SFT (the log-probabilities too)
    plot_fields: tuple[str, ...] = ()  # what it logs, besides the loss, as columns of the training plot

    @property
    def args_fields(self) -> tuple[str, ...]:
        """The train.<field>s of overrides that apply: this method's, or those of a chain's phases."""
        own = (self.args_field,) if self.args_field else ()
        return own + tuple(f for p in self.phases for f in METHODS[p].args_fields)

    @property
    def last(self) -> MethodKind:
        """The method that finishes the run: itself, or a chain's last phase."""
        return METHODS[self.phases[-1]] if self.phases else self

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


PAIRS = {"preference": True, "sequences_per_row": 2, "logits_factor": 1.5}  # chosen and rejected, with log-probs
SAMPLED = {"rewarded": True, "plot_fields": ("reward", "reward_std")}  # completions sampled, rewarded

METHODS: dict[str, MethodKind] = {
    "sft": MethodKind("sft", _sft_classes, probe=True),
    "dpo": MethodKind("dpo", _dpo_classes, reference=True, args_field="dpo_args", **PAIRS),
    "orpo": MethodKind("orpo", _orpo_classes, args_field="orpo_args", **PAIRS),
    "kto": MethodKind("kto", _kto_classes, unpaired=True, reference=True, args_field="kto_args", **PAIRS),
    "grpo": MethodKind("grpo", _grpo_classes, args_field="grpo_args", **SAMPLED),
    "sft+dpo": MethodKind("sft+dpo", None, phases=("sft", "dpo"), needs_adapter=True),
    "sft+kto": MethodKind("sft+kto", None, phases=("sft", "kto"), needs_adapter=True),
    "sft+grpo": MethodKind("sft+grpo", None, phases=("sft", "grpo"), needs_adapter=True),
}
