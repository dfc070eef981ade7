"""MinHash LSH near-duplicate detection and eval contamination on small fixtures."""

import dataclasses
import itertools
import random

import numpy as np
import pandas  # noqa: F401  (dedup imports pandas and scipy when first used: imported with the tests, they are
import pytest
import scipy.sparse  # noqa: F401  loaded once for all the workers of a mutation run, which fork after collection)

from benchmarks.dedup import make_corpus
from tunegate.dedup import (
    ContaminationIndex,
    MinHasher,
    _codes,
    _estimates,
    _grams,
    _ShingleCache,
    _sorted_unique,
    _unique_pairs,
    _within,
    band_key,
    band_keys,
    bucket_pairs,
    candidate_pairs,
    exact_key,
    gram_hashes,
    gram_sets,
    jaccard,
    leaders,
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
    assert ids == [1, 2, 1, 3] and word_ids(words).dtype == np.int64  # numbered 1.. in order of appearance
    forged = dataclasses.replace(words, hash=np.array([7, 9, 7, 9], np.uint64))  # pear and plum: same length
    ids = word_ids(forged).tolist()
    assert ids == [1, 2, 1, 3] and word_ids(forged).dtype == np.int64
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
    pairs = [tuple(p) for p in bucket_pairs(order, starts, sizes, max_bucket=5).tolist()]
    assert set(pairs) == {(4, 9), (2, 3)} | set(itertools.combinations([5, 6, 7, 8, 0], 2))
    assert len(pairs) == len(set(pairs)) == 12  # a bucket of exactly max_bucket rows: all its pairs, once


@pytest.mark.parametrize(("ngram", "bands", "threshold"), [(2, 64, 0.4), (3, 32, 0.7)])
def test_rensa_path_equals_the_numpy_reference_on_the_labelled_corpus(ngram, bands, threshold):
    """Row for row: the same duplicates, representatives and similarities as the previous numpy path."""
    docs = make_corpus(2500, seed=11).docs
    got = near_duplicates(docs, ngram, 128, bands, threshold)
    assert got == near_duplicates(docs, ngram, 128, bands, threshold, minhash="numpy") and len(got) > 150


# Exact results on small constructed inputs: each stage of the near-duplicate path against a plain
# Python statement of what it computes (these also make the module's mutation run quick and sharp).

MASK64 = (1 << 64) - 1


def fmix64(h: int) -> int:
    """MurmurHash3's 64-bit finaliser, one Python int at a time."""
    h ^= h >> 33
    h = h * 0xFF51AFD7ED558CCD & MASK64
    h ^= h >> 33
    h = h * 0xC4CEB9FE1A85EC53 & MASK64
    return h ^ (h >> 33)


def word_hash(word: bytes) -> int:
    """What `split_words` documents: the length mixed with the first and the last 8 bytes (little-endian)."""
    head = int.from_bytes(word[:8], "little")
    tail = int.from_bytes(word[-8:], "little") if len(word) >= 8 else 0
    return fmix64(fmix64(head ^ len(word)) ^ tail)


def gram_hash(hashes: list[int], n: int) -> int:
    """One n-gram's hash from its words' hashes (a gram of fewer than n words is padded with zeros)."""
    acc = len(hashes)
    for k in range(n):
        acc = fmix64(acc ^ ((hashes[k] if k < len(hashes) else 0) + k + 1) & MASK64)
    return acc


def text_words(text: str) -> list[bytes]:
    return [w.encode() for w in normalise_text(text).split()]


def text_gram_hashes(text: str, n: int) -> list[int]:
    h = [word_hash(w) for w in text_words(text)]
    return [gram_hash(h[i : i + n], n) for i in range(max(len(h) - n + 1, 1))]


WORDY = [
    "a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh iiiiiiiii",  # every length from 1 to 9
    "exactly8 sixteen_chars_16 seventeen_chars17 " + "x" * 40,  # 8, 16, 17 and 40 bytes
    "",
    "   ",
    "Café, ÉTÉ -- ﬁne!",
    "one",
    "the quick brown fox jumps over the lazy dog the quick brown fox",
]


def test_split_words_finds_every_word_and_hashes_it_as_documented():
    w = split_words(WORDY)
    assert w.offsets.tolist() == list(itertools.accumulate((len(text_words(t)) for t in WORDY), initial=0))
    found = [w.buf[a : a + n].tobytes() for a, n in zip(w.start.tolist(), w.length.tolist(), strict=True)]
    assert found == [x for t in WORDY for x in text_words(t)]
    assert w.hash.tolist() == [word_hash(x) for x in found]
    assert w.hash.dtype == np.uint64 and w.start.dtype == w.length.dtype == w.offsets.dtype == np.int64


def test_split_words_of_nothing_and_of_one_word():
    assert split_words([]).offsets.tolist() == [0] and len(split_words([]).hash) == 0
    one = split_words(["?!", "Word"])
    assert one.offsets.tolist() == [0, 0, 1] and one.length.tolist() == [4]
    assert one.buf[one.start[0] :][:4].tobytes() == b"word"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gram_hashes_are_the_documented_mix_of_the_word_hashes(n):
    hashes, offsets = gram_hashes(split_words(WORDY), n)
    per_text = [text_gram_hashes(t, n) for t in WORDY]
    assert offsets.tolist() == list(itertools.accumulate(map(len, per_text), initial=0))
    assert hashes.tolist() == [h for t in per_text for h in t]


def test_gram_offsets_count_one_gram_for_a_short_text():
    first, size, offsets = _grams(np.array([0, 2, 2, 7, 10]), 3)  # texts of 2, 0, 5 and 3 words
    assert offsets.tolist() == [0, 1, 2, 5, 6]
    assert first.tolist() == [0, 2, 2, 3, 4, 7]
    assert size.tolist() == [2, 0, 3, 3, 3, 3]


def test_within_and_codes_and_unique_pairs():
    assert _within(np.array([3, 0, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]
    assert _within(np.array([], np.int64)).tolist() == []
    codes, first = _codes(np.array([7, 3, 7, 9, 3, 3]))
    assert codes.tolist() == [0, 1, 0, 2, 1, 1] and first.tolist() == [0, 1, 3] and codes.dtype == np.int64
    assert _sorted_unique(np.array([5, 1, 5, 0, 1])).tolist() == [0, 1, 5]
    pairs = np.array([[3, 9], [0, 1], [3, 9], [0, 10], [2, 2]])
    assert _unique_pairs(pairs).tolist() == [[0, 1], [0, 10], [2, 2], [3, 9]]
    assert _unique_pairs(np.empty((0, 2), np.int64)).shape == (0, 2)
    assert _unique_pairs(np.array([0, 0])).tolist() == [[0, 0]]


def test_rensa_signatures_are_minhashes_of_the_documented_gram_hashes():
    import rensa

    texts = WORDY + ["Word " * 30, "the quick brown fox"]
    per_text = [text_gram_hashes(t, 2) for t in texts]
    flat = np.array([h for t in per_text for h in t], np.uint64)
    offsets = np.array(list(itertools.accumulate(map(len, per_text), initial=0)), np.uint64)
    rows = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, 32, 3).to_rows()
    got = signatures(texts, 2, num_perm=32, seed=3, chunk=4)
    assert signatures(texts, 2).shape == (len(texts), 128)  # 128 permutations unless asked
    assert got.dtype == np.uint32 and got.shape == (len(texts), 32)
    assert got.tolist() == rows
    assert signatures([], 2, num_perm=32).shape == (0, 32)


def test_minhasher_params_are_odd_multipliers_over_64_bits_and_follow_the_seed():
    a, b = MinHasher(256, 4).params()
    assert a.dtype == b.dtype == np.uint64 and len(a) == len(b) == 256
    assert (a % np.uint64(2) == 1).all() and int(a.max()) >= 1 << 63 and int(a.min()) < 1 << 62
    assert int(b.max()) < 1 << 63 and int(b.max()) >= 1 << 62 and len(set(a.tolist())) == len(set(b.tolist())) == 256
    a2, b2 = MinHasher(256, 4).params()
    a3, _ = MinHasher(256, 5).params()
    assert a.tolist() == a2.tolist() and b.tolist() == b2.tolist() and a.tolist() != a3.tolist()
    assert a.tolist() != b.tolist()


def test_minhasher_signatures_are_min_of_the_permuted_crc32_hashes():
    import zlib

    sets = [{"a", "b c"}, {"only"}, {"x", "y", "z", "a"}]
    hasher = MinHasher(16, 2)
    a, b = (x.tolist() for x in hasher.params())
    expected = [
        [min(((zlib.crc32(s.encode()) * a[k] + b[k]) & MASK64) >> 32 for s in sh) for k in range(16)] for sh in sets
    ]
    assert hasher.signatures(sets).tolist() == expected and hasher.signatures(sets).dtype == np.uint32
    assert hasher.signatures(sets, chunk=2).tolist() == expected
    texts = ["a b c d", "only", "x y z"]
    by_text = hasher.signatures(texts, chunk=2, shingle=lambda t: shingles(t, 2))
    assert by_text.tolist() == hasher.signatures([shingles(t, 2) for t in texts]).tolist()
    assert hasher.signatures([]).shape == (0, 16)


def test_shingles_and_exact_key():
    assert shingles("A b, C d", 2) == {"a b", "b c", "c d"}
    assert shingles("a b a b", 1) == {"a", "b"}
    assert shingles("a b", 2) == {"a b"} and shingles("a b", 3) == {"a b"} and shingles("", 2) == {""}
    assert shingles("a b c", 2) == {"a b", "b c"}
    assert exact_key("  Hello,  WORLD! ") == "hello world"


def test_band_keys_group_rows_that_agree_on_a_whole_band():
    sigs = np.array(
        [
            [1, 2, 3, 4, 5, 6],
            [1, 2, 3, 0, 0, 0],  # band 0 as row 0
            [9, 2, 3, 4, 5, 6],  # bands 1 and 2 as row 0 (one value off in band 0)
            [2, 1, 4, 3, 6, 5],  # the same values, swapped within each band
        ],
        np.uint32,
    )
    keys = band_keys(sigs, 3)
    assert keys.shape == (4, 3) and keys.dtype == np.uint64
    assert keys[:, 0].tolist() == band_key(sigs, 0, 3).tolist() and keys[:, 2].tolist() == band_key(sigs, 2, 3).tolist()
    assert keys[0, 0] == keys[1, 0] != keys[2, 0] and keys[0, 1] == keys[2, 1] != keys[1, 1]
    assert keys[0, 2] == keys[2, 2] and len(set(keys[3].tolist()) & set(keys[:3].ravel().tolist())) == 0
    assert len({tuple(r) for r in band_keys(sigs, 2).tolist()}) == 4
    assert candidate_pairs(sigs, 3).tolist() == [[0, 1], [0, 2]]
    assert candidate_pairs(sigs, 1).tolist() == []
    assert candidate_pairs(sigs[:, :0], 0).shape == (0, 2) and candidate_pairs(sigs[:, :0], 0).dtype == np.int64
    assert candidate_pairs(np.vstack([sigs, sigs[3]]), 3).tolist() == [[0, 1], [0, 2], [3, 4]]


def test_candidate_pairs_are_all_pairs_below_max_bucket_and_a_star_above():
    sigs = np.array([[5, 5], [1, 1], [5, 5], [5, 5], [1, 1], [7, 8]], np.uint32)
    assert candidate_pairs(sigs, 1, max_bucket=3).tolist() == [[0, 2], [0, 3], [1, 4], [2, 3]]
    assert candidate_pairs(sigs, 1, max_bucket=2).tolist() == [[0, 2], [0, 3], [1, 4]]  # a star on row 0
    assert candidate_pairs(sigs, 2, max_bucket=1).tolist() == [[0, 2], [0, 3], [1, 4]]
    same = np.zeros((65, 4), np.uint32)
    assert len(candidate_pairs(same, 2)) == 64 and len(candidate_pairs(same[:64], 2)) == 64 * 63 // 2  # max_bucket 64


def test_candidate_pairs_keep_row_order_within_large_buckets():
    """Rows of a bucket stay ascending (a stable sort), so every pair is (earlier, later) and a star's hub
    is the bucket's first row, whatever order the buckets' keys sort in."""
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 3, size=(300, 1)).astype(np.uint32)
    pairs = candidate_pairs(sigs, 1, max_bucket=1000)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(pairs) == sum(n * (n - 1) // 2 for n in np.bincount(sigs[:, 0]))
    star = candidate_pairs(sigs, 1, max_bucket=10)
    firsts = {int(np.flatnonzero(sigs[:, 0] == v)[0]) for v in range(3)}
    assert set(star[:, 0].tolist()) == firsts and len(star) == 297


def test_estimates_are_the_share_of_equal_values():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 0, 0], [1, 9, 3, 4], [0, 0, 0, 0]], np.uint32)
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 3], [1, 2]])
    assert _estimates(sigs, pairs).tolist() == [0.5, 0.75, 0.0, 0.5, 0.25]
    assert _estimates(sigs, pairs, chunk=2).tolist() == [0.5, 0.75, 0.0, 0.5, 0.25]


def test_jaccard_of_sets():
    assert jaccard({"a", "b"}, {"b", "c"}) == 1 / 3
    assert jaccard(set(), set()) == 1.0 and jaccard({"a"}, set()) == 0.0 and jaccard(set(), {"a"}) == 0.0


# Rows 0-1 share 3 of 4 bigrams (0.6), 0-2 are equal, 3 shares nothing.
SIMILAR = ["a b c d e", "a b c d x", "A, b c d e", "p q r s t"]


@pytest.mark.parametrize("exact", [True, False])
def test_verification_keeps_pairs_at_or_above_the_threshold(exact):
    def run(pairs, threshold, signatures=None, slack=0.15):
        if exact:
            return verify_exact(np.array(pairs), SIMILAR, 2, threshold, signatures, slack, chunk=1)
        return verify(pairs, [shingles(t, 2) for t in SIMILAR], threshold, signatures, slack)

    pairs = [(1, 2), (0, 1), (0, 2), (0, 3), (0, 1)]
    assert run(pairs, 0.6) == [(0, 1, 0.6), (0, 2, 1.0), (1, 2, 0.6)]
    assert run(pairs, 0.61) == [(0, 2, 1.0)]
    assert run(pairs, 0.0) == [(0, 1, 0.6), (0, 2, 1.0), (0, 3, 0.0), (1, 2, 0.6)]
    assert run([], 0.5) == []
    sigs = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.uint32)  # estimates 0.75 / 1 / 0
    assert run(pairs, 0.6, sigs, slack=0.0) == [(0, 1, 0.6), (0, 2, 1.0), (1, 2, 0.6)]  # the estimate at 0.75
    assert run(pairs, 0.9, sigs, slack=0.15) == [(0, 2, 1.0)]
    assert run(pairs, 0.6, sigs, slack=-0.2) == [(0, 2, 1.0)]  # 0.75 < 0.8: rejected on the estimate alone
    assert run(pairs, 0.6, sigs, slack=-0.15) == [(0, 1, 0.6), (0, 2, 1.0), (1, 2, 0.6)]  # 0.75 >= 0.75
    far = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], np.uint32)  # 0-2 estimated at 0
    if exact:  # the default slack (0.15) rejects an estimate of 0 at 0.6
        assert verify_exact(np.array(pairs), SIMILAR, 2, 0.6, far) == [(0, 1, 0.6)]
    else:
        assert verify(pairs, [shingles(t, 2) for t in SIMILAR], 0.6, far) == [(0, 1, 0.6)]
        assert verify(iter(pairs), [shingles(t, 2) for t in SIMILAR], 0.6) == run(pairs, 0.6)  # any iterable of pairs


def test_verify_exact_chunks_and_unique_pairs_do_not_change_the_result():
    rng = random.Random(3)
    texts = [" ".join(rng.choices("abcdef", k=rng.randint(1, 9))) for _ in range(30)]
    pairs = np.array([(i, j) for i, j in itertools.combinations(range(30), 2)] * 2)
    whole = verify_exact(pairs, texts, 2, 0.3)
    assert whole == verify_exact(pairs[::-1], texts, 2, 0.3, chunk=7)
    assert whole == verify(pairs, [shingles(t, 2) for t in texts], 0.3)
    assert len(whole) >= 10 and all(i < j for i, j, _ in whole)


def test_leaders_point_at_the_most_similar_earlier_kept_row():
    # 1 ~ 0; 2 ~ 1 only (1 is a duplicate, so 2 is kept); 3 ~ 0 and 2: 2 is more similar; 4 ties 0 and 2: the first
    edges = [(0, 1, 0.9), (2, 1, 0.8), (3, 0, 0.7), (2, 3, 0.75), (4, 2, 0.8), (0, 4, 0.8), (5, 1, 0.99)]
    assert leaders(edges) == {1: (0, 0.9), 3: (2, 0.75), 4: (0, 0.8)}
    assert leaders(reversed(edges)) == leaders(edges)  # the edges' order does not matter
    assert leaders([(7, 3, 0.123456)]) == {7: (3, 0.1235)} and leaders([]) == {}
    chain = [(0, 1, 0.9), (1, 2, 0.9)]  # A~B~C: C is not dropped for a resemblance to A never verified
    assert leaders(chain) == {1: (0, 0.9)}


@pytest.mark.parametrize("minhash", ["rensa", "numpy"])
def test_near_duplicates_on_a_handful_of_rows(minhash):
    base = "the quick brown fox jumps over the lazy dog by the river bank on a sunny day in june"
    texts = [
        base,
        "completely different words about refund policies and order numbers for customers today",
        base.replace("june", "july"),  # 17 bigrams shared of 19: a near copy of 0
        base.upper() + "!!",  # the same text, folded
        "short text",
        "short text",
    ]
    got = near_duplicates(texts, 2, 128, 32, 0.8, minhash=minhash)
    assert got == {2: (0, 0.8947), 3: (0, 1.0), 5: (4, 1.0)}
    assert near_duplicates(texts, 2, 128, 32, 0.8, seed=9, minhash=minhash) == got
    assert near_duplicates(texts, 2, 128, 32, 0.95, minhash=minhash) == {3: (0, 1.0), 5: (4, 1.0)}


def test_shingle_cache_makes_each_set_once():
    cache = _ShingleCache(["a b c", "c d"], 2)
    first = cache[0]
    assert first == {"a b", "b c"} and cache[0] is first and cache[1] == {"c d"}
    assert set(cache.sets) == {0, 1}


def test_contamination_index_holds_every_n_gram_of_an_eval_text():
    idx = ContaminationIndex(3)
    idx.add("a b c d e", "long")
    idx.add("p q r", "exact", whole=False)  # exactly n words: indexed even as an answer
    idx.add("x y", "answer", whole=False)  # shorter than n words: an answer is not indexed
    idx.add("?!", "empty")
    assert idx.long == {
        ("a", "b", "c"): "long",
        ("b", "c", "d"): "long",
        ("c", "d", "e"): "long",
        ("p", "q", "r"): "exact",
    }
    assert idx.short == {}
    assert idx.match("well, C D E!") == ("long", "c d e")  # the last n-gram of the eval text
    assert idx.match("z p q r") == ("exact", "p q r")
    assert idx.match("x y") is None and idx.match("") is None and idx.match("a b") is None


def test_contamination_short_items_match_whole_and_longest_first():
    idx = ContaminationIndex(6)
    idx.add("What is 17?", "short")
    idx.add("what is 17 + 25", "longer")
    idx.add("x y", "xy")
    idx.add("p q", "pq")
    idx.add("first one", "first")
    idx.add("first one", "second")  # the first item indexed keeps the words
    assert idx.match("so what is 17 + 25 then") == ("longer", "what is 17 25")  # "+" is not a word
    assert idx.match("so what is 17 then") == ("short", "what is 17")
    assert idx.match("x y m p q") == ("xy", "x y")  # the first match of a size, in text order
    assert idx.match("m p q x") == ("pq", "p q")
    assert idx.match("FIRST one") == ("first", "first one")
    assert idx.match("what is") is None


def test_a_hash_collision_of_17_byte_words_is_caught():
    """17 bytes: the first and last 8 leave the middle byte out of the hash, so only the byte check sees it."""
    w = split_words(["q q q q q q q q q q q q abcdefghXijklmnop q q q q q q q q q q q q abcdefghYijklmnop"])
    assert w.hash[12] == w.hash[25] and w.length[12] == 17
    ids = word_ids(w).tolist()
    assert ids[12] != ids[25] and ids[:13] == [1] * 12 + [2]


def test_word_ids_and_gram_sets_of_empty_texts():
    assert word_ids(split_words(["", "?!"])).tolist() == []
    assert verify_exact(np.array([[0, 1]]), ["", "?!"], 2, 0.5) == [(0, 1, 1.0)] == verify([(0, 1)], [{""}, {""}], 0.5)


@pytest.mark.parametrize("n", [3, 4, 5, 9])
def test_exact_verification_with_a_large_vocabulary(n):
    """2,000 distinct words: n-gram keys too wide for a column index (renumbered; past 2**53 for n=5, where a
    float would merge them) and, for n=9, too wide for an int64 (numbered by np.unique): the same
    similarities as the string sets."""
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range(2000)]
    texts = [" ".join(vocab[k : k + 50]) for k in range(0, 2000, 50)]
    texts += [" ".join(rng.choices(vocab[:300], k=60)) for _ in range(10)]
    texts += [t.replace(t.split()[20], "changed") for t in texts[:5]]
    texts += [f"w1999 w1998 w1997 w1996 w{k}" for k in range(1990, 1995)]  # 5-gram keys 1 apart, past 2**53
    pairs = np.array(list(itertools.combinations(range(len(texts)), 2)))
    got = verify_exact(pairs, texts, n, threshold=0.0)
    assert got == verify(pairs, [shingles(t, n) for t in texts], threshold=0.0)
    assert sum(sim > 0.5 for _, _, sim in got) == 5
    sets = gram_sets(split_words(texts[:3]), n)
    assert (
        sets.shape[0] == 3 and sets.dtype == np.int32 and np.asarray(sets.sum(axis=1)).ravel().tolist() == [51 - n] * 3
    )


def test_near_duplicates_default_path_and_its_parameters(monkeypatch):
    """The rensa path by default (the numpy one only when asked), with the caller's permutations and seed,
    and the signatures handed to verification (which rejects implausible pairs on them first)."""
    from tunegate import dedup

    calls = []

    def spy(name, real):
        def wrapped(*args, **kwargs):
            calls.append((name, args[3:] if name.startswith("verify") else args[1:], kwargs))
            return real(*args, **kwargs)

        return wrapped

    class Hasher(dedup.MinHasher):
        def signatures(self, *args, **kwargs):
            calls.append(("MinHasher", (self.num_perm, self.seed), {}))
            return super().signatures(*args, **kwargs)

    monkeypatch.setattr(dedup, "signatures", spy("signatures", dedup.signatures))
    monkeypatch.setattr(dedup, "verify_exact", spy("verify_exact", dedup.verify_exact))
    monkeypatch.setattr(dedup, "verify", spy("verify", dedup.verify))
    monkeypatch.setattr(dedup, "MinHasher", Hasher)
    texts = ["a b c d e f", "a b c d e g", "x y z"]
    assert near_duplicates(texts, 2, 16, 8, 0.5, seed=5) == {1: (0, 0.6667)}
    assert [c[0] for c in calls] == ["signatures", "verify_exact"] and calls[0][1] == (2, 16, 5)
    assert calls[1][1][0] == 0.5 and calls[1][1][1].shape == (3, 16)
    calls.clear()
    assert near_duplicates(texts, 2, 16, 8, 0.5, seed=5, minhash="numpy") == {1: (0, 0.6667)}
    assert [c[0] for c in calls] == ["MinHasher", "verify"] and calls[0][1] == (16, 5)
    assert calls[1][1][0].shape == (3, 16)
