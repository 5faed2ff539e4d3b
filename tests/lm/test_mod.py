"""MoD masking: exact invariants, T5 reference values, statistics against closed forms."""

from __future__ import annotations

from math import comb
from types import SimpleNamespace

import numpy as np
import pytest

from coldswarm.lm.mod import (
    LABEL_PAD,
    UL2_DENOISERS,
    MoDCollator,
    MoDConfig,
    PackedStream,
    chunk_length,
    corrupted_lengths,
    prefix_lm,
    random_segmentation,
    random_spans_helper,
    random_spans_noise_mask,
    span_corrupt,
    span_counts,
)

SENTINELS = np.arange(4099, 3999, -1)  # <extra_id_0> = 4099, as the default tokenizer
SPECIAL = SimpleNamespace(
    pad=0,
    eos=1,
    sentinels=SENTINELS,
    modes={"R": np.array([4100]), "X": np.array([4101]), "S": np.array([4102])},
)
SPAN_DENOISERS = [d for d in UL2_DENOISERS if not d.is_prefix_lm]


def test_the_seven_ul2_denoisers():
    got = [(d.mode, d.mu, d.r) for d in UL2_DENOISERS]
    assert got == [
        ("R", 3, 0.15),
        ("R", 8, 0.15),
        ("X", 3, 0.5),
        ("X", 8, 0.5),
        ("X", 64, 0.15),
        ("X", 64, 0.5),
        ("S", None, None),
    ]


@pytest.mark.parametrize("d", SPAN_DENOISERS, ids=lambda d: d.name)
def test_mask_invariants_many_seeds(d):
    for seed in range(300):
        rng = np.random.default_rng(seed)
        length = int(rng.integers(2, 1200))
        mask = random_spans_noise_mask(length, d.r, d.mu, rng, max_spans=100)
        num_noise = min(max(round(length * d.r), 1), length - 1)
        num_spans = min(max(round(num_noise / d.mu), 1), length - num_noise, 100)
        assert mask.shape == (length,)
        assert mask.sum() == num_noise
        assert not mask[0] and mask[-1]
        starts = np.flatnonzero(mask & ~np.concatenate(([False], mask[:-1])))
        assert len(starts) == num_spans
        tokens = np.arange(10, 10 + length)
        inputs, targets = span_corrupt(tokens, mask, SENTINELS, eos=1)
        assert len(inputs) == length - num_noise + num_spans + 1
        assert len(targets) == num_noise + num_spans + 1
        assert inputs[-1] == 1 and targets[-1] == 1
        # Sentinels appear in order <extra_id_0>, <extra_id_1>, ... and only from the sentinel set.
        in_sent = inputs[np.isin(inputs, SENTINELS)]
        assert (in_sent == SENTINELS[:num_spans]).all()
        assert (targets[np.isin(targets, SENTINELS)] == SENTINELS[:num_spans]).all()
        # Reconstruct the chunk by substituting each sentinel's target span back.
        spans = np.split(targets[:-1], np.flatnonzero(np.isin(targets[:-1], SENTINELS))[1:])
        fill = {s[0]: s[1:] for s in spans}
        rebuilt = np.concatenate([fill[t] if t in fill else [t] for t in inputs[:-1]])
        assert (rebuilt == tokens).all()


def test_random_spans_helper_matches_t5_reference_values():
    # T5's span-corruption defaults: 568 tokens -> 512 inputs and 114 targets.
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert random_spans_helper(512, 0.5, 3.0) == (766, 512)


@pytest.mark.parametrize("inputs_length", [64, 128, 512, 1024])
@pytest.mark.parametrize("d", UL2_DENOISERS, ids=lambda d: d.name)
def test_chunk_lengths_fill_inputs_length(d, inputs_length):
    n = chunk_length(d, inputs_length, mode_length=1, max_spans=100)
    if d.is_prefix_lm:
        assert n == inputs_length - 1
        return
    got = corrupted_lengths(n, d.r, d.mu, 100)[0] + 1  # + mode token
    assert inputs_length - 3 <= got <= inputs_length
    helper = random_spans_helper(inputs_length - 1, d.r, d.mu)[0]
    if (
        span_counts(helper, d.r, d.mu)[1] <= 100
        and corrupted_lengths(helper, d.r, d.mu, 100)[0] < inputs_length
    ):
        assert n == helper  # no cap and no max(spans, 1) correction: exactly T5's helper


def test_sentinel_overflow_rule_caps_spans_at_100():
    d = next(d for d in UL2_DENOISERS if d.name == "X-3-0.5")
    n = chunk_length(d, 512, 1, 100)
    assert round(round(n * 0.5) / 3) > 100  # without the cap this chunk would need > 100 sentinels
    collator = MoDCollator(SPECIAL, MoDConfig(inputs_length=512))
    idx = collator.denoiser_index("X-3-0.5")
    for seed in range(20):
        collator.reseed(seed)
        inputs, targets = collator.example(np.arange(5, 5 + n) % 3990 + 5, idx)
        assert len(inputs) <= 512
        sent = inputs[np.isin(inputs, SENTINELS)]
        assert len(sent) == 100 and (sent == SENTINELS).all()
        # Nothing outside the sentinel set plays a sentinel: every id >= 4000 is a sentinel or mode token.
        assert set(inputs[inputs >= 4000]) <= set(SENTINELS) | {4101}
        assert round(n * 0.5) == len(targets) - 1 - 100  # noise count untouched by the cap


def _composition_pmf(n: int, k: int) -> np.ndarray:
    """P(first part = j) of a uniform composition of n into k positive parts, j = 1..n-k+1."""
    if k == 1:
        pmf = np.zeros(n + 1)
        pmf[n] = 1.0
        return pmf
    pmf = np.zeros(n + 1)
    for j in range(1, n - k + 2):
        pmf[j] = comb(n - j - 1, k - 2) / comb(n - 1, k - 1)
    return pmf


@pytest.mark.parametrize("d", SPAN_DENOISERS, ids=lambda d: d.name)
def test_span_length_statistics_match_uniform_composition(d):
    length = chunk_length(d, 512, 1, 100)
    num_noise, num_spans = span_counts(length, d.r, d.mu, 100)
    rng = np.random.default_rng(1)
    draws = 3000
    first_noise, first_keep, all_noise = [], [], []
    for _ in range(draws):
        mask = random_spans_noise_mask(length, d.r, d.mu, rng, 100)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
        runs = edges[1::2] - edges[0::2]  # noise span lengths, in order
        first_noise.append(runs[0])
        first_keep.append(edges[0])
        all_noise.extend(runs)
    # Mean span length is exactly num_noise / num_spans per draw; mu where the cap does not bind.
    assert np.mean(all_noise) == pytest.approx(num_noise / num_spans)
    if num_spans < 100:
        assert num_noise / num_spans == pytest.approx(d.mu, rel=0.1) or num_spans == 1
    for sample, n in ((first_noise, num_noise), (first_keep, length - num_noise)):
        pmf = _composition_pmf(n, num_spans)
        emp = np.bincount(sample, minlength=len(pmf))[: len(pmf)] / draws
        ks = np.abs(np.cumsum(emp) - np.cumsum(pmf)).max()  # Kolmogorov-Smirnov distance
        assert ks < 2.0 / np.sqrt(draws), (d.name, ks)  # alpha ~ 0.001 (conservative for discrete)
        expected_mean = (np.arange(len(pmf)) * pmf).sum()
        sd = np.sqrt(((np.arange(len(pmf)) - expected_mean) ** 2 * pmf).sum())
        assert abs(np.mean(sample) - expected_mean) <= 5 * sd / np.sqrt(draws) + 1e-9


def test_prefix_lm_split_is_uniform():
    rng = np.random.default_rng(0)
    length, draws = 20, 19000
    splits = []
    for _ in range(draws):
        inputs, targets = prefix_lm(np.arange(3, 3 + length), rng, eos=1)
        assert len(inputs) + len(targets) == length + 2 and inputs[-1] == targets[-1] == 1
        splits.append(len(inputs) - 1)
    counts = np.bincount(splits, minlength=length)[1:]
    assert len(counts) == length - 1 and counts.min() > 0
    expected = draws / (length - 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 50  # 18 dof: p < 1e-4 above 50


def test_mixing_rates():
    collator = MoDCollator(SPECIAL, MoDConfig(inputs_length=64, rates=(1, 1, 1, 1, 1, 1, 4)))
    picks = collator.choose(20000)
    freq = np.bincount(picks, minlength=7) / 20000
    assert freq == pytest.approx([0.1] * 6 + [0.4], abs=0.015)
    uniform = MoDCollator(SPECIAL, MoDConfig(inputs_length=64)).choose(14000)
    assert np.bincount(uniform, minlength=7) / 14000 == pytest.approx([1 / 7] * 7, abs=0.015)


def test_random_segmentation_is_a_composition():
    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (10, 10), (10, 3), (100, 1), (500, 100)]:
        parts = random_segmentation(n, k, rng)
        assert len(parts) == k and parts.sum() == n and parts.min() >= 1


def test_packed_stream_puts_eos_between_documents():
    stream = PackedStream([[5, 6], [7], [8, 9, 10]], eos=1)
    assert stream.take(4).tolist() == [5, 6, 1, 7]
    assert stream.take(3).tolist() == [1, 8, 9]
    assert stream.take(5).tolist() == [10, 1]
    assert stream.take(5).tolist() == []


def test_collator_batches_pad_and_mode_tokens():
    collator = MoDCollator(SPECIAL, MoDConfig(inputs_length=64, seed=3))
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 3990, size=int(rng.integers(5, 100))) for _ in range(200)]
    batches = list(collator.iter_batches(docs, batch_size=8, return_tensors="np"))
    assert len(batches) > 5
    for b in batches:
        ids, labels, att = b["input_ids"], b["labels"], b["attention_mask"]
        assert ids.shape[1] <= 64 and ids.shape[1] % 8 == 0 and labels.shape[1] % 8 == 0
        assert set(ids[:, 0]) <= {4100, 4101, 4102}
        assert ((ids == 0) == (att == 0)).all()
        assert (labels != 0).all()  # label padding is -100, never the pad id
        for row in labels:
            real = row[row != LABEL_PAD]
            assert real[-1] == 1 and (row[len(real) :] == LABEL_PAD).all()
    # Forcing a denoiser and using it as a collate_fn over fixed chunks.
    chunks = [np.arange(3, 3 + collator.max_chunk_length) for _ in range(4)]
    b = collator(chunks, denoiser="S")
    assert (b["input_ids"][:, 0] == 4102).all()
