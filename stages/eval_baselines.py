"""eval_baselines: score the base model given the cheaper alternatives to fine-tuning on the target tasks.

    python -m stages.eval_baselines        # what dvc.yaml runs

One lm-eval run per baseline in `baselines:` (prompt, few-shot, retrieval; tunegate.baselines), each written
like eval_base's output (results.json, samples/) under its name, with costs.json (prompt tokens per request,
examples shown, items trimmed to the context). It depends on the base, the tasks, the instructions and the
deduplicated training rows, never on the candidate: a retrain with new hyperparameters re-runs none of it.
`baselines.tasks: []` writes an empty folder (the gate then compares with the base alone).
"""

from __future__ import annotations

from tunegate import baselines
from tunegate.config import load_config
from tunegate.consistency import baseline_problems
from tunegate.errors import UserError
from tunegate.io import atomic_path, read_json, write_json
from tunegate.models import load_manifest
from tunegate.paths import RESULTS, Layout
from tunegate.runtime import record_timing, seed_everything, stage_main


def body() -> None:
    cfg = load_config()
    layout = Layout.of(cfg.paths)
    if found := baseline_problems(cfg):  # said before any model loads
        raise UserError("; ".join(found))
    seed_everything(cfg.seed)
    with atomic_path(layout.eval_baselines()) as tmp:
        costs = baselines.run(cfg, load_manifest(layout.base), layout, tmp)
        scores = {name: read_json(tmp / name / RESULTS)["scores"] for name in costs}
    write_json(layout.metrics("eval_baselines"), scores)
    record_timing("eval_baselines", sum(c["seconds"] for c in costs.values()))
    for name, cost in costs.items():  # wall time beside the tokens: outside the DVC outputs, which stay reproducible
        record_timing(f"eval_baselines.{name}", cost["seconds"])


def main() -> None:
    stage_main("eval_baselines", body)


if __name__ == "__main__":
    main()
