"""Exact top-k by magnitude for TIES' trim step: per tensor in memory, or over a whole task vector streamed.

TIES keeps, per contribution, the k = round(density * n) entries of its delta with the largest |d|.
Entries equal to the threshold are kept in index order until exactly k are kept, so the kept set
depends only on the values and their positions, never on the order contributions arrive in or the
chunks the driver reads. A :class:`TrimThreshold` says which entries of one tensor survive:
``|d| > value``, or ``|d| == value`` at a flat index below ``cutoff``.

* :func:`tensor_threshold` -- over one tensor held in memory: numpy's introselect (``partition``,
  linear time) on the magnitudes' int32 bit patterns, then one counting pass; the positions of ties are looked up only when some of them
  must be dropped.
* :class:`GlobalTopK` -- over the whole task vector of one contribution (every merged tensor), which
  is never held at once: pass 1 histograms the top 16 bits of each |d| (IEEE-754 floats >= 0 order
  like their bit patterns), pass 2 histograms the low 16 bits inside the one coarse bucket that holds
  the k-th value, which fixes it exactly; a third pass runs only when ties at the threshold must be
  split, to find where the last kept tie is. Memory: two histograms (768 KiB) per contribution.
* :func:`trim_into` -- apply a threshold to a chunk of a delta (``hardshrink``: one pass, no mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class TrimThreshold:
    """Keep ``|d| > value``, and ``|d| == value`` where the entry's flat index in its tensor < ``cutoff``."""

    value: float
    cutoff: int
    #: ``hardshrink``'s lambda for ``|d| >= value`` (it keeps ``|d| > lambda``)
    below: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        below = self.value if self.value in (0.0, float("inf")) else _below(self.value)
        object.__setattr__(self, "below", below)


def keep_count(density: float, n: int) -> int:
    """k, the number of entries TIES keeps of n (round half to even, as Python's round)."""
    return int(round(density * n))


def _below(t: float) -> float:
    """The largest float32 below ``t`` (> 0): ``|x| > _below(t)`` is ``|x| >= t`` for float32 x."""
    return float(np.nextafter(np.float32(t), np.float32(0)))


def _magnitude_bits(flat: Tensor, out: Tensor) -> np.ndarray:
    """|flat| as int32 bit patterns in ``out`` (fp32 storage): sign cleared, so they order like the
    magnitudes (NaN above Inf); numpy selects on int32 2-3x faster than on float32."""
    bits = out.view(torch.int32)
    torch.bitwise_and(flat.contiguous().view(torch.int32), 0x7FFFFFFF, out=bits)
    return bits.numpy()


def tensor_threshold(delta: Tensor, k: int, scratch: Tensor | None = None) -> TrimThreshold | None:
    """Exactly k entries of ``delta`` (any shape, fp32) by magnitude; None: keep everything.

    ``scratch``: an fp32 buffer of at least ``delta.numel()`` entries to select in (else one is
    allocated); ``delta`` itself is not changed.
    """
    n = delta.numel()
    if k >= n:
        return None
    if k <= 0:
        return TrimThreshold(float("inf"), 0)
    flat = delta.reshape(-1)
    buf = scratch[:n] if scratch is not None else torch.empty(n, dtype=torch.float32)
    mag = _magnitude_bits(flat, buf)
    mag.partition(n - k)  # introselect: mag[n-k] is the k-th largest, larger ones after it
    t = mag[n - k]
    value = float(np.int32(t).view(np.float32))
    if not np.isfinite(value):  # NaN/Inf inputs: keep them; the driver's finiteness check names the culprit
        return None
    upper = mag[n - k + 1 :]
    ties_up = int(np.count_nonzero(upper == t))
    greater = upper.size - ties_up
    ties = ties_up + 1 + int(np.count_nonzero(mag[: n - k] == t))
    keep = k - greater  # ties to keep, 1 <= keep <= ties
    if value == 0 or keep == ties:  # zeros add nothing to a merge; or every tie fits
        return TrimThreshold(value, n)
    positions = np.flatnonzero(_magnitude_bits(flat, buf) == t)
    return TrimThreshold(value, int(positions[keep - 1]) + 1)


def trim_into(delta: Tensor, thr: TrimThreshold | None, start: int, out: Tensor) -> Tensor:
    """``out`` = ``delta`` with the entries ``thr`` drops set to 0; ``delta`` holds flat entries
    ``start .. start + numel`` of its tensor (both 1-D, same length)."""
    if thr is None:
        return out.copy_(delta)
    n = delta.numel()
    cut = min(max(thr.cutoff - start, 0), n)
    hardshrink = torch.ops.aten.hardshrink.out  # x if |x| > lambda else 0
    lam_ge = thr.below
    if cut == n:
        return hardshrink(delta, lam_ge, out=out)
    if cut == 0:
        return hardshrink(delta, thr.value, out=out)
    hardshrink(delta[:cut], lam_ge, out=out[:cut])
    hardshrink(delta[cut:], thr.value, out=out[cut:])
    return out


_COARSE, _FINE = 1 << 15, 1 << 16  # |d| >= 0: the sign bit is 0, so 15 high bits + 16 low bits


class GlobalTopK:
    """The exact top-k threshold of |d| over a stream of tensors, for one contribution.

    The driver feeds every merged tensor in the same order on every pass (tensor ``index``, chunks
    in ascending ``start``), while :attr:`wants_pass` is true, calling :meth:`end_pass` after each;
    then :meth:`threshold` gives each tensor's :class:`TrimThreshold`. Entries of the task vector
    that are never fed (tensors this contribution does not change) count as zeros.
    """

    def __init__(self, k: int, total: int):
        self.k, self.total = k, total
        self.pass_no = 1
        self.fed = 0
        self._coarse = torch.zeros(_COARSE, dtype=torch.int64)
        self._fine: Tensor | None = None
        self._bucket = -1
        self._above = 0
        self.value: float | None = None  #: the threshold, once known
        self._keep = 0  # ties at the threshold to keep (pass 3 looks for the keep-th)
        self._tie_bits = 0
        self._seen = 0
        self._cut: tuple[int, int] | None = None  # (tensor index, cutoff) of the last kept tie
        self.done = k >= total or k <= 0

    @property
    def wants_pass(self) -> bool:
        """Whether (another) pass is needed; pass 3 also ends early, at the last kept tie."""
        return not self.done

    def feed(self, index: int, start: int, delta: Tensor) -> None:
        bits = torch.bitwise_and(delta.reshape(-1).contiguous().view(torch.int32), 0x7FFFFFFF)  # |d|
        if self.pass_no == 1:
            self.fed += bits.numel()
            self._coarse += torch.bincount(bits.bitwise_right_shift_(16), minlength=_COARSE)
        elif self.pass_no == 2:
            inside = bits[(bits >> 16) == self._bucket] & 0xFFFF
            self._fine += torch.bincount(inside, minlength=_FINE)
        elif self._cut is None:
            ties = torch.nonzero(bits == self._tie_bits).reshape(-1)
            if self._seen + ties.numel() >= self._keep:
                self._cut = (index, start + int(ties[self._keep - self._seen - 1]) + 1)
                self.done = True
            self._seen += ties.numel()

    def end_pass(self) -> None:
        if self.done:
            return
        if self.pass_no == 1:
            self._coarse[0] += self.total - self.fed  # entries never fed are zeros
            from_top = self._coarse.flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, self.k))  # first bucket (from the top) reaching k
            self._bucket = _COARSE - 1 - j
            self._above = int(from_top[j - 1]) if j > 0 else 0
            self._fine = torch.zeros(_FINE, dtype=torch.int64)
            if self._bucket == 0:
                self._fine[0] += self.total - self.fed
            self.pass_no = 2
            return
        if self.pass_no == 2:
            from_top = self._fine.flip(0).cumsum(0)
            need = self.k - self._above
            j = int(torch.searchsorted(from_top, need))
            low = _FINE - 1 - j
            self._tie_bits = (self._bucket << 16) | low
            self.value = float(torch.tensor([self._tie_bits], dtype=torch.int32).view(torch.float32))
            greater = self._above + (int(from_top[j - 1]) if j > 0 else 0)
            ties = int(self._fine[low])
            self._keep = self.k - greater
            self._coarse = self._fine = None
            self.pass_no = 3
            # zeros add nothing to a merge; and when every tie fits, no position is needed
            self.done = self.value == 0 or self._keep == ties
            return
        raise RuntimeError(
            f"top-k pass 3 found {self._seen} ties at the threshold, fewer than the {self._keep} pass 2 "
            "counted: the tensors fed differed between passes"
        )

    def threshold(self, index: int, numel: int) -> TrimThreshold | None:
        """Tensor ``index``'s share of the trim (``numel`` its number of entries)."""
        if self.k >= self.total:
            return None
        if self.k <= 0:
            return TrimThreshold(float("inf"), 0)
        assert self.value is not None, "threshold() before the passes ended"
        if self._cut is None:
            return TrimThreshold(self.value, numel)
        j, cut = self._cut
        return TrimThreshold(self.value, numel if index < j else cut if index == j else 0)
