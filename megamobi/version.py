"""The code version recorded in manifests and checkpoints, so every artefact says what made it."""

import functools
import subprocess
from pathlib import Path

from megamobi import __version__

_REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    """`<package version>+<git describe>` when run from a git checkout, else the package version."""
    try:
        described = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{described}" if described else __version__
