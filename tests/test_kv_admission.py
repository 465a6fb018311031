"""KV pool admission (issue 21): a frame reserves the blocks for all its positions before its first
chunk runs, older sessions come first, and a full pool preempts the youngest session (its device
replays on a new session) instead of failing established ones with capacity errors. Tiny pools of
six usable blocks (16 positions each) on the tiny Llama."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.kvpool import block_bytes
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.errors import CapacityError, LimitError
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle
from tests.test_server_hardening import IDS, TOKEN, ThreadServer, hidden_frame

WAIT = 30  # seconds any single wait below may take before the test fails
NO_TIMEOUT = 600.0  # --kv-wait: long enough that only a deadlock could reach it


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies


def six_blocks(bodies, **limits) -> SchedulerLimits:
    """Limits whose KV pool has six usable blocks (96 positions) and no KV timeout."""
    body = bodies[0]
    config = body.runner.config
    per_block = block_bytes(body.layers, config.num_key_value_heads,
                            config.hidden_size // config.num_attention_heads, torch.float32)
    return SchedulerLimits(**{"kv_pool_bytes": 8 * per_block, "kv_wait": NO_TIMEOUT, **limits})


class Reference:
    """Each session's frames run alone, on a scheduler of its own: what the batched results must equal."""

    def __init__(self, bodies) -> None:
        self.bodies = bodies
        self.locals: dict[bytes, LocalBody] = {}

    def forward(self, session: bytes, frame) -> torch.Tensor:
        if session not in self.locals:
            self.locals[session] = LocalBody(BodyScheduler(self.bodies), Codec.FP32)
        return self.locals[session].forward(frame.tensor())

    def close(self) -> None:
        for local in self.locals.values():
            local.scheduler.shutdown()


def run(scheduler: BodyScheduler, reference: Reference, session: bytes, seq: int, length: int, seed: int):
    """Submit a frame, and check its reply against the session run alone."""
    frame = hidden_frame(session, seq, 1, length, seed)
    future = scheduler.submit(session, frame)
    return future, lambda: torch.testing.assert_close(
        future.result(WAIT)[0].tensor(), reference.forward(session, frame), atol=1e-5, rtol=1e-5)


def held(scheduler: BodyScheduler, session: bytes) -> int:
    return sum(len(row.blocks) for row in scheduler.sessions[session].rows)


def test_two_long_prompts_do_not_starve_each_other_or_a_decoding_session(bodies):
    """Two 40-position prompts chunked four positions a step against six blocks: growing chunk by
    chunk they filled the pool between them (two blocks each), neither could finish and the
    decoding session could not get its next block either. Reserved per frame, the first prompt
    takes its three blocks, the second waits with none, and the decoder never waits."""
    scheduler = BodyScheduler(bodies, six_blocks(bodies, step_tokens=4))
    reference = Reference(bodies)
    refusals: list[str] = []
    scheduler.on_refusal = refusals.append
    try:
        decoder = scheduler.open_session().result(WAIT)
        _, check = run(scheduler, reference, decoder, 1, 16, seed=1)  # one full block
        check()
        first, second = scheduler.open_session().result(WAIT), scheduler.open_session().result(WAIT)
        first_prompt, check_first = run(scheduler, reference, first, 1, 40, seed=2)
        second_prompt, check_second = run(scheduler, reference, second, 1, 40, seed=3)
        for seq in range(2, 26):  # to 40 positions: the decoder takes its second and third blocks
            _, check = run(scheduler, reference, decoder, seq, 1, seed=seq + 10)
            check()
        check_first()
        assert not second_prompt.done() and held(scheduler, second) == 0  # it waits holding nothing
        scheduler.close_session(first).result(WAIT)  # the first device is done
        check_second()
        assert refusals == []
    finally:
        scheduler.shutdown()
        reference.close()


def test_a_full_pool_preempts_the_youngest_session_for_an_older_ones_next_block(bodies):
    scheduler = BodyScheduler(bodies, six_blocks(bodies))
    reference = Reference(bodies)
    refusals: list[str] = []
    scheduler.on_refusal = refusals.append
    try:
        older = scheduler.open_session().result(WAIT)
        _, check = run(scheduler, reference, older, 1, 16, seed=1)
        check()
        younger = scheduler.open_session().result(WAIT)
        _, check = run(scheduler, reference, younger, 1, 80, seed=2)  # the other five blocks
        check()
        assert scheduler.pool.free_blocks == 0
        _, check = run(scheduler, reference, older, 2, 1, seed=3)  # needs a second block
        check()
        assert refusals == ["preempt"] and younger not in scheduler.sessions
        with pytest.raises(CapacityError, match="preempted: .* older session needed") as info:
            scheduler.submit(younger, hidden_frame(younger, 2, 1, 1)).result(WAIT)
        assert info.value.retry_after > 0
        # A session younger than everyone cannot preempt: it waits for blocks, holding none.
        newest = scheduler.open_session().result(WAIT)
        waiting, check_newest = run(scheduler, reference, newest, 1, 90, seed=4)  # six blocks; four are free
        _, check = run(scheduler, reference, older, 3, 1, seed=5)
        check()
        assert not waiting.done() and held(scheduler, newest) == 0 and older in scheduler.sessions
        scheduler.close_session(older).result(WAIT)
        check_newest()
        assert refusals == ["preempt"]
    finally:
        scheduler.shutdown()
        reference.close()


def test_a_frame_the_whole_pool_cannot_hold_is_refused_at_once(bodies):
    scheduler = BodyScheduler(bodies, six_blocks(bodies))
    try:
        session = scheduler.open_session().result(WAIT)
        with pytest.raises(LimitError, match="1 rows x 97 positions need 7 KV blocks; the server's KV pool has 6"):
            scheduler.submit(session, hidden_frame(session, 1, 1, 97)).result(WAIT)
    finally:
        scheduler.shutdown()


def test_a_preempted_device_replays_and_both_generations_equal_unsplit_generate(bodies, llama):
    """Over the network: the older device decodes through a pool the younger one's long prompt
    filled; the younger is preempted, waits its retry-after, replays on a new session (which waits
    for blocks as the youngest) and finishes; both equal the unsplit model's generate()."""
    torch.manual_seed(0)
    long_prompt = torch.randint(3, 49152, (1, 70))  # 70 + 11 positions: six blocks, more than it can get
    model = oracle(llama)
    expected = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False)[0, ids.shape[1]:].tolist() for ids in (IDS, long_prompt)]
    runtimes = [SplitRuntime.load(llama, (2, 2)) for _ in range(2)]
    with ThreadServer(bodies, six_blocks(bodies)) as server:
        older = RemoteBody(server.url, runtimes[0].manifest, Codec.FP32, token=TOKEN, reconnect_window=0)
        younger = RemoteBody(server.url, runtimes[1].manifest, Codec.FP32, token=TOKEN, backoff=0.05)
        results: dict[str, list[int] | BaseException] = {}

        def run_younger() -> None:
            try:
                results["younger"] = runtimes[1].generate_ids(
                    younger, long_prompt, None, SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids[0]
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                results["younger"] = exc

        thread = threading.Thread(target=run_younger)

        def after_first_token(tokens: list[list[int]]) -> None:
            if thread.ident is None:  # the younger device starts once the older one holds its block
                thread.start()
                deadline = time.monotonic() + WAIT
                while server.scheduler.pool.free_blocks:  # until its prompt has reserved the rest
                    assert time.monotonic() < deadline and thread.is_alive(), results
                    time.sleep(0.01)  # polling

        # 9 + 11 positions: its second block comes after the younger prompt has filled the pool.
        result = runtimes[0].generate_ids(older, IDS, None, SamplingParams(max_new_tokens=12, ignore_eos=True),
                                         on_tokens=after_first_token)
        older.close()
        thread.join(120)
        younger.close()
        assert result.token_ids[0] == expected[0] and older.reconnects == 0
        assert results["younger"] == expected[1] and younger.reconnects == 1
        assert server.metric('lambdasplit_capacity_refusals_total{reason="preempt"}') == 1
        server.wait_metric("lambdasplit_sessions_active", 0)
