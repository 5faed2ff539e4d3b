"""Fixtures for fusion tests: tiny models built from configs (never downloaded)."""

from __future__ import annotations

import pytest
from _fusion_models import tiny_t5


@pytest.fixture
def t5_dir(tmp_path):
    model = tiny_t5()
    d = tmp_path / "base"
    model.save_pretrained(d)
    (d / "spiece.model").write_bytes(b"tokenizer bytes")
    (d / "coldswarm-manifest.json").write_text("{}")
    return d
