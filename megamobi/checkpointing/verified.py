"""The one check every reader of a checkpoint's weights makes first: its files match the sha256 in its
manifest. `megamobi.checkpoints --verify` lists the same problems; training's resume spreads the same
check over the ranks (megamobi/training/checkpoint.py). Used by `megamobi.evaluate`, `megamobi.generate`,
`megamobi.convert`, `megamobi.eval` and its sweep, and training's `checkpoint.init_from`, so a damaged checkpoint is
refused with one line instead of giving a loss, text or an export computed from damaged weights.
"""

from __future__ import annotations

from pathlib import Path

from megamobi.checkpointing.manifest import CHECKPOINTS, verify_checkpoint


def verify_advice(checkpoint: Path) -> str:
    """What to run to see which checkpoints of the run are whole."""
    run_dir = checkpoint.resolve().parent.parent if checkpoint.resolve().parent.name == CHECKPOINTS else None
    target = run_dir if run_dir is not None else "RUN_DIR"
    return (f"run `python -m megamobi.checkpoints {target} --verify` to see which checkpoints are whole, and use "
            "one it lists as verified")


def broken_checkpoint(checkpoint: str | Path, *, use: str) -> str | None:
    """None when every file of `checkpoint` matches its manifest; else the one line a consumer prints:
    the checkpoint, the first problems, and the --verify advice. `use`: what the consumer would do
    with it ("evaluate", "convert", ...)."""
    return refusal(Path(checkpoint), verify_checkpoint(checkpoint), use=use)


def refusal(checkpoint: Path, problems: list[str], *, use: str) -> str | None:
    """broken_checkpoint()'s line for problems found elsewhere (e.g. verified across the ranks)."""
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"{checkpoint}: broken or incomplete checkpoint, refusing to {use} it: {'; '.join(problems[:3])}{more}; "
            f"{verify_advice(checkpoint)}")
