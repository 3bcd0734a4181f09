"""Rule-based scoring of LongMemEval answers (LongMemEval itself asks a judge model, which is not available here).

An answer is right when the reference, normalised (lower case, no punctuation or articles, number words as
digits, thousands separators dropped), occurs in the normalised prediction as a whole run of words, and the
prediction does not refuse. Session timestamps copied from the history are ignored. A long reference (more
than six words, as some published answers are) counts as found when 80% of its distinct words occur in the
prediction. An abstention question is right when the prediction refuses: says the history does not tell.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS = re.compile(r"(?<=\d)[,\u202f](?=\d{3}\b)")
_NON_WORD = re.compile(r"[^0-9a-z]+")
# A session timestamp ("2023/05/20 (Sat) 02:21") in a prediction is copied from the history, not an answer; its
# numbers must not match a short numeric answer.
_TIMESTAMP = re.compile(r"\d{4}/\d{2}/\d{2}(?: \(\w+\))?(?: \d{2}:\d{2})?")
_LONG_ANSWER_WORDS = 6
_LONG_ANSWER_RECALL = 0.8
# Ways of saying that the history does not hold the answer; matched on the normalised prediction.
REFUSALS: tuple[str, ...] = (
    "not enough information", "information provided is not enough", "dont know", "do not know",
    "not mentioned", "did not mention", "didnt mention", "have not mentioned", "havent mentioned",
    "never mentioned", "no mention", "not mention", "no information", "not provided", "cannot answer", "cant answer",
    "unable to answer", "cannot determine", "cant determine", "unable to determine", "no record", "not specified",
    "not sure", "not aware", "no way to know", "cannot find", "cant find", "could not find", "couldnt find",
    "does not say", "doesnt say", "not stated", "not in our", "not discussed", "never told", "did not tell",
    "didnt tell", "have not told", "havent told", "unknown",
)  # fmt: skip


def normalize(text: str) -> list[str]:
    """Lower-case words without accents, punctuation or articles; number words become digits ("1,450" -> "1450")."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = _THOUSANDS.sub("", text.replace("'", ""))
    words = _NON_WORD.sub(" ", text).split()
    return [str(_NUMBERS[w]) if w in _NUMBERS else w for w in words if w not in _ARTICLES]


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def matches(prediction: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``prediction`` after normalisation (see the module docstring)."""
    words, phrase = normalize(_TIMESTAMP.sub(" ", prediction)), normalize(answer)
    if len(phrase) > _LONG_ANSWER_WORDS:
        wanted = set(phrase)
        return len(wanted & set(words)) >= _LONG_ANSWER_RECALL * len(wanted)
    return _contains(words, phrase)


def is_refusal(prediction: str) -> bool:
    """Whether ``prediction`` says that the chat history does not give the answer."""
    text = " ".join(normalize(prediction))
    return any(re.search(rf"\b{phrase}\b", text) for phrase in REFUSALS)


def score_answer(prediction: str, answers: list[str], *, abstention: bool) -> float:
    """100.0 for a right answer, else 0.0.

    Args:
        prediction: the model's answer.
        answers: accepted reference answers (any one matching is enough); unused for abstention.
        abstention: the question has no answer in the history, so only a refusal is right.
    """
    refused = is_refusal(prediction)
    if abstention:
        return 100.0 if refused else 0.0
    return 100.0 if not refused and any(matches(prediction, a) for a in answers) else 0.0
