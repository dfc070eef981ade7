"""Stage start-up: each stage as its own `python -m stages.X` process, cold against handed to `tunegate warm`.

    make demo && python -m benchmarks.warm --repeat 3     # in a project where `dvc repro` has run

Runs the stages that a retrain reruns and that write nothing DVC has not already recorded for the same inputs
(validate, dedup, mix, eval_base, export, gate: each rewrites its outputs byte for byte), cold and warm in turn,
and reports each one's wall time (median of --repeat interleaved rounds) and the ratio. The runner is started
once, before the rounds; the time it takes to import its libraries is printed apart, since a user pays it once
per session and `dvc repro` pays the cold cost per stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("validate", "dedup", "mix", "eval_base", "export", "gate")


def _run(stage: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stages.{stage} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    args = parser.parse_args()
    if not Path("models/candidate/adapter").exists():
        raise SystemExit("models/candidate/adapter: missing; run `dvc repro` (make demo) first")
    env = {k: v for k, v in os.environ.items() if k != "TUNEGATE_WARM"}
    with tempfile.TemporaryDirectory(prefix="tg-warm-") as folder:
        socket_path = str(Path(folder) / "runner.sock")
        started = time.perf_counter()
        runner = subprocess.Popen(
            [sys.executable, "-m", "tunegate.warm", socket_path], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            ready = runner.stdout.readline().strip()
            runner.stdout.readline()
            up = time.perf_counter() - started
            warm_env = {**env, "TUNEGATE_WARM": socket_path}
            times = {(stage, mode): [] for stage in args.stages for mode in ("cold", "warm")}
            for _ in range(args.repeat):
                for stage in args.stages:
                    times[stage, "cold"].append(_run(stage, env))
                    times[stage, "warm"].append(_run(stage, warm_env))
        finally:
            runner.terminate()
            runner.wait(timeout=30)
    print(f"runner up in {up:.1f} s ({ready}); median of {args.repeat} interleaved rounds, wall seconds per stage")
    print(f"{'stage':<10} {'cold':>7} {'warm':>7} {'cold/warm':>10}")
    total = {"cold": 0.0, "warm": 0.0}
    for stage in args.stages:
        cold, warm = (statistics.median(times[stage, mode]) for mode in ("cold", "warm"))
        total["cold"] += cold
        total["warm"] += warm
        print(f"{stage:<10} {cold:7.2f} {warm:7.2f} {cold / warm:9.1f}x")
    print(f"{'all':<10} {total['cold']:7.2f} {total['warm']:7.2f} {total['cold'] / total['warm']:9.1f}x")


if __name__ == "__main__":
    main()
