import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# With a CPU-only torch, Triton can only run interpreted (on CPU tensors): set TRITON_INTERPRET before
# anything imports Triton, since @triton.jit reads it when a kernel is defined. That is how
# tests/kernels/test_liger_interpreter.py runs liger-kernel here; CUDA builds of torch are left alone.
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from multiproc import run_ranks`

# One intra-op thread in the test process: the multi-process tests fork from it, and an OpenMP pool
# that existed before fork() can deadlock the children. Parity tests are small, so this costs little.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


TOKEN_VOCAB = 512  # the vocabulary of `token_shards`


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory) -> Path:
    """48 Amber-style samples of random tokens from two sources, written by the real preprocessor."""
    from megamobi.data.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    with open(root / "train_000.jsonl", "w") as f:
        for i in range(48):
            tokens = rng.integers(0, TOKEN_VOCAB, 2049).tolist()
            f.write(json.dumps({"token_ids": tokens, "source": "c4" if i % 3 else "arxiv"}) + "\n")
    out = root / "shards"
    preprocess(PreprocessOptions(inputs=[str(root / "train_000.jsonl")], output=str(out), vocab_size=TOKEN_VOCAB,
                                 samples_per_shard=20, progress=False))
    return out
