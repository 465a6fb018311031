"""Draft-tree verification in the body (TREE frames, EAGLE-style speculative decoding): each tree
position equals its root-to-node path run as a plain chain, whether the tree runs alone, beside
other sessions' decode rows and prefill chunks, or with the paged kernel on; a crop to the accepted
prefix leaves the session a chain-only session's; bad trees are refused without harming the
session or the server, and bodies that cannot verify trees (sliding windows, tensor parallel) say so."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from lambdasplit import defaults
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.engine import decode_kernel
from lambdasplit.engine.core import EngineClient
from lambdasplit.engine.graphs import capturable
from lambdasplit.engine.kvpool import KVPool, Sequence
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.session import TextBody, Work
from lambdasplit.engine.step import Chunk, plan_chunk, plan_step
from lambdasplit.errors import LimitError, WireError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import control_frame
from tests.test_batching import _pool
from tests.test_server_hardening import ThreadServer, expect_error, hello, raw_connect

D = 64  # the tiny models' hidden size
PARENTS = [-1, 0, 0, 1, 1, 2, 4]  # two branches from the root, one of them branching again


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies




def _frames(body, frames: list[tuple[torch.Tensor, list[int] | None]], pool: KVPool | None = None,
            rows: list[Sequence] | None = None) -> list[torch.Tensor]:
    """Run (hidden, parents) frames one after another on one session; each frame's output."""
    pool = pool or _pool(body)
    rows = rows if rows is not None else [Sequence()]
    outs = []
    for hidden, parents in frames:
        assert pool.grow(rows, rows[0].length + hidden.shape[1])
        outs.append(body.run(pool, [Chunk(rows, hidden, None, parents)])[0])
    return outs


def _path(parents: list[int], node: int) -> list[int]:
    """The positions from the root to `node`."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _tree_frame(session: bytes, parents) -> Frame:
    return control_frame(MsgType.TREE, {"parents": parents}, session)


def _hidden(session: bytes, tensor: torch.Tensor, seq: int = 0) -> Frame:
    return tensor_frame(MsgType.HIDDEN, tensor, Codec.FP32, session, seq)


def _reply(future) -> torch.Tensor:
    reply, _ = future.result(timeout=60)
    return reply.tensor()


def test_a_tree_is_planned_at_depths_past_the_valid_positions_in_frame_order_slots():
    """Slots and query slots follow the frame (a CROP keeps a prefix), position ids are the row's
    valid count plus each position's depth (after padding), and the row advances by P."""
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, blocks=8, dtype=torch.float32, device="cpu")
    rows = [Sequence()]
    assert pool.grow(rows, 14 + len(PARENTS))
    rows[0].length, rows[0].valid = 14, 11  # three padding positions before it, and across a block boundary
    plan = plan_chunk(Chunk(rows, torch.zeros(1, len(PARENTS), 4), None, PARENTS))
    assert plan.positions == [11, 12, 12, 13, 13, 13, 14]
    assert plan.query == list(range(14, 21))
    assert plan.write == [rows[0].blocks[s // 16] * 16 + s % 16 for s in range(14, 21)]
    assert plan.after == [(21, 18)] and plan.valid == [True] * 7
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        expected[i, _path(PARENTS, i)] = True
    assert torch.equal(plan.tree, expected)
    step = plan_step([Chunk(rows, torch.zeros(1, 7, 4), None, PARENTS), Chunk([Sequence([3], 2, 2)], torch.zeros(1, 7, 4), None)])
    assert step.has_tree and len(step.groups) == 2, "a tree never shares its group with a plain chunk of the same T"
    assert plan.bits.tolist() == [sum(1 << j for j in _path(PARENTS, i)) for i in range(7)]
    assert capturable(step, kernel=True), "the kernel masks a tree's positions: a graph replays it"
    assert not capturable(step, kernel=False)
    assert step.kernel_frames()[0].tolist() == [decode_kernel.NO_FRAME] * 7 + [14] * 7  # trees pack last
    assert step.kernel_frames()[1].tolist() == [0] * 7 + plan.bits.tolist()
    plain = plan_step([Chunk([Sequence([3], 2, 2)], torch.zeros(1, 7, 4), None)])
    assert not plain.has_tree and capturable(plain, kernel=True)


def test_each_tree_position_equals_its_root_to_node_chain_and_a_chain_tree_equals_a_plain_frame(bodies):
    body = bodies[0]
    gen = torch.Generator().manual_seed(0)
    prefix, tree = torch.randn(1, 9, D, generator=gen), torch.randn(1, len(PARENTS), D, generator=gen)
    out = _frames(body, [(prefix, None), (tree, PARENTS)])[1]
    for node in range(len(PARENTS)):
        path = _path(PARENTS, node)
        want = _frames(body, [(prefix, None), (tree[:, path], None)])[1][:, -1]
        torch.testing.assert_close(out[:, node], want, atol=1e-5, rtol=1e-5, msg=f"position {node}, path {path}")
    chain = list(range(-1, len(PARENTS) - 1))
    assert torch.equal(_frames(body, [(prefix, None), (tree, chain)])[1], _frames(body, [(prefix, None), (tree, None)])[1])


def test_after_a_crop_to_the_accepted_prefix_the_session_is_the_chain_only_sessions(bodies):
    """The device keeps positions 0..2 (a chain in storage order) and drops the rest; the next plain
    frame sees exactly what a session that only ever ran that chain sees."""
    body = bodies[0]
    gen = torch.Generator().manual_seed(1)
    parents = [-1, 0, 1, 0, 3, 1]
    prefix, tree, after = (torch.randn(1, n, D, generator=gen) for n in (5, len(parents), 2))
    pool, rows = _pool(body), [Sequence()]
    _frames(body, [(prefix, None), (tree, parents)], pool, rows)
    pool.truncate(rows, 5 + 3)
    assert (rows[0].length, rows[0].valid) == (8, 8)
    got = _frames(body, [(after, None)], pool, rows)[0]
    want = _frames(body, [(prefix, None), (tree[:, :3], None), (after, None)])[2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("async_schedule", [False, True], ids=["sequential", "async"])
def test_a_tree_batched_with_decodes_a_same_length_frame_and_a_prefill_equals_each_alone(bodies, async_schedule):
    """One step of a tree, two decode rows, a plain frame of the tree's length and a prompt cut
    into chunks (step_tokens=8: the tree still runs whole): every session's outputs equal its
    run alone, through the scheduler and its frames."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randn(1, 5, D, generator=gen) for _ in range(4)]
    tree = torch.randn(1, len(PARENTS), D, generator=gen)
    decodes = [torch.randn(1, 1, D, generator=gen) for _ in range(2)]
    verify = torch.randn(1, len(PARENTS), D, generator=gen)
    long_prompt = torch.randn(1, 20, D, generator=gen)

    def run(which: list[int]) -> tuple[dict[int, list[torch.Tensor]], list]:
        scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=0.0, step_tokens=8, async_schedule=async_schedule))
        steps = []
        scheduler.on_step = steps.append
        ids = {i: scheduler.open_session().result(10) for i in which}
        outs: dict[int, list[torch.Tensor]] = {i: [] for i in which}
        with scheduler._wake:  # one step for every prompt
            futures = {i: scheduler.submit(ids[i], _hidden(ids[i], prompts[i], 1)) for i in which if i < 4}
        for i, future in futures.items():
            outs[i].append(_reply(future))
        second = {0: [_tree_frame(ids.get(0, b""), PARENTS), _hidden(ids.get(0, b""), tree, 2)],
                  1: [_hidden(ids.get(1, b""), decodes[0], 2)], 2: [_hidden(ids.get(2, b""), decodes[1], 2)],
                  3: [_hidden(ids.get(3, b""), verify, 2)], 4: [_hidden(ids.get(4, b""), long_prompt, 1)]}
        with scheduler._wake:
            futures = {i: [scheduler.submit(ids[i], f) for f in second[i]][-1] for i in which}
        for i, future in futures.items():
            outs[i].append(_reply(future))
        scheduler.shutdown()
        return outs, steps

    together, steps = run([0, 1, 2, 3, 4])
    assert max(s.sessions for s in steps) == 5, "the tree ran in one step with every other session"
    for i in range(5):
        alone, _ = run([i])
        for got, want in zip(together[i], alone[i], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"session {i}")
    chain = _frames(bodies[0], [(prompts[0], None), (tree[:, _path(PARENTS, 6)], None)])[1]
    torch.testing.assert_close(together[0][1][:, 6], chain[:, -1], atol=1e-5, rtol=1e-5)


def test_a_tree_work_runs_whole_and_hands_its_parents_to_its_chunk(bodies):
    body = bodies[0]
    session = body.open(b"\1" * 16, SchedulerLimits(max_context=256).session(), _pool(body))
    session.handle(_tree_frame(session.session_id, PARENTS))
    frame = _hidden(session.session_id, torch.zeros(1, len(PARENTS), D))
    session.check(frame)
    work = session.prepare(frame, torch.zeros(1, len(PARENTS), D))
    assert isinstance(work, Work) and work.parents == PARENTS
    assert work.chunk(work.length, 0).parents == PARENTS
    with pytest.raises(RuntimeError, match="runs whole"):
        work.chunk(3, 0)
    assert session.prepare(frame, torch.zeros(1, len(PARENTS), D)).parents is None, "a tree applies to one frame"


@pytest.fixture
def interpreted(monkeypatch):
    """CPU bodies use the paged kernel, run by Triton's interpreter (conftest.py turned it on)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine)")
    monkeypatch.setattr(decode_kernel, "CPU_INTERPRETER", True)


def test_with_the_paged_kernel_a_tree_attends_through_it_and_equals_the_kernel_off_run(interpreted, llama, monkeypatch):
    """A step of a tree and two decode rows: the kernel takes the decode rows and the tree's 7
    positions (under their ancestor masks), and every output equals the same step with the kernel
    off (gather + SDPA under the tree's mask)."""
    body = load_scheduler(str(llama), (2, 2)).bodies[0]
    assert body.kernel
    rows_seen = []
    original = decode_kernel.decode_attention
    monkeypatch.setattr("lambdasplit.engine.step.decode_attention",
                        lambda *a, **k: rows_seen.append(a[0].shape[0]) or original(*a, **k))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, n, D, generator=gen) for n in (6, 3, 4)]
    tree = torch.randn(1, len(PARENTS), D, generator=gen)
    decodes = [torch.randn(1, 1, D, generator=gen) for _ in range(2)]
    outputs = []
    for kernel in (True, False):
        body.kernel = kernel
        pool = _pool(body)
        sessions = [[Sequence()] for _ in prompts]
        for rows, prompt in zip(sessions, prompts, strict=True):
            _frames(body, [(prompt, None)], pool, rows)
        rows_seen.clear()
        for rows, hidden in zip(sessions, [tree, *decodes], strict=True):
            assert pool.grow(rows, rows[0].length + hidden.shape[1])
        outputs.append(body.run(pool, [Chunk(sessions[0], tree, None, PARENTS),
                                       *(Chunk(rows, h, None) for rows, h in zip(sessions[1:], decodes, strict=True))]))
        if kernel:
            assert rows_seen and set(rows_seen) == {2, len(PARENTS)}, rows_seen  # the decode rows, the tree's positions
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_tree_step_staged_as_a_graphs_one_query_rows_equals_the_step_by_groups(interpreted, llama):
    """What a CUDA graph replays: the step's integer inputs staged into a 32-row bucket's buffer
    (`graphs.stage`) and read through the captured plan's views (`graphs.static_plan`). A step of
    a tree, a decode row and a 3-position chunk goes to a graph of tree steps (its rows read their
    frames: padding rows and the plain rows outside any), a step without a tree to a graph whose
    rows read none: both equal the same steps by groups through gather + SDPA, and the pools end
    equal."""
    from lambdasplit.engine.graphs import _views, stage, static_plan
    from lambdasplit.engine.step import forward_plan, run_step

    body = load_scheduler(str(llama), (2, 2)).bodies[0]
    module, bucket = body.runner.module, 32
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randn(1, n, D, generator=gen) for n in (20, 3, 9)]
    steps = [[(torch.randn(1, len(PARENTS), D, generator=gen), PARENTS), (torch.randn(1, 1, D, generator=gen), None),
              (torch.randn(1, 3, D, generator=gen), None)],
             [(torch.randn(1, 1, D, generator=gen), None) for _ in range(3)]]
    pools = [_pool(body), _pool(body)]
    sessions = [[[Sequence()] for _ in prompts] for _ in pools]
    for pool, rows_of in zip(pools, sessions, strict=True):
        for rows, prompt in zip(rows_of, prompts, strict=True):
            _frames(body, [(prompt, None)], pool, rows)
    width = max(len(rows[0].blocks) for rows in sessions[0]) + 2
    outputs = [[], []]
    for pieces in steps:
        tree = any(parents for _, parents in pieces)
        staging = torch.full((bucket * (6 + width),), -7, dtype=torch.long)  # stale values: stage must set each input
        for pool, rows_of, out in zip(pools, sessions, outputs, strict=True):
            for rows, (hidden, _) in zip(rows_of, pieces, strict=True):
                assert pool.grow(rows, rows[0].length + hidden.shape[1])
            step = plan_step([Chunk(rows, hidden, None, parents) for rows, (hidden, parents) in zip(rows_of, pieces, strict=True)])
            assert step.has_tree == tree
            n = step.positions_count
            if out is outputs[0]:
                stage(step, staging, bucket, pool.scratch_slot)
                hidden = torch.zeros(1, bucket, D)
                hidden[0, :n] = step.hidden[0]
                plan = static_plan(pool, hidden, staging, bucket, kernel=True, tree=tree)
                assert (plan.groups[0].frame is not None) == tree
                pool.valid[plan.write[:n]] = plan.valid[:n]
                out.append(step.split(forward_plan(module, plan)[:, :n]))
            else:
                out.append(run_step(module, pool, step, kernel=False))
            step.commit()
        if tree:
            base, bits = _views(staging, bucket)[4:6]
            plain, frame = 1 + 3, slice(4, 4 + len(PARENTS))  # the decode row and the chunk pack first, the tree last
            assert (base[:plain] == decode_kernel.NO_FRAME).all() and (base[frame.stop:] == decode_kernel.NO_FRAME).all()
            assert (base[frame] == 20).all() and not bits[:plain].any() and not bits[frame.stop:].any() and bits[frame].all()
    for got_step, want_step in zip(*outputs, strict=True):
        for got, want in zip(got_step, want_step, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for layer in range(body.layers):
        torch.testing.assert_close(pools[0].keys[layer], pools[1].keys[layer], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def scheduler(bodies):
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_wait=0.0, max_frame_positions=256))
    yield scheduler
    scheduler.shutdown()


BAD_TREES = {
    "not a list": ({"parents": 3}, WireError, "non-empty JSON list"),
    "a string": ({"parents": "-1,0"}, WireError, "non-empty JSON list"),
    "missing": ({}, WireError, "non-empty JSON list"),
    "empty": ({"parents": []}, WireError, "non-empty JSON list"),
    "root not -1": ({"parents": [0, 0]}, WireError, "parent 0 must be -1"),
    "a later parent": ({"parents": [-1, 1]}, WireError, "parent 1 must be an integer from 0 to 0"),
    "a forward parent": ({"parents": [-1, 0, 3, 1]}, WireError, "parent 2 must be an integer from 0 to 1"),
    "a second root": ({"parents": [-1, -1]}, WireError, "parent 1"),
    "a bool": ({"parents": [-1, True]}, WireError, "got True"),
    "a float": ({"parents": [-1, 0.0]}, WireError, "got 0.0"),
    "nested": ({"parents": [-1, [0]]}, WireError, "parent 1"),
    "too many": ({"parents": [-1] + list(range(defaults.MAX_TREE_POSITIONS))}, LimitError, "exceeds the server's 64"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_a_bad_tree_is_refused_and_the_session_goes_on(scheduler, case):
    payload, error, message = BAD_TREES[case]
    session = scheduler.open_session().result(10)
    gen = torch.Generator().manual_seed(4)
    prompt, step = torch.randn(1, 4, D, generator=gen), torch.randn(1, 2, D, generator=gen)
    _reply(scheduler.submit(session, _hidden(session, prompt, 1)))
    with pytest.raises(error, match=message):
        scheduler.submit(session, control_frame(MsgType.TREE, payload, session)).result(10)
    got = _reply(scheduler.submit(session, _hidden(session, step, 2)))  # a plain frame, as if the TREE never came
    want = _frames(scheduler.bodies[0], [(prompt, None), (step, None)])[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scheduler.close_session(session).result(10)


@pytest.mark.parametrize(("shape", "message"), [((1, 2), r"needs hidden states \(1, 3, D\), got \(1, 2\)"),
                                                 ((2, 3), r"got \(2, 3\)")])
def test_a_tree_whose_frame_has_another_shape_is_refused_and_reset_drops_it(scheduler, shape, message):
    session = scheduler.open_session().result(10)
    scheduler.submit(session, _tree_frame(session, [-1, 0, 0])).result(10)
    with pytest.raises(WireError, match=message):
        scheduler.submit(session, _hidden(session, torch.randn(*shape, D), 1)).result(10)
    scheduler.submit(session, Frame(MsgType.RESET, session)).result(10)
    hidden = torch.randn(1, 3, D)
    got = _reply(scheduler.submit(session, _hidden(session, hidden, 2)))
    torch.testing.assert_close(got, _frames(scheduler.bodies[0], [(hidden, None)])[0], atol=1e-5, rtol=1e-5)
    scheduler.close_session(session).result(10)


@pytest.mark.parametrize("order", ["mask first", "tree first"])
def test_a_tree_and_a_mask_for_the_same_frame_are_refused(scheduler, order):
    session = scheduler.open_session().result(10)
    mask = tensor_frame(MsgType.MASK, torch.ones(1, 3, dtype=torch.uint8), Codec.NONE, session)
    frames = [mask, _tree_frame(session, [-1, 0, 0])]
    if order == "tree first":
        frames.reverse()
    scheduler.submit(session, frames[0]).result(10)
    with pytest.raises(WireError, match="cannot follow a (MASK|TREE) frame"):
        scheduler.submit(session, frames[1]).result(10)
    assert _reply(scheduler.submit(session, _hidden(session, torch.randn(1, 3, D), 1))).shape == (1, 3, D)
    scheduler.close_session(session).result(10)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_a_body_with_sliding_window_layers_refuses_trees_and_the_session_goes_on(tiny_models, family):
    body = LocalBody(load_scheduler(str(tiny_models[family]), (2, 2)))
    try:
        assert body.max_tree_positions is None and not body.scheduler.bodies[0].verifies_trees
        session = body._session_id()
        with pytest.raises(WireError, match="tree verification needs full-attention layers"):
            body.scheduler.submit(session, _tree_frame(session, [-1, 0])).result(10)
        assert _reply(body.scheduler.submit(session, _hidden(session, torch.randn(1, 2, D), 1))).shape == (1, 2, D)
    finally:
        body.scheduler.shutdown()


def test_a_tensor_parallel_body_refuses_trees(bodies):
    """Its other ranks replay rank 0's groups without a tree mask: the TREE frame is refused first."""
    body = TextBody(bodies[0].runner, bodies[0].manifest, mirror=object())  # the mirror is never reached
    session = body.open(b"\2" * 16, SchedulerLimits(max_context=256).session(), None)
    assert not body.verifies_trees
    with pytest.raises(WireError, match="tensor-parallel"):
        session.handle(_tree_frame(session.session_id, [-1, 0]))
    assert session._pending_tree is None


def test_an_empty_body_accepts_a_tree_and_passes_its_states_through(bodies):
    """A body of no layers (a split never makes one; a body is built so directly) passes states through."""
    runner = SimpleNamespace(layers=0, config=bodies[0].runner.config, module=torch.nn.Linear(1, 1))
    body = LocalBody(BodyScheduler([TextBody(runner, bodies[0].manifest)]))
    try:
        assert body.max_tree_positions == min(defaults.MAX_TREE_POSITIONS, body.max_frame_positions)
        session = body._session_id()
        body.scheduler.submit(session, _tree_frame(session, PARENTS)).result(10)
        hidden = torch.randn(1, len(PARENTS), D)
        assert torch.equal(_reply(body.scheduler.submit(session, _hidden(session, hidden, 1))), hidden)
    finally:
        body.scheduler.shutdown()


def test_the_welcome_says_max_tree_positions_and_a_bad_tree_ends_only_its_connection(bodies, llama):
    """Over a real server: WELCOME advertises min(MAX_TREE_POSITIONS, --max-frame-positions); a bad
    TREE gets an ERROR and closes its connection only; a good tree is answered on a new one."""
    runtime = SplitRuntime.load(llama, (2, 2))
    with ThreadServer(bodies, SchedulerLimits(max_frame_positions=32)) as server:
        assert LocalBody(server.scheduler).max_tree_positions == 32

        def session() -> tuple:
            ws = raw_connect(server)
            ws.send(hello(runtime))
            welcome = parse_frame(ws.recv(timeout=10))
            assert welcome.type == MsgType.WELCOME
            assert json.loads(welcome.payload)["limits"]["max_tree_positions"] == 32
            return ws, welcome.session

        ws, sid = session()
        ws.send(_tree_frame(sid, [-1, 2]).to_bytes())
        assert "parent 1" in expect_error(ws)["message"]
        ws.close()
        ws, sid = session()
        ws.send(_tree_frame(sid, PARENTS).to_bytes())
        ws.send(_hidden(sid, torch.randn(1, len(PARENTS), D), 1).to_bytes())
        reply = parse_frame(ws.recv(timeout=30))
        assert reply.type == MsgType.HIDDEN and reply.shape == (1, len(PARENTS), D)
        ws.close()


def test_an_engine_process_tells_the_server_which_bodies_verify_trees(tiny_models):
    """With --engine-process the server's WELCOME reads `verifies_trees` from the engine's READY;
    a TREE frame crosses the pipe like any control frame."""
    engine = EngineClient.start(load_scheduler, str(tiny_models["llama"]), (2, 2), max_frame_bytes=1 << 20)
    try:
        assert engine.bodies[0].verifies_trees
        session = engine.open_session(0).result(timeout=60)
        assert engine.submit(session, _tree_frame(session, PARENTS)).result(timeout=60)[0] is None
        reply, _ = engine.submit(session, _hidden(session, torch.randn(1, len(PARENTS), D), 1)).result(timeout=60)
        assert reply.shape == (1, len(PARENTS), D)
    finally:
        engine.shutdown()
    engine = EngineClient.start(load_scheduler, str(tiny_models["gemma3_text"]), (2, 2), max_frame_bytes=1 << 20)
    try:
        assert not engine.bodies[0].verifies_trees
    finally:
        engine.shutdown()


def test_a_tree_frame_that_carries_a_tensor_is_refused_at_the_door(scheduler):
    session = scheduler.open_session().result(10)
    with pytest.raises(WireError, match="a TREE frame carries no tensor"):
        scheduler.submit(session, tensor_frame(MsgType.TREE, torch.zeros(3), Codec.FP32, session)).result(10)
    scheduler.close_session(session).result(10)
