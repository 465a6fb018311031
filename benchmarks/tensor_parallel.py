"""`serve --tensor-parallel N` on the GPUs of one host, run under torchrun:

    torchrun --standalone --nproc-per-node 2 -m benchmarks.tensor_parallel exact   # 7B-shaped, vs one GPU
    torchrun --standalone --nproc-per-node 4 -m benchmarks.tensor_parallel scale   # 70B-shaped body

`exact`: a Llama-2-7B-shaped model with seeded random bf16 weights, split 2,2; the tensor-parallel
body (every step mirrored from rank 0, as the server runs it) against the same body on one GPU:
greedy tokens through the device's head and tail, and the body's hidden-state error on one step.
`scale`: a Llama-2-70B-shaped body (80 layers, D 8192, GQA 8, split 2,2: 76 body layers) built
shard by shard on the cards (random weights, no checkpoint): the batched decode step at 1, 16 and 64
rows (512 positions of context each) through the engine, against transformers' own forward of the
same sharded layers with its DynamicCache; the all-reduce time per step from the torch profiler; the
weight-streaming floor (body bytes / (ranks x measured copy bandwidth)). Results to
benchmarks/results/tensor-parallel-{suite}-{N}gpu.json (rank 0 writes).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from benchmarks.common import environment, write
from lambdasplit.engine.kvpool import KVPool, Sequence
from lambdasplit.engine.parallel import StepMirror, TensorParallel, follow
from lambdasplit.engine.scheduler import BodyScheduler
from lambdasplit.engine.step import ATTENTION, Chunk, run_chunks
from lambdasplit.split.parts import cache_kwarg

SEVENTY_B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
# LAMBDASPLIT_TP_SMOKE=1: a small shape, so the whole suite runs on two CPU ranks (gloo) in seconds.
SMOKE = os.environ.get("LAMBDASPLIT_TP_SMOKE") == "1"
if SMOKE:
    SEVENTY_B = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)
CONTEXT = 64 if SMOKE else 512
ROWS = (1, 4) if SMOKE else (1, 16, 64)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def exact(tp: TensorParallel) -> dict | None:
    from benchmarks.gpu import build_random
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.engine.loading import follow_leader, load_scheduler
    from lambdasplit.engine.local import LocalBody
    from lambdasplit.engine.scheduler import SchedulerLimits

    path = build_random("llama2-7b") if tp.leader else None
    dist.barrier()
    if not tp.leader:
        follow_leader(str(build_random("llama2-7b")), (2, 2), "bfloat16", tp)
        return None
    limits = SchedulerLimits(kv_pool_bytes=4 << 30)
    parallel = load_scheduler(str(path), (2, 2), "bfloat16", limits=limits, tensor_parallel=tp)
    single = load_scheduler(str(path), (2, 2), "bfloat16", "cuda", limits, cuda_graphs=False)
    runtime = SplitRuntime.load(path, (2, 2), "bfloat16", "cuda")
    torch.manual_seed(0)
    prompts = [torch.randint(3, 32000, (1, n)) for n in (16, 64, 200)]
    rows = []
    for ids in prompts:
        got = runtime.generate_ids(LocalBody(parallel), ids, None, SamplingParams(max_new_tokens=32, ignore_eos=True), keep_logits=True)
        ref = runtime.generate_ids(LocalBody(single), ids, None, SamplingParams(max_new_tokens=32, ignore_eos=True), keep_logits=True)
        agree = sum(a == b for a, b in zip(got.token_ids[0], ref.token_ids[0], strict=True))
        first = next((i for i, (a, b) in enumerate(zip(got.token_ids[0], ref.token_ids[0], strict=True)) if a != b), None)
        rows.append({"prompt": ids.shape[1], "new_tokens": 32, "identical": got.token_ids == ref.token_ids,
                     "first_divergence": first, "agreeing_tokens": agree,
                     "first_step_logit_error": float((got.logits[0] - ref.logits[0]).abs().max())})
    hidden_error = _hidden_error(parallel, single)
    parallel.shutdown()
    single.shutdown()
    return {"suite": "tensor-parallel-exact", "ranks": tp.world, "model": "llama2-7b-shaped, random bf16, split 2,2",
            "environment": environment("cuda"), "generations": rows, "body_hidden_error": hidden_error}


def _hidden_error(parallel: BodyScheduler, single: BodyScheduler) -> dict:
    """One 128-position prefill step on both bodies: the hidden states' max and relative error."""
    torch.manual_seed(1)
    outs = []
    for scheduler in (parallel, single):
        body, pool = scheduler.bodies[0], scheduler.pool
        row = Sequence([], 0, 0)
        pool.grow([row], 128)
        hidden = torch.randn(1, 128, body.runner.config.hidden_size, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
        outs.append(body.run(pool, [Chunk([row], hidden, torch.ones(1, 128, dtype=torch.long))])[0].float())
        pool.release([row])
    diff = (outs[0] - outs[1]).abs()
    return {"max_abs": float(diff.max()), "relative_rms": float(diff.pow(2).mean().sqrt() / outs[1].pow(2).mean().sqrt())}


def _seventy_b_body(tp: TensorParallel, layers: int) -> nn.Module:
    """The 70B-shaped body on this rank: built empty, cut by the tp_plan, then each shard filled with
    seeded random weights on its own card (the whole body never exists anywhere)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(**{**SEVENTY_B, "num_hidden_layers": layers})
    with init_empty_weights():
        module = AutoModel.from_config(config, dtype=torch.bfloat16)
    module.embed_tokens = None
    module.norm = nn.Identity()
    tp.shard(module, config)
    module.to_empty(device=tp.device)
    module.rotary_emb = type(module.rotary_emb)(config).to(tp.device)  # to_empty emptied its buffers too
    generator = torch.Generator(device=tp.device).manual_seed(tp.rank)
    with torch.no_grad():
        for name, param in module.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.normal_(0, 0.02, generator=generator)
    module.config._attn_implementation = ATTENTION
    return module.eval()


def scale(tp: TensorParallel, layers: int) -> dict | None:
    module = _seventy_b_body(tp, layers)
    config = module.config
    head_dim = config.hidden_size // config.num_attention_heads
    blocks = max(ROWS) * (CONTEXT // 16 + 8) + 4
    if not tp.leader:
        follow(tp, module, config, torch.bfloat16)
        _transformers_forward(module, tp)
        return None
    mirror = StepMirror(tp, module)
    pool = KVPool(layers, tp.local_kv_heads(config), head_dim, blocks, torch.bfloat16, tp.device)
    mirror.share_pool(pool)
    body_bytes = tp.world * sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 2 for p in module.parameters())
    steps = {}
    for rows in ROWS:
        seqs = [Sequence([], 0, 0) for _ in range(rows)]
        pool.grow(seqs, CONTEXT + 64)
        for seq in seqs:  # the context, one prefill chunk per row
            prompt = torch.randn(1, CONTEXT, config.hidden_size, device=tp.device, dtype=torch.bfloat16)
            run_chunks(module, pool, [Chunk([seq], prompt, torch.ones(1, CONTEXT, dtype=torch.long))], mirror.publish)
        one = torch.ones(1, 1, dtype=torch.long)
        decode = [Chunk([seq], torch.randn(1, 1, config.hidden_size, device=tp.device, dtype=torch.bfloat16), one) for seq in seqs]
        times = []
        for _ in range(24):
            _sync()
            start = time.perf_counter()
            run_chunks(module, pool, decode, mirror.publish)
            _sync()
            times.append(time.perf_counter() - start)
        allreduce = _allreduce_ms(lambda decode=decode: run_chunks(module, pool, decode, mirror.publish))
        median = statistics.median(times[4:])
        steps[rows] = {"step_ms": 1000 * median, "tok_s": rows / median, "allreduce_ms_per_step": allreduce}
        print(f"rank0: {rows} rows: {1000 * median:.2f} ms/step, {rows / median:.0f} tok/s, all-reduce {allreduce} ms", flush=True)
        pool.release(seqs)
    mirror.stop()
    baseline = _transformers_forward(module, tp)
    bandwidth = _copy_bandwidth(tp.device)
    floor = body_bytes / (tp.world * bandwidth)
    return {"suite": "tensor-parallel-scale", "ranks": tp.world, "environment": environment("cuda"),
            "model": f"llama2-70b-shaped body ({layers} layers: 80 minus split 2,2), random bf16", "context": CONTEXT,
            "body_bytes": body_bytes, "copy_bandwidth_bytes_s": bandwidth, "weight_streaming_floor_ms": 1000 * floor,
            "batch1_vs_floor": steps[1]["step_ms"] / (1000 * floor), "engine": steps, "transformers_forward": baseline,
            "cuda_graphs": False}


def _allreduce_ms(step) -> float | None:
    """NCCL kernel time per step, from the torch profiler (rank 0's view); None on CPU ranks."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        _sync()
    nccl = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return nccl / 3 / 1000


def _transformers_forward(module: nn.Module, tp: TensorParallel) -> dict:
    """The same sharded layers through transformers' own eager forward (sdpa, DynamicCache): the
    baseline the engine's batched step is compared with. Every rank runs it in lockstep."""
    from transformers import DynamicCache

    module.config._attn_implementation = "sdpa"
    width, kwarg = module.config.hidden_size, cache_kwarg(module)
    out = {}
    for rows in ROWS:
        generator = torch.Generator(device=tp.device).manual_seed(rows)
        cache = DynamicCache()
        with torch.inference_mode():
            prompt = torch.randn(rows, CONTEXT, width, device=tp.device, dtype=torch.bfloat16, generator=generator)
            module(inputs_embeds=prompt, **{kwarg: cache})
            times = []
            for _ in range(24):
                step = torch.randn(rows, 1, width, device=tp.device, dtype=torch.bfloat16, generator=generator)
                _sync()
                start = time.perf_counter()
                module(inputs_embeds=step, **{kwarg: cache})
                _sync()
                times.append(time.perf_counter() - start)
        median = statistics.median(times[4:])
        out[rows] = {"step_ms": 1000 * median, "tok_s": rows / median}
        del cache
    module.config._attn_implementation = ATTENTION
    return out


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes per second one GPU reads + writes in a large copy (HBM bandwidth, as used by a step)."""
    src = torch.empty(1 << (24 if SMOKE else 31), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def main() -> None:
    suite = sys.argv[1] if len(sys.argv) > 1 else "exact"
    tp = TensorParallel.from_env("cuda")
    if tp is None:
        raise SystemExit("run under torchrun with --nproc-per-node 2 or more")
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 76
    result = exact(tp) if suite == "exact" else scale(tp, layers)
    if result is not None:
        path = write(f"tensor-parallel-{suite}-{tp.world}gpu", result)
        print(f"wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
