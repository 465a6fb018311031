"""The body forward alone: N sessions' decode steps in one batched step (engine.step) against one
step per session, over the same paged KV pool.

    .venv/bin/python -m benchmarks.batching [N ...]      # default 1 8; SmolLM2 split 2,2, fp32

Medians over 10 steps, both ways in the same process on the same sessions' shapes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lambdasplit.engine.kvpool import Sequence
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.step import Chunk


def _sessions(body, pool, n: int, hidden: int) -> list[list[Sequence]]:
    out = []
    for i in range(n):
        rows, length = [Sequence()], 32 + 3 * i  # different lengths
        assert pool.grow(rows, length)
        body.run(pool, [Chunk(rows, torch.randn(1, length, hidden), torch.ones(1, length, dtype=torch.long))])
        out.append(rows)
    return out


def main(counts: list[int]) -> None:
    scheduler = load_scheduler(None, (2, 2))
    body, pool = scheduler.bodies[0], scheduler.pool
    hidden = body.runner.config.hidden_size
    one = torch.ones(1, 1, dtype=torch.long)
    for n in counts:
        for mode in ("alone", "batched"):
            sessions = _sessions(body, pool, n, hidden)
            times = []
            for _ in range(10):
                chunks = [Chunk(rows, torch.randn(1, 1, hidden), one) for rows in sessions]
                for chunk in chunks:
                    assert pool.grow(chunk.rows, chunk.rows[0].length + 1)
                start = time.perf_counter()
                if mode == "alone":
                    for chunk in chunks:
                        body.run(pool, [chunk])
                else:
                    body.run(pool, chunks)
                times.append(time.perf_counter() - start)
            pool.release([row for rows in sessions for row in rows])
            print(f"{n} sessions, {mode}: {statistics.median(times) * 1000:.1f} ms per step of all sessions")
    scheduler.shutdown()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 8])
