"""Verify a shard directory against its manifest and show samples. Usage: python data_tools/inspect_shards.py --help"""
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamobi.data.cli import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
