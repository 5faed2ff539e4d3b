"""Atomic writes: all or nothing, owner-only when private, no temp file left behind."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from coldswarm.common.durable import atomic_write_bytes, write_private
from coldswarm.common.hashing import sha256_file


def test_write_private_is_owner_only_and_replaces_atomically(tmp_path):
    path = tmp_path / "deep" / "admin.token"
    write_private(path, "first\n")
    assert path.read_text() == "first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)  # even over a file someone opened up, the new content is private again
    write_private(path, "second\n")
    assert path.read_text() == "second\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["admin.token"]


def test_a_failed_write_leaves_the_old_content_and_no_temp_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # not bytes: the write fails after the temp file exists
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_sha256_of_a_prefix(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abcdef")
    assert sha256_file(path) == hashlib.sha256(b"abcdef").hexdigest()
    assert sha256_file(path, limit=3) == hashlib.sha256(b"abc").hexdigest()
