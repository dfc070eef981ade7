"""Export cost and what it buys: time per format, file size per GGUF type next to the safetensors, and greedy
decoding speed in llama.cpp next to transformers on the same prompts, same CPU, same run.

    make demo && make setup-export && python -m benchmarks.export      # in a project where `dvc repro` has run

Each GGUF type is timed from the merged folder (converter types straight, the others quantised from f16, as
the export stage does). Decoding: the first --prompts support messages of the eval set, rendered with the
chat template, --new tokens each, greedy, one prompt at a time (a chat user's request), interleaved
over --repeat rounds; tokens/s = generated tokens / wall time, median of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tunegate.config import load_config
from tunegate.export import Source, gguf_file, write_gguf, write_merged
from tunegate.io import read_jsonl
from tunegate.models import load_manifest
from tunegate.runtime import configure

TYPES = ["f16", "q8_0", "q4_k_m"]


def _hf_decoder(merged: Path, new: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)

    def run(prompts: list[str]) -> int:
        made = 0
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            made += out.shape[1] - ids.shape[1]
        return made

    return tok, run


def _cpp_decoder(gguf: Path, new: int):
    from tunegate.gguf_lm import GGUFModel

    lm = GGUFModel(gguf, None, None, new)

    def run(prompts: list[str]) -> int:
        made = 0
        for p in prompts:
            ids = lm.tokens(p)
            lm.llm.reset()  # no prefix reuse across prompts: each request from scratch, as for transformers
            for _ in range(new):
                ids.append(int(lm._logits(ids)[-1].argmax()))
                made += 1
        return made

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure()
    cfg = load_config()
    manifest = load_manifest(cfg.paths.base)
    adapter = Path(cfg.paths.train) / "adapter"
    if not adapter.exists():
        raise SystemExit(f"{adapter}: missing; run `dvc repro` (make demo) first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        write_merged(Source(manifest, adapter, True, "bench"), work / "merged")
        seconds = {"merged": time.perf_counter() - started}
        for kind in TYPES:
            started = time.perf_counter()
            (work / kind).mkdir()
            write_gguf(work / "merged", work / kind / "gguf", [kind], work / kind)
            seconds[kind] = time.perf_counter() - started
        weights = sum(p.stat().st_size for p in (work / "merged").glob("*.safetensors"))
        print(f"export of the demo model ({manifest['model']}), {weights / 1e6:.2f} MB of safetensors:")
        print(f"  {'format':8} {'seconds':>8} {'MB':>7} {'size vs safetensors':>20}")
        print(f"  {'merged':8} {seconds['merged']:8.1f} {weights / 1e6:7.2f} {1.0:20.2f}")
        for kind in TYPES:
            size = (work / kind / "gguf" / gguf_file(kind)).stat().st_size
            print(f"  {kind:8} {seconds[kind]:8.1f} {size / 1e6:7.2f} {size / weights:20.2f}")

        tok, hf = _hf_decoder(work / "merged", args.new)
        rows = read_jsonl(Path(cfg.paths.evals) / "data/support_gen.jsonl")[: args.prompts]
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": r["message"]}], tokenize=False, add_generation_prompt=True
            )
            for r in rows
        ]
        runners = {"transformers (merged, f32)": hf}
        runners |= {
            f"llama.cpp ({kind})": _cpp_decoder(work / kind / "gguf" / gguf_file(kind), args.new) for kind in TYPES
        }
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeat):
            for name, run in runners.items():
                started = time.perf_counter()
                made = run(prompts)
                rates[name].append(made / (time.perf_counter() - started))
        reference = statistics.median(rates["transformers (merged, f32)"])
        print(
            f"greedy decoding, {len(prompts)} prompts x {args.new} tokens, median of {args.repeat} interleaved rounds:"
        )
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"  {name:28} {rate:9.0f} tokens/s   {rate / reference:5.2f}x transformers")


if __name__ == "__main__":
    main()
