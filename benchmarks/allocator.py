"""Training on CPU with glibc's malloc as it comes vs keeping freed memory for reuse (tunegate.runtime.KEEP_FREED).

    python -m benchmarks.allocator                      # the demo's train stage (LoRA SFT), 1 thread
    python -m benchmarks.allocator --workload pretrain  # the demo base's pretraining loop
    python -m benchmarks.allocator --steps 300 --threads 2 --repeat 3

`train` is the train stage as `dvc repro` runs it (stages.train.run: TRL's SFTTrainer, LoRA, the demo's mixed
rows; needs `make demo` first), whose batches differ in length from step to step; `pretrain` is the demo base's
own loop (demo/model.py: full blocks of 128 tokens, the same shapes at every step), which needs only the committed
corpus. Each run is a fresh process (malloc's settings hold for a process's life), the two settings interleaved,
median of --repeat. Reported per setting: wall time, user and system CPU seconds, minor page faults, peak RSS; the
ratio of wall times is the figure to read. One thread is how the test suite runs each process (two workers on two
cores); --threads 2 is a user's `dvc repro` on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("malloc as it comes", "freed memory kept (tunegate)")


def pretrain(steps: int, out: Path) -> float:
    from demo.model import build
    from tunegate.config import load_config
    from tunegate.io import read_jsonl

    cfg = load_config()
    demo = cfg.base.demo.model_copy(update={"steps": steps, "warmup_steps": min(cfg.base.demo.warmup_steps, steps)})
    return build(read_jsonl(ROOT / cfg.paths.pretrain), demo, cfg.seed, out)["final_loss"]


def train(steps: int, out: Path) -> float:
    from benchmarks.train import _demo
    from stages import train as stage
    from tunegate.runtime import seed_everything

    cfg, manifest, rows = _demo()
    cfg.train.args.update(max_steps=steps, save_steps=10**6, eval_steps=10**6)
    seed_everything(cfg.seed)
    outputs = stage.Outputs(out / "model", out / "ckpt", out / "plots.csv")
    return stage.run(cfg.train, cfg.seed, stage.Inputs(manifest, rows, [], []), outputs)["train_loss"]


WORKLOADS = {"train": train, "pretrain": pretrain}


def child(workload: str, setting: str, steps: int, out: str) -> None:
    """One run in this process; prints its figures as one JSON line."""
    from tunegate.runtime import keep_freed_memory

    if setting == SETTINGS[1]:
        keep_freed_memory()
    started = time.perf_counter()
    loss = WORKLOADS[workload](steps, Path(out))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt}
    print(json.dumps({**figures, "rss_gib": usage.ru_maxrss / 2**20, "loss": loss}))


def run_one(workload: str, setting: str, steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("MALLOC_TOP_PAD_", None)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benchmarks.allocator", "--workload", workload, "--steps", str(steps)]
        cmd += ["--child", setting, "--out", out]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"benchmark run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="train")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.workload, opts.child, opts.steps, opts.out)
        return
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for i in range(opts.repeat):
        for setting in SETTINGS:
            runs[setting].append(run_one(opts.workload, setting, opts.steps, opts.threads))
            print(f"run {i + 1}/{opts.repeat} {setting}: {runs[setting][-1]['wall']:.1f} s", file=sys.stderr)
    median = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SETTINGS}
    losses = {r["loss"] for rs in runs.values() for r in rs}
    what = {"train": "train stage (LoRA SFT)", "pretrain": "demo base pretraining"}[opts.workload]
    print(f"{what}, {opts.steps} steps, {opts.threads} thread(s), median of {opts.repeat}")
    print("| malloc | wall s | user s | system s | minor faults | peak RSS GiB | × wall |")
    print("|---|---|---|---|---|---|---|")
    first = median[SETTINGS[0]]["wall"]
    for setting, m in median.items():
        print(
            f"| {setting} | {m['wall']:.1f} | {m['user']:.1f} | {m['sys']:.1f} | {m['minflt']:,.0f} | "
            f"{m['rss_gib']:.2f} | {m['wall'] / first:.2f} |"
        )
    print(f"final loss in every run: {sorted(losses)} (the allocator changes no number)")


if __name__ == "__main__":
    main()
