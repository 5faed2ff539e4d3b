"""Tokenizer round trip, the model family's init, and version 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coldswarm.lm.corpus import CorpusConfig, iter_documents
from coldswarm.lm.model import build_model, load_model, num_parameters
from coldswarm.lm.tokenizer import NUM_SENTINELS, SPIECE_FILE, load_tokenizer, padded_vocab_size, special_ids


def _lines(n=1000):
    docs = list(iter_documents(CorpusConfig(), "heldout"))
    sents = [s.strip() + "." for d in docs for s in d.split(".") if s.strip()]
    extra = [
        "Hello, World! (unseen) café naïve 123456",
        "  spaces   inside\tand tabs  ",
        "<extra_id_3> [NLU] mixed",
    ]
    return (extra + sents)[:n]


def test_tokenizer_ids_and_special_tokens(tokenizer, tokenizer_dir):
    from transformers import T5Tokenizer

    assert isinstance(tokenizer, T5Tokenizer)  # AutoTokenizer loads the tokenizers-backed T5 class
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    assert len(tokenizer) == 4000 + NUM_SENTINELS + 3
    ids = special_ids(tokenizer)
    assert ids.sentinels[0] == tokenizer.convert_tokens_to_ids("<extra_id_0>") == 4099
    assert ids.sentinels[99] == 4000
    assert {k: v.tolist() for k, v in ids.modes.items()} == {"R": [4100], "X": [4101], "S": [4102]}
    assert tokenizer.model_max_length == 512
    assert (tokenizer_dir / SPIECE_FILE).exists()


def test_the_readme_prompts_content_words_are_whole_pieces(tokenizer):
    # Whole pieces, or uppercase must learn to capitalise a word piece by piece from few examples.
    for word in ("hello", "world", "red", "blue", "green"):
        assert tokenizer.tokenize(word) == [f"\u2581{word}"]


def test_tokenizer_round_trip_1000_lines(tokenizer, tokenizer_dir, version_dir):
    import sentencepiece as spm

    lines = _lines()
    assert len(lines) == 1000
    reloaded = load_tokenizer(version_dir)
    sp = spm.SentencePieceProcessor(model_file=str(version_dir / SPIECE_FILE))
    a = tokenizer(lines).input_ids
    b = reloaded(lines).input_ids
    assert a == b
    # Plain text (no special-token strings) tokenizes exactly as the SentencePiece model does.
    for line, ids in zip(lines[3:], a[3:], strict=True):
        assert ids == sp.encode(line) + [1]
    assert reloaded.decode(a[5], skip_special_tokens=True) == lines[5]


def test_tokenizer_build_is_deterministic(lm_cache, tmp_path, tokenizer_dir):
    from coldswarm.lm.tokenizer import build_default_tokenizer

    other = build_default_tokenizer(tmp_path / "other-cache")
    assert (other / SPIECE_FILE).read_bytes() == (tokenizer_dir / SPIECE_FILE).read_bytes()
    assert build_default_tokenizer(lm_cache) == tokenizer_dir  # served from the cache


@pytest.mark.parametrize("size,lo,hi", [("tiny", 8e6, 12e6), ("small", 50e6, 70e6)])
def test_model_sizes(size, lo, hi):
    model = build_model(size, vocab_size=4160)
    assert lo <= num_parameters(model) <= hi
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.config.feed_forward_proj == "gated-gelu" and model.config.decoder_start_token_id == 0


def test_first_loss_near_ln_vocab(tokenizer):
    vocab = len(tokenizer)
    model = build_model("tiny", vocab_size=padded_vocab_size(tokenizer), seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 4000, (4, 64), generator=g)
    y = torch.randint(3, 4000, (4, 32), generator=g)
    with torch.no_grad():
        loss = model(input_ids=x, labels=y).loss.item()
    assert abs(loss - math.log(vocab)) < 1.0, loss
    assert model.lm_head.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)


def test_version_zero_loads_with_auto_classes(version_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    names = {p.name for p in version_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        SPIECE_FILE,
        "tokenizer.json",
    } <= names
    model = AutoModelForSeq2SeqLM.from_pretrained(version_dir)
    tok = AutoTokenizer.from_pretrained(version_dir)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # untied survives a reload
    assert model.config.vocab_size == padded_vocab_size(tok) == 4160
    again = build_model("tiny", vocab_size=4160, seed=0)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # deterministic in the seed


def test_version_dir_is_never_overwritten(version_dir, lm_cache):
    from coldswarm.lm.default import build_default_version

    with pytest.raises(FileExistsError):
        build_default_version(version_dir, cache_dir=lm_cache)


@pytest.mark.slow
def test_tiny_reduces_mod_loss_on_cpu(version_dir, tokenizer):
    from coldswarm.lm.batching import tokenize_documents
    from coldswarm.lm.mod import MoDCollator, MoDConfig

    torch.manual_seed(0)
    model = load_model(version_dir)
    model.train()
    collator = MoDCollator(special_ids(tokenizer), MoDConfig(inputs_length=64, seed=0))
    docs = tokenize_documents(iter_documents(CorpusConfig()), tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, batch in enumerate(collator.iter_batches(docs, batch_size=8)):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 29:
            break
    assert abs(losses[0] - math.log(len(tokenizer))) < 1.0
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
