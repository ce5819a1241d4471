"""List a run's checkpoints as a table: what each one is and where it came from (its data stage and how
far through it, its layout, code version, the source mix it consumed).

    python -m megamobi.checkpoints runs/mobillama-0.5b            # one line per checkpoint
    python -m megamobi.checkpoints runs/mobillama-0.5b --verify   # also check every file's sha256
                                                                  # (exit status 1 if any checkpoint is BROKEN)
    python -m megamobi.checkpoints runs/mobillama-0.5b --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megamobi.checkpointing.manifest import read_manifest, verify_checkpoint
from megamobi.data.replay import consumed_mixes
from megamobi.training.checkpoint import checkpoints_dir

EXIT_BROKEN = 1  # --verify found a checkpoint whose files are missing or differ from its manifest


def _size(manifest: dict) -> int:
    return sum(f["bytes"] for f in manifest["files"].values())


def _mix_text(mix: dict[str, float] | None) -> str:
    if not mix:
        return "-"
    return " ".join(f"{name} {100 * share:.0f}%" for name, share in sorted(mix.items(), key=lambda item: -item[1]))


def _stage_text(stage: dict | None) -> str:
    """The data stage of a checkpoint's last step and how far through it: `2 anneal 40%`."""
    if not stage:
        return "-"
    name = f" {stage['name']}" if stage.get("name") else ""
    planned = stage.get("planned_tokens") or 0
    progress = f" {100 * stage['tokens'] / planned:.0f}%" if planned > 0 else ""
    return f"{stage['number']}{name}{progress}"


def describe(run_dir: Path, *, verify: bool, mix: bool = True) -> list[dict]:
    root = checkpoints_dir(run_dir)
    # Each checkpoint's consumed source shares, replayed from its recorded data order ("-" without the shards).
    mixes = consumed_mixes(run_dir) if mix else {}
    rows = []
    for path in sorted(root.glob("step_*")) + sorted(root.glob(".step_*.partial")):
        try:
            m = read_manifest(path)
        except (FileNotFoundError, json.JSONDecodeError):
            rows.append({"checkpoint": path.name, "status": "incomplete (no manifest)"})
            continue
        layout = m.get("layout") or {}
        status = "ok" if not verify else ("verified" if not (problems := verify_checkpoint(path)) else f"BROKEN: {problems[0]}")
        rows.append({
            "checkpoint": path.name, "step": m.get("step"), "consumed_samples": m.get("consumed_samples"),
            "consumed_tokens": m.get("consumed_tokens"), "loss": m.get("loss"),
            "layout": f"T{layout.get('tensor', 1)} P{layout.get('pipeline', 1)} D{layout.get('data', 1)} Z{layout.get('zero_stage', '-')}" if layout else "-",
            "code_version": m.get("code_version"), "data_manifests": m.get("data_manifests", {}),
            "bytes": _size(m), "status": status, "consumed_mix": mixes.get(path.name) or None,
            "data_stage": m.get("data_stage"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamobi.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--verify", action="store_true", help="check every file against the manifest's sha256")
    parser.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    parser.add_argument("--no-mix", action="store_true",
                        help="skip the consumed-mix column (it replays the run's data order over the shards)")
    args = parser.parse_args(argv)
    if not checkpoints_dir(args.run_dir).is_dir():
        hint = (f"it is a checkpoint: give its run directory, {args.run_dir.resolve().parent.parent}"
                if (args.run_dir / "megamobi.json").is_file() else "is it a run directory?")
        print(f"error: {args.run_dir} has no checkpoints/ directory; {hint}", file=sys.stderr)
        return 2
    rows = describe(args.run_dir, verify=args.verify, mix=not args.no_mix)
    # --verify: exit EXIT_BROKEN when any finished checkpoint fails its checksums (scripts can test it).
    # A step_* directory without a manifest lost it afterwards (only sealed checkpoints get that name).
    damaged = [r for r in rows if r["status"].startswith("BROKEN")
               or (r["checkpoint"].startswith("step_") and r["status"].startswith("incomplete"))]
    exit_status = EXIT_BROKEN if args.verify and damaged else 0
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return exit_status
    print(f"{'checkpoint':<20} {'step':>8} {'samples':>12} {'tokens':>16} {'loss':>8} {'layout':<14} {'size':>9}  {'code':<22} {'data stage':<16} {'consumed mix':<24} status")
    for r in rows:
        if "step" not in r:
            print(f"{r['checkpoint']:<20} {'':>8} {'':>12} {'':>16} {'':>8} {'':<14} {'':>9}  {'':<22} {'':<16} {'':<24} {r['status']}")
            continue
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        print(f"{r['checkpoint']:<20} {r['step']:>8} {r['consumed_samples']:>12,} {r['consumed_tokens']:>16,} {loss:>8} "
              f"{r['layout']:<14} {r['bytes'] / 2**20:>7.1f}MB  {r['code_version']!s:<22} {_stage_text(r['data_stage']):<16} "
              f"{_mix_text(r['consumed_mix']):<24} {r['status']}")
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
