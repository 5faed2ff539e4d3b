"""The model family: T5 v1.1-style encoder-decoders built from configs in ``lm/configs/``.

``tiny`` (~10M parameters: d_model 256, 4+4 layers) is for tests and the demo; ``small``
(~60M: d_model 512, 6+6 layers) for real machines. Both are gated-GELU with an untied
``lm_head``, no dropout (pretraining on fresh data does not need it; finetuning code may
set it), pad (0) as ``decoder_start_token_id``.

Any local HF T5/Flan-T5 directory works in place of a built-in config:
:func:`load_model` just calls ``from_pretrained(dir, local_files_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SIZES = ("tiny", "small")


def model_config(size: str = "tiny", vocab_size: int | None = None):
    """A ``T5Config`` for a built-in size, with ``vocab_size`` overridden if given."""
    from transformers import T5Config

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {SIZES} or pass a local HF directory")
    with open(CONFIG_DIR / f"{size}.json", encoding="utf-8") as f:
        cfg = json.load(f)
    if vocab_size is not None:
        cfg["vocab_size"] = int(vocab_size)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    return T5Config(**cfg, architectures=["T5ForConditionalGeneration"])


def reinit_lm_head(model, seed: int | None = None) -> None:
    """Give the model its own (untied) ``lm_head`` with std d_model^-0.5.

    Why untie by hand: transformers 5.x's ``T5Config`` always sets
    ``tie_word_embeddings=True`` (it only remembers ``False`` as
    ``scale_decoder_outputs=False``, the v1.1 behaviour), so a fresh model shares
    ``lm_head`` with the std-1.0 embedding. Its logits then have std ~sqrt(d_model) and
    the first loss is far above ln(vocab) (~120 on a 4k vocab). With a separate head of
    std d_model^-0.5 the logits have std ~1 and the first loss is near ln(vocab).
    Saved checkpoints hold both tensors; loading them unties them again (transformers
    warns that it will not tie them, as it does for Flan-T5)."""
    import torch

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    d_model = model.config.d_model
    shape = model.lm_head.weight.shape
    weight = torch.randn(shape, generator=gen, dtype=torch.float32) * d_model**-0.5
    model.lm_head.weight = torch.nn.Parameter(weight.to(model.shared.weight.dtype))
    model.config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)


def build_model(size: str = "tiny", vocab_size: int | None = None, seed: int = 0):
    """A freshly initialised ``T5ForConditionalGeneration`` of a built-in size (deterministic in ``seed``)."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(model_config(size, vocab_size))
    reinit_lm_head(model, seed)
    return model


def load_model(path: str | os.PathLike, **kwargs):
    """Load a version dir or any local HF seq2seq dir (no hub access)."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True, **kwargs)


def num_parameters(model) -> int:
    """Number of parameters (shared embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
