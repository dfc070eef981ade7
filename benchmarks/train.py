"""Training benchmarks: wrapper overhead vs plain TRL, memory (preflight estimate vs measured; QLoRA vs
16-bit LoRA), and the padding share with and without packing.

    python -m benchmarks.train overhead     # tunegate's train stage vs a plain TRL script, demo model
    python -m benchmarks.train memory       # ~100M-parameter Llama: lora fp32 / lora bf16 / qlora / full
    python -m benchmarks.train packing      # padding share of the batches, and one epoch of the train stage
                                            # on the same rows unpacked, packed in rows (block-diagonal masks)
                                            # and padding-free (same tokens)
    python -m benchmarks.train packing-layouts  # forward + backward of the demo base over the same rows unpacked,
                                            # padding-free (TRL's packing) and packed into 128-token rows with
                                            # block-diagonal masks: what packing can give on CPU
    python -m benchmarks.train grpo         # GRPO steps/s (transformers generation) beside SFT steps/s on the
                                            # same domain prompts, demo base; then GRPO's memory plans for
                                            # Llama-3.2-1B and Llama-3-8B shapes (config.json only)
    python -m benchmarks.train grpo-held-out --steps 40   # held-out json_fields of a 40-step SFT adapter and of
                                            # GRPO from it in eight settings (docs/training.md)

`overhead`, `packing`, `packing-layouts`, `grpo` and `grpo-held-out` need the demo base and mixed data (`make demo`
first). `memory` builds a random ~100M-parameter Llama (no download) and runs each configuration in a fresh process
so that each peak RSS is its own; timings are interleaved, median of --repeat.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tunegate.config import Lora, Train, load_config
from tunegate.io import read_jsonl
from tunegate.runtime import configure

ROOT = Path(__file__).resolve().parents[1]


def _demo() -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    from tunegate.models import load_manifest

    cfg = load_config()
    manifest = load_manifest(cfg.paths.base)
    rows = read_jsonl(Path(cfg.paths.mix) / "train.jsonl")
    return cfg, manifest, rows


# -- overhead --------------------------------------------------------------------------------------


def plain_trl(cfg, manifest: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> float:
    """What a user would write by hand: the same model, data, LoRA and SFTConfig, straight into TRL."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    model = AutoModelForCausalLM.from_pretrained(manifest["path"])
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    lora = cfg.train.lora
    settings = {
        "output_dir": str(out),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "bf16": False,
        "full_determinism": True,
        "dataloader_num_workers": 0,
    }
    settings.update(
        (k, v) for k, v in cfg.train.args.items() if k not in ("save_steps", "eval_steps", "per_device_eval_batch_size")
    )
    args = SFTConfig(**settings)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out / "adapter"))
    return seconds


def tunegate_stage(
    cfg, manifest: dict[str, Any], rows: list[dict[str, Any]], out: Path, probe: list[dict[str, Any]]
) -> float:
    from stages import train

    metrics = train.run(
        cfg.train,
        cfg.seed,
        train.Inputs(manifest, rows, [], probe),
        train.Outputs(out / "model", out / "ckpt", out / "plots.csv"),
    )
    return metrics["seconds"]


def overhead(repeat: int, steps: int) -> None:
    cfg, manifest, rows = _demo()
    cfg.train.args.update(max_steps=steps)
    probe = read_jsonl(Path(cfg.paths.mix) / "probe.jsonl")
    tokens_per_step = cfg.train.args[
        "per_device_train_batch_size"
    ]  # same data and order in all three: ratios of time are ratios of tokens/s
    runs = {
        "plain TRL script": lambda out: plain_trl(cfg, manifest, rows, out),
        "tunegate train stage (probe off)": lambda out: tunegate_stage(cfg, manifest, rows, out, []),
        f"tunegate train stage (probe every {cfg.train.args.get('eval_steps')} steps)": lambda out: tunegate_stage(
            cfg, manifest, rows, out, probe
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            for k, (name, fn) in enumerate(runs.items()):
                times[name].append(fn(Path(tmp) / f"{r}-{k}"))
    median = {name: statistics.median(t) for name, t in times.items()}
    plain = median["plain TRL script"]
    print(
        f"demo model, {steps} LoRA steps of {tokens_per_step} rows, "
        f"median of {repeat} interleaved runs (trainer.train() time)"
    )
    print("| run | seconds | tokens/s vs plain TRL |\n|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.1f} | {plain / seconds:.2f} |")


# -- memory ----------------------------------------------------------------------------------------

MEMORY_CONFIGS = {
    "lora fp32": ("lora", "float32", {}),
    "lora bf16 (16-bit)": ("lora", "bfloat16", {}),
    "qlora (NF4, bf16 compute)": ("qlora", "bfloat16", {}),
    "full fp32": ("full", "float32", {}),
}


def build_100m(out: Path, dtype: str) -> None:
    """A random Llama of ~100M parameters with the demo tokenizer (weights only matter for memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from demo.model import train_tokenizer

    pretrain = read_jsonl(ROOT / "data/pretrain/general.jsonl")[:3000]
    tokenizer = train_tokenizer([r["prompt"] for r in pretrain] + [r["completion"] for r in pretrain], 1024)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _weights_gib(model_dir: Path, four_bit: bool) -> float:
    """Bytes of the loaded model's weights (transformers' get_memory_footprint), loaded as train loads it."""
    from tunegate.models import load_model

    return load_model({"path": str(model_dir)}, quantize_4bit=four_bit).get_memory_footprint() / 2**30


def memory_child(model_dir: str, name: str) -> None:
    """One configuration in this process: print {estimate, peak} as JSON."""
    configure()
    import torch  # noqa: F401  (imported before the baseline so the runtime is not counted as training memory)
    import trl  # noqa: F401

    from stages import train

    adapter, _, extra = MEMORY_CONFIGS[name]
    from tunegate.formats import load_source

    rows, _, _ = load_source("domain", ROOT / "data/raw/domain.jsonl")
    rows = [r for r in rows if [m["role"] for m in r["messages"]] == ["user", "assistant"]][:64]
    baseline = _rss_gib()
    cfg = Train(
        adapter=adapter,
        lora=Lora(r=16, alpha=32),
        args={
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "logging_steps": 1,
            "save_steps": 1000,
            **extra,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        manifest = {"model": "bench-100m", "path": model_dir}
        metrics = train.run(
            cfg,
            1,
            train.Inputs(manifest, rows, [], []),
            train.Outputs(Path(tmp) / "out", Path(tmp) / "ckpt", Path(tmp) / "plots.csv"),
        )
    print(
        json.dumps(
            {
                "estimate_gib": metrics["preflight_peak_gib"],
                "baseline_gib": baseline,
                "peak_gib": _rss_gib(),
                "seconds": metrics["seconds"],
            }
        )
    )


def memory() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, dtype, _) in MEMORY_CONFIGS.items():
            model_dir = Path(tmp) / dtype
            if not model_dir.exists():
                build_100m(model_dir, dtype)
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.train", "memory-child", str(model_dir), name],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode:
                raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            results[name]["weights_gib"] = _weights_gib(
                model_dir, MEMORY_CONFIGS[name][0] == "qlora"
            )  # in this process, after the child's peak
    print(
        "~100M-parameter Llama (hidden 1024, 8 layers), batch 8 x 128 tokens, 3 steps, CPU; peak RSS per fresh process"
    )
    print(
        "| config | preflight estimate (GiB) | measured: peak RSS - RSS after imports (GiB) "
        "| peak RSS (GiB) | weights (GiB) |\n|---|---|---|---|---|"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['estimate_gib']:.2f} | {r['peak_gib'] - r['baseline_gib']:.2f} "
            f"| {r['peak_gib']:.2f} | {r['weights_gib']:.2f} |"
        )
    q, l16 = results["qlora (NF4, bf16 compute)"], results["lora bf16 (16-bit)"]
    print(
        f"QLoRA / 16-bit LoRA: peak RSS {q['peak_gib'] / l16['peak_gib']:.2f}x, "
        f"training share {(q['peak_gib'] - q['baseline_gib']) / (l16['peak_gib'] - l16['baseline_gib']):.2f}x, "
        f"weights {q['weights_gib'] / l16['weights_gib']:.2f}x"
    )


# -- packing ---------------------------------------------------------------------------------------


def packing() -> None:
    """Share of padding in the batches the trainer builds: unpacked, TRL's padding-free packing, and the rows
    layout the stage packs in without flash attention (sequences as long as the longest row)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from stages import train
    from tunegate.methods import METHODS

    cfg, manifest, rows = _demo()
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    examples = [{"input_ids": e["input_ids"]} for e in train.sft_examples(rows, tokenizer)[0]]  # as the stage trains
    data = Dataset.from_list(examples)
    batch, max_length = cfg.train.args["per_device_train_batch_size"], cfg.train.args["max_length"]
    longest = max(len(e["input_ids"]) for e in examples)
    print(
        f"demo mixed training set: {len(rows)} rows (longest {longest} tokens), batch {batch}, max_length {max_length}"
    )
    print("| packing | batches per epoch | tokens in batches | real tokens | padding share |\n|---|---|---|---|---|")
    layouts = {
        "off": (False, False, max_length),
        "one padding-free sequence (TRL's)": (True, False, max_length),
        f"rows, packed to the longest row ({longest})": (True, True, longest),
    }
    for name, (packing_on, rows_packed, length) in layouts.items():
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(
                output_dir=tmp,
                report_to=[],
                use_cpu=True,
                per_device_train_batch_size=batch,
                max_length=length,
                packing=packing_on,
                gradient_checkpointing=False,
                bf16=False,
                dataloader_num_workers=0,
            )
            trainer = METHODS["sft"].classes()[1](
                model=AutoModelForCausalLM.from_pretrained(manifest["path"]),
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                rows_packed=rows_packed,
            )
            total = real = batches = 0
            for b in trainer.get_train_dataloader():
                batches += 1
                total += b["input_ids"].numel()
                if "packed_tokens" in b:
                    real += int(b["packed_tokens"])
                else:
                    real += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        print(f"| {name} | {batches} | {total:,} | {real:,} | {1 - real / total:.1%} |")


def packed_epoch(repeat: int) -> None:
    """One epoch of the train stage over the demo's mixed rows: unpacked, packed in rows (`train.packing: true`
    with SDPA, what `auto` does on CPU) and TRL's padding-free layout (`packing` in train.args, what flash attention
    gets); the same tokens trained, wall time and tokens per second side by side (interleaved, median of
    `repeat`)."""
    from stages import train
    from tunegate.models import load_tokenizer

    cfg, manifest, rows = _demo()
    tokens = sum(len(ids["input_ids"]) for ids in train.sft_examples(rows, load_tokenizer(manifest))[0])
    epoch = {k: v for k, v in cfg.train.args.items() if k not in ("max_steps", "save_steps", "eval_steps")}
    epoch |= {"num_train_epochs": 1, "save_steps": 10_000}
    settings = {
        "off": {"packing": False, "args": epoch},
        "rows, block-diagonal masks (train.packing: true)": {"packing": True, "args": epoch},
        "one padding-free sequence (TRL's)": {"packing": False, "args": {**epoch, "packing": True}},
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    steps: dict[str, int] = {}
    counted: dict[str, int | None] = {}
    for _ in range(repeat):
        for name, update in settings.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                metrics = train.run(
                    cfg.train.model_copy(update=update),
                    cfg.seed,
                    train.Inputs(manifest, rows),
                    train.Outputs(out / "model", out / "ckpt", out / "plots.csv"),
                )
            times[name].append(metrics["seconds"])
            steps[name], counted[name] = metrics["steps"], metrics["tokens"]
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"one epoch of {len(rows)} rows ({tokens:,} tokens), batch {epoch['per_device_train_batch_size']}, "
          f"max_length {epoch['max_length']}, median of {repeat} interleaved")  # fmt: skip
    print("| packing | steps | tokens counted | seconds | tokens/s | vs off |\n|---|---|---|---|---|---|")
    off = median["off"]
    for name, seconds in median.items():
        print(
            f"| {name} | {steps[name]} | {counted[name] or 0:,} | {seconds:.1f} | {tokens / seconds:,.0f} "
            f"| {off / seconds:.2f}x |"
        )


def _bins(lengths: list[int], size: int) -> list[list[int]]:
    """Best-fit decreasing: row indices packed into sequences of at most `size` tokens (TRL's BFD, in short)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: room[b])
            bins[best].append(i)
            room[best] -= lengths[i]
        else:
            bins.append([i])
            room.append(size - lengths[i])
    return bins


def _layout_batches(rows: list[list[int]], batch: int, size: int) -> dict[str, list[dict[str, Any]]]:
    """The same rows in three batch layouts: padded to the longest row of each batch (unpacked); each batch's rows
    end to end in one sequence with restarting positions (padding-free, TRL's packing: the document mask spans the
    whole batch); rows packed into `size`-token sequences kept as separate batch rows, each with its own
    block-diagonal causal mask (block packing)."""
    import torch

    def padded(chunk: list[list[int]]) -> dict[str, Any]:
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    def blocks(seqs: list[list[list[int]]]) -> dict[str, Any]:
        width = max(sum(len(r) for r in seq) for seq in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        pos, doc = torch.zeros_like(ids), torch.zeros_like(ids)
        for k, seq in enumerate(seqs):
            at = 0
            for d, r in enumerate(seq, 1):
                ids[k, at : at + len(r)], pos[k, at : at + len(r)] = torch.tensor(r), torch.arange(len(r))
                doc[k, at : at + len(r)] = d
                at += len(r)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] > 0) & causal
        mask |= torch.eye(width, dtype=torch.bool)  # a padding position sees itself: no row of the mask is empty
        return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None]}

    unpacked = [padded(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    free = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        free.append(
            {
                "input_ids": torch.tensor([t for r in chunk for t in r])[None],
                "position_ids": torch.cat([torch.arange(len(r)) for r in chunk])[None],
            }
        )
    seqs = [[rows[i] for i in b] for b in _bins([len(r) for r in rows], size)]
    packed = [blocks(seqs[i : i + batch]) for i in range(0, len(seqs), batch)]
    return {"unpacked": unpacked, "padding-free (TRL's packing)": free, "block packing": packed}


def packing_layouts(repeat: int) -> None:
    """What packing can give on CPU at all: one epoch of forward and backward of the demo base over the demo's mixed
    rows in each layout (_layout_batches), the model and rows alone (no trainer), interleaved, median of `repeat`."""
    import torch

    from stages import train
    from tunegate.models import load_model, load_tokenizer

    cfg, manifest, rows = _demo()
    batch, size = cfg.train.args["per_device_train_batch_size"], cfg.train.args["max_length"]
    ids = [r["input_ids"][:size] for r in train.sft_examples(rows, load_tokenizer(manifest))[0]]
    layouts = _layout_batches(ids, batch, size)
    model = load_model(manifest)
    model.train()

    def epoch(batches: list[dict[str, Any]]) -> float:
        started = time.perf_counter()
        for b in batches:
            model(**b, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeat):
        for name, batches in layouts.items():
            times[name].append(epoch(batches))
    real = sum(len(r) for r in ids)
    print(f"{len(ids)} rows ({real:,} tokens), batch {batch}, max_length {size}, {torch.get_num_threads()} threads; "
          f"forward + backward of one epoch, median of {repeat} interleaved")  # fmt: skip
    print("| layout | batches | token slots | seconds | vs unpacked |\n|---|---|---|---|---|")
    base = statistics.median(times["unpacked"])
    for name, batches in layouts.items():
        slots = sum(b["input_ids"].numel() for b in batches)
        seconds = statistics.median(times[name])
        print(f"| {name} | {len(batches)} | {slots:,} | {seconds:.1f} | {base / seconds:.2f}x |")


def grpo(repeat: int, steps: int) -> None:
    """SFT and GRPO from the demo base on the same domain rows, `steps` steps each, interleaved, median of `repeat`:
    GRPO samples `num_generations` completions per prompt with transformers' generate, scores them with the
    demo's rewards (the support_gen scorer and the JSON format) and trains on them; SFT trains on the answers."""
    from stages import train
    from tunegate.rewards import build

    cfg, manifest, rows = _demo()
    domain = [r for r in rows if r.get("source") == "domain"]
    rewards = build(cfg.train.grpo.rewards, ROOT / cfg.paths.evals / "tasks")
    batch, generations = 16, 8
    common = {"max_steps": steps, "per_device_train_batch_size": batch, "save_steps": 10_000, "logging_steps": 10}
    settings = {
        "sft": cfg.train.model_copy(update={"method": "sft", "args": {**common, "max_length": 256}}),
        f"grpo ({generations} completions per prompt, up to 48 tokens)": cfg.train.model_copy(
            update={
                "method": "grpo",
                "args": common,
                "grpo_args": {"num_generations": generations, "max_completion_length": 48},
            }
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeat):
        for name, train_cfg in settings.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                metrics = train.run(
                    train_cfg,
                    cfg.seed,
                    train.Inputs(manifest, domain, rewards=rewards),
                    train.Outputs(out / "model", out / "ckpt", out / "plots.csv"),
                )
            times[name].append(metrics["seconds"])
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{steps} steps of batch {batch} on {len(domain)} domain rows, demo base, median of {repeat} interleaved")
    print("| method | seconds | steps/s |\n|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.1f} | {steps / seconds:.2f} |")
    sft, rl = median.values()
    print(f"a GRPO step costs {rl / sft:.1f}x an SFT step of the same batch here")
    grpo_memory()


GRPO_AFTER_SFT = [  # (steps, learning rate, completions per prompt): the settings docs/training.md tabulates
    (30, 1e-5, 8),
    (60, 1e-4, 8),
    (60, 5e-4, 8),
    (60, 2e-3, 8),
    (100, 2e-4, 4),
    (100, 4e-4, 4),
    (200, 2e-4, 8),
    (200, 2e-4, 4),
]


def grpo_held_out(sft_steps: int) -> None:
    """Held-out support_gen json_fields (the 150 eval items, greedy, as the gate scores) of a short SFT adapter
    (`sft_steps` steps, the demo's settings) and of GRPO from it in each setting of GRPO_AFTER_SFT, with the demo's
    rewards: what GRPO adds on held-out prompts, not on the ones it trains on."""
    from stages import train
    from tunegate.evaluation import evaluate
    from tunegate.paths import Layout
    from tunegate.rewards import build

    cfg, manifest, rows = _demo()
    layout = Layout.of(cfg.paths)
    rewards = build(cfg.train.grpo.rewards, layout.eval_tasks)
    domain = frozenset(name for name, s in cfg.data.sources.items() if s.role == "domain")
    data = train.Inputs(manifest, rows, [], [], rewards=rewards, domain_sources=domain)
    held_out = cfg.eval.model_copy(update={"tasks": ["support_gen"]})
    args = {**cfg.train.args, "max_steps": sft_steps, "save_steps": 10_000, "eval_steps": 10_000}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def score(adapter: Path) -> float:
            result = evaluate(held_out, manifest, layout.eval_tasks, root / "eval", cfg.seed, adapter=adapter)
            return result["scores"]["support_gen"]["json_fields"]

        sft = cfg.train.model_copy(update={"method": "sft", "args": args, "probe_max_rise": None})
        train.run(sft, cfg.seed, data, train.Outputs(root / "sft", root / "sft-ckpt", root / "sft.csv"))
        print(f"| GRPO after {sft_steps} SFT steps | held-out json_fields |\n|---|---|")
        print(f"| none (the SFT adapter) | {score(root / 'sft' / train.ADAPTER):.3f} |")
        for steps, lr, generations in GRPO_AFTER_SFT:
            grpo_args = {"max_steps": steps, "learning_rate": lr, "num_generations": generations}
            grpo_args |= {"max_completion_length": 48}
            rl = cfg.train.model_copy(update={"method": "grpo", "args": args, "grpo_args": grpo_args})
            out = root / f"grpo-{steps}-{lr}-{generations}"
            train.run(rl, cfg.seed, data, train.Outputs(out, out / "ckpt", out / "p.csv"),
                      init_adapter=root / "sft" / train.ADAPTER)  # fmt: skip
            print(f"| {steps} steps, lr {lr:g}, {generations} completions | {score(out / train.ADAPTER):.3f} |")


def grpo_memory() -> None:
    """`tunegate check`'s estimate for SFT and SFT -> GRPO on Llama-3.2-1B and Llama-3-8B shapes (bf16 weights,
    LoRA and QLoRA, batch 8, max_length 1024, gradient checkpointing; GRPO: 8 completions per prompt of up to
    512 tokens), from config.json values alone."""
    from tests.test_preflight import LLAMA_8B_CONFIG
    from tunegate.preflight import GIB, Shape, estimate
    from tunegate.training import largest_plan, resolved_args

    one_b = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "tie_word_embeddings": True}
    shapes = {
        "Llama-3.2-1B": Shape.from_config({**LLAMA_8B_CONFIG, **one_b}),
        "Llama-3-8B": Shape.from_config(LLAMA_8B_CONFIG),
    }
    print("| base | method | adapter | planned phase | GiB per device (weights / activations, logits, KV cache) |")
    print("|---|---|---|---|---|")
    for name, shape in shapes.items():
        for method, adapter in (("sft", "lora"), ("sft+grpo", "lora"), ("sft+grpo", "qlora")):
            cfg = Train.model_validate(
                {
                    "method": method,
                    "adapter": adapter,
                    "args": {"per_device_train_batch_size": 8, "max_length": 1024, "gradient_checkpointing": True},
                    "grpo_args": {"num_generations": 8, "max_completion_length": 512} if "grpo" in method else {},
                    "grpo": {"rewards": [{"format": "json"}]},
                }
            )
            plan = largest_plan(cfg, resolved_args(cfg, True, True), shape)
            est = estimate(shape, plan)
            print(f"| {name} | {method} | {adapter} | {plan.method} | {est['total'] / GIB:.1f} "
                  f"({est['weights'] / GIB:.1f} / {est['activations'] / GIB:.1f}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = ["overhead", "memory", "packing", "packing-layouts", "grpo", "grpo-held-out", "memory-child"]
    parser.add_argument("what", choices=choices)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    opts = parser.parse_args()
    configure()
    if opts.what == "overhead":
        overhead(opts.repeat, opts.steps)
    elif opts.what == "memory":
        memory()
    elif opts.what == "memory-child":
        memory_child(*opts.args)
    elif opts.what == "grpo":
        grpo(opts.repeat, opts.steps)
    elif opts.what == "grpo-held-out":
        grpo_held_out(opts.steps)
    elif opts.what == "packing-layouts":
        packing_layouts(opts.repeat)
    else:
        packing()
        packed_epoch(opts.repeat)


if __name__ == "__main__":
    main()
