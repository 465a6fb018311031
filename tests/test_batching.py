"""Batched body steps (issue 12): many sessions' decode positions and prefill chunks in one forward,
their KV in one paged pool, checked against each session run alone and against the unsplit model's
own generate(); and sessions that misbehave cannot starve or corrupt the others."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
import torch

from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine import scheduler as scheduler_module
from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, Sequence, block_bytes
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.session import decode_hidden
from lambdasplit.engine.step import Chunk
from lambdasplit.errors import ComputeError, WireError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import MsgType, parse_frame, tensor_frame
from tests.conftest import oracle
from tests.test_server_hardening import IDS, TOKEN, ThreadServer, _vanish, expect_error, hidden_frame, raw_session


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies


def _pool(body) -> KVPool:
    config = body.runner.config
    return KVPool(body.layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                  256, torch.float32, "cpu")


def _run(body, pool, rows, pieces):
    """Run pieces [(row list, hidden, mask)] as one step on `pool`."""
    for seqs, hidden, _ in pieces:
        assert pool.grow(seqs, seqs[0].length + hidden.shape[1])
    return body.run(pool, [Chunk(seqs, hidden, mask) for seqs, hidden, mask in pieces])


def test_one_step_of_decodes_and_prefill_chunks_equals_each_session_alone(bodies):
    """Sessions of different lengths, row counts and padding, run in one step (decodes, a prefill
    chunk, a left-padded batch) give each session exactly what running it alone gives."""
    body = bodies[0]
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 3), (2, 19), (1, 7), (3, 5)]  # (rows, prompt length)
    masks = [torch.ones(r, t, dtype=torch.long) for r, t in shapes]
    masks[3][0, :2] = 0  # a left-padded row
    prompts = [torch.randn(r, t, 64, generator=generator) for r, t in shapes]
    alone_pool, batched_pool = _pool(body), _pool(body)
    alone = [[Sequence() for _ in range(r)] for r, _ in shapes]
    batched = [[Sequence() for _ in range(r)] for r, _ in shapes]
    for rows, prompt, mask in zip(alone, prompts, masks, strict=True):
        _run(body, alone_pool, rows, [(rows, prompt, mask)])
    # In the batched pool the prompts arrive as decodes mixed with prefill chunks of other sessions.
    _run(body, batched_pool, None, [(batched[0], prompts[0], masks[0]), (batched[1], prompts[1][:, :8], masks[1][:, :8])])
    _run(body, batched_pool, None, [(batched[1], prompts[1][:, 8:], masks[1][:, 8:]), (batched[2], prompts[2], masks[2]),
                                    (batched[3], prompts[3], masks[3])])
    for step in range(BLOCK_SIZE + 2):  # across a block boundary
        steps = [torch.randn(r, 1, 64, generator=generator) for r, _ in shapes]
        ones = [torch.ones(r, 1, dtype=torch.long) for r, _ in shapes]
        expected = [_run(body, alone_pool, None, [(rows, h, m)])[0] for rows, h, m in zip(alone, steps, ones, strict=True)]
        got = _run(body, batched_pool, None, list(zip(batched, steps, ones, strict=True)))
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"session {i}, step {step}")
    for a, b in zip(alone, batched, strict=True):
        assert [(r.length, r.valid) for r in a] == [(r.length, r.valid) for r in b]


def test_the_pool_keeps_sessions_apart_and_zeroes_released_blocks():
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, blocks=5, dtype=torch.float32, device="cpu", reserve=2)
    a, b = Sequence(), Sequence()
    assert pool.grow([a], BLOCK_SIZE + 1) and pool.capacity == 4  # doubled from 2 blocks on demand
    assert not pool.grow([b], 2 * BLOCK_SIZE)  # only one usable block left: all or nothing
    assert b.blocks == [] and pool.grow([b], BLOCK_SIZE)
    assert set(a.blocks).isdisjoint(b.blocks) and 0 not in a.blocks + b.blocks  # block 0 is the zero block
    pool.keys[0][pool.slots([a], 0, BLOCK_SIZE + 1).view(-1)] = float("nan")
    pool.release([a])
    assert pool.free_blocks == 2 and not torch.isnan(pool.keys[0]).any()
    assert pool.gather_index([b], 2 * BLOCK_SIZE)[0, BLOCK_SIZE:].tolist() == list(range(BLOCK_SIZE))  # zero-block padding


def test_releasing_and_clearing_zero_every_layer_and_kind_and_nothing_else():
    """The layers' keys and values share one tensor that release and clear zero in one call each;
    across a growth of the pool they must still zero every layer's keys and values, and only the
    slots they are given."""
    pool = KVPool(layers=3, kv_heads=2, head_dim=4, blocks=8, dtype=torch.float32, device="cpu", reserve=2)
    a, b = Sequence(), Sequence()
    assert pool.grow([a], BLOCK_SIZE + 1) and pool.grow([b], 2 * BLOCK_SIZE) and pool.capacity == 8  # grown twice
    for tensor in (*pool.keys, *pool.values):
        tensor.fill_(float("nan"))
    pool.valid.fill_(True)
    kept = pool.slots([b], 0, 2 * BLOCK_SIZE).view(-1)
    pool.clear(kept[-3:])  # as a crop of b's last three positions
    pool.release([a])
    gone = torch.zeros(pool.capacity * BLOCK_SIZE, dtype=torch.bool)
    gone[pool.slots([Sequence(blocks=[1, 2])], 0, 2 * BLOCK_SIZE).view(-1)] = True  # a's two blocks
    gone[kept[-3:]] = True
    assert pool.free_blocks == 8 - 2 - 2
    for tensor in (*pool.keys, *pool.values):
        assert (tensor[gone] == 0).all() and tensor[~gone].isnan().all()
    assert torch.equal(pool.valid, ~gone)


def _histogram(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)}


def test_concurrent_sessions_batch_and_each_equals_unsplit_generate(llama, bodies):
    """Five devices with different prompts, lengths and start times, some finishing early, one
    reconnecting mid-way, against one server: every session's greedy tokens equal the unsplit
    model's generate() for that prompt alone and its logits agree within 1e-4, and the server's
    steps batched several sessions, prefill chunks (of 4 positions here) mixed with decodes."""
    prompts = [[1, 504, 3458], [1, 504, 3458, 282, 4649, 314, 253, 2030, 30], [1, 2030], [1, 282, 4649, 314, 253],
               [1, 253, 2030, 30, 282, 4649, 314, 253, 504, 3458, 282]]
    new_tokens = [12, 6, 16, 9, 10]
    model = oracle(llama)
    expected = []
    for ids, n in zip(prompts, new_tokens, strict=True):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             output_logits=True, return_dict_in_generate=True)
        expected.append((out.sequences[0, len(ids):].tolist(), torch.cat(out.logits)))
    server = ThreadServer(bodies, SchedulerLimits(step_tokens=4))
    steps = []
    server.scheduler.on_step = lambda stats, record=server.scheduler.on_step: (steps.append(stats), record(stats))
    runtimes = [SplitRuntime.load(llama, (2, 2)) for _ in prompts]
    results: dict[int, list[int]] = {}
    logits: dict[int, torch.Tensor] = {}
    reconnects: dict[int, int] = {}
    started = [threading.Event() for _ in prompts]

    def run(i: int) -> None:
        if i:
            started[i - 1].wait(30)  # staggered starts
        body = RemoteBody(server.url, runtimes[i].manifest, Codec.FP32, token=TOKEN, backoff=0.05)
        tokens: list[int] = []

        def on_tokens(step: list[list[int]]) -> None:
            tokens.extend(step[0])
            started[i].set()
            if i == 2 and len(tokens) == 5:
                body._ws.close()  # the connection drops mid-way: the device reconnects and replays

        result = runtimes[i].generate_ids(body, torch.tensor([prompts[i]]), None, SamplingParams(max_new_tokens=new_tokens[i], ignore_eos=True),
                                         on_tokens=on_tokens, keep_logits=True)
        body.close()
        results[i], logits[i], reconnects[i] = result.token_ids[0], result.logits[:, 0], body.reconnects

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (tokens, want) in enumerate(expected):
        assert results.get(i) == tokens, f"session {i}"
        torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=0, msg=f"session {i}")
    assert reconnects[2] == 1 and sum(reconnects.values()) == 1
    assert max(s.sessions for s in steps) > 1, "no step batched more than one session"
    assert any(s.sessions > 1 and s.positions > s.rows for s in steps), "no prefill chunk shared a step with decodes"
    text = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                  headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10).read().decode()
    sessions = _histogram(text, "lambdasplit_step_sessions")
    assert sessions["+Inf"] > sessions["1.0"]
    assert _histogram(text, "lambdasplit_queue_wait_seconds")["+Inf"] >= sum(new_tokens)
    server.close()


def test_a_prompt_longer_than_the_frame_bound_is_sent_in_chunks(llama, bodies):
    """The server's --max-frame-positions (announced in WELCOME) splits the prompt, not the answer."""
    ids = [1, 504, 3458, 282, 4649, 314, 253, 2030, 30]
    out = oracle(llama).generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    server = ThreadServer(bodies, SchedulerLimits(max_frame_positions=4))
    runtime = SplitRuntime.load(llama, (2, 2))
    body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
    result = runtime.generate_ids(body, torch.tensor([ids]), None, SamplingParams(max_new_tokens=6, ignore_eos=True))
    body.close()
    assert body.max_frame_positions == 4
    assert result.token_ids == [out[0, len(ids):].tolist()]
    assert body.stats.frames_to_cloud == 3 + 5  # 9 prompt positions in chunks of 4, then 5 decode steps


# ---- sessions that misbehave ---------------------------------------------------------------------


def _reply(ws, seq: int) -> torch.Tensor:
    frame = parse_frame(ws.recv(timeout=30))
    assert frame.type == MsgType.HIDDEN and frame.seq == seq, (frame.type, frame.payload[:200])
    return frame.tensor()


def test_a_session_the_kv_pool_cannot_fit_waits_then_gets_capacity_and_the_others_run_exactly(bodies, llama):
    body = bodies[0]
    config = body.runner.config
    per_block = block_bytes(body.layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                            torch.float32)
    runtime = SplitRuntime.load(llama, (2, 2))
    reference = LocalBody(BodyScheduler(bodies), Codec.FP32)
    with ThreadServer(bodies, SchedulerLimits(kv_pool_bytes=7 * per_block, kv_wait=0.5)) as server:
        assert server.scheduler.pool.usable_blocks == 5
        hog, hog_id = raw_session(server, runtime)
        hog.send(hidden_frame(hog_id, 1, 1, 40).to_bytes())  # 3 of the 5 blocks
        torch.testing.assert_close(_reply(hog, 1), reference.forward(hidden_frame(hog_id, 1, 1, 40).tensor()))
        victim, victim_id = raw_session(server, runtime)
        start = time.monotonic()
        victim.send(hidden_frame(victim_id, 1, 1, 48).to_bytes())  # needs 3 blocks; 2 are free
        for seq in range(2, 7):  # the hog keeps decoding, exactly, while the victim waits
            frame = hidden_frame(hog_id, seq, 1, 1, seed=seq)
            hog.send(frame.to_bytes())
            torch.testing.assert_close(_reply(hog, seq), reference.forward(frame.tensor()))
        error = expect_error(victim)
        assert time.monotonic() - start >= 0.5
        assert error["code"] == "capacity" and error["retry_after"] > 0
        assert "KV pool has had no room" in error["message"]
        assert server.metric('lambdasplit_capacity_refusals_total{reason="kv"}') == 1
        hog.close()
        server.wait_metric("lambdasplit_sessions_active", 0)
        again, again_id = raw_session(server, runtime)  # the hog's blocks came back, zeroed
        again.send(hidden_frame(again_id, 1, 1, 48).to_bytes())
        reference.reset()
        torch.testing.assert_close(_reply(again, 1), reference.forward(hidden_frame(again_id, 1, 1, 48).tensor()))
        again.close()
    reference.scheduler.shutdown()


def test_a_huge_prompt_runs_in_chunks_while_other_sessions_keep_decoding(bodies, llama):
    runtime = SplitRuntime.load(llama, (2, 2))
    with ThreadServer(bodies, SchedulerLimits(step_tokens=8, max_context=4096)) as server:  # past the tiny model's 256
        steps = []
        server.scheduler.on_step = steps.append
        decoder, decoder_id = raw_session(server, runtime)
        decoder.send(hidden_frame(decoder_id, 1, 1, 4).to_bytes())
        _reply(decoder, 1)
        big, big_id = raw_session(server, runtime)
        big.send(hidden_frame(big_id, 1, 1, 2048).to_bytes())  # 256 steps of 8 positions
        for seq in range(2, 12):
            decoder.send(hidden_frame(decoder_id, seq, 1, 1, seed=seq).to_bytes())
            _reply(decoder, seq)
        assert _reply(big, 1).shape == (1, 2048, 64)
        mixed = [s for s in steps if s.sessions == 2]
        assert len(mixed) >= 5, "the decoder waited for the whole prompt"
        assert all(s.positions <= 8 + 1 for s in steps)
        decoder.close()
        big.close()


def test_a_client_that_never_reads_its_replies_does_not_hold_up_the_others(bodies, llama):
    runtime = SplitRuntime.load(llama, (2, 2))
    expected = oracle(llama).generate(IDS, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, IDS.shape[1]:].tolist()
    with ThreadServer(bodies, SchedulerLimits(max_context=4096)) as server:  # the flood runs past the tiny model's 256
        stalled, stalled_id = raw_session(server, runtime)

        def flood() -> None:  # 16 rows x 128 positions: 512 KiB replies, never read
            try:
                for seq in range(1, 25):
                    stalled.send(hidden_frame(stalled_id, seq, 16, 128).to_bytes())
            except Exception:  # noqa: BLE001 - the connection is closed under it at the end
                pass

        threading.Thread(target=flood, daemon=True).start()
        # Once the body has answered a frame of the flood, the server is sending to a client that
        # never reads (and soon blocked on it): the next device must not wait behind it.
        deadline = time.monotonic() + 60
        while server.scheduler.tokens_served < 16 * 128:
            assert time.monotonic() < deadline, "the stalled client's first frame was never answered"
            time.sleep(0.01)  # polling
        body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=8, ignore_eos=True))
        body.close()
        assert result.token_ids[0] == expected
        _vanish(stalled)
        server.wait_metric("lambdasplit_sessions_active", 0)


def test_a_prefill_with_more_rows_than_the_step_budget_still_runs(bodies, llama):
    """16 rows against --step-tokens 8: each step gives the prefill at least one position per row."""
    runtime = SplitRuntime.load(llama, (2, 2))
    with ThreadServer(bodies, SchedulerLimits(step_tokens=8)) as server:
        ws, session = raw_session(server, runtime)
        ws.send(hidden_frame(session, 1, 16, 5).to_bytes())
        assert _reply(ws, 1).shape == (16, 5, 64)
        ws.close()


def test_hidden_states_must_be_floating_point():
    from lambdasplit.errors import WireError
    from lambdasplit.wire.frame import tensor_frame

    frame = tensor_frame(MsgType.HIDDEN, torch.zeros(1, 1, 64, dtype=torch.uint8), Codec.NONE)
    with pytest.raises(WireError, match="floating point"):
        parse_frame(frame.to_bytes())


def test_a_pool_that_cannot_grow_hands_the_blocks_back(monkeypatch):
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, blocks=8, dtype=torch.float32, device="cpu", reserve=2)
    row = Sequence()

    def no_memory(blocks):
        raise MemoryError

    monkeypatch.setattr(pool, "_expand", no_memory)
    free = pool.free_blocks
    assert not pool.grow([row], 3 * BLOCK_SIZE)
    assert row.blocks == [] and pool.free_blocks == free


def test_frames_decoded_together_equal_each_alone_and_a_bad_frame_fails_alone():
    gen = torch.Generator().manual_seed(2)
    poisoned = torch.randn(1, 2, 8, generator=gen)
    poisoned[0, 1, 3] = float("nan")
    tensors = [torch.randn(1, 1, 8, generator=gen), torch.randn(2, 3, 8, generator=gen), poisoned,
               torch.randn(1, 4, 8, generator=gen)]
    frames = [tensor_frame(MsgType.HIDDEN, t, codec, bytes(16), i)
              for i, (t, codec) in enumerate(zip(tensors, [Codec.FP32, Codec.BF16, Codec.FP32, Codec.FP32], strict=True))]
    states = decode_hidden(frames, torch.device("cpu"), torch.float32)
    for i in (0, 1, 3):
        assert torch.equal(states[i], frames[i].tensor().float()), i
    assert isinstance(states[2], WireError) and "NaN" in str(states[2])


def test_int8_frames_decoded_together_equal_each_alone():
    """An INT8 payload is every row's scale, then every row's values: joined as they come, the
    second frame's scales were read as the first one's values (states off by up to 1e37)."""
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1, 2, 8, generator=gen), 100 * torch.randn(1, 3, 8, generator=gen),
               torch.randn(1, 2, 8, generator=gen)]  # two of one shape, one of another
    frames = [tensor_frame(MsgType.HIDDEN, t, Codec.INT8, bytes(16), i) for i, t in enumerate(tensors)]
    states = decode_hidden(frames, torch.device("cpu"), None)
    for i, frame in enumerate(frames):
        assert torch.equal(states[i], frame.tensor()), i


def test_the_finite_check_refuses_only_frames_with_nan_or_infinity_and_passes_sums_that_overflow():
    """A float32 sum per row is the cheap test; a row whose finite values overflow that sum is
    still accepted (checked value by value), and rows of opposite infinities, whose sum is NaN,
    are refused."""
    big = torch.full((1, 2, 8), 3e38).to(torch.bfloat16)  # every value finite, each row's sum is not
    opposite = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    opposite[0, 0, :2] = torch.tensor([float("inf"), -float("inf")])
    frames = [tensor_frame(MsgType.HIDDEN, t, Codec.BF16, bytes(16), i) for i, t in enumerate([big, opposite, big])]
    states = decode_hidden(frames, torch.device("cpu"), None)
    assert torch.equal(states[0], big) and torch.equal(states[2], big)
    assert str(states[1]) == "hidden states contain NaN or infinite values"


def test_frames_beyond_a_float16_bodys_range_are_refused_alone():
    """Finite float32 states past 65,504 became infinities in a float16 body (checked before the cast,
    they passed); now such a frame is refused with its own error, and the others are cast as before."""
    fine = torch.randn(1, 2, 8)
    huge = fine.clone()
    huge[0, 1, 3] = 1e5
    frames = [tensor_frame(MsgType.HIDDEN, t, Codec.FP32, bytes(16), i) for i, t in enumerate([fine, huge, fine])]
    states = decode_hidden(frames, torch.device("cpu"), torch.float16)
    assert str(states[1]) == "hidden states exceed torch.float16's range (the body runs in torch.float16)"
    assert torch.equal(states[0], fine.half()) and torch.equal(states[2], fine.half())
    assert torch.equal(decode_hidden([frames[1]], torch.device("cpu"), torch.bfloat16)[0], huge.bfloat16())


def test_a_frame_with_nan_in_a_step_of_many_is_refused_alone_and_the_others_run_as_without_it(bodies):
    """One bad frame among a step's frames (decoded and checked as one tensor) is refused with its
    own error; the step runs the others exactly as a step without it, and its session goes on."""
    width = bodies[0].runner.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randn(1, 3, width, generator=gen) for _ in range(8)]
    decodes = [torch.randn(1, 1, width, generator=gen) for _ in range(8)]
    poisoned = decodes[3].clone()
    poisoned[0, 0, 7] = float("nan")

    def run(bad: bool) -> tuple[list, list[int]]:
        scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=0.0))
        steps = []
        scheduler.on_step = steps.append
        ids = [scheduler.open_session().result(10) for _ in prompts]

        def step(tensors, seq):
            with scheduler._wake:  # every frame queues before the loop looks: one step
                return [scheduler.submit(s, tensor_frame(MsgType.HIDDEN, t, Codec.BF16, s, seq))
                        for s, t in zip(ids, tensors, strict=True) if t is not None]

        [_answer(f) for f in step(prompts, 1)]
        futures = step([poisoned if i == 3 and bad else None if i == 3 else t for i, t in enumerate(decodes)], 2)
        results = []
        for future in futures:
            try:
                results.append(_answer(future).tensor())
            except WireError as exc:
                results.append(str(exc))
        results.append(_answer(step([None] * 3 + [decodes[3]] + [None] * 4, 3)[0]).tensor())  # the session goes on
        scheduler.shutdown()
        return results, [s.sessions for s in steps]

    with_nan, steps = run(bad=True)
    without, reference_steps = run(bad=False)
    assert steps == reference_steps == [8, 7, 1]
    assert with_nan[3] == "hidden states contain NaN or infinite values"
    del with_nan[3]
    assert len(with_nan) == len(without) == 8
    for i, (got, want) in enumerate(zip(with_nan, without, strict=True)):
        assert torch.equal(got, want), i


def _answer(future):
    reply, _ = future.result(timeout=60)
    return reply


class _Clock:
    """The scheduler's clock, moved by the test: what it does with a round trip of a given length
    depends on no real timing."""

    def __init__(self) -> None:
        self.now, self.reads = 1000.0, 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.now

    perf_counter = monotonic


def test_a_round_trip_longer_than_the_step_wait_does_not_split_the_sessions(bodies, monkeypatch):
    """The engine process's half-batches (issue 22): when a step ends while another session's
    frame already waits, the next step holds it for the sessions that step answered even if their
    devices need longer than the step wait to answer (up to one forward): a window counted from
    the step's end started the waiting frame alone, and the two sessions alternated for good."""
    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    forward, round_trip, step_wait = 0.2, 0.1, 0.01  # clock seconds: step wait < round trip < forward
    body = bodies[0]
    running, release = threading.Event(), threading.Event()

    def timed_step(pool, step):
        running.set()
        assert release.wait(30)
        out = type(body).step(body, pool, step)
        clock.now += forward
        return out

    monkeypatch.setattr(body, "step", timed_step)
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=step_wait))
    holding, hold = threading.Event(), scheduler._hold_for_answered

    def watched_hold():
        holding.set()
        hold()

    monkeypatch.setattr(scheduler, "_hold_for_answered", watched_hold)
    steps = []
    scheduler.on_step = steps.append
    a, b = scheduler.open_session().result(10), scheduler.open_session().result(10)
    width = body.runner.config.hidden_size

    def frame(session, seq):
        return tensor_frame(MsgType.HIDDEN, torch.randn(1, 1, width), Codec.FP32, session, seq)

    first = scheduler.submit(a, frame(a, 1))
    assert running.wait(30)
    waiting = scheduler.submit(b, frame(b, 1))  # arrives while a's step runs
    running.clear()
    release.set()
    _answer(first)
    # The clock moves only once the loop holds for a: moved earlier, the round trip would pass
    # before the hold began and count as time between steps but not as held.
    assert holding.wait(30)
    clock.now += round_trip  # a's device answers past the step wait
    reads, deadline = clock.reads, time.monotonic() + 30
    # Four clock reads on: a step started on b alone has called the body by then.
    while not running.is_set() and clock.reads < reads + 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not running.is_set(), "the step started without the session the last step answered"
    both = [scheduler.submit(a, frame(a, 2)), waiting]
    [_answer(f) for f in both]
    assert [s.sessions for s in steps] == [1, 2]
    # The second step's cycle, in clock seconds: the round trip went between the steps, all of it
    # held by the step wait; the forward is `seconds`; planning and replying took no clock time.
    second = steps[1]
    assert (second.seconds, second.between_seconds, second.held_seconds) == pytest.approx((forward, round_trip, round_trip))
    assert (second.plan_seconds, second.reply_seconds) == (0.0, 0.0)
    assert steps[0].between_seconds == 0.0  # no step before the first
    scheduler.shutdown()


def test_a_step_waits_a_bounded_time_for_the_sessions_the_last_step_answered(bodies, monkeypatch):
    """With a step wait, a decode frame that arrives while the compute loop already holds another
    session's joins its step; a session that never comes back holds the others up for the step
    wait only (after the last step)."""
    width = bodies[0].runner.config.hidden_size
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=600.0))
    steps = []
    scheduler.on_step = steps.append
    a, b = scheduler.open_session().result(10), scheduler.open_session().result(10)

    def frame(session, seq, length):
        return tensor_frame(MsgType.HIDDEN, torch.randn(1, length, width), Codec.FP32, session, seq)

    with scheduler._wake:  # both first frames queue before the loop looks: one step, so neither waits on the other
        first = [scheduler.submit(s, frame(s, 1, 3)) for s in (a, b)]
    [_answer(f) for f in first]
    assert [s.sessions for s in steps] == [2]
    steps.clear()
    holding = threading.Event()  # set when the loop, holding a's frame, starts its wait for b's
    gather = scheduler._gather

    def signalling_gather() -> None:  # the loop calls it holding the lock, which its wait releases
        if scheduler._frames:
            holding.set()
        gather()

    monkeypatch.setattr(scheduler, "_gather", signalling_gather)
    late = scheduler.submit(a, frame(a, 2, 1))
    assert holding.wait(30)
    assert not late.done(), "the step did not wait for the second session"
    both = [late, scheduler.submit(b, frame(b, 2, 1))]
    [_answer(f) for f in both]
    assert [s.sessions for s in steps] == [2]
    scheduler.limits = SchedulerLimits(step_wait=0.2)
    steps.clear()
    alone = scheduler.submit(a, frame(a, 3, 1))  # b never sends again
    assert _answer(alone).shape == (1, 1, width)
    assert [s.sessions for s in steps] == [1]
    scheduler.shutdown()


def test_a_session_whose_reply_fails_is_not_waited_for_by_the_next_step(bodies):
    """A session closed while its step's replies are made (its reply failed) never sends again:
    the next step must not hold the others for it (it held them for the whole step wait)."""
    width = bodies[0].runner.config.hidden_size
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=600.0))
    steps = []
    scheduler.on_step = steps.append
    a, b = scheduler.open_session().result(10), scheduler.open_session().result(10)

    def frame(session, seq):
        return tensor_frame(MsgType.HIDDEN, torch.randn(1, 1, width), Codec.FP32, session, seq)

    def failing_finish(work, payload):
        raise RuntimeError("the reply could not be made")

    scheduler.sessions[a].finish = failing_finish
    with scheduler._wake:  # both frames queue before the loop looks: one step
        first = [scheduler.submit(s, frame(s, 1)) for s in (a, b)]
    with pytest.raises(ComputeError):
        first[0].result(timeout=60)
    _answer(first[1])
    assert [s.sessions for s in steps] == [2]
    assert a not in scheduler.sessions
    assert _answer(scheduler.submit(b, frame(b, 2))).shape == (1, 1, width)
    assert [s.sessions for s in steps] == [2, 1]
    scheduler.shutdown()
