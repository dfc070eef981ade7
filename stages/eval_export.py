"""eval_export: score every exported artifact through the runtime that will serve it, on the eval tasks.

    python -m stages.eval_export        # what dvc.yaml runs

The merged folder runs in transformers (lm-eval's `hf` model, loaded from the files on disk); each GGUF
runs in llama.cpp (tunegate.gguf_lm: its own tokenizer and the chat template stored in the file). The
per-sample outcomes are written like eval_candidate's, one folder per artifact, so the gate pairs them
with the candidate's item by item. `export.check: false`, or nothing exported, writes an empty folder (nothing is
gated) without loading a model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunegate.config import Config, load_config
from tunegate.evaluation import evaluate_lm, task_set
from tunegate.export import Artifact, context_length
from tunegate.io import atomic_path, read_json, write_json
from tunegate.models import load_manifest
from tunegate.paths import RESULTS, Layout
from tunegate.runtime import record_timing, seed_everything, stage_main

log = logging.getLogger(__name__)


def _lm(cfg: Config, artifact: Artifact, folder: Path, n_ctx: int, reference: Any):
    """lm-eval's model for one artifact, loaded from the exported files (a GGUF's tokenization is compared with
    `reference`, the tokenizer training used)."""
    path = folder / artifact.path
    if artifact.runtime == "transformers":
        import torch
        from lm_eval.models.huggingface import HFLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFLM(
            pretrained=str(path),
            batch_size=cfg.eval.batch_size,
            max_length=None,
            device=device,
            trust_remote_code=cfg.base.trust_remote_code,
        )
    from tunegate.gguf_lm import GGUFModel

    return GGUFModel(path, reference, n_ctx, cfg.eval.max_gen_toks, cfg.seed)


def run(cfg: Config, layout: Layout) -> dict[str, Any]:
    record = read_json(layout.export_manifest)
    manifest = load_manifest(layout.base)
    out: dict[str, Any] = {}
    with atomic_path(layout.eval_export()) as tmp:
        tmp.mkdir()
        if not cfg.export.check or not record["artifacts"]:
            return out
        seed_everything(cfg.seed)
        tasks = task_set(cfg.eval, layout.eval_tasks)
        n_ctx = context_length(Path(manifest["path"]))
        reference = None
        if any(item["runtime"] == "llama.cpp" for item in record["artifacts"]):
            from transformers import AutoTokenizer

            reference = AutoTokenizer.from_pretrained(str(layout.adapter))
        for item in record["artifacts"]:
            artifact = Artifact(**item)
            started = time.perf_counter()
            lm = _lm(cfg, artifact, layout.export, n_ctx, reference)
            extra = {"artifact": artifact.name, "runtime": artifact.runtime}
            result = evaluate_lm(
                cfg.eval, lm, tasks, manifest, tmp / artifact.name, cfg.seed, artifact.name, extra, started
            )
            mismatches = getattr(lm, "tokenizer_mismatches", 0)
            if mismatches:
                log.warning(
                    "%s: llama.cpp tokenized %d prompts differently from transformers", artifact.name, mismatches
                )
            results = tmp / artifact.name / RESULTS
            write_json(results, {**read_json(results), "tokenizer_mismatches": mismatches})
            out[artifact.name] = {
                "scores": result["scores"],
                "seconds": result["seconds"],
                "tokenizer_mismatches": mismatches,
            }
    return out


def main() -> None:
    def body() -> None:
        cfg = load_config()
        layout = Layout.of(cfg.paths)
        started = time.perf_counter()
        out = run(cfg, layout)
        write_json(layout.metrics("eval_export"), {name: r["scores"] for name, r in out.items()})
        record_timing("eval_export", time.perf_counter() - started)

    stage_main("eval_export", body)


if __name__ == "__main__":
    main()
