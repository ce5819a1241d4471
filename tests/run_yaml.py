"""Write a RunConfig back to YAML, for tests that start the real command-line tools."""

import json
from pathlib import Path

import yaml

from megamobi.config_io import to_dict


def write_run_yaml(path: Path, run) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(run)))))
    return path
