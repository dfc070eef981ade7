"""What a training run is before it starts: device defaults, the memory plan, and the multi-process launch.

The train stage and `tunegate check` both call these, so a refusal for memory is the same instant
one-liner in either place, computed from the base's config.json without loading any weights.

    train.args            passed to TRL unchanged; the device defaults below fill what it leaves out
    train.deterministic   None: deterministic kernels on CPU (bit-identical reruns), fast kernels on CUDA
    train.launch          {processes: N, config: infra/accelerate/<strategy>.yaml}: the stage re-runs
                          itself under `accelerate launch`; only the main process writes outputs
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunegate.adapters import ADAPTERS
from tunegate.config import Train
from tunegate.errors import UserError
from tunegate.methods import METHODS
from tunegate.preflight import Plan, Shape
from tunegate.runtime import free_port

LAUNCHED = "TUNEGATE_LAUNCHED"  # set in the processes `accelerate launch` starts for the stage


def device_defaults(cfg: Train, cuda: bool, bf16_supported: bool) -> dict[str, Any]:
    """Trainer settings that depend on the device, before train.args (which overrides any of them).

    On CPU: fp32, no gradient checkpointing (both slow CPU training down), deterministic kernels.
    On CUDA: bf16 where the GPU supports it, TF32 matmuls, and PyTorch's fast non-deterministic kernels
    unless train.deterministic asks otherwise (deterministic algorithms rule out the fused attention
    backward, which costs most of a GPU's throughput on long rows). The choice is recorded in metrics.
    """
    deterministic = (not cuda) if cfg.deterministic is None else cfg.deterministic
    return {
        "use_cpu": not cuda,
        "full_determinism": deterministic,
        "gradient_checkpointing": False,
        "bf16": bool(cuda and bf16_supported),
        **({"tf32": True} if cuda and not deterministic else {}),
    }


def resolved_args(cfg: Train, cuda: bool, bf16_supported: bool) -> dict[str, Any]:
    """The trainer settings that decide memory and speed: device defaults, then train.args, then the method's own
    overrides (train.dpo_args, orpo_args, kto_args) — what the stage hands TRL, less its bookkeeping (paths,
    seeds, logging)."""
    field = METHODS[cfg.method].args_field
    return {**device_defaults(cfg, cuda, bf16_supported), **cfg.args, **(getattr(cfg, field) if field else {})}


def preflight(
    cfg: Train, model_dir: str | Path, args: dict[str, Any] | None = None, budget: tuple[str, float] | None = None
) -> tuple[dict[str, float], str, float]:
    """The memory estimate for this machine's device, or the one-line refusal (a UserError); returns
    (estimate, device, free bytes). Reads only the base's config.json. args: the trainer settings already
    resolved (the train stage has them); None resolves them for this device. budget: (name, bytes) of a GPU
    to answer for instead of this machine's device (CUDA settings: bf16, TF32)."""
    from tunegate.preflight import available_bytes, check

    if args is None and budget is not None:
        args = resolved_args(cfg, True, True)
    if args is None:
        import torch

        cuda = torch.cuda.is_available()
        args = resolved_args(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
    shape = read_shape(model_dir)
    device, free = budget or available_bytes()
    return check(shape, largest_plan(cfg, args, shape), device, free), device, free


def largest_plan(cfg: Train, args: dict[str, Any], shape: Shape) -> Plan:
    """The plan of the phase that needs the most memory: the method itself, or the larger of a chain's phases
    (each with its own overrides: a GRPO phase's generation batch can outgrow the SFT phase)."""
    from tunegate.preflight import estimate

    plans = []
    for phase in METHODS[cfg.method].needs():
        own = getattr(cfg, phase.args_field) if phase.args_field and phase is not METHODS[cfg.method] else {}
        plans.append(plan(cfg, {**args, **own}, shape, phase.name))
    return max(plans, key=lambda p: estimate(shape, p)["total"])


# GPU memory as torch reports it (GiB), for `tunegate check --memory <name>`: hardware a user does not have yet
GPUS = {
    "t4": 14.6, "l4": 22.0, "a10g": 22.0, "rtx3090": 23.6, "rtx4090": 23.6, "a100-40gb": 39.4, "l40s": 44.4,
    "a6000": 47.5, "a100-80gb": 79.1, "h100": 79.1, "h100-80gb": 79.1, "h200": 139.8, "b200": 178.4,
}  # fmt: skip


def memory_budget(text: str) -> tuple[str, float]:
    """(device name, bytes) of `--memory`: a size (`24GiB`, `80GB`, `16g`, `24`: GiB) or a GPU's name from GPUS."""
    import re

    name = text.strip().lower()
    if name in GPUS:
        return name, GPUS[name] * 2**30
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|g)?", name)
    if not m:
        raise UserError(f"--memory {text}: a size (24GiB, 80GB) or one of {', '.join(GPUS)}")
    scale = 1e9 if m[2] == "gb" else 2**30
    return f"{text.strip()} GPU", float(m[1]) * scale


def local_base_dir(base_model: str, built: Path, built_model: str | None, root: Path = Path()) -> Path | None:
    """The folder of base.model here: itself when it is a local folder (relative to `root`), the built base only when
    it was built from this base.model (never a stale one); None for a hub base not built yet."""
    local = root / base_model
    if (local / "config.json").is_file():
        return local
    if built_model == base_model and (built / "config.json").is_file():
        return built
    return None


def base_config_dir(base_model: str, built: Path, built_model: str | None) -> tuple[Path | None, str]:
    """The folder whose config.json the memory estimate reads, and why: base.model itself when it is a local
    folder; its config.json alone from the hub (one small file) when it is a hub id; the built base only when
    it was built from this base.model (never a stale one)."""
    folder = local_base_dir(base_model, built, built_model)
    if folder is not None:
        return folder, str(folder) if folder == Path(base_model) else f"{base_model} (built in {built})"
    if base_model == "demo":
        return None, "the demo base is not built yet (dvc repro base)"
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(base_model, "config.json", etag_timeout=5)
    except Exception as err:  # offline, no such repo, gated: the estimate waits for the base stage
        detail = type(err).__name__
        return None, f"{base_model}'s config.json cannot be had ({detail}: offline or not on the hub)"
    return Path(path).parent, f"{base_model} (config.json from the hub)"


def packing_exact(model) -> bool:
    """Whether `model` computes each row of a padding-free packed batch exactly as that row alone: two short rows
    concatenated with restarting position ids and no attention mask (what TRL's padding-free batches hold, with the
    cache off as TRL trains), against each row's own forward. A model that lets the rows attend to each other, or
    that cannot take position ids, is not."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    first = torch.arange(3, 9).remainder(vocab).unsqueeze(0)
    second = torch.arange(11, 16).remainder(vocab).unsqueeze(0)
    device = next(model.parameters()).device
    packed = torch.cat([first, second], 1).to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits.float()
            alone = model(input_ids=second.to(device), use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    return bool(((together[:, 6:] - alone).abs().max() / scale) < 1e-2)


LOGPROB_TILE = 32_768  # vocabulary columns per tile of TRL's fused LM head (trl.trainer.utils, TRL 1.16)


def fit_logprob_tiles(vocab: int) -> int | None:
    """TRL computes every method's log-probabilities through its fused LM head, which scores the vocabulary in
    tiles of LOGPROB_TILE columns and allocates a `[tokens, LOGPROB_TILE]` buffer in forward and backward whatever
    the vocabulary. A vocabulary narrower than a tile gets tiles of its own width: the same single tile, so the same
    numbers, in a buffer malloc reuses instead of one mapped and faulted in twice a step (~170 MB at the demo's
    batches: its epoch 20-25% faster on CPU; docs/performance.md). Returns the width set; None where TRL has no
    such setting (another version: left to it). Larger vocabularies keep TRL's tiles."""
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return None
    if not isinstance(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int):
        return None
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(LOGPROB_TILE, vocab)
    return trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def attention_of(model) -> str:
    """The attention implementation a loaded model runs (transformers' own record of it)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


PADDING_FREE, ROWS = "padding-free", "rows"  # the two packed layouts (`packing_layout`)


def packing_layout(model) -> str:
    """How a packed batch is laid out for this model's attention: flash attention's variable-length kernels give
    each row of one long padding-free sequence only its own attention (TRL's layout); SDPA and eager attention
    would compute the whole sequence's, so there the packed sequences stay separate batch rows, each with its
    block-diagonal mask (tunegate.methods.row_packed_batch), each as long as the longest row at most."""
    return PADDING_FREE if attention_of(model).startswith("flash_attention") else ROWS


def packing_plan(model) -> tuple[bool, str]:
    """(pack?, why) for `train.packing: auto`: only where packing is exact for this model (`packing_exact`), in the
    layout its attention pays with (`packing_layout`). On CPU the demo trains the same tokens 1.4-1.6x as fast packed
    in rows (`python -m benchmarks.train packing`); one padding-free sequence per batch was slower there (0.3x:
    its attention spans the whole batch)."""
    if not packing_exact(model):
        return False, "this model lets packed rows attend to each other"
    impl = attention_of(model)
    if packing_layout(model) == PADDING_FREE:
        return True, f"exact for this model, one padding-free sequence per batch for {impl}'s variable-length kernels"
    return True, f"exact for this model, rows packed with block-diagonal masks for {impl} attention"


FLASH = "flash_attention_2"


def attention_plan(choice: str, cuda: bool, sixteen_bit: bool) -> tuple[str | None, str]:
    """(attention implementation to load the model with, why) for `train.attn_implementation`. auto: FlashAttention 2
    on a CUDA device with flash-attn installed and 16-bit training (its kernels take bf16/fp16 only; its
    variable-length kernels are also what makes `packing: auto` pay), else None: transformers' own choice (SDPA where
    the model has it, else eager). A named implementation is used as it is; flash attention where it cannot run is
    refused in one line before the model loads."""
    from importlib.util import find_spec

    flash = find_spec("flash_attn") is not None
    if choice != "auto":
        if choice == FLASH and not (cuda and flash):
            raise UserError(
                f"train.attn_implementation {FLASH}: needs a CUDA device and flash-attn installed (pip install "
                "flash-attn); set train.attn_implementation: auto (sdpa where it cannot run)"
            )
        return choice, "train.attn_implementation"
    if not cuda:
        return None, "auto: no CUDA device"
    if not flash:
        return None, "auto: flash-attn is not installed (pip install flash-attn for FlashAttention 2)"
    if not sixteen_bit:
        return None, "auto: training in float32, and flash attention takes bf16/fp16 only"
    return FLASH, "auto: CUDA with flash-attn, 16-bit training"


# What Liger patches when train.kernels turns it on: the per-layer kernels, exact for the model within float
# rounding. The loss is TRL's own fused LM head (log-probabilities in tiles, never the whole logits), so Liger's
# fused linear cross-entropy, which would replace the model's forward, stays off (TRL refuses it too).
LIGER_CONFIG = {
    "rms_norm": True,
    "rope": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


def kernels_plan(choice: str, cuda: bool, model_type: str) -> tuple[bool, str]:
    """(use Liger's kernels?, why) for `train.kernels`: auto turns them on where they can run (CUDA, liger-kernel
    installed) and have kernels for this architecture; `liger` where they cannot is refused in one line."""
    if choice == "none":
        return False, "train.kernels: none"
    problem = _liger_problem(cuda, model_type)
    if choice == "liger":
        if problem:
            raise UserError(f"train.kernels liger: {problem}; set train.kernels: auto (on where Liger runs) or none")
        return True, "train.kernels: liger"
    return (False, f"auto: {problem}") if problem else (True, f"auto: Liger has kernels for {model_type}")


def _liger_problem(cuda: bool, model_type: str) -> str | None:
    from importlib.util import find_spec

    if not cuda:
        return "Liger's kernels run on CUDA only"
    if find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for {model_type}"
    return None


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a launched one (decided from the launcher's
    environment, so it can be asked before the trainer sets up torch.distributed)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharded(accelerate_config: str | Path | None) -> bool:
    """Whether the accelerate config shards weights, gradients and optimizer states (FSDP, ZeRO-3)."""
    if not accelerate_config or not Path(accelerate_config).exists():
        return False
    import yaml

    doc = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    if doc.get("distributed_type") == "FSDP":
        return True
    return (
        doc.get("distributed_type") == "DEEPSPEED"
        and int((doc.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3
    )


def read_shape(model_dir: str | Path) -> Shape:
    """The model's shape from its config.json (no weights are read)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise UserError(f"{path}: missing; the base model folder needs its config.json")
    try:
        return Shape.from_config(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def plan(cfg: Train, args: dict[str, Any], shape: Shape, method: str | None = None) -> Plan:
    """The memory plan of one training phase with its resolved trainer settings (a chain: the phase named, or
    its first)."""
    kind = ADAPTERS[cfg.adapter]
    launch = cfg.launch
    processes = launch.processes if launch else 1
    phase = METHODS[method or cfg.method].first()
    batch, seq = int(args.get("per_device_train_batch_size", 8)), int(args.get("max_length", 1024))
    generated, kl = 0, False
    if phase.rewarded:  # GRPO: the prompt and a completion of up to max_completion_length (TRL's default 512)
        seq += int(args.get("max_completion_length", 512))
        generated = batch * int(args.get("steps_per_generation") or args.get("gradient_accumulation_steps", 1))
        kl = float(args.get("beta", 0.0)) > 0
    return Plan(
        adapter=cfg.adapter,
        trainable=shape.lora_params(cfg.lora.r, cfg.lora.target_modules) if kind.peft else shape.params,
        batch=batch,
        seq=seq,
        generated=generated,
        kl=kl,
        gradient_checkpointing=bool(args.get("gradient_checkpointing")),
        optim=str(args.get("optim", "adamw_torch")),
        bf16=bool(args.get("bf16") or args.get("fp16")),
        weights_16bit=shape.weights_16bit,
        method=phase.name,
        processes=processes,
        sharded=sharded(launch.config) if launch else False,
    )


def launch_command(cfg: Train, module: str = "stages.train") -> list[str]:
    """`accelerate launch` for the stage, with the config file and process count from train.launch.

    Precision is the trainer's decision (train.args bf16 / fp16, or the device default), so the launcher
    is told the same rather than the config file's `mixed_precision`. On a machine without GPUs the DDP
    config starts the processes all the same and they train on the CPU over gloo.
    """
    import sys

    import torch

    cuda = torch.cuda.is_available()
    args = resolved_args(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
    precision = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else "no"
    launch = cfg.launch
    if launch is None:
        raise ValueError("train.launch is not set")
    if not Path(launch.config).exists():
        raise UserError(f"train.launch.config {launch.config}: not found (see infra/accelerate/ for ready configs)")
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "accelerate"),
        "launch",
        "--config_file",
        launch.config,
        "--num_processes",
        str(launch.processes),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        precision,
        "-m",
        module,
    ]
