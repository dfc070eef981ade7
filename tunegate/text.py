"""Text normalisation shared by dedup and the demo generator: the case-, whitespace-, punctuation- and
unicode-insensitive form of a text, and its words (standard library only)."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]+")


def normalise_text(text: str) -> str:
    """Case-, whitespace-, punctuation- and unicode-insensitive form used for exact matching."""
    text = text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def words(text: str) -> list[str]:
    """The words of the normalised text."""
    return normalise_text(text).split()
