import sys
from pathlib import Path

# bench/ is a folder of scripts, not a package: import them as the scripts import each other.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "bench"))
