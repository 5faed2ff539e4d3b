"""Device choices: CPU paths run everywhere; CUDA paths (bf16, 8-bit AdamW, 4-bit loading) need a GPU."""

import pytest
import torch
from support import save_tiny_t5

from coldswarm.worker import daemon
from coldswarm.worker.devices import autocast, cpu_bf16_supported, load_seq2seq, make_optimizer

#: a gated-GELU T5 with untied embeddings, like the embedded default's (what the device paths must load)
DEVICE_T5 = dict(
    vocab_size=128,
    d_model=32,
    d_ff=64,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)


def tiny_t5(tmp_path):
    return save_tiny_t5(tmp_path, **DEVICE_T5)


def train_step(model, device):
    opt = make_optimizer(model.parameters(), device, lr=1e-3)
    batch = {
        "input_ids": torch.randint(2, 128, (2, 8), device=device),
        "labels": torch.randint(2, 128, (2, 4), device=device),
    }
    with autocast(device):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    return opt, loss


def test_cpu_uses_fp32_and_torch_adamw(tmp_path):
    model = load_seq2seq(tiny_t5(tmp_path), "cpu")
    assert next(model.parameters()).dtype == torch.float32
    opt, loss = train_step(model, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert torch.isfinite(loss)


def test_cpu_bf16_computes_in_bf16_where_native_and_fp32_elsewhere():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32  # not asked: fp32
    with autocast("cpu", cpu_bf16=True):
        out = a @ b
    assert out.dtype == (torch.bfloat16 if cpu_bf16_supported() else torch.float32)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_cpu_bf16_training_keeps_fp32_weights_and_lowers_the_loss(tmp_path):
    model = load_seq2seq(tiny_t5(tmp_path), "cpu")
    opt = make_optimizer(model.parameters(), "cpu", lr=3e-3)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 128, (4, 8), generator=g),
        "labels": torch.randint(2, 128, (4, 4), generator=g),
    }
    losses = []
    for _ in range(20):
        with autocast("cpu", cpu_bf16=True):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0]


def test_cpu_bf16_flag_applies_only_to_a_native_cpu(monkeypatch):
    assert daemon._cpu_bf16(False, "cpu") is False
    assert daemon._cpu_bf16(True, "cuda") is False  # CUDA follows its own bf16 rule
    assert daemon._cpu_bf16(True, "cpu") is cpu_bf16_supported()
    monkeypatch.setattr("coldswarm.worker.devices.cpu_bf16_supported", lambda: False)
    assert daemon._cpu_bf16(True, "cpu") is False


def test_4bit_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        load_seq2seq(tiny_t5(tmp_path), "cpu", load_in_4bit=True)


def test_nothing_to_train_is_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer([p], "cpu", lr=1e-3)


@pytest.mark.gpu
def test_cuda_bf16_autocast_and_8bit_adamw(tmp_path):
    import bitsandbytes as bnb

    model = load_seq2seq(tiny_t5(tmp_path), "cuda")
    opt, loss = train_step(model, "cuda")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_cuda_4bit_base_with_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load_seq2seq(tiny_t5(tmp_path), "cuda", load_in_4bit=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model, "cuda")
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "LoRA weights on a 4-bit base did not train"
