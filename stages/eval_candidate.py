"""eval_candidate: score base + trained adapter (or the fully fine-tuned model) on the same tasks as eval_base.

    python -m stages.eval_candidate        # what dvc.yaml runs

The adapter is applied through lm-eval's own `peft=` argument; a full fine-tune is loaded directly.
"""

from __future__ import annotations

from pathlib import Path

from tunegate.config import load_config
from tunegate.evaluation import evaluate
from tunegate.io import write_json
from tunegate.runtime import record_timing, seed_everything, stage_main
from stages.train import ADAPTER


def main() -> None:
    def body() -> None:
        from tunegate.models import load_manifest

        cfg = load_config()
        seed_everything(cfg.seed)
        trained = Path(cfg.paths.train) / ADAPTER
        full = cfg.train.adapter == "full"
        result = evaluate(cfg.eval, load_manifest(cfg.paths.base), Path(cfg.paths.evals) / "tasks", Path(cfg.paths.eval_candidate), cfg.seed,
                          adapter=None if full else trained, full_model=trained if full else None,
                          trust_remote_code=cfg.base.trust_remote_code)
        write_json(Path(cfg.paths.metrics) / "eval_candidate.json", result["scores"])
        record_timing("eval_candidate", result["seconds"])

    stage_main("eval_candidate", body)


if __name__ == "__main__":
    main()
