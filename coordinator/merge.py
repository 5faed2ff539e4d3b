"""The one door from the coordinator to the merge math in ``coldswarm.fusion``.

:func:`merge` calls ``coldswarm.fusion.merge.merge_checkpoints`` (fusion's method
registry) when that package is installed. Until then only the plain average is
available, through :func:`_plain_average` below: a stopgap kept deliberately
small (no registry, no options) so there is no second merge framework here.
Deleting it once fusion lands changes nothing else.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coldswarm.coordinator.blobs import fsync_dir, fsync_file
from coldswarm.coordinator.errors import FailedPrecondition

log = logging.getLogger(__name__)


def available_methods() -> list[str]:
    try:
        from coldswarm.fusion.methods import METHODS
    except ImportError:
        return ["average"]
    return sorted(METHODS)


def merge(
    base_dir: Path,
    contributions: list[Path],
    method: str,
    options: dict,
    out_dir: Path,
    keys: list[str] | None = None,
    base_version: int | None = None,
) -> dict:
    """Merge ``contributions`` (safetensors payloads) into ``base_dir``'s weights, written to ``out_dir``.

    ``keys`` name the contributions (the coordinator's contribution ids) in fusion's
    report, whose ``dropped`` list says which screening left out. ``out_dir`` must not
    exist.
    """
    try:
        from coldswarm.fusion.merge import merge_checkpoints
    except ImportError:
        merge_checkpoints = None
    if merge_checkpoints is not None:
        try:
            return merge_checkpoints(
                base_dir,
                [str(p) for p in contributions],
                method,
                options,
                out_dir,
                keys=keys,
                base_version=base_version,
            )
        except ImportError as exc:
            # fusion is installed only in part; the plain average below still serves "average".
            if method != "average":
                raise
            log.warning("coldswarm.fusion cannot merge (%s): using the plain average", exc)
    if method != "average":
        raise FailedPrecondition(
            f"merge method {method!r} needs coldswarm.fusion, which is not installed here; "
            "use method 'average'"
        )
    return _plain_average(Path(base_dir), [Path(p) for p in contributions], Path(out_dir))


def _delta(fh, names: set[str], param: str, base: torch.Tensor, meta: dict) -> torch.Tensor | None:
    """What one contribution changes in ``param`` (None: it does not name it)."""
    if f"weight/{param}" in names:
        return fh.get_tensor(f"weight/{param}").float() - base
    if f"delta/{param}" in names:
        return fh.get_tensor(f"delta/{param}").float()
    module = param[: -len(".weight")] if param.endswith(".weight") else None
    if module and f"lora_A/{module}" in names:
        a = fh.get_tensor(f"lora_A/{module}").float()
        b = fh.get_tensor(f"lora_B/{module}").float()
        lora = meta.get("lora", {})
        r = a.shape[0]
        alpha = float(lora.get("alpha", r))
        scale = alpha / (r**0.5) if lora.get("use_rslora") else alpha / r
        return (b @ a) * scale
    if module and f"ia3/{module}" in names:
        vec = fh.get_tensor(f"ia3/{module}").float().reshape(-1)
        # IA3 scales a feed-forward layer's input (columns), any other layer's output (rows).
        if vec.numel() == base.shape[1] and (vec.numel() != base.shape[0] or _is_ff(module, meta)):
            return base * vec.reshape(1, -1) - base
        return base * vec.reshape(-1, 1) - base
    return None


def _is_ff(module: str, meta: dict) -> bool:
    return module in set(meta.get("ia3", {}).get("feedforward_modules", []))


def _plain_average(base_dir: Path, contributions: list[Path], out_dir: Path) -> dict:
    """Each parameter becomes base + mean over contributions of what each changes there.

    A contribution that does not name a parameter contributes zero change to it
    (docs/INTERFACES.md: unnamed parameters are the base's).
    """
    import json

    handles = [safe_open(str(p), framework="pt") for p in contributions]
    metas = [json.loads((h.metadata() or {}).get("coldswarm", "{}")) for h in handles]
    name_sets = [set(h.keys()) for h in handles]
    out_dir.mkdir(parents=True)
    merged_files = []
    for shard in sorted(base_dir.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as base_fh:
            shard_meta = base_fh.metadata() or {}
            for name in base_fh.keys():
                base = base_fh.get_tensor(name)
                total = torch.zeros_like(base, dtype=torch.float32)
                for fh, names, meta in zip(handles, name_sets, metas, strict=True):
                    d = _delta(fh, names, name, base.float(), meta)
                    if d is not None:
                        total += d
                out[name] = (base.float() + total / len(handles)).to(base.dtype).contiguous()
        dest = out_dir / shard.name
        save_file(out, str(dest), metadata=shard_meta or {"format": "pt"})
        fsync_file(dest)
        merged_files.append(shard.name)
    for p in base_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "coldswarm-manifest.json":
            shutil.copyfile(p, out_dir / p.name)
    for h in handles:
        h.__exit__(None, None, None)
    fsync_dir(out_dir)
    return {"method": "average", "contributions_used": len(contributions), "engine": "coordinator-fallback"}
