"""Optional speed-ups of a loaded body, applied once before it serves (`serve --compile`,
`serve --quantize fp8`); both off by default.

- compile: `torch.compile` of every part of each decoder layer except its attention (the norms
  and the MLP: RMSNorm and SiLU-times-up fused into one kernel each), dynamic in the packed
  length so prefill chunks of any size reuse one compiled graph. Attention stays the paged
  hook, eager (its Python plan would only break the graph). The CUDA-graph capture then records
  the compiled kernels, so compiled and graphs combine.
- fp8: torchao's float8 weights with one scale per output row and activations quantised per row
  on the fly (`Float8DynamicActivationFloat8WeightConfig`), on GPUs of compute capability >= 8.9
  (Hopper, Ada): half the weight bytes of bf16 per decode step. It changes the hidden states;
  `benchmarks serve-gpu` reports by how much, and a device's greedy tokens against bf16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.errors import LambdaSplitError

log = logging.getLogger(__name__)

QUANTIZE = ("fp8",)  # body weight formats besides the model's own dtype


@dataclass(frozen=True)
class BodyOptions:
    """How a body's layers run: compiled or not, and the format of its linear weights."""

    compile: bool = False
    quantize: str | None = None  # None (the serving dtype) or "fp8"

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise LambdaSplitError(f"--quantize {self.quantize!r}: the body supports {', '.join(QUANTIZE)}")


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    layers = getattr(module, "layers", None)
    return list(layers) if layers is not None else []


def optimize(module: nn.Module, options: BodyOptions) -> None:
    """Apply `options` to a body module in place (fp8 first: compile then sees the fp8 layers)."""
    if options.quantize == "fp8":
        quantize_fp8(module)
    if options.compile:
        compile_layers(module)


def compile_layers(module: nn.Module) -> int:
    """Compile every child of every decoder layer but its attention; the number compiled."""
    count = 0
    for layer in decoder_layers(module):
        for name, child in layer.named_children():
            if name != "self_attn" and any(True for _ in child.parameters()):
                child.compile(dynamic=True)
                count += 1
    log.info("compiled %d decoder-layer modules (norms and MLPs; attention stays eager)", count)
    return count


def quantize_fp8(module: nn.Module) -> None:
    """The decoder layers' linear weights as float8 (e4m3) with per-row scales, via torchao."""
    device = next(module.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise LambdaSplitError("--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                               f"the body is on {device}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise LambdaSplitError("--quantize fp8 needs torchao: pip install 'lambdasplit[fp8]'") from exc
    for layer in decoder_layers(module):
        quantize_(layer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    log.info("body linear weights quantised to float8 (per-row scales, dynamic activations)")
