"""torch.compile of each decoder layer, in place (nn.Module.compile), so parameter names, state_dict
keys and DeepSpeed's hooks stay as they are.

The shared FFN is called inside every layer's forward, so it is compiled as part of each layer's
graph (Inductor fuses its SiLU * up with the surrounding element-wise work). Every layer has the
same code and shapes, and Dynamo treats module parameters as inputs, so one compiled graph serves
all 22 layers. Activation checkpointing keeps working: "full" wraps the compiled layer in
torch.utils.checkpoint, "selective" puts the checkpointed attention block inside the compiled graph
(Dynamo's activation-checkpoint higher-order op).
"""

from __future__ import annotations

from torch import nn

from megamobi.model import DecoderLayer

COMPILE_BACKENDS = ("inductor", "aot_eager")


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor") -> int:
    """Compile every DecoderLayer of a (tensor-parallel T = 1) MobiLlama in place; returns how many."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
