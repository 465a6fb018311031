"""Decode steps of many sessions batched into one body forward (issue 12), checked against the
sessions run alone and against the unsplit model's own generate()."""

from __future__ import annotations

import re
import threading
import urllib.request

import pytest
import torch

from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingConfig
from lambdasplit.engine.batch import decode_batched
from lambdasplit.engine.scheduler import SchedulerLimits, load_scheduler
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle
from tests.test_server_hardening import TOKEN, ThreadServer


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies


def _sessions(body, lengths, seed=0):
    """Sessions prefilled with seeded hidden states of the given lengths (and row counts)."""
    limits = SchedulerLimits().session()
    generator = torch.Generator().manual_seed(seed)
    sessions = []
    for rows, length in lengths:
        session = body.open(bytes(16), limits)
        session.runner(torch.randn(rows, length, 64, generator=generator))
        sessions.append(session)
    return sessions


def test_a_batched_decode_step_equals_each_session_alone(bodies):
    """Sessions of different lengths and row counts, batched, give each session's own result."""
    lengths = [(1, 3), (2, 11), (1, 7)]
    alone, batched = _sessions(bodies[0], lengths), _sessions(bodies[0], lengths)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        steps = [torch.randn(rows, 1, 64, generator=generator) for rows, _ in lengths]
        expected = [s.runner(h) for s, h in zip(alone, steps, strict=True)]
        got = decode_batched([s.runner for s in batched], steps)
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    for a, b in zip(alone, batched, strict=True):  # the caches grew the same way
        assert a.runner.seq_len == b.runner.seq_len
        for la, lb in zip(a.runner.cache.layers, b.runner.cache.layers, strict=True):
            torch.testing.assert_close(lb.keys, la.keys, atol=1e-5, rtol=1e-5)


def _histogram(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)}


def test_concurrent_sessions_batch_and_each_equals_unsplit_generate(llama, bodies):
    """Four devices with different prompts, lengths and start times, some finishing early, against
    one server: every session's greedy tokens equal the unsplit model's generate() for that prompt
    alone, and the server reports steps that batched several sessions."""
    prompts = [[1, 504, 3458], [1, 504, 3458, 282, 4649, 314, 253, 2030, 30], [1, 2030], [1, 282, 4649, 314, 253]]
    new_tokens = [12, 6, 16, 9]
    model = oracle(llama)
    expected = []
    for ids, n in zip(prompts, new_tokens, strict=True):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        expected.append(out[0, len(ids):].tolist())
    server = ThreadServer(bodies)
    devices = [SplitDevice.load(llama, (2, 2)) for _ in prompts]
    results: dict[int, list[int]] = {}
    started = [threading.Event() for _ in prompts]

    def run(i: int) -> None:
        if i:
            started[i - 1].wait(30)  # staggered starts
        body = RemoteBody(server.url, devices[i].manifest, Codec.FP32, token=TOKEN)
        stream = devices[i].stream_ids(body, torch.tensor([prompts[i]]), None,
                                       SamplingConfig(max_new_tokens=new_tokens[i], ignore_eos=True))
        tokens = [next(stream).token_ids[0]]
        started[i].set()
        tokens += [chunk.token_ids[0] for chunk in stream]
        body.close()
        results[i] = tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    for i, tokens in enumerate(expected):
        assert results.get(i) == tokens, f"session {i}"
    sessions = _histogram(text, "lambdasplit_step_sessions")
    assert sessions["+Inf"] > sessions["1.0"], "no step batched more than one session"


def test_a_prompt_longer_than_the_frame_bound_is_sent_in_chunks(llama, bodies):
    """The server's --max-frame-positions (announced in WELCOME) splits the prompt, not the answer."""
    ids = [1, 504, 3458, 282, 4649, 314, 253, 2030, 30]
    out = oracle(llama).generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    server = ThreadServer(bodies, SchedulerLimits(max_frame_positions=4))
    device = SplitDevice.load(llama, (2, 2))
    body = RemoteBody(server.url, device.manifest, Codec.FP32, token=TOKEN)
    result = device.generate_ids(body, torch.tensor([ids]), None, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    body.close()
    assert body.max_frame_positions == 4
    assert result.token_ids == [out[0, len(ids):].tolist()]
    assert body.stats.frames_to_cloud == 3 + 5  # 9 prompt positions in chunks of 4, then 5 decode steps
