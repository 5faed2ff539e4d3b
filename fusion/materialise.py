"""Turn any contribution form into full fp32 weights, one base tensor (or row range) at a time.

* ``weight/<p>``: the tensor itself.
* ``delta/<p>``: base + delta.
* LoRA on module ``m`` (PEFT ``get_delta_weight``): base + B @ A * s, with s = alpha / r, or
  alpha / sqrt(r) with rank-stabilised LoRA; transposed when ``fan_in_fan_out`` (weight is (in, out)).
* IA3 on module ``m`` (PEFT ``IA3Layer.merge``): the weight times the learned vector, broadcast along
  the input dim for feedforward modules and along the output dim otherwise; a non-feedforward
  module's bias is scaled too.

The mapping from base parameter to "where its new value comes from" is built once per contribution
(:class:`Materialiser`); the values are computed only for the rows the merge asks for, so a LoRA on
a 32k x 1k embedding never materialises more than one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .contribution import Contribution

Tensor = torch.Tensor


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) when rank-stabilised (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(a: Tensor, b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """The weight update of one LoRA module: (B @ A) * scaling, transposed for fan_in_fan_out."""
    d = (b.float() @ a.float()) * scaling
    return d.T if fan_in_fan_out else d


class Materialiser:
    """Where each base parameter's value comes from in one contribution.

    ``plan[param]`` is one of ``('weight', name)``, ``('delta', name)``, ``('lora', module)``,
    ``('ia3', module)``, ``('ia3_bias', module)``. Parameters absent from the plan are untouched.
    The plan is built from names only; :mod:`coldswarm.fusion.validate` checks shapes beforehand.
    """

    def __init__(self, contribution: Contribution, base_names: Iterable[str]):
        self.c = contribution
        base = set(base_names)
        meta = contribution.meta
        plan: dict[str, tuple[str, str]] = {}
        for p, name in contribution.entries("weight").items():
            plan[p] = ("weight", name)
        for p, name in contribution.entries("delta").items():
            plan[p] = ("delta", name)
        for m in contribution.entries("lora_A"):
            plan[f"{m}.weight"] = ("lora", m)
        ff = set(meta.ia3.feedforward_modules) if meta.ia3 else set()
        for m in contribution.entries("ia3"):
            plan[f"{m}.weight"] = ("ia3", m)
            if m not in ff and f"{m}.bias" in base:
                plan[f"{m}.bias"] = ("ia3_bias", m)
        self.plan = plan
        self.feedforward = ff
        self.fishers = contribution.entries("fisher")
        self.grams = contribution.entries("gram")

    @property
    def touched(self) -> set[str]:
        return set(self.plan)

    def _lora_scaling(self, module: str) -> float:
        lm = self.c.meta.lora
        assert lm is not None
        r = self.c.shape(f"lora_A/{module}")[0]
        return lora_scaling(lm.alpha_pattern.get(module, lm.alpha), r, lm.use_rslora)

    def delta_rows(self, param: str, base_rows: Tensor, start: int, stop: int) -> Tensor | None:
        """theta - base for rows start:stop of ``param`` (fp32), or None when untouched."""
        step = self.plan.get(param)
        if step is None:
            return None
        kind, ref = step
        if kind == "weight":
            return self.c.get_rows(ref, start, stop) - base_rows
        if kind == "delta":
            return self.c.get_rows(ref, start, stop)
        if kind == "lora":
            lm = self.c.meta.lora
            a = self.c.get(f"lora_A/{ref}")
            b = self.c.get(f"lora_B/{ref}")
            s = self._lora_scaling(ref)
            if lm.fan_in_fan_out:  # weight (in, out) = (B @ A)^T; its rows start:stop use A's columns
                return (a[:, start:stop].T @ b.T) * s
            return (b[start:stop] @ a) * s
        return self._ia3_rows(step, base_rows, start, stop) - base_rows

    def _ia3_rows(self, step: tuple[str, str], base_rows: Tensor, start: int, stop: int) -> Tensor:
        kind, ref = step
        vec = self.c.get(f"ia3/{ref}").reshape(-1)
        if kind == "ia3_bias":
            return base_rows * vec[start:stop]
        fifo = self.c.meta.ia3.fan_in_fan_out if self.c.meta.ia3 else False
        scale_dim1 = (ref in self.feedforward) != fifo
        return base_rows * (vec[None, :] if scale_dim1 else vec[start:stop, None])

    def theta_rows(
        self, param: str, base_rows: Tensor, start: int, stop: int, out: Tensor | None = None
    ) -> Tensor:
        """The contribution's full fp32 value of rows start:stop of ``param`` (the base's if untouched).

        With ``out`` (a contiguous fp32 tensor of the rows' shape) the value is written there and
        ``out`` is returned: the merge driver reuses one buffer per contribution across chunks.
        """
        step = self.plan.get(param)
        kind = step[0] if step else None
        if out is None:
            if kind is None:
                return base_rows
            if kind == "weight":
                return self.c.get_rows(step[1], start, stop)
            if kind in ("ia3", "ia3_bias"):  # multiply directly: W * v, not W + W * (v - 1)
                return self._ia3_rows(step, base_rows, start, stop)
            return base_rows + self.delta_rows(param, base_rows, start, stop)
        if kind is None:
            return out.copy_(base_rows)
        if kind == "weight":
            return self.c.get_rows(step[1], start, stop, out=out)
        if kind == "delta":
            return self.c.get_rows(step[1], start, stop, out=out).add_(base_rows)
        if kind in ("ia3", "ia3_bias"):
            return out.copy_(self._ia3_rows(step, base_rows, start, stop))
        return torch.add(base_rows, self.delta_rows(param, base_rows, start, stop), out=out)

    def theta(self, param: str, base: Tensor) -> Tensor:
        """The contribution's full fp32 value of ``param`` given the base's."""
        rows = base.reshape(1) if base.dim() == 0 else base
        out = self.theta_rows(param, rows, 0, rows.shape[0])
        return out.reshape(base.shape)
