"""Fisher and Gram collection: per-example gradients, padding masks, T5 and PEFT models."""

from __future__ import annotations

import copy

import pytest
import torch
from _fusion_models import seq2seq_batches, tiny_t5
from torch import nn

from coldswarm.fusion.checkpoint import write_model_dir
from coldswarm.fusion.contribution import from_peft_model, save_contribution
from coldswarm.fusion.merge import merge_checkpoints
from coldswarm.fusion.statistics import collect_fisher, collect_gram
from coldswarm.fusion.validate import validate_contribution


def softmax_regression(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3, bias=False)


def forward_x(model, batch):
    return model(batch["x"])


def cls_batches(seed=0, n=2, b=4):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(b, 4, generator=g), "labels": torch.randint(0, 3, (b,), generator=g)}
        for _ in range(n)
    ]


def test_empirical_fisher_is_mean_of_per_example_squared_gradients():
    model = softmax_regression()
    batches = cls_batches()
    got = collect_fisher(model, batches, kind="empirical", forward_fn=forward_x)
    grads = []
    for batch in batches:
        for x, y in zip(batch["x"], batch["labels"], strict=True):
            model.zero_grad()
            torch.log_softmax(model(x[None]), -1)[0, y].backward()
            grads.append(model.weight.grad.clone())
    expected = torch.stack(grads).pow(2).mean(0)
    torch.testing.assert_close(got["fisher/weight"], expected)
    assert not torch.allclose(
        got["fisher/weight"], torch.stack(grads).mean(0).pow(2)
    )  # not the batch-mean square
    assert got.meta == {"kind": "empirical", "num_examples": 8, "num_samples": 1}


def test_expected_fisher_matches_the_analytic_softmax_fisher():
    """For logits W x, E_{y~p}[(d log p_y / dW_kj)^2] = p_k (1 - p_k) x_j^2."""
    model = softmax_regression(1)
    batches = cls_batches(1, n=1, b=2)
    got = collect_fisher(model, batches, kind="expected", num_samples=1500, forward_fn=forward_x, seed=3)
    x = batches[0]["x"]
    p = torch.softmax(model(x), -1).detach()
    analytic = ((p * (1 - p))[:, :, None] * x[:, None, :] ** 2).mean(0)
    torch.testing.assert_close(got["fisher/weight"], analytic, rtol=0.15, atol=2e-3)
    again = collect_fisher(model, batches, kind="expected", num_samples=3, forward_fn=forward_x, seed=5)
    same = collect_fisher(model, batches, kind="expected", num_samples=3, forward_fn=forward_x, seed=5)
    torch.testing.assert_close(again["fisher/weight"], same["fisher/weight"])  # seeded


def test_fisher_on_t5_ignores_masked_labels_and_restores_the_model():
    model = tiny_t5().train()
    batches = seq2seq_batches()
    names = ["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"]
    f = collect_fisher(model, batches, kind="empirical", param_names=names, max_examples=4)
    assert set(f) == {f"fisher/{n}" for n in names} and f.meta["num_examples"] == 4
    assert all(bool((t >= 0).all()) and bool(t.sum() > 0) for t in f.values())
    assert model.training and all(p.requires_grad for p in model.parameters())  # state restored
    full = collect_fisher(model, batches, kind="expected")
    assert len(full) == len(list(model.parameters()))


def test_gram_is_mean_of_xtx_over_non_padding_tokens():
    mlp = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = collect_gram(mlp, [{"x": x, "attention_mask": mask}], forward_fn=forward_x)
    kept = x[mask.bool()]
    torch.testing.assert_close(g["gram/0"], kept.T @ kept / 5)
    h = torch.relu(mlp[0](kept)).detach()
    torch.testing.assert_close(g["gram/2"], h.T @ h / 5, rtol=1e-5, atol=1e-6)
    assert g.meta["num_tokens"] == 5


def test_gram_on_t5_uses_encoder_and_decoder_masks():
    model = tiny_t5()
    batches = seq2seq_batches(n_batches=1)
    g = collect_gram(model, batches)
    assert "gram/lm_head" not in g  # tied to shared.weight: not a parameter of its own
    assert "gram/encoder.block.0.layer.0.SelfAttention.q" in g
    tokens = g.meta["tokens_per_module"]
    enc_tokens = int(batches[0]["attention_mask"].sum())
    dec_tokens = int((batches[0]["labels"] != -100).sum())
    assert tokens["encoder.block.0.layer.0.SelfAttention.q"] == enc_tokens
    assert tokens["decoder.block.0.layer.1.EncDecAttention.k"] == enc_tokens  # reads the encoder output
    assert tokens["decoder.block.0.layer.1.EncDecAttention.q"] == dec_tokens
    assert tokens["decoder.block.0.layer.0.SelfAttention.q"] == dec_tokens
    # padded positions do not count: changing their ids leaves the encoder Grams unchanged
    other = copy.deepcopy(batches)
    other[0]["input_ids"][0, 5:] = 7
    g2 = collect_gram(model, other)
    torch.testing.assert_close(
        g2["gram/encoder.block.1.layer.1.DenseReluDense.wo"],
        g["gram/encoder.block.1.layer.1.DenseReluDense.wo"],
    )


def test_gram_of_an_untied_lm_head_counts_decoder_tokens():
    # The default coldswarm model (and Flan-T5) has its own lm_head: a decoder-side input, not the encoder's.
    model = tiny_t5()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    batches = seq2seq_batches(n_batches=1)
    g = collect_gram(model, batches)
    dec_tokens = int((batches[0]["labels"] != -100).sum())
    assert g.meta["tokens_per_module"]["lm_head"] == dec_tokens
    assert g["gram/lm_head"].shape == (model.config.d_model, model.config.d_model)


def test_peft_lora_statistics_end_to_end(tmp_path):
    """Worker side (adapter + Fisher + Gram -> contribution) to coordinator side (validate, merge)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_t5()
    base_dir = tmp_path / "base"
    write_model_dir(
        base_dir, {k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    )
    paths = []
    for i in range(2):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"],
                                                                    init_lora_weights=False))  # fmt: skip
        batches = seq2seq_batches(seed=i)
        tensors, meta = from_peft_model(peft_model, num_examples=6, base_version=0)
        fisher = collect_fisher(peft_model, batches, max_examples=3)
        gram = collect_gram(peft_model, batches)
        assert set(fisher) == {
            f"fisher/{m[len('lora_A/') :]}.weight" for m in tensors if m.startswith("lora_A/")
        }
        tensors |= fisher | gram
        meta.statistics = {"fisher": fisher.meta, "regmean": {"num_tokens": gram.meta["num_tokens"]}}
        paths.append(save_contribution(tmp_path / f"c{i}.safetensors", tensors, meta))
        validate_contribution(paths[-1], base_dir, base_version=0, require_fisher=True, require_gram=True)
    for method in ("fisher", "regmean"):
        report = merge_checkpoints(base_dir, paths, method, {"weighting": "examples"}, tmp_path / method)
        assert report["tensors"]["merged"] == 2 * 2 + 2 * 1 + 2 * 1  # q, v in 2 enc blocks + dec self + cross
        assert report["regmean_fallback_to_average"] == []


def test_bad_arguments_fail_clearly():
    model = softmax_regression()
    with pytest.raises(ValueError, match="kind"):
        collect_fisher(model, cls_batches(), kind="observed", forward_fn=forward_x)
    with pytest.raises(ValueError, match="no such parameter"):
        collect_fisher(model, cls_batches(), param_names=["nope"], forward_fn=forward_x)
    with pytest.raises(ValueError, match="labels"):
        collect_fisher(model, [{"x": torch.randn(2, 4)}], forward_fn=forward_x)
    with pytest.raises(ValueError, match="not linear layers"):
        collect_gram(model, cls_batches(), modules=["nope"], forward_fn=forward_x)
