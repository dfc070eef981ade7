"""Near-duplicate detection: tunegate (rensa MinHash, LSH, exact verification) vs datasketch's MinHashLSH.

    python -m benchmarks.dedup            # ~10.5k labelled documents, every engine in the same run
    python -m benchmarks.dedup --docs 40000

The corpus is seeded and labelled: originals (half free text, half from shared templates whose fixed
words make hard negatives), then copies of originals with 1-20% of words edited (substitution,
insertion, deletion) and case/punctuation noise. A document counts as a true positive when it is a
copy and is matched to its own original. Every engine gets the same texts, n-gram size and num_perm;
datasketch and rensa alone are used the way their READMEs show (query, then insert) on the shingle strings
of `tunegate.dedup.shingles`; tunegate verifies candidates by their exact Jaccard similarity. The previous
tunegate path (numpy signatures, string sets: `minhash="numpy"`) runs too, and its rows must equal the
default's. One thread: rensa's pool is limited to one (RAYON_NUM_THREADS=1), and time is the process's
CPU time, so other work on a shared machine does not enter the figures.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import time
from dataclasses import dataclass

from tunegate.dedup import near_duplicates, shingles


@dataclass
class Corpus:
    docs: list[str]
    origin: list[int]  # index of the original each doc copies (itself for originals)


def make_corpus(n_docs: int, seed: int = 0, dup_share: float = 0.25) -> Corpus:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    # cumulative weights once: with plain weights every draw re-adds 20,000 of them (the same draws either way)
    cum = list(itertools.accumulate(1 / (i + 1) ** 0.8 for i in range(len(vocab))))
    templates = [
        [rng.choice(vocab[:3000]) if rng.random() < 0.6 else None for _ in range(rng.randint(40, 80))]
        for _ in range(150)
    ]
    n_orig = int(n_docs * (1 - dup_share))
    docs, origin = [], []
    for i in range(n_orig):
        if i % 2:
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(40, 80))
        else:  # a hard negative: shares a template's fixed words with many other originals
            words = [w or rng.choices(vocab, cum_weights=cum)[0] for w in rng.choice(templates)]
        docs.append(" ".join(words))
        origin.append(i)
    for _ in range(n_docs - n_orig):
        src = rng.randrange(n_orig)
        words = docs[src].split()
        for _ in range(max(1, round(len(words) * rng.uniform(0.01, 0.20)))):
            op, pos = rng.random(), rng.randrange(len(words))
            if op < 0.6:
                words[pos] = rng.choice(vocab)
            elif op < 0.8:
                words.insert(pos, rng.choice(vocab))
            elif len(words) > 5:
                del words[pos]
        text = " ".join(words)
        if rng.random() < 0.5:
            text = text.upper() if rng.random() < 0.5 else text.replace(" ", ",  ", 3) + "!!"
        docs.append(text)
        origin.append(src)
    return Corpus(docs, origin)


def score(corpus: Corpus, match: dict[int, int]) -> dict[str, float]:
    """match: {doc: the earlier doc it was matched to}."""
    copies = {i for i, o in enumerate(corpus.origin) if o != i}
    tp = sum(1 for i, j in match.items() if i in copies and corpus.origin[i] == corpus.origin[j])
    precision = tp / len(match) if match else 1.0
    recall = tp / len(copies) if copies else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def run_tunegate(
    corpus: Corpus, ngram: int, num_perm: int, bands: int, threshold: float, minhash: str = "rensa"
) -> dict[int, int]:
    near = near_duplicates(corpus.docs, ngram, num_perm, bands, threshold, minhash=minhash)
    return {i: rep for i, (rep, _) in near.items()}


def run_rensa(corpus: Corpus, ngram: int, num_perm: int, bands: int, threshold: float) -> dict[int, int]:
    """rensa's own LSH without verification: what a fast MinHash library alone gives."""
    from rensa import RMinHash, RMinHashLSH

    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    match = {}
    for i, doc in enumerate(corpus.docs):
        m = RMinHash(num_perm=num_perm, seed=1)
        m.update(list(shingles(doc, ngram)))
        hits = lsh.query(m)
        if hits:
            match[i] = min(hits)
        lsh.insert(i, m)
    return match


def run_datasketch(corpus: Corpus, ngram: int, num_perm: int, threshold: float) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    match = {}
    for i, doc in enumerate(corpus.docs):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles(doc, ngram)])
        hits = lsh.query(m)
        if hits:
            match[i] = min(hits)
        lsh.insert(i, m)
    return match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ngram", type=int, default=2)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--bands", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per engine, interleaved; the median time is reported"
    )
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"  # before rensa is imported: one core for every engine
    corpus = make_corpus(args.docs, args.seed)
    setting = (corpus, args.ngram, args.num_perm, args.bands, args.threshold)
    engines = {
        "tunegate (rensa MinHash, LSH, exact Jaccard, leader clustering)": lambda: run_tunegate(*setting),
        "tunegate, previous path (numpy MinHash, string-set Jaccard)": lambda: run_tunegate(*setting, "numpy"),
        "datasketch `MinHashLSH` (query, then insert)": lambda: run_datasketch(
            corpus, args.ngram, args.num_perm, args.threshold
        ),
        "rensa `RMinHashLSH` alone (query, then insert; no verification)": lambda: run_rensa(*setting),
    }
    warm = Corpus(corpus.docs[:200], corpus.origin[:200])
    for fn in (run_tunegate, run_datasketch, run_rensa):  # imports and first calls outside the timing
        fn(warm, args.ngram, args.num_perm, *([args.threshold] if fn is run_datasketch else setting[3:]))
    times: dict[str, list[float]] = {name: [] for name in engines}
    matches = {}
    for _ in range(args.repeat):  # interleaved, so a slow moment of the machine hits every engine
        for name, fn in engines.items():
            started = time.process_time()
            matches[name] = fn()
            times[name].append(time.process_time() - started)
    names = list(engines)
    baseline = statistics.median(times[names[2]])
    print(f"{len(corpus.docs)} docs, word {args.ngram}-grams, num_perm {args.num_perm}, threshold {args.threshold}")
    print(f"median of {args.repeat} interleaved runs per engine, one thread; seconds of CPU time")
    print("| engine | precision | recall | F1 | docs/s | seconds | × datasketch |\n|---|---|---|---|---|---|---|")
    for name in names:
        s, seconds = score(corpus, matches[name]), statistics.median(times[name])
        print(
            f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
            f"{len(corpus.docs) / seconds:,.0f} | {seconds:.2f} | {baseline / seconds:.1f} |"
        )
    rounds = sorted(d / t for d, t in zip(times[names[2]], times[names[0]], strict=True))
    print(
        f"throughput ratio tunegate/datasketch: {baseline / statistics.median(times[names[0]]):.1f}x "
        f"(single rounds {rounds[0]:.1f}-{rounds[-1]:.1f}x); "
        f"same rows as the previous path: {matches[names[0]] == matches[names[1]]}"
    )


if __name__ == "__main__":
    main()
