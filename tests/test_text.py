"""Text normalisation shared by dedup and the demo: case, whitespace, punctuation and unicode forms."""

import random

from tunegate.text import normalise_text, normalised_bytes, words


def test_case_whitespace_and_punctuation_do_not_matter():
    assert normalise_text("  Cancel ORDER #12345,\tplease!\n") == "cancel order 12345 please"


def test_unicode_forms_match_their_plain_spelling_and_ascii_is_lowered_alike():
    # NFKC + casefold: full-width letters, ligatures and the sharp s match their plain spellings
    assert normalise_text("Ｃａｆé ﬁle STRASSE") == normalise_text("café file straße") == "café file strasse"
    assert normalise_text("CAFE FILE") == normalise_text("ｃａｆｅ ﬁle") == "cafe file"


def test_words_are_those_of_the_normalised_text():
    assert words("Where's my ORDER?") == ["where", "s", "my", "order"]


def test_normalised_bytes_split_into_the_same_words_for_every_ascii_character():
    """The translate table for ASCII text must agree with the regex path on every character (\\x1c-\\x1f
    are whitespace to str.split, not to bytes.split); other text goes through normalise_text."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["é", "ß", "ﬁ", "Ｃ", "\u00a0", "\u2003", "Σ"]
    texts = ["".join(chr(c) for c in range(128))]
    texts += ["".join(rng.choices(alphabet[:128], k=rng.randint(0, 40))) for _ in range(2000)]
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(2000)]
    for text in texts:
        folded = normalised_bytes(text)
        assert [w.decode() for w in folded.split(b" ") if w] == words(text), repr(text)
        assert not set(folded) & set(b"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"), repr(text)  # words end at spaces only
