"""One body forward over pieces of many sessions at once: decode steps and prefill chunks together.

Every piece (`Chunk`: some rows of one session, T new positions each) is flattened into one packed
sequence of N positions, so the projections and MLPs run once over all of them. Attention is
transformers' `AttentionInterface` hook, registered as "lambdasplit_paged": each layer writes its
new keys and values into the sessions' own blocks of the `KVPool`, then pieces of equal T are
gathered into one padded batch and attend with SDPA under a mask built once per step, or, on a
GPU, pieces of up to `decode_kernel.MAX_POSITIONS` positions per row (decode rows, verification
frames, short prefill chunks) attend through `engine.decode_kernel`, which reads the pool in place. Each
row attends only to its own keys, at its own position ids, so the result equals running each
session alone. A draft tree (a TREE frame: EAGLE-style verification of several branches at once)
is a batch of its own, whose positions see within their frame only their ancestors, each at its
depth past the row's sequence: through the kernel, each position's ancestors are a 64-bit mask
over the frame's keys (`Group.frame`); through gather + SDPA, a (T, T) block of the mask.

The scheduler plans a step as one `Step` (host tensors: slot mapping, position ids, block tables,
from each chunk's `ChunkPlan`), which the eager forward, the CUDA-graph replay and the
tensor-parallel broadcast consume alike. Running it never moves a row; `Step.commit()` does,
once it ran, and `Step.rollback()` undoes the writes of a step that failed.

transformers' own `paged|sdpa` (its continuous batching) instead attends the packed sequence to
every sequence's keys through one N x total-KV mask; with 64 decode rows that is 64x the attention
work of per-row batches (and 714 tok/s against eager batch-64 generate()'s 1,948 on an H100).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from lambdasplit.engine.decode_kernel import FRAME_KEYS, MAX_POSITIONS, NO_FRAME, decode_attention
from lambdasplit.engine.kvpool import BLOCK_SIZE, KVPool, Sequence
from lambdasplit.split.parts import tree_ancestors

ATTENTION = "lambdasplit_paged"
STEP_KWARG = "lambdasplit_step"
# Not cuDNN: it builds an execution plan for every new key length, 2.2 ms of host time per layer
# call on an H200 (torch profiler, 64 decode rows), where the whole step's GPU work took 10.5 ms.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Chunk:
    """T new positions of some rows of one session."""

    rows: list[Sequence]
    hidden: torch.Tensor  # (B, T, D) on the body's device
    mask: torch.Tensor | None  # (B, T) of 0/1 on the host: 0 marks a padding position; None: no padding
    parents: list[int] | None = None  # a draft tree (B = 1, no mask): each position's parent, -1 for the root


@dataclass
class Group:
    """The pieces of one step that share T: one padded SDPA call per layer, or, for T up to
    `decode_kernel.MAX_POSITIONS` with the paged kernel, one kernel call that reads the pool in
    place with every position as a row of its own (`kernel_rows`). A draft tree is a group of its
    own (one row): its queries see its own frame's keys only where `tree` says, which the kernel
    reads as each position's `frame`."""

    start: int  # first packed position
    rows: int
    length: int  # T
    table: torch.Tensor  # (rows, W) each row's blocks, zero-block padded (the block table)
    query_slot: torch.Tensor  # (rows, T) index of each query among its row's keys
    tree: torch.Tensor | None = None  # (T, T) bool: position i may see position j of its frame (j an ancestor of i, or i)
    tree_start: int = 0  # with `tree`: the frame's first slot (its row's length before it)
    frame: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel's (base, bits) per position: see `decode_attention`
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    _gather: torch.Tensor | None = None
    _kernel_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def gather(self) -> torch.Tensor:
        """(rows, W x BLOCK_SIZE) pool slots of each row's keys, worked out once per step."""
        if self._gather is None:
            offsets = torch.arange(BLOCK_SIZE, device=self.table.device)
            self._gather = (self.table.unsqueeze(-1) * BLOCK_SIZE + offsets).view(self.rows, -1)
        return self._gather

    def mask(self, pool: KVPool, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            keys = torch.arange(self.gather.shape[1], device=self.gather.device)
            query = self.query_slot.unsqueeze(-1)
            allowed = (keys <= query) & pool.valid[self.gather].unsqueeze(1)
            if window is not None:
                allowed &= keys > query - window
            allowed |= keys == query  # a padding query attends to itself, so no row is all -inf
            if self.tree is not None:  # the frame's own keys: only ancestors and itself, never a sibling
                if window is not None:  # the window counts storage slots, which are not a branch's positions
                    raise RuntimeError("a draft tree cannot attend within a sliding window")
                allowed[:, :, self.tree_start: self.tree_start + self.length] = self.tree
            self.masks[window] = allowed.unsqueeze(1)
        return self.masks[window]

    @property
    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The group as rows x T rows of one query each, in packed order: each position's block
        table (its row's, repeated) and its index among its row's keys. The pool already holds
        the group's own new keys when attention runs, so position t of a row attends to the
        row's keys up to t: causal, as the padded SDPA batch under its mask."""
        if self._kernel_rows is None:
            table = self.table if self.length == 1 else self.table.repeat_interleave(self.length, 0)
            self._kernel_rows = table, self.query_slot.reshape(-1)
        return self._kernel_rows

    def reset(self) -> None:
        """Forget what was worked out from the tables (a graph capture recomputes it inside)."""
        self.masks.clear()
        self._gather = None
        self._kernel_rows = None


@dataclass
class StepPlan:
    """A step's tensors on the body's device: what the forward and the attention hook read at
    every layer (where to write, what to read, the masks) and what tensor parallel broadcasts."""

    pool: KVPool
    hidden: torch.Tensor  # (1, N, D) packed hidden states
    position_ids: torch.Tensor  # (1, N)
    write: torch.Tensor  # (N,) slot of each packed position
    valid: torch.Tensor  # (N,) bool: the written slot may be attended to (0 marks padding)
    groups: list[Group]
    kernel: bool = False  # groups of up to MAX_POSITIONS per row attend through `engine.decode_kernel`, not gather + SDPA


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (1, Hq, N, d), key/value (1, Hkv, N, d) -> (1, N, Hq, d), as transformers' hooks return."""
    plan: StepPlan | None = kwargs.get(STEP_KWARG)
    if plan is None:
        raise RuntimeError(f"{ATTENTION} attention runs only inside a lambdasplit body step")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the batched body")
    layer = module.layer_idx
    keys, values = plan.pool.keys[layer], plan.pool.values[layer]
    keys.index_copy_(0, plan.write, key[0].transpose(0, 1))
    values.index_copy_(0, plan.write, value[0].transpose(0, 1))
    heads, dim = query.shape[1], query.shape[-1]
    outputs = []
    for group in plan.groups:
        stop = group.start + group.rows * group.length
        if plan.kernel and group.length <= MAX_POSITIONS:
            q = query[0, :, group.start: stop].transpose(0, 1)
            scale = scaling if scaling is not None else dim ** -0.5
            table, last = group.kernel_rows
            outputs.append(decode_attention(q, keys, values, plan.pool.valid, table, last, scale, sliding_window, group.frame))
            continue
        q = query[0, :, group.start: stop].view(heads, group.rows, group.length, dim).transpose(0, 1)
        k = keys[group.gather].transpose(1, 2)
        v = values[group.gather].transpose(1, 2)
        with sdpa_kernel(_BACKENDS):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=group.mask(plan.pool, sliding_window), scale=scaling, enable_gqa=True
            )
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    return torch.cat(outputs).unsqueeze(0), None


AttentionInterface.register(ATTENTION, paged_attention)


@dataclass
class ChunkPlan:
    """Where one chunk's positions go, from its rows' (length, valid) before it (`bases`): host
    arithmetic only, so it can be worked out while the previous step is still on the device."""

    chunk: Chunk
    bases: list[tuple[int, int]]  # each row's (length, valid) the plan starts from
    write: list[int]  # slot of each position, row by row (the slot mapping)
    positions: list[int]  # position ids
    query: list[int]  # each position's index among its row's keys
    valid: list[bool]
    tables: list[list[int]]  # each row's blocks up to its end after the chunk (the block table)
    after: list[tuple[int, int]]  # each row's (length, valid) once the step is committed
    length: int  # T, the chunk's positions per row (read many times per step: a tensor's shape is slow to read)
    tree: torch.Tensor | None = None  # a draft tree's (T, T) ancestor-or-self matrix (its attention mask within the frame)
    bits: torch.Tensor | None = None  # with `tree`: (T,) int64, its rows as bit masks (bit j: column j), for the kernel

    def current(self) -> bool:
        """The rows are still where the plan assumed (a step that failed, or a plan made for a step
        that did not commit, leaves them elsewhere)."""
        return self.bases == [(row.length, row.valid) for row in self.chunk.rows]


def plan_chunk(chunk: Chunk, bases: list[tuple[int, int]] | None = None) -> ChunkPlan:
    """The plan of `chunk` from `bases` (default: where its rows are now); the rows must already
    own the blocks for every position."""
    rows, length = chunk.rows, chunk.hidden.shape[1]
    bases = bases if bases is not None else [(row.length, row.valid) for row in rows]
    if chunk.parents is not None:
        return _plan_tree(chunk, bases)
    masks = chunk.mask.tolist() if chunk.mask is not None else [[1] * length] * len(rows)
    write, positions, query, valid, tables, after = [], [], [], [], [], []
    for row, (start, seen), flags in zip(rows, bases, masks, strict=True):
        blocks = row.blocks
        for offset, flag in enumerate(flags):
            slot = start + offset
            seen += flag
            write.append(blocks[slot // BLOCK_SIZE] * BLOCK_SIZE + slot % BLOCK_SIZE)
            positions.append((seen - 1) * flag)
            query.append(slot)
            valid.append(bool(flag))
        tables.append(blocks[: -(-(start + length) // BLOCK_SIZE)])
        after.append((start + length, seen))
    return ChunkPlan(chunk, bases, write, positions, query, valid, tables, after, length)


def _plan_tree(chunk: Chunk, bases: list[tuple[int, int]]) -> ChunkPlan:
    """A draft tree's plan (one row, no padding): its slots and query slots in frame order, as a
    plain chunk's (so a CROP keeps an accepted prefix), but position i at depth(i) past the row's
    valid positions, and the ancestor-or-self matrix that masks its attention within the frame."""
    (row,), ((start, seen),) = chunk.rows, bases
    tree = tree_ancestors(chunk.parents)  # the device's head and tail mask their tree with the same matrix
    length = len(chunk.parents)
    depth = (tree.sum(-1) - 1).tolist()  # a node's ancestors are its depth
    blocks, slots = row.blocks, range(start, start + length)
    write = [blocks[slot // BLOCK_SIZE] * BLOCK_SIZE + slot % BLOCK_SIZE for slot in slots]
    return ChunkPlan(chunk, bases, write, [seen + d for d in depth], list(slots), [True] * length,
                     [blocks[: -(-(start + length) // BLOCK_SIZE)]], [(start + length, seen + length)], length,
                     tree, ancestor_bits(tree))


def ancestor_bits(tree: torch.Tensor) -> torch.Tensor:
    """(T,) int64 of a (T, T) ancestor-or-self matrix: bit j of entry i is column j of row i (bit
    63 is the sign bit: integer sums wrap, so the pattern is exact)."""
    length = tree.shape[1]
    if length > FRAME_KEYS:
        raise ValueError(f"a draft tree of {length} positions exceeds the kernel's {FRAME_KEYS}")
    powers = torch.ones(length, dtype=torch.long) << torch.arange(length)
    return torch.where(tree, powers, 0).sum(-1)


@dataclass
class Step:
    """One batched step as the scheduler planned it (vLLM's `SchedulerOutput`): which rows, the
    packed hidden states, position ids, slot mapping and block tables, on the host. The eager
    forward, the CUDA-graph replay and the tensor-parallel broadcast all consume it; the rows
    advance only when `commit` is called after the step succeeded."""

    plans: list[ChunkPlan]  # in the scheduler's order
    starts: list[int]  # first packed position of each plan
    hidden: torch.Tensor  # (1, N, D) on the body's device
    write: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    valid: torch.Tensor  # (N,) bool
    groups: list[Group]  # host tensors, one group per T (and one per draft tree)
    members: list[list[int]]  # the plans of each group, in packed order (indices into `plans`)
    has_tree: bool = False  # a draft tree's group attends under its own mask (`Group.frame` in the kernel)

    @property
    def rows(self) -> int:
        return sum(len(plan.chunk.rows) for plan in self.plans)

    @property
    def positions_count(self) -> int:
        """N, the packed positions."""
        return self.hidden.shape[1]

    @property
    def decode_only(self) -> bool:
        return all(plan.length == 1 for plan in self.plans)

    @property
    def longest_chunk(self) -> int:
        """The largest T of the step."""
        return max(plan.length for plan in self.plans)

    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every packed position as a row of one query (host tensors): block tables (N, W), zero
        padded, and query indices (N,). A CUDA graph of N one-query rows replays any step whose
        chunks all attend through the paged kernel, prefill chunks as well as decode rows."""
        rows = [group.kernel_rows for group in self.groups]
        if len(rows) == 1:
            return rows[0]
        table = torch.zeros(self.positions_count, max(t.shape[1] for t, _ in rows), dtype=torch.long)
        for group, (t, _) in zip(self.groups, rows, strict=True):
            table[group.start: group.start + t.shape[0], : t.shape[1]] = t
        return table, torch.cat([last for _, last in rows])

    def kernel_frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every packed position's draft-tree frame (base, bits) (host tensors, (N,) each): a
        tree's positions as its group says, every other position outside any frame."""
        base = torch.full((self.positions_count,), NO_FRAME, dtype=torch.long)
        bits = torch.zeros(self.positions_count, dtype=torch.long)
        for group in self.groups:
            if group.frame is not None:
                base[group.start: group.start + group.length], bits[group.start: group.start + group.length] = group.frame
        return base, bits

    def device_plan(self, pool: KVPool, kernel: bool = False) -> StepPlan:
        """The step's tensors on the pool's device, its written slots' validity set in the pool;
        `kernel`: groups of up to `MAX_POSITIONS` per row attend through the paged kernel."""
        device = pool.valid.device
        write, valid = self.write.to(device, non_blocking=True), self.valid.to(device, non_blocking=True)
        pool.valid[write] = valid
        groups = [Group(g.start, g.rows, g.length, g.table.to(device, non_blocking=True),
                        g.query_slot.to(device, non_blocking=True),
                        None if g.tree is None else g.tree.to(device, non_blocking=True), g.tree_start,
                        None if g.frame is None else tuple(t.to(device, non_blocking=True) for t in g.frame))
                  for g in self.groups]
        positions = self.positions.to(device, non_blocking=True).unsqueeze(0)
        return StepPlan(pool, self.hidden, positions, write, valid, groups, kernel)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """The packed output (1, N, D) as each plan's (B, T, D), in the scheduler's order: views
        that lie back to back in packed order, one `split` per group (a view per plan cost a
        64-session step 240 us on the CPU)."""
        pieces: list[torch.Tensor] = [out] * len(self.plans)
        for group, members in zip(self.groups, self.members, strict=True):
            block = out[0, group.start: group.start + group.rows * group.length].view(group.rows, group.length, -1)
            sizes = [len(self.plans[i].chunk.rows) for i in members]
            for i, piece in zip(members, block.split(sizes), strict=True):
                pieces[i] = piece
        return pieces

    def commit(self) -> None:
        """The step succeeded: its rows advance."""
        for plan in self.plans:
            for row, (length, valid) in zip(plan.chunk.rows, plan.after, strict=True):
                row.length, row.valid = length, valid

    def rollback(self, pool: KVPool) -> None:
        """The step failed: clear the slots it may have written, so the pool is as it was."""
        pool.clear(self.write.to(pool.valid.device))


def assemble(plans: list[ChunkPlan]) -> Step:
    """The step of these chunk plans: packed by T (one padded attention batch per T); a draft
    tree is a batch of its own (its mask is its frame's)."""
    by_length: dict[int, list[int]] = {}
    trees: list[int] = []
    for i, plan in enumerate(plans):
        if plan.tree is None:
            by_length.setdefault(plan.length, []).append(i)
        else:
            trees.append(i)
    batches = [(length, by_length[length], None) for length in sorted(by_length)]
    if trees:
        batches += [(plans[i].length, [i], plans[i]) for i in trees]
    starts = [0] * len(plans)
    hidden, write, positions, valid, groups, members, packed = [], [], [], [], [], [], 0
    for length, chosen, tree in batches:
        tables = [table for i in chosen for table in plans[i].tables]
        width = max(len(table) for table in tables)
        table = _host([t + [0] * (width - len(t)) for t in tables], np.int64)
        query = _host([q for i in chosen for q in plans[i].query], np.int64).view(len(tables), length)
        groups.append(Group(packed, len(tables), length, table, query) if tree is None
                      else Group(packed, 1, length, table, query, tree.tree, tree.query[0],
                                 (torch.full((length,), tree.query[0], dtype=torch.long), tree.bits)))
        members.append(chosen)
        for i in chosen:
            plan = plans[i]
            write += plan.write
            positions += plan.positions
            valid += plan.valid
            starts[i] = packed
            packed += len(plan.chunk.rows) * length
        # One cat of the group's (B, T, D) states, not a reshape per plan.
        hidden.append(torch.cat([plans[i].chunk.hidden for i in chosen]) if len(chosen) > 1 else plans[chosen[0]].chunk.hidden)
    with torch.inference_mode():  # as every later layer input is: a compiled norm then needs one graph, not two
        states = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden]).unsqueeze(0)
    return Step(plans, starts, states, _host(write, np.int64), _host(positions, np.int64), _host(valid, np.bool_),
                groups, members, bool(trees))


def _host(values: list, dtype: type) -> torch.Tensor:
    """A host tensor of Python numbers, through numpy: a third of `torch.tensor`'s time on a list
    (five per step, 70 us of a 64-session decode step's planning on the CPU)."""
    return torch.from_numpy(np.array(values, dtype=dtype))


def plan_step(chunks: list[Chunk]) -> Step:
    """The step of `chunks` from where their rows are now."""
    return assemble([plan_chunk(chunk) for chunk in chunks])


@torch.inference_mode()
def forward_plan(module: nn.Module, plan: StepPlan) -> torch.Tensor:
    """The body's forward over a planned step's packed positions: (1, N, D)."""
    return module(inputs_embeds=plan.hidden, position_ids=plan.position_ids, use_cache=False,
                  **{STEP_KWARG: plan}).last_hidden_state


@torch.inference_mode()
def run_step(module: nn.Module, pool: KVPool, step: Step,
             publish: Callable[[StepPlan], None] | None = None, kernel: bool = False) -> list[torch.Tensor]:
    """One eager forward of `module` (a body whose attention is `ATTENTION`) over `step`; (B, T, D)
    per chunk. The rows do not advance (`step.commit()` does). `publish` sees the step's device
    tensors first (tensor parallel: rank 0 sends them to the others); `kernel`: decode groups
    attend through the paged kernel."""
    plan = step.device_plan(pool, kernel)
    if publish is not None:
        publish(plan)
    return step.split(forward_plan(module, plan))


def run_chunks(module: nn.Module, pool: KVPool, chunks: list[Chunk],
               publish: Callable[[StepPlan], None] | None = None, kernel: bool = False) -> list[torch.Tensor]:
    """Plan, run eagerly and commit one step over `chunks` (benchmarks drive a body module so)."""
    step = plan_step(chunks)
    out = run_step(module, pool, step, publish, kernel)
    step.commit()
    return out
