"""One body across the GPUs of a host: tensor parallel through torch.distributed (NCCL).

Every rank holds a shard of each body layer, cut by the model's own transformers `tp_plan`
(Llama: q/k/v and gate/up column-wise, o and down row-wise, so each layer costs one all-reduce
after attention and one after the MLP), applied with torch's `parallelize_module`. Rank 0 is the
server: it owns the sessions, the scheduler and the KV pool's block bookkeeping. Before each
batched step it broadcasts the scheduler's step object as it stands on the device (packed hidden
states, position ids, the pool slots to write and read and their validity, the slots zeroed since
the last step) and every rank runs the same
forward on its heads. Each rank's pool holds its own KV heads at the same slots, so the other
ranks need no bookkeeping and never see a frame, a token or a session id.

Only tensors cross between ranks (no pickled objects), in a fixed order both sides know.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import PretrainedConfig

from lambdasplit.engine.kvpool import KVPool
from lambdasplit.engine.step import ATTENTION, Group, StepPlan, forward_plan
from lambdasplit.errors import LambdaSplitError

log = logging.getLogger(__name__)

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
_STOP, _STEP = 0, 1


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (torchrun's environment)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls, device_type: str) -> TensorParallel | None:
        """The group torchrun started this process in, on its local GPU over NCCL (`device_type`
        "cuda") or on the CPU over gloo ("cpu": the same code, as the tests run it); None when it
        runs alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), world, device)

    @classmethod
    def join(cls, ranks: int, device_type: str, command: list[str]) -> TensorParallel:
        """This process's place in a group of `ranks` on `device_type`. Outside torchrun, this process
        is replaced by torchrun starting `ranks` copies of `command` (Python's arguments:
        `-m lambdasplit.cli serve ...`), so every check of the command's options must come first."""
        if "WORLD_SIZE" not in os.environ:
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            os.execv(sys.executable, [sys.executable, *torchrun, *command])
        tp = cls.from_env(device_type)
        if tp is None or tp.world != ranks:
            raise LambdaSplitError(f"--tensor-parallel {ranks} inside a torchrun group of {os.environ['WORLD_SIZE']}")
        return tp

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, module: nn.Module, config: PretrainedConfig) -> None:
        """Cut `module`'s layers by the model's tp_plan; each rank keeps 1/world of every head and
        MLP column."""
        plan = getattr(config, "base_model_tp_plan", None) or {}
        styles = {}
        for pattern, style in plan.items():
            if not pattern.startswith("layers."):  # embeddings / norm / LM head: not in a body
                continue
            if style not in _STYLES:
                raise LambdaSplitError(f"tensor parallel: {config.model_type}'s plan uses {style!r} for {pattern}; "
                                       "only colwise/rowwise layers are supported")
            styles[pattern] = _STYLES[style]()
        if not styles:
            raise LambdaSplitError(f"tensor parallel: transformers has no tp_plan for {config.model_type}")
        for name, count in (("num_attention_heads", config.num_attention_heads), ("num_key_value_heads", kv_heads(config)),
                            ("intermediate_size", config.intermediate_size)):
            if count % self.world:
                raise LambdaSplitError(f"tensor parallel over {self.world} GPUs needs {name} ({count}) divisible by {self.world}")
        mesh = init_device_mesh(self.device.type, (self.world,))
        parallelize_module(module, mesh, styles)

    def local_kv_heads(self, config: PretrainedConfig) -> int:
        return kv_heads(config) // self.world


def kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class StepMirror:
    """Rank 0's side: sends each step to the other ranks just before running it itself."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def share_pool(self, pool: KVPool) -> None:
        """Tell the other ranks how many blocks to allocate, and start recording zeroed slots."""
        dist.broadcast(torch.tensor([pool.blocks], dtype=torch.long, device=self.tp.device), src=0)
        pool.zeroed = []

    def publish(self, plan: StepPlan) -> None:
        """Send a step's device tensors (as `Step.device_plan` made them) to the other ranks."""
        device = self.tp.device
        zeroed = torch.cat(plan.pool.zeroed).to(device) if plan.pool.zeroed else torch.zeros(0, dtype=torch.long, device=device)
        plan.pool.zeroed = []
        header = [_STEP, plan.hidden.shape[1], plan.hidden.shape[2], len(plan.groups), zeroed.numel()]
        _send(torch.tensor(header, dtype=torch.long, device=device))
        shapes = [[g.start, g.rows, g.length, g.table.shape[1]] for g in plan.groups]
        _send(torch.tensor(shapes, dtype=torch.long, device=device).view(-1, 4))
        # The validity of the written slots: with it every rank builds any layer's masks (full or
        # sliding window) from its own copy of `pool.valid`, exactly as rank 0 does.
        for tensor in (plan.hidden, plan.position_ids, plan.write, plan.valid, zeroed):
            _send(tensor)
        for group in plan.groups:
            _send(group.table)
            _send(group.query_slot)

    def stop(self) -> None:
        _send(torch.tensor([_STOP, 0, 0, 0, 0], dtype=torch.long, device=self.tp.device))


def follow(tp: TensorParallel, module: nn.Module, config: PretrainedConfig, dtype: torch.dtype) -> None:
    """A non-leader rank: allocate the same pool (own heads), then run every step rank 0 sends
    until it says stop."""
    blocks = torch.zeros(1, dtype=torch.long, device=tp.device)
    dist.broadcast(blocks, src=0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pool = KVPool(config.num_hidden_layers, tp.local_kv_heads(config), head_dim, int(blocks.item()), dtype, tp.device)
    module.config._attn_implementation = ATTENTION  # as TextBody sets it on rank 0
    log.info("tensor-parallel rank %d of %d following rank 0 (%d KV blocks)", tp.rank, tp.world, pool.blocks)
    while True:
        header = _receive((5,), torch.long, tp.device).tolist()
        if header[0] == _STOP:
            return
        _, positions, width, groups, zeroed = header
        shapes = _receive((groups, 4), torch.long, tp.device).tolist()
        hidden = _receive((1, positions, width), dtype, tp.device)
        position_ids = _receive((1, positions), torch.long, tp.device)
        write = _receive((positions,), torch.long, tp.device)
        valid = _receive((positions,), torch.bool, tp.device)
        stale = _receive((zeroed,), torch.long, tp.device)
        plan_groups = []
        for start, rows, length, blocks in shapes:
            table = _receive((rows, blocks), torch.long, tp.device)
            query_slot = _receive((rows, length), torch.long, tp.device)
            plan_groups.append(Group(start, rows, length, table, query_slot))
        if zeroed:  # released and truncated slots, as rank 0 zeroed them
            pool.clear(stale)
        pool.valid[write] = valid
        forward_plan(module, StepPlan(pool, hidden, position_ids, write, valid, plan_groups))


def _send(tensor: torch.Tensor) -> None:
    dist.broadcast(tensor.contiguous(), src=0)


def _receive(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=0)
    return tensor
