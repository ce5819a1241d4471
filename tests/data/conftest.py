"""Fixtures of the data tests: a tiny tokenizer trained once per session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from data_helpers import ...`

from data_helpers import english_text


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return english_text()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, docs) -> Path:
    from megamobi.data.tokenizer_training import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    return train_tokenizer(inputs=[str(corpus)], output_prefix=str(out / "tiny"), vocab_size=700)


@pytest.fixture(scope="session")
def sp(tokenizer_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
