"""Train a LLaMA-style SentencePiece BPE tokenizer with byte fallback. Usage: python data_tools/train_tokenizer.py --help"""
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamobi.data.cli import train_tokenizer_main

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
