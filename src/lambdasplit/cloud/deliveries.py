"""Answers from the compute thread to the event loop, one wake-up per burst.

A batched step settles the frames of every session it ran in a row, on the compute thread. Through
`asyncio.wrap_future` each of them chained two futures (a `concurrent.futures.Future` with its own
condition variable, and an asyncio one) and woke the event loop once: at 64 sessions that was 15%
of the event loop thread's samples (py-spy, CPU server, tiny body). Here the compute thread appends
each answer to a list and wakes the loop only when the list was empty; the loop then settles every
answer that came meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class Deliveries:
    """Hands out `Answer`s for one event loop and delivers what they are given in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future, Any, BaseException | None]] = []

    def answer(self) -> Answer:
        """Something the compute thread can settle once; await its `future` on the loop."""
        return Answer(self, self._loop.create_future())

    def post(self, future: asyncio.Future, value: Any, error: BaseException | None) -> None:
        """Called on any thread: queue the answer, and wake the loop if nothing was queued yet."""
        with self._lock:
            self._ready.append((future, value, error))
            if len(self._ready) > 1:
                return  # a wake-up is already on its way and will take this one too
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, value, error in ready:
            if future.done():  # its connection stopped waiting (cancelled)
                continue
            try:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)
            except Exception as exc:  # noqa: BLE001 - e.g. an exception asyncio refuses: the rest of the burst still goes
                log.error("could not deliver an answer (%s); its connection gets an internal error", type(exc).__name__)
                future.set_exception(RuntimeError(f"undeliverable answer ({type(exc).__name__})"))


class Answer:
    """The scheduler's side of one awaited frame: `set_result` or `set_exception`, once (later
    calls are ignored, as `_settle` ignores a future answered already)."""

    __slots__ = ("_deliveries", "_settled", "future")

    def __init__(self, deliveries: Deliveries, future: asyncio.Future) -> None:
        self._deliveries = deliveries
        self._settled = False
        self.future = future

    def done(self) -> bool:
        return self._settled

    def set_result(self, value: Any) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if not self._settled:
            self._settled = True
            self._deliveries.post(self.future, value, error)
