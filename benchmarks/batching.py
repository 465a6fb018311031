"""The body forward alone: N sessions' decode steps batched (engine.batch) against one by one.

    .venv/bin/python -m benchmarks.batching [N ...]      # default 1 8; SmolLM2 split 2,2, fp32

Medians over 10 steps, both ways in the same process on the same sessions' shapes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lambdasplit.engine.batch import decode_batched
from lambdasplit.engine.scheduler import SchedulerLimits, load_scheduler


def _sessions(body, n: int, hidden: int) -> list:
    out = []
    for i in range(n):
        session = body.open(bytes(16), SchedulerLimits().session())
        session.runner(torch.randn(1, 32 + 3 * i, hidden))  # different lengths
        out.append(session)
    return out


def main(counts: list[int]) -> None:
    body = load_scheduler(None, (2, 2)).bodies[0]
    hidden = body.runner.config.hidden_size
    for n in counts:
        for mode in ("alone", "batched"):
            sessions = _sessions(body, n, hidden)
            times = []
            for _ in range(10):
                steps = [torch.randn(1, 1, hidden) for _ in sessions]
                start = time.perf_counter()
                if mode == "alone":
                    for session, step in zip(sessions, steps, strict=True):
                        session.runner(step)
                else:
                    decode_batched([s.runner for s in sessions], steps)
                times.append(time.perf_counter() - start)
            print(f"{n} sessions, {mode}: {statistics.median(times) * 1000:.1f} ms per step of all sessions")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 8])
