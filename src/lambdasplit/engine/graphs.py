"""CUDA graphs of the batched step: captured once per (rows, block-table width, tree or not) bucket, replayed.

An eager decode step of a 7B body launches about 1,100 kernels; on an H200 their host-side cost
(~40 ms for 64 rows under the profiler) is several times the GPU work (10.5 ms). A graph replays
them in one launch. Each bucket owns static input buffers (hidden states, position ids, the slots
to write, the block tables, the query slots); a step of n rows pads to the bucket's row count
with rows that write only the pool's scratch slot and read only the zero block. With the paged
decode kernel (`engine.decode_kernel`) a row's key length is a loop bound on the device, so the
block tables only need room: their width rounds up to a power of two (8 blocks, 128 keys, at
least), a handful of graphs per row count for any context. With gather + SDPA the gathered keys
are a tensor shape, and their count rounds up to a multiple of `LENGTH_BUCKET` (the extra keys
are masked out).

With the kernel a graph's "rows" are packed positions, each one query with its own block table
and query index (`Step.kernel_rows`), so one graph replays decode rows, speculative verification
frames and short prefill chunks (up to `decode_kernel.MAX_POSITIONS` positions per row) alike:
a mixed step costs a replay, not the ~1,100 launches of an eager step. A draft tree's positions
are such rows too, each with its frame's start and its ancestors as a bit mask (two more static
inputs, `decode_kernel.NO_FRAME` and 0 for every other row), so a step holding a tree replays
as well, from graphs of its own: steps without a tree keep graphs whose kernel reads no frames.
(On one H100, 7B body, 64 sessions, two alternating runs each, the server whose every decode
step replayed frame inputs gave 1,748 and 1,826 tok/s, ITL p99 145 and 153 ms, and the one
before it 1,980 and 1,920 tok/s, 81 and 54 ms, at the same forward p50; thin evidence, but
keeping the frames out of the decode steps' graphs is what that server ran.) Steps with longer chunks, or more positions than the largest
bucket, run eagerly; without the kernel only decode-only steps without a tree are captured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.engine.decode_kernel import MAX_POSITIONS, NO_FRAME
from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool
from lambdasplit.engine.step import STEP_KWARG, Group, Step, StepPlan

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 64  # keys; with 256, a 256-row step at ~100 keys took 46 ms in its graph against 34 ms eager
KERNEL_MIN_BLOCKS = 8  # the narrowest block table of a graph that attends through the paged kernel


@dataclass
class _Graph:
    """A captured step and its static inputs. The integer inputs are views of one device buffer
    (`indices`), filled from one pinned host buffer (`staging`) by a single copy per step."""

    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # (1, rows, D)
    indices: torch.Tensor  # (rows * (6 + width),) int64: positions, write, query, mask, frame base, frame bits, block table
    staging: torch.Tensor  # the same, in pinned host memory
    copied: torch.cuda.Event  # the last copy out of `staging` is done: it may be written again
    out: torch.Tensor  # (1, rows, D)


_INPUTS = 6  # one-per-row inputs ahead of the block table in `_Graph.indices`


def _views(buffer: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """positions (1, rows), write (rows,), query (rows, 1), mask (rows,), frame base (rows,),
    frame bits (rows,), table (rows, width) of `buffer`."""
    positions, write, query, mask, base, bits, table = buffer.split([rows] * _INPUTS + [buffer.numel() - _INPUTS * rows])
    return positions.view(1, rows), write, query.view(rows, 1), mask, base, bits, table.view(rows, -1)


def table_width(keys: int, kernel: bool) -> int:
    """Blocks per row of the graph bucket for rows of up to `keys` keys."""
    blocks = -(-keys // BLOCK_SIZE)
    if kernel:
        return max(KERNEL_MIN_BLOCKS, 1 << (blocks - 1).bit_length())
    return -(-keys // LENGTH_BUCKET) * LENGTH_BUCKET // BLOCK_SIZE


def capturable(step: Step, kernel: bool) -> bool:
    """Small enough for a bucket, and every chunk short enough for the kernel (without the
    kernel: decode rows only, no draft tree)."""
    if step.positions_count > ROW_BUCKETS[-1]:
        return False
    return step.longest_chunk <= MAX_POSITIONS if kernel else step.decode_only and not step.has_tree


def stage(step: Step, staging: torch.Tensor, rows: int, scratch_slot: int) -> None:
    """Write `step`'s integer inputs into a bucket of `rows` one-query rows (`staging`, laid out
    as `_views` says): rows past the step write only the scratch slot and read only the zero block.
    A step holding a tree (staged only into a graph of tree steps) sets every row's frame."""
    n = step.positions_count
    tables, last = step.kernel_rows()
    positions, write, query, valid, base, bits, table = _views(staging, rows)
    write.fill_(scratch_slot)
    write[:n] = step.write
    positions.zero_()
    positions[0, :n] = step.positions
    table.zero_()
    table[:n, : tables.shape[1]] = tables
    query.zero_()
    query[:n, 0] = last
    valid.zero_()
    valid[:n] = step.valid
    if step.has_tree:
        base[:n], bits[:n] = step.kernel_frames()
        base[n:], bits[n:] = NO_FRAME, 0


def static_plan(pool: KVPool, hidden: torch.Tensor, indices: torch.Tensor, rows: int, kernel: bool,
                tree: bool) -> StepPlan:
    """The plan a graph captures: `rows` one-query rows whose inputs are views of `indices`
    (filled by `stage`), so a replay reads whatever was copied there last; `tree`: the rows read
    their draft-tree frames (a graph of steps holding a tree)."""
    positions, write, query, valid, base, bits, table = _views(indices, rows)
    group = Group(0, rows, 1, table, query, frame=(base, bits) if tree else None)
    return StepPlan(pool, hidden, positions, write, valid.bool(), [group], kernel)


class DecodeGraphs:
    """The captured steps of one body module over one pool."""

    def __init__(self, module: nn.Module, pool: KVPool, kernel: bool = False, trees: bool = False) -> None:
        self.module = module
        self.pool = pool
        self.kernel = kernel  # attend through the paged decode kernel
        self.trees = trees and kernel  # steps holding a draft tree replay too (the body verifies trees: no sliding window)
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}  # by (rows, width, holds a tree)
        self._memory = None  # one graph memory pool for every bucket
        self.failed = False  # a capture failed once: run eagerly from then on (a tree step's failure turns off `trees` only)

    def fits(self, step: Step) -> bool:
        """A step a graph can replay (`capturable`), on a GPU."""
        return (not self.failed and self.pool.valid.device.type == "cuda" and capturable(step, self.kernel)
                and (self.trees or not step.has_tree))

    @torch.inference_mode()
    def run(self, step: Step) -> list[torch.Tensor] | None:
        """Run the step through its bucket's graph (capturing it first); None if capture failed.
        The step's rows do not advance (`step.commit()` does)."""
        n = step.positions_count
        bucket = next(b for b in ROW_BUCKETS if b >= n)
        longest = max(length for plan in step.plans for length, _ in plan.after)
        width = table_width(longest, self.kernel)
        key = (bucket, width, step.has_tree)
        graph = self._graphs.get(key) or self._capture(*key)
        if graph is None:
            return None
        graph.copied.synchronize()
        stage(step, graph.staging, bucket, self.pool.scratch_slot)
        graph.indices.copy_(graph.staging, non_blocking=True)  # one host-to-device copy for every index
        graph.copied.record()
        _, static_write, _, static_valid, _, _, _ = _views(graph.indices, bucket)
        self.pool.valid[static_write[:n]] = static_valid[:n].bool()
        graph.hidden[0, n:].zero_()
        graph.hidden[0, :n] = step.hidden[0]
        graph.graph.replay()
        return step.split(graph.out[:, :n].clone())  # one copy; the next replay overwrites the static output

    def _capture(self, rows: int, width: int, tree: bool) -> _Graph | None:
        pool, device = self.pool, self.pool.valid.device
        dtype = pool.keys[0].dtype if pool.keys else torch.float32
        hidden = torch.zeros(1, rows, self.module.config.hidden_size, dtype=dtype, device=device)
        indices = torch.zeros(rows * (_INPUTS + width), dtype=torch.long, device=device)
        staging = torch.zeros(rows * (_INPUTS + width), dtype=torch.long, pin_memory=True)
        for buffer in (indices, staging):
            _views(buffer, rows)[1].fill_(pool.scratch_slot)
            _views(buffer, rows)[4].fill_(NO_FRAME)
        plan = static_plan(pool, hidden, indices, rows, self.kernel, tree)
        group = plan.groups[0]
        kwargs = {"inputs_embeds": hidden, "position_ids": plan.position_ids, "use_cache": False, STEP_KWARG: plan}
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: every write goes to the scratch slot
                    self.module(**kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            group.reset()  # the gather and masks are computed again inside the graph, from the static buffers
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._memory):
                out = self.module(**kwargs).last_hidden_state
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: stay eager, say so once
            log.warning("CUDA graph capture failed (%s: %s); %s run eagerly", type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "", "steps holding a draft tree" if tree else "batched steps")
            if tree:  # the other steps keep their graphs
                self.trees = False
            else:
                self.failed = True
            return None
        self._memory = self._memory or graph.pool()
        log.info("captured the step for %d positions x %d blocks%s%s", rows, width, " (paged kernel)" if self.kernel else "",
                 " holding a draft tree" if tree else "")
        captured = _Graph(graph, hidden, indices, staging, torch.cuda.Event(), out)
        self._graphs[(rows, width, tree)] = captured
        return captured
