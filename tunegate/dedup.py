"""Duplicate, near-duplicate, contradiction and eval-contamination detection (pure functions, no I/O).

The near-duplicate path is staged so each step could run sharded on a cluster engine:
`signatures()` (per row, embarrassingly parallel) -> `candidate_pairs()` (group by band key) ->
`verify()` (per pair, real Jaccard) -> `leaders()` (greedy clustering over verified pairs).

MinHash is vectorised with numpy and uses multiply-shift hashing, h(x) = ((a*x + b) mod 2^64) >> 32 with
odd 64-bit a: the modulo is uint64 wrap-around, so there is no division and no Python loop per
permutation (3x faster than (a*x + b) mod p in numpy).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tunegate.text import normalise_text, words


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams; a text shorter than n words is one shingle (so short rows still compare)."""
    w = words(text)
    if len(w) <= n:
        return {" ".join(w)}
    if n == 1:
        return set(w)
    return {" ".join(g) for g in zip(*(w[k:] for k in range(n)), strict=False)}


def exact_key(text: str) -> str:
    return normalise_text(text)


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 128
    seed: int = 1

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        b = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64)
        return a, b

    def signatures(
        self, items: Sequence, chunk: int = 65536, shingle: Callable[[str], Iterable[str]] | None = None
    ) -> np.ndarray:
        """(n_docs, num_perm) uint32 signatures of shingle sets, or of texts with `shingle` given (then
        each chunk's shingles are made, hashed and freed: only the signatures stay in memory). One
        vectorised pass per permutation over a chunk keeps the temporaries small (memory bandwidth,
        not arithmetic, is the limit)."""
        a, b = self.params()
        shift = np.uint64(32)
        out = np.empty((len(items), self.num_perm), dtype=np.uint32)
        for start in range(0, len(items), chunk):
            block = items[start : start + chunk]
            if shingle is not None:
                block = [shingle(t) for t in block]
            hashes = [np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64) for sh in block]
            lengths = np.array([len(h) for h in hashes])
            flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
            offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            scratch = np.empty_like(flat)
            for k in range(self.num_perm):
                np.multiply(flat, a[k], out=scratch)
                np.add(scratch, b[k], out=scratch)
                np.right_shift(scratch, shift, out=scratch)
                out[start : start + len(block), k] = np.minimum.reduceat(scratch, offsets)
        return out


def band_key(signatures: np.ndarray, band: int, bands: int) -> np.ndarray:
    """One uint64 key per row for one LSH band: rows with equal keys share that band's bucket."""
    rows = signatures.shape[1] // bands
    mult = np.random.default_rng(7).integers(1, 1 << 61, size=rows, dtype=np.uint64)
    return (signatures[:, band * rows : (band + 1) * rows].astype(np.uint64) * mult).sum(axis=1)


_TRIANGLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def bucket_pairs(members: np.ndarray, max_bucket: int) -> np.ndarray:
    """The candidate pairs of one bucket whose rows are in ascending order: all pairs, or, for a bucket
    larger than max_bucket (a shared template, say), a star on its first row, which bounds the work."""
    size = len(members)
    if size > max_bucket:
        return np.stack([np.full(size - 1, members[0]), members[1:]], axis=1)
    if size not in _TRIANGLES:
        _TRIANGLES[size] = np.triu_indices(size, 1)
    i, j = _TRIANGLES[size]
    return np.stack([members[i], members[j]], axis=1)


def candidate_pairs(signatures: np.ndarray, bands: int, max_bucket: int = 64) -> np.ndarray:
    """LSH: rows that agree on every value of at least one band become candidate pairs, (k, 2) int64, i < j.

    Each bucket gives its pairs by `bucket_pairs`; verification then decides each pair. Pairs of
    two-row buckets (the common case) are produced without a Python loop.
    """
    n = signatures.shape[0]
    found: list[np.ndarray] = []
    for band in range(bands):
        keys = band_key(signatures, band, bands)
        # A stable sort keeps equal keys in row order, so every bucket's members are already ascending.
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.concatenate(([True], np.diff(keys[order]) != 0)))
        sizes = np.diff(np.append(starts, n))
        two = starts[sizes == 2]
        found.append(np.stack([order[two], order[two + 1]], axis=1))
        for lo, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist(), strict=True):
            found.append(bucket_pairs(order[lo : lo + size], max_bucket))
    if not found:
        return np.empty((0, 2), np.int64)
    return _unique_pairs(np.concatenate(found))


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted unique rows of a (k, 2) index array, via one int64 key per pair (np.unique(axis=0) is ~10x slower)."""
    pairs = pairs.astype(np.int64).reshape(-1, 2)
    if not len(pairs):
        return pairs
    width = int(pairs.max()) + 1
    keys = np.unique(pairs[:, 0] * width + pairs[:, 1])
    return np.stack([keys // width, keys % width], axis=1)


def jaccard(x: set[str], y: set[str]) -> float:
    return len(x & y) / len(x | y) if x or y else 1.0


def verify(
    pairs: np.ndarray | Iterable[tuple[int, int]],
    shingle_sets: Sequence[set[str]],
    threshold: float,
    signatures: np.ndarray | None = None,
    slack: float = 0.15,
) -> list[tuple[int, int, float]]:
    """Keep the candidate pairs whose real Jaccard similarity reaches the threshold.

    With signatures, pairs whose MinHash estimate is below threshold - slack are rejected first in one
    vectorised step (slack 0.15 is > 3 standard deviations of the estimate at 128 permutations), so
    the exact set comparison runs only on plausible pairs.
    """
    idx = _unique_pairs(np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64))
    if signatures is not None and len(idx):
        estimate = (signatures[idx[:, 0]] == signatures[idx[:, 1]]).mean(axis=1)
        idx = idx[estimate >= threshold - slack]
    out = []
    for i, j in idx.tolist():
        sim = jaccard(shingle_sets[i], shingle_sets[j])
        if sim >= threshold:
            out.append((i, j, sim))
    return out


def leaders(edges: Iterable[tuple[int, int, float]]) -> dict[int, tuple[int, float]]:
    """Greedy leader clustering in row order: a row is a duplicate when it is verified-similar to an
    earlier *kept* row, and points at the most similar one. Unlike union-find over all edges, a chain
    A~B~C never drops C for a resemblance to A that was never verified (no transitive blow-ups).
    Only rows with edges are visited; every other row is kept."""
    earlier: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for i, j, sim in edges:
        earlier[max(i, j)].append((sim, min(i, j)))
    out: dict[int, tuple[int, float]] = {}
    for j in sorted(earlier):
        matches = [(sim, -i) for sim, i in earlier[j] if i not in out]
        if matches:
            sim, neg_i = max(matches)
            out[j] = (-neg_i, round(sim, 4))
    return out


def near_duplicates(
    texts: Sequence[str], ngram: int, num_perm: int, bands: int, threshold: float, seed: int = 1
) -> dict[int, tuple[int, float]]:
    """{index: (representative index, best verified similarity)} for every row that is a near copy of an earlier one."""
    sigs = MinHasher(num_perm, seed).signatures(texts, shingle=lambda t: shingles(t, ngram))
    return leaders(verify(candidate_pairs(sigs, bands), _ShingleCache(texts, ngram), threshold, sigs))


class _ShingleCache:
    """Shingle sets made on first use: verification touches only the rows in plausible pairs, so the
    sets of all rows never sit in memory together (on 1M short rows they would take ~3 GiB)."""

    def __init__(self, texts: Sequence[str], ngram: int):
        self.texts, self.ngram, self.sets = texts, ngram, {}

    def __getitem__(self, i: int) -> set[str]:
        if (found := self.sets.get(i)) is None:
            found = self.sets[i] = shingles(self.texts[i], self.ngram)
        return found


class ContaminationIndex:
    """Eval texts indexed as word n-grams; texts shorter than n words must appear whole (contiguously).

    Whole-text matching for short items avoids the false positives that short n-grams of a shared
    prompt template ("what is the capital of") would cause.
    """

    def __init__(self, n: int):
        self.n = n
        self.long: dict[tuple[str, ...], str] = {}
        self.short: dict[tuple[str, ...], str] = {}

    def add(self, text: str, item_id: str, whole: bool = True) -> None:
        """Index an eval text. whole=False for answers: a short answer ("Paris", "42") is common
        training text, not a leak, so only answers of n words or more are indexed."""
        w = tuple(words(text))
        if not w:
            return
        if len(w) >= self.n:
            for i in range(len(w) - self.n + 1):
                self.long.setdefault(w[i : i + self.n], item_id)
        elif whole:
            self.short.setdefault(w, item_id)

    def match(self, text: str) -> tuple[str, str] | None:
        """(eval item id, the matching words) if text contains an indexed eval text, else None."""
        w = tuple(words(text))
        for i in range(max(0, len(w) - self.n + 1)):
            if (hit := self.long.get(w[i : i + self.n])) is not None:
                return hit, " ".join(w[i : i + self.n])
        lengths = {len(k) for k in self.short}
        for size in sorted(lengths, reverse=True):
            for i in range(len(w) - size + 1):
                if (hit := self.short.get(w[i : i + size])) is not None:
                    return hit, " ".join(w[i : i + size])
        return None
