"""Paged decode attention: one query position per row, its keys read from the KV pool in place.

The SDPA path of `engine.step` first gathers every row's keys and values out of the pool into a
padded batch, then attends under a mask. On one H100 (7B body, 64 decode rows, torch profiler of a
replayed step) the gather took 2.35 ms and the padded attention 2.50 ms of a 12.65 ms step. This
Triton kernel (one program per row and query head, an online softmax over blocks of keys) finds
each key through the row's block table and stops at the row's own last key, so nothing is copied
and the key length is a loop bound read on the device, not a tensor shape: a CUDA graph captured
for some rows serves every length its block table can hold.

It computes what the SDPA path computes for a query of length one: keys 0..q of its row (q: the
query's index among them), those flagged valid in the pool, within the sliding window if any, the
query's own key always (a padding row attends to itself, so no row is all masked). A position of
a draft tree (a TREE frame) is a row too: its `frame` gives the row's first key of the frame and a
64-bit mask of the frame's keys it may see (its ancestors and itself), so siblings that precede it
in frame order stay hidden, as under the SDPA path's tree mask, and a tree joins the CUDA graph of
a decode step instead of making it run eagerly. Triton is
imported lazily. The tests run the kernel on CPU tensors through Triton's interpreter
(`TRITON_INTERPRET=1` before triton is first imported, and `CPU_INTERPRETER`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from lambdasplit.engine.kvpool import BLOCK_SIZE

KEYS_PER_ITERATION = 64  # keys each loop iteration loads: 4 pool blocks
NO_WINDOW = 1 << 30  # the window of a layer without one: longer than any row
NO_FRAME = 1 << 40  # the frame start of a row outside any draft tree: past any key
FRAME_KEYS = 64  # keys of a draft tree's frame a row's ancestor mask covers (one int64)
# Chunks of up to this many positions per row attend through the kernel, each position as a row of
# its own: it reads its keys alone, so T positions over L keys read T x L keys where a tiled
# prefill kernel reads L. Short chunks (speculative verification, short prompts) then join a
# decode step's CUDA graph instead of making the whole step run eagerly.
MAX_POSITIONS = 64
CPU_INTERPRETER = False  # tests: CPU bodies use the kernel too, run by Triton's interpreter


def available(device: torch.device) -> bool:
    """The kernel can run here: Triton is installed and the tensors are on a GPU (or, in tests,
    on the CPU under Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (CPU_INTERPRETER and device.type == "cpu")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode(q_ptr, k_ptr, v_ptr, valid_ptr, table_ptr, last_ptr, base_ptr, bits_ptr, out_ptr,
               stride_qr, stride_qh, stride_kslot, stride_khead, stride_table, stride_or, stride_oh,
               scale, window, width,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
               KEYS: tl.constexpr, TREE: tl.constexpr, FRAME: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        dims = tl.arange(0, DIM)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qr + head * stride_qh + dims, mask=in_dim, other=0.0).to(tl.float32)
        q = q * scale
        last = tl.load(last_ptr + row)  # the query's index among its row's keys
        first = tl.maximum(last - window + 1, 0)  # window: 2**30 for none
        best = tl.full((), -1.0e30, tl.float32)  # finite: a block with every key masked adds nothing
        total = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((DIM,), dtype=tl.float32)
        if TREE:
            base = tl.load(base_ptr + row)  # the row's first key of its tree's frame (NO_FRAME: none)
            bits = tl.load(bits_ptr + row)  # bit j: the frame's key j is an ancestor of the row, or itself
        start = (first // KEYS) * KEYS
        while start <= last:  # a while, not a range: Triton's interpreter cannot take a loaded bound
            keys = start + tl.arange(0, KEYS)
            in_table = keys < width * BLOCK  # a `last` past the row's table reads only that table, as SDPA's gather
            inside = (keys >= first) & (keys <= last) & in_table
            block = tl.load(table_ptr + row * stride_table + keys // BLOCK, mask=inside, other=0)
            slot = block * BLOCK + keys % BLOCK
            allowed = (inside & (tl.load(valid_ptr + slot, mask=inside, other=0) != 0)) | ((keys == last) & in_table)
            if TREE:
                offset = keys - base
                in_frame = (offset >= 0) & (offset < FRAME)
                seen = ((bits >> tl.where(in_frame, offset, 0)) & 1) != 0
                allowed = allowed & (seen | (in_frame == 0))
            offsets = slot[:, None] * stride_kslot + kv_head * stride_khead + dims[None, :]
            load_mask = allowed[:, None] & in_dim[None, :]
            k = tl.load(k_ptr + offsets, mask=load_mask, other=0.0).to(tl.float32)
            scores = tl.where(allowed, tl.sum(k * q[None, :], axis=1), float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            rescale = tl.exp(best - new_best)
            v = tl.load(v_ptr + offsets, mask=load_mask, other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(weights[:, None] * v, axis=0)
            total = total * rescale + tl.sum(weights, axis=0)
            best = new_best
            start += KEYS
        out = acc / total
        tl.store(out_ptr + row * stride_or + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim)

    return triton, decode


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                     table: torch.Tensor, last: torch.Tensor, scale: float, window: int | None = None,
                     frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one query per row over that row's keys in the pool.

    query (rows, Hq, d) with unit stride in d; keys/values (slots, Hkv, d) contiguous, one layer of
    the pool; valid (slots,) bool; table (rows, W) block ids, enough to hold keys 0..last; last
    (rows,) the query's index among its row's keys; frame: draft-tree rows' (base, bits), both
    (rows,) int64: of keys base..base+63 the row sees key base+j only where bit j of bits is set
    (base `NO_FRAME` for a row outside any tree). Returns (rows, Hq, d) in the query's dtype.
    """
    rows, heads, dim = query.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} key/value heads evenly")
    if query.stride(-1) != 1 or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("decode_attention needs unit stride along the head dimension and a contiguous pool")
    if table.stride(-1) != 1 or not last.is_contiguous():
        raise ValueError("decode_attention needs block tables with unit stride along a row and contiguous query indices")
    if frame is not None and window is not None:
        raise ValueError("a draft tree cannot attend within a sliding window (a window counts storage slots)")
    if frame is not None and not (frame[0].is_contiguous() and frame[1].is_contiguous()):
        raise ValueError("decode_attention needs contiguous frame starts and ancestor masks")
    triton, kernel = _kernel()
    out = torch.empty(rows, heads, dim, dtype=query.dtype, device=query.device)
    if rows == 0:
        return out
    base, bits = frame if frame is not None else (last, last)  # not read without TREE
    kernel[(rows, heads)](
        query, keys, values, valid.view(torch.uint8), table, last, base, bits, out,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), table.stride(0), out.stride(0),
        out.stride(1), scale, window or NO_WINDOW, table.shape[1],
        GROUP=heads // kv_heads, HEAD_DIM=dim, DIM=triton.next_power_of_2(dim), BLOCK=BLOCK_SIZE,
        KEYS=KEYS_PER_ITERATION, TREE=frame is not None, FRAME=FRAME_KEYS, num_warps=4,
    )
    return out


def self_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
               frames: bool = False) -> str | None:
    """Run the kernel on a small random pool of a body's shape and compare it with plain attention
    over the same keys: what went wrong (a kernel Triton cannot build for this GPU, or a wrong or
    non-finite result), or None. One row spans three loop iterations, a tenth of the slots are
    masked out, and a sliding window is tried too, so a kernel wrong only past its first 64 keys,
    or in its masks, is caught. A body that gets a problem attends through gather + SDPA instead.
    `frames`: check the draft-tree variant instead (a frame mask over one row's last 64 keys, bit
    63 included, beside a row outside any frame); a body whose check fails verifies no trees."""
    gen = torch.Generator(device=device).manual_seed(0)
    slots, scale = 13 * BLOCK_SIZE, head_dim ** -0.5
    keys = torch.randn(slots, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    values = torch.randn(slots, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    query = torch.randn(2, heads, head_dim, device=device, dtype=dtype, generator=gen)
    valid = torch.rand(slots, device=device, generator=gen) > 0.1
    table = torch.tensor([[7, 3, 9, 1, 10, 4, 2, 8, 6, 5], [12, 11, 0, 0, 0, 0, 0, 0, 0, 0]], device=device)
    last = torch.tensor([149, 20], device=device)  # 150 keys: three iterations, the last one partial
    group = heads // kv_heads
    frame = (torch.tensor([149 - FRAME_KEYS + 1, NO_FRAME], device=device),  # row 0's last 64 keys
             torch.tensor([-0x5A5A5A5A5A5A5A5B, 0], device=device))  # 0xA5A5...A5: bit 63 and its own key (bit 63) set
    cases = ((None, frame),) if frames else ((None, None), (3 * BLOCK_SIZE, None))  # windows: multiples of 16, as real ones
    for window, rows_frame in cases:
        try:
            out = decode_attention(query, keys, values, valid, table, last, scale, window, rows_frame).float()
        except Exception as exc:  # noqa: BLE001 - any failure to build or run means: do not use it here
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        for r in range(len(last)):
            n = int(last[r]) + 1
            index = (table[r].unsqueeze(-1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).view(-1)[:n]
            allowed = valid[index].clone()
            if window is not None:
                allowed[: max(0, n - window)] = False
            if rows_frame is not None:
                base, bits = int(rows_frame[0][r]), int(rows_frame[1][r])
                for key in range(base, min(base + FRAME_KEYS, n)):
                    allowed[key] &= bool((bits >> (key - base)) & 1)
            allowed[-1] = True
            k = keys[index].float().repeat_interleave(group, 1).transpose(0, 1)
            v = values[index].float().repeat_interleave(group, 1).transpose(0, 1)
            scores = (k @ query[r].float().unsqueeze(-1)).squeeze(-1).mul(scale)
            expected = (scores.masked_fill(~allowed, float("-inf")).softmax(-1).unsqueeze(1) @ v).squeeze(1)
            error = ((out[r] - expected).norm() / expected.norm()).item()
            if not error < 2e-2:  # NaN included
                return f"its output differs from plain attention by {error:.3g} (relative L2)"
    return None
