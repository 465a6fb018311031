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
from lambdasplit.engine.step import STEP_KWARG, Group, Step, StepPlan

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKET = 64  # keys; with 256, a 256-row step at ~100 keys took 46 ms in its graph against 34 ms eager


@dataclass
class _Graph:
    """A captured step and its static inputs. The integer inputs are views of one device buffer
    (`indices`), filled from one pinned host buffer (`staging`) by a single copy per step."""

    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # (1, rows, D)
    indices: torch.Tensor  # (rows * (4 + length),) int64: positions, write, query, mask, gather
    staging: torch.Tensor  # the same, in pinned host memory
    copied: torch.cuda.Event  # the last copy out of `staging` is done: it may be written again
    out: torch.Tensor  # (1, rows, D)


def _views(buffer: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """positions (1, rows), write (rows,), query (rows, 1), mask (rows,), gather (rows, length) of `buffer`."""
    positions, write, query, mask, gather = buffer.split([rows, rows, rows, rows, buffer.numel() - 4 * rows])
    return positions.view(1, rows), write, query.view(rows, 1), mask, gather.view(rows, -1)


class DecodeGraphs:
    """The captured decode steps of one body module over one pool."""

    def __init__(self, module: nn.Module, pool: KVPool) -> None:
        self.module = module
        self.pool = pool
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._memory = None  # one graph memory pool for every bucket
        self.failed = False  # a capture failed once: run eagerly from then on

    def fits(self, step: Step) -> bool:
        """A decode-only step small enough for a bucket, on a GPU."""
        return not self.failed and self.pool.valid.device.type == "cuda" and step.decode_only and step.rows <= ROW_BUCKETS[-1]

    @torch.inference_mode()
    def run(self, step: Step) -> list[torch.Tensor] | None:
        """Run the step through its bucket's graph (capturing it first); None if capture failed.
        The step's rows do not advance (`step.commit()` does)."""
        n = step.rows
        bucket = next(b for b in ROW_BUCKETS if b >= n)
        longest = max(length for plan in step.plans for length, _ in plan.after)
        length = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
        graph = self._graphs.get((bucket, length)) or self._capture(bucket, length)
        if graph is None:
            return None
        group = step.groups[0]
        graph.copied.synchronize()
        positions, write, query, valid, gather = _views(graph.staging, bucket)
        write.fill_(self.pool.scratch_slot)
        write[:n] = step.write
        positions.zero_()
        positions[0, :n] = step.positions
        gather.zero_()
        gather[:n, : group.gather.shape[1]] = group.gather
        query.zero_()
        query[:n] = group.query_slot
        valid.zero_()
        valid[:n] = step.valid
        graph.indices.copy_(graph.staging, non_blocking=True)  # one host-to-device copy for every index
        graph.copied.record()
        _, static_write, _, static_valid, _ = _views(graph.indices, bucket)
        self.pool.valid[static_write[:n]] = static_valid[:n].bool()
        graph.hidden[0, n:].zero_()
        graph.hidden[0, :n] = step.hidden[0]
        graph.graph.replay()
        return step.split(graph.out[:, :n].clone())  # one copy; the next replay overwrites the static output

    def _capture(self, rows: int, length: int) -> _Graph | None:
        pool, device = self.pool, self.pool.valid.device
        width = self.module.config.hidden_size
        dtype = pool.keys[0].dtype if pool.keys else torch.float32
        hidden = torch.zeros(1, rows, width, dtype=dtype, device=device)
        indices = torch.zeros(rows * (4 + length), dtype=torch.long, device=device)
        staging = torch.zeros(rows * (4 + length), dtype=torch.long, pin_memory=True)
        positions, write, query, valid, gather = _views(indices, rows)
        write.fill_(pool.scratch_slot)
        group = Group(0, rows, 1, gather, query)
        kwargs = {"inputs_embeds": hidden, "position_ids": positions, "use_cache": False,
                  STEP_KWARG: StepPlan(pool, hidden, positions, write, valid.bool(), [group])}
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
        captured = _Graph(graph, hidden, indices, staging, torch.cuda.Event(), out)
        self._graphs[(rows, length)] = captured
        return captured
