"""From a generation on a worker thread to the event loop that streams it (server-sent events).

`Workers` is an app's bounded pool of threads (`defaults.GENERATION_THREADS`): a request beyond it
waits for a thread instead of starting one more, and one whose client left while it waited never
starts. `Job` runs `work(cancel, put)` on it: what `put` hands over, then the work's return value
(or the exception it raised), then `END`, arrive in order through an asyncio queue; `next` notices a
client that disconnected and sets `cancel`, which the generation checks before each body call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import Request

from lambdasplit import defaults
from lambdasplit.device.generation import GenerationCancelled

END = object()  # the last item of every job
Work = Callable[[threading.Event, Callable[[object], None]], object]


class ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


class Workers:
    """The threads one app's generations run on, at most `size` at once."""

    def __init__(self, name: str, size: int = defaults.GENERATION_THREADS) -> None:
        self.executor = ThreadPoolExecutor(size, thread_name_prefix=name)
        self.jobs: set[Job] = set()

    def start(self, work: Work) -> Job:
        """Queue `work` (called from the event loop that will read its items)."""
        return Job(work, self)

    def shutdown(self) -> None:
        """Stop every job at its next step and start no queued one."""
        for job in list(self.jobs):
            job.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


class Job:
    """One request's work on a worker thread; see the module docstring."""

    def __init__(self, work: Work, workers: Workers) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancel = threading.Event()
        self._jobs = workers.jobs
        self._jobs.add(self)
        workers.executor.submit(self._run, work)

    def _run(self, work: Work) -> None:
        try:
            if self.cancel.is_set():  # the client left, or the app stopped, while it waited for a thread
                raise GenerationCancelled("the request was cancelled before a worker thread took it")
            self._put(work(self.cancel, self._put))
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it
            self._put(exc)
        finally:
            self._put(END)
            self._jobs.discard(self)

    def _put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()

    async def next(self, request: Request, poll: float) -> object:
        """The next item; raises ClientGone (and cancels the job) once the client disconnects."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), poll)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel.set()
                    raise ClientGone from None
