"""The paged decode kernel (issue 22 item 4), run by Triton's interpreter on the CPU: against a
float64 reference on random pools, and inside the batched body, where sessions decoding together
through it get the unsplit model's greedy tokens and the SDPA path's hidden states."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lambdasplit.engine import decode_kernel  # noqa: E402
from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, Sequence  # noqa: E402
from lambdasplit.engine.loading import load_scheduler  # noqa: E402
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits  # noqa: E402
from lambdasplit.engine.step import Chunk  # noqa: E402
from tests.conftest import oracle  # noqa: E402
from tests.splitcheck import generate_together  # noqa: E402


@pytest.fixture
def interpreted(monkeypatch):
    """CPU bodies use the kernel, run by Triton's interpreter (conftest.py turned it on)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): the GPU benchmarks check the kernel there")
    monkeypatch.setattr(decode_kernel, "CPU_INTERPRETER", True)


def reference(query, keys, values, valid, table, last, scale, window, frame=None):
    """Attention of each row's query over its keys 0..last, in float64; `frame` (base, bits): of
    keys base..base+63 a row sees key base+j only where bit j is set."""
    rows, heads, _ = query.shape
    group = heads // keys.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for r in range(rows):
        n = int(last[r]) + 1
        slots = (table[r].unsqueeze(-1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(-1)[:n]
        allowed = valid[slots].clone()
        if window is not None:
            allowed[: max(0, n - window)] = False
        if frame is not None:
            base, bits = int(frame[0][r]), int(frame[1][r])
            for key in range(max(base, 0), min(base + 64, n)):
                allowed[key] &= bool((bits >> (key - base)) & 1)
        allowed[-1] = True
        k = keys[slots].double().repeat_interleave(group, 1).transpose(0, 1)  # (heads, n, d)
        v = values[slots].double().repeat_interleave(group, 1).transpose(0, 1)
        scores = (k @ query[r].double().unsqueeze(-1)).squeeze(-1) * scale
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[r] = (weights.unsqueeze(1) @ v).squeeze(1)
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window"), [(4, 4, 64, None), (6, 2, 80, None), (9, 3, 64, 21)],
                         ids=["mha", "gqa-dim80", "gqa-window"])
def test_the_kernel_equals_attention_over_each_rows_own_keys(interpreted, heads, kv_heads, dim, window):
    """Rows of 1 to 150 keys in scattered blocks (several loop iterations of 64 keys), a tenth of
    the slots masked out, a padding row (table of zero blocks, query at key 0), a table wider than
    any row needs; every output element is written and matches float64."""
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    blocks, lengths = 48, [1, 17, 64, 65, 150, 3]
    keys = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=gen)
    values = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=gen)
    valid = torch.rand(blocks * BLOCK_SIZE, generator=gen) > 0.1
    keys[:BLOCK_SIZE], values[:BLOCK_SIZE], valid[:BLOCK_SIZE] = 0, 0, False  # block 0: the zero block
    table = torch.zeros(len(lengths) + 1, 16, dtype=torch.long)
    order = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()
    for r, n in enumerate(lengths):
        need = -(-n // BLOCK_SIZE)
        table[r, :need] = torch.tensor(order[:need])
        order = order[need:]
    last = torch.tensor([n - 1 for n in lengths] + [0])
    query = torch.randn(len(lengths) + 1, heads, dim, generator=gen)
    out = decode_kernel.decode_attention(query, keys, values, valid, table, last, dim ** -0.5, window)
    expected = reference(query, keys, values, valid, table, last, dim ** -0.5, window)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5), (out.double() - expected).abs().max()
    assert torch.equal(out[-1], torch.zeros(heads, dim)), "the padding row reads the zero block"


def test_draft_tree_rows_see_only_their_ancestors_within_the_frame(interpreted):
    """A 64-position frame starting mid-block past 40 keys: each position sees every earlier key
    of its row and, in the frame, only the keys its bit mask marks, bit 63 (the sign bit) included;
    a row outside any frame (NO_FRAME) and a frame that starts past a row's last key change
    nothing; a frame under a sliding window is refused."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, start, size = 4, 2, 32, 40, decode_kernel.FRAME_KEYS
    keys = torch.randn(16 * BLOCK_SIZE, kv_heads, dim, generator=gen)
    values = torch.randn(16 * BLOCK_SIZE, kv_heads, dim, generator=gen)
    valid = torch.rand(16 * BLOCK_SIZE, generator=gen) > 0.1
    blocks = (torch.randperm(15, generator=gen) + 1)[: -(-(start + size) // BLOCK_SIZE)]
    parents = [-1] + [int(torch.randint(0, node, (1,), generator=gen)) for node in range(1, size)]
    parents[size - 1] = size - 2  # the last node's path runs through bit 62 to bit 63
    from lambdasplit.engine.step import ancestor_bits
    from lambdasplit.split.parts import tree_ancestors

    bits = ancestor_bits(tree_ancestors(parents))
    assert bits[-1] < 0 and int(bits[-1]) & (1 << 62)
    rows = size + 2
    table = blocks.repeat(rows, 1)
    last = torch.tensor([start + node for node in range(size)] + [start + size - 1, 20])
    base = torch.tensor([start] * size + [decode_kernel.NO_FRAME, start])
    frame_bits = torch.cat([bits, torch.tensor([0, 0])])
    query = torch.randn(rows, heads, dim, generator=gen)
    out = decode_kernel.decode_attention(query, keys, values, valid, table, last, 0.3, frame=(base, frame_bits))
    expected = reference(query, keys, values, valid, table, last, 0.3, None, (base, frame_bits))
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5), (out.double() - expected).abs().max()
    plain = reference(query, keys, values, valid, table, last, 0.3, None)
    assert torch.allclose(out[size:].double(), plain[size:], atol=1e-5, rtol=1e-5)  # outside any frame: causal
    assert not torch.allclose(out[:size].double(), plain[:size], atol=1e-3)  # the mask matters
    with pytest.raises(ValueError, match="sliding window"):
        decode_kernel.decode_attention(query, keys, values, valid, table, last, 0.3, 16, frame=(base, frame_bits))


def test_every_tree_the_server_accepts_fits_one_ancestor_mask():
    """A TREE frame's positions are planned as 64-bit ancestor masks (`step.ancestor_bits` refuses
    more): the server's limit on a tree must stay within them."""
    from lambdasplit import defaults
    from lambdasplit.engine.step import ancestor_bits

    assert defaults.MAX_TREE_POSITIONS <= decode_kernel.FRAME_KEYS
    with pytest.raises(ValueError, match="exceeds the kernel's 64"):
        ancestor_bits(torch.eye(decode_kernel.FRAME_KEYS + 1, dtype=torch.bool))


def test_the_kernel_takes_a_strided_query_and_refuses_uneven_heads(interpreted):
    """The body hands it a transposed view of the packed queries; 3 query heads cannot share 2."""
    packed = torch.randn(4, 5, 32)  # (heads, rows, d) as the hook slices it
    keys, values = torch.randn(64, 2, 32), torch.randn(64, 2, 32)
    valid = torch.ones(64, dtype=torch.bool)
    table, last = torch.tensor([[1, 2]] * 5), torch.tensor([3, 20, 31, 0, 16])
    out = decode_kernel.decode_attention(packed.transpose(0, 1), keys, values, valid, table, last, 0.2)
    expected = reference(packed.transpose(0, 1), keys, values, valid, table, last, 0.2, None)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="3 query heads"):
        decode_kernel.decode_attention(torch.randn(5, 3, 32), keys, values, valid, table, last, 0.2)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_decode_rows_through_the_kernel_equal_gather_and_sdpa_in_the_body(interpreted, tiny_models, family):
    """The same steps on two pools, the body attending through the kernel on one and through gather
    + SDPA on the other: a session of two rows with padding slots (left and in the middle, and a
    padded decode position), another past several loop iterations, in pools that double from two
    blocks on the way (no stale pool tensor); chunks of 20 and 4 positions per row attend through
    the kernel too (70 do not); every step's hidden states agree."""
    body = load_scheduler(str(tiny_models[family]), (2, 2)).bodies[0]
    assert body.kernel
    config = body.runner.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    padded = torch.ones(2, 20, dtype=torch.long)
    padded[1, :5], padded[0, 9] = 0, 0
    steps = [[(torch.randn(2, 20, config.hidden_size, generator=gen), padded),
              (torch.randn(1, 70, config.hidden_size, generator=gen), torch.ones(1, 70, dtype=torch.long))]]
    for i in range(6):
        mask = torch.ones(2, 1, dtype=torch.long)
        mask[0, 0] = int(i != 2)  # a padded decode position attends to itself only
        steps.append([(torch.randn(2, 1, config.hidden_size, generator=gen), mask),
                      (torch.randn(1, 1, config.hidden_size, generator=gen), torch.ones(1, 1, dtype=torch.long))])
    verify = torch.ones(2, 4, dtype=torch.long)
    verify[1, 2] = 0  # a padded position inside a multi-position chunk
    steps.append([(torch.randn(2, 4, config.hidden_size, generator=gen), verify),  # a verification frame
                  (torch.randn(1, 1, config.hidden_size, generator=gen), torch.ones(1, 1, dtype=torch.long))])
    outputs = []
    for kernel in (True, False):
        body.kernel = kernel
        pool = KVPool(body.layers, config.num_key_value_heads, head_dim, 32, torch.float32, "cpu", reserve=2)
        sessions = [[Sequence(), Sequence()], [Sequence()]]
        outputs.append([])
        for pieces in steps:
            for rows, (hidden, _) in zip(sessions, pieces, strict=True):
                assert pool.grow(rows, rows[0].length + hidden.shape[1])
            outputs[-1] += body.run(pool, [Chunk(rows, hidden, mask) for rows, (hidden, mask) in zip(sessions, pieces, strict=True)])
        assert pool.capacity > 2, "the pool grew from two blocks"
    for got, want in zip(*outputs, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


PROMPTS = [[1, 504, 3458], [1, 253, 2030, 30, 282, 4649, 314, 253, 504, 3458, 282], [1, 2030]]
NEW_TOKENS = [10, 8, 12]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_sessions_decoding_through_the_kernel_get_unsplit_tokens(interpreted, tiny_models, family):
    """Three sessions batched in one body whose decode rows attend through the kernel (sliding
    windows and full layers where the family has them): every greedy token equals the unsplit
    model's generate(), the steps did batch sessions, and the kernel took decode rows and prefill
    chunks of several positions per row (step_tokens=4 cuts prompts into such chunks)."""
    path = tiny_models[family]
    bodies = load_scheduler(str(path), (2, 2)).bodies
    assert bodies[0].kernel, "the kernel should run under Triton's interpreter"
    calls = []
    original = decode_kernel.decode_attention
    with pytest.MonkeyPatch.context() as patch:
        # each call notes whether a row's block table repeats: positions of one chunk, one row each
        patch.setattr("lambdasplit.engine.step.decode_attention", lambda *a, **k: calls.append(
            len(a[4]) > len({tuple(t) for t in a[4].tolist()})) or original(*a, **k))
        scheduler = BodyScheduler(bodies, SchedulerLimits(step_tokens=4))
        steps = []
        scheduler.on_step = steps.append
        results = generate_together(scheduler, path, PROMPTS, NEW_TOKENS)
    model = oracle(path)
    for i, (ids, n) in enumerate(zip(PROMPTS, NEW_TOKENS, strict=True)):
        want = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):]
        assert results.get(i) == want.tolist(), f"session {i}"
    assert calls, "no decode row went through the kernel"
    assert max(s.sessions for s in steps) > 1, "no step batched more than one session"
    assert any(calls), "no chunk of several positions per row went through the kernel"


def test_a_kernel_that_fails_its_self_check_leaves_the_body_on_gather_and_sdpa(interpreted, llama, monkeypatch, caplog):
    """A kernel Triton cannot build for the card (or a wrong one) is caught when the body loads:
    one warning, and decode rows attend through gather + SDPA."""
    assert load_scheduler(str(llama), (2, 2)).bodies[0].kernel

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_120")

    monkeypatch.setattr(decode_kernel, "decode_attention", broken)
    body = load_scheduler(str(llama), (2, 2)).bodies[0]
    assert not body.kernel
    warned = [r.getMessage() for r in caplog.records if "paged decode kernel cannot be used" in r.getMessage()]
    assert len(warned) == 1 and "sm_120" in warned[0]


def test_the_self_check_catches_a_kernel_that_is_not_finite_or_wrong_past_its_first_keys(interpreted, monkeypatch):
    """A NaN output must not pass as a small error, nor a kernel right only over its first loop
    iteration of 64 keys, or one that ignores the pool's validity, the sliding window or a draft
    tree's frame mask; the real kernel passes."""
    real = decode_kernel.decode_attention
    for frames in (False, True):
        assert decode_kernel.self_check(torch.device("cpu"), torch.float32, 6, 2, 80, frames) is None
    broken = {
        "nan": lambda q, k, v, valid, table, last, scale, window=None, frame=None:
            real(q, k, v, valid, table, last, scale, window, frame) * float("nan"),
        "first keys only": lambda q, k, v, valid, table, last, scale, window=None, frame=None:
            real(q, k, v, valid, table, last.clamp(max=decode_kernel.KEYS_PER_ITERATION - 1), scale, window, frame),
        "no validity": lambda q, k, v, valid, table, last, scale, window=None, frame=None:
            real(q, k, v, torch.ones_like(valid), table, last, scale, window, frame),
        "no window": lambda q, k, v, valid, table, last, scale, window=None, frame=None:
            real(q, k, v, valid, table, last, scale, None, frame),
        "no frame": lambda q, k, v, valid, table, last, scale, window=None, frame=None:
            real(q, k, v, valid, table, last, scale, window),
    }
    for name, kernel in broken.items():
        monkeypatch.setattr(decode_kernel, "decode_attention", kernel)
        problem = decode_kernel.self_check(torch.device("cpu"), torch.float32, 6, 2, 80, frames=name == "no frame")
        assert problem is not None and "differs from plain attention" in problem, name


def test_a_kernel_whose_tree_masks_fail_their_check_keeps_decoding_and_verifies_no_trees(interpreted, llama, monkeypatch,
                                                                                       caplog):
    """Only the draft-tree variant is broken: the body keeps the kernel for every other chunk, says
    once why it refuses trees, and a TREE frame gets that reason (devices then draft chains)."""
    from lambdasplit.engine.session import TextBody

    real = decode_kernel.decode_attention

    def broken(*args, **kwargs):
        frame = args[8] if len(args) > 8 else kwargs.get("frame")
        return real(*args, **kwargs) * (float("nan") if frame is not None else 1.0)

    monkeypatch.setattr(decode_kernel, "decode_attention", broken)
    body = load_scheduler(str(llama), (2, 2)).bodies[0]
    assert isinstance(body, TextBody) and body.kernel and not body.verifies_trees
    assert "tree verification is off on this server's GPU" in body.tree_problem
    warned = [r.getMessage() for r in caplog.records if "draft-tree masks cannot be used" in r.getMessage()]
    assert len(warned) == 1 and "differs from plain attention" in warned[0]


def test_a_query_index_past_its_rows_table_reads_only_that_table(interpreted):
    """Planning never makes one, but a row whose `last` lies beyond its block table must not read
    the next row's table: it attends to the keys its own table holds, as SDPA over its gathered
    keys does, and the other rows are exact."""
    keys, values = torch.randn(64, 2, 32), torch.randn(64, 2, 32)
    valid = torch.ones(64, dtype=torch.bool)
    table, last = torch.tensor([[1], [2]]), torch.tensor([20, 5])  # row 0's one block holds keys 0..15
    query = torch.randn(2, 2, 32)
    out = decode_kernel.decode_attention(query, keys, values, valid, table, last, 0.2)
    own = reference(query[:1], keys, values, valid, table[:1], torch.tensor([BLOCK_SIZE - 1]), 0.2, None)
    assert torch.allclose(out[:1].double(), own, atol=1e-5)
    expected = reference(query[1:], keys, values, valid, table[1:], last[1:], 0.2, None)
    assert torch.allclose(out[1:].double(), expected, atol=1e-5)


def test_a_mixed_step_as_one_query_rows_equals_the_step_by_groups(interpreted, tiny_models):
    """What a CUDA graph replays with the kernel: every packed position of a step (decode rows, a
    4-position verification chunk with a padded slot, a 12-position prefill) as one row of one
    query with its own block table and query index. Through the body it gives the same hidden
    states as running the step group by group through gather + SDPA, the pools end equal, and
    a chunk longer than MAX_POSITIONS keeps the step out of the graphs."""
    from lambdasplit.engine.graphs import capturable
    from lambdasplit.engine.step import Group, forward_plan, plan_step, run_step

    body = load_scheduler(str(tiny_models["llama"]), (2, 2)).bodies[0]
    config = body.runner.config
    head_dim = config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    pools = [KVPool(body.layers, config.num_key_value_heads, head_dim, 16, torch.float32, "cpu") for _ in range(2)]
    sessions = [[[Sequence()], [Sequence(), Sequence()], [Sequence()]] for _ in pools]
    prompts = [(torch.randn(1, 19, config.hidden_size, generator=gen), torch.ones(1, 19, dtype=torch.long)),
               (torch.randn(2, 7, config.hidden_size, generator=gen), torch.ones(2, 7, dtype=torch.long))]
    for pool, (first, pair, _) in zip(pools, sessions, strict=True):
        for rows, (hidden, mask) in zip((first, pair), prompts, strict=True):
            assert pool.grow(rows, hidden.shape[1])
            run_step(body.runner.module, pool, plan := plan_step([Chunk(rows, hidden, mask)]))
            plan.commit()
    verify = torch.ones(2, 4, dtype=torch.long)
    verify[0, 2] = 0
    pieces = [(torch.randn(1, 1, config.hidden_size, generator=gen), torch.ones(1, 1, dtype=torch.long)),
              (torch.randn(2, 4, config.hidden_size, generator=gen), verify),
              (torch.randn(1, 12, config.hidden_size, generator=gen), torch.ones(1, 12, dtype=torch.long))]
    outputs = []
    for pool, rows_of, one_query_rows in zip(pools, sessions, (True, False), strict=True):
        for rows, (hidden, _) in zip(rows_of, pieces, strict=True):
            assert pool.grow(rows, rows[0].length + hidden.shape[1])
        step = plan_step([Chunk(rows, hidden, mask) for rows, (hidden, mask) in zip(rows_of, pieces, strict=True)])
        assert [g.length for g in step.groups] == [1, 4, 12]
        if one_query_rows:
            plan = step.device_plan(pool, kernel=True)
            table, last = step.kernel_rows()
            assert table.shape[0] == last.shape[0] == step.positions_count == 1 + 8 + 12
            plan.groups = [Group(0, step.positions_count, 1, table, last.view(-1, 1))]
            outputs.append(step.split(forward_plan(body.runner.module, plan)))
        else:
            outputs.append(run_step(body.runner.module, pool, step, kernel=False))
        step.commit()
    for got, want in zip(*outputs, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    for layer in range(body.layers):
        assert torch.allclose(pools[0].keys[layer], pools[1].keys[layer], atol=1e-5)
    assert capturable(step, kernel=True) and not capturable(step, kernel=False)
    rows, longest = sessions[0][0], decode_kernel.MAX_POSITIONS + 1
    assert pools[0].grow(rows, rows[0].length + longest)
    long_chunk = plan_step([Chunk(rows, torch.randn(1, longest, config.hidden_size), torch.ones(1, longest, dtype=torch.long))])
    assert not capturable(long_chunk, kernel=True)
