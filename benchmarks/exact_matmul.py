"""How gguf-exact should multiply: one 4-bit (Q4_1-shaped) matrix at SmolLM2 and Llama-2-7B shapes, in
float32 three ways: dense float32 weights (the float32 split), gguf-exact's row blocks dequantized into
float32 (`QuantizedLinear` kind q4), and PyTorch's int4 CPU kernel fed float32 activations and scales.

`python -m benchmarks.exact_matmul [--threads N]`: median ms over interleaved runs, for 1 and 16 rows
of activations (decode, prefill). Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lambdasplit.split.quantize import QuantizedLinear

SHAPES = ((1536, 576), (49152, 576), (11008, 4096), (4096, 11008))


def _median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # interleaved, so a busy moment of a shared host hits every variant alike
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def variants(rows: int, cols: int, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    groups = cols // 32
    q = torch.randint(0, 16, (rows, groups, 32), generator=generator, dtype=torch.uint8)
    d = (torch.rand(rows, groups, generator=generator) * 0.01).half().float()
    m = (-7.5 * d).half().float()
    dense = (d[..., None] * q.float() + m[..., None]).reshape(rows, cols)
    blocks = QuantizedLinear(nn.Linear(cols, rows, bias=False), "q4")
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, cols // 2)
    blocks.load_state_dict({"weight": packed, "weight_block_scale": d, "weight_block_min": m}, assign=True)
    kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(rows, cols).int(), 1)
    scales = torch.stack([d.t(), (m + 8 * d).t()], -1).contiguous()
    return {"dense float32": lambda: F.linear(x, dense), "gguf-exact blocks": lambda: blocks(x),
            "int4 kernel, float32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel, 32, scales)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.write(f"threads {args.threads}\n\n| matrix | rows of x | dense float32 ms | gguf-exact blocks ms | int4 kernel, float32 ms |\n"
                     "|---|---|---|---|---|\n")
    for rows, cols in SHAPES:
        for tokens in (1, 16):
            x = torch.randn(tokens, cols)
            ms = _median_ms(variants(rows, cols, x), 3 if rows * cols > 10**7 and tokens > 1 else 9)
            sys.stdout.write(f"| {rows} x {cols} | {tokens} | " + " | ".join(f"{v:.2f}" for v in ms.values()) + " |\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
