"""Version 0 of the embedded default: a fresh model plus the default tokenizer, from the repo alone.

    from coldswarm.lm.default import build_default_version
    build_default_version("runs/v0", size="tiny")      # ~10M params, a few seconds on CPU

The result is an HF directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``spiece.model``) that ``AutoModelForSeq2SeqLM``/``AutoTokenizer.from_pretrained`` load.
It is written to a temp dir beside ``out_dir`` and renamed into place, so a crash never
leaves a half-written version. The coordinator adds its manifest afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from coldswarm.common.durable import fsync_dir, fsync_file

from .corpus import CorpusConfig
from .tokenizer import (
    SPIECE_FILE,
    TokenizerConfig,
    build_default_tokenizer,
    load_tokenizer,
    padded_vocab_size,
)


def _fsync_tree(path: Path) -> None:
    """fsync every file of ``path`` and then ``path`` itself, before it is renamed into place."""
    for f in path.iterdir():
        if f.is_file():
            fsync_file(f)
    fsync_dir(path)


def build_default_version(
    out_dir: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    cache_dir=None,
    corpus_config: CorpusConfig = CorpusConfig(),
    tokenizer_config: TokenizerConfig = TokenizerConfig(),
) -> Path:
    """Write version 0 (model of ``size`` initialised with ``seed`` + default tokenizer) to ``out_dir``.

    ``out_dir`` must not exist yet (versions are immutable). Returns ``out_dir``."""
    from transformers import GenerationConfig

    from .model import build_model

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; a version directory is written once")
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = build_default_tokenizer(cache_dir, corpus_config, tokenizer_config)
    tokenizer = load_tokenizer(tok_dir)
    model = build_model(size, vocab_size=padded_vocab_size(tokenizer), seed=seed)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, max_new_tokens=64
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        for f in tok_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        assert (tmp / SPIECE_FILE).exists()
        _fsync_tree(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
