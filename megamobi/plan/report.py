"""Printing a plan: the table, JSON lines, and the comparison with a finished run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from megamobi.config_io import ConfigError
from megamobi.model import flops_per_token, parameter_counts
from megamobi.plan.catalogue import GPU
from megamobi.plan.layouts import overrides
from megamobi.plan.memory import FRAGMENTATION, FRAMEWORK_ALLOWANCE_GIB, GIB
from megamobi.plan.planner import Candidate, Plan, paper_comparison
from megamobi.plan.timing import COMM_EFFICIENCY
from megamobi.training.run_config import RunConfig

HEADER = (" #   T  P    D micro ZeRO ckpt SP | params  grads  optim  activ  other  total GiB | "
          "step s  tok/s/GPU      tok/s")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def row(i: int | str, c: Candidate) -> str:
    lay, m = c.layout, c.memory.gib()
    return (f"{i!s:>2} {lay.tensor:>3} {lay.pipeline:>2} {lay.data:>4} {lay.micro_batch:>5} {lay.zero_stage:>4} "
            f"{lay.activation_checkpointing[:4]:>4} {_yes(lay.sequence_parallel):>3} | {m['params']:>6.1f} "
            f"{m['grads']:>6.1f} {m['optimizer']:>6.1f} {m['activations']:>6.1f} {m['other']:>6.1f} "
            f"{m['total']:>6.1f}     | {c.time.step_s:>6.3f} {c.tokens_per_s_per_gpu:>10,.0f} {c.tokens_per_s:>10,.0f}")


def details(c: Candidate) -> list[str]:
    items = ", ".join(f"{k} {v / GIB:.2f}" for k, v in c.memory.items.items())
    parts = ", ".join(f"{k} {v:.3f}" for k, v in c.time.parts.items())
    return [f"      memory (GiB, stage {c.memory.stage}): {items}; shared FFN replica's share of the static part "
            f"{c.memory.shared_ffn / GIB:.2f}",
            f"      step (s): {parts}"]


def breaking(c: Candidate, gpu: GPU) -> str:
    name, value = c.memory.largest_item()
    return (f"needs {c.memory.total / GIB:.1f} GiB of {gpu.memory_gib:.1f}: largest item {name} "
            f"{value / GIB:.1f} GiB")


def print_text(run: RunConfig, result: Plan, *, gpu: GPU, nodes: int, gpus_per_node: int, top: int,
               compute_fraction: float) -> None:
    cfg, world = run.model_config, nodes * gpus_per_node
    counts = parameter_counts(cfg)
    print(f"{cfg.name}: {counts['params_unique'] / 1e9:.3f} B parameters (unique), "
          f"{flops_per_token(cfg, seq_len=run.batch.seq_len) / 1e9:.2f} GFLOP per token at sequence {run.batch.seq_len} "
          f"(shared FFN counted in every layer); global batch {run.batch.global_batch_size} x {run.batch.seq_len}, "
          f"{run.precision}")
    peak = f"{gpu.peak_tflops:g} TFLOP/s dense bf16" if run.precision == "bf16" else f"{gpu.fp32_tflops:g} TFLOP/s fp32"
    print(f"cluster: {nodes} x {gpus_per_node} {gpu.name} = {world} GPUs ({peak}, "
          f"{gpu.memory_gib:g} GiB, NVLink {gpu.intra_gbps:g} GB/s, InfiniBand {gpu.inter_gbps:g} GB/s per GPU)")
    print(f"assumptions: compute at {compute_fraction:.0%} of peak; collectives at {COMM_EFFICIENCY:.0%} of link "
          f"bandwidth; allowance {FRAMEWORK_ALLOWANCE_GIB} GiB (CUDA context, NCCL) + {FRAGMENTATION:.0%} fragmentation")
    fitting = [c for c in result.candidates if c.fits]
    print(f"{len(result.candidates)} layouts accepted by the Trainer's checks, {len(fitting)} fit; "
          f"{sum(result.refused.values())} refused by them")
    print(HEADER)
    for i, c in enumerate(fitting[:top], 1):
        print(row(i, c))
    if not fitting:
        print("  (no layout fits: see below)")
    else:
        print("overrides that train each layout above (append them to the pretrain / launch/pretrain.sh command):")
        for i, c in enumerate(fitting[:top], 1):
            print(f"{i:>2}  {' '.join(overrides(run, c.layout)) or '(none: this config as it is)'}")
    print()
    if result.own is not None:
        rank = next((i for i, c in enumerate(result.candidates, 1) if c is result.own), None)
        where = (f"#{rank} of {len(result.candidates)}" if rank is not None
                 else f"not ranked: {result.own_unranked}")
        print(f"this config's layout ({where}):")
        print(row("*", result.own))
        print("\n".join(details(result.own)))
        if not result.own.fits:
            print(f"      does NOT fit: {breaking(result.own, gpu)}")
        line = paper_comparison(run, result, gpu=gpu)
        if line:
            print(f"  {line}")
    else:
        print(f"this config's layout is refused on {world} GPUs: {result.own_refusal}")
    if fitting:
        print("best:")
        print("\n".join(details(fitting[0])))
    too_big = [c for c in result.candidates if not c.fits]
    if too_big:
        print(f"\n{len(too_big)} layouts do not fit; the fastest of them:")
        for c in too_big[:min(top, 5)]:
            print(row("-", c) + f"  ({breaking(c, gpu)})")
    if result.refused:
        print("\nrefused by the Trainer's checks (count, reason):")
        for reason, n in result.refused.most_common(6):
            print(f"  {n:>6}  {reason}")


def print_json(run: RunConfig, result: Plan, *, top: int | None) -> None:
    """One line per candidate, best first; `own` marks the config's own layout. A config layout the
    planner does not rank (tensor groups across nodes) comes last, with `not_ranked` saying why."""
    chosen = result.candidates if top is None else result.candidates[:top]
    for c in chosen:
        print(json.dumps(c.to_json(run, own=c is result.own)))
    if result.own is not None and result.own_unranked:
        print(json.dumps({**result.own.to_json(run, own=True), "not_ranked": result.own_unranked}))


def read_run_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--for-run {run_dir}: no metrics.jsonl there (the Trainer writes it on rank 0 at every log step)")
    steps = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n}: not a JSON line; is this a megamobi run directory?") from None
        if isinstance(record, dict) and "tokens_per_s" in record and "memory_gb" in record:
            steps.append(record)
    if not steps:
        raise ConfigError(f"{path}: no training-step lines (with tokens_per_s and memory_gb) yet")
    timed = steps[1:] if len(steps) > 1 else steps  # the first logged interval includes warm-up
    return {"steps": len(steps), "tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
            "memory_gb": max(s["memory_gb"] for s in steps),
            # the largest rank's peak (Trainer logs it as memory_gb_max; older runs only rank 0's)
            "memory_gb_max": max((s["memory_gb_max"] for s in steps if s.get("memory_gb_max") is not None),
                                 default=None),
            "last_step": steps[-1].get("step")}


def run_differences(run: RunConfig, own: Candidate, run_dir: Path) -> list[str]:
    """What the run in run_dir trained (its newest checkpoint's model, layout, batch and precision)
    against what this estimate is for; [] when they are the same."""
    from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest

    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"--for-run {run_dir}: no complete checkpoint records the run's model and layout, so the "
                          "measurement cannot be matched to this config; compare once the run has saved one")
    try:
        manifest = read_manifest(checkpoints[-1])
        model, layout = manifest["model_config"], manifest["layout"]
        batch, precision = manifest["run_config"]["batch"], manifest["precision"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--for-run {run_dir}: {checkpoints[-1].name} does not record its model and layout ({err})") from None
    lay, cfg = own.layout, run.model_config
    pairs = [(f"model.{k}", model.get(k), getattr(cfg, k)) for k in
             ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "ffn_sharing", "activation_checkpointing")]
    pairs += [("parallel.tensor", layout.get("tensor"), lay.tensor), ("parallel.pipeline", layout.get("pipeline"), lay.pipeline),
              ("data-parallel size", layout.get("data"), lay.data), ("parallel.zero_stage", layout.get("zero_stage"), lay.zero_stage),
              ("batch.micro_batch_size", batch.get("micro_batch_size"), lay.micro_batch),
              ("batch.global_batch_size", batch.get("global_batch_size"), run.batch.global_batch_size),
              ("batch.seq_len", batch.get("seq_len"), run.batch.seq_len), ("precision", precision, run.precision)]
    if model.get("activation_checkpointing") is None:  # recorded before the field existed
        pairs = [p for p in pairs if p[0] != "model.activation_checkpointing"]
    return [f"{name} {theirs} (run) vs {ours} (estimate)" for name, theirs, ours in pairs if theirs != ours]


def check_for_run(run: RunConfig, result: Plan, run_dir: Path) -> dict:
    """The run's measurements, once it is sure they measured what this estimate is for (before any
    output): otherwise a ConfigError listing the fields that differ."""
    if result.own is None:
        raise ConfigError(f"--for-run: the config's own layout is refused on this cluster ({result.own_refusal}); "
                          f"give the --nodes / --gpus-per-node the run used")
    measured = read_run_metrics(run_dir)
    differences = run_differences(run, result.own, run_dir)
    if differences:
        raise ConfigError(f"--for-run {run_dir}: that run trained another model or layout than this estimate is for: "
                          f"{'; '.join(differences)}. Give the run's own config and the --nodes / --gpus-per-node it "
                          "ran on")
    return measured


def print_for_run(result: Plan, run_dir: Path, measured: dict, *, as_json: bool) -> None:
    own = result.own
    est_mem = own.memory.allocated / GIB
    out = {"run_dir": str(run_dir), "steps_logged": measured["steps"],
           "measured_tokens_per_s": round(measured["tokens_per_s"], 1),
           "estimated_tokens_per_s": round(own.tokens_per_s, 1),
           "tokens_per_s_ratio": round(measured["tokens_per_s"] / own.tokens_per_s, 3),
           "measured_peak_memory_gb": round(measured["memory_gb"], 3),
           "measured_peak_memory_gb_any_rank": (None if measured["memory_gb_max"] is None
                                                else round(measured["memory_gb_max"], 3)),
           "estimated_allocated_gb": round(est_mem, 3),
           "memory_ratio": round(measured["memory_gb"] / est_mem, 3) if est_mem else None}
    if as_json:
        print(json.dumps({"for_run": out}))
        return
    print(f"\n--for-run {run_dir} ({measured['steps']} logged steps, last {measured['last_step']}):")
    print(f"  tokens/s (whole job): measured {out['measured_tokens_per_s']:,.0f}, estimated "
          f"{out['estimated_tokens_per_s']:,.0f} (measured / estimated {out['tokens_per_s_ratio']:.2f})")
    largest = out["measured_peak_memory_gb_any_rank"]
    if largest is not None:
        print(f"  peak memory of the largest rank (memory_gb_max): measured {largest:.2f} GiB")
    print(f"  peak memory of rank 0 (metrics memory_gb): measured {out['measured_peak_memory_gb']:.2f} GiB, "
          f"estimated allocator peak {out['estimated_allocated_gb']:.2f} GiB (total less the allowance). On a CPU "
          f"run memory_gb is the process's peak resident size, which also counts Python, torch and DeepSpeed "
          f"themselves (several hundred MiB)")
