"""Text normalisation shared by dedup and the demo: case, whitespace, punctuation and unicode forms."""

from tunegate.text import normalise_text, words


def test_case_whitespace_and_punctuation_do_not_matter():
    assert normalise_text("  Cancel ORDER #12345,\tplease!\n") == "cancel order 12345 please"


def test_unicode_forms_match_their_plain_spelling_and_ascii_is_lowered_alike():
    # NFKC + casefold: full-width letters, ligatures and the sharp s match their plain spellings
    assert normalise_text("Ｃａｆé ﬁle STRASSE") == normalise_text("café file straße") == "café file strasse"
    assert normalise_text("CAFE FILE") == normalise_text("ｃａｆｅ ﬁle") == "cafe file"


def test_words_are_those_of_the_normalised_text():
    assert words("Where's my ORDER?") == ["where", "s", "my", "order"]
