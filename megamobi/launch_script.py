"""The Python half of launch/pretrain.sh: what runs when DeepSpeed's launcher starts that file as a
Python program on every rank, e.g.

    deepspeed --num_gpus 8 launch/pretrain.sh RUN.yaml [key.sub=value ...]
      -> python -u launch/pretrain.sh --local_rank=K RUN.yaml [key.sub=value ...]   (on every rank)
    deepspeed --launcher slurm --hostfile H launch/pretrain.sh RUN.yaml
      -> srun -n N python -u launch/pretrain.sh RUN.yaml    (no --local_rank: SLURM's variables say it)

It starts megamobi.pretrain with the same arguments: `--config RUN.yaml [overrides]`.
"""

from __future__ import annotations

import os
import sys

from megamobi.exit_codes import USAGE

USAGE_LINE = ("usage: deepspeed [deepspeed options] launch/pretrain.sh RUN.yaml [key.sub=value ...]  "
              "(or: bash launch/pretrain.sh / sbatch launch/pretrain.sh; see docs/launch.md)")


def pretrain_args(argv: list[str]) -> tuple[list[str], str | None]:
    """launch/pretrain.sh's arguments as DeepSpeed passes them -> (megamobi.pretrain's arguments, local rank)."""
    local_rank, rest = None, []
    args = iter(argv)
    for arg in args:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            local_rank = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank"):
            local_rank = next(args, None)
        else:
            rest.append(arg)
    if rest and not rest[0].startswith("-"):
        rest = ["--config", *rest]  # RUN.yaml comes first, as for bash and sbatch
    return rest, local_rank


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, local_rank = pretrain_args(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE_LINE, file=sys.stderr if not args else sys.stdout)
        return USAGE if not args else 0
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    # DeepSpeed's launcher leaves OMP_NUM_THREADS unset: N ranks x all cores oversubscribes a CPU node.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megamobi.pretrain import main as pretrain_main

    return pretrain_main(args)
