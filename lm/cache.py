"""Where built artefacts (corpus, tokenizer, task files) are cached.

Everything coldswarm builds from the repo is deterministic, so it is cached under a
directory named by the content hash of its inputs: a stale cache cannot be read by
mistake, and two processes building the same thing at once each write to a temp dir
and rename, so the loser's rename is harmless.

The root is ``$COLDSWARM_CACHE`` if set, else ``~/.cache/coldswarm``; every public
builder also takes ``cache_dir=`` to put it elsewhere (tests use a tmp dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else $COLDSWARM_CACHE, else ~/.cache/coldswarm."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("COLDSWARM_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "coldswarm"


def content_hash(*parts: object) -> str:
    """A short sha256 over JSON-able parts and file contents (``Path`` parts are read)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_dir(kind: str, key: str, build: Callable[[Path], None], cache_dir=None) -> Path:
    """Return ``<root>/<kind>-<key>``, calling ``build(tmp_dir)`` and renaming it there first
    if it does not exist yet. ``build`` writes into an empty temp dir on the same filesystem."""
    root = cache_root(cache_dir)
    final = root / f"{kind}-{key}"
    if (final / ".complete").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build(tmp)
        (tmp / ".complete").write_text(key)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process won the race (final exists and is non-empty): use theirs.
            if not (final / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
