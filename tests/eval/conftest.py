"""Fixtures for the benchmark and plot tests: one real tiny training run with three checkpoints and
validation, a SentencePiece tokenizer for it, and the model's own log-likelihoods of the tiny task."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

# These tests never reach the network: lm-eval / datasets must take local data or say what is missing.
# Set before any of them imports `datasets`, which reads these once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "training"))  # training_runs

TASK_DIR = HERE / "tasks"
TASK_JSONL = TASK_DIR / "megamobi_tiny_mc.jsonl"


@pytest.fixture(scope="session")
def eval_tokenizer(tmp_path_factory) -> Path:
    """A 320-piece SentencePiece BPE (fits the test model's 512-token vocabulary)."""
    import sentencepiece as spm

    text = [f"The quick brown fox {i} jumps over the lazy dog. Its color is red, blue, green or white; "
            f"said the owl, cat, bee, cow, pig and hen on day {i * 7}." for i in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("eval-tok") / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, token_shards) -> Path:
    """6 real training steps of the test model, a checkpoint every 2 steps (512 tokens), validation every 2."""
    from multiproc import run_ranks
    from training_runs import make_run

    from megamobi.training.loop import Trainer

    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    run = make_run(run_dir, token_shards, data={"val_fraction": 0.25},
                   train={"steps": 6, "log_interval": 1, "eval_interval": 2, "eval_samples": 4},
                   checkpoint={"interval_tokens": 512})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    return run_dir


@pytest.fixture(scope="session")
def own_loglikelihoods(trained_run, eval_tokenizer) -> tuple[list[list[float]], list[int]]:
    """Per item, the log-likelihood of each choice under the final checkpoint, computed here with
    megamobi's own model and the SentencePiece model (BOS + context, continuation = ' ' + choice)."""
    import sentencepiece as spm
    import torch

    from megamobi.generate import load_model

    model = load_model(str(trained_run / "checkpoints" / "step_0000006"))
    sp = spm.SentencePieceProcessor(model_file=str(eval_tokenizer))
    scores, labels = [], []
    with torch.no_grad():
        for line in TASK_JSONL.read_text().splitlines():
            item = json.loads(line)
            context = [sp.bos_id(), *sp.encode(item["question"])]
            row = []
            for choice in item["choices"]:
                whole = [sp.bos_id(), *sp.encode(item["question"] + " " + choice)]
                assert whole[:len(context)] == context
                logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).double(), dim=-1)[0]
                row.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
            scores.append(row)
            labels.append(item["label"])
    return scores, labels
