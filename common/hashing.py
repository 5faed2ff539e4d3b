"""sha256 of files, read in blocks (a model shard does not have to fit in memory)."""

from __future__ import annotations

import hashlib
import os

HASH_BLOCK = 4 * 1024 * 1024


def hash_prefix(path: str | os.PathLike, limit: int | None = None):
    """A running sha256 object over the first ``limit`` bytes of ``path`` (all when None)."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as fh:
        while remaining is None or remaining > 0:
            n = HASH_BLOCK if remaining is None else min(HASH_BLOCK, remaining)
            block = fh.read(n)
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hex sha256 of a file (of its first ``limit`` bytes when given)."""
    return hash_prefix(path, limit).hexdigest()
