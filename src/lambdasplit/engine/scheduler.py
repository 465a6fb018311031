"""BodyScheduler: owns the hosted bodies, the sessions and the one compute thread.

It knows frames and tensors but nothing of the transport: the server (or an in-process LocalBody)
hands it frames and awaits the replies. All session state is touched only on the compute thread,
so there is no locking. A body is anything with `manifest`, `open(session_id, limits)` and
`memory_probe()`: the text `TextBody` and the diffusion `UNetBody` alike.

Why one file over 500 lines: it is one class whose methods share the compute thread's state
(frame queues, active works, KV claims, the step planned ahead) without locks; what does not need
that state already lives beside it (`session.py`, `step.py`, `kvpool.py`, `frames.py`, `health.py`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from typing import Any, Protocol

import psutil
import torch

from lambdasplit import defaults
from lambdasplit.engine.frames import frame_problem
from lambdasplit.engine.health import EngineHealth
from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, block_bytes
from lambdasplit.engine.session import SessionLimits, TextBody, Work, decode_hidden
from lambdasplit.engine.step import ChunkPlan, Step, assemble, plan_chunk
from lambdasplit.errors import CapacityError, ComputeError, ExpiredError, LambdaSplitError, LimitError, WireError
from lambdasplit.wire.codec import Codec, encode_tensor, encode_tensors
from lambdasplit.wire.frame import Frame, MsgType

log = logging.getLogger(__name__)

FREE_MEMORY_TTL = 0.02  # seconds a free-memory reading is reused for (per frame it cost 10% of a tiny body's step)


@dataclass(frozen=True)
class SchedulerLimits:
    max_sessions: int = defaults.MAX_SESSIONS
    max_context: int | None = None  # positions per row; None: the model's window (max_position_embeddings)
    min_free_memory: int = defaults.MIN_FREE_MEMORY_MIB << 20
    max_batch: int = defaults.MAX_BATCH
    max_frame_positions: int = defaults.MAX_FRAME_POSITIONS
    max_session_kv_bytes: int = defaults.MAX_SESSION_KV_MIB << 20
    step_tokens: int | None = None  # positions per step; None: defaults.STEP_TOKENS for the body's device
    kv_pool_bytes: int | None = None  # None: sized from free memory (see pool_budget)
    kv_wait: float = defaults.KV_WAIT_SECONDS
    step_wait: float = defaults.STEP_WAIT_SECONDS  # how long a step waits for the last step's sessions to come back
    stall_timeout: float = defaults.STALL_TIMEOUT_SECONDS  # one step longer than this reads as a wedged engine
    async_schedule: bool = False  # plan the next step while the device runs this one (`serve` turns it on for a GPU)

    def session(self) -> SessionLimits:
        return SessionLimits(self.max_context, self.max_batch, self.max_frame_positions, self.max_session_kv_bytes)


@dataclass(frozen=True)
class StepStats:
    """One body forward, for /metrics."""

    sessions: int
    rows: int
    positions: int
    seconds: float
    queue_waits: tuple[float, ...]  # seconds each frame that started in this step waited for it
    kv_used_blocks: int
    kv_blocks: int
    planned_ahead: int = 0  # chunks whose plan was made while the previous step ran (async scheduling)
    # Where a step cycle's time goes besides the forward (`seconds`), so a served rate below the
    # in-process step rate can be taken apart from /metrics alone:
    between_seconds: float = 0.0  # from the last step's end to this step's start: waiting for frames, taking them in
    held_seconds: float = 0.0  # of which the step wait held for the sessions the last step answered
    plan_seconds: float = 0.0  # choosing the chunks and assembling the step, before the forward
    reply_seconds: float = 0.0  # after the forward: committing, splitting the outputs, answering the frames


class Session(Protocol):
    tokens: int

    def handle(self, frame: Frame) -> Frame | None: ...

    def new_bytes(self, frame: Frame) -> int: ...

    def batch_key(self, frame: Frame) -> int | None: ...

    def check(self, frame: Frame) -> None: ...

    def prepare(self, frame: Frame, hidden: torch.Tensor) -> Work: ...

    def finish(self, work: Work, payload: bytes) -> Frame: ...

    def close(self) -> None: ...


class Waiter(Protocol):
    """What a frame's answer is given to: a `Future`, or the server's lighter `cloud.deliveries.Answer`."""

    def set_result(self, value: Any) -> None: ...

    def set_exception(self, error: BaseException) -> None: ...


class Body(Protocol):
    manifest: Any

    def open(self, session_id: bytes, limits: SessionLimits, pool: KVPool | None) -> Session: ...

    def memory_probe(self) -> torch.Tensor | None: ...


@dataclass
class _Queued:
    frame: Frame
    future: Future | Waiter
    arrived: float


class BodyScheduler:
    """Runs every session's body compute on one thread, in batched steps.

    Each session's frames wait in their own queue and run in order. Every step takes, for each
    body, the next HIDDEN frame of every session that has one: all decode positions, then prefill
    positions up to `step_tokens` in all (a long prompt runs in chunks over several steps, so it
    never stalls the others' decode for longer than one chunk), as one forward (`engine.step`).
    KV lives in one `KVPool`. A frame reserves the blocks for all its positions before its first
    chunk runs (two long prompts growing chunk by chunk could otherwise fill the pool between them
    and stall everyone). Older sessions come first: a frame short of blocks takes them from the
    youngest sessions holding some (preempted: closed with a retryable capacity error, so their
    devices replay), or, with none younger, waits up to `kv_wait` seconds, then gets a capacity
    error. MASK, RESET and diffusion frames run alone, between steps.

    A step is planned as one `Step` object and committed (its rows advance) only after it ran; a
    step that fails leaves every session as it was and is retried once (`defaults.STEP_RETRIES`).
    With `async_schedule` the next step's frames are taken in and its chunks
    planned while the device runs the current one.

    Every future it hands out is answered, whatever happens: a frame refused at the door, a
    transport that cancelled its wait, a step that failed, a shutdown or a dead compute thread.
    """

    def __init__(self, bodies: list[Body], limits: SchedulerLimits = SchedulerLimits()) -> None:
        if not bodies:
            raise ValueError("a scheduler needs at least one body")
        self.bodies = bodies  # several for randomised split points, sharing the weight tensors
        self.manifest = bodies[0].manifest
        self.limits = limits if limits.max_context else replace(limits, max_context=_context_window(bodies))
        self.pool = _make_pool(bodies, limits)
        self._mirrors = [b.mirror for b in bodies if isinstance(b, TextBody) and b.mirror is not None]
        for mirror in self._mirrors:
            mirror.share_pool(self.pool)
        probe = bodies[0].memory_probe()
        on_gpu = probe is not None and probe.device.type == "cuda"
        self.step_tokens = limits.step_tokens or (defaults.STEP_TOKENS if on_gpu else defaults.STEP_TOKENS_CPU)
        # Opt-in: it has not run on a GPU yet, and on the CPU the forward has ended when it returns
        # (planning ahead would only delay replies).
        self.async_schedule = limits.async_schedule
        self.hidden_size: int | None = getattr(self.manifest, "hidden_size", None)
        self.sessions: dict[bytes, Session] = {}  # in the order they opened: the oldest first
        self._last_used: dict[bytes, float] = {}
        self._preempted: dict[bytes, CapacityError] = {}  # closed to free KV, until the transport closes them too
        self.tokens_served = 0
        self.on_step: Callable[[StepStats], None] | None = None  # called on the compute thread
        self.on_refusal: Callable[[str], None] | None = None  # "sessions", "kv", "preempt" or "memory"
        self._queues: dict[bytes, deque[_Queued]] = {}
        self._active: dict[bytes, Work] = {}
        self._calls: deque[tuple[Future, Callable, tuple]] = deque()
        self._frames: list[tuple[bytes, _Queued]] = []
        self._wake = threading.Condition()
        self._free, self._free_read = 0, -FREE_MEMORY_TTL  # free memory, and when it was last read
        self._answered: set[bytes] = set()  # sessions the last step answered, and when (see _gather)
        self._answered_at = 0.0
        # Of those, the ones whose next frame has come, and when (not before the step's end), kept
        # up to date as frames arrive: recounting them at every arrival cost O(sessions^2) per step.
        self._back: dict[bytes, float] = {}
        self._latest_back = 0.0
        self._answered_hold = 0.0  # how long after that step a step waits for the first of them
        self._early: dict[bytes, float] = {}  # sessions whose frame started while a step ran: when it arrived
        self._step_ended: float | None = None  # perf_counter at the end of the last batched step
        self._held = 0.0  # seconds the step wait has held since then
        self._stopping = False
        self._closed: ComputeError | None = None  # set (under _wake) once the loop will take nothing more
        self.health = EngineHealth(limits.stall_timeout)
        self._thread = threading.Thread(target=self._loop, name="body-compute", daemon=True)
        self.health.thread = self._thread
        self._thread.start()

    def body_for(self, theirs: Any) -> tuple[int | None, str | None]:
        """The index of the hosted body that fits the device's parts, or the reason none does."""
        return match_body([b.manifest for b in self.bodies], theirs)

    def parse_manifest(self, data: dict) -> Any:
        """The device's manifest from its HELLO, parsed by the hosted manifest's own class."""
        return type(self.manifest).from_peer(data)

    def open_session(self, body_index: int = 0) -> Future[bytes]:
        """A new session on `bodies[body_index]` (the one `body_for` chose); its id."""
        return self._call(self._open, body_index)

    def close_session(self, session_id: bytes) -> Future[None]:
        """Close a session (after its loop has stopped there is nothing left to close: resolves at once)."""
        return self._call(self._forget, session_id, noop_when_closed=True)

    def reap(self, idle_seconds: float, among: Collection[bytes] | None = None) -> Future[list[bytes]]:
        """Close sessions idle for longer than `idle_seconds` (a backstop for lost connections), of
        `among` only if given (one front end's); the ids it closed, so the transport knows which of
        its sessions are gone."""
        return self._call(self._reap, idle_seconds, among)

    def submit(self, session_id: bytes, frame: Frame, waiter: Waiter | None = None) -> Future | Waiter:
        """Queue one frame for its session; answers (reply or None, compute seconds) to `waiter`,
        or to a new Future (returned either way). A frame whose kind or shape is wrong is refused
        here, before it is queued."""
        future = waiter if waiter is not None else Future()
        problem = frame_problem(frame, self.hidden_size)
        if problem is not None:
            future.set_exception(WireError(problem))
            return future
        with self._wake:
            if self._closed is not None:
                future.set_exception(self._closed)
                return future
            arrived = time.monotonic()
            self._frames.append((session_id, _Queued(frame, future, arrived)))
            if session_id in self._answered and session_id not in self._back:
                self._note_back(session_id, arrived)
            self._wake.notify()
        return future

    def shutdown(self, timeout: float = defaults.SHUTDOWN_TIMEOUT) -> None:
        """Stop the compute thread after its current step; every frame and call still waiting is
        failed with a compute error (a device replays it elsewhere)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the compute thread did not stop within %.0f s of shutdown (a step is stuck)", timeout)
        for mirror in self._mirrors:  # the other tensor-parallel ranks exit their loops
            mirror.stop()

    def _call(self, fn: Callable, *args: Any, noop_when_closed: bool = False) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closed is not None:
                if noop_when_closed:
                    future.set_result(None)
                else:
                    future.set_exception(self._closed)
                return future
            self._calls.append((future, fn, args))
            self._wake.notify()
        return future

    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a bug outside any step: say so, fail what waits, end
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            log.critical("the body compute thread stopped (%s)", reason, exc_info=True)
        finally:
            self._drain(reason)

    def _serve(self) -> None:
        progressed = True
        while True:
            self.health.beat()
            with self._wake:
                idle = not (self._calls or self._frames or (progressed and (self._queues or self._active)))
                if idle and not self._stopping:
                    # Work that waits for KV space is retried every 10 ms; an idle loop still ticks,
                    # so its heartbeat stays fresh.
                    self._wake.wait(timeout=0.01 if self._active else self.health.tick)
                self._gather()
                if self._stopping:
                    return
                calls, self._calls = self._calls, deque()
                frames, self._frames = self._frames, []
            self.health.beat()
            for future, fn, args in calls:
                if future.set_running_or_notify_cancel():
                    _resolve(future, fn, *args)
            for session_id, queued in frames:
                self._queues.setdefault(session_id, deque()).append(queued)
            try:
                progressed = self._tick()
            except Exception as exc:  # noqa: BLE001 - a fault outside the model: fail what was in flight, keep serving
                log.exception("the body scheduler failed a step")
                self._failed(list(self._active), exc)
                progressed = True

    def _drain(self, reason: str) -> None:
        """The loop has ended: refuse what comes next, and fail every frame and call still waiting."""
        error = ComputeError(f"the body server's compute loop has stopped ({reason}); reconnect")
        with self._wake:
            self._closed = error
            calls, self._calls = self._calls, deque()
            frames, self._frames = self._frames, []
        self.health.stop(reason)
        waiting = [f for f, *_ in calls] + [q.future for _, q in frames]
        waiting += [q.future for queue in self._queues.values() for q in queue]
        waiting += [w.future for w in self._active.values() if w.future is not None]
        self._queues.clear()
        self._active.clear()
        for future in waiting:
            _settle(future, error=error)

    def _gather(self) -> None:
        """Hold the next step while the sessions the last step answered are coming back (the
        caller holds `_wake`): up to `step_wait` seconds after the latest of them sent its next
        frame, or, before the first has, up to one forward (at least `step_wait`) after that step.

        Their devices answer within a round trip of each other, so their frames arrive close
        together however long the round trip, and a step started on the first few runs again for
        the rest. A window counted from the last step's end splits the sessions for good once the
        round trip outgrows it: each half's frames are waiting when the other half's step ends and
        start without it. Through the engine process's pipe the round trip is longer and that
        happened (one H100, 64 sessions: 31.9 sessions per forward against 56.1 in one process).
        Holding up to one forward for the first to come back costs less than the forward those
        sessions would wait for in a step of their own.
        """
        if not self.limits.step_wait or not (self._frames or self._early) or not self._answered:
            return
        began = time.monotonic()
        try:
            self._hold_for_answered()
        finally:
            self._held += time.monotonic() - began

    def _hold_for_answered(self) -> None:
        while not (self._stopping or self._calls):
            if len(self._back) >= len(self._answered):
                return
            deadline = (self._latest_back + self.limits.step_wait) if self._back else self._answered_at + self._answered_hold
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(timeout=left)

    def _note_back(self, session_id: bytes, arrived: float) -> None:
        """An answered session's next frame came (the caller holds `_wake`)."""
        at = max(arrived, self._answered_at)
        self._back[session_id] = at
        self._latest_back = max(self._latest_back, at)

    def _answered_now(self, finished: list[Work]) -> None:
        """The step answered `finished`: the sessions `_gather` holds the next step for, and those of
        them whose next frame is here already (queued, or started while the step ran). A session
        closed meanwhile (its reply failed) is not waited for: it never sends again."""
        answered = {w.session.session_id for w in finished} & self.sessions.keys()
        now = time.monotonic()
        with self._wake:
            self._answered, self._answered_at, self._back, self._latest_back = answered, now, {}, now
            waiting = {s for s, _ in self._frames} | self._early.keys() | {s for s, q in self._queues.items() if q}
            for session_id in answered & waiting:
                self._note_back(session_id, now)

    def _open(self, body_index: int) -> bytes:
        if len(self.sessions) >= self.limits.max_sessions:
            self._refused("sessions")
            raise CapacityError(
                f"the server is at its limit of {self.limits.max_sessions} sessions; retry later",
                retry_after=defaults.CAPACITY_RETRY_AFTER,
            )
        self._check_memory(0, "a new session")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = self.bodies[body_index].open(session_id, self.limits.session(), self.pool)
        self._last_used[session_id] = time.monotonic()
        log.info("session %s opened (%d active)", session_id.hex()[:8], len(self.sessions))
        return session_id

    def _close(self, session_id: bytes, error: Exception | None = None) -> None:
        """Close a session and fail its waiting frames with `error` (default: expired)."""
        session = self.sessions.pop(session_id, None)
        self._last_used.pop(session_id, None)
        with self._wake:  # no step waits for a closed session's next frame
            self._answered.discard(session_id)
            self._back.pop(session_id, None)
        work = self._active.pop(session_id, None)
        waiting = [q.future for q in self._queues.pop(session_id, ())] + ([work.future] if work else [])
        for future in waiting:
            _settle(future, error=error or ExpiredError("session is closed or expired; reconnect"))
        if session is not None:
            session.close()

    def _forget(self, session_id: bytes) -> None:
        """The transport is done with a session (closed, or after it preempted one)."""
        self._preempted.pop(session_id, None)
        self._close(session_id)

    def _reap(self, idle_seconds: float, among: Collection[bytes] | None) -> list[bytes]:
        now = time.monotonic()
        stale = [s for s, t in self._last_used.items()
                 if now - t > idle_seconds and s not in self._active and (among is None or s in among)]
        for session_id in stale:
            log.warning("session %s idle for over %.0f s; closed", session_id.hex()[:8], idle_seconds)
            self._close(session_id)
        return stale

    def _refused(self, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(reason)

    def _check_memory(self, need: int, what: str) -> None:
        now = time.monotonic()
        if now - self._free_read > FREE_MEMORY_TTL:  # reading it costs a syscall or a CUDA call
            self._free, self._free_read = _free_memory(self.bodies[0].memory_probe()), now
        free = self._free
        if free - need < self.limits.min_free_memory:
            self._refused("memory")
            raise CapacityError(
                f"only {free >> 20} MiB of memory free ({what} needs {need >> 20} MiB and the guard keeps "
                f"{self.limits.min_free_memory >> 20} MiB); retry later",
                retry_after=defaults.CAPACITY_RETRY_AFTER,
            )
        self._free -= need  # what this frame will take, until the next reading

    def _tick(self) -> bool:
        """Start the next frame of every idle session, then run one step per body; True if any
        work was done (False: everything left is waiting for KV space)."""
        progressed = self._admit_queued()
        groups: dict[int, list[Work]] = {}
        for work in self._reserve():
            groups.setdefault(id(work.session.body), []).append(work)
        for works in groups.values():
            progressed |= self._step(works[0].session.body, works)
        return progressed

    def _admit_queued(self) -> bool:
        """Start the next frame of every session with no work in progress (handling the frames
        that run no step on the way); True if any frame was taken."""
        progressed = False
        starting: list[tuple[bytes, _Queued]] = []
        for session_id in list(self._queues):
            queue = self._queues[session_id]
            while queue and session_id not in self._active and session_id in self._queues:
                progressed = True
                queued = queue.popleft()
                if self._admit(session_id, queued):
                    starting.append((session_id, queued))
                    break
            if not queue or session_id not in self.sessions:  # done, or closed by a failed frame
                self._queues.pop(session_id, None)
        self._start(starting)
        return progressed

    def _admit(self, session_id: bytes, queued: _Queued) -> bool:
        """Handle a non-batched frame now (False), or check a HIDDEN frame for a step (True). A
        frame that fails here fails alone."""
        session = self.sessions.get(session_id)
        if session is None:
            _settle(queued.future, error=self._preempted.get(session_id)
                    or ExpiredError("session is closed or expired; reconnect"))
            return False
        if session.batch_key(queued.frame) is None:
            _resolve(queued.future, self._handle, session_id, queued.frame)
            return False
        try:
            self._check_memory(session.new_bytes(queued.frame), "this frame")
            session.check(queued.frame)
        except LambdaSplitError as exc:
            _settle(queued.future, error=exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a bug in a check: this session's, not its step's
            log.exception("checking a frame of session %s failed", session_id.hex()[:8])
            _settle(queued.future, error=self._failed([session_id], exc))
            return False
        return True

    def _start(self, starting: list[tuple[bytes, _Queued]]) -> None:
        """Decode the checked HIDDEN frames (per body, together) and make each its session's work."""
        by_body: dict[int, list[tuple[bytes, _Queued]]] = {}
        for session_id, queued in starting:
            by_body.setdefault(id(self.sessions[session_id].body), []).append((session_id, queued))
        for members in by_body.values():
            body = self.sessions[members[0][0]].body
            try:
                states = decode_hidden([q.frame for _, q in members], *body.placement)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory moving the frames: these sessions only
                error = self._failed([s for s, _ in members], exc)
                for _, queued in members:
                    _settle(queued.future, error=error)
                continue
            for (session_id, queued), hidden in zip(members, states, strict=True):
                if isinstance(hidden, Exception):
                    _settle(queued.future, error=hidden)
                    continue
                work = self.sessions[session_id].prepare(queued.frame, hidden)
                work.future, work.arrived = queued.future, queued.arrived
                self._last_used[session_id] = time.monotonic()
                self._active[session_id] = work

    def _reserve(self) -> list[Work]:
        """The works whose frames hold KV blocks for all their positions, claimed oldest session
        first; a work that cannot get them waits (or, after `kv_wait`, gets a capacity error)."""
        if self.pool is None:
            return list(self._active.values())
        ready, now = [], time.monotonic()
        for session_id in [s for s in self.sessions if s in self._active]:  # oldest first
            work = self._active.get(session_id)
            if work is None:  # preempted by an older session in this pass
                continue
            try:
                claimed = self._claim(work)
            except LimitError as exc:
                del self._active[session_id]
                _settle(work.future, error=exc)
                continue
            if claimed:
                work.waiting_since = None
                ready.append(work)
            else:
                self._wait_for_kv(work, now)
        return ready

    def _claim(self, work: Work) -> bool:
        """Give every row of `work` the blocks for all its positions; preempt younger sessions for
        them if that is enough. False: they must wait. LimitError: they would never fit."""
        pool, rows = self.pool, work.rows
        target = rows[0].length + work.remaining
        if pool.grow(rows, target):
            return True
        need = sum(max(0, pool.blocks_for(target) - len(row.blocks)) for row in rows)
        if len(rows) * pool.blocks_for(target) > pool.usable_blocks:
            raise LimitError(
                f"{len(rows)} rows x {target} positions need {len(rows) * pool.blocks_for(target)} KV blocks; the "
                f"server's KV pool has {pool.usable_blocks} (--kv-pool)"
            )
        order = list(self.sessions)
        younger = [s for s in reversed(order[order.index(work.session.session_id) + 1:]) if _held(self.sessions[s])]
        if pool.free_blocks + sum(_held(self.sessions[s]) for s in younger) < need:
            return False  # preempting them all would not be enough: wait for older sessions to finish
        for victim in younger:  # the youngest first, only as many as it takes
            self._preempt(victim, work.session.session_id)
            if pool.grow(rows, target):
                return True
        return False

    def _preempt(self, session_id: bytes, by: bytes) -> None:
        """Close a session to give its KV blocks to an older one; its device replays on a new session."""
        self._refused("preempt")
        log.info("session %s preempted: session %s needed its KV blocks", session_id.hex()[:8], by.hex()[:8])
        error = CapacityError(
            "preempted: the server's KV pool is full and an older session needed this session's blocks; "
            "reconnect and replay", retry_after=defaults.CAPACITY_RETRY_AFTER,
        )
        self._preempted[session_id] = error
        self._close(session_id, error)

    def _takes(self, pending: list[tuple[Work, int]]) -> list[tuple[Work, int]]:
        """How many of its `remaining` positions each work runs in one step: decodes first, every
        decode always; every waiting prefill gets the budget left, and at least one position per
        row, so no prompt waits for the decodes to thin out. A draft tree runs whole (its
        attention mask is its frame's)."""
        budget = self.step_tokens
        chosen = []
        for work, remaining in sorted(pending, key=lambda p: p[1] * len(p[0].rows)):
            rows = len(work.rows)
            take = remaining if remaining == 1 or work.parents is not None else min(remaining, max(1, budget // rows))
            budget -= rows * take
            chosen.append((work, take))
        return chosen

    def _step(self, body: Any, works: list[Work]) -> bool:
        """One forward over every decode step and as many prefill positions as the budget allows
        (every work already holds its blocks), committed only once it has run."""
        chosen = self._takes([(w, w.remaining) for w in works])
        if not chosen:
            return False
        began = time.perf_counter()
        pool, now = self.pool, time.monotonic()
        waits = tuple(now - w.arrived for w, _ in chosen if w.done == 0)
        ready = [self._planned(work, take) for work, take in chosen]
        step = assemble([plan or plan_chunk(work.chunk(take)) for (work, take), plan in zip(chosen, ready, strict=True)])
        self._early.clear()
        start = time.perf_counter()
        outs = self._launch(body, step, chosen)
        if outs is None:
            return True
        seconds = time.perf_counter() - start
        step.commit()
        finished = []
        for (work, take), out in zip(chosen, outs, strict=True):
            work.outputs.append(out)
            work.done += take
            work.seconds += seconds
            work.failures = 0
            if work.remaining == 0:
                finished.append(work)
        self._complete(finished)
        self._answered_now(finished)
        self._answered_hold = max(self.limits.step_wait, seconds)
        ended, since, held = time.perf_counter(), self._step_ended, self._held
        self._step_ended, self._held = ended, 0.0
        if self.on_step is not None:
            rows = sum(len(w.rows) for w, _ in chosen)
            positions = sum(len(w.rows) * take for w, take in chosen)
            self.on_step(StepStats(len(chosen), rows, positions, seconds, waits, pool.used_blocks, pool.usable_blocks,
                                   sum(plan is not None for plan in ready), began - since if since is not None else 0.0,
                                   held, start - began, ended - start - seconds))
        return True

    def _planned(self, work: Work, take: int) -> ChunkPlan | None:
        """The plan made for this chunk while the last step ran, if it still holds."""
        if work.ahead is None:
            return None
        (done, plan), work.ahead = work.ahead, None
        return plan if done == work.done and plan.length == take and plan.current() else None

    def _launch(self, body: Any, step: Step, chosen: list[tuple[Work, int]]) -> list[torch.Tensor] | None:
        """Run `step` on `body`, planning the next one meanwhile (async scheduling); its outputs,
        or None if it failed (then nothing of it was committed)."""
        pool = self.pool
        try:
            outs = body.step(pool, step)
        except Exception as exc:  # noqa: BLE001 - as in _handle: the step failed
            self._step_failed(step, chosen, exc)
            return None
        if self.async_schedule:
            self._plan_ahead(step, chosen)
        try:
            if pool.valid.device.type == "cuda":
                torch.cuda.synchronize(pool.valid.device)  # time the GPU work, not only its launch
        except Exception as exc:  # noqa: BLE001 - a fault of the step's kernels surfaces here
            self._step_failed(step, chosen, exc)
            return None
        return outs

    def _plan_ahead(self, step: Step, chosen: list[tuple[Work, int]]) -> None:
        """While `step` runs on the device: take in the frames that came, start the work of idle
        sessions (their states are decoded and copied meanwhile), and plan the next step's chunks
        that can be known now: those of the works in `step` that go on after it (from where it
        leaves their rows) and those of new works that get their blocks without preempting anyone.
        A plan the next step cannot use (another take, or the step failed) is made again then."""
        with self._wake:
            frames, self._frames = self._frames, []
        for session_id, queued in frames:
            self._queues.setdefault(session_id, deque()).append(queued)
        before = set(self._active)
        self._admit_queued()
        self._early.update({s: w.arrived for s, w in self._active.items() if s not in before})
        running = {id(work): (work.done + take, plan.after)
                   for (work, take), plan in zip(chosen, step.plans, strict=True)}
        waiting = any(w.waiting_since is not None for w in self._active.values())
        starts: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        for work in self._active.values():
            if id(work) in running:
                starts[id(work)] = running[id(work)]
            elif not waiting and self.pool is not None and self.pool.grow(work.rows, work.rows[0].length + work.remaining):
                starts[id(work)] = (work.done, [(row.length, row.valid) for row in work.rows])
        pending = [(w, w.length - starts[id(w)][0]) for w in self._active.values() if id(w) in starts]
        for work, take in self._takes([(w, left) for w, left in pending if left > 0]):
            done, bases = starts[id(work)]
            work.ahead = (done, plan_chunk(work.chunk(take, done), bases))

    def _step_failed(self, step: Step, chosen: list[tuple[Work, int]], exc: Exception) -> None:
        """Nothing of a failed step was committed: clear the slots it may have written, so every
        session is as it was, and let its works run again in the next step (a transient fault,
        such as a CUDA OOM, costs no session). A work whose step fails `STEP_RETRIES` + 1 times in
        a row closes its session with a compute error (its device replays)."""
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        works = [work for work, _ in chosen]
        try:
            step.rollback(self.pool)
        except Exception:  # noqa: BLE001 - the pool cannot be trusted for these sessions any more
            log.exception("clearing the slots of a failed step")
            for work in works:
                work.failures = defaults.STEP_RETRIES
        for work in works:
            work.failures += 1
        again = [w for w in works if w.failures <= defaults.STEP_RETRIES]
        first = (str(exc).splitlines() or [""])[0][:200]
        if again:
            log.warning("a batched step of %d session(s) failed (%s: %s); nothing was committed, running it again",
                        len(again), type(exc).__name__, first)
        if len(again) < len(works):
            self._failed([w.session.session_id for w in works if w.failures > defaults.STEP_RETRIES], exc)

    def _wait_for_kv(self, work: Work, now: float) -> None:
        if work.waiting_since is None:
            work.waiting_since = now
            return
        if now - work.waiting_since < self.limits.kv_wait:
            return
        session_id = work.session.session_id
        del self._active[session_id]
        self._refused("kv")
        _settle(work.future, error=CapacityError(
            f"the server's KV pool has had no room for this frame for {self.limits.kv_wait:.0f} s "
            f"({self.pool.free_blocks} of {self.pool.usable_blocks} blocks free); retry later",
            retry_after=defaults.CAPACITY_RETRY_AFTER,
        ))

    def _complete(self, works: list[Work]) -> None:
        """Answer the works whose positions have all run; their replies are encoded together."""
        by_codec: dict[Codec, list[Work]] = {}
        for work in works:
            session = work.session
            del self._active[session.session_id]
            self._last_used[session.session_id] = time.monotonic()
            self.tokens_served += work.frame.shape[0] * work.frame.shape[1]
            by_codec.setdefault(work.frame.codec, []).append(work)
        for codec, members in by_codec.items():
            outputs = [torch.cat(w.outputs, dim=1) if len(w.outputs) > 1 else w.outputs[0] for w in members]
            try:
                payloads = encode_tensors(outputs, codec)
            except Exception:  # noqa: BLE001 - encode one by one, so a failure is its own session's
                payloads = [None] * len(members)
            for work, out, payload in zip(members, outputs, payloads, strict=True):
                try:
                    reply = work.session.finish(work, payload if payload is not None else encode_tensor(out, codec))
                except Exception as exc:  # noqa: BLE001 - this session's reply failed: its future, no one else's
                    _settle(work.future, error=self._failed([work.session.session_id], exc))
                    continue
                _settle(work.future, (reply, work.seconds))

    def _failed(self, session_ids: list[bytes], exc: Exception) -> ComputeError:
        """Close sessions whose step failed inside the model (their caches may hold half a step);
        their frames in flight get the compute error, after the close (so a device that reads the
        error finds its session gone)."""
        first = (str(exc).splitlines() or [""])[0][:300]
        error = ComputeError(f"the body failed to run this step ({type(exc).__name__}: {first})")
        for session_id in session_ids:
            work = self._active.pop(session_id, None)
            try:
                self._close(session_id)
            except Exception:  # noqa: BLE001 - closing must not take the compute thread down with it
                log.exception("closing session %s after a failed step", session_id.hex()[:8])
            if work is not None and work.future is not None:
                _settle(work.future, error=error)
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        log.debug("the body failed (%s: %s); %d session(s) closed", type(exc).__name__, first, len(session_ids))
        return error

    def _handle(self, session_id: bytes, frame: Frame) -> tuple[Frame | None, float]:
        session = self.sessions[session_id]
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
            kv = (self.pool.used_blocks, self.pool.usable_blocks) if self.pool else (0, 0)
            self.on_step(StepStats(1, frame.shape[0], frame.shape[0], seconds, (), *kv))
        self.tokens_served += session.tokens - before
        return reply, seconds


def match_body(manifests: list[Any], theirs: Any) -> tuple[int | None, str | None]:
    """The index of the hosted body manifest that fits the device's parts, or the reason none does."""
    problem = None
    for index, manifest in enumerate(manifests):
        problem = manifest.compatible_with(theirs)
        if problem is None:
            return index, None
    if len(manifests) > 1:
        starts = ", ".join(str(m.body[0]) for m in manifests)
        problem = f"this server runs bodies starting at layers {starts}; the device's is {theirs.body}. {problem}"
    return None, problem


def pool_budget(limits: SchedulerLimits, probe: torch.Tensor | None) -> int:
    """KV pool bytes: --kv-pool if given, else what every session at its KV limit would need,
    capped at 90% of free GPU memory (the pool is allocated up front) or half the free host memory
    (host pages are committed only as they are written) above the free-memory guard."""
    if limits.kv_pool_bytes is not None:
        return limits.kv_pool_bytes
    share = 0.9 if probe is not None and probe.device.type == "cuda" else 0.5
    spare = max(0, _free_memory(probe) - limits.min_free_memory)
    return min(limits.max_sessions * limits.max_session_kv_bytes, int(share * spare))


def _context_window(bodies: list[Body]) -> int:
    """The model's context window, the default --max-context: with a smaller one (it was 4096) a
    longer prompt ran its first frames' prefill before the server refused it."""
    for body in bodies:
        if isinstance(body, TextBody):
            window = getattr(body.runner.config, "max_position_embeddings", None)
            if isinstance(window, int) and window > 0:
                return window
    return defaults.MAX_CONTEXT


def _make_pool(bodies: list[Body], limits: SchedulerLimits) -> KVPool | None:
    """One pool for every text body with layers (the variants of --k-max share it: it has the
    widest body's layer count and each body uses its first layers)."""
    text = [b for b in bodies if isinstance(b, TextBody) and b.layers]
    if not text:
        return None
    widest = max(text, key=lambda b: b.layers)
    config, probe = widest.runner.config, widest.memory_probe()
    heads = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // widest.shards
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pool = KVPool.sized(widest.layers, heads, head_dim, pool_budget(limits, probe), probe.dtype, probe.device)
    log.info("KV pool: %d blocks of %d positions (%d MiB)", pool.usable_blocks, BLOCK_SIZE,
             pool.blocks * block_bytes(widest.layers, heads, head_dim, probe.dtype) >> 20)
    return pool


def _resolve(future: Future, fn: Callable, *args: Any) -> None:
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - delivered to the waiting transport, which reports it
        _settle(future, error=exc)
        return
    _settle(future, value)


def _settle(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Answer a future unless it is answered already or was cancelled (its transport stopped
    waiting): one waiter that left must never keep the loop from answering the others."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


def _held(session: Session) -> int:
    """KV blocks a session's rows hold (sessions of bodies without a pool hold none)."""
    return sum(len(row.blocks) for row in getattr(session, "rows", ()))


def _free_memory(param: torch.Tensor | None) -> int:
    if param is not None and param.device.type == "cuda":
        return torch.cuda.mem_get_info(param.device)[0]
    return psutil.virtual_memory().available

