"""Write a RunConfig back to YAML, for tests that start the real command-line tools."""

import dataclasses
import json
from pathlib import Path

import yaml


def write_run_yaml(path: Path, run) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(run)))))
    return path
