"""A run's schedule as people read it: each data stage's steps and tokens, and the lr at its start and end.

Printed by `megamobi.pretrain --check-only`, `megamobi.plan --config` and at every start of a run (where it
also says, once, how each token boundary was rounded to whole global batches). Steps are 1-based, as
logged; the table assumes the run's global batch and seq_len from step 1 on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megamobi.data.stages import first_step_at_tokens
from megamobi.training.schedule import LrSchedule

if TYPE_CHECKING:
    from megamobi.training.run_config import RunConfig


def _short(tokens: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.4g}{unit}"
    return str(tokens)


def schedule_rows(run: RunConfig) -> list[dict[str, Any]]:
    """One row per data stage: first/last step, tokens at its start/end, lr of its first and last step."""
    tps, total = run.tokens_per_step, run.total_steps
    lr = LrSchedule.of_run(run)
    rows, first = [], 1
    for stage in run.data_stages:
        last = total if stage.until_tokens is None else first_step_at_tokens(stage.until_tokens, tokens_per_step=tps)
        rows.append({"stage": stage.number, "name": stage.name, "first_step": first, "last_step": last,
                     "start_tokens": (first - 1) * tps, "end_tokens": last * tps, "until_tokens": stage.until_tokens,
                     "lr_start": lr(first - 1), "lr_end": lr(last - 1), "paths": stage.paths,
                     "source_weights": stage.source_weights})
        first = last + 1
    return rows


def rounding_notes(run: RunConfig) -> list[str]:
    """Token boundaries that are not whole global batches, and the step each was rounded to."""
    tps, o = run.tokens_per_step, run.optimizer
    notes = []
    for stage, row in zip(run.data_stages, schedule_rows(run)):
        if stage.until_tokens is not None and stage.until_tokens % tps:
            notes.append(f"{stage.key}.until_tokens {stage.until_tokens:,} is not a whole number of global batches "
                         f"({tps:,} tokens): {stage.label()} ends at step {row['last_step']:,}, after {row['end_tokens']:,} "
                         "tokens")
    start = LrSchedule.of_run(run).decay_start_step
    if o.decay_tokens is not None and o.decay_tokens % tps:
        steps = run.total_steps - start
        notes.append(f"optimizer.decay_tokens {o.decay_tokens:,} is not a whole number of global batches ({tps:,} tokens): "
                     f"the decay covers the last {steps:,} steps ({steps * tps:,} tokens), from step {start + 1:,}")
    if o.decay_start_tokens is not None and o.decay_start_tokens % tps:
        notes.append(f"optimizer.decay_start_tokens {o.decay_start_tokens:,} is not a whole number of global batches "
                     f"({tps:,} tokens): the decay starts at step {start + 1:,}, after {start * tps:,} tokens")
    return notes


def schedule_lines(run: RunConfig) -> list[str]:
    tps, total = run.tokens_per_step, run.total_steps
    b = run.batch
    lines = [f"schedule: {total:,} steps of {b.global_batch_size} x {b.seq_len} = {tps:,} tokens "
             f"({_short(total * tps)} tokens); {LrSchedule.of_run(run).describe()}"]
    for row in schedule_rows(run):
        name = f" '{row['name']}'" if row["name"] else ""
        blend = f", weights {row['source_weights']}" if row["source_weights"] else ""
        lines.append(f"  stage {row['stage']}{name}: steps {row['first_step']:,}-{row['last_step']:,}, tokens "
                     f"{row['start_tokens']:,}-{row['end_tokens']:,} ({_short(row['end_tokens'] - row['start_tokens'])}), "
                     f"lr {row['lr_start']:.4g} -> {row['lr_end']:.4g}; {', '.join(row['paths'])}{blend}")
    return lines + rounding_notes(run)
