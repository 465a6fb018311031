"""One layer's decode attention on a GPU: the paged kernel against gather + SDPA (issue 22 item 4).

Both run through the body's own attention hook (`engine.step.paged_attention`, which also writes
the new key and value into the pool) over one pool of a 7B layer's shape (32 heads of 128, bf16),
for 1, 64 and 256 rows at 64, 512 and 2048 keys per row (the rows get their blocks in shuffled order).
Each variant is captured in a CUDA graph and its replays timed (median, `triton.testing.do_bench`),
so kernel launches are out of the numbers as they are in the server's graph steps. The kernel's
output is compared with SDPA's in float32 on the same inputs. A third variant runs the kernel with
draft-tree frame inputs on every row, all outside any tree: what the draft-tree variant costs
rows that need no mask (the outputs must be identical). Writes decode-kernel.json.

    python3 -m benchmarks decode-kernel
"""

from __future__ import annotations

import types

import torch

from benchmarks.common import environment, write

NAME = "decode-kernel"
HEADS, HEAD_DIM = 32, 128


def _case(rows: int, keys: int, gen: torch.Generator) -> dict:
    import triton.testing

    from lambdasplit.engine.decode_kernel import NO_FRAME
    from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, Sequence
    from lambdasplit.engine.step import Chunk, StepPlan, paged_attention, plan_step

    per_row = -(-keys // BLOCK_SIZE) + 1
    pool = KVPool(1, HEADS, HEAD_DIM, rows * per_row + 3, torch.bfloat16, "cuda")
    pool.keys[0].normal_(generator=gen)
    pool.values[0].normal_(generator=gen)
    seqs = [Sequence() for _ in range(rows)]
    assert pool.grow(seqs, keys)  # blocks handed out row after row, then shuffled below
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    blocks = [seqs[i].blocks for i in order.tolist()]
    for seq, b in zip(seqs, blocks, strict=True):
        seq.blocks, seq.length, seq.valid = b, keys - 1, keys - 1
    pool.valid.fill_(True)
    chunk = Chunk(seqs, torch.zeros(rows, 1, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                  torch.ones(rows, 1, dtype=torch.long))
    step = plan_step([chunk])
    query = torch.randn(1, HEADS, rows, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    new = torch.randn(1, HEADS, rows, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    layer = types.SimpleNamespace(layer_idx=0)
    out: dict = {"rows": rows, "keys": keys}
    results = {}
    frames = (torch.full((rows,), NO_FRAME, device="cuda"), torch.zeros(rows, dtype=torch.long, device="cuda"))
    for name, kernel, frame in (("gather_sdpa", False, None), ("paged_kernel", True, None), ("paged_kernel_frames", True, frames)):
        plan: StepPlan = step.device_plan(pool, kernel)
        plan.groups[0].frame = frame

        def run(plan=plan):
            return paged_attention(layer, query, new, new, None, scaling=HEAD_DIM ** -0.5, lambdasplit_step=plan)[0]

        results[name] = run().float()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            run()
        out[f"{name}_us"] = 1000 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    diff = results["paged_kernel"] - results["gather_sdpa"]
    out["relative_l2"] = (diff.norm() / results["gather_sdpa"].norm()).item()
    out["max_abs_diff"] = diff.abs().max().item()
    out["speedup"] = out["gather_sdpa_us"] / out["paged_kernel_us"]
    out["frames_overhead"] = out["paged_kernel_frames_us"] / out["paged_kernel_us"]
    out["frames_identical"] = torch.equal(results["paged_kernel_frames"], results["paged_kernel"])
    read = 2 * rows * keys * HEADS * HEAD_DIM * 2  # the keys and values each row attends to, bf16
    out["kernel_read_tb_s"] = read / (out["paged_kernel_us"] * 1e-6) / 1e12
    return out


def run_decode_kernel() -> dict:
    assert torch.cuda.is_available(), "the decode-kernel benchmark needs a CUDA device"
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for rows in (1, 64, 256):
        for keys in (64, 512, 2048):
            cases.append(_case(rows, keys, gen))
            print(f"[decode-kernel] {cases[-1]}", flush=True)
            torch.cuda.empty_cache()
    payload = {"suite": NAME, "environment": environment("cuda"), "heads": HEADS, "head_dim": HEAD_DIM, "cases": cases}
    write(NAME, payload)
    return payload
