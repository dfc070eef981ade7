"""eval_base: score the base model on every task in `eval.tasks` (lm-eval), with per-sample outcomes.

    python -m stages.eval_base        # what dvc.yaml runs

It depends only on the base manifest, the task definitions and the eval params, so DVC caches it:
a retrain with new data or hyperparameters never re-evaluates the base. The implementation is
shared with eval_candidate (`tunegate.evaluation`), so both sides are scored the same way.
"""

from __future__ import annotations

from tunegate.evaluation import run_stage
from tunegate.runtime import stage_main


def main() -> None:
    stage_main("eval_base", lambda: run_stage("base"))


if __name__ == "__main__":
    main()
