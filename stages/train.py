"""train: fine-tune the base with TRL + PEFT (SFT, DPO, ORPO, KTO, GRPO; LoRA, QLoRA, DoRA, full).

    python -m stages.train        # what dvc.yaml runs

A thin wrapper: the trainer is TRL's, adapters are PEFT's, 4-bit is bitsandbytes' NF4. `train.args` is
passed to the method's TRL config (SFTConfig, DPOConfig, ORPOConfig, KTOConfig, GRPOConfig) unchanged, so every
TRL knob is available and TRL validates it; train.dpo_args / orpo_args / kto_args / grpo_args override it for
that method. GRPO samples completions of the domain prompts and is rewarded by train.grpo.rewards
(tunegate.rewards: the gate's own scorers among them).
SFT rows are given to TRL as conversational prompt/completion pairs, so the loss is on the
assistant's answer only, whatever the base's chat template. A small held-out general set is
evaluated every `eval_steps` as a cheap forgetting probe (`eval_loss` beside the training loss);
`train.probe_max_rise` stops the run when that loss climbs. `train.method: sft+dpo` (sft+kto, sft+grpo) runs
SFT, then DPO (KTO, GRPO) from the SFT adapter, and still writes one adapter.
Checkpoints go to a persistent folder; a killed run resumes from the last one on the next repro.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunegate.adapters import ADAPTERS
from tunegate.config import Train, load_config
from tunegate.errors import UserError
from tunegate.formats import LABELLED, PAIR
from tunegate.io import publish, read_jsonl, sha256_file, sha256_of, sha256_tree, write_json
from tunegate.methods import METHODS, MethodKind
from tunegate.paths import (
    ADAPTER,
    CHAIN_SFT_CHECKPOINTS,
    CHAIN_SFT_RESULT,
    MERGED,
    PHASE_DONE,
    TRAIN_RECORD,
    TRAINING_ARGS,
    Layout,
    partial_of,
    run_checkpoints,
)
from tunegate.runtime import record_timing, route_trainer_logs, seed_everything, stage_main
from tunegate.training import (
    PADDING_FREE,
    ROWS,
    attention_of,
    fit_logprob_tiles,
    is_main_process,
    launch_command,
    resolved_args,
)

log = logging.getLogger(__name__)

PLOT_FIELDS = ("step", "loss", "learning_rate", "grad_norm", "probe_loss")
SPEED_FIELDS = ("step", "tokens", "tokens_per_second")  # step, tokens so far, tokens/s since the previous log
PEFT_CONFIG = "adapter_config.json"  # PEFT's name
TOKENIZER_CONFIG = "tokenizer_config.json"  # transformers' name
TRAINER_STATE = "trainer_state.json"  # the transformers Trainer's name, written last in a checkpoint


@dataclass(frozen=True)
class Inputs:
    """What one training run reads: the base and the rows (the stage's main() loads them from the mix)."""

    manifest: dict[str, Any]
    train_rows: list[dict[str, Any]]
    pref_rows: list[dict[str, Any]] = field(default_factory=list)
    probe_rows: list[dict[str, Any]] = field(default_factory=list)
    trust_remote_code: bool = False
    base_ref: str | None = None  # how the saved adapter names its base (hub id or project-relative path)
    rewards: list = field(default_factory=list)  # GRPO: tunegate.rewards.Reward, built from train.grpo.rewards
    domain_sources: frozenset[str] | None = None  # GRPO's prompts come from these sources' rows; None: every row

    @property
    def labelled(self) -> int:
        """How many of the preference rows are labelled answers (which only KTO reads)."""
        return sum(r.get("kind") == LABELLED for r in self.pref_rows)

    def rows_for(self, method: MethodKind) -> list[dict[str, Any]]:
        """The rows the method trains on: preference pairs (KTO: and labelled answers), the domain rows GRPO prompts
        with, or the mixed set."""
        if method.preference:
            kinds = (PAIR, LABELLED) if method.unpaired else (PAIR,)
            return [r for r in self.pref_rows if r.get("kind", PAIR) in kinds]
        if method.rewarded and self.domain_sources is not None:
            return [r for r in self.train_rows if r.get("source") in self.domain_sources]
        return self.train_rows


@dataclass(frozen=True)
class Outputs:
    """Where one training run writes: the result folder, its checkpoints and the plot files."""

    out_dir: Path
    ckpt_dir: Path
    plot_path: Path
    speed_path: Path | None = None
    step_offset: int = 0  # where this run's steps start in the plot files (after an earlier phase's)
    plot_fields: tuple[str, ...] = PLOT_FIELDS  # the plot's columns: the loss's, then what the method logs


def sft_examples(rows: list[dict[str, Any]], tokenizer) -> tuple[list[dict[str, list[int]]], int]:
    """Rows -> what the SFT trainer trains on: the conversation rendered by the chat template (with its
    tools), tokenised, and `assistant_masks` = 1 exactly on the tokens of every assistant turn whose
    weight is not 0 (TRL builds the labels from it: -100 everywhere else). Returns the examples and the
    number of rows the template cannot split into turns (only their final turn is trained; see
    tunegate.chat)."""
    from tunegate.chat import Renderer, tokenize

    render = Renderer(tokenizer)
    out, unstable = [], 0
    for row in rows:
        with _refused(row):
            ids, mask, stable = tokenize(tokenizer, render, row["messages"], row.get("tools"))
        unstable += not stable
        out.append({"input_ids": ids, "assistant_masks": mask})
    return out, unstable


@contextlib.contextmanager
def _refused(row: dict[str, Any]):
    """A row the chat template raises on (validate quarantines such rows; a file written by hand may still hold
    one) stops the stage in one line naming it, not with the template's traceback."""
    from jinja2 import TemplateError

    from tunegate.chat import first_line

    try:
        yield
    except TemplateError as err:
        where = f"{row.get('source', '?')} line {row.get('line', '?')} (id {row.get('id', '?')})"
        raise UserError(f"the chat template refuses the row from {where}: {first_line(err)}") from None


def _answered(rows: list[dict[str, Any]], tokenizer, sides: tuple[str, ...]) -> list[dict[str, list[int]]]:
    """Each row's prompt and its answers (`sides`) tokenised exactly as TRL tokenises a conversational row: the
    prompt with the generation prompt; an answer starts where the prompt's and the whole conversation's tokens
    diverge; the row's tools and tool turns rendered. Returns {"prompt_ids", "<side>_ids", ...} per row."""
    from tunegate.chat import Renderer, common_prefix, template_messages

    render = Renderer(tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for row in rows:
        tools, prompt = row.get("tools"), template_messages(row["prompt"])
        with _refused(row):
            prompt_ids = ids(render(prompt, tools, generation=True))
            answers = {side: ids(render(prompt + template_messages(row[side]), tools)) for side in sides}
        n = min(common_prefix(prompt_ids, answer) for answer in answers.values())
        out.append({"prompt_ids": prompt_ids[:n], **{f"{side}_ids": a[n:] for side, a in answers.items()}})
    return out


def preference_examples(rows: list[dict[str, Any]], tokenizer) -> list[dict[str, list[int]]]:
    """Preference rows -> DPO's prompt_ids / chosen_ids / rejected_ids (`_answered`)."""
    return _answered(rows, tokenizer, ("chosen", "rejected"))


def labelled_examples(rows: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """Labelled answers (KTO's unpaired rows read from a file) -> prompt_ids / completion_ids / label (`_answered`)."""
    answered = _answered(rows, tokenizer, ("completion",))
    return [{**e, "label": bool(row["label"])} for e, row in zip(answered, rows, strict=True)]


def unpaired_examples(
    pairs: list[dict[str, list[int]]], seed: int, labelled: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Tokenised pairs and labelled answers -> KTO's unpaired rows: a pair's chosen answer desirable (label true),
    its rejected one not, and each labelled answer as it is, in an order shuffled once with the seed (KTO reads its
    rows in order: each batch mixes both labels and its KL answers come from other prompts)."""
    import random

    rows = [
        {"prompt_ids": pair["prompt_ids"], "completion_ids": pair[f"{side}_ids"], "label": side == "chosen"}
        for pair in pairs
        for side in ("chosen", "rejected")
    ]
    rows += labelled
    random.Random(seed).shuffle(rows)
    return rows


def prompt_examples(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Rows -> GRPO's prompts: each conversation up to its last assistant turn as the prompt, that turn's text as
    the reference the rewards compare with. Returns them and how many rows had no text answer to compare with
    (the last turn a tool call, or no assistant turn), which are left out."""
    from tunegate.chat import template_messages

    out, skipped = [], 0
    for row in rows:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        answer = messages[last].get("content") if last is not None else None
        if last is None or not isinstance(answer, str) or not answer.strip() or row.get("tools"):
            skipped += 1
            continue
        out.append({"prompt": template_messages(messages[:last]), "reference": answer})
    return out, skipped


def peft_config(cfg: Train):
    kind = ADAPTERS[cfg.adapter]
    if not kind.peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
        use_dora=kind.dora,
        task_type="CAUSAL_LM",
    )


def _plot_callback(
    path: Path, speed_path: Path | None = None, step_offset: int = 0, plot_fields: tuple[str, ...] = PLOT_FIELDS
):
    from transformers import TrainerCallback

    class PlotRows(TrainerCallback):
        """Append each logged step to a CSV that `dvc plots show` draws (loss, lr, grad norm, probe).

        Tokens per second go to a separate, untracked CSV: a timing would make the DVC-tracked
        plot differ between two otherwise identical runs. step_offset continues the steps of an
        earlier phase in the same file (the DPO phase of sft+dpo follows the SFT phase's rows)."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # one writer when several processes train
                return
            start = step_offset + state.global_step
            for p, fields in ((path, plot_fields), (speed_path, SPEED_FIELDS)):
                if p is None:
                    continue
                p.parent.mkdir(parents=True, exist_ok=True)
                if start == 0 or not p.exists():
                    with p.open("w", newline="") as fh:
                        csv.writer(fh).writerow(fields)
                else:
                    # Rows logged after the checkpoint a resumed run starts from are logged again
                    # (identically) as it catches up: drop them so the file matches an uninterrupted run.
                    with p.open(newline="") as fh:
                        kept = [r for i, r in enumerate(csv.reader(fh)) if i == 0 or (r and int(r[0]) <= start)]
                    with p.open("w", newline="") as fh:
                        csv.writer(fh).writerows(kept)
            self.last = (time.perf_counter(), None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            logs = logs or {}
            if "num_tokens" in logs and speed_path is not None:
                now, tokens = time.perf_counter(), float(logs["num_tokens"])
                since, before = self.last
                if before is not None and tokens > before:
                    with speed_path.open("a", newline="") as fh:
                        csv.writer(fh).writerow(
                            [step_offset + state.global_step, int(tokens), round((tokens - before) / (now - since), 1)]
                        )
                self.last = (now, tokens)
            if "loss" not in logs and "eval_loss" not in logs:
                return
            row = [
                step_offset + state.global_step,
                logs.get("loss", ""),
                logs.get("learning_rate", ""),
                logs.get("grad_norm", ""),
                logs.get("eval_loss", ""),
                *(logs.get(name, "") for name in plot_fields[len(PLOT_FIELDS) :]),
            ]
            with path.open("a", newline="") as fh:
                csv.writer(fh).writerow(row)

    return PlotRows()


def _probe_stop_callback(max_rise: float, state: dict[str, Any]):
    """Stop training when the forgetting probe's loss rises more than max_rise above its lowest value.

    The probe is held-out general data, so a rising probe loss while the training loss falls is
    forgetting in progress; stopping keeps the adapter from the moment it was noticed.
    """
    from transformers import TrainerCallback

    class ProbeStop(TrainerCallback):
        def on_train_begin(self, args, trainer_state, control, **kwargs):
            # a resumed run remembers the lowest probe loss from the checkpoint's log history
            seen = [h["eval_loss"] for h in trainer_state.log_history if "eval_loss" in h]
            if seen:
                state["best"] = min(seen)

        def on_evaluate(self, args, trainer_state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            best = state.setdefault("best", loss)
            state["best"] = min(best, loss)
            if loss > state["best"] * (1 + max_rise):
                state["stopped_at"] = trainer_state.global_step
                log.warning(
                    "train: forgetting probe loss %.4f is %.0f%% above its lowest %.4f "
                    "(train.probe_max_rise %.0f%%); stopping at step %d",
                    loss,
                    100 * (loss / state["best"] - 1),
                    state["best"],
                    100 * max_rise,
                    trainer_state.global_step,
                )
                control.should_training_stop = True

    return ProbeStop()


def merge(manifest: dict[str, Any], adapter: Path, out: Path, trust_remote_code: bool = False) -> None:
    """Fold the adapter into a full-precision copy of the base and save it as plain safetensors.

    The base is always loaded unquantised here, so a QLoRA adapter is merged into de-quantised
    weights (merging into 4-bit layers would round the update away); the result loads in plain
    transformers or any runner that reads safetensors, with no PEFT needed.
    """
    from tunegate.models import load_tokenizer, load_with_adapter

    model = load_with_adapter(manifest, adapter, trust_remote_code, merge=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer({"path": str(adapter)}, trust_remote_code).save_pretrained(out)


def _portable(adapter: Path, base_ref: str) -> None:
    """Make the saved folder reproducible and pickle-free: no pickled TrainingArguments (the JSON copy
    is kept), no generated model card, and the base referenced by id / project-relative path rather
    than this machine's absolute path."""
    for name in ("training_args.bin", "README.md"):
        (adapter / name).unlink(missing_ok=True)
    config = adapter / PEFT_CONFIG
    if config.exists():
        doc = json.loads(config.read_text())
        doc["base_model_name_or_path"] = base_ref
        # PEFT writes target_modules from a set: its order follows the process's hash seed, so two
        # identical runs would differ in this file (and in the DVC hash of the output) without sorting.
        if isinstance(doc.get("target_modules"), list):
            doc["target_modules"] = sorted(doc["target_modules"])
        config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tokenizer_config = adapter / TOKENIZER_CONFIG
    if tokenizer_config.exists():  # how this process loaded files (HF_HUB_OFFLINE) is not part of the tokenizer
        doc = json.loads(tokenizer_config.read_text())
        if doc.pop("local_files_only", None) is not None:
            tokenizer_config.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _preflight(cfg: Train, manifest: dict[str, Any], args: dict[str, Any]) -> dict[str, float]:
    """Refuse, before any weights load, a run whose estimated peak memory does not fit the device
    (estimated from the base's config.json; see tunegate/preflight.py)."""
    from tunegate.preflight import GIB
    from tunegate.training import preflight

    est, device, free = preflight(cfg, manifest["path"], args)
    if is_main_process():
        log.info(
            "preflight: estimated peak %.2f GiB per device (weights %.2f, trainable+optimizer %.2f, activations %.2f) "
            "of %.1f GiB free on %s",
            est["total"] / GIB,
            est["weights"] / GIB,
            est["trainable"] / GIB,
            est["activations"] / GIB,
            free / GIB,
            device,
        )
    return est


def _last_checkpoint(ckpt_dir: Path, clean: bool = False) -> str | None:
    """The newest *complete* checkpoint. The trainer writes trainer_state.json last, so a checkpoint
    without a readable one was cut off mid-save (a kill during saving): skipped, and removed with clean."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(
        (p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for ckpt in found:
        try:
            json.loads((ckpt / TRAINER_STATE).read_text())
            return str(ckpt)
        except (OSError, ValueError):
            if clean:
                log.warning("removing incomplete checkpoint %s (interrupted while saving)", ckpt)
                shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _trainer_args(cfg: Train, seed: int, ckpt_dir: Path, with_probe: bool) -> dict[str, Any]:
    """The keyword arguments for the method's TRL config: the stage's fixed settings, then train.args (less the
    SFT-only keys the method's config lacks), then the method's overrides (train.dpo_args, orpo_args, ...)."""
    import torch

    cuda = torch.cuda.is_available()
    common = {
        "output_dir": str(ckpt_dir),
        "seed": seed,
        "data_seed": seed,
        "report_to": [],
        "save_strategy": "steps",
        "save_total_limit": 2,
        "logging_steps": 10,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # every adapter weight is used: skip DDP's extra graph walk
    }
    method = METHODS[cfg.method]
    # TRL's SFTConfig turns gradient checkpointing and bf16 on by default; the device decides here
    # (both slow CPU training down; bf16 and TF32 on a GPU that has them), train.args overrides.
    args = {**common, **resolved_args(cfg, cuda, cuda and torch.cuda.is_bf16_supported())}
    for key in _not_for(method, cfg):
        del args[key]
    if with_probe and method.probe:  # the forgetting probe is an SFT-style held-out loss
        args.setdefault("eval_strategy", "steps")
        args.setdefault("eval_steps", args.get("save_steps", 50))
    else:
        args["eval_strategy"] = "no"
    return args


def _not_for(method: MethodKind, cfg: Train) -> list[str]:
    """Keys of train.args that SFT's config has and this method's does not (packing and completion_only_loss for
    DPO, max_length for GRPO, which cuts completions at max_completion_length): left out for it, unless the
    method's own overrides set them (then TRL names them). A key no config has is kept, for TRL to name."""
    import dataclasses

    from trl import SFTConfig

    if method.classes is None:
        return []
    own = getattr(cfg, method.args_field) if method.args_field else {}
    fields = {f.name for f in dataclasses.fields(method.classes()[0])}
    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    return [k for k in cfg.args if k not in fields and k in sft and k not in own]


def _trainer_config(cfg: Train, args: dict[str, Any]):
    """TRL's config for the method; a bad name or value in train.args / train.<method>_args ends in one line."""
    method = METHODS[cfg.method]
    config_cls, _ = method.classes()
    overrides = method.args_field and getattr(cfg, method.args_field)
    keys = "train.args" + (f" / train.{method.args_field}" if overrides else "")
    try:
        return config_cls(**args)
    except (TypeError, ValueError) as err:  # an unknown key, or a value TRL rejects
        raise UserError(f"{keys}: {err}") from None


def _datasets(method: MethodKind, data: Inputs, tokenizer, args: dict[str, Any] | None = None, truncate: bool = True):
    """(training set, probe set) in the shape TRL's trainer for the method reads. SFT rows and the
    forgetting probe are tokenised here with the same rendering and loss mask (`sft_examples`). Rows
    longer than `max_length` stop the stage with their count unless `truncate` (packing cuts them too)."""
    from datasets import Dataset

    args = args or {}
    if method.rewarded:
        prompts, skipped = prompt_examples(data.rows_for(method))
        if skipped:
            log.warning("train: %d rows have no text answer for the rewards to compare with: left out", skipped)
        return Dataset.from_list(prompts), None
    if method.preference:
        return Dataset.from_list(_preference_set(method, data, tokenizer, args, truncate)), None
    examples, unstable = sft_examples(data.train_rows, tokenizer)
    if unstable:
        log.warning(
            "train: %d of %d rows trained on their final assistant turn only: the chat template renders earlier "
            "turns differently once later ones follow",
            unstable,
            len(examples),
        )
    _check_lengths([len(e["input_ids"]) for e in examples], args, truncate)  # packing cuts them too (TRL's BFD)
    probe = Dataset.from_list(sft_examples(data.probe_rows, tokenizer)[0]) if data.probe_rows else None
    return Dataset.from_list(examples), probe


def _preference_set(method: MethodKind, data: Inputs, tokenizer, args: dict[str, Any], truncate: bool) -> list[dict]:
    """A preference method's rows tokenised: pairs, and for KTO the pairs unpaired plus the labelled answers. A
    method that reads pairs only says how many labelled answers it leaves to KTO."""
    rows = data.rows_for(method)
    examples = preference_examples([r for r in rows if r.get("kind", PAIR) == PAIR], tokenizer)
    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    if not method.unpaired:
        if left := data.labelled:
            log.warning(
                "train: %d labelled answers (prompt, completion, label) are read by kto only: %s trains on "
                "the %d pairs",
                left,
                method.name,
                len(examples),
            )
        _check_lengths(lengths, args, truncate)
        return examples
    labelled = labelled_examples([r for r in rows if r.get("kind") == LABELLED], tokenizer)
    _check_lengths(lengths + [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in labelled], args, truncate)
    return unpaired_examples(examples, args.get("seed", 0), labelled)


def _check_lengths(lengths: list[int], args: dict[str, Any], truncate: bool) -> None:
    """Rows the trainer would cut to max_length: counted, and refused unless train.truncate is set."""
    limit = args.get("max_length")
    if not isinstance(limit, int) or not lengths:
        return
    over = sorted(n for n in lengths if n > limit)
    if not over:
        return
    what = (
        f"{len(over)} of {len(lengths)} rows are longer than train.args.max_length {limit} tokens (longest {over[-1]})"
    )
    if truncate:
        log.warning("train: %s; they are cut to %d (train.truncate: true)", what, limit)
        return
    raise UserError(
        f"train: {what}; training would cut them without a word. Raise train.args.max_length to {over[-1]}, "
        "lower validate.max_tokens, or set train.truncate: true"
    )


def run(
    cfg: Train, seed: int, data: Inputs, out: Outputs, init_adapter: Path | None = None, recorded: Train | None = None
) -> dict[str, Any]:
    """Train and write out.out_dir/adapter (or full weights), tokenizer and config; returns training metrics.

    init_adapter: continue training this adapter (the SFT -> DPO chain) instead of a fresh one; for
    DPO, TRL then uses a frozen copy of it as the reference model. recorded: the config written to
    train_config.json when it is not cfg (the chain records itself, not its DPO phase).

    The steps read top to bottom: check (before any weights load), set up, train, save, report.
    """
    if METHODS[cfg.method].phases:
        return _chain(cfg, seed, data, out)
    args, trainer_args, estimate = _check(cfg, seed, data, out)
    trainer, tokenizer, probe_state = _setup(cfg, data, out, args, trainer_args, init_adapter)
    resume, result, seconds = _train(trainer, out)
    _save(cfg, seed, data, out, trainer, tokenizer, recorded)
    metrics = _metrics(cfg, trainer, result, out, resume, probe_state, estimate, seconds)
    if METHODS[cfg.method].rewarded:  # what it was trained toward, and the completions a reward raised on
        from tunegate.rewards import report_errors

        metrics["reward_code"] = {r.name: r.code_sha256 for r in data.rewards}
        metrics["reward_errors"] = report_errors(data.rewards)
    return metrics


def rows_named(method: MethodKind) -> str:
    """What the method's training rows are called in the stage's lines."""
    if method.unpaired:
        return "preference pairs and labelled answers"
    return "preference pairs" if method.preference else "domain prompts" if method.rewarded else "training rows"


def enough_rows(cfg: Train, data: Inputs) -> None:
    """Each method of the run has at least its `min_rows` training rows (pairs for a preference method), or the
    stage stops before any weights load, naming the sources the rows came from and the settings that decide."""
    for method in METHODS[cfg.method].needs():
        rows = data.rows_for(method)
        need = cfg.min_rows or method.min_rows
        if len(rows) >= need:
            continue
        what = rows_named(method)
        sources = Counter(str(r.get("source", "?")) for r in rows)
        from_ = ", ".join(f"{n} from {s}" for s, n in sources.most_common()) or "none from any source"
        labelled = data.labelled if method.preference else 0
        unread = f"; the {labelled} labelled answers are read by kto only" if labelled and not method.unpaired else ""
        raise UserError(
            f"train.method {cfg.method}: {method.name} has {len(rows)} {what} ({from_}), fewer than min_rows {need}"
            f"{unread}: too few to learn from; see data/dedup/report.md for what dedup removed (dedup.threshold, "
            "dedup.contamination_ngram) and add data, or set train.min_rows"
        )


def loss_line(metrics: dict[str, Any]) -> str:
    """The loss the run logged last, or the run's mean when no step was logged (fewer steps than logging_steps)."""
    if metrics.get("final_loss") is not None:
        return f"loss {metrics['final_loss']:.3f}"
    return f"mean loss {metrics['train_loss']:.3f} (no step logged: fewer steps than logging_steps)"


def _check(cfg: Train, seed: int, data: Inputs, out: Outputs) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """(trainer settings, TRL's config, the memory estimate): a typo in train.args, an empty training set
    or a run that cannot fit ends here, before the base is loaded."""
    method = METHODS[cfg.method]
    if not data.rows_for(method):
        raise UserError(f"train.method {cfg.method}: the training set is empty (check the mix stage's manifest)")
    if cfg.probe_max_rise and method.probe and not data.probe_rows:
        log.warning(
            "train: train.probe_max_rise is set but there are no probe rows (probe.jsonl is empty): no early stop"
        )
    args = _trainer_args(cfg, seed, out.ckpt_dir, bool(data.probe_rows))
    if method.rewarded and args.get("use_vllm"):  # refused here, before the base loads, not by TRL's trainer after it
        from tunegate.models import require_vllm

        require_vllm("train.grpo_args.use_vllm")
    trainer_args = _trainer_config(cfg, args)  # before the base is loaded: a typo costs nothing
    estimate = _preflight(cfg, data.manifest, args)  # from config.json: a run that cannot fit costs nothing either
    seed_everything(seed, deterministic=bool(args["full_determinism"]))
    return args, trainer_args, estimate


def _setup(cfg: Train, data: Inputs, out: Outputs, args: dict[str, Any], trainer_args, init_adapter: Path | None):
    """(TRL's trainer, the tokenizer, the probe's early-stop state): the base as the adapter kind loads it,
    the datasets as the method reads them, the callbacks (plots, throughput, the forgetting probe)."""
    from tunegate.models import load_tokenizer

    method, kind, manifest = METHODS[cfg.method], ADAPTERS[cfg.adapter], data.manifest
    tokenizer = load_tokenizer(manifest, data.trust_remote_code)
    model = _load_for_training(cfg, manifest, data.trust_remote_code, trainer_args)
    if (head := model.get_output_embeddings()) is not None:
        fit_logprob_tiles(head.weight.shape[0])
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(
            f"tokenizer ({len(tokenizer)} tokens) does not match the base model's embeddings; check base.model"
        )
    if kind.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args["gradient_checkpointing"]))
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    layout = _decide_packing(cfg, method, model, args, trainer_args)
    _decide_kernels(cfg, model, args, trainer_args)
    _, trainer_cls = method.classes()
    train_ds, probe_ds = _datasets(method, data, tokenizer, args, cfg.truncate)
    probe_state: dict[str, Any] = {}
    callbacks = [_plot_callback(out.plot_path, out.speed_path, out.step_offset, out.plot_fields)]
    if cfg.probe_max_rise and probe_ds is not None:
        callbacks.append(_probe_stop_callback(cfg.probe_max_rise, probe_state))
    extra: dict[str, Any] = {}
    if layout == ROWS:
        _pack_to_longest(trainer_args, train_ds, probe_ds)
        extra["rows_packed"] = True
    if method.rewarded:  # GRPO: the rewards, weighted as train.grpo.rewards says
        extra["reward_funcs"] = [r.batch() for r in data.rewards]
        trainer_args.reward_weights = [r.weight for r in data.rewards]
    with _quiet_datasets():  # TRL's bookkeeping maps over rows tokenised here: no bars of their own
        trainer = trainer_cls(
            model=model,
            args=trainer_args,
            train_dataset=train_ds,
            eval_dataset=probe_ds,
            processing_class=tokenizer,
            peft_config=None if init_adapter is not None else peft_config(cfg),
            callbacks=callbacks,
            **extra,
        )
    route_trainer_logs(trainer)  # the bar stays on the console, the per-step metric dicts go to the log file
    return trainer, tokenizer, probe_state


def _load_for_training(cfg: Train, manifest: dict[str, Any], trust_remote_code: bool, trainer_args):
    """The base as the adapter kind trains it, with the attention `train.attn_implementation` chooses
    (tunegate.training.attention_plan), said in one line with the implementation the model really got."""
    import torch

    from tunegate.models import load_model
    from tunegate.training import attention_plan

    cuda = torch.cuda.is_available()
    quantize_4bit = ADAPTERS[cfg.adapter].quantize_4bit
    sixteen_bit = bool(trainer_args.bf16 or trainer_args.fp16) or quantize_4bit
    impl, why = attention_plan(cfg.attn_implementation, cuda, sixteen_bit)
    try:
        model = load_model(manifest, trust_remote_code, quantize_4bit=quantize_4bit, attn_implementation=impl)
    except (ValueError, ImportError) as err:
        if cfg.attn_implementation != "auto":
            raise UserError(f"train.attn_implementation {impl}: {str(err).splitlines()[0]}") from None
        why = f"auto: {impl} refused by this model ({str(err).splitlines()[0][:120]})"
        model = load_model(manifest, trust_remote_code, quantize_4bit=quantize_4bit)
    log.info("train: attention %s (%s)", attention_of(model), why)
    return model


def _decide_kernels(cfg: Train, model, args: dict[str, Any], trainer_args) -> None:
    """`train.kernels` into the trainer's settings (tunegate.training.kernels_plan), said in one line;
    `use_liger_kernel` in train.args wins."""
    import torch

    from tunegate.training import LIGER_CONFIG, kernels_plan

    if "use_liger_kernel" in cfg.args:
        return
    on, why = kernels_plan(cfg.kernels, torch.cuda.is_available(), str(model.config.model_type))
    log.info("train: Liger kernels %s (%s)", "on" if on else "off", why)
    args["use_liger_kernel"] = trainer_args.use_liger_kernel = on
    if on:
        args["liger_kernel_config"] = trainer_args.liger_kernel_config = dict(LIGER_CONFIG)


@contextlib.contextmanager
def _quiet_datasets():
    """The datasets library's progress bars off for the block (back as they were after)."""
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _decide_packing(cfg: Train, method: MethodKind, model, args: dict[str, Any], trainer_args) -> str | None:
    """`train.packing` into the trainer's settings, and the packed layout (tunegate.training.packing_layout) or
    None: true packs, auto packs where it is exact for the loaded model (tunegate.training.packing_plan), said in
    one line; `packing` in train.args wins over both and goes to TRL as it is (its padding-free layout)."""
    from tunegate.training import packing_layout, packing_plan

    if "packing" in cfg.args:
        return PADDING_FREE if args["packing"] else None
    if method.preference or method.rewarded or cfg.packing is False:  # SFT rows only
        return None
    if cfg.packing == "auto":
        exact, why = packing_plan(model)
        log.info("train: packing %s (auto: %s)", "on" if exact else "off", why)
    else:
        exact = True
    args["packing"] = trainer_args.packing = exact
    return packing_layout(model) if exact else None


def _pack_to_longest(trainer_args, *datasets) -> None:
    """Rows packed as batch rows (tunegate.training.ROWS) fill sequences as long as the longest row, not max_length:
    each sequence's attention costs what that row's alone did, where packing the demo's rows (41 tokens on average,
    79 at most) to max_length 256 made an epoch 0.63x as fast as unpacked instead of 1.39x
    (`python -m benchmarks.train packing`)."""
    import pyarrow.compute as pc

    longest = max(
        pc.max(pc.list_value_length(ds.data.column("input_ids"))).as_py() for ds in datasets if ds is not None
    )
    limit = trainer_args.max_length
    trainer_args.max_length = longest if limit is None else min(limit, longest)


def _train(trainer, out: Outputs) -> tuple[str | None, Any, float]:
    """(the checkpoint resumed from, TRL's result, seconds). With several processes only the main one writes
    or removes files; the others wait for it."""
    main, everyone = trainer.is_world_process_zero(), trainer.accelerator.wait_for_everyone
    if main:
        _last_checkpoint(out.ckpt_dir, clean=True)
    everyone()
    resume = _last_checkpoint(out.ckpt_dir)
    if resume and main:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    return resume, result, time.perf_counter() - started


def _save(cfg: Train, seed: int, data: Inputs, out: Outputs, trainer, tokenizer, recorded: Train | None) -> None:
    """The adapter (or full weights), tokenizer, settings and the record of what was trained, written beside
    the output and renamed into place, so the folder is complete or absent; the path is the same in every
    process because save_model is called by all of them (FSDP / ZeRO-3 gather here)."""
    main, everyone = trainer.is_world_process_zero(), trainer.accelerator.wait_for_everyone
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen DPO reference copy: not part of the result
    partial = partial_of(out.out_dir)
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    everyone()
    trainer.save_model(str(partial / ADAPTER))
    everyone()
    if main:
        manifest = data.manifest
        tokenizer.save_pretrained(partial / ADAPTER)
        _portable(partial / ADAPTER, data.base_ref or manifest["model"])
        write_json(partial / TRAINING_ARGS, json.loads(trainer.args.to_json_string()))
        # what was trained, read by eval_candidate and register (method, adapter kind, base)
        write_json(partial / TRAIN_RECORD, {**(recorded or cfg).model_dump(), "seed": seed, "base": manifest["model"]})
        if cfg.merge and ADAPTERS[cfg.adapter].peft:
            merge(manifest, partial / ADAPTER, partial / MERGED, data.trust_remote_code)
        publish(partial, out.out_dir)
        shutil.rmtree(out.ckpt_dir, ignore_errors=True)  # the run is complete: nothing left to resume
    everyone()


def _metrics(
    cfg: Train, trainer, result, out: Outputs, resume, probe_state: dict, estimate: dict, seconds: float
) -> dict[str, Any]:
    """What the run did, for metrics/train.json and the provenance: steps, losses, the probe, the device."""
    trainer_args, history = trainer.args, trainer.state.log_history
    probe = [h["eval_loss"] for h in history if "eval_loss" in h]
    effective_batch = (
        trainer_args.per_device_train_batch_size
        * trainer_args.gradient_accumulation_steps
        * max(1, trainer_args.world_size)
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "method": cfg.method,
        "adapter": cfg.adapter,
        "steps": trainer.state.global_step,
        "effective_batch_size": effective_batch,
        "train_loss": round(result.training_loss, 4),
        "final_loss": next((round(h["loss"], 4) for h in reversed(history) if "loss" in h), None),
        "probe_loss_first": round(probe[0], 4) if probe else None,
        "probe_loss_last": round(probe[-1], 4) if probe else None,
        "trainable_parameters": trainable,
        "resumed_from": Path(resume).name if resume else None,
        "stopped_early_at": probe_state.get("stopped_at"),
        **_preference_rewards(METHODS[cfg.method].last.name, history),
        **_grpo_rewards(cfg, history),
        "preflight_peak_gib": round(estimate["total"] / 2**30, 3),
        "processes": max(1, trainer_args.world_size),
        "device": _device_name(),
        "deterministic": bool(trainer_args.full_determinism),
        "packing": bool(getattr(trainer_args, "packing", False)),
        "packing_layout": _layout_of(trainer),
        "attn_implementation": attention_of(trainer.model),
        "liger_kernels": bool(trainer_args.use_liger_kernel),
        "bf16": bool(trainer_args.bf16),
        "adapter_sha256": sha256_tree(out.out_dir / ADAPTER, "*.safetensors"),
        "tokens": next((int(h["num_tokens"]) for h in reversed(history) if "num_tokens" in h), None),
        "seconds": round(seconds, 1),
    }


def _layout_of(trainer) -> str | None:
    """The packed layout the trainer trained with (tunegate.training.packing_layout), or None: unpacked."""
    if not getattr(trainer.args, "packing", False):
        return None
    return ROWS if getattr(trainer, "rows_packed", False) else PADDING_FREE


def _device_name() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"


# What a preference method logs (TRL's names) -> the run's metric, prefixed with the method: the reward margin and
# accuracy of chosen over rejected (DPO, ORPO), the rewards of desirable and undesirable answers (KTO), ORPO's
# log odds ratio
PREFERENCE_LOGS = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "log_odds_ratio": "log_odds_ratio",
}


def _grpo_rewards(cfg: Train, history: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO's reward: its first and last logged mean (the run's direction), its spread, each reward function's
    last mean, and the KL to the reference when beta > 0."""
    if not METHODS[cfg.method].rewarded:
        return {}
    logged = [h for h in history if "reward" in h]
    if not logged:
        return {}
    first, last = logged[0], logged[-1]
    found = {
        "grpo_reward_first": round(float(first["reward"]), 4),
        "grpo_reward_last": round(float(last["reward"]), 4),
        "grpo_reward_std": round(float(last.get("reward_std", 0.0)), 4),
        "grpo_rewards": {
            k.removeprefix("rewards/").removesuffix("/mean"): round(float(v), 4)
            for k, v in last.items()
            if k.startswith("rewards/") and k.endswith("/mean")
        },
    }
    if "kl" in last:
        found["grpo_kl"] = round(float(last["kl"]), 4)
    return found


def _preference_rewards(method: str, history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each of PREFERENCE_LOGS, as `<method>_<name>` (dpo_reward_margin, ...)."""
    found = {}
    for logged, name in PREFERENCE_LOGS.items():
        last = next((h[logged] for h in reversed(history) if logged in h), None)
        if last is not None and method != "sft":
            found[f"{method}_{name}"] = round(float(last), 4)
    return found


def _chain(cfg: Train, seed: int, data: Inputs, out: Outputs) -> dict[str, Any]:
    """SFT on the mixed set, then the chain's preference method (DPO, KTO) on the preference rows, starting from
    (and referenced to) that adapter.

    The second phase gets train.args without SFT-only keys (packing, completion_only_loss, ...), then its own
    overrides (train.dpo_args, kto_args). Both phases' TRL configs are checked before any training, so a typo
    there does not surface after the SFT phase has spent its compute. Each phase checkpoints in its own folder
    under ckpt_dir (the second in one named after its method); the SFT result is kept there until the chain
    completes, so a run killed during the second phase resumes it without redoing SFT. The output is one
    adapter relative to the base, like any other run; the plot continues the SFT phase's steps with the next's.
    """
    sft_cfg, pref_cfg = _chain_phases(cfg, data)
    ckpt_dir, name = out.ckpt_dir, pref_cfg.method
    sft_dir, sft_ckpt, pref_ckpt = ckpt_dir / CHAIN_SFT_RESULT, ckpt_dir / CHAIN_SFT_CHECKPOINTS, ckpt_dir / name
    for phase_cfg, phase_ckpt in ((sft_cfg, sft_ckpt), (pref_cfg, pref_ckpt)):
        _trainer_config(phase_cfg, _trainer_args(phase_cfg, seed, phase_ckpt, bool(data.probe_rows)))
    done = sft_dir / PHASE_DONE  # written after the SFT adapter: its existence means the phase completed
    if done.exists():
        sft = json.loads(done.read_text())
        log.info("train: SFT phase already complete (%s); continuing with %s", sft_dir, name.upper())
    else:
        log.info("train: %s, phase 1 of 2: SFT on %d rows", cfg.method, len(data.train_rows))
        sft = run(sft_cfg, seed, replace(data, pref_rows=[]), replace(out, out_dir=sft_dir, ckpt_dir=sft_ckpt))
        if is_main_process():
            write_json(done, sft)
    phase = METHODS[name]
    what = rows_named(phase)
    log.info(
        "train: %s, phase 2 of 2: %s on %d %s, from the SFT adapter",
        cfg.method,
        name.upper(),
        len(data.rows_for(phase)),
        what,
    )
    second = run(
        pref_cfg,
        seed,
        replace(data, train_rows=[] if phase.preference else data.train_rows, probe_rows=[]),
        replace(out, ckpt_dir=pref_ckpt, step_offset=sft["steps"]),
        init_adapter=sft_dir / ADAPTER,
        recorded=cfg,
    )
    if is_main_process():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {
        **second,
        "method": cfg.method,
        "packing": sft.get("packing", False),  # only the SFT phase packs
        "packing_layout": sft.get("packing_layout"),
        "sft": {k: sft.get(k) for k in CHAIN_SFT_METRICS},
        "seconds": round(sft["seconds"] + second["seconds"], 1),
    }


# What the chain's metrics keep of its SFT phase (as train.sft.* in MLflow)
CHAIN_SFT_METRICS = (
    "steps",
    "train_loss",
    "final_loss",
    "probe_loss_first",
    "probe_loss_last",
    "stopped_early_at",
    "adapter_sha256",
    "seconds",
)


def _chain_phases(cfg: Train, data: Inputs) -> tuple[Train, Train]:
    """The SFT and preference phases' settings of a chain (sft+dpo, sft+kto), or one line saying why it cannot
    run: the second phase gets train.args without SFT-only keys (packing, completion_only_loss, ...), then its
    own overrides."""

    chain = METHODS[cfg.method]
    second = chain.last
    if chain.needs_adapter and not ADAPTERS[cfg.adapter].peft:
        raise UserError(f"train.method {cfg.method}: needs an adapter (train.adapter lora, qlora or dora), not full")
    if not data.rows_for(second):
        raise UserError(
            f"train.method {cfg.method}: no {'preference' if second.preference else 'domain'} rows for the "
            f"{second.name.upper()} phase (add a source with role: {'preference' if second.preference else 'domain'})"
        )
    if not data.train_rows:
        raise UserError(f"train.method {cfg.method}: the training set is empty (check the mix stage's manifest)")
    no_overrides = {name: {} for name in chain.args_fields}
    sft_cfg = cfg.model_copy(update={"method": "sft", **no_overrides, "merge": False})
    # the SFT-only keys of train.args are left out when the second phase's settings are made (_not_for)
    pref_cfg = cfg.model_copy(update={"method": second.name, "probe_max_rise": None})
    return sft_cfg, pref_cfg


def checkpoint_folder(cfg: Train, seed: int, data_files: tuple[Path, ...], base_weights: Any) -> str:
    """The checkpoint folder's name, keyed by everything that defines the run (settings, seed, the training
    files' bytes, the base weights), so a resume never continues a checkpoint of another config or data."""
    return run_checkpoints(sha256_of([cfg.model_dump(), seed, *map(sha256_file, data_files), base_weights])[:12])


def _launched(cfg: Train) -> int | None:
    """With train.launch set, re-run this stage under `accelerate launch` (one process per device) and
    return its exit code; None when this process should train itself."""
    import os
    import subprocess

    from tunegate.training import LAUNCHED

    if cfg.launch is None or cfg.launch.processes < 2 or os.environ.get(LAUNCHED):
        return None
    command = launch_command(cfg)
    log.info("train: %d processes: %s", cfg.launch.processes, " ".join(command[1:]))
    return subprocess.run(command, env={**os.environ, LAUNCHED: "1"}).returncode


def main() -> None:
    def body() -> None:
        from tunegate.models import load_manifest

        cfg = load_config()
        code = _launched(cfg.train)
        if code is not None:
            if code:
                raise UserError(
                    f"train: `accelerate launch` with {cfg.train.launch.processes} processes failed (exit {code})"
                )
            return
        layout = Layout.of(cfg.paths)
        for path in (layout.mix_train, layout.mix_preferences, layout.mix_probe):
            if not path.exists():
                raise UserError(f"{path}: missing; run the mix stage first (dvc repro mix)")
        manifest = load_manifest(layout.base)
        method = METHODS[cfg.train.method]
        rewards = []
        if method.last.rewarded:  # checked now: a wrong task, metric or import costs nothing
            from tunegate.rewards import build

            rewards = build(cfg.train.grpo.rewards, layout.eval_tasks)
        keyed = manifest["weights_sha256"]  # the checkpoints' key: with GRPO, the rewards' code too
        keyed = [keyed, [r.code_sha256 for r in rewards]] if rewards else keyed
        checkpoints = checkpoint_folder(cfg.train, cfg.seed, (layout.mix_train, layout.mix_preferences), keyed)
        data = Inputs(
            manifest=manifest,
            train_rows=read_jsonl(layout.mix_train),
            pref_rows=read_jsonl(layout.mix_preferences),
            probe_rows=read_jsonl(layout.mix_probe),
            trust_remote_code=cfg.base.trust_remote_code,
            base_ref=cfg.paths.base if cfg.base.is_demo else cfg.base.model,
            rewards=rewards,
            domain_sources=frozenset(name for name, s in cfg.data.sources.items() if s.role == "domain"),
        )
        out = Outputs(
            layout.train,
            layout.checkpoints / checkpoints,
            layout.train_plot,
            speed_path=layout.throughput,
            plot_fields=PLOT_FIELDS + method.last.plot_fields,
        )
        enough_rows(cfg.train, data)
        metrics = run(cfg.train, cfg.seed, data, out)
        if not is_main_process():
            return
        seconds = metrics.pop("seconds")
        write_json(layout.metrics("train"), metrics)
        record_timing("train", seconds)
        log.info("train: %d steps, %s, %.0fs", metrics["steps"], loss_line(metrics), seconds)

    stage_main("train", body)


if __name__ == "__main__":
    main()
