"""Finetuning core of fusion assignments: hyperparameter checks, adapters, the train loop."""

import pytest
import support
import torch

from coldswarm.common.round_options import FusionHyperparameters
from coldswarm.worker.finetune import attach_adapter, lr_at, mean_loss, train
from coldswarm.worker.jobs import Cancelled

#: a gated-GELU T5 with untied embeddings, like the embedded default's (the adapters attach to its modules)
FINETUNE_T5 = dict(
    vocab_size=64, d_model=32, d_ff=64, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False
)


def tiny_t5():
    return support.tiny_t5(**FINETUNE_T5)


def fixed_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 64, (8, 6), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.flip(1)[:, :4].contiguous()}]


def test_unknown_hyperparameter_is_refused_with_the_known_list():
    with pytest.raises(ValueError, match="unknown fusion hyperparameter.*'stpes'"):
        FusionHyperparameters.from_options({"stpes": 3})


@pytest.mark.parametrize("bad", [{"peft_method": "qlora"}, {"steps": 0}, {"fisher_kind": "true"}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        FusionHyperparameters.from_options(bad)


def test_default_lr_depends_on_method():
    assert FusionHyperparameters.from_options({"peft_method": "full"}).lr == 3e-4
    assert FusionHyperparameters.from_options({"peft_method": "lora"}).lr == 1e-3
    assert FusionHyperparameters.from_options({"lr": 0.5}).lr == 0.5


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    hp = FusionHyperparameters.from_options({"steps": 20, "warmup_steps": 4, "lr": 1.0})
    lrs = [lr_at(s, hp) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lr_at(20, hp) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_training_lowers_loss_and_touches_only_trainable_weights(method):
    hp = FusionHyperparameters.from_options({"peft_method": method, "steps": 30, "warmup_steps": 2})
    if method == "ia3":
        hp.lr = 3e-2
    model = attach_adapter(tiny_t5(), hp)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = mean_loss(model, fixed_batches(), "cpu")
    steps = []
    metrics = train(model, fixed_batches(), hp, "cpu", on_step=lambda s, loss, sps: steps.append(s))
    after = mean_loss(model, fixed_batches(), "cpu")
    assert steps == list(range(1, 31))
    assert metrics["train_examples"] == 30 * 8
    assert after < before * 0.9
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} is frozen but changed"
    if method == "full":
        assert not frozen
    else:
        assert frozen, "a PEFT adapter must leave the base frozen"


def test_training_stops_at_a_step_boundary():
    hp = FusionHyperparameters.from_options({"steps": 10})
    model = attach_adapter(tiny_t5(), hp)
    seen = []
    with pytest.raises(Cancelled, match="step 3 of 10"):
        train(
            model,
            fixed_batches(),
            hp,
            "cpu",
            on_step=lambda s, *_: seen.append(s),
            should_stop=lambda: len(seen) >= 3,
        )


def test_empty_shard_is_a_clear_error():
    hp = FusionHyperparameters.from_options({"steps": 2})
    with pytest.raises(ValueError, match="no usable examples"):
        train(attach_adapter(tiny_t5(), hp), [], hp, "cpu")
