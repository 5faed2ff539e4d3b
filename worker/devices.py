"""Device-specific choices for training: autocast, optimiser, and 4-bit base loading.

CPU (the default, and what CI tests): fp32 and ``torch.optim.AdamW``; with ``cpu_bf16``, bf16 autocast
where the CPU computes bf16 natively (AVX512-BF16 or AMX). On one Zen 4 core a ``tiny`` full-finetuning
step at batch 32 took 0.75 s in bf16 against 1.27 s in fp32, to the same validation loss
(``benchmarks/cpu_bf16.py``); a CPU without those instructions would emulate bf16, slower than fp32, so
there it stays fp32.
CUDA: bf16 autocast where the GPU supports it, ``bitsandbytes`` 8-bit AdamW (a
quarter of AdamW's state memory), and, for QLoRA-style shards where GPU memory
is short, the base loaded in 4-bit NF4 with LoRA adapters trained on top. The
CUDA paths are tested only where a GPU is present (``pytest -m gpu``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), so that bf16 autocast is faster
    than fp32 rather than emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu, so guarded
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: str, cpu_bf16: bool = False):
    """bf16 autocast on a CUDA device that supports it, and on a CPU that computes bf16 natively when
    ``cpu_bf16`` asks for it; a no-op elsewhere (fp32). Weights and optimiser state stay fp32 either way."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device == "cpu" and cpu_bf16 and cpu_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, device: str, lr: float, weight_decay: float = 0.0, eight_bit: bool = True):
    """8-bit AdamW from bitsandbytes on CUDA (if installed and asked for); torch AdamW otherwise."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if device == "cuda" and eight_bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        except Exception as exc:  # a broken bitsandbytes install must not stop a volunteer
            log.warning("bitsandbytes 8-bit AdamW unavailable (%s); using torch AdamW", exc)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def load_seq2seq(version_dir: Path, device: str, load_in_4bit: bool = False):
    """The base model for training; in 4-bit NF4 on CUDA when asked (QLoRA), fp32 otherwise."""
    from transformers import AutoModelForSeq2SeqLM

    if load_in_4bit:
        if device != "cuda":
            raise ValueError("4-bit loading needs a CUDA device; drop load_in_4bit or run with --device cuda")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForSeq2SeqLM.from_pretrained(
            version_dir, quantization_config=quant, device_map={"": 0}
        )
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model)
    model = AutoModelForSeq2SeqLM.from_pretrained(version_dir, dtype=torch.float32)
    return model.to(device)
