"""Fixtures for coldswarm.lm tests: one build cache and one tiny version per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lm-cache")


@pytest.fixture(scope="session")
def tokenizer_dir(lm_cache):
    from coldswarm.lm.tokenizer import build_default_tokenizer

    return build_default_tokenizer(lm_cache)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from coldswarm.lm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def version_dir(lm_cache, tmp_path_factory):
    from coldswarm.lm.default import build_default_version

    return build_default_version(tmp_path_factory.mktemp("versions") / "v0", size="tiny", cache_dir=lm_cache)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: the test machine's 2 cores are shared, and OpenMP threads that
    contend for them are several times slower than one thread alone."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
