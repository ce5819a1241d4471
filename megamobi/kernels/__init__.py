"""Kernel choices applied to a built model from outside megamobi/model.py (which stays plain PyTorch).

    attention.py  flash-attn when importable (CUDA, bf16/fp16), else PyTorch SDPA
    liger.py      liger-kernel's fused RMSNorm, rotary, SwiGLU and linear + cross entropy (CUDA only)
    loss.py       the plain-PyTorch chunked linear + cross entropy (never the full fp32 logits)
    compile.py    torch.compile of each decoder layer (the shared FFN inside each layer's graph)
    plan.py       choose_kernels() / apply_kernels(): what the Trainer calls; one log line says what ran

`train.kernels: auto | plain` and `train.compile` in the run config choose (docs/performance.md).
"""
