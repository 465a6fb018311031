"""Server metrics in Prometheus text format (prometheus_client), plus rolling latency percentiles.

With several front-end processes (`serve --front-ends N`) the metrics are prometheus_client's
multiprocess metrics: every process writes its values to files in one directory
(`share_between_processes`, called before any metric exists) and whichever front end answers
/metrics sums them, so a scrape through the shared port sees the whole server. The step
statistics reach the first front end only, so they are counted once.
"""

from __future__ import annotations

import os
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

from lambdasplit.engine.scheduler import StepStats

SHARED_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable; inherited by spawned front ends


def share_between_processes(directory: str) -> None:
    """Metrics created from now on, in this process and in processes it spawns, live in `directory`."""
    os.environ[SHARED_DIR] = directory
    values.ValueClass = values.get_value_class()


def process_gone(pid: int) -> None:
    """Forget a front end's live gauges (its counters stay: they are part of the server's totals)."""
    multiprocess.mark_process_dead(pid)


class ServerMetrics:
    def __init__(self, window: int = 2048) -> None:
        self.registry = CollectorRegistry()
        self.shared = os.environ.get(SHARED_DIR)
        r = self.registry
        # Gauges say how to combine the front ends' values (ignored in one process).
        self.sessions_active = Gauge("lambdasplit_sessions_active", "Open body sessions", registry=r,
                                     multiprocess_mode="livesum")
        self.sessions_total = Counter("lambdasplit_sessions", "Sessions opened", registry=r)
        self.sessions_refused = Counter("lambdasplit_sessions_refused", "Sessions refused (auth, limits, mismatch)", registry=r)
        self.tokens = Counter("lambdasplit_tokens_served", "Positions run through the body", registry=r)
        self.bytes_in = Counter("lambdasplit_bytes_in", "Frame bytes received from devices", registry=r)
        self.bytes_out = Counter("lambdasplit_bytes_out", "Frame bytes sent to devices", registry=r)
        self.frame_errors = Counter("lambdasplit_frame_errors", "Frames refused as malformed or unexpected", registry=r)
        self.step_seconds = Histogram(
            "lambdasplit_step_seconds", "Body compute time per HIDDEN frame", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.step_quantile = Gauge(
            "lambdasplit_step_seconds_quantile",
            "Rolling percentiles of body step time (with several front ends: of the one that answered)", ["quantile"],
            registry=r, multiprocess_mode="livemostrecent",
        )
        self.step_sessions = Histogram(
            "lambdasplit_step_sessions", "Sessions batched into one body forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.step_rows = Histogram(
            "lambdasplit_step_rows", "Rows (sequences) in one body forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.step_positions = Histogram(
            "lambdasplit_step_positions", "Positions (decode steps and prefill chunks) in one body forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batched_seconds = Histogram(
            "lambdasplit_forward_seconds", "Wall time of one body forward (batched or alone)", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.queue_wait = Histogram(
            "lambdasplit_queue_wait_seconds", "Time a HIDDEN frame waited before its first body step", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        # Fine where a GPU step cycle lives (a 7B body's 64-row step: ~9 ms), so a median can be read off the buckets.
        cycle = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02,
                 0.03, 0.05, 0.1, 0.2, 0.5, 1)
        self.step_between = Histogram(
            "lambdasplit_step_between_seconds", "From one batched step's end to the next one's start", registry=r, buckets=cycle)
        self.step_held = Histogram(
            "lambdasplit_step_held_seconds", "Of that, the step wait holding for the sessions the last step answered",
            registry=r, buckets=cycle)
        self.step_plan = Histogram(
            "lambdasplit_step_plan_seconds", "Choosing and assembling a batched step, before its forward", registry=r,
            buckets=cycle)
        self.step_reply = Histogram(
            "lambdasplit_step_reply_seconds", "After a batched forward: committing it and answering its frames", registry=r,
            buckets=cycle)
        self.planned_ahead = Counter(
            "lambdasplit_chunks_planned_ahead", "Chunks planned while the step before ran (async scheduling)", registry=r)
        self.kv_used = Gauge("lambdasplit_kv_pool_used_blocks", "KV pool blocks held by sessions", registry=r,
                             multiprocess_mode="livemax")
        self.kv_blocks = Gauge("lambdasplit_kv_pool_blocks", "KV pool size in blocks (of 16 positions)", registry=r,
                               multiprocess_mode="livemax")
        self.refusals = Counter(
            "lambdasplit_capacity_refusals", "Sessions or frames refused for capacity", ["reason"], registry=r
        )
        self._recent: deque[float] = deque(maxlen=window)

    def observe_forward(self, stats: StepStats) -> None:
        """One body forward of the scheduler (called on its compute thread)."""
        self.step_sessions.observe(stats.sessions)
        self.step_rows.observe(stats.rows)
        self.step_positions.observe(stats.positions)
        self.batched_seconds.observe(stats.seconds)
        for wait in stats.queue_waits:
            self.queue_wait.observe(wait)
        self.step_between.observe(stats.between_seconds)
        self.step_held.observe(stats.held_seconds)
        self.step_plan.observe(stats.plan_seconds)
        self.step_reply.observe(stats.reply_seconds)
        self.planned_ahead.inc(stats.planned_ahead)
        self.kv_used.set(stats.kv_used_blocks)
        self.kv_blocks.set(stats.kv_blocks)

    def observe_refusal(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def observe_step(self, seconds: float, positions: int) -> None:
        self.step_seconds.observe(seconds)
        self.tokens.inc(positions)
        self._recent.append(seconds)

    def render(self) -> bytes:
        recent = sorted(self._recent)
        for q in (0.5, 0.9, 0.99):
            value = recent[min(len(recent) - 1, int(q * len(recent)))] if recent else 0.0
            self.step_quantile.labels(quantile=str(q)).set(value)
        if self.shared is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, self.shared)
        return generate_latest(combined)
