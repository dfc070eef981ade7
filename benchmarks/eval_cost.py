"""Eval cost of a retrain: what the second pipeline run spends on lm-eval when the base is cached.

    make demo && python -m benchmarks.eval_cost          # in a project where `dvc repro` has run

A first run evaluates the base (eval_base) and the candidate (eval_candidate); after a change of
hyperparameters or data, DVC reuses eval_base, so the second run's eval time is eval_candidate's
alone. This times both, on the project's own models and tasks, interleaved (median of --repeat runs),
and also the candidate through lm-eval's `peft=` (eval.merge_adapter: false) for comparison, and the
baselines (eval_baselines: the base given the instructions, few-shot and retrieved examples on the target
tasks), which a first run adds and a retrain never repeats (they do not depend on the candidate).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tunegate import baselines
from tunegate.config import load_config
from tunegate.evaluation import evaluate
from tunegate.models import load_manifest
from tunegate.paths import Layout
from tunegate.runtime import configure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure()
    cfg = load_config()
    manifest = load_manifest(cfg.paths.base)
    tasks, adapter = Path(cfg.paths.evals) / "tasks", Path(cfg.paths.train) / "adapter"
    if not adapter.exists():
        raise SystemExit(f"{adapter}: missing; run `dvc repro` (make demo) first")
    runs = {
        "eval_base": lambda out: evaluate(cfg.eval, manifest, tasks, out, cfg.seed),
        "eval_candidate (merged in memory, default)": lambda out: evaluate(
            cfg.eval, manifest, tasks, out, cfg.seed, adapter=adapter
        ),
        "eval_candidate (lm-eval peft=)": lambda out: evaluate(
            cfg.eval.model_copy(update={"merge_adapter": False}), manifest, tasks, out, cfg.seed, adapter=adapter
        ),
        f"eval_baselines ({', '.join(cfg.baselines.names())} on {', '.join(cfg.baselines.tasks)})": lambda out: {
            "seconds": sum(c["seconds"] for c in baselines.run(cfg, manifest, Layout.of(cfg.paths), out).values())
        },
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for k, (name, fn) in enumerate(runs.items()):
                times[name].append(fn(Path(tmp) / f"{r}-{k}")["seconds"])
    median = {name: statistics.median(t) for name, t in times.items()}
    base, merged, peft, extra = median.values()
    print(
        f"median of {args.repeat} interleaved runs, {len(cfg.eval.tasks)} tasks, "
        f"limit {cfg.eval.limit}, batch {cfg.eval.batch_size}"
    )
    print("| run | seconds |\n|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.1f} |")
    print(
        f"second run / first run eval time: {merged / (base + merged + extra):.0%} (merged), "
        f"{peft / (base + peft + extra):.0%} (peft=); the baselines add {extra / (base + merged):.0%} to a first run's "
        "eval time and nothing to a retrain's"
    )


if __name__ == "__main__":
    main()
