"""GPU benchmarks of the train stage: peak memory against the preflight estimate, and throughput against a
plain TRL script on the same GPU, same model, same rows.

    python -m benchmarks.gpu all --out results/          # build the model, then memory and throughput
    python -m benchmarks.gpu build --model /tmp/llama1b  # a random-init model of Llama-3.2-1B's shape
    python -m benchmarks.gpu memory --model /tmp/llama1b
    python -m benchmarks.gpu throughput --model /tmp/llama1b --steps 30 --repeat 2 --lengths demo
    python -m benchmarks.gpu eval --model /tmp/llama1b    # lm-eval's hf backend vs vllm on the demo's eval tasks

The model is a random-init Llama of Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8,
intermediate 8192) with the demo tokenizer (1,024 tokens), saved as a local bf16 safetensors folder:
no download, and weights do not matter for memory or speed. Rows are built from the demo's texts to a
chosen token length, so a batch really is batch x max_length tokens (`--lengths long`), or are the demo's own
rows, mostly 30-80 tokens, where padding is most of an unpacked batch (`--lengths demo`). Throughput compares a plain
TRL script, the stage as it was before train.attn_implementation / kernels / packing, and each of them added
(FlashAttention 2 needs flash-attn installed, Liger liger-kernel: `pip install flash-attn liger-kernel`; without
them the rows say what ran). Memory also runs at Llama 3's vocabulary (128,256 rows), where the logits would be
the largest term if TRL's fused LM head did not score them in tiles. Every configuration runs in a fresh process, so
each peak (`torch.cuda.max_memory_allocated`) is its own; throughput runs are interleaved. `--tiny` shrinks
everything for a CPU smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 / H200 SXM (NVIDIA's data sheet, no sparsity)

# (adapter, method, gradient checkpointing, batch, max_length)
MEMORY_CONFIGS = [
    ("lora", "sft", False, 16, 128),
    ("qlora", "sft", False, 16, 128),
    ("lora", "sft", True, 16, 128),
    ("qlora", "sft", True, 16, 128),
    ("full", "sft", True, 16, 128),
    ("qlora", "dpo", True, 16, 128),
    ("lora", "sft", False, 4, 1024),
    ("lora", "sft", True, 4, 1024),
    ("qlora", "sft", True, 4, 2048),
    ("lora", "dpo", True, 4, 1024),
    ("full", "sft", False, 4, 512),
]
# The same shapes at Llama 3's vocabulary: what the preflight's logits term says against TRL's fused LM head, which
# scores the vocabulary in tiles instead of holding (tokens x vocab) logits
REAL_VOCAB = 128_256
REAL_VOCAB_CONFIGS = [("lora", "sft", True, 4, 1024), ("qlora", "sft", True, 4, 2048), ("lora", "dpo", True, 4, 1024)]


def build(out: Path, tiny: bool = False, vocab: int | None = None) -> None:
    """The model; `vocab` widens its embedding (and tied LM head) to a real vocabulary's size, e.g. Llama 3's
    128,256 rows, while the demo tokenizer uses the first 1,024: memory depends on the size, not on the ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from demo.model import train_tokenizer
    from tunegate.io import read_jsonl

    pretrain = read_jsonl(ROOT / "data/pretrain/general.jsonl")[:3000]
    tokenizer = train_tokenizer([r["prompt"] for r in pretrain] + [r["completion"] for r in pretrain], 1024)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    shape["num_key_value_heads"] = 2
    if not tiny:
        shape = {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
        }
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def rows(model: str, tokens: int, n: int, kind: str) -> list[dict[str, Any]]:
    """n rows of about `tokens` tokens under the chat template: a long user text (demo texts joined), a
    short answer; preference rows get a chosen and a rejected answer of the same length."""
    from transformers import AutoTokenizer

    from tunegate.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(model)
    texts = [r["completion"] for r in read_jsonl(ROOT / "data/pretrain/general.jsonl")]
    sizes = [len(ids) + 1 for ids in tok(texts)["input_ids"]]  # + the joining space
    target = max(8, tokens - 64)  # room for the chat template and the answer within max_length
    out, i = [], 0
    for k in range(n):
        words: list[str] = []
        used = 0
        while used + sizes[i % len(texts)] <= target:
            words.append(texts[i % len(texts)])
            used += sizes[i % len(texts)]
            i += 1
        i += 1  # the text that did not fit starts no row: rows differ, lengths stay just under the target
        prompt = [{"role": "user", "content": " ".join(words)}]
        answer = texts[(k * 7) % len(texts)]
        if kind == "dpo":
            other = texts[(k * 11 + 3) % len(texts)]
            out.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": other}],
                }
            )
        else:
            out.append({"messages": [*prompt, {"role": "assistant", "content": answer}]})
    return out


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_child(model: str, adapter: str, method: str, gc: bool, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """One configuration through the stage's own run(): its preflight estimate and the measured peak."""
    from stages import train
    from tunegate.config import Lora, Train

    data = rows(model, seq, batch * (steps + 1), method)
    args = {
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "max_length": seq,
        "logging_steps": 1,
        "save_steps": 10_000,
        "gradient_checkpointing": gc,
        "learning_rate": 1e-4,
    }
    cfg = Train(method=method, adapter=adapter, lora=Lora(r=16, alpha=32), args=args, truncate=True)
    manifest = {"model": "llama-1b-shape", "path": model}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = train.Inputs(manifest, [] if method == "dpo" else data, data if method == "dpo" else [], [])
        metrics = train.run(cfg, 1, inputs, train.Outputs(Path(tmp) / "out", Path(tmp) / "ckpt", Path(tmp) / "p.csv"))
    return {
        "adapter": adapter,
        "method": method,
        "gc": gc,
        "batch": batch,
        "seq": seq,
        "estimate_gib": metrics["preflight_peak_gib"],
        "measured_gib": round(_peak_gib(), 3),
    }


def plain_child(model: str, data: list[dict[str, Any]], steps: int, batch: int, seq: int, seed: int) -> dict[str, Any]:
    """What a user writes by hand: TRL's SFTTrainer with its own defaults on the same model and rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model)
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in data])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_length=seq,
            max_steps=steps,
            bf16=torch.cuda.is_available(),
            gradient_checkpointing=True,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16),
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return {"seconds": seconds, "tokens": tokens[-1] if tokens else None}


def stage_child(  # noqa: PLR0913 - one benchmark configuration, as the payload names it
    model: str,
    data: list[dict[str, Any]],
    steps: int,
    batch: int,
    seq: int,
    seed: int,
    deterministic: bool | None,
    attn: str = "auto",
    kernels: str = "auto",
    packing: bool | str = False,
) -> dict[str, Any]:
    """The train stage's run() with its defaults (deterministic=None) or with deterministic kernels forced, the
    attention implementation, Liger's kernels and packing as train.attn_implementation / kernels / packing say."""
    import csv

    from stages import train
    from tunegate.config import Lora, Train

    args = {
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "max_length": seq,
        "logging_steps": min(10, steps),
        "save_steps": 10_000,
        "gradient_checkpointing": True,
    }
    cfg = Train(
        lora=Lora(r=16, alpha=32),
        args=args,
        deterministic=deterministic,
        truncate=True,
        attn_implementation=attn,
        kernels=kernels,
        packing=packing,
    )
    with tempfile.TemporaryDirectory() as tmp:
        speed = Path(tmp) / "speed.csv"
        out = train.Outputs(Path(tmp) / "out", Path(tmp) / "ckpt", Path(tmp) / "p.csv", speed_path=speed)
        metrics = train.run(cfg, seed, train.Inputs({"model": "llama-1b-shape", "path": model}, data, [], []), out)
        logged = list(csv.DictReader(speed.open())) if speed.exists() else []
    return {
        "seconds": metrics["seconds"],
        "tokens": metrics["tokens"] or (int(logged[-1]["tokens"]) if logged else None),
        "deterministic": metrics["deterministic"],
        "bf16": metrics["bf16"],
        "attention": metrics["attn_implementation"],
        "packing": metrics["packing_layout"] or "off",
        "liger": metrics["liger_kernels"],
    }


def _child(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    spool = Path(tempfile.mkdtemp()) / "payload.json"  # rows do not fit on a command line
    spool.write_text(json.dumps(payload))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "child", kind, str(spool)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode:  # reported and skipped: one failing configuration does not cost the others
        print(f"{kind} {json.dumps({k: v for k, v in payload.items() if k != 'data'})}: failed\n{done.stderr[-3000:]}")
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def versions() -> str:
    from importlib import metadata

    return ", ".join(
        f"{p} {metadata.version(p)}" for p in ("transformers", "trl", "peft", "bitsandbytes", "accelerate")
    )


def memory(
    model: str, steps: int, configs: list[tuple], out: Path | None, name: str = "memory"
) -> list[dict[str, Any]]:
    results = []
    print(f"\n{name}: {model}; {device()}; {versions()}; {time.strftime('%Y-%m-%d')}")
    print(
        "| adapter / method | gc | batch x max_length | preflight estimate GiB | measured peak GiB | est / measured |"
    )
    print("|---|---|---|---|---|---|")
    for adapter, method, gc, batch, seq in configs:
        payload = {
            "model": model,
            "adapter": adapter,
            "method": method,
            "gc": gc,
            "batch": batch,
            "seq": seq,
            "steps": steps,
        }
        r = _child("memory", payload)
        if "error" in r:
            continue
        results.append(r)
        print(
            f"| {adapter} / {method} | {'on' if gc else 'off'} | {batch} x {seq} | {r['estimate_gib']:.2f} "
            f"| {r['measured_gib']:.2f} | {r['estimate_gib'] / max(r['measured_gib'], 1e-9):.2f} |",
            flush=True,
        )
    if out:
        (out / f"{name}.json").write_text(
            json.dumps(
                {"device": device(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": results},
                indent=1,
            )
        )
    return results


# The stage as it was before the attention / kernel / packing choices, then each of them added
STAGE_RUNS = {
    "train stage: sdpa, unpacked, no Liger (before)": {"attn": "sdpa", "kernels": "none", "packing": False},
    "train stage: attention auto": {"attn": "auto", "kernels": "none", "packing": False},
    "train stage: sdpa, packed in rows": {"attn": "sdpa", "kernels": "none", "packing": True},
    "train stage: attention auto, packing auto": {"attn": "auto", "kernels": "none", "packing": "auto"},
    "train stage: attention auto, packing auto, Liger (kernels auto)": {"attn": "auto", "kernels": "auto"}
    | {"packing": "auto"},
}


def demo_rows(n: int) -> list[dict[str, Any]]:
    """n chat rows of the demo's own length distribution (most of them 30-80 tokens), its domain rows repeated."""
    from tunegate.formats import load_source

    sft, _, _ = load_source("domain", ROOT / "data/raw/domain.jsonl")
    good = [{"messages": r["messages"]} for r in sft if r["messages"] and r["messages"][-1]["role"] == "assistant"]
    return [good[i % len(good)] for i in range(n)]


def throughput(  # noqa: PLR0913 - the benchmark's command-line settings
    model: str, steps: int, repeat: int, batch: int, seq: int, out: Path | None, lengths: str = "long"
) -> dict[str, Any]:
    """Side by side, interleaved: a plain TRL script, the stage before the attention / kernel / packing choices,
    then each added; on rows of about `seq` tokens (`long`) or the demo's short rows (`demo`, where padding is most
    of an unpacked batch)."""
    from tunegate.training import read_shape

    data = rows(model, seq, batch * (steps + 1), "sft") if lengths == "long" else demo_rows(batch * 8 * (steps + 1))
    runs = {
        "plain TRL script (TRL defaults)": ("plain", {}),
        **{name: ("stage", {"deterministic": None, **extra}) for name, extra in STAGE_RUNS.items()},
        "train stage, deterministic: true": ("stage", {"deterministic": True}),
    }
    times: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(repeat):
        for name, (kind, extra) in runs.items():
            if r and "deterministic: true" in name:
                continue  # once is enough to show what it costs
            payload = {"model": model, "data": data, "steps": steps, "batch": batch, "seq": seq, "seed": 1, **extra}
            result = _child(kind, payload)
            if "error" not in result:
                times[name].append(result)
    shape = read_shape(model)
    attended = seq if lengths == "long" else 64  # the demo's rows: about 64 tokens each
    flops_per_token = (
        6 * (shape.linear_params + shape.vocab * shape.hidden) + 6 * shape.layers * shape.hidden * attended
    )
    times = {name: results for name, results in times.items() if results}
    plain_rate = _rate(times.get("plain TRL script (TRL defaults)"))
    print(f"\nthroughput: {device()}; {versions()}; {time.strftime('%Y-%m-%d')}")
    rows_are = f"~{seq} tokens" if lengths == "long" else f"the demo's rows (max_length {seq})"
    print(
        f"LoRA r16 all-linear, bf16, gradient checkpointing, batch {batch} x {rows_are}, {steps} steps; "
        f"median of {repeat} interleaved runs (trainer.train() time)"
    )
    print(
        "| run | attention / packed / Liger | seconds | tokens/s | tokens/s vs plain TRL "
        "| MFU (6N + attention, dense bf16 peak) |\n|---|---|---|---|---|---|"
    )
    summary = {}
    for name, results in times.items():
        seconds = statistics.median(t["seconds"] for t in results)
        tokens = results[0]["tokens"] or 0
        rate = _rate(results)
        how = "/".join(str(results[0].get(k, "-")) for k in ("attention", "packing", "liger"))
        mfu = rate * flops_per_token / H200_BF16_PEAK
        summary[name] = {
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_s": round(rate),
            "vs_plain": round(ratio := rate / plain_rate if plain_rate else 0.0, 3),  # packing: more tokens a step
            "mfu": round(mfu, 4),
            "how": how,
        }
        print(f"| {name} | {how} | {seconds:.1f} | {rate:,.0f} | {ratio:.2f} | {mfu:.1%} |", flush=True)
    if out:
        (out / f"throughput-{lengths}.json").write_text(
            json.dumps(
                {"device": device(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "runs": summary},
                indent=1,
            )
        )
    return summary


def _rate(results: list[dict[str, Any]] | None) -> float:
    """Median tokens per second of a run's repeats (tokens trained over trainer.train() time)."""
    if not results:
        return 0.0
    return statistics.median((t["tokens"] or 0) / t["seconds"] for t in results if t["seconds"])


def eval_backends(model: str, repeat: int, out: Path | None) -> dict[str, Any]:
    """The demo's four eval tasks (700 items) scored by the base of `model` through `eval.backend: hf` and `vllm`,
    interleaved, median wall time of --repeat (the model's load included, as the stage pays it); the share of
    per-sample outcomes that agree (greedy on both)."""
    from tunegate.config import Eval
    from tunegate.errors import UserError
    from tunegate.evaluation import evaluate
    from tunegate.io import read_jsonl
    from tunegate.models import describe, require_vllm

    try:
        require_vllm("eval.backend", "this benchmark needs a GPU machine with vLLM")
    except UserError as err:
        print(f"eval backends: not measured here ({err})")
        return {}
    tasks = ["general_mc", "general_gen", "support_mc", "support_gen"]
    manifest = {**describe(Path(model), "llama-1b-shape", "local", "local"), "path": model}
    seconds: dict[str, list[float]] = {"hf": [], "vllm": []}
    samples: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            for backend in seconds:
                folder = Path(tmp) / f"{backend}-{r}"
                started = time.perf_counter()
                evaluate(Eval(tasks=tasks, backend=backend, batch_size=64), manifest, ROOT / "evals/tasks", folder, 1)
                seconds[backend].append(time.perf_counter() - started)
                samples[backend] = [s for t in tasks for s in read_jsonl(folder / "samples" / f"{t}.jsonl")]
    keep = ("prompt", "output")
    same = sum(
        {k: v for k, v in a.items() if k not in keep} == {k: v for k, v in b.items() if k not in keep}
        for a, b in zip(samples["hf"], samples["vllm"], strict=True)
    )
    result = {
        "device": device(),
        "versions": versions(),
        "items": len(samples["hf"]),
        "seconds": {k: round(statistics.median(v), 1) for k, v in seconds.items()},
        "speedup": round(statistics.median(seconds["hf"]) / statistics.median(seconds["vllm"]), 2),
        "same_outcomes": round(same / len(samples["hf"]), 4),
    }
    print(json.dumps(result, indent=1))
    if out:
        (out / "eval_backends.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["all", "build", "memory", "throughput", "eval", "child"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1536)
    parser.add_argument("--lengths", choices=["long", "demo", "both"], default="both", help="throughput's rows")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short runs: a CPU smoke test")
    opts = parser.parse_args()
    from tunegate.runtime import configure

    configure()
    if opts.what == "child":
        kind, payload = opts.args[0], json.loads(Path(opts.args[1]).read_text())
        if kind == "memory":
            print(json.dumps(memory_child(**payload)))
        elif kind == "plain":
            print(json.dumps(plain_child(**payload)))
        else:
            print(json.dumps(stage_child(**payload)))
        return
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
    model = opts.model or str(Path(tempfile.gettempdir()) / ("tiny-llama" if opts.tiny else "llama-1b-shape"))
    if opts.what in ("all", "build") and not (Path(model) / "config.json").exists():
        build(Path(model), opts.tiny)
    configs = (
        [(a, m, g, min(b, 2), min(s, 64)) for a, m, g, b, s in MEMORY_CONFIGS[:3]] if opts.tiny else MEMORY_CONFIGS
    )
    steps = 2 if opts.tiny else opts.steps
    if opts.what in ("all", "memory"):
        memory(model, 3 if not opts.tiny else 2, configs, opts.out)
        wide = f"{model}-vocab{REAL_VOCAB}"  # the logits' share at a real vocabulary (TRL's fused LM head)
        if not (Path(wide) / "config.json").exists():
            build(Path(wide), opts.tiny, vocab=REAL_VOCAB)
        wide_configs = [(a, m, g, min(b, 2), min(s, 64)) for a, m, g, b, s in REAL_VOCAB_CONFIGS[:1]]
        memory(wide, 3 if not opts.tiny else 2, wide_configs if opts.tiny else REAL_VOCAB_CONFIGS, opts.out, "vocab")
    if opts.what in ("all", "throughput"):
        for lengths in ("long", "demo") if opts.lengths == "both" else (opts.lengths,):
            throughput(
                model,
                steps,
                1 if opts.tiny else opts.repeat,
                2 if opts.tiny else opts.batch,
                128 if opts.tiny else opts.seq,
                opts.out,
                lengths,
            )
    if opts.what in ("all", "eval"):
        eval_backends(model, 1 if opts.tiny else opts.repeat, opts.out)


if __name__ == "__main__":
    main()
