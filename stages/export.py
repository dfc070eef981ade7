"""export: write the trained model in the formats runtimes read (merged safetensors, GGUF, Ollama, vLLM).

    python -m stages.export        # what dvc.yaml runs

`export.formats` and `export.gguf` in params.yaml choose what is written (tunegate.export); everything
that could refuse (an architecture llama.cpp does not convert, a template Ollama cannot express, a DoRA
adapter for vLLM) is refused in one line before any work. `eval_export` then scores every artifact
through the runtime that serves it, and the gate compares it with the candidate item by item.
"""

from __future__ import annotations

import logging
import time

from tunegate.adapters import ADAPTERS
from tunegate.config import load_config
from tunegate.errors import UserError
from tunegate.export import Source, commands, run
from tunegate.io import read_json
from tunegate.models import load_manifest
from tunegate.paths import Layout
from tunegate.runtime import record_timing, stage_main

log = logging.getLogger(__name__)


def main() -> None:
    def body() -> None:
        cfg = load_config()
        layout = Layout.of(cfg.paths)
        if not layout.train_record.exists():
            raise UserError(f"{layout.train_record}: missing; run the train stage first (dvc repro train)")
        trained = read_json(layout.train_record)
        source = Source(
            load_manifest(layout.base),
            layout.adapter,
            ADAPTERS[trained["adapter"]].peft,
            cfg.register_.model_name,
            cfg.base.trust_remote_code,
        )
        started = time.perf_counter()
        record = run(source, list(cfg.export.formats), list(cfg.export.gguf), layout.export)
        record_timing("export", time.perf_counter() - started)
        for runtime, line in commands(record, str(layout.export)).items():
            log.info("%-12s %s", runtime, line)

    stage_main("export", body)


if __name__ == "__main__":
    main()
