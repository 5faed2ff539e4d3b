"""The shipped lexicon (``lm/data/lexicon.json``) and number/date spelling helpers.

The lexicon was written for coldswarm by its authors and is Apache-2.0 like the rest of
the project; the default corpus and the instruction tasks are generated from it, so no
third-party text is shipped or downloaded.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
LEXICON_PATH = DATA_DIR / "lexicon.json"
#: What the generated corpus and tasks take from here: the word lists and this module's helpers
#: (their cache keys hash both).
LEXICON_SOURCES = (LEXICON_PATH, Path(__file__))


@lru_cache(maxsize=1)
def load_lexicon() -> dict:
    """The lexicon as a dict (names, nouns->plurals, adjectives->antonyms, verbs->past, ...)."""
    with open(LEXICON_PATH, encoding="utf-8") as f:
        return json.load(f)


def upper_case_words() -> list[str]:
    """The words the ``uppercase`` task writes in capitals: nouns, colours and greetings (so that
    "hello world" is among them). The corpus spells the same words in capitals, so that each has
    its pieces in the tokenizer."""
    lex = load_lexicon()
    return list(lex["nouns"]) + list(lex["colors"]) + list(lex["greetings"])


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 10000, e.g. 342 -> 'three hundred forty-two'."""
    lex = load_lexicon()
    units, tens = lex["units"], lex["tens"]
    if not 0 <= n < 10000:
        raise ValueError(f"number_to_words supports 0..9999, got {n}")
    if n == 0:
        return "zero"
    words: list[str] = []
    if n >= 1000:
        words += [units[n // 1000 - 1], "thousand"]
        n %= 1000
    if n >= 100:
        words += [units[n // 100 - 1], "hundred"]
        n %= 100
    if n >= 20:
        t = tens[n // 10 - 2]
        words.append(t if n % 10 == 0 else f"{t}-{units[n % 10 - 1]}")
    elif n > 0:
        words.append(units[n - 1])
    return " ".join(words)


DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
