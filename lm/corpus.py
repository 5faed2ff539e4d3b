"""The default pretraining corpus: English-like text generated from the shipped lexicon.

Source and licence: every document is produced by the small grammar below from
``lm/data/lexicon.json``; both were written for coldswarm and are Apache-2.0. Nothing
third-party is shipped or downloaded, so any machine can rebuild the identical corpus.

Document ``i`` is generated from its own seeded RNG (``"<seed>/<i>"``), so the corpus is
deterministic, and a slice (``corpus:<i>-of-<n>``) can be produced without the rest.
The genres (stories, word facts, arithmetic, calendar, counting, character drills)
mention the same facts the instruction tasks ask about, which is what makes a
pretrained version a better starting point for them.

Build it with :func:`build_default_corpus` (cached by content hash) or stream it with
:func:`iter_documents`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache import cached_dir, content_hash
from .lexicon import DAYS_IN_MONTH, LEXICON_SOURCES, load_lexicon, number_to_words, upper_case_words

CORPUS_FILE = "corpus.txt"


@dataclass(frozen=True)
class CorpusConfig:
    """How much default text to generate."""

    num_docs: int = field(default=6000, metadata={"help": "documents in the corpus (~100 words each)"})
    seed: int = field(default=0, metadata={"help": "corpus seed; document i uses RNG '<seed>/<i>'"})
    heldout_docs: int = field(
        default=200,
        metadata={"help": "extra documents (indices >= num_docs) kept out of training, for evaluation"},
    )


def _story(r: random.Random, lex: dict) -> str:
    names, nouns, adjs = lex["names"], list(lex["nouns"]), list(lex["adjectives"])
    verbs = lex["verbs"]
    out = []
    hero = r.choice(names)
    for _ in range(r.randint(3, 7)):
        kind = r.random()
        noun, adj = r.choice(nouns), r.choice(adjs + lex["colors"])
        verb = r.choice(list(verbs))
        if kind < 0.3:
            out.append(
                f"{hero} {verbs[verb]} the {adj} {noun} {r.choice(lex['prepositions'])} {r.choice(lex['places'])}."
            )
        elif kind < 0.5:
            other = r.choice(names)
            out.append(
                f"On {r.choice(lex['days'])}, {other} and {hero} {r.choice(lex['adverbs'])} {verbs[verb]} a {noun}."
            )
        elif kind < 0.65:
            n = r.randint(2, 12)
            out.append(f"There were {number_to_words(n)} {lex['nouns'][noun]} in {r.choice(lex['places'])}.")
        elif kind < 0.8:
            out.append(f"{hero} felt {r.choice(lex['feelings'])} because the {noun} was {adj}.")
        elif kind < 0.85:
            out.append(f'"Can you {verb} the {noun}?" asked {r.choice(names)}. "Yes," said {hero}.')
        elif kind < 0.9:
            out.append(
                f"{hero} said {r.choice(lex['greetings'])} to {r.choice(names)} in {r.choice(lex['places'])}."
            )
        else:
            out.append(
                f"In {r.choice(lex['seasons'])} the {r.choice(lex['weather'])} came {r.choice(lex['adverbs'])}."
            )
    return " ".join(out)


def _facts(r: random.Random, lex: dict) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        kind = r.randrange(4)
        if kind == 0:
            a, b = r.choice(list(lex["adjectives"].items()))
            a, b = (a, b) if r.random() < 0.5 else (b, a)
            out.append(f"The opposite of {a} is {b}.")
        elif kind == 1:
            s, p = r.choice(list(lex["nouns"].items()))
            out.append(f"One {s}, two {p}.")
        elif kind == 2:
            v, p = r.choice(list(lex["verbs"].items()))
            out.append(f"Today I {v}; yesterday I {p}.")
        else:
            a = r.choice(list(lex["adjectives"]))
            out.append(f"Something that is not {a} is {lex['adjectives'][a]}.")
    return " ".join(out)


def _arithmetic(r: random.Random, lex: dict) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        a, b = r.randint(0, 99), r.randint(0, 99)
        kind = r.randrange(4)
        if kind == 0:
            out.append(f"{a} plus {b} equals {a + b}.")
        elif kind == 1:
            hi, lo = max(a, b), min(a, b)
            out.append(f"{hi} minus {lo} is {hi - lo}.")
        elif kind == 2:
            out.append(f"The number {a} is written {number_to_words(a)}.")
        else:
            rel = "greater than" if a > b else ("less than" if a < b else "equal to")
            out.append(f"{a} is {rel} {b}.")
    return " ".join(out)


def _calendar(r: random.Random, lex: dict) -> str:
    days, months = lex["days"], lex["months"]
    out = []
    for _ in range(r.randint(2, 5)):
        kind = r.randrange(3)
        if kind == 0:
            i = r.randrange(7)
            out.append(f"After {days[i]} comes {days[(i + 1) % 7]}.")
        elif kind == 1:
            i = r.randrange(12)
            out.append(f"{months[i]} is followed by {months[(i + 1) % 12]}.")
        else:
            y, m = r.randint(1950, 2049), r.randrange(12)
            d = r.randint(1, DAYS_IN_MONTH[m])
            out.append(f"The date {y}-{m + 1:02d}-{d:02d} is {months[m]} {d}, {y}.")
    return " ".join(out)


def _counting(r: random.Random, lex: dict) -> str:
    kind = r.randrange(3)
    if kind == 0:
        start = r.randint(0, 90)
        seq = ", ".join(str(x) for x in range(start, start + r.randint(4, 9)))
        return f"Counting up: {seq}."
    if kind == 1:
        words = r.sample(list(lex["nouns"]), r.randint(3, 6))
        return f"A list of {number_to_words(len(words))} words: {' '.join(words)}. Sorted: {' '.join(sorted(words))}."
    nums = [r.randint(0, 9) for _ in range(r.randint(3, 7))]
    return f"The numbers {' '.join(map(str, nums))} sorted are {' '.join(map(str, sorted(nums)))}; the largest is {max(nums)}."


_ONSETS = [
    "",
    "b",
    "br",
    "c",
    "ch",
    "d",
    "f",
    "g",
    "gr",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "qu",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "y",
    "z",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "ie", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "t", "m", "nd", "st", "ng", "ck", "rd", "x"]


def _pseudo_word(r: random.Random) -> str:
    return "".join(r.choice(_ONSETS) + r.choice(_NUCLEI) + r.choice(_CODAS) for _ in range(r.randint(1, 3)))


def _atlas(r: random.Random, lex: dict) -> str:
    # Made-up place and people names built from English-like syllables: they give the
    # tokenizer enough distinct substrings for a vocabulary that also segments words it
    # never saw, which a corpus of a few hundred real words alone cannot.
    town, river, person = (
        _pseudo_word(r).capitalize(),
        _pseudo_word(r).capitalize(),
        _pseudo_word(r).capitalize(),
    )
    out = [f"The town of {town} lies on the river {river}."]
    for _ in range(r.randint(2, 5)):
        kind = r.randrange(3)
        if kind == 0:
            out.append(
                f"{person} {r.choice(list(lex['verbs'].values()))} a {_pseudo_word(r)} at the {_pseudo_word(r)} market."
            )
        elif kind == 1:
            out.append(f"In {town} a {r.choice(list(lex['nouns']))} is called a {_pseudo_word(r)}.")
        else:
            out.append(
                f"{r.randint(2, 999)} people live in {_pseudo_word(r).capitalize()}, {r.choice(lex['adverbs'])} {r.choice(lex['feelings'])}."
            )
    return " ".join(out)


def _characters(r: random.Random, lex: dict) -> str:
    # Makes every printable ASCII character frequent enough to get its own piece, so the
    # tokenizer rarely falls back to <unk> on a user's text.
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    r.shuffle(chars)
    word = r.choice(upper_case_words())
    return f"Spell {word}: {' '.join(word)}. Upper case: {word.upper()}. Symbols: {' '.join(chars[:20])}."


_GENRES = [
    (_story, 0.35),
    (_facts, 0.15),
    (_arithmetic, 0.15),
    (_calendar, 0.1),
    (_counting, 0.1),
    (_characters, 0.05),
    (_atlas, 0.15),
]


def document(seed: int, index: int) -> str:
    """Document ``index`` of the corpus with ``seed`` (pure function of both)."""
    r = random.Random(f"{seed}/{index}")
    lex = load_lexicon()
    parts = []
    while sum(len(p) for p in parts) < 400:
        gen = r.choices([g for g, _ in _GENRES], weights=[w for _, w in _GENRES])[0]
        parts.append(gen(r, lex))
    return " ".join(parts)


def iter_documents(config: CorpusConfig = CorpusConfig(), split: str = "train") -> Iterator[str]:
    """Stream documents: ``split="train"`` gives indices [0, num_docs), ``"heldout"`` the
    ``heldout_docs`` after them (never in any training shard; evaluation uses them)."""
    if split == "train":
        rng = range(config.num_docs)
    elif split == "heldout":
        rng = range(config.num_docs, config.num_docs + config.heldout_docs)
    else:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    for i in rng:
        yield document(config.seed, i)


def corpus_key(config: CorpusConfig) -> str:
    """Content hash of everything the corpus depends on (this file, the lexicon, config)."""
    return content_hash(Path(__file__), *LEXICON_SOURCES, asdict(config))


def build_default_corpus(config: CorpusConfig = CorpusConfig(), cache_dir=None) -> Path:
    """Write the training corpus to ``<cache>/corpus-<hash>/corpus.txt`` (documents separated
    by blank lines, the .txt convention of :mod:`coldswarm.lm.data`) and return that path."""

    def build(tmp: Path) -> None:
        with open(tmp / CORPUS_FILE, "w", encoding="utf-8") as f:
            for doc in iter_documents(config):
                f.write(doc + "\n\n")

    return cached_dir("corpus", corpus_key(config), build, cache_dir) / CORPUS_FILE
