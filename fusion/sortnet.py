"""Coordinate-wise order statistics over N rows with a sorting network (median, trimmed mean).

``torch.sort(dim=0)`` over an (N, m) block with small N runs a general sort per column; a sorting
network instead runs a fixed list of compare-exchange steps, each one ``minimum`` and one ``maximum``
over two whole rows -- vectorised passes over contiguous memory. Batcher's odd-even merge sort needs
19 steps for N = 8 and 63 for N = 16; steps that cannot affect the wanted output positions (the
middle ones, for a median) are pruned. Above :data:`MAX_ROWS` rows, ``torch.sort`` is used.
"""

from __future__ import annotations

from functools import cache

import torch

Tensor = torch.Tensor

MAX_ROWS = 32  #: larger N: the network grows as N log^2 N; torch.sort is used instead


@cache
def network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on n inputs: compare-exchange pairs (i < j), in order.

    Built for the next power of two and pruned: a pair touching a position >= n compares with a
    padding value of +inf, which never moves, so dropping it leaves the first n outputs sorted.
    """
    p = 1
    while p < n:
        p *= 2
    pairs = []
    span = 1
    while span < p:
        k = span
        while k >= 1:
            for j in range(k % span, p - k, 2 * k):
                for i in range(min(k, p - j - k)):
                    if (i + j) // (span * 2) == (i + j + k) // (span * 2) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        span *= 2
    return tuple(pairs)


@cache
def network_for(n: int, outputs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The steps of :func:`network` that can affect the sorted ``outputs`` positions."""
    needed = set(outputs)
    kept = []
    for i, j in reversed(network(n)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def sort_rows(rows: list[Tensor], pairs: tuple[tuple[int, int], ...], spare: Tensor) -> list[Tensor]:
    """Apply compare-exchange ``pairs`` to same-shaped ``rows`` (overwritten); returns the rows in
    sorted order (row i holds the i-th smallest per coordinate where ``pairs`` sorts position i).
    ``spare`` is one more buffer of the same shape; references are swapped, values never copied."""
    rows = list(rows)
    for i, j in pairs:
        lo = torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = lo, rows[i]
    return rows
