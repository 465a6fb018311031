"""Building a body scheduler: the model's body loaded (one per K of a range, sharing weights) or cut
over a tensor-parallel group, then handed to `BodyScheduler`.

Kept apart from `engine/scheduler.py`, which schedules only: loading needs `split.load` and the
tensor-parallel bootstrap, the scheduler needs neither (tests build it from bodies they made).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lambdasplit.engine.optimize import BodyOptions, optimize
from lambdasplit.engine.parallel import StepMirror, TensorParallel
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.session import TextBody
from lambdasplit.errors import LambdaSplitError

if TYPE_CHECKING:
    from lambdasplit.split.load import OpenedSource
    from lambdasplit.split.parts import PartRunner


def load_scheduler(
    source: str | None,
    split: tuple[int, int] | None,
    dtype: str | None = None,
    device: str = "cpu",
    limits: SchedulerLimits = SchedulerLimits(),
    allow_shallow: bool = False,
    k_max: int | None = None,
    cuda_graphs: bool = True,
    tensor_parallel: TensorParallel | None = None,
    options: BodyOptions = BodyOptions(),
) -> BodyScheduler:
    """The body of `source` (a model or an exported cloud part), ready to serve sessions.

    With `k_max`, the server also hosts the bodies for every K up to k_max (the device picks its
    K per session); they share the widest body's weight tensors, so memory does not grow.
    With `tensor_parallel` (rank 0 of a torchrun group), the body's layers are cut over the
    group's GPUs and every step is mirrored to the other ranks (`engine.parallel.follow`).
    `options` compiles the body or stores its weights in fp8 (`engine.optimize`).
    """
    from lambdasplit.split.load import body_runner, body_variants, open_source, resolve_dtype

    check_body_options(options, k_max, tensor_parallel.world if tensor_parallel else 1)
    check_gpus(device)
    opened = open_source(source, split, allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    if tensor_parallel is not None:
        return _tensor_parallel_scheduler(opened, torch_dtype, tensor_parallel, limits)
    runner = body_runner(opened, torch_dtype, device)
    variants = body_variants(opened, runner, k_max, torch_dtype, device) if k_max else []
    for part in [runner, *(r for r, _ in variants)]:
        if part.layers:
            optimize(part.module, options, torch_dtype)
    kernel = options.paged_kernel
    bodies = [TextBody(runner, opened.manifest("cloud", torch_dtype), cuda_graphs, paged_kernel=kernel)]
    bodies += [TextBody(r, m, cuda_graphs, paged_kernel=kernel) for r, m in variants]
    return BodyScheduler(bodies, limits)


def check_body_options(options: BodyOptions, k_max: int | None, ranks: int = 1) -> None:
    """The combinations a body cannot be served with, refused before anything loads (the CLI calls
    this before it relaunches itself under torchrun)."""
    if ranks > 1 and (options.compile or options.quantize):
        raise LambdaSplitError("--compile and --quantize apply to a body served without --tensor-parallel; "
                               "drop them or --tensor-parallel")
    if ranks > 1 and k_max:
        raise LambdaSplitError("--tensor-parallel cannot be combined with a K range (--split KMIN-KMAX,M) yet")
    if options.quantize and k_max:
        raise LambdaSplitError(f"--quantize {options.quantize} cannot be combined with a K range (--split KMIN-KMAX,M) yet")


def check_gpus(device: str, ranks: int = 1) -> None:
    """The GPUs `device` and `ranks` (--tensor-parallel) ask for are on this host: one a rank."""
    if ranks > 1 and device not in ("cpu", "cuda"):
        raise LambdaSplitError(f"--tensor-parallel runs its ranks on --device cuda (a GPU each) or cpu, not {device}")
    if torch.device(device).type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise LambdaSplitError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    if count < ranks:
        raise LambdaSplitError(f"--tensor-parallel {ranks} --device cuda needs {ranks} CUDA GPUs on this host; "
                               f"it has {count}")


def _tensor_parallel_scheduler(
    opened: OpenedSource, dtype: torch.dtype, tp: TensorParallel, limits: SchedulerLimits
) -> BodyScheduler:
    if not opened.spec.layers - opened.spec.k - opened.spec.m:
        raise LambdaSplitError("--tensor-parallel needs a body with layers; this split leaves the cloud none")
    runner = tensor_parallel_body(opened, dtype, tp)
    body = TextBody(runner, opened.manifest("cloud", dtype), cuda_graphs=False, shards=tp.world, mirror=StepMirror(tp))
    return BodyScheduler([body], limits)


def tensor_parallel_body(opened: OpenedSource, dtype: torch.dtype, tp: TensorParallel) -> PartRunner:
    """This rank's shard of the body: loaded whole on the rank's GPU, then cut by the tp_plan
    (so the whole body must fit one GPU while loading; shard-wise loading is not done yet)."""
    from lambdasplit.split.load import body_runner

    runner = body_runner(opened, dtype, tp.device)
    if runner.layers:
        tp.shard(runner.module, runner.config)
    return runner


def follow_leader(source: str | None, split: tuple[int, int] | None, dtype: str | None, tp: TensorParallel,
                  allow_shallow: bool = False) -> None:
    """A tensor-parallel rank other than 0: load this rank's shard and run rank 0's steps until it stops."""
    from lambdasplit.engine.parallel import follow
    from lambdasplit.split.load import open_source, resolve_dtype

    opened = open_source(source, split, allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    runner = tensor_parallel_body(opened, torch_dtype, tp)
    follow(tp, runner.module, runner.config, torch_dtype)
