"""Errors raised by coldswarm.fusion.

Every error says what was wrong *and* what to do about it, because the coordinator shows these
messages to people (an admin running ``merge``, a volunteer whose upload was refused).
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class of every error coldswarm.fusion raises on purpose."""


class ContributionError(FusionError, ValueError):
    """A contribution is malformed or does not fit the base model.

    The message always names the contribution (its path or label) and, where it applies, the
    tensor. The coordinator maps it to INVALID_ARGUMENT / FAILED_PRECONDITION.
    """

    def __init__(self, contribution: str, message: str, tensor: str | None = None):
        self.contribution = contribution
        self.tensor = tensor
        where = f"contribution {contribution!r}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {message}")


class CheckpointError(FusionError, ValueError):
    """A model directory or safetensors file cannot be read or written as asked."""


class MergeConfigError(FusionError, ValueError):
    """A merge method name or one of its options is invalid."""


class MergeError(FusionError):
    """The arithmetic of a merge failed (e.g. a singular RegMean system)."""


class CodecError(FusionError, ValueError):
    """Bytes could not be encoded or decoded by a compression codec."""


class DecodedTooLarge(CodecError):
    """Encoded data declares more bytes than the caller allows (``max_output``): a contribution larger than
    the receiver accepts. Checked against the frame's declared length before decoding starts; a stream
    that expands past what its frame declares is a plain :class:`CodecError` (damaged or forged)."""
