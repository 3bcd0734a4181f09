"""Offline sentence splitting for RULER's essay haystack, standing in for ``nltk.sent_tokenize`` (punkt).

RULER only uses the sentences to pick needle insertion points, then re-joins them with single spaces. Splitting
only at whitespace that follows sentence-final punctuation keeps that join lossless on the whitespace-normalised
haystack, so the generated text is unchanged except for which boundaries a needle can land on.
"""

from __future__ import annotations

import re

# Punkt learns these from its English model; a boundary after them is almost always a false split.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al inc ltd co corp no fig approx dept est jan feb mar apr jun jul "
    "aug sep sept oct nov dec u.s u.k a.m p.m ph.d".split()
)
# Terminal punctuation, optional closing quotes/brackets, whitespace, then something that can start a sentence.
_CANDIDATE = re.compile(r"[.!?][\"'”’)\]]*(\s+)(?=[\"'“‘(\[]*[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)$")


def _is_abbreviation(text_before: str) -> bool:
    match = _LAST_WORD.search(text_before)
    if match is None:
        return False
    word = match.group(1).lstrip("\"'“‘([").rstrip(".").lower()
    # Single letters are initials ("J. Smith"), which punkt also keeps together.
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into stripped sentences; ``" ".join`` of the result restores whitespace-normalised input."""
    text = text.strip()
    if not text:
        return []
    sentences: list[str] = []
    start = 0
    for match in _CANDIDATE.finditer(text):
        gap_start, gap_end = match.span(1)
        if match.group(0)[0] == "." and _is_abbreviation(text[start:gap_start]):
            continue
        sentences.append(text[start:gap_start])
        start = gap_end
    sentences.append(text[start:])
    return sentences
