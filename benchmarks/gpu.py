"""The GPU suite: random-weight models of real shapes (no download), bf16, one CUDA device.

For each model and split: unsplit generate() vs split with the device parts on the same GPU (in
process, and with the body behind a loopback server) vs the device parts on the host CPU; batch 1
and 8; then 1/4/16 concurrent devices against one server.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.common import alternate, environment, summarize, write
from benchmarks.decode import concurrent_run, kv_bytes_per_session, metrics_reader, split_run, unsplit_run
from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.connect import BodyConfig, connect_body
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.engine.local import load_local_body
from lambdasplit.wire.codec import Codec

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0),
}
WORK = Path(os.environ.get("LAMBDASPLIT_BENCH_DIR", "/tmp/lambdasplit-bench"))


def build_random(name: str) -> Path:
    """Seeded random bf16 weights of the named shape, written layer by layer as safetensors."""
    path = WORK / name
    if (path / "done").is_file() and (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.save_pretrained(str(path))
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator(device="cuda").manual_seed(0)
    groups: dict[str, dict[str, torch.Size]] = {}
    for key, shape in shapes.items():
        group = key.split(".")[2] if key.startswith("model.layers.") else "other"
        groups.setdefault(group, {})[key] = shape
    for group, members in groups.items():
        tensors = {}
        for key, shape in members.items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float32) * 0.02
                tensors[key] = t.to(torch.bfloat16).cpu()
        save_file(tensors, str(path / f"model-{group}.safetensors"), metadata={"format": "pt"})
    weight_map = {key: f"model-{group}.safetensors" for group, members in groups.items() for key in members}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "done").write_text("ok")
    return path


def param_bytes(*modules: torch.nn.Module) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def run_gpu(models: list[str], reps: int, new_tokens: int) -> Path:
    logging.getLogger("lambdasplit").setLevel(logging.ERROR)
    assert torch.cuda.is_available(), "the GPU suite needs a CUDA device"
    results: dict = {"suite": "gpu", "environment": environment("cuda"), "new_tokens": new_tokens, "models": {}}
    for name in models:
        results["models"][name] = run_model(name, reps, new_tokens)
        write("gpu", results)
    return write("gpu", results)


def run_model(name: str, reps: int, new_tokens: int) -> dict:
    path = build_random(name)
    print(f"[{name}] weights ready in {path}", flush=True)
    unsplit = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to("cuda").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, SHAPES[name]["vocab_size"], (b, 64), generator=gen) for b in (1, 8)}
    out: dict = {"shape": SHAPES[name], "unsplit_param_bytes": param_bytes(unsplit), "splits": {}}
    for k, m in ((1, 1), (4, 4)):
        split = f"{k},{m}"
        row: dict = {}
        args = ("--model", str(path), "--split", split, "--device", "cuda", "--dtype", "bfloat16", "--max-context", "4096")
        with ServerProcess(*args, timeout=600) as server:
            runtime = SplitRuntime.load(path, (k, m), "bfloat16", device="cuda")
            row["device_param_bytes"] = param_bytes(runtime.head.module, runtime.tail.module)
            row["device_vs_unsplit_memory"] = row["device_param_bytes"] / out["unsplit_param_bytes"]
            row["cloud_kv_bytes_per_session_192_positions"] = kv_bytes_per_session(runtime, 192, 2)
            local = load_local_body(str(path), (k, m), "bfloat16", device="cuda", codec=Codec.BF16)
            remote = connect_body(BodyConfig(server.url, codec=Codec.BF16, timeout=300), runtime.manifest)
            compute = metrics_reader(server.url)
            for batch, ids in prompts.items():
                candidates = {
                    "unsplit_generate": unsplit_run(unsplit, ids, new_tokens),
                    "split_gpu_in_process": split_run(runtime, local, ids, new_tokens),
                    "split_gpu_loopback_bf16": split_run(runtime, remote, ids, new_tokens, compute),
                }
                runs = alternate(candidates, reps)
                summary = {n: summarize(r) for n, r in runs.items()}
                base = summary["unsplit_generate"]
                for s in summary.values():
                    s["latency_ratio_vs_unsplit"] = s["per_token_ms"]["total"] / base["per_token_ms"]["total"]
                row[f"batch{batch}"] = summary
                print(f"[{name} {split} b{batch}] " + ", ".join(
                    f"{n}: {s['per_token_ms']['total']:.2f} ms/tok ({s['latency_ratio_vs_unsplit']:.3f}x)" for n, s in summary.items()
                ), flush=True)
            del local
            gc.collect()
            torch.cuda.empty_cache()
            host = SplitRuntime.load(path, (k, m), "bfloat16", device="cpu")
            host_body = connect_body(BodyConfig(server.url, codec=Codec.BF16, timeout=300), host.manifest)
            host_runs = [split_run(host, host_body, prompts[1], 32, compute)() for _ in range(2)]
            row["device_on_host_cpu_batch1"] = summarize(host_runs[1:])
            host_body.close()
            print(f"[{name} {split}] device on CPU: {row['device_on_host_cpu_batch1']['per_token_ms']}", flush=True)
            if (k, m) == (1, 1):
                row["concurrency"] = []
                for n in (1, 4, 16):
                    runtimes = [runtime] * n  # generate() gives each call its own caches
                    bodies = [connect_body(BodyConfig(server.url, codec=Codec.BF16, timeout=300), runtime.manifest) for _ in range(n)]
                    row["concurrency"].append(concurrent_run(runtimes, bodies, prompts[1], 64))
                    for body in bodies:
                        body.close()
                    print(f"[{name} {split}] concurrency {row['concurrency'][-1]}", flush=True)
            remote.close()
            del runtime, host
            gc.collect()
            torch.cuda.empty_cache()
        out["splits"][split] = row
    del unsplit
    gc.collect()
    torch.cuda.empty_cache()
    return out
