"""Peak memory of the dedup stage on a large set of short chat rows (default 1M).

    python -m benchmarks.dedup_memory                # 1,000,000 rows
    python -m benchmarks.dedup_memory --rows 200000

Rows are seeded, short (a 6-24 word question and a 4-20 word answer, like the demo's), in the
internal schema the stage reads, with 3% exact copies (case/punctuation noise) and 3% near copies
(one or two words edited). The whole stage logic runs (eval-leak index over the project's evals/data,
contradictions, exact, near duplicates) with the project's dedup params. Peak RSS is the process's
high-water mark (getrusage); the rows themselves are measured first so the stage's own share shows.
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import time
from pathlib import Path

from tunegate.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = [
        f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}"
        f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{i % 97}"
        for i in range(30000)
    ]
    cum = list(itertools.accumulate(1 / (i + 1) ** 0.9 for i in range(len(vocab))))
    rows: list[dict] = []
    for i in range(n):
        roll = rng.random()
        if rows and roll < 0.03:  # exact copy after normalisation
            src = rows[rng.randrange(len(rows))]["messages"]
            user, answer = src[0]["content"].upper() + "?", src[1]["content"]
        elif rows and roll < 0.06:  # near copy: one or two words edited
            src = rows[rng.randrange(len(rows))]["messages"]
            words = src[0]["content"].split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            user, answer = " ".join(words), src[1]["content"]
        else:
            user = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(6, 24)))
            answer = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 20)))
        rows.append(
            {
                "id": f"r{i}",
                "source": "domain",
                "line": i + 1,
                "kind": "sft",
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from stages.dedup import eval_items, run

    cfg = load_config(ROOT / "params.yaml")
    before = peak_gib()
    rows = make_rows(args.rows)
    with_rows = peak_gib()
    started = time.perf_counter()
    _, dropped, metrics = run(cfg.dedup, {"domain": rows}, eval_items(ROOT / "evals" / "data"), cfg.seed)
    seconds = time.perf_counter() - started
    peak = peak_gib()
    reasons = metrics["sources"]["domain"]["reasons"]
    print(
        f"{args.rows:,} rows: in {metrics['in']:,} = kept {metrics['kept']:,} "
        f"+ dropped {metrics['dropped']:,} ({reasons})"
    )
    print(
        f"peak RSS {peak:.2f} GiB (interpreter + imports {before:.2f}, "
        f"+ the rows in memory {with_rows - before:.2f}, + dedup {peak - with_rows:.2f}); "
        f"{seconds:.0f} s, {args.rows / seconds:,.0f} rows/s"
    )
    print(f"dedup's own memory / the rows' own memory: {(peak - with_rows) / (with_rows - before):.2f}x")


if __name__ == "__main__":
    main()
