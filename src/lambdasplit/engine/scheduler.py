"""BodyScheduler: owns the hosted bodies, the sessions and the one compute thread.

It knows frames and tensors but nothing of the transport: the server (or an in-process LocalBody)
hands it frames and awaits the replies. All session state is touched only on the compute thread,
so there is no locking. A body is anything with `manifest`, `open(session_id, limits)` and
`memory_probe()`: the text `TextBody` and the diffusion `UNetBody` alike.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch

from lambdasplit import defaults
from lambdasplit.engine.batch import decode_batched
from lambdasplit.engine.session import SessionLimits, TextBody
from lambdasplit.errors import CapacityError, ComputeError, ExpiredError, LambdaSplitError
from lambdasplit.wire.frame import Frame, MsgType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_sessions: int = defaults.MAX_SESSIONS
    max_context: int = defaults.MAX_CONTEXT
    min_free_memory: int = defaults.MIN_FREE_MEMORY_MIB << 20
    max_batch: int = defaults.MAX_BATCH
    max_frame_positions: int = defaults.MAX_FRAME_POSITIONS
    max_session_kv_bytes: int = defaults.MAX_SESSION_KV_MIB << 20

    def session(self) -> SessionLimits:
        return SessionLimits(self.max_context, self.max_batch, self.max_frame_positions, self.max_session_kv_bytes)


class Session(Protocol):
    tokens: int

    def handle(self, frame: Frame) -> Frame | None: ...

    def new_bytes(self, frame: Frame) -> int: ...

    def batch_key(self, frame: Frame) -> int | None: ...

    def prepare(self, frame: Frame) -> torch.Tensor: ...

    def finish(self, frame: Frame, out: torch.Tensor) -> Frame: ...


class Body(Protocol):
    manifest: Any

    def open(self, session_id: bytes, limits: SessionLimits) -> Session: ...

    def memory_probe(self) -> torch.Tensor | None: ...


class BodyScheduler:
    """Runs every session's body compute on one thread.

    Frames wait in one queue; each tick of the compute thread takes everything queued, runs the
    decode steps that share a body as one batched forward (`engine.batch`) and the rest (prefills,
    masks, resets, diffusion steps) one by one, each session's frames in their arrival order.
    """

    def __init__(self, bodies: list[Body], limits: SchedulerLimits = SchedulerLimits()) -> None:
        if not bodies:
            raise ValueError("a scheduler needs at least one body")
        self.bodies = bodies  # several for randomised split points, sharing the weight tensors
        self.manifest = bodies[0].manifest
        self.limits = limits
        self.sessions: dict[bytes, Session] = {}
        self._last_used: dict[bytes, float] = {}
        self.tokens_served = 0
        # Called on the compute thread after each step: (sessions in the step, rows, seconds).
        self.on_step: Callable[[int, int, float], None] | None = None
        self._pending: list[tuple[bytes, Frame, Future]] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-compute")

    def body_for(self, theirs: Any) -> tuple[int | None, str | None]:
        """The index of the hosted body that fits the device's parts, or the reason none does."""
        problem = None
        for index, body in enumerate(self.bodies):
            problem = body.manifest.compatible_with(theirs)
            if problem is None:
                return index, None
        if len(self.bodies) > 1:
            starts = ", ".join(str(b.manifest.body[0]) for b in self.bodies)
            problem = f"this server runs bodies starting at layers {starts}; the device's is {theirs.body}. {problem}"
        return None, problem

    def parse_manifest(self, data: dict) -> Any:
        """The device's manifest from its HELLO, parsed by the hosted manifest's own class."""
        return type(self.manifest).from_dict(data)

    def open_session(self, body: int = 0) -> Future[bytes]:
        return self._executor.submit(self._open, body)

    def close_session(self, session_id: bytes) -> Future[None]:
        return self._executor.submit(self._close, session_id)

    def submit(self, session_id: bytes, frame: Frame) -> Future[tuple[Frame | None, float]]:
        """Queue one frame for its session; resolves to (reply or None, compute seconds)."""
        future: Future[tuple[Frame | None, float]] = Future()
        with self._lock:
            self._pending.append((session_id, frame, future))
        self._executor.submit(self._tick)
        return future

    def reap(self, idle_seconds: float) -> Future[int]:
        """Close sessions idle for longer than `idle_seconds` (a backstop for lost connections)."""
        return self._executor.submit(self._reap, idle_seconds)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _open(self, body: int) -> bytes:
        if len(self.sessions) >= self.limits.max_sessions:
            raise CapacityError(
                f"the server is at its limit of {self.limits.max_sessions} sessions; retry later",
                retry_after=defaults.CAPACITY_RETRY_AFTER,
            )
        self._check_memory(0, "a new session")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = self.bodies[body].open(session_id, self.limits.session())
        self._last_used[session_id] = time.monotonic()
        log.info("session %s opened (%d active)", session_id.hex()[:8], len(self.sessions))
        return session_id

    def _close(self, session_id: bytes) -> None:
        self.sessions.pop(session_id, None)
        self._last_used.pop(session_id, None)

    def _reap(self, idle_seconds: float) -> int:
        now = time.monotonic()
        stale = [s for s, t in self._last_used.items() if now - t > idle_seconds]
        for session_id in stale:
            log.warning("session %s idle for over %.0f s; closed", session_id.hex()[:8], idle_seconds)
            self._close(session_id)
        return len(stale)

    def _check_memory(self, need: int, what: str) -> None:
        free = _free_memory(self.bodies[0].memory_probe())
        if free - need < self.limits.min_free_memory:
            raise CapacityError(
                f"only {free >> 20} MiB of memory free ({what} needs {need >> 20} MiB and the guard keeps "
                f"{self.limits.min_free_memory >> 20} MiB); retry later",
                retry_after=defaults.CAPACITY_RETRY_AFTER,
            )

    def _tick(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        groups: dict[int, list[tuple[bytes, Frame, Future]]] = {}
        alone: list[tuple[bytes, Frame, Future]] = []
        seen: set[bytes] = set()
        for item in items:
            session_id, frame, _ = item
            session = self.sessions.get(session_id)
            key = session.batch_key(frame) if session is not None and session_id not in seen else None
            seen.add(session_id)  # only a session's first queued frame may join the batch
            (groups.setdefault(key, []) if key is not None else alone).append(item)
        for group in groups.values():
            if len(group) == 1:
                alone.insert(0, group[0])
            else:
                self._run_batch(group)
        for session_id, frame, future in alone:
            _resolve(future, self._handle, session_id, frame)

    def _run_batch(self, group: list[tuple[bytes, Frame, Future]]) -> None:
        ready, hidden = [], []
        for session_id, frame, future in group:
            session = self.sessions[session_id]
            try:
                self._check_memory(session.new_bytes(frame), "this frame")
                hidden.append(session.prepare(frame))
            except LambdaSplitError as exc:
                future.set_exception(exc)
                continue
            self._last_used[session_id] = time.monotonic()
            ready.append((session_id, frame, future, session))
        if not ready:
            return
        start = time.perf_counter()
        try:
            outs = decode_batched([s.runner for *_, s in ready], hidden)
        except Exception as exc:  # noqa: BLE001 - as in _handle: the step failed, close its sessions
            error = self._failed([sid for sid, *_ in ready], exc)
            for _, _, future, _ in ready:
                future.set_exception(error)
            return
        seconds = time.perf_counter() - start
        for (_, frame, future, session), out in zip(ready, outs, strict=True):
            reply = session.finish(frame, out)
            self.tokens_served += frame.shape[0]
            future.set_result((reply, seconds))
        if self.on_step is not None:
            self.on_step(len(ready), sum(h.shape[0] for h in hidden), seconds)

    def _failed(self, session_ids: list[bytes], exc: Exception) -> ComputeError:
        """Close sessions whose step failed inside the model; their caches may hold half a step."""
        for session_id in session_ids:
            self._close(session_id)
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        first = (str(exc).splitlines() or [""])[0][:300]
        log.debug("the body failed (%s: %s); %d session(s) closed", type(exc).__name__, first, len(session_ids))
        return ComputeError(f"the body failed to run this step ({type(exc).__name__}: {first})")

    def _handle(self, session_id: bytes, frame: Frame) -> tuple[Frame | None, float]:
        session = self.sessions.get(session_id)
        if session is None:
            raise ExpiredError("session is closed or expired; reconnect")
        self._last_used[session_id] = time.monotonic()
        need = session.new_bytes(frame)
        if need:
            self._check_memory(need, "this frame")
        start = time.perf_counter()
        before = session.tokens
        try:
            reply = session.handle(frame)  # encoding the reply copies to the host, so GPU work is done
        except LambdaSplitError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside the model, CUDA OOM included
            raise self._failed([session_id], exc) from None
        seconds = time.perf_counter() - start
        if self.on_step is not None and frame.type in (MsgType.HIDDEN, MsgType.TENSOR):
            self.on_step(1, frame.shape[0], seconds)
        self.tokens_served += session.tokens - before
        return reply, seconds


def _resolve(future: Future, fn: Callable, *args: Any) -> None:
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - delivered to the waiting transport, which reports it
        future.set_exception(exc)


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

    if device == "cuda" and not torch.cuda.is_available():
        raise LambdaSplitError("--device cuda: no CUDA GPU is available on this machine; use --device cpu")
    opened = open_source(source, split, allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    runner = body_runner(opened, torch_dtype, device)
    variants = body_variants(opened, runner, k_max, torch_dtype, device) if k_max else []
    bodies = [TextBody(runner, opened.manifest("cloud", torch_dtype))]
    bodies += [TextBody(r, m) for r, m in variants]
    return BodyScheduler(bodies, limits)
