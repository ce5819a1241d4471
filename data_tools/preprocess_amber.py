"""Build 2049-token uint16 shards from Amber jsonl or raw text. Usage: python data_tools/preprocess_amber.py --help"""
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamobi.data.cli import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
