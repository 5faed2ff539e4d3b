"""validate_contribution: every violation names the contribution and the tensor."""

from __future__ import annotations

import pytest
import torch

from coldswarm.fusion.checkpoint import CheckpointReader, write_model_dir
from coldswarm.fusion.contribution import ContributionMeta, IA3Meta, LoraMeta, save_contribution
from coldswarm.fusion.errors import ContributionError
from coldswarm.fusion.validate import validate_contribution

BASE = {
    "lin.weight": torch.randn(6, 4),
    "lin.bias": torch.randn(6),
    "ff.weight": torch.randn(3, 6),
    "norm.weight": torch.ones(4),
}
LORA = ContributionMeta(form="lora", base_version=2, lora=LoraMeta(r=2, alpha=4))


@pytest.fixture
def base(tmp_path):
    write_model_dir(tmp_path / "base", BASE)
    with CheckpointReader(tmp_path / "base") as r:
        yield r


def check(tmp_path, base, tensors, meta, **kw):
    p = save_contribution(tmp_path / "c.safetensors", tensors, meta)
    return validate_contribution(p, base, **kw)


def good_lora():
    return {"lora_A/lin": torch.randn(2, 4), "lora_B/lin": torch.randn(6, 2), "fisher/lin.weight": torch.rand(6, 4),
            "gram/lin": torch.eye(4)}  # fmt: skip


def test_valid_contributions_pass(tmp_path, base):
    r = check(tmp_path, base, good_lora(), LORA, base_version=2, require_fisher=True, require_gram=True)
    assert (
        r.form == "lora"
        and r.params_touched == ["lin.weight"]
        and r.fisher_params == 1
        and r.gram_modules == 1
    )
    ia3 = {"ia3/lin": torch.ones(6), "ia3/ff": torch.ones(6)}
    r = check(tmp_path, base, ia3, ContributionMeta(form="ia3", ia3=IA3Meta(feedforward_modules=["ff"])))
    assert r.params_touched == ["ff.weight", "lin.bias", "lin.weight"]
    r = check(
        tmp_path,
        base,
        {"weight/norm.weight": torch.ones(4, dtype=torch.bfloat16)},
        ContributionMeta(form="full"),
    )
    assert r.num_tensors == 1


@pytest.mark.parametrize(
    ("tensors", "meta", "tensor", "message"),
    [
        (
            {"delta/nope.weight": torch.ones(2)},
            ContributionMeta(form="delta"),
            "delta/nope.weight",
            "no parameter",
        ),
        ({"delta/lin.weight": torch.ones(4, 6)}, ContributionMeta(form="delta"), "delta/lin.weight", "shape"),
        (
            {"delta/lin.bias": torch.ones(6, dtype=torch.int32)},
            ContributionMeta(form="delta"),
            "delta/lin.bias",
            "floating",
        ),
        (
            {"delta/lin.bias": torch.tensor([1.0, float("inf"), 0, 0, 0, 0])},
            ContributionMeta(form="delta"),
            "delta/lin.bias",
            "NaN/Inf",
        ),
        ({"lora_A/lin": torch.ones(2, 4)}, LORA, "lora_A/lin", "pairs"),
        ({"lora_A/lin": torch.ones(2, 5), "lora_B/lin": torch.ones(6, 2)}, LORA, "lora_A/lin", "do not fit"),
        ({"lora_A/lin": torch.ones(2, 4), "lora_B/lin": torch.ones(6, 3)}, LORA, "lora_A/lin", "one rank"),
        ({"lora_A/norm": torch.ones(2, 4), "lora_B/norm": torch.ones(4, 2)}, LORA, "lora_A/norm", "2-D"),
        ({**good_lora(), "delta/lin.weight": torch.ones(6, 4)}, LORA, "lora_A/lin", "two values"),
        ({**good_lora(), "fisher/lin.weight": -torch.ones(6, 4)}, LORA, "fisher/lin.weight", "non-negative"),
        ({**good_lora(), "gram/lin": torch.eye(6)}, LORA, "gram/lin", "Gram shape"),
        ({**good_lora(), "gram/lin": -torch.eye(4)}, LORA, "gram/lin", "diagonal"),
        ({"ia3/lin": torch.ones(4)}, ContributionMeta(form="ia3", ia3=IA3Meta()), "ia3/lin", "output dim"),
        (
            {"ia3/ff": torch.ones(3)},
            ContributionMeta(form="ia3", ia3=IA3Meta(feedforward_modules=["ff"])),
            "ia3/ff",
            "input dim",
        ),
        ({"fisher/lin.weight": torch.ones(6, 4)}, ContributionMeta(form="full"), None, "holds no weight/"),
    ],
)
def test_violations_name_contribution_and_tensor(tmp_path, base, tensors, meta, tensor, message):
    with pytest.raises(ContributionError, match=message) as e:
        check(tmp_path, base, tensors, meta)
    assert e.value.contribution.endswith("c.safetensors")
    assert e.value.tensor == tensor
    assert "c.safetensors" in str(e.value) and (tensor is None or tensor in str(e.value))


def test_base_version_and_required_statistics(tmp_path, base):
    with pytest.raises(ContributionError, match="not the current base 3"):
        check(tmp_path, base, good_lora(), LORA, base_version=3)
    no_stats = {k: v for k, v in good_lora().items() if k.startswith("lora")}
    with pytest.raises(ContributionError, match="collect_fisher") as e:
        check(tmp_path, base, no_stats, LORA, require_fisher=True)
    assert e.value.tensor == "fisher/lin.weight"
    with pytest.raises(ContributionError, match="collect_gram"):
        check(tmp_path, base, no_stats, LORA, require_gram=True)


def test_accepts_paths_for_both_arguments(tmp_path, base):
    p = save_contribution(tmp_path / "c.safetensors", good_lora(), LORA)
    assert validate_contribution(str(p), tmp_path / "base").num_tensors == 4
