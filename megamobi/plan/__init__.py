"""The cluster planner: memory and step time of every layout of a run, before anyone asks SLURM.

    python -m megamobi.plan --config RUN.yaml --nodes 20 --gpus-per-node 8 --gpu a100-80gb

catalogue.py  GPUs (peak, memory, NVLink / InfiniBand, with sources)
inventory.py  what each rank holds: tensor shards, pipeline stages (DeepSpeed's partitioner), shared-FFN replicas
layouts.py    every layout the Trainer's own validation accepts
memory.py     per-GPU memory, itemised
timing.py     step time: compute, tensor / data / pipeline / shared-FFN communication
planner.py    candidates best first; the paper's layout beside its measurement
report.py     the table, --json, --for-run
See docs/planning.md.
"""

from megamobi.plan.catalogue import CATALOGUE, GPU
from megamobi.plan.planner import Candidate, Plan, evaluate, plan

__all__ = ["CATALOGUE", "GPU", "Candidate", "Plan", "evaluate", "plan"]
