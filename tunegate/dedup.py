"""Duplicate, near-duplicate, contradiction and eval-contamination detection (pure functions, no I/O).

The near-duplicate path is staged so each step could run sharded on a cluster engine:
`signatures()` (per row, embarrassingly parallel) -> `candidate_pairs()` (group by band key) ->
`verify_exact()` (per pair, real Jaccard) -> `leaders()` (greedy clustering over verified pairs).

Shingling never builds a string per n-gram: a chunk of texts is folded into one byte buffer
(`tunegate.text.normalised_bytes`), its words are found and hashed in numpy, and each n-gram's hash is
a mix of its words' hashes. rensa (Rust) turns those hashes into MinHash signatures. Verification is
exact: n-grams are numbered by their words (the word hashes are checked for collisions byte by byte),
so the Jaccard similarity of two rows is that of their shingle-string sets, computed for all plausible
pairs at once as a sparse row product.

`MinHasher`, `shingles`, `jaccard` and `verify` are the previous numpy path over shingle strings; it stays
as the reference (`near_duplicates(..., minhash="numpy")`) that tests and `benchmarks.dedup` compare with.
"""

from __future__ import annotations

import itertools
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tunegate.text import normalise_text, normalised_bytes, words


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
class Words:
    """The words of many texts in one byte buffer: word k is `buf[start[k] : start[k] + length[k]]`, the
    words of text i are `offsets[i] : offsets[i + 1]`, and `hash[k]` is a 64-bit hash of word k's bytes."""

    buf: np.ndarray
    start: np.ndarray
    length: np.ndarray
    offsets: np.ndarray
    hash: np.ndarray


_M1, _M2, _SHIFT = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the whole output."""
    h = h ^ (h >> _SHIFT)
    h *= _M1
    h ^= h >> _SHIFT
    h *= _M2
    h ^= h >> _SHIFT
    return h


def _within(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each run of `lengths`, concatenated."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _ends(buf: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each word's first and last 8 bytes as little-endian uint64 (zeros past a shorter word's end): with
    the length they are the whole word for words of up to 16 bytes."""
    padded = np.concatenate((buf, np.zeros(8, np.uint8)))
    window = np.ndarray((len(buf),), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes from every offset
    short = length < 8
    keep = np.left_shift(np.uint64(1), (8 * np.minimum(length, 7)).astype(np.uint64)) - np.uint64(1)
    head = window[start] & np.where(short, keep, ~np.uint64(0))
    tail = np.where(short, np.uint64(0), window[np.maximum(start + length - 8, 0)])
    return head, tail


def split_words(texts: Sequence[str]) -> Words:
    """Fold every text (`normalised_bytes`), join them with spaces, and find and hash the words in numpy:
    a word's hash mixes its length with its first and last 8 bytes (no Python work per word; longer
    words that differ only in the middle collide, which costs a signature nothing and `word_ids` checks)."""
    parts = [normalised_bytes(t) for t in texts]
    sizes = np.fromiter(map(len, parts), np.int64, len(parts)) + 1
    buf = np.frombuffer(b" ".join(parts) + b" ", np.uint8)
    letter = np.empty(len(buf) + 1, np.int8)
    letter[0] = 0
    np.not_equal(buf, 32, out=letter[1:])
    edge = np.diff(letter)
    start, end = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    owner = np.searchsorted(np.cumsum(sizes), start, side="right")
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=len(parts)), out=offsets[1:])
    length = end - start
    head, tail = _ends(buf, start, length)
    return Words(buf, start, length, offsets, _mix(_mix(head ^ length.astype(np.uint64)) ^ tail))


def _grams(offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first word, words in the gram, gram offsets per text): a text of L >= n words has L - n + 1
    n-grams, a shorter one a single gram of all its L words (as `shingles` makes one shingle of it)."""
    count = np.diff(offsets)
    grams = np.maximum(count - n + 1, 1)
    gram_offsets = np.zeros(len(count) + 1, np.int64)
    np.cumsum(grams, out=gram_offsets[1:])
    first = np.repeat(offsets[:-1], grams) + _within(grams)
    return first, np.repeat(np.minimum(count, n), grams), gram_offsets


def gram_hashes(w: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word n-gram, gram offsets per text), from the word hashes alone."""
    first, size, gram_offsets = _grams(w.offsets, n)
    padded = np.concatenate((w.hash, np.zeros(n, np.uint64)))
    acc = size.astype(np.uint64)
    for k in range(n):
        acc = _mix(acc ^ np.where(k < size, padded[first + k], np.uint64(0)) + np.uint64(k + 1))
    return acc, gram_offsets


def signatures(texts: Sequence[str], ngram: int, num_perm: int = 128, seed: int = 1, chunk: int = 4096) -> np.ndarray:
    """(n_texts, num_perm) uint32 MinHash signatures of the texts' word n-grams, by rensa (Rust) from the
    n-gram hashes of `gram_hashes`; chunk by chunk, so only the signatures stay in memory."""
    import rensa

    out = np.empty((len(texts), num_perm), np.uint32)
    for lo in range(0, len(texts), chunk):
        hashes, offsets = gram_hashes(split_words(texts[lo : lo + chunk]), ngram)
        digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets.astype(np.uint64), num_perm, seed)
        rows = digests.to_rows()  # lists of Python ints: rensa offers no buffer, and this copy is half its time
        out[lo : lo + len(rows)] = np.fromiter(itertools.chain.from_iterable(rows), np.uint32).reshape(-1, num_perm)
    return out


def word_ids(w: Words) -> np.ndarray:
    """Exact numbers 1..V of the words: words with equal hashes are confirmed equal (length, first and
    last 8 bytes, and every byte of words longer than 16). A 64-bit collision has never been seen; if one
    occurs, the words are numbered by their bytes instead."""
    ids, first = _codes(w.hash)
    twin = first[ids]
    head, tail = _ends(w.buf, w.start, w.length)
    same = (w.length == w.length[twin]) & (head == head[twin]) & (tail == tail[twin])
    long = np.flatnonzero((w.length > 16) & (twin != np.arange(len(twin))))
    if same.all() and len(long):
        lengths = w.length[long]
        within = _within(lengths)
        mine = w.buf[np.repeat(w.start[long], lengths) + within]
        same[long] = np.array_equal(mine, w.buf[np.repeat(w.start[twin[long]], lengths) + within])
    if same.all():
        return ids.astype(np.int64) + 1
    numbers: dict[bytes, int] = {}
    spans = zip(w.start.tolist(), (w.start + w.length).tolist(), strict=True)
    return np.array([numbers.setdefault(w.buf[a:b].tobytes(), len(numbers) + 1) for a, b in spans], dtype=np.int64)


def gram_sets(w: Words, n: int):
    """The texts' n-gram sets as a 0/1 scipy CSR matrix (text x n-gram). An n-gram is numbered by its
    exact words (zero-padded for a text shorter than n words), so two rows share a column exactly when
    they share a shingle of `shingles`."""
    import scipy.sparse

    ids = word_ids(w)
    first, size, gram_offsets = _grams(w.offsets, n)
    padded = np.concatenate((ids, np.zeros(n, np.int64)))
    columns = [np.where(k < size, padded[first + k], 0) for k in range(n)]
    radix = int(ids.max(initial=0)) + 1
    if radix**n < 1 << 63:  # the words as digits of one exact int64 key
        key = sum(c * radix ** (n - 1 - k) for k, c in enumerate(columns))
        if radix**n >= 1 << 31:  # too wide for a column index: renumber the n-grams that occur
            key = _codes(key)[0]
    else:
        _, key = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)
    width = int(key.max(initial=0)) + 1
    owner = np.repeat(np.arange(len(gram_offsets) - 1), np.diff(gram_offsets))
    sets = scipy.sparse.csr_matrix(
        (np.ones(len(owner), np.int32), (owner, key.ravel())), shape=(len(gram_offsets) - 1, width)
    )
    sets.sum_duplicates()
    sets.data[:] = 1
    return sets


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
    key = np.zeros(signatures.shape[0], np.uint64)
    for k in range(rows):  # column by column: no (n, rows) temporary
        key += signatures[:, band * rows + k].astype(np.uint64) * mult[k]
    return key


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n_rows, bands) uint64: `band_key` of every band (for a block of rows; one machine goes band by band)."""
    return np.stack([band_key(signatures, band, bands) for band in range(bands)], axis=1)


def bucket_pairs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, max_bucket: int) -> np.ndarray:
    """The candidate pairs of buckets given as runs `order[start : start + size]` of ascending rows: all
    pairs of a bucket, or, for a bucket larger than max_bucket (a shared template, say), a star on its
    first row, which bounds the work. (k, 2) int64, i < j; no Python loop over buckets."""
    small = (sizes >= 2) & (sizes <= max_bucket)
    st, sz = starts[small], sizes[small]
    position = np.repeat(st, sz) + _within(sz)
    later = np.repeat(st + sz, sz) - position - 1  # the bucket's members after this one
    left = np.repeat(position, later)
    right = left + 1 + _within(later)
    big = sizes > max_bucket
    hub = np.repeat(starts[big], sizes[big] - 1)
    spokes = hub + 1 + _within(sizes[big] - 1)
    return np.stack([order[np.concatenate((left, hub))], order[np.concatenate((right, spokes))]], axis=1)


def candidate_pairs(signatures: np.ndarray, bands: int, max_bucket: int = 64) -> np.ndarray:
    """LSH: rows that agree on every value of at least one band become candidate pairs, (k, 2) int64, i < j.

    Each band's buckets give their pairs by `bucket_pairs`; verification then decides each pair.
    """
    found: list[np.ndarray] = []
    for band in range(bands):
        bucket = _codes(band_key(signatures, band, bands))[0]
        shared = np.flatnonzero(np.bincount(bucket)[bucket] >= 2)  # most rows are alone in their bucket
        # A stable sort keeps a bucket's rows in row order, so every bucket's members are ascending.
        order = shared[np.argsort(bucket[shared], kind="stable")]
        starts = np.flatnonzero(np.concatenate(([True], np.diff(bucket[order]) != 0)))
        found.append(bucket_pairs(order, starts, np.diff(np.append(starts, len(order))), max_bucket))
    if not found:
        return np.empty((0, 2), np.int64)
    return _unique_pairs(np.concatenate(found))


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted unique rows of a (k, 2) index array, via one int64 key per pair (np.unique(axis=0) is ~10x slower)."""
    pairs = pairs.astype(np.int64).reshape(-1, 2)
    if not len(pairs):
        return pairs
    width = int(pairs.max()) + 1
    keys = _sorted_unique(pairs[:, 0] * width + pairs[:, 1])
    return np.stack([keys // width, keys % width], axis=1)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by a sort and a mask (np.unique itself is several times slower on numpy 2.4)."""
    ordered = np.sort(values, axis=None)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a dense code 0..k-1 for every value, in order of first appearance; the index of each code's first
    appearance), by pandas' hash table: 6x faster than the sort np.unique needs."""
    import pandas as pd

    codes = pd.factorize(values)[0].astype(np.int64, copy=False)
    first = np.flatnonzero(np.diff(np.maximum.accumulate(codes), prepend=-1) > 0)
    return codes, first


def _estimates(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The MinHash estimate of every pair's similarity (share of equal values), a chunk of pairs at a time
    so the compared rows stay in cache (5x faster than one gather of all pairs)."""
    equal = np.empty(len(pairs), np.int64)
    for lo in range(0, len(pairs), chunk):
        part = pairs[lo : lo + chunk]
        equal[lo : lo + chunk] = np.count_nonzero(signatures[part[:, 0]] == signatures[part[:, 1]], axis=1)
    return equal / signatures.shape[1]


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
        idx = idx[_estimates(signatures, idx) >= threshold - slack]
    out = []
    for i, j in idx.tolist():
        sim = jaccard(shingle_sets[i], shingle_sets[j])
        if sim >= threshold:
            out.append((i, j, sim))
    return out


def verify_exact(
    pairs: np.ndarray,
    texts: Sequence[str],
    ngram: int,
    threshold: float,
    signatures: np.ndarray | None = None,
    slack: float = 0.15,
    chunk: int = 65536,
) -> list[tuple[int, int, float]]:
    """`verify` without shingle strings: the same pairs, the same similarities (exact Jaccard of the
    n-gram sets, |A & B| / |A | B| in floating point), all pairs of a chunk in one sparse product."""
    idx = _unique_pairs(np.asarray(pairs, dtype=np.int64))
    if signatures is not None and len(idx):
        idx = idx[_estimates(signatures, idx) >= threshold - slack]
    if not len(idx):
        return []
    rows = _sorted_unique(idx)  # only the rows in plausible pairs are shingled again
    sets = gram_sets(split_words([texts[i] for i in rows.tolist()]), ngram)
    local = np.searchsorted(rows, idx)
    sizes = np.diff(sets.indptr)
    out: list[tuple[int, int, float]] = []
    for lo in range(0, len(idx), chunk):
        a, b = local[lo : lo + chunk, 0], local[lo : lo + chunk, 1]
        shared = np.asarray(sets[a].multiply(sets[b]).sum(axis=1)).ravel()
        sim = shared / (sizes[a] + sizes[b] - shared)
        hit = np.flatnonzero(sim >= threshold)
        found = idx[lo + hit]
        out += zip(found[:, 0].tolist(), found[:, 1].tolist(), sim[hit].tolist(), strict=True)
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
    texts: Sequence[str],
    ngram: int,
    num_perm: int,
    bands: int,
    threshold: float,
    seed: int = 1,
    minhash: Literal["rensa", "numpy"] = "rensa",
) -> dict[int, tuple[int, float]]:
    """{index: (representative index, best verified similarity)} for every row that is a near copy of an
    earlier one. `minhash="numpy"` is the previous path (numpy signatures of shingle strings, verified
    on string sets), kept as the reference the default is tested against."""
    if minhash == "numpy":
        sigs = MinHasher(num_perm, seed).signatures(texts, shingle=lambda t: shingles(t, ngram))
        return leaders(verify(candidate_pairs(sigs, bands), _ShingleCache(texts, ngram), threshold, sigs))
    sigs = signatures(texts, ngram, num_perm, seed)
    return leaders(verify_exact(candidate_pairs(sigs, bands), texts, ngram, threshold, sigs))


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
