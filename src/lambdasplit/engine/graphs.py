"""CUDA graphs of the batched decode step: captured once per (rows, key length) bucket, replayed.

An eager decode step of a 7B body launches about 1,100 kernels; on an H200 their host-side cost
(~40 ms for 64 rows under the profiler) is several times the GPU work (10.5 ms). A graph replays
them in one launch. Each bucket owns static input buffers (hidden states, position ids, the slots
to write, the slots to gather, the query slots); a step of n rows pads to the bucket's row count
with rows that write only the pool's scratch slot and read only the zero block, and its key length
rounds up to a multiple of `LENGTH_BUCKET` keys (the extra keys are masked out). Steps with prefill
chunks, or beyond the largest bucket, run eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lambdasplit.engine.kvpool import KVPool
from lambdasplit.engine.step import STEP_KWARG, Chunk, Group, StepPlan

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 64  # keys; with 256, a 256-row step at ~100 keys took 46 ms in its graph against 34 ms eager


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # (1, rows, D)
    positions: torch.Tensor  # (1, rows)
    write: torch.Tensor  # (rows,)
    gather: torch.Tensor  # (rows, length)
    query: torch.Tensor  # (rows, 1)
    out: torch.Tensor  # (1, rows, D)


class DecodeGraphs:
    """The captured decode steps of one body module over one pool."""

    def __init__(self, module: nn.Module, pool: KVPool) -> None:
        self.module = module
        self.pool = pool
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._memory = None  # one graph memory pool for every bucket
        self.failed = False  # a capture failed once: run eagerly from then on

    def fits(self, chunks: list[Chunk]) -> bool:
        """A decode-only step small enough for a bucket, on a GPU."""
        return (
            not self.failed
            and self.pool.valid.device.type == "cuda"
            and all(c.hidden.shape[1] == 1 for c in chunks)
            and sum(c.hidden.shape[0] for c in chunks) <= ROW_BUCKETS[-1]
        )

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor] | None:
        """Run the step through its bucket's graph (capturing it first); None if capture failed."""
        rows = [row for chunk in chunks for row in chunk.rows]
        n = len(rows)
        bucket = next(b for b in ROW_BUCKETS if b >= n)
        length = -(-(max(row.length for row in rows) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET
        graph = self._graphs.get((bucket, length)) or self._capture(bucket, length)
        if graph is None:
            return None
        pool, device = self.pool, self.pool.valid.device
        mask = torch.cat([chunk.mask for chunk in chunks]).view(-1).to(torch.long)
        write = torch.full((bucket,), pool.scratch_slot, dtype=torch.long)
        write[:n] = torch.cat([pool.slots([row], row.length, row.length + 1).view(-1) for row in rows])
        positions = torch.zeros(1, bucket, dtype=torch.long)
        positions[0, :n] = (torch.tensor([row.valid for row in rows]) + mask - 1) * mask
        gather = torch.zeros(bucket, length, dtype=torch.long)
        gather[:n] = pool.gather_index(rows, length)
        query = torch.zeros(bucket, 1, dtype=torch.long)
        query[:n, 0] = torch.tensor([row.length for row in rows])
        pool.valid[write[:n].to(device)] = mask.bool().to(device)
        graph.hidden.zero_()
        graph.hidden[0, :n] = torch.cat([chunk.hidden[:, 0] for chunk in chunks])
        for static, value in ((graph.write, write), (graph.positions, positions), (graph.gather, gather),
                              (graph.query, query)):
            static.copy_(value, non_blocking=True)
        for row, m in zip(rows, mask.tolist(), strict=True):
            row.length += 1
            row.valid += m
        graph.graph.replay()
        out, start = [], 0
        for chunk in chunks:
            b = chunk.hidden.shape[0]
            out.append(graph.out[0, start: start + b].unsqueeze(1).clone())
            start += b
        return out

    def _capture(self, rows: int, length: int) -> _Graph | None:
        pool, device = self.pool, self.pool.valid.device
        width = self.module.config.hidden_size
        dtype = pool.keys[0].dtype if pool.keys else torch.float32
        hidden = torch.zeros(1, rows, width, dtype=dtype, device=device)
        positions = torch.zeros(1, rows, dtype=torch.long, device=device)
        write = torch.full((rows,), pool.scratch_slot, dtype=torch.long, device=device)
        gather = torch.zeros(rows, length, dtype=torch.long, device=device)
        query = torch.zeros(rows, 1, dtype=torch.long, device=device)
        group = Group(0, rows, 1, gather, query)
        kwargs = {"inputs_embeds": hidden, "position_ids": positions, "use_cache": False,
                  STEP_KWARG: StepPlan(pool, write, [group])}
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: every write goes to the scratch slot
                    self.module(**kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            group.masks.clear()  # computed again inside the graph, from the static buffers
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._memory):
                out = self.module(**kwargs).last_hidden_state
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: stay eager, say so once
            log.warning("CUDA graph capture failed (%s: %s); batched decode steps run eagerly",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.failed = True
            return None
        self._memory = self._memory or graph.pool()
        log.info("captured the decode step for %d rows x %d keys", rows, length)
        captured = _Graph(graph, hidden, positions, write, gather, query, out)
        self._graphs[(rows, length)] = captured
        return captured
