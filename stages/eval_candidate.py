"""eval_candidate: score base + trained adapter (or the fully fine-tuned model) on the same tasks as eval_base.

    python -m stages.eval_candidate        # what dvc.yaml runs

What is scored is what `train` recorded it trained (its train_config.json): an adapter is folded
into the base in memory (`eval.merge_adapter`, or applied through lm-eval's `peft=`); a full
fine-tune is loaded directly. The implementation is shared with eval_base (`tunegate.evaluation`).
"""

from __future__ import annotations

from tunegate.evaluation import run_stage
from tunegate.runtime import stage_main


def main() -> None:
    stage_main("eval_candidate", lambda: run_stage("candidate"))


if __name__ == "__main__":
    main()
