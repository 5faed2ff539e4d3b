"""Statistics a merge needs, collected by a worker on its own data: diagonal Fisher and RegMean Grams.

Both return a dict of contribution tensors (``fisher/<param>``, ``gram/<module>``) with a ``.meta``
attribute for the contribution's ``statistics`` metadata, so a worker does::

    tensors, meta = from_peft_model(model, num_examples=n, base_version=v)
    fisher = collect_fisher(model, batches, max_examples=256)
    gram = collect_gram(model, batches)
    tensors |= fisher | gram
    meta.statistics = {"fisher": fisher.meta, "regmean": gram.meta}

**Fisher** (Matena & Raffel 2021): F = E_x E_{y ~ p(y|x)} [(d/dtheta log p(y|x))^2], diagonal,
estimated from *per-example* gradients (one backward pass per example and sampled target: the
square of a batch-mean gradient is not a Fisher). ``kind="expected"`` samples each target token
from the model's own predictive distribution (teacher forcing on the true prefix for seq2seq,
so one backward per sample); ``kind="empirical"`` uses the true labels instead (cheaper to reason
about, biased where the model is wrong). Positions with label -100 are ignored.

**Gram** (Jin et al. 2022): for every ``nn.Linear`` whose weight is a model parameter under its own
name, the running mean of x^T x over the layer's input tokens, skipping padding: encoder-side
layers use ``attention_mask``, decoder-side layers of an encoder-decoder model use
``decoder_attention_mask`` (or ``labels != -100``), cross-attention projections of the encoder
output use ``attention_mask``. Accumulated in fp64, returned as fp32.

**PEFT models.** A merge combines *merged* weights (base + adapter), so statistics are collected on
a merged copy of the model (``merge_and_unload`` on a deep copy: this needs memory for a second
copy of the model) and named by base parameter names. By default the Fisher covers the adapter's
target modules' weights (plus ``modules_to_save``); pass ``param_names`` to choose.

Models: anything whose ``forward_fn(model, batch)`` returns logits (B, ..., V) aligned with
``batch["labels"]`` (B, ...); the default calls ``model(**batch).logits``, which fits transformers
models including ``T5ForConditionalGeneration`` on batches of input_ids, attention_mask, labels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor
Batch = Mapping[str, Any]


class StatTensors(dict):
    """A dict of contribution tensors with ``.meta``: what to record under the metadata's ``statistics``."""

    def __init__(self, tensors: Mapping[str, Tensor], meta: dict[str, Any]):
        super().__init__(tensors)
        self.meta = meta


def default_forward(model: nn.Module, batch: Batch) -> Tensor:
    """``model(**batch).logits`` (transformers models; T5 builds its decoder inputs from ``labels``)."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _peft_targets(model: nn.Module) -> list[str]:
    """Base parameter names a PEFT adapter changes: the targeted modules' weights, modules_to_save."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    names = []
    for mod_name, module in model.get_base_model().named_modules():
        if isinstance(module, (LoraLayer, IA3Layer)):
            names.append(f"{mod_name}.weight")
        sets = getattr(module, "modules_to_save", None)
        if isinstance(sets, nn.ModuleDict) and sets:
            names += [f"{mod_name}.{p}" for p, _ in next(iter(sets.values())).named_parameters()]
    return names


def _plain(model: nn.Module) -> tuple[nn.Module, list[str] | None]:
    """The model to collect on (a merged copy for PEFT models) and the PEFT target parameter names."""
    if not _is_peft(model):
        return model, None
    targets = _peft_targets(model)
    merged = copy.deepcopy(model).merge_and_unload()
    return merged, targets


def _slice(batch: Batch, i: int, n: int) -> dict[str, Any]:
    return {
        k: (v[i : i + 1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in batch.items()
    }


def _batch_size(batch: Batch) -> int:
    for key in ("labels", "input_ids"):
        if isinstance(batch.get(key), Tensor):
            return batch[key].shape[0]
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("cannot tell the batch size: a batch needs at least one tensor (e.g. input_ids, labels)")


def _to(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _fisher_parameters(
    params: dict[str, nn.Parameter], targets: list[str] | None, param_names: Iterable[str] | None
) -> list[str]:
    """The parameter names a Fisher covers: ``param_names``, else a PEFT model's targets, else every
    parameter that requires grad; each must exist."""
    if param_names is not None:
        wanted = list(param_names)
    elif targets is not None:
        wanted = targets
    else:
        wanted = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in wanted if n not in params]
    if missing:
        raise ValueError(
            f"no such parameter(s) in the model: {missing[:3]}; use names from model.named_parameters()"
        )
    if not wanted:
        raise ValueError("no parameters to collect a Fisher for; pass param_names")
    return wanted


def _add_example_fisher(
    work: nn.Module,
    ex: dict[str, Any],
    chosen: list[nn.Parameter],
    acc: list[Tensor],
    kind: str,
    num_samples: int,
    forward_fn: Callable[[nn.Module, Batch], Tensor],
    gen: torch.Generator,
) -> bool:
    """Add one example's squared log-likelihood gradients (mean over its sampled targets) to ``acc``.
    Returns False, adding nothing, when the example has no labelled position."""
    if "labels" not in ex:
        raise ValueError("batches need 'labels' (positions to score; -100 is ignored)")
    labels = ex["labels"]
    logits = forward_fn(work, ex)
    mask = labels != -100
    if not bool(mask.any()):
        return False
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (tokens, V)
    samples = num_samples if kind == "expected" else 1
    for s in range(samples):
        if kind == "expected":
            y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(labels.device)
        else:
            y = labels[mask].unsqueeze(-1)
        ll = logp.gather(-1, y).sum()
        grads = torch.autograd.grad(ll, chosen, retain_graph=s < samples - 1, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g.float().pow(2), alpha=1.0 / samples)
    return True


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    kind: str = "expected",
    param_names: Iterable[str] | None = None,
    max_examples: int | None = None,
    num_samples: int = 1,
    forward_fn: Callable[[nn.Module, Batch], Tensor] = default_forward,
    seed: int = 0,
) -> StatTensors:
    """Diagonal Fisher of ``model`` on ``batches``: ``{"fisher/<param>": tensor}`` (fp32, CPU).

    ``kind``: 'expected' (targets sampled from the model) or 'empirical' (true labels).
    ``param_names``: parameters to cover (default: a PEFT model's targets, else every parameter
    that requires grad). ``max_examples``: stop after this many examples (256 is usually plenty:
    the Fisher is a weighting, not a model). ``num_samples``: sampled targets per example for
    'expected' (more = less noise, proportionally slower). ``seed``: sampling is reproducible.
    Cost: one forward and ``num_samples`` backward passes per example.
    """
    if kind not in ("expected", "empirical"):
        raise ValueError(f"kind must be 'expected' or 'empirical' (got {kind!r})")
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    work, targets = _plain(model)
    params = dict(work.named_parameters())
    wanted = _fisher_parameters(params, targets, param_names)
    chosen = [params[n] for n in wanted]
    saved = {n: (p.requires_grad) for n, p in params.items()}
    was_training = work.training
    device = chosen[0].device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in chosen]
    count = 0
    try:
        work.eval()  # no dropout: the Fisher of the deterministic model
        for p in params.values():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        for batch in batches:
            n = _batch_size(batch)
            for i in range(n):
                if max_examples is not None and count >= max_examples:
                    break
                ex = _to(_slice(batch, i, n), device)
                if _add_example_fisher(work, ex, chosen, acc, kind, num_samples, forward_fn, gen):
                    count += 1
            if max_examples is not None and count >= max_examples:
                break
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
        work.train(was_training)
    if count == 0:
        raise ValueError("no examples with labels (all -100?) to collect a Fisher from")
    out = {f"fisher/{n}": (a / count).cpu() for n, a in zip(wanted, acc, strict=True)}
    return StatTensors(
        out, {"kind": kind, "num_examples": count, "num_samples": num_samples if kind == "expected" else 1}
    )


def _canonical_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules whose weight is a parameter under the name '<module>.weight' (not tied away)."""
    params = dict(model.named_parameters())
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and params.get(f"{name}.weight") is m.weight:
            out[name] = m
    return out


def _gram_linears(work: nn.Module, modules: Iterable[str] | None) -> dict[str, nn.Linear]:
    """The linear layers to collect Grams for: ``modules`` (each a linear with its own weight), else all."""
    linears = _canonical_linears(work)
    if modules is None:
        return linears
    wanted = list(modules)
    bad = [m for m in wanted if m not in linears]
    if bad:
        raise ValueError(
            f"not linear layers with their own weight: {bad[:3]}; choose from {sorted(linears)[:5]}..."
        )
    return {m: linears[m] for m in wanted}


def _default_gram_mask(
    linears: dict[str, nn.Linear], is_enc_dec: bool, encoder: nn.Module | None, state: dict[str, Any]
) -> Callable[[str, Tensor, Batch], Tensor | None]:
    """The padding mask of a layer's input tokens (see the module docstring). ``encoder`` is an
    encoder-decoder model's encoder (None if it has none); ``state["enc_ptrs"]`` holds the data pointers
    of this batch's encoder outputs, so that cross-attention projections of them use ``attention_mask``."""
    # Decoder side = every linear outside the encoder: the decoder's layers and the LM head alike.
    encoder_ids = {id(m) for m in encoder.modules()} if encoder is not None else set()

    def default_mask(name: str, x: Tensor, batch: Batch) -> Tensor | None:
        if x.dim() <= 2:
            return None
        enc_mask = batch.get("attention_mask")
        decoder_side = id(linears[name]) not in encoder_ids
        if is_enc_dec and decoder_side and x.data_ptr() not in state["enc_ptrs"]:
            m = batch.get("decoder_attention_mask")
            if m is None and isinstance(batch.get("labels"), Tensor):
                m = batch["labels"] != -100
            return m
        return enc_mask

    return default_mask


def collect_gram(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    modules: Iterable[str] | None = None,
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Batch], Tensor] = default_forward,
    mask_fn: Callable[[str, Tensor, Batch], Tensor | None] | None = None,
) -> StatTensors:
    """RegMean Gram matrices ``{"gram/<module>": mean of x^T x}`` (fp32, (in, in)) for linear layers.

    ``modules``: module paths to cover (default: every linear layer with its own weight).
    ``mask_fn(module_name, x, batch)``: override which tokens count (a bool mask of x.shape[:-1],
    or None for all); the default handles encoder(-decoder) transformers as described above.
    """
    work, _ = _plain(model)
    linears = _gram_linears(work, modules)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(linears, 0)
    state: dict[str, Any] = {"batch": None, "enc_ptrs": set()}
    is_enc_dec = bool(getattr(getattr(work, "config", None), "is_encoder_decoder", False))
    encoder = work.get_encoder() if is_enc_dec and hasattr(work, "get_encoder") else None
    choose = mask_fn or _default_gram_mask(linears, is_enc_dec, encoder, state)

    def hook(name: str):
        def fn(module, args, output):
            x = args[0].detach()
            m = choose(name, x, state["batch"])
            if m is not None:
                if tuple(m.shape) != tuple(x.shape[:-1]):
                    raise ValueError(
                        f"padding mask of shape {tuple(m.shape)} does not fit the input {tuple(x.shape)} of {name}; "
                        "pass mask_fn to collect_gram"
                    )
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return fn

    def enc_hook(module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        state["enc_ptrs"].add(h.data_ptr())

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    if encoder is not None:
        handles.append(encoder.register_forward_hook(enc_hook))
    was_training = work.training
    device = next(work.parameters()).device
    n_batches = 0
    try:
        work.eval()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                b = _to(batch, device)
                state["batch"] = b
                state["enc_ptrs"] = set()
                forward_fn(work, b)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        work.train(was_training)
    out = {f"gram/{n}": (s / max(counts[n], 1)).float().cpu() for n, s in sums.items() if counts[n] > 0}
    if not out:
        raise ValueError("no linear layer saw any (non-padding) input; check the batches and masks")
    return StatTensors(out, {"num_tokens": max(counts.values()), "num_batches": n_batches,
                             "tokens_per_module": {n: c for n, c in counts.items() if c}})  # fmt: skip
