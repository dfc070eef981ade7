"""eval_base: score the base model on every task in `eval.tasks` (lm-eval), with per-sample outcomes.

    python -m stages.eval_base        # what dvc.yaml runs

It depends only on the base manifest, the task definitions and the eval params, so DVC caches it:
a retrain with new data or hyperparameters never re-evaluates the base.
"""

from __future__ import annotations

from pathlib import Path

from tunegate.config import load_config
from tunegate.evaluation import evaluate
from tunegate.io import write_json
from tunegate.runtime import record_timing, seed_everything, stage_main


def main() -> None:
    def body() -> None:
        from tunegate.models import load_manifest

        cfg = load_config()
        seed_everything(cfg.seed)
        result = evaluate(cfg.eval, load_manifest(cfg.paths.base), Path(cfg.paths.evals) / "tasks", Path(cfg.paths.eval_base), cfg.seed,
                          trust_remote_code=cfg.base.trust_remote_code)
        write_json(Path(cfg.paths.metrics) / "eval_base.json", result["scores"])
        record_timing("eval_base", result["seconds"])

    stage_main("eval_base", body)


if __name__ == "__main__":
    main()
