"""Optional speed-ups of a loaded body, applied once before it serves (`serve --compile`,
`serve --quantize fp8`); both off by default.

- compile: `torch.compile` of every part of each decoder layer except its attention (the norms
  and the MLP: RMSNorm and SiLU-times-up fused into one kernel each), dynamic in the packed
  length so prefill chunks of any size reuse one compiled graph. Attention stays the paged
  hook, eager (its Python plan would only break the graph). The CUDA-graph capture then records
  the compiled kernels, so compiled and graphs combine. A warm-up at load runs the compiled parts
  on a tiny input of the body's device and dtype, so a compiler that cannot work (no C++
  compiler, an inductor error) stops start-up with one error instead of failing every session.
- fp8: torchao's float8 weights with one scale per output row and activations quantised per row
  on the fly (`Float8DynamicActivationFloat8WeightConfig`), on GPUs of compute capability >= 8.9
  (Hopper, Ada): half the weight bytes of bf16 per decode step. It changes the hidden states;
  `benchmarks serve-gpu` reports by how much, and a device's greedy tokens against bf16.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.errors import LambdaSplitError
from lambdasplit.split.parts import SKINNY_ROWS

log = logging.getLogger(__name__)

QUANTIZE = ("fp8",)  # body weight formats besides the model's own dtype
BACKEND: str | Callable = "inductor"  # torch.compile's backend (tests swap in one that counts or fails)
# Packed positions the warm-up runs, so the first sessions compile nothing: the length is dynamic,
# but Dynamo specialises a size of 1 (a single decode row), and a float32 CPU body's projections
# take 2 to SKINNY_ROWS positions another way (`split.parts.SkinnyLinear`), a range it guards on.
WARM_UP_LENGTHS = (2, SKINNY_ROWS + 1, 1)


@dataclass(frozen=True)
class BodyOptions:
    """How a body's layers run: compiled or not, and the format of its linear weights."""

    compile: bool = False
    quantize: str | None = None  # None (the serving dtype) or "fp8"
    paged_kernel: bool = True  # short chunks' attention reads the KV pool in place on a GPU (engine.decode_kernel)

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise LambdaSplitError(f"--quantize {self.quantize!r}: the body supports {', '.join(QUANTIZE)}")


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    layers = getattr(module, "layers", None)
    return list(layers) if layers is not None else []


def optimize(module: nn.Module, options: BodyOptions, dtype: torch.dtype) -> None:
    """Apply `options` to a body module in place (fp8 first: compile then sees the fp8 layers);
    a compiled body is warmed up on hidden states of `dtype`, the dtype it serves in."""
    if options.quantize == "fp8":
        quantize_fp8(module)
    if options.compile:
        compile_layers(module)
        warm_up(module, dtype)


def compiled_parts(module: nn.Module) -> Iterator[nn.Module]:
    """Every child of every decoder layer but its attention that has weights (norms, MLP)."""
    for layer in decoder_layers(module):
        for name, child in layer.named_children():
            if name != "self_attn" and any(True for _ in child.parameters()):
                yield child


def compile_layers(module: nn.Module) -> int:
    """Compile every part `compiled_parts` names; the number compiled."""
    count = 0
    for child in compiled_parts(module):
        child.compile(backend=BACKEND, dynamic=True)
        count += 1
    log.info("compiled %d decoder-layer modules (norms and MLPs; attention stays eager)", count)
    return count


def warm_up(module: nn.Module, dtype: torch.dtype) -> None:
    """Run every compiled part once per length of WARM_UP_LENGTHS, on the body's device in `dtype`
    and in inference mode as steps run: compiling happens here, and a failure is one error naming
    --compile and its cause rather than a failed step in every session."""
    device = next(module.parameters()).device
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for length in WARM_UP_LENGTHS:
                hidden = torch.ones(1, length, module.config.hidden_size, dtype=dtype, device=device)
                for child in compiled_parts(module):
                    child(hidden)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the compiled body cannot serve
        cause = getattr(exc, "inner_exception", None) or exc  # Dynamo wraps the backend's own error
        lines = str(cause).strip().splitlines()
        reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
        raise LambdaSplitError(f"--compile: compiling the body at start-up failed ({reason}); "
                               "fix the compiler (on the CPU inductor needs a working C++ compiler) or serve "
                               "without --compile") from exc
    log.info("compiled body warmed up on %s in %.1f s", device, time.perf_counter() - started)


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
