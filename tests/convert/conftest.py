"""Fixtures for the converter tests: a tiny SentencePiece model and one checkpoint per config kind."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from convert_helpers import ...`

from convert_helpers import CONFIG_KINDS, VOCAB, build_model, save_checkpoint, small_config


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    import sentencepiece as spm

    text = [f"the quick brown fox {i} jumps over the lazy dog, said Mr. Smith on day {i * 7}." for i in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=VOCAB, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """One checkpoint per config kind, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for seed, kind in enumerate(CONFIG_KINDS):
        model = build_model(small_config(kind), seed=seed)
        out[kind] = (save_checkpoint(root / kind, model), model)
    return out
