"""What tests in every folder share (mergekit's ``tests/common.py`` is the model): a tiny T5 built from a
config (never downloaded), one bounded wait that fails with what it waited for, and a free loopback port.

``import support`` works in every test: pytest puts ``tests/`` (the root conftest's folder) on ``sys.path``.
A script that a test runs as a subprocess adds ``tests/`` itself (see ``tests/worker/swarm_peer.py``).
Fixtures stay in the conftest files; this module holds plain functions, so scripts can use them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# One definition of "a port free right now", the one coldswarm-local starts its processes on.
from coldswarm.coordinator.local_cluster import free_port

__all__ = ["TINY_T5", "free_port", "save_tiny_t5", "tiny_t5", "tiny_t5_config", "wait_for"]

T = TypeVar("T")

#: The default tiny T5: two heads, one encoder and one decoder layer, a few thousand parameters. Tests
#: that need another shape pass overrides (their sizes are part of what they test: keep them).
TINY_T5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)

#: T5's own special ids. transformers 5 no longer defaults decoder_start_token_id, which training needs.
_T5_IDS = dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_t5_config(**overrides):
    """A ``T5Config`` of :data:`TINY_T5` with ``overrides`` (any ``T5Config`` field) applied."""
    from transformers import T5Config

    return T5Config(**{**TINY_T5, **_T5_IDS, **overrides})


def tiny_t5(seed: int = 0, **overrides):
    """A freshly initialised ``T5ForConditionalGeneration`` (train mode, as constructed), the same weights for
    the same ``seed`` and config."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(**overrides))


def save_tiny_t5(out: Path, seed: int = 0, **overrides) -> Path:
    """:func:`tiny_t5` saved as an HF directory (config.json + model.safetensors) at ``out``; returns ``out``."""
    tiny_t5(seed, **overrides).save_pretrained(out)
    return Path(out)


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    poll: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``poll`` seconds until it returns something truthy, and return that.

    After ``timeout`` seconds, fail with ``timed out after Ns waiting for <what>`` and, if given, ``detail()``
    (e.g. the logs of the processes involved). ``predicate`` may itself fail early (a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what}"
            if detail is not None:
                message += "\n" + detail()
            raise AssertionError(message)
        time.sleep(poll)
