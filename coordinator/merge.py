"""The one door from the coordinator to the merge math in ``coldswarm.fusion`` (its method and codec
registries)."""

from __future__ import annotations

from pathlib import Path

from coldswarm.common.quoting import bounded
from coldswarm.common.round_options import statistics_needed
from coldswarm.coordinator.errors import InvalidArgument
from coldswarm.fusion.codecs import CODECS
from coldswarm.fusion.errors import MergeConfigError
from coldswarm.fusion.merge import MergeOptions, merge_checkpoints
from coldswarm.fusion.methods import METHODS


def available_methods() -> list[str]:
    return sorted(METHODS)


def statistics_for(method: str) -> list[str]:
    """The statistics a merge with ``method`` needs from every worker, from the registry's flags
    (none for a name the registry does not hold: OpenRound refuses that name first)."""
    entry = METHODS.get(method)
    if entry is None:
        return []
    return statistics_needed(fisher=entry.needs_fisher, gram=entry.needs_gram)


def check_merge_options(method: str, options: dict) -> None:
    """Refuse (InvalidArgument) merge options that fusion's merge would refuse, as it will read them: the
    driver's own fields and the method's (unknown names with the closest known one)."""
    try:
        parsed = MergeOptions.parse(options)
        METHODS[method].make_config(parsed.method)
    except (MergeConfigError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"merge options: {bounded(str(exc), 400)}") from None


def codec_names() -> list[str]:
    """The codecs a contribution may be encoded with (workers encode, the coordinator decodes)."""
    return sorted(CODECS)


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
