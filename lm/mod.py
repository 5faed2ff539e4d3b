"""UL2 Mixture-of-Denoisers (MoD), exactly as UL2 and T5 define it. Pure numpy; no I/O.

Span corruption follows T5's ``random_spans_noise_mask`` / ``noise_span_to_unique_sentinel``:

* ``num_noise = clamp(round(L * r), 1, L - 1)``, ``num_spans = max(round(num_noise / mu), 1)``;
* noise and non-noise span lengths are uniformly random compositions of ``num_noise`` and
  ``L - num_noise`` into ``num_spans`` positive parts; spans alternate non-noise, noise, ...
  so the first token is never noise and the last always is;
* inputs: each noise span becomes one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ...);
  targets: each non-noise span becomes one sentinel; both end with EOS, so their lengths
  are exactly ``L - num_noise + num_spans + 1`` and ``num_noise + num_spans + 1``;
* the UL2 mode token (``[NLU]``, ``[NLG]``, ``[S2S]``) is prepended to the inputs; the
  chunk length ``L`` of each denoiser is chosen with T5's ``random_spans_helper`` so that
  the inputs come out at ``inputs_length`` after reserving room for the mode token.

The seven UL2 denoisers (:data:`UL2_DENOISERS`): R (mu=3, r=0.15), (8, 0.15) with [NLU];
X (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5) with [NLG]; S (prefix-LM, split point uniform
over the chunk, both parts non-empty) with [S2S].

Mixing rates: a choice, since the paper's exact rates are not in its released code. The
default is uniform over the seven denoisers (so S gets 1/7 of examples; the paper's text
suggests S ~20%); set ``MoDConfig.rates`` to change it, e.g. ``(1, 1, 1, 1, 1, 1, 1.5)``.

Sentinel overflow rule: the tokenizer has 100 sentinels; at 512 inputs X(3, 0.5) would
make 128 spans. We **cap the span count** at ``max_spans`` (default 100): the noise count
stays ``round(L * r)`` (noise density is exact), the spans get longer on average
(``num_noise / 100`` instead of mu), and ``random_spans_helper`` is solved with the capped
count so the inputs still fill ``inputs_length``. Sentinel ids therefore always come from
``<extra_id_0..99>`` and never spill into ordinary vocabulary ids (T5's
``vocab_size - span_index`` would). The span count is also capped at the number of
non-noise tokens (only reachable with r > 0.5), because each noise span needs a
non-noise span before it.

Documents are packed with EOS between them; batches pad inputs with 0 and labels with -100.

Use :class:`MoDCollator` either as a ``DataLoader`` ``collate_fn`` over token chunks of
``collator.max_chunk_length`` (each example is cut to its denoiser's chunk length), or,
wasting no tokens, with :meth:`MoDCollator.iter_batches` over a stream of tokenized documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

LABEL_PAD = -100


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: span corruption (mean span ``mu``, noise density ``r``) or prefix-LM."""

    name: str
    mode: str  # "R", "X" or "S": picks the mode token
    mu: float | None = None
    r: float | None = None

    @property
    def is_prefix_lm(self) -> bool:
        return self.mode == "S"


UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R-3-0.15", "R", 3.0, 0.15),
    Denoiser("R-8-0.15", "R", 8.0, 0.15),
    Denoiser("X-3-0.5", "X", 3.0, 0.5),
    Denoiser("X-8-0.5", "X", 8.0, 0.5),
    Denoiser("X-64-0.15", "X", 64.0, 0.15),
    Denoiser("X-64-0.5", "X", 64.0, 0.5),
    Denoiser("S", "S"),
)


# --------------------------------------------------------------------------- span masks


def span_counts(
    length: int, noise_density: float, mean_span: float, max_spans: int | None = None
) -> tuple[int, int]:
    """``(num_noise, num_spans)`` for a chunk of ``length`` tokens, T5's formulas plus the caps
    described in the module docstring. ``length >= 2``."""
    if length < 2:
        raise ValueError("span corruption needs at least 2 tokens")
    num_noise = int(min(max(round(length * noise_density), 1), length - 1))
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_spans = min(num_spans, length - num_noise)
    if max_spans is not None:
        num_spans = min(num_spans, max_spans)
    return num_noise, num_spans


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random composition of ``num_items`` into ``num_segments`` positive parts
    (T5's ``_random_segmentation``: choose the ``num_segments - 1`` cut points among the
    ``num_items - 1`` gaps uniformly without replacement)."""
    if num_segments == 1:
        return np.array([num_items], dtype=np.int64)
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_span: float,
    rng: np.random.Generator,
    max_spans: int | None = None,
) -> np.ndarray:
    """Boolean noise mask of ``length`` (True = noise), T5's ``random_spans_noise_mask``."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span, max_spans)
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    keep_lengths = random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.empty(2 * num_spans, dtype=np.int64)
    interleaved[0::2] = keep_lengths
    interleaved[1::2] = noise_lengths
    return np.repeat(np.tile(np.array([False, True]), num_spans), interleaved)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Replace each run of True in ``mask`` by the next sentinel; drop the rest of the run."""
    prev = np.empty_like(mask)
    prev[0] = False
    prev[1:] = mask[:-1]
    first = mask & ~prev
    span_index = np.cumsum(first) - 1
    out = np.where(first, sentinels[np.maximum(span_index, 0)], tokens)
    return out[~(mask & prev)]


def span_corrupt(
    tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` of T5 span corruption, each ending with EOS (no mode token)."""
    inputs = _replace_spans(tokens, mask, sentinels)
    targets = _replace_spans(tokens, ~mask, sentinels)
    return np.append(inputs, eos), np.append(targets, eos)


def prefix_lm(tokens: np.ndarray, rng: np.random.Generator, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """UL2's S-denoiser: split uniformly in [1, L-1]; inputs = prefix + EOS, targets = rest + EOS."""
    n = len(tokens)
    split = int(rng.integers(1, n)) if n >= 2 else n
    return np.append(tokens[:split], eos), np.append(tokens[split:], eos)


# ------------------------------------------------------------------------ chunk lengths


def random_spans_helper(
    inputs_length: int,
    noise_density: float,
    mean_noise_span_length: float,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
    """T5's ``random_spans_helper`` (a faithful port): the ``(tokens_length, targets_length)``
    for which span corruption yields inputs of at most ``inputs_length`` (with EOS)."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (
            num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1,
        )

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_len, targets_length = lengths(tokens_length)
    # T5's hack: with r = 0.5 make targets no longer than inputs (a round number).
    if noise_density == 0.5 and targets_length > inputs_len:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def corrupted_lengths(
    length: int, noise_density: float, mean_span: float, max_spans: int | None
) -> tuple[int, int]:
    """Exact ``(inputs, targets)`` lengths (with EOS, without mode token) of span corruption."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span, max_spans)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def chunk_length(
    denoiser: Denoiser, inputs_length: int, mode_length: int = 1, max_spans: int | None = 100
) -> int:
    """Tokens a denoiser consumes so its inputs (mode token included) fill ``inputs_length``.

    Span denoisers use :func:`random_spans_helper` on ``inputs_length - mode_length``; where
    the sentinel cap binds (the helper's length would need more than ``max_spans`` spans)
    the largest length whose exact, capped inputs still fit is used instead."""
    budget = inputs_length - mode_length
    if denoiser.is_prefix_lm:
        return budget  # longest prefix is L-1 tokens, + EOS
    n, _ = random_spans_helper(budget, denoiser.r, denoiser.mu)
    if max_spans is not None and span_counts(n, denoiser.r, denoiser.mu)[1] > max_spans:
        while corrupted_lengths(n + 1, denoiser.r, denoiser.mu, max_spans)[0] <= budget:
            n += 1
    # The helper counts round(noise / mu) spans where the mask uses max(..., 1): at short
    # lengths with mu=64 that is one sentinel more than the helper planned for.
    while n > 2 and corrupted_lengths(n, denoiser.r, denoiser.mu, max_spans)[0] > budget:
        n -= 1
    return n


# ----------------------------------------------------------------------------- collator


@dataclass
class MoDConfig:
    """How MoD examples are made. Defaults: UL2's seven denoisers, uniform mix, 512 inputs."""

    inputs_length: int = field(default=512, metadata={"help": "encoder length incl. mode token and EOS"})
    denoisers: tuple[Denoiser, ...] = field(
        default=UL2_DENOISERS, metadata={"help": "the mixture; see UL2_DENOISERS"}
    )
    rates: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "relative mixing weight per denoiser (same order); None = uniform (our choice)"},
    )
    max_spans: int = field(
        default=100, metadata={"help": "sentinel cap: span count never exceeds this (<= number of sentinels)"}
    )
    pad_to_multiple_of: int = field(
        default=8, metadata={"help": "round padded batch lengths up to this (1 = tightest)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the collator's RNG (denoiser choice and masks)"})

    def probabilities(self) -> np.ndarray:
        w = np.ones(len(self.denoisers)) if self.rates is None else np.asarray(self.rates, dtype=np.float64)
        if len(w) != len(self.denoisers) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("rates must give one non-negative weight per denoiser, not all zero")
        return w / w.sum()


def pad_batch(
    seqs: Sequence[np.ndarray], value: int, multiple: int = 1, length: int | None = None
) -> np.ndarray:
    """Right-pad 1-D int arrays into a 2-D int64 array."""
    n = max((len(s) for s in seqs), default=0) if length is None else length
    n = -(-n // multiple) * multiple if multiple > 1 else n
    out = np.full((len(seqs), n), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class MoDCollator:
    """Turns token chunks into MoD batches (``input_ids``, ``attention_mask``, ``labels``).

        ids = special_ids(tokenizer)
        collator = MoDCollator(ids, MoDConfig(inputs_length=512))
        for batch in collator.iter_batches(token_docs, batch_size=32):   # dicts of torch tensors
            loss = model(**batch).loss

    or ``DataLoader(chunks, batch_size=32, collate_fn=collator)`` where each chunk has
    ``collator.max_chunk_length`` tokens (with several loader workers, give each its own
    seed via ``collator.reseed(seed + worker_id)`` in ``worker_init_fn``).
    """

    def __init__(self, special, config: MoDConfig | None = None):
        self.config = config or MoDConfig()
        self.special = special
        if self.config.max_spans > len(special.sentinels):
            raise ValueError(
                f"max_spans={self.config.max_spans} exceeds the {len(special.sentinels)} sentinels"
            )
        self.denoisers = tuple(self.config.denoisers)
        self.probs = self.config.probabilities()
        self.modes = [special.modes[d.mode] for d in self.denoisers]
        self.chunk_lengths = np.array(
            [
                chunk_length(d, self.config.inputs_length, len(m), self.config.max_spans)
                for d, m in zip(self.denoisers, self.modes, strict=True)
            ]
        )
        if (self.chunk_lengths < 2).any():
            raise ValueError(f"inputs_length={self.config.inputs_length} is too short for span corruption")
        self.rng = np.random.default_rng(self.config.seed)

    @property
    def max_chunk_length(self) -> int:
        """Tokens per chunk that are enough for any denoiser of the mixture."""
        return int(self.chunk_lengths.max())

    def denoiser_index(self, name: str) -> int:
        for i, d in enumerate(self.denoisers):
            if d.name == name:
                return i
        raise KeyError(f"no denoiser {name!r} in the mixture ({[d.name for d in self.denoisers]})")

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, n: int) -> np.ndarray:
        """Denoiser indices for ``n`` examples, drawn with the mixing rates."""
        return self.rng.choice(len(self.denoisers), size=n, p=self.probs)

    def example(self, tokens: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One ``(inputs, targets)`` pair for denoiser ``index`` from ``tokens`` (cut to its chunk length)."""
        d = self.denoisers[index]
        tokens = np.asarray(tokens, dtype=np.int64)[: self.chunk_lengths[index]]
        if d.is_prefix_lm or len(tokens) < 2:
            inputs, targets = prefix_lm(tokens, self.rng, self.special.eos)
        else:
            mask = random_spans_noise_mask(len(tokens), d.r, d.mu, self.rng, self.config.max_spans)
            inputs, targets = span_corrupt(tokens, mask, self.special.sentinels, self.special.eos)
        return np.concatenate((self.modes[index], inputs)), targets

    def collate_examples(
        self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], return_tensors: str = "pt"
    ) -> dict:
        """Pad ``(inputs, targets)`` pairs: inputs with pad (0), labels with -100."""
        m = self.config.pad_to_multiple_of
        input_ids = pad_batch([p[0] for p in pairs], self.special.pad, m)
        labels = pad_batch([p[1] for p in pairs], LABEL_PAD, m)
        batch = {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.special.pad).astype(np.int64),
            "labels": labels,
        }
        if return_tensors == "pt":
            import torch

            batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        return batch

    def __call__(self, chunks: Sequence, denoiser: str | None = None, return_tensors: str = "pt") -> dict:
        """Collate token chunks; ``denoiser`` forces one denoiser for all (evaluation does)."""
        if denoiser is None:
            idx = self.choose(len(chunks))
        else:
            idx = np.full(len(chunks), self.denoiser_index(denoiser))
        return self.collate_examples(
            [self.example(c, int(i)) for c, i in zip(chunks, idx, strict=True)], return_tensors
        )

    def iter_examples(
        self, docs: Iterable[Sequence[int]], denoiser: str | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pack tokenized documents (EOS between them) and cut exactly each example's chunk length."""
        stream = PackedStream(docs, self.special.eos)
        while True:
            i = int(self.choose(1)[0]) if denoiser is None else self.denoiser_index(denoiser)
            chunk = stream.take(int(self.chunk_lengths[i]))
            if len(chunk) < 2:
                return
            yield self.example(chunk, i)

    def iter_batches(
        self,
        docs: Iterable[Sequence[int]],
        batch_size: int,
        denoiser: str | None = None,
        drop_last: bool = False,
        return_tensors: str = "pt",
    ) -> Iterator[dict]:
        """Batches of MoD examples over a stream of tokenized documents (no token wasted)."""
        pairs: list = []
        for pair in self.iter_examples(docs, denoiser):
            pairs.append(pair)
            if len(pairs) == batch_size:
                yield self.collate_examples(pairs, return_tensors)
                pairs = []
        if pairs and not drop_last:
            yield self.collate_examples(pairs, return_tensors)


class PackedStream:
    """Concatenates documents with EOS after each and hands out consecutive slices."""

    def __init__(self, docs: Iterable[Sequence[int]], eos: int):
        self._docs = iter(docs)
        self._eos = eos
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._done = False

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens (fewer only at the end of the stream)."""
        while self._size < n and not self._done:
            doc = next(self._docs, None)
            if doc is None:
                self._done = True
                break
            arr = np.asarray(doc, dtype=np.int64)
            self._parts.append(np.append(arr, self._eos))
            self._size += len(arr) + 1
        buf = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.int64)
        out, rest = buf[:n], buf[n:]
        self._parts = [rest] if len(rest) else []
        self._size = len(rest)
        return out
