"""The one door from the coordinator to the merge math in ``coldswarm.fusion`` (its method registry)."""

from __future__ import annotations

from pathlib import Path

from coldswarm.fusion.merge import merge_checkpoints
from coldswarm.fusion.methods import METHODS


def available_methods() -> list[str]:
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
    return merge_checkpoints(
        base_dir,
        [str(p) for p in contributions],
        method,
        options,
        out_dir,
        keys=keys,
        base_version=base_version,
    )
