"""Code version recorded in manifests, so a dataset can be traced back to the code that made it."""
import subprocess
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """`git describe --always --dirty` of this repository, or "unknown" outside a git checkout."""
    try:
        import megamobi  # the package may grow a __version__; prefer it when present

        version = getattr(megamobi, "__version__", None)
    except ImportError:
        version = None
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    if version and described:
        return f"{version}+{described}"
    return version or described or "unknown"
