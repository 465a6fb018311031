"""`cloud/server.py`'s `_IdleWatch`: a session's TTL ends a wait for a frame, and only that."""

from __future__ import annotations

import asyncio
import sys

import pytest

from lambdasplit.cloud.server import _IdleWatch
from lambdasplit.errors import ExpiredError


class _Silent:
    """A connection whose device never sends."""

    async def recv(self) -> bytes:
        await asyncio.Event().wait()
        return b""


async def _waiting(ttl: float) -> tuple[asyncio.Task, _IdleWatch]:
    """A handler task blocked in `receive`, and its watch."""
    holder: dict[str, _IdleWatch] = {}

    async def handler() -> bytes | str:
        holder["watch"] = _IdleWatch(ttl)
        return await holder["watch"].receive(_Silent())  # type: ignore[arg-type]

    task = asyncio.create_task(handler())
    while "watch" not in holder or holder["watch"]._since is None:
        await asyncio.sleep(0)
    return task, holder["watch"]


def test_a_wait_longer_than_the_ttl_is_an_expired_error():
    async def main() -> None:
        task, watch = await _waiting(30.0)
        watch._since -= 60  # the device has been silent for longer than the TTL
        watch._check()  # the watch's timer fires
        with pytest.raises(ExpiredError, match="idle for 30 s"):
            await task
        watch.stop()

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 a task does not count its cancellations")
def test_a_shutdown_that_cancels_at_the_same_time_wins_over_the_expiry():
    async def main() -> None:
        task, watch = await _waiting(30.0)
        watch._since -= 60
        watch._check()  # expired...
        task.cancel()  # ...and cancelled by a shutdown in the same turn of the loop
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.stop()

    asyncio.run(main())


def test_a_wait_within_the_ttl_only_moves_the_timer_on():
    async def main() -> None:
        task, watch = await _waiting(30.0)
        watch._check()  # fired early (the timer is lazy): nothing happens
        assert not task.done() and not watch._expired
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.stop()

    asyncio.run(main())
