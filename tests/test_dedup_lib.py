"""MinHash LSH near-duplicate detection and eval contamination on small fixtures."""

import dataclasses
import itertools
import random

import numpy as np
import pytest

from benchmarks.dedup import make_corpus
from tunegate.dedup import (
    ContaminationIndex,
    MinHasher,
    bucket_pairs,
    candidate_pairs,
    jaccard,
    near_duplicates,
    normalise_text,
    shingles,
    signatures,
    split_words,
    verify,
    verify_exact,
    word_ids,
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


# Texts where the byte path could part from the string path: punctuation runs, control and unicode
# whitespace, NFKC forms, texts shorter than n words, an empty text, repeated n-grams, a shared prefix.
TRICKY = [
    "the quick brown fox jumps over the lazy dog",
    "The QUICK, brown fox -- jumps over the lazy dog!!",
    "the quick brown\x1cfox jumps\vover the lazy dog",
    "Ｔｈｅ quick brown ﬁx jumps over the lazy dog",
    "straße STRASSE strasse café",
    "a a a a a a a a",
    "a a a b",
    "two words",
    "one",
    "",
    "?!",
    "the quick brown fox",
    "the quick brown fox jumps over the lazy dog again and again and again",
    "see abcdefghMiddleAijklmnop now",  # long words equal in length and first and last 8 bytes:
    "see abcdefghMiddleBijklmnop now",  # their hashes collide, and only the byte check tells them apart
]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exact_verification_equals_string_set_jaccard(n):
    """verify_exact gives, for every pair, the very similarity `jaccard` gives on the shingle strings."""
    rng = random.Random(n)
    vocab = ["alpha", "beta", "Gamma", "delta!", "ÉPSILON", "zeta", "eta"]
    texts = TRICKY + [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(150)]
    pairs = np.array(list(itertools.combinations(range(len(texts)), 2)))
    got = verify_exact(pairs, texts, n, threshold=0.0)
    expected = verify(pairs, [shingles(t, n) for t in texts], threshold=0.0)
    assert got == expected and len(got) == len(pairs)


def test_a_word_hash_collision_does_not_merge_words():
    """Words are numbered by hash only after a byte-by-byte check; a forged collision falls back to bytes."""
    words = split_words(["apple pear apple plum"])
    ids = word_ids(words).tolist()
    assert ids[0] == ids[2] and len(set(ids)) == 3
    forged = dataclasses.replace(words, hash=np.array([7, 9, 7, 9], np.uint64))  # pear and plum: same length
    ids = word_ids(forged).tolist()
    assert ids[0] == ids[2] and len(set(ids)) == 3
    long = split_words(["abcdefghMiddleAijklmnop abcdefghMiddleBijklmnop abcdefghMiddleAijklmnop"])
    assert len(set(long.hash.tolist())) == 1  # a real collision of the word hash
    ids = word_ids(long).tolist()
    assert ids[0] == ids[2] != ids[1]


def test_signatures_do_not_depend_on_the_chunking():
    """A row's signature depends on its text alone (Ray signs blocks on different workers)."""
    texts = TRICKY * 3
    assert np.array_equal(signatures(texts, 3, 64, seed=5), signatures(texts, 3, 64, seed=5, chunk=4))
    assert not np.array_equal(signatures(texts, 3, 64, seed=5), signatures(texts, 3, 64, seed=6))


def test_rensa_signatures_estimate_jaccard():
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    b = "the quick brown fox jumps over the lazy cat near the river bank today"
    sig = signatures([a, b], 3, 256)
    assert abs((sig[0] == sig[1]).mean() - jaccard(shingles(a, 3), shingles(b, 3))) < 0.12


def test_bucket_pairs_all_pairs_or_a_star():
    order = np.array([4, 9, 1, 2, 3, 5, 6, 7, 8, 0])
    starts, sizes = np.array([0, 2, 3, 5]), np.array([2, 1, 2, 5])
    got = {tuple(p) for p in bucket_pairs(order, starts, sizes, max_bucket=4).tolist()}
    assert got == {(4, 9), (2, 3), (5, 6), (5, 7), (5, 8), (5, 0)}  # the 5-row bucket is a star on its first
    got = {tuple(p) for p in bucket_pairs(order, starts, sizes, max_bucket=5).tolist()}
    assert got == {(4, 9), (2, 3)} | set(itertools.combinations([5, 6, 7, 8, 0], 2))


@pytest.mark.parametrize(("ngram", "bands", "threshold"), [(2, 64, 0.4), (3, 32, 0.7)])
def test_rensa_path_equals_the_numpy_reference_on_the_labelled_corpus(ngram, bands, threshold):
    """Row for row: the same duplicates, representatives and similarities as the previous numpy path."""
    docs = make_corpus(2500, seed=11).docs
    got = near_duplicates(docs, ngram, 128, bands, threshold)
    assert got == near_duplicates(docs, ngram, 128, bands, threshold, minhash="numpy") and len(got) > 150
