"""The default tokenizer: a SentencePiece unigram model wrapped as a transformers T5 tokenizer.

Ids: pad=0, eos=1, unk=2, no bos; then the SentencePiece pieces; then the 100 sentinels
``<extra_id_99>`` .. ``<extra_id_0>`` (T5's order: ``<extra_id_0>`` has the highest of
them); then the UL2 mode tokens ``[NLU]``, ``[NLG]``, ``[S2S]``. With the default 4000
pieces the tokenizer has 4103 ids; the model's embedding is rounded up to 4160.

Always map sentinels with ``convert_tokens_to_ids("<extra_id_i>")`` (see
:func:`special_ids`); ``len(tokenizer) - i`` is wrong once the mode tokens are added, and
transformers 5.x's ``get_sentinel_tokens()`` returns an unordered set of every special token.

transformers 5.23 notes (checked in tests): ``T5Tokenizer`` is the tokenizers-backed
("fast") class, and ``AutoTokenizer.from_pretrained(dir)`` loads the same class from
``tokenizer.json``; the ``vocab_file=`` constructor ignores the file, so we build with
``T5Tokenizer.from_pretrained(dir_with_spiece_model, extra_ids=100)``. ``save_pretrained``
does not write ``spiece.model``, so :func:`save_tokenizer` copies it next to the rest.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cache import cached_dir, content_hash
from .corpus import CorpusConfig, build_default_corpus, corpus_key

SPIECE_FILE = "spiece.model"
NUM_SENTINELS = 100
#: UL2 mode tokens, keyed by denoiser family (R: regular span corruption, X: extreme, S: sequential/prefix-LM).
MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass(frozen=True)
class TokenizerConfig:
    """How the default SentencePiece model is trained."""

    vocab_size: int = field(
        default=4000,
        metadata={"help": "SentencePiece pieces incl. pad/eos/unk; sentinels and mode tokens come on top"},
    )
    model_max_length: int = field(default=512, metadata={"help": "tokenizer.model_max_length"})
    seed: int = field(
        default=0, metadata={"help": "SentencePiece's random seed (training is deterministic with it)"}
    )
    num_threads: int = field(default=2, metadata={"help": "trainer threads (result does not depend on it)"})


def train_spiece(
    corpus_path: str | os.PathLike, out_path: str | os.PathLike, config=TokenizerConfig()
) -> Path:
    """Train a unigram SentencePiece model on a text file and write it to ``out_path``."""
    import sentencepiece as spm

    spm.set_random_generator_seed(config.seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(corpus_path),
        model_writer=buf,  # no model_prefix: it would be recorded in the file and break byte-determinism
        vocab_size=config.vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        split_digits=True,  # numbers become digit sequences: arithmetic tasks stay learnable
        num_threads=config.num_threads,
        minloglevel=2,
    )
    # The trainer records where it read its input; clear that so the file depends only on
    # the corpus content (the same bytes from every cache directory on every machine).
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    out = Path(out_path)
    out.write_bytes(proto.SerializeToString())
    return out


def make_t5_tokenizer(spiece_dir: str | os.PathLike, model_max_length: int = 512):
    """A transformers T5 tokenizer over ``<spiece_dir>/spiece.model`` with 100 sentinels and
    the mode tokens as special tokens."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(
        str(spiece_dir),
        extra_ids=NUM_SENTINELS,
        extra_special_tokens=list(MODE_TOKENS.values()),
        model_max_length=model_max_length,
    )


def save_tokenizer(tokenizer, spiece_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(out_dir)`` plus ``spiece.model`` (kept with every version)."""
    tokenizer.save_pretrained(str(out_dir))
    if Path(spiece_path).resolve() != (Path(out_dir) / SPIECE_FILE).resolve():
        shutil.copyfile(spiece_path, Path(out_dir) / SPIECE_FILE)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer from a version (or any local HF) directory; never touches a hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_default_tokenizer(
    cache_dir=None, corpus_config: CorpusConfig = CorpusConfig(), config: TokenizerConfig = TokenizerConfig()
) -> Path:
    """Build (or reuse from the cache) the default tokenizer dir: spiece.model + tokenizer files.
    Deterministic: keyed by the corpus hash, this file and the config."""
    key = content_hash(corpus_key(corpus_config), Path(__file__), asdict(config))

    def build(tmp: Path) -> None:
        corpus = build_default_corpus(corpus_config, cache_dir)
        train_spiece(corpus, tmp / SPIECE_FILE, config)
        with tempfile.TemporaryDirectory() as work:
            shutil.copyfile(tmp / SPIECE_FILE, Path(work) / SPIECE_FILE)
            tok = make_t5_tokenizer(work, config.model_max_length)
        save_tokenizer(tok, tmp / SPIECE_FILE, tmp)

    return cached_dir("tokenizer", key, build, cache_dir)


def padded_vocab_size(tokenizer, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: len(tokenizer) rounded up to ``multiple`` (faster matmuls)."""
    n = len(tokenizer)
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class SpecialIds:
    """The ids the MoD objective needs, resolved by token text (never by position)."""

    pad: int
    eos: int
    sentinels: np.ndarray  # sentinels[i] is the id of <extra_id_i>
    modes: dict  # "R"/"X"/"S" -> np.ndarray of ids prepended to inputs (one id with our tokenizer)

    @property
    def max_mode_length(self) -> int:
        return max(len(v) for v in self.modes.values())


def special_ids(tokenizer) -> SpecialIds:
    """Resolve pad/eos/sentinels/mode tokens of a tokenizer.

    With a tokenizer that lacks the mode tokens (e.g. a stock Flan-T5 dir) the mode
    "token" is the tokenization of its text, so nothing is ever mapped to <unk>."""
    unk = tokenizer.unk_token_id
    sentinels = np.array(
        [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)], dtype=np.int64
    )
    if (sentinels == unk).any() or sentinels.min() < 0:
        raise ValueError("tokenizer lacks the 100 <extra_id_N> sentinels that span corruption needs")
    modes = {}
    for key, tok in MODE_TOKENS.items():
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == unk:
            ids = tokenizer(tok, add_special_tokens=False).input_ids
        else:
            ids = [tid]
        modes[key] = np.array(ids, dtype=np.int64)
    return SpecialIds(
        pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, sentinels=sentinels, modes=modes
    )
