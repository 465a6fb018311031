"""KVPool: every session's body KV cache in one preallocated store of fixed-size blocks.

The pool is sized once, from free memory, so admission control is a question of free blocks and
the server never allocates KV memory mid-step. Each row of each session is a `Sequence` that owns
whole blocks; a block is written only by its owner and zeroed when it is released, so no session
ever reads or writes another's KV. Block 0 is kept zero for the padding of batched gathers, and the
last block is scratch that the padding rows of a CUDA-graph step write to (graphs run on a GPU,
where the whole pool is allocated up front).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 16  # positions per block, as in vLLM: small enough that the last block wastes little


@dataclass
class Sequence:
    """One row of one session: the blocks it owns and how far it has got."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # slots written (padding included)
    valid: int = 0  # positions not masked out: the next position id


class KVPool:
    """Keys, values and a validity flag for up to `blocks x BLOCK_SIZE` slots, per layer.

    On a GPU every block is allocated up front (`reserve` = blocks). In host memory the tensors
    start at `reserve` blocks and double as blocks are handed out, so an idle CPU server holds
    little; the budget, and so admission control, is the same.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, blocks: int, dtype: torch.dtype,
        device: torch.device | str, reserve: int | None = None,
    ) -> None:
        if blocks < 3:
            raise ValueError("a KV pool needs at least three blocks (the zero block, the scratch block, one to use)")
        self.blocks = blocks
        self.layers = layers
        capacity = min(blocks, reserve or blocks) * BLOCK_SIZE
        # Every layer's keys, then its values, in one tensor: zeroing released blocks is one
        # index_fill_ call for all layers, not 2 x layers + 1 from Python (on a GPU, PyTorch still
        # cuts a fill that reaches past 2 GiB into kernels of 32-bit offsets, but in C++).
        self._store = torch.zeros(2 * layers, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=device)  # keys a query may attend to
        self._split_store()
        self.scratch_slot = (blocks - 1) * BLOCK_SIZE
        self._free = list(range(blocks - 2, 0, -1))  # pop() hands out low blocks first
        self.zeroed: list[torch.Tensor] | None = None  # slots zeroed since the last step, when a mirror asks

    @classmethod
    def sized(
        cls, layers: int, kv_heads: int, head_dim: int, budget_bytes: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVPool:
        per_block = block_bytes(layers, kv_heads, head_dim, dtype)
        reserve = None if torch.device(device).type == "cuda" else 64
        return cls(layers, kv_heads, head_dim, max(3, budget_bytes // per_block), dtype, device, reserve)

    @property
    def capacity(self) -> int:
        """Blocks allocated now."""
        return self.valid.shape[0] // BLOCK_SIZE

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        """Blocks sessions can hold (all but the zero and scratch blocks)."""
        return self.blocks - 2

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - len(self._free)

    @staticmethod
    def blocks_for(length: int) -> int:
        return -(-length // BLOCK_SIZE)

    def grow(self, rows: list[Sequence], length: int) -> bool:
        """Give every row blocks for `length` slots, all or none; False when the pool is short."""
        wanted = self.blocks_for(length)
        need = [max(0, wanted - len(row.blocks)) for row in rows]
        if not any(need):  # the rows have their blocks already (all but one decode step in BLOCK_SIZE)
            return True
        if sum(need) > len(self._free):
            return False
        new = []
        for row, n in zip(rows, need, strict=True):
            new += [self._free.pop() for _ in range(n)]
            row.blocks.extend(new[len(new) - n:])
        highest = max(new)
        if highest >= self.capacity:
            try:
                self._expand(min(self.blocks, max(highest + 1, 2 * self.capacity)))
            except (RuntimeError, MemoryError):  # host memory ran out: hand the blocks back, the frame waits
                for row, n in zip(rows, need, strict=True):
                    del row.blocks[len(row.blocks) - n:]
                self._free.extend(reversed(new))
                return False
        return True

    def _split_store(self) -> None:
        """`keys[layer]` and `values[layer]`: (slots, kv_heads, head_dim) views of the store."""
        self.keys = list(self._store[: self.layers].unbind(0))
        self.values = list(self._store[self.layers:].unbind(0))

    def _expand(self, blocks: int) -> None:
        extra = (blocks - self.capacity) * BLOCK_SIZE
        store = self._store
        self._store = torch.cat([store, store.new_zeros(store.shape[0], extra, *store.shape[2:])], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(extra)])
        self._split_store()

    def release(self, rows: list[Sequence]) -> None:
        """Zero and free the rows' blocks (zeroed: masked-out slots still enter the attention sums
        multiplied by zero, and a NaN left behind would turn the next owner's output into NaN)."""
        blocks = [b for row in rows for b in row.blocks]
        for row in rows:
            row.blocks, row.length, row.valid = [], 0, 0
        if not blocks:
            return
        # Built on the host and copied without waiting: `torch.tensor(..., device=cuda)` is a blocking
        # copy, which held the compute thread until the step in flight had finished on the GPU.
        index = torch.tensor(blocks, dtype=torch.long).to(self.valid.device, non_blocking=True)
        store = self._store
        store.view(store.shape[0], self.capacity, BLOCK_SIZE * store.shape[2] * store.shape[3]).index_fill_(1, index, 0)
        self.valid.view(self.capacity, -1).index_fill_(0, index, 0)
        if self.zeroed is not None:
            self.zeroed.append((index[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=index.device)).view(-1))
        self._free.extend(blocks)

    def truncate(self, rows: list[Sequence], length: int) -> None:
        """Keep the first `length` positions of each row (rows of one session, all as long): the
        dropped slots are zeroed, whole blocks past the end go back to the pool."""
        if not rows or length >= rows[0].length:
            return
        device = self.valid.device
        self.clear(self.slots(rows, length, rows[0].length).view(-1).to(device))
        kept = self.valid[self.slots(rows, 0, length).to(device)].sum(-1).tolist() if length else [0] * len(rows)
        keep = self.blocks_for(length)
        for row, valid in zip(rows, kept, strict=True):
            self._free.extend(row.blocks[keep:])
            row.blocks, row.length, row.valid = row.blocks[:keep], length, int(valid)

    def clear(self, slots: torch.Tensor) -> None:
        """Zero the keys, values and validity of `slots` (on the pool's device): positions cropped
        away, or written by a step that failed, so every slot past a row's length stays zero."""
        self._store.index_fill_(1, slots, 0)
        self.valid.index_fill_(0, slots, 0)
        if self.zeroed is not None:
            self.zeroed.append(slots)

    def slots(self, rows: list[Sequence], start: int, stop: int) -> torch.Tensor:
        """Slot indices of positions [start, stop) of each row: (rows, stop - start), on the host."""
        offsets = torch.arange(start, stop)
        table = torch.tensor([row.blocks[start // BLOCK_SIZE: self.blocks_for(stop)] for row in rows], dtype=torch.long)
        local = offsets - (start // BLOCK_SIZE) * BLOCK_SIZE
        return table[:, local // BLOCK_SIZE] * BLOCK_SIZE + local % BLOCK_SIZE

    def next_slots(self, rows: list[Sequence]) -> list[int]:
        """The slot each row writes its next position to (a decode step), as plain ints."""
        return [row.blocks[row.length // BLOCK_SIZE] * BLOCK_SIZE + row.length % BLOCK_SIZE for row in rows]

    def gather_index(self, rows: list[Sequence], length: int) -> torch.Tensor:
        """Slots of positions [0, length) of each row, padded with zero-block slots past its end."""
        width = self.blocks_for(length)
        table = torch.tensor([row.blocks[:width] + [0] * (width - len(row.blocks[:width])) for row in rows],
                             dtype=torch.long).view(len(rows), width)
        return (table.unsqueeze(-1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(len(rows), -1)[:, :length]


def block_bytes(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize * BLOCK_SIZE
