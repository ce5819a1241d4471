import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from multiproc import run_ranks`

# One intra-op thread in the test process: the multi-process tests fork from it, and an OpenMP pool
# that existed before fork() can deadlock the children. Parity tests are small, so this costs little.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
