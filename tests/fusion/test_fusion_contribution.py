"""Contribution payloads and LoRA / IA3 materialisation checked against PEFT's merge_and_unload()."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _fusion_models import tiny_t5
from safetensors import safe_open

from coldswarm.fusion.checkpoint import CheckpointReader, write_model_dir
from coldswarm.fusion.contribution import (
    ContributionMeta,
    LoraMeta,
    from_peft_model,
    open_contribution,
    save_contribution,
)
from coldswarm.fusion.errors import ContributionError
from coldswarm.fusion.materialise import Materialiser, lora_delta, lora_scaling
from coldswarm.fusion.merge import merge_checkpoints


def _merged_reference(peft_model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _check_materialisation(base_model, peft_model, tmp_path, **merge_kw):
    """One contribution through the merge driver must equal PEFT's own merge of the adapter."""
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        write_model_dir(base_dir, {k: v.contiguous() for k, v in base_model.state_dict().items()})
    tensors, meta = from_peft_model(peft_model, num_examples=10, base_version=0)
    path = save_contribution(tmp_path / f"c-{len(list(tmp_path.iterdir()))}.safetensors", tensors, meta)
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    merge_checkpoints(base_dir, [path], "average", {}, out, **merge_kw)
    ref = _merged_reference(peft_model)
    with CheckpointReader(out) as r:
        assert set(r.names()) <= set(ref)
        for n in r.names():
            torch.testing.assert_close(r.get(n), ref[n], rtol=1e-6, atol=1e-6, msg=n)
    return tensors, meta


def test_lora_on_t5_matches_merge_and_unload(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_t5()
    base_state = copy.deepcopy(base)
    for rslora in (False, True):
        torch.manual_seed(1)
        cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q", "v", "wi"], init_lora_weights=False,
                         use_rslora=rslora, alpha_pattern={"wi": 3.0})  # fmt: skip
        peft_model = get_peft_model(copy.deepcopy(base_state), cfg)
        tensors, meta = _check_materialisation(base_state, peft_model, tmp_path)
        assert meta.form == "lora" and meta.lora.r == 4 and meta.lora.use_rslora is rslora
        assert "lora_A/encoder.block.0.layer.0.SelfAttention.q" in tensors
        assert meta.lora.alpha_pattern["encoder.block.1.layer.1.DenseReluDense.wi"] == 3.0


class Conv1DNet(torch.nn.Module):
    """A GPT-2-style block: Conv1D stores its weight as (in, out) -> PEFT's fan_in_fan_out."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(6, 4)  # nf=out=6, nx=in=4
        self.proj = torch.nn.Linear(6, 5)
        self.ff = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.ff(self.proj(self.c_attn(x)))


def test_lora_fan_in_fan_out_matches_merge_and_unload(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Conv1DNet()
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    _, meta = _check_materialisation(base, peft_model, tmp_path)
    assert meta.lora.fan_in_fan_out


def test_ia3_matches_merge_and_unload_including_bias(tmp_path):
    from peft import IA3Config, get_peft_model

    torch.manual_seed(0)
    base = Conv1DNet()
    cfg = IA3Config(target_modules=["proj", "ff"], feedforward_modules=["ff"])
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "ia3_l" in n:
                p.normal_(1.0, 0.2)
    tensors, meta = _check_materialisation(base, peft_model, tmp_path)
    assert meta.ia3.feedforward_modules == ["ff"]
    assert tensors["ia3/proj"].shape == (5,) and tensors["ia3/ff"].shape == (5,)


def test_ia3_on_t5_matches_merge_and_unload(tmp_path):
    from peft import IA3Config, get_peft_model

    base = tiny_t5()
    cfg = IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "ia3_l" in n:
                p.normal_(1.0, 0.2)
    _check_materialisation(base, peft_model, tmp_path)


def test_lora_delta_formula():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    assert lora_scaling(16, 4, False) == 4.0 and lora_scaling(16, 4, True) == 8.0
    torch.testing.assert_close(lora_delta(a, b, 2.0), b @ a * 2)
    torch.testing.assert_close(lora_delta(a, b, 2.0, fan_in_fan_out=True), (b @ a * 2).T)


def test_save_open_round_trip_and_metadata(tmp_path):
    meta = ContributionMeta(form="lora", base_version=3, num_examples=1200, lora=LoraMeta(r=2, alpha=4),
                            statistics={"fisher": {"kind": "expected", "num_examples": 8}},
                            metrics={"val_loss_after": 1.4}, extra={"future_key": 1})  # fmt: skip
    tensors = {"lora_A/m": torch.ones(2, 3), "lora_B/m": torch.zeros(4, 2, dtype=torch.bfloat16),
               "fisher/m.weight": torch.ones(4, 3)}  # fmt: skip
    p = save_contribution(tmp_path / "c.safetensors", tensors, meta)
    with safe_open(str(p), "pt") as f:  # a plain safetensors file, one 'coldswarm' metadata key
        assert set(f.metadata()) == {"coldswarm"}
        raw = json.loads(f.metadata()["coldswarm"])
    assert (
        raw["format"] == 1
        and raw["form"] == "lora"
        and raw["lora"] == {"r": 2, "alpha": 4, "fan_in_fan_out": False, "use_rslora": False}
    )
    with open_contribution(p, label="c-7") as c:
        assert c.meta == meta
        assert c.entries("lora_A") == {"m": "lora_A/m"}
        assert c.get("lora_B/m").dtype == torch.float32  # arithmetic is fp32
        assert c.dtype("lora_B/m") == torch.bfloat16
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_bad_payloads_are_refused_with_the_contribution_named(tmp_path):
    with pytest.raises(ContributionError, match="namespace"):
        save_contribution(
            tmp_path / "x.safetensors", {"q.weight": torch.ones(1)}, ContributionMeta(form="full")
        )
    from safetensors.torch import save_file

    save_file({"weight/a": torch.ones(1)}, tmp_path / "nometa.safetensors")
    with pytest.raises(ContributionError, match=r"contribution 'up-1'.*no 'coldswarm' metadata"):
        open_contribution(tmp_path / "nometa.safetensors", label="up-1")
    save_file(
        {"weight/a": torch.ones(1)},
        tmp_path / "v2.safetensors",
        metadata={"coldswarm": '{"format": 2, "form": "full"}'},
    )
    with pytest.raises(ContributionError, match="format 2"):
        open_contribution(tmp_path / "v2.safetensors")
    save_file(
        {"weight/a": torch.ones(1)},
        tmp_path / "f.safetensors",
        metadata={"coldswarm": '{"format": 1, "form": "lora"}'},
    )
    with pytest.raises(ContributionError, match="needs a 'lora' section"):
        open_contribution(tmp_path / "f.safetensors")
    save_file(
        {"oops/a": torch.ones(1)},
        tmp_path / "ns.safetensors",
        metadata={"coldswarm": '{"format": 1, "form": "full"}'},
    )
    with pytest.raises(ContributionError, match=r"tensor 'oops/a'"):
        open_contribution(tmp_path / "ns.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ContributionError, match="cannot be read"):
        open_contribution(tmp_path / "junk.safetensors")


def test_materialiser_plan(tmp_path):
    meta = ContributionMeta(form="lora", lora=LoraMeta(r=1, alpha=1))
    p = save_contribution(tmp_path / "c.safetensors", {"lora_A/m": torch.ones(1, 2), "lora_B/m": torch.ones(3, 1),
                                                      "delta/n.bias": torch.ones(3)}, meta)  # fmt: skip
    with open_contribution(p) as c:
        mat = Materialiser(c, ["m.weight", "n.bias", "o.weight"])
        assert mat.touched == {"m.weight", "n.bias"}
        base = torch.zeros(3, 2)
        torch.testing.assert_close(mat.theta("m.weight", base), torch.ones(3, 2))
        torch.testing.assert_close(mat.theta_rows("m.weight", base[1:], 1, 3), torch.ones(2, 2))
        assert torch.equal(mat.theta("o.weight", base), base)  # untouched: the base
