"""base: resolve the base model and write its manifest (`base.json`); build the demo model if asked.

    python -m stages.base        # what dvc.yaml runs

With `base.model: demo` the tiny demo Llama is built from the pretraining corpus (seeded, byte-identical
on every CPU). Otherwise the hub id or local folder is resolved to a commit sha and every weight and
tokenizer file is fingerprinted, so later stages and the registry know exactly which base was used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunegate.config import Base, load_config
from tunegate.io import atomic_path, read_jsonl, write_json
from tunegate.models import check_loadable, describe, snapshot
from tunegate.paths import BASE_MANIFEST
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)


def run(cfg: Base, seed: int, pretrain: Path, out_dir: Path) -> dict[str, Any]:
    """Produce out_dir/base.json (and, for the demo, the model itself in out_dir)."""
    started = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if cfg.is_demo:
            from demo.model import build

            info = build(read_jsonl(pretrain), cfg.demo, seed, tmp)
            manifest = describe(tmp, "demo", "seeded", f"seed-{seed}")
            manifest.update(path=".", demo=info)
        else:
            path, resolved = snapshot(cfg.model, cfg.revision)
            manifest = describe(path, cfg.model, cfg.revision, resolved)
            check_loadable(path, cfg.model, cfg.trust_remote_code)
        manifest["trust_remote_code"] = cfg.trust_remote_code
        write_json(tmp / BASE_MANIFEST, manifest)
    log.info(
        "base %s @ %s ready in %.1fs", manifest["model"], manifest["resolved_revision"], time.perf_counter() - started
    )
    return manifest


def main() -> None:
    def body() -> None:
        cfg = load_config()
        run(cfg.base, cfg.seed, Path(cfg.paths.pretrain), Path(cfg.paths.base))

    stage_main("base", body)


if __name__ == "__main__":
    main()
