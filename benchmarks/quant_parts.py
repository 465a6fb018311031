"""Which device part's quantization changes SmolLM2's greedy tokens, and which grid keeps them.

`python -m benchmarks.quant_parts [--prompts N] [VARIANT ...]`: each variant rounds the weights of
one part (embeddings `emb`, the head's and tail's projections `layers`, the LM head `lm`) to a grid
and computes in float32 (fake quantization: the weight error alone), or runs the int4 CPU kernel
(`layers:k4f32` float32 activations and scales, `layers:k4bf16` bf16 ones), or loads the shipped
device parts, named as `python -m benchmarks agreement --schemes` names them (`bfloat16`, `int8`,
`int4`, `gguf-exact`). Grids: `c8` int8 per output channel, `s8g32` int8 symmetric per group of 32,
`a4g32` 4-bit min/max per group of 32 (`a4g32b`: bf16 scale and zero); parts join with `+`. Any
other name is refused before anything loads. A prompt's 64
greedy tokens equal the float32 split's iff every teacher-forced argmax along the float32 reply
equals it, so one forward per prompt measures greedy identity (float32 itself scores 40/40).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.agreement import PROMPTS, argmaxes, greedy
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.engine.local import load_local_body
from lambdasplit.split.quantize import SCHEMES

SPLIT = (2, 2)
SHIPPED = ("bfloat16", *SCHEMES)  # the device parts `SplitRuntime.load` gives (agreement.py's schemes)
PARTS = ("emb", "lm", "layers")
KERNELS = ("k4f32", "k4bf16")  # projections only
DEFAULT = ["emb:id", "bfloat16", "int8", "int4", "gguf-exact", "emb:c8", "lm:c8", "layers:c8", "emb:c8+lm:c8+layers:c8",
           "layers:a4g32", "emb:s8g32", "lm:s8g32", "emb:s8g32+lm:s8g32+layers:a4g32", "layers:k4f32",
           "layers:k4bf16", "layers:a4g32b"]


def _groups(w: torch.Tensor, size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, size)


def int8_channel(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / s).clamp(-127, 127) * s


def int8_sym32(w: torch.Tensor) -> torch.Tensor:
    x = _groups(w, 32)
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(x / s).clamp(-127, 127) * s).reshape(w.shape)


def _min_max(levels: int, size: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def grid(w: torch.Tensor) -> torch.Tensor:
        x = _groups(w, size)
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = ((high - low) / levels).clamp(min=1e-12).to(dtype).float()
        z = low.to(dtype).float()
        return (torch.round((x - z) / s).clamp(0, levels) * s + z).reshape(w.shape)
    return grid


GRIDS = {"id": lambda w: w, "c8": int8_channel, "s8g32": int8_sym32, "a4g32": _min_max(15, 32, torch.float32),
         "a4g32b": _min_max(15, 32, torch.bfloat16)}


class Int4Kernel(nn.Module):
    """`aten._weight_int4pack_mm_for_cpu`, groups of 32 (min/max), activations and scales in `dtype`."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        rows, cols = w.shape
        x = _groups(w, 32)
        low, high = x.amin(-1), x.amax(-1)
        s = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((x - low[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).reshape(rows, cols)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales = torch.stack([s.t(), (low + 8 * s).t()], -1).to(dtype).contiguous()
        self.dtype, self.rows = dtype, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(self.dtype), self.packed, 32, self.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.rows)


def _set(module: nn.Module, grid: Callable[[torch.Tensor], torch.Tensor]) -> None:
    module.weight = nn.Parameter(grid(module.weight.detach().float()), requires_grad=False)  # untied from the other table


def apply(runtime: SplitRuntime, variant: str) -> None:
    """Round or swap the parts that `variant` names (see the module docstring)."""
    for item in variant.split("+"):
        part, _, how = item.partition(":")
        if part == "emb":
            _set(runtime.head.module.embed_tokens, GRIDS[how])
        elif part == "lm":
            _set(runtime.tail.module.lm_head, GRIDS[how])
        elif part == "layers":
            for module in (runtime.head.module, runtime.tail.module):
                for name, child in list(module.named_modules()):
                    if not isinstance(child, nn.Linear) or name.endswith("lm_head"):
                        continue
                    if how.startswith("k4"):
                        parent, _, attribute = name.rpartition(".")
                        kernel = Int4Kernel(child, torch.float32 if how == "k4f32" else torch.bfloat16)
                        setattr(module.get_submodule(parent), attribute, kernel)
                    else:
                        _set(child, GRIDS[how])


def known(variant: str) -> bool:
    """Whether `variant` names shipped device parts or PART:GRID items this benchmark applies (an
    unknown part was skipped silently, measuring float32 under the variant's name)."""
    if variant in SHIPPED:
        return True
    for item in variant.split("+"):
        part, _, how = item.partition(":")
        if part not in PARTS or how not in (*GRIDS, *(KERNELS if part == "layers" else ())):
            return False
    return True


def load(variant: str) -> SplitRuntime:
    if variant == "bfloat16":
        return SplitRuntime.load(None, SPLIT, dtype="bfloat16")
    if variant in SCHEMES:
        return SplitRuntime.load(None, SPLIT, quantize=variant)
    runtime = SplitRuntime.load(None, SPLIT)
    apply(runtime, variant)
    return runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=DEFAULT)
    parser.add_argument("--prompts", type=int, default=40)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if not known(v)]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(map(repr, unknown))}: use {', '.join(SHIPPED)} (shipped device parts) or "
                     f"PART:GRID[+PART:GRID...] with PART in {', '.join(PARTS)} and GRID in {', '.join(GRIDS)} "
                     f"({', '.join(KERNELS)} for layers)")
    prompts = json.loads(PROMPTS.read_text())[: args.prompts]
    body = load_local_body(None, SPLIT)
    reference = greedy(SplitRuntime.load(None, SPLIT), body, prompts, 64, 8)
    for variant in args.variants:
        start, runtime = time.perf_counter(), load(variant)
        identical = agree = positions = 0
        for prompt, row in zip(prompts, reference, strict=True):
            same = argmaxes(runtime, body, prompt, row + [0])[: len(row)] == torch.tensor(row)
            identical += bool(same.all())
            agree, positions = agree + int(same.sum()), positions + len(row)
        sys.stdout.write(f"| {variant} | {identical}/{len(prompts)} ({identical / len(prompts):.1%}) | "
                         f"{agree / positions:.2%} | {time.perf_counter() - start:.0f} s |\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
