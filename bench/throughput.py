"""Training throughput of megamobi against Hugging Face Llama of the same shape, or of the real Trainer
step against the plain step; one process, one device.

    python bench/throughput.py --config CONFIG [--seq 2048] [--micro-batch N] [--steps K] [--dtype bf16]
                               [--compile] [--kernels auto|plain] [--peak-tflops F] [--json]
    python bench/throughput.py --config CONFIG --trainer ...        # Trainer (DeepSpeed ZeRO-1 + loader) vs plain

Default mode: full training steps (forward, backward, AdamW) of megamobi's model with its kernel
plan (megamobi/kernels) and of `transformers.LlamaForCausalLM` built with the same shape, every
layer's `mlp` set to ONE shared module, SDPA attention, the same optimizer (torch AdamW, fused on
CUDA; no decay on norms) and dtype, both losses by the same fp32 cross entropy on the same tokens.
The two are interleaved step by step after a warm-up, so both see the same machine state. `--compile`
compiles every decoder layer of both. `--dtype bf16` holds parameters and activations in bf16 for
both (as DeepSpeed's bf16 mode does; the Trainer additionally keeps fp32 master weights).

`--trainer`: the real `Trainer` (DeepSpeed engine, ZeRO-1, the shard loader over synthetic shards,
logging every step; world size 1; the final checkpoint skipped), its per-step times taken from its
own metrics.jsonl, against the plain step of the same model before and after it.

Figures: ms/step (mean of the timed steps), tokens/s, TFLOP/s and MFU (FLOPs count the shared FFN in
every layer: megamobi.model.flops_per_token), memory (CUDA: the model's parameters + optimizer state
+ the step's peak allocation above them; n/a on CPU), and the ratio megamobi / HF (or Trainer / plain)
of tokens/s last. No assertions: goals live in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import torch
from torch import nn

from megamobi.config_io import ConfigError
from megamobi.kernels.compile import COMPILE_BACKENDS
from megamobi.kernels.plan import apply_kernels, choose_kernels
from megamobi.model import MobiLlama, flops_per_token, language_model_loss
from megamobi.model_config import CHECKPOINTING_MODES, ModelConfig, load_model_config
from megamobi.training.optimizer import parameter_groups


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; one line is enough
        print(f"throughput.py: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv):
    p = OneLineParser(prog="bench/throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model config: a name in configs/ or a path")
    p.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: min(2048, max_seq_len))")
    p.add_argument("--micro-batch", type=positive_int, default=4, help="sequences per step (default 4)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (default 3; compile needs them)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (both models)")
    p.add_argument("--compile-backend", choices=list(COMPILE_BACKENDS), default="inductor",
                   help="with --compile (default inductor; aot_eager needs no C compiler)")
    p.add_argument("--kernels", choices=["auto", "plain"], default="auto", help="megamobi's kernel plan (default auto)")
    p.add_argument("--activation-checkpointing", choices=CHECKPOINTING_MODES, default="none",
                   help="megamobi's mode; HF gets full checkpointing for full or selective (it has no selective)")
    p.add_argument("--peak-tflops", type=positive_float, default=None, help="device peak for MFU (H100/H200 dense bf16: 989)")
    p.add_argument("--trainer", action="store_true", help="time the real Trainer step against the plain step instead")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


# --- the models ------------------------------------------------------------------------------------

def hf_llama(config: ModelConfig, *, shared_mlp: bool = True) -> nn.Module:
    """LlamaForCausalLM of megamobi's shape: untied head, no biases, SDPA, one shared MLP module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, use_cache=False, initializer_range=config.init_std)
    hf_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_config)
    if shared_mlp and config.ffn_sharing == "shared":
        shared = model.model.layers[0].mlp
        for layer in model.model.layers:
            layer.mlp = shared  # MobiLlama: ONE feed-forward module called by every layer
    return model


def hf_decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


@dataclasses.dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: object  # () -> None
    static_bytes: int = 0
    times_s: list = dataclasses.field(default_factory=list)
    cpu_times_s: list = dataclasses.field(default_factory=list)  # process CPU time (all threads) per step
    peak_step_bytes: int = 0


def make_step(model: nn.Module, forward_loss, optimizer, x, y):
    def step() -> None:
        loss = forward_loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the Trainer (gradient_clipping 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def adamw(model: nn.Module, device: torch.device):
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **kernel)


def tensor_bytes(model: nn.Module, optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return params + state


def megamobi_contender(config, args, device, dtype, x, y) -> tuple[Contender, str]:
    plan = choose_kernels(mode=args.kernels, on_cuda=device.type == "cuda",
                          precision="fp32" if dtype == torch.float32 else "bf16",
                          compile_backend=args.compile_backend if args.compile else None)
    torch.manual_seed(0)
    with device:  # initialised where it runs: seconds instead of a minute for 0.5B on a GPU machine's CPU
        model = MobiLlama(dataclasses.replace(config, activation_checkpointing=args.activation_checkpointing))
    model = model.to(device, dtype)
    loss_fn = apply_kernels(model, plan, loss_fn=language_model_loss)
    optimizer = adamw(model, device)
    step = make_step(model, lambda a, b: loss_fn(model(a), b), optimizer, x, y)
    return Contender("megamobi", model, optimizer, step), plan.describe()


def hf_contender(config, args, device, dtype, x, y) -> Contender:
    torch.manual_seed(0)
    with device:
        model = hf_llama(config)
    model = model.to(device, dtype)
    model.train()
    if args.activation_checkpointing != "none":
        # transformers >= 5.2x renamed it; the GPU machine's 5.17 may have only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in hf_decoder_layers(model):
            layer.compile(backend=args.compile_backend)
    optimizer = adamw(model, device)
    step = make_step(model, lambda a, b: language_model_loss(model(input_ids=a).logits, b), optimizer, x, y)
    return Contender("hf-llama", model, optimizer, step)


# --- timing ----------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(contender: Contender, device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    contender.step()
    sync(device)
    contender.times_s.append(time.perf_counter() - start)
    contender.cpu_times_s.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        contender.peak_step_bytes = max(contender.peak_step_bytes, torch.cuda.max_memory_allocated() - before)


def figures(*, seconds: list[float], tokens_per_step: int, flops_token: int, peak_tflops: float | None,
            memory_bytes: int | None, cpu_seconds: list[float] | None = None) -> dict:
    """cpu_seconds: the process's CPU time per step (CPU runs only): unlike wall-clock time it hardly
    changes when other jobs share the machine, so it is the figure to compare on a busy CPU."""
    mean = statistics.fmean(seconds)
    tokens_per_s = tokens_per_step / mean
    tflops = flops_token * tokens_per_s / 1e12
    return {"ms_per_step": mean * 1e3, "ms_per_step_min": min(seconds) * 1e3, "tokens_per_s": tokens_per_s,
            "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
            "memory_gb": None if memory_bytes is None else memory_bytes / 2**30, "steps": len(seconds),
            "cpu_ms_per_step": statistics.fmean(cpu_seconds) * 1e3 if cpu_seconds else None}


def compare_with_hf(config, args, device, dtype) -> dict:
    seq, mb = args.seq, args.micro_batch
    tokens = torch.randint(0, config.vocab_size, (mb, seq + 1), device=device, generator=None)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    ours, kernel_line = megamobi_contender(config, args, device, dtype, x, y)
    theirs = hf_contender(config, args, device, dtype, x, y)
    contenders = [ours, theirs]
    for _ in range(args.warmup):
        for c in contenders:
            c.step()
    sync(device)
    for c in contenders:  # the optimizer state exists after the warm-up
        c.static_bytes = tensor_bytes(c.model, c.optimizer)
    for _ in range(args.steps):
        for c in contenders:  # interleaved: both models see the same machine state
            timed(c, device)
    flops_token = flops_per_token(config, seq_len=seq)
    results = {}
    for c in contenders:
        memory = c.static_bytes + c.peak_step_bytes if device.type == "cuda" else None
        results[c.name] = figures(seconds=c.times_s, tokens_per_step=mb * seq, flops_token=flops_token,
                                  peak_tflops=args.peak_tflops, memory_bytes=memory,
                                  cpu_seconds=c.cpu_times_s if device.type == "cpu" else None)
    return {"mode": "megamobi-vs-hf", "kernels": kernel_line, "results": results,
            "ratio": results["megamobi"]["tokens_per_s"] / results["hf-llama"]["tokens_per_s"],
            "ratio_of": "megamobi / hf-llama tokens/s", **cpu_ratio(results["hf-llama"], results["megamobi"])}


def cpu_ratio(reference: dict, measured: dict) -> dict:
    """On CPU, the ratio again by CPU time per step: reference / measured, so that, like the tokens/s
    ratio, above 1 means the measured one (megamobi, the Trainer) is faster."""
    if not (reference["cpu_ms_per_step"] and measured["cpu_ms_per_step"]):
        return {}
    return {"cpu_time_ratio": reference["cpu_ms_per_step"] / measured["cpu_ms_per_step"]}


# --- the Trainer against the plain step --------------------------------------------------------------

def trainer_run_config(config: ModelConfig, args, *, run_dir: Path, shards: Path, steps: int, dtype_name: str):
    from megamobi.config_io import from_dict
    from megamobi.training.run_config import RunConfig

    model = {**dataclasses.asdict(config), "activation_checkpointing": args.activation_checkpointing}
    data = {
        "run_dir": str(run_dir), "model": model, "data": {"paths": [str(shards)], "seed": 1},
        "batch": {"micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch, "seq_len": args.seq},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 1, "weight_decay": 0.1, "clip_grad": 1.0},
        "train": {"steps": steps, "seed": 0, "log_interval": 1, "kernels": args.kernels, "compile": args.compile,
                  "compile_backend": args.compile_backend},
        "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 1},
        "precision": dtype_name, "checkpoint": {"interval_tokens": 0},
        "logging": {"peak_tflops": args.peak_tflops},
    }
    run = from_dict(RunConfig, data, where="bench/throughput.py")
    run.validate(world_size=1)
    return run


def start_single_process_group() -> None:
    from megamobi.distributed import init_distributed

    if torch.distributed.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed()


def compare_trainer_with_plain(config, args, device, dtype) -> dict:
    from megamobi.training.loop import Trainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_shards import write_synthetic_shards

    class BenchTrainer(Trainer):
        def save(self):  # a benchmark keeps no checkpoint (0.5B: ~14 GB written for nothing)
            return None

    seq, mb = args.seq, args.micro_batch
    steps = args.warmup + args.steps
    windows = 2048 // seq
    tokens = torch.randint(0, config.vocab_size, (mb, seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    plain, _ = megamobi_contender(config, args, device, dtype, x, y)

    def time_plain() -> None:
        for _ in range(args.warmup):
            plain.step()
        for _ in range(args.steps):
            timed(plain, device)

    time_plain()
    with tempfile.TemporaryDirectory(prefix="megamobi-bench-") as tmp:
        shards = write_synthetic_shards(Path(tmp) / "shards", samples=-(-steps * mb // windows) + 1,
                                        vocab_size=config.vocab_size)
        run = trainer_run_config(config, args, run_dir=Path(tmp) / "run", shards=shards, steps=steps,
                                 dtype_name="bf16" if dtype == torch.bfloat16 else "fp32")
        start_single_process_group()
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated()  # the plain contender's model, held meanwhile
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's step lines; stdout keeps the report
            trainer = BenchTrainer(run)
            cpu_start = time.process_time()
            trainer.train()
            trainer_cpu = (time.process_time() - cpu_start) / steps  # warm-up steps included
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        trainer_times = [m["step_time_s"] for m in lines if "step_time_s" in m][args.warmup:]
        trainer_memory = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
        kernel_line = trainer.kernels.describe()
        del trainer
    time_plain()  # again after the Trainer: the plain figure is the mean of both sides of it
    flops_token = flops_per_token(config, seq_len=seq)
    plain_memory = None
    if device.type == "cuda":
        plain.static_bytes = tensor_bytes(plain.model, plain.optimizer)
        plain_memory = plain.static_bytes + plain.peak_step_bytes
    results = {
        "trainer": figures(seconds=trainer_times, tokens_per_step=mb * seq, flops_token=flops_token,
                           peak_tflops=args.peak_tflops, memory_bytes=trainer_memory,
                           cpu_seconds=[trainer_cpu] if device.type == "cpu" else None),
        "plain": figures(seconds=plain.times_s, tokens_per_step=mb * seq, flops_token=flops_token,
                         peak_tflops=args.peak_tflops, memory_bytes=plain_memory,
                         cpu_seconds=plain.cpu_times_s if device.type == "cpu" else None),
    }
    return {"mode": "trainer-vs-plain", "kernels": kernel_line, "results": results,
            "ratio": results["trainer"]["tokens_per_s"] / results["plain"]["tokens_per_s"],
            "ratio_of": "trainer / plain tokens/s", **cpu_ratio(results["plain"], results["trainer"])}


# --- report --------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    head = (f"{report['config']}: micro batch {report['micro_batch']} x seq {report['seq']}, {report['dtype']} on "
            f"{report['device_name']}, {'compiled (' + report['compile_backend'] + ')' if report['compile'] else 'eager'}, activation checkpointing "
            f"{report['activation_checkpointing']}, {report['steps']} timed steps after {report['warmup']} warm-up "
            f"({report['date']}, torch {report['torch']}, transformers {report['transformers']})")
    rows = [head, f"  {report['kernels']}",
            f"  {'':10} {'ms/step':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'memory GB':>10} {'CPU ms/step':>12}"]
    for name, r in report["results"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['memory_gb']:.2f}" if r["memory_gb"] is not None else "n/a"
        cpu = f"{r['cpu_ms_per_step']:.1f}" if r.get("cpu_ms_per_step") else "n/a"
        rows.append(f"  {name:10} {r['ms_per_step']:>10.1f} {r['tokens_per_s']:>12,.0f} {r['tflops']:>9.3f} {mfu:>7} {mem:>10} {cpu:>12}")
    if report.get("cpu_time_ratio"):
        rows.append(f"  the same ratio by CPU time per step (busy machines): {report['cpu_time_ratio']:.3f}")
    rows.append(f"  ratio {report['ratio_of']}: {report['ratio']:.3f}")
    return "\n".join(rows)


class UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_benchmark(args)
    except UsageError as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else table(report), flush=True)
    return 0


def run_benchmark(args) -> dict:
    """The whole measurement for parsed arguments; UsageError for a bad combination."""
    try:
        config = load_model_config(args.config)
    except (ConfigError, OSError) as err:
        raise UsageError(f"--config {args.config}: {err}") from None
    args.seq = args.seq or min(2048, config.max_seq_len)
    if args.seq > config.max_seq_len:
        raise UsageError(f"--seq {args.seq} is longer than {config.name}'s max_seq_len {config.max_seq_len}")
    if args.trainer and 2048 % args.seq:
        raise UsageError(f"--trainer needs a --seq that divides 2048 (shard samples), got {args.seq}")
    from megamobi.cli_support import UserError
    from megamobi.devices import check_device

    try:
        device = torch.device(check_device(args.device))
    except UserError as err:
        raise UsageError(str(err)) from None
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    run = compare_trainer_with_plain if args.trainer else compare_with_hf
    outcome = run(config, args, device, dtype)
    import transformers

    return {
        "config": config.name, "seq": args.seq, "micro_batch": args.micro_batch, "dtype": dtype_name,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "compile": args.compile, "compile_backend": args.compile_backend if args.compile else None,
        "activation_checkpointing": args.activation_checkpointing,
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
        "flops_per_token": flops_per_token(config, seq_len=args.seq),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "transformers": transformers.__version__,
        **outcome,
    }


if __name__ == "__main__":
    sys.exit(main())
