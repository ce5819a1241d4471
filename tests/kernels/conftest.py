import sys
from pathlib import Path

# The Trainer tests here reuse the small run configs of tests/training (training_runs.make_run).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
