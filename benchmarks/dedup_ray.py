"""`dedup.engine: ray` on a list of texts: the blocks tunegate gives Ray vs Ray's own default, side by side.

    python -m benchmarks.dedup_ray                 # 1,500 labelled documents, a local Ray on every core
    python -m benchmarks.dedup_ray --docs 20000 --repeat 3

Both runs get the same texts and settings and must find the same near duplicates; they alternate, so a slow
moment of the machine hits both. Wall time (Ray's work is in other processes), median of `--repeat`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

from benchmarks.dedup import make_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import ray

    from tunegate import dedup_ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    docs = make_corpus(args.docs, args.seed).docs
    run = lambda: dedup_ray.near_duplicates_ray(docs, ngram=2, num_perm=128, bands=32, threshold=0.4)
    ray_default = lambda rows, ray: 200  # what ray.data.from_items does without override_num_blocks
    runs = {"tunegate's blocks": run, "Ray's default (200 blocks)": lambda: _with(ray_default, dedup_ray, run)}
    run()  # Ray's workers started outside the timing
    times: dict[str, list[float]] = {name: [] for name in runs}
    found = {}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            started = time.perf_counter()
            found[name] = fn()
            times[name].append(time.perf_counter() - started)
    ray.shutdown()
    theirs = statistics.median(times[list(runs)[1]])
    print(f"{args.docs} docs, {os.cpu_count()} CPUs, median of {args.repeat}, wall seconds")
    print("| blocks | seconds | × Ray's default |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {statistics.median(times[name]):.1f} | {theirs / statistics.median(times[name]):.2f} |")
    ours, default = found.values()
    print(f"same near duplicates: {ours == default} ({len(ours)} rows)")


def _with(blocks, module, run):
    with mock.patch.object(module, "_blocks", blocks):
        return run()


if __name__ == "__main__":
    main()
