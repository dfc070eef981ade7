"""MinHash LSH near-duplicate detection and eval contamination on small fixtures."""

import random

from tunegate.dedup import (
    ContaminationIndex,
    MinHasher,
    candidate_pairs,
    jaccard,
    near_duplicates,
    normalise_text,
    shingles,
)


def test_normalise_ignores_case_space_punct_unicode():
    assert normalise_text("  Héllo,   WORLD!! ") == normalise_text("héllo world") == "héllo world"
    assert normalise_text("ﬁle") == "file"  # NFKC


def test_minhash_estimates_jaccard():
    a = shingles("the quick brown fox jumps over the lazy dog near the river bank today", 3)
    b = shingles("the quick brown fox jumps over the lazy cat near the river bank today", 3)
    sig = MinHasher(256, 1).signatures([a, b])
    estimate = (sig[0] == sig[1]).mean()
    assert abs(estimate - jaccard(a, b)) < 0.12


def test_near_duplicates_found_and_verified():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    docs = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(200)]
    edited = docs[5].split()
    edited[10] = "changed"
    docs.append(" ".join(edited))
    near = near_duplicates(docs, ngram=3, num_perm=128, bands=32, threshold=0.7)
    assert near == {200: (5, near[200][1])}
    assert near[200][1] >= 0.7


def test_shared_template_is_not_a_duplicate():
    docs = [
        f"please refund order {n} for the {p} thanks" for n, p in [(11111, "lamp"), (22222, "chair"), (33333, "watch")]
    ]
    assert near_duplicates(docs, 3, 128, 32, 0.7) == {}


def test_lsh_buckets_are_bounded():
    sigs = MinHasher(32, 1).signatures([{"same"}] * 500)
    pairs = candidate_pairs(sigs, 8, max_bucket=64)
    assert len(pairs) == 499  # a star, not 124,750 pairs


def test_contamination_long_and_short():
    idx = ContaminationIndex(5)
    idx.add("My headphones from order 12345 arrived broken please help", "support:1")
    idx.add("What is 17 + 25?", "general:3")
    assert idx.match("Hi! my headphones from order 12345 arrived broken, please help asap")[0] == "support:1"
    assert idx.match("what is 17 + 25 ?")[0] == "general:3"
    assert idx.match("What is 17 + 250?") is None
    assert idx.match("my laptop from order 99999 arrived late") is None
