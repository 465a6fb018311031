"""The step object (issue 22 items 2 and 3): a batched step is planned once, committed only after it
ran, rolled back when it fails; and the next step planned while one runs (async scheduling) gives
exactly what planning after it gives."""

from __future__ import annotations

import logging

import pytest
import torch

from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, Sequence
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.step import Chunk, plan_chunk, plan_step
from tests.conftest import oracle
from tests.splitcheck import generate_together

PROMPTS = [[1, 504, 3458], [1, 504, 3458, 282, 4649, 314, 253, 2030, 30], [1, 2030], [1, 282, 4649, 314, 253],
           [1, 253, 2030, 30, 282, 4649, 314, 253, 504, 3458, 282]]
NEW_TOKENS = [12, 6, 16, 9, 10]


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies


@pytest.fixture(scope="module")
def expected(llama) -> list[list[int]]:
    """Each prompt's greedy tokens from the unsplit model's own generate(), alone."""
    model = oracle(llama)
    return [model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
            for ids, n in zip(PROMPTS, NEW_TOKENS, strict=True)]


class FailOnce:
    """A module's forward whose call number `at` raises (after the layers before it wrote their KV)."""

    def __init__(self, forward, at: int) -> None:
        self.forward, self.at, self.calls = forward, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected fault in the body's last MLP")
        return self.forward(*args, **kwargs)


@pytest.mark.parametrize("length", [1, 5])
def test_a_chunk_without_a_mask_is_planned_as_one_whose_mask_is_all_ones(length):
    """A frame with no MASK frame before it carries no mask tensor: its plan (slots, position ids,
    validity, block tables, where the rows end) must be that of an all-ones mask, from any start."""
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, blocks=16, dtype=torch.float32, device="cpu")
    rows = [Sequence(), Sequence()]
    assert pool.grow(rows, 2 * BLOCK_SIZE + length)
    rows[0].length, rows[0].valid = BLOCK_SIZE - 1, BLOCK_SIZE - 3  # across a block boundary, after padding
    rows[1].length, rows[1].valid = 2 * BLOCK_SIZE, 2 * BLOCK_SIZE
    hidden = torch.zeros(2, length, 4)
    plain, ones = plan_chunk(Chunk(rows, hidden, None)), plan_chunk(Chunk(rows, hidden, torch.ones(2, length, dtype=torch.long)))
    fields = ("bases", "write", "positions", "query", "valid", "tables", "after")
    assert [getattr(plain, f) for f in fields] == [getattr(ones, f) for f in fields]


def test_a_failed_step_leaves_the_pool_and_the_rows_as_they_were(bodies, monkeypatch):
    """The fault comes after the first layer wrote its keys: rolling back clears them, the rows do
    not advance, and running the same step again gives what a step that never failed gives."""
    body = bodies[0]
    config = body.runner.config
    pool = KVPool(body.layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                  64, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(0)
    rows = [[Sequence()], [Sequence(), Sequence()]]
    for seqs, length in zip(rows, (5, 3), strict=True):
        assert pool.grow(seqs, length + 1)
        body.run(pool, [Chunk(seqs, torch.randn(len(seqs), length, 64, generator=generator),
                              torch.ones(len(seqs), length, dtype=torch.long))])
    before = [t.clone() for t in (*pool.keys, *pool.values, pool.valid)]
    chunks = [Chunk(seqs, torch.randn(len(seqs), 1, 64, generator=generator), torch.ones(len(seqs), 1, dtype=torch.long))
              for seqs in rows]
    step = plan_step(chunks)
    mlp = body.runner.module.layers[-1].mlp
    monkeypatch.setattr(mlp, "forward", FailOnce(mlp.forward, at=1))
    with pytest.raises(RuntimeError, match="injected fault"):
        body.step(pool, step)
    assert not torch.equal(pool.keys[0], before[0])  # the first layer had written its keys
    step.rollback(pool)
    for now, then in zip((*pool.keys, *pool.values, pool.valid), before, strict=True):
        assert torch.equal(now, then)
    assert [(r.length, r.valid) for seqs in rows for r in seqs] == [(5, 5), (3, 3), (3, 3)]
    again = body.step(pool, plan_step(chunks))  # planned afresh from the untouched rows
    reference_pool = KVPool(body.layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                            64, torch.float32, "cpu")
    for tensor, saved in zip((*reference_pool.keys, *reference_pool.values, reference_pool.valid), before, strict=True):
        tensor.copy_(saved)
    copies = [[Sequence(list(r.blocks), r.length, r.valid) for r in seqs] for seqs in rows]
    want = body.run(reference_pool, [Chunk(c, chunk.hidden, chunk.mask) for c, chunk in zip(copies, chunks, strict=True)])
    for got, ref in zip(again, want, strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("async_schedule", [False, True], ids=["sequential", "async"])
def test_sessions_survive_a_failed_step_and_their_tokens_equal_unsplit_generate(bodies, llama, expected, async_schedule,
                                                                                 monkeypatch, caplog):
    """Five concurrent sessions (prefill chunks of 4 positions mixed with decodes); one step fails
    once mid-forward. Nothing of it was committed and it runs again: no session is closed or
    replayed, and every session's greedy tokens equal the unsplit model's. With async scheduling
    (forced on here, on the CPU) some chunks of every run were planned while the step before ran."""
    caplog.set_level(logging.WARNING)
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_tokens=4, async_schedule=async_schedule))
    assert scheduler.async_schedule is async_schedule
    steps = []
    scheduler.on_step = steps.append
    mlp = bodies[0].runner.module.layers[-1].mlp
    fault = FailOnce(mlp.forward, at=6)
    monkeypatch.setattr(mlp, "forward", fault)
    results = generate_together(scheduler, llama, PROMPTS, NEW_TOKENS, timeout=120)
    assert fault.calls > fault.at
    for i, tokens in enumerate(expected):
        assert results.get(i) == tokens, f"session {i}"
    retried = [r for r in caplog.records if "nothing was committed, running it again" in r.getMessage()]
    assert len(retried) == 1 and "injected fault" in retried[0].getMessage()
    assert max(s.sessions for s in steps) > 1, "no step batched more than one session"
    assert any(s.positions > s.rows for s in steps), "no prefill chunk ran"
    # every position ran once in a reported step (the failed one is not reported: it ran again)
    assert sum(s.positions for s in steps) == sum(len(p) + n - 1 for p, n in zip(PROMPTS, NEW_TOKENS, strict=True))
    ahead = sum(s.planned_ahead for s in steps)
    assert ahead > 0 if async_schedule else ahead == 0
