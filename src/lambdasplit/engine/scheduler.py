"""BodyScheduler: owns the body weights, the sessions and the one compute thread.

It knows frames and tensors but nothing of the transport: the server hands it frames and awaits
the replies. All session state is touched only on the compute thread, so there is no locking,
and batching across sessions can later be added here without changing the wire.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import torch

from lambdasplit.engine.session import BodySession
from lambdasplit.errors import CapacityError, LambdaSplitError
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import PartRunner
from lambdasplit.wire.frame import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_sessions: int = 64
    max_context: int = 4096  # positions per session (bounds each body KV cache)
    min_free_memory: int = 512 << 20  # refuse new sessions below this much free RAM / GPU memory


class BodyScheduler:
    """Runs every session's body compute on one thread, in arrival order."""

    def __init__(
        self,
        runner: PartRunner,
        manifest: PartManifest,
        limits: SchedulerLimits = SchedulerLimits(),
        variants: list[tuple[PartRunner, PartManifest]] = (),
    ) -> None:
        self.runner = runner
        self.manifest = manifest
        self.limits = limits
        # Bodies starting at other layers (randomised split points), sharing the weight tensors.
        self.bodies = [(runner, manifest), *variants]
        self.sessions: dict[bytes, BodySession] = {}
        self.tokens_served = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-compute")

    def body_for(self, theirs: PartManifest) -> tuple[int | None, str | None]:
        """The index of the hosted body that fits the device's parts, or the reason none does."""
        problem = None
        for index, (_, manifest) in enumerate(self.bodies):
            problem = manifest.compatible_with(theirs)
            if problem is None:
                return index, None
        if len(self.bodies) > 1:
            starts = ", ".join(str(m.body[0]) for _, m in self.bodies)
            problem = f"this server runs bodies starting at layers {starts}; the device's is {theirs.body}. {problem}"
        return None, problem

    def open_session(self, body: int = 0) -> Future[bytes]:
        return self._executor.submit(self._open, body)

    def close_session(self, session_id: bytes) -> Future[None]:
        return self._executor.submit(self.sessions.pop, session_id, None)

    def submit(self, session_id: bytes, frame: Frame) -> Future[tuple[Frame | None, float]]:
        """Queue one frame for its session; resolves to (reply or None, compute seconds)."""
        return self._executor.submit(self._handle, session_id, frame)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _open(self, body: int) -> bytes:
        if len(self.sessions) >= self.limits.max_sessions:
            raise CapacityError(f"the server is at its limit of {self.limits.max_sessions} sessions; retry later")
        free = _free_memory(self._memory_probe())
        if free < self.limits.min_free_memory:
            raise CapacityError(
                f"only {free >> 20} MiB of memory free (the guard is {self.limits.min_free_memory >> 20} MiB); "
                "refusing a new session"
            )
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = self._new_session(body, session_id)
        log.info("session %s opened (%d active)", session_id.hex()[:8], len(self.sessions))
        return session_id

    def parse_manifest(self, data: dict) -> PartManifest:
        """The device's manifest from its HELLO."""
        return PartManifest.from_dict(data)

    def _new_session(self, body: int, session_id: bytes) -> BodySession:
        shared = self.bodies[body][0]
        own_runner = PartRunner(shared.module, shared.role, shared.config)
        return BodySession(own_runner, session_id, self.limits.max_context)

    def _memory_probe(self) -> torch.Tensor | None:
        """A parameter on the compute device, to ask that device how much memory is free."""
        return next(self.runner.module.parameters(), None)

    def _handle(self, session_id: bytes, frame: Frame) -> tuple[Frame | None, float]:
        session = self.sessions.get(session_id)
        if session is None:
            raise LambdaSplitError("session is closed or expired")
        start = time.perf_counter()
        before = session.tokens
        reply = session.handle(frame)  # encoding the reply copies to the host, so GPU work is done
        self.tokens_served += session.tokens - before
        return reply, time.perf_counter() - start


def _free_memory(param: torch.Tensor | None) -> int:
    if param is not None and param.device.type == "cuda":
        return torch.cuda.mem_get_info(param.device)[0]
    return psutil.virtual_memory().available



def load_scheduler(
    source: str | None,
    split: tuple[int, int] | None,
    dtype: str | None = None,
    device: str = "cpu",
    limits: SchedulerLimits = SchedulerLimits(),
    allow_shallow: bool = False,
    k_max: int | None = None,
) -> BodyScheduler:
    """The body of `source` (a model or an exported cloud part), ready to serve sessions.

    With `k_max`, the server also hosts the bodies for every K up to k_max (the device picks its
    K per session); they share the widest body's weight tensors, so memory does not grow.
    """
    from lambdasplit.split.load import body_runner, body_variants, open_source, resolve_dtype

    opened = open_source(source, split, allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    runner = body_runner(opened, torch_dtype, device)
    variants = body_variants(opened, runner, k_max, torch_dtype, device) if k_max else []
    return BodyScheduler(runner, opened.manifest("cloud", torch_dtype), limits, variants)
