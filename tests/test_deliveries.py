"""`cloud/deliveries.py`: answers settled on another thread reach the event loop in bursts."""

from __future__ import annotations

import asyncio
import threading

from lambdasplit.cloud.deliveries import Deliveries
from lambdasplit.errors import ComputeError


def test_a_burst_of_answers_wakes_the_loop_once_and_each_gets_its_own():
    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wakes.append(args), real(*args))[1]  # type: ignore[method-assign]
        deliveries = Deliveries(loop)
        answers = [deliveries.answer() for _ in range(6)]

        def settle() -> None:  # the compute thread answering a step, while the loop waits
            for i, answer in enumerate(answers):
                if i == 4:
                    answer.set_exception(ComputeError("this one failed"))
                else:
                    answer.set_result((f"reply {i}", 0.01 * i))

        thread = threading.Thread(target=settle)
        thread.start()
        thread.join()  # the loop did not run meanwhile: every answer is queued behind one wake-up
        results = await asyncio.gather(*(a.future for a in answers), return_exceptions=True)
        return results, len(wakes)

    results, wakes = asyncio.run(main())
    assert wakes == 1
    assert results[:4] == [(f"reply {i}", 0.01 * i) for i in range(4)] and results[5] == ("reply 5", 0.05)
    assert isinstance(results[4], ComputeError) and "this one failed" in str(results[4])


def test_an_answer_is_settled_once_and_a_cancelled_wait_is_skipped():
    async def main() -> None:
        deliveries = Deliveries(asyncio.get_running_loop())
        first, cancelled, later = deliveries.answer(), deliveries.answer(), deliveries.answer()
        assert not first.done()
        first.set_result("one")
        first.set_result("two")  # ignored, as `_settle` ignores a future answered already
        first.set_exception(ComputeError("ignored too"))
        assert first.done()
        cancelled.future.cancel()  # its connection stopped waiting
        cancelled.set_result("nobody reads this")
        later.set_result("after the cancelled one")
        assert await first.future == "one"
        assert await later.future == "after the cancelled one"
        assert cancelled.future.cancelled()

    asyncio.run(main())


def test_an_answer_after_the_loop_closed_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    deliveries = Deliveries(loop)
    answer = deliveries.answer()
    loop.close()
    answer.set_result("too late")  # the compute thread finishing a step after shutdown: no exception
    assert answer.done()


def test_an_answer_asyncio_refuses_fails_alone_and_the_rest_of_the_burst_is_delivered():
    async def main() -> list:
        deliveries = Deliveries(asyncio.get_running_loop())
        answers = [deliveries.answer() for _ in range(3)]
        answers[0].set_result("first")
        answers[1].set_exception(StopIteration())  # asyncio futures refuse StopIteration
        answers[2].set_result("third")
        return await asyncio.wait_for(asyncio.gather(*(a.future for a in answers), return_exceptions=True), 30)

    first, refused, third = asyncio.run(main())
    assert (first, third) == ("first", "third")
    assert isinstance(refused, RuntimeError) and "undeliverable" in str(refused)
