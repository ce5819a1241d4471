"""Training-step throughput of the plain model on one device: tokens/s, TFLOP/s and MFU.

    python bench/bench_train.py --config tiny --batch 8 --seq-len 256                       # CPU, fp32
    python bench/bench_train.py --config mobillama-0.5b --batch 8 --seq-len 2048 \
        --device cuda --dtype bf16 --peak-tflops 989 --compile                              # one H100/H200

FLOPs count the shared FFN once per layer (what the hardware computes), as the training log does.
Prints one line per measurement; no assertions: speed goals live here, not in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from megamobi.model import MobiLlama, flops_per_token, language_model_loss
from megamobi.model_config import load_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    config = dataclasses.replace(load_model_config(args.config), max_seq_len=max(args.seq_len, 1),
                                 activation_checkpointing=args.activation_checkpointing)
    device = torch.device(args.device)
    model = MobiLlama(config).to(device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with autocast:
            loss = language_model_loss(step_model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.batch * args.seq_len / seconds
    tflops = flops_per_token(config, seq_len=args.seq_len) * tokens_per_s / 1e12
    mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
    print(f"{config.name} batch {args.batch} x seq {args.seq_len} {args.dtype} on {args.device}"
          f"{' compiled' if args.compile else ''}: {seconds * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, "
          f"{tflops:.3f} TFLOP/s, MFU {mfu}")


if __name__ == "__main__":
    main()
