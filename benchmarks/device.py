"""What a device needs: resident memory, part bytes, load time and ms per token of head, tail and LM head,
for float32 / bfloat16 / int8 / int4 / gguf-exact device parts, on this CPU.

Models: the embedded SmolLM2-135M (real weights, split 2,2) and Llama-2-7B- and 13B-shaped device parts
with seeded random weights (split 1,1; for gguf-exact, random values already on the embedded GGUF's
grids: Q4_1 projections, Q8_0 embeddings and LM head). Only the device parts are ever built: the random ones are
generated tensor by tensor from the shapes of a meta-device model, written as an exported device part
(the same `write_part` and manifest as `lambdasplit export`), and loaded with `SplitRuntime.load` in a
fresh process per precision, so the resident memory is that of a device process and nothing else.
Decode feeds the head's output straight to the tail (the body's time is the cloud's, not the device's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.common import environment, write
from benchmarks.gpu import SHAPES
from lambdasplit.split.checkpoint import PART_CONFIG_NAME
from lambdasplit.split.export import WEIGHTS_NAME, export_parts, write_part
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import part_keys
from lambdasplit.split.quantize import BLOCK_MIN, BLOCK_SCALE, EXACT, GROUP, SCHEMES, estimated_kind, quantize_tensors
from lambdasplit.split.spec import SplitSpec

LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
MODELS = {"smollm2-135m": None, "llama2-7b": SHAPES["llama2-7b"], "llama2-13b": LLAMA_13B}
PRECISIONS = ("float32", "bfloat16", "int8", "int4", EXACT)
WORK = Path(os.environ.get("LAMBDASPLIT_BENCH_DIR", "/tmp/lambdasplit-bench")) / "device"
PROMPT = 16


def random_device_part(shape: dict, split: tuple[int, int], precision: str, out: Path) -> Path:
    """A Llama-shaped exported device part with seeded random weights; no other part is ever made."""
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    spec = SplitSpec.create(*split, config.num_hidden_layers)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    keys = sorted({k for role in ("head", "tail") for k in part_keys(sorted(shapes), spec, role, False)})
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    scheme = precision if precision in SCHEMES else None
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:  # one float tensor at a time: a quantized part never holds the float32 whole
        if key.endswith("norm.weight"):
            tensors[key] = torch.ones(shapes[key], dtype=dtype)
        elif scheme == EXACT:
            tensors.update(gguf_blocks_at_random(key, tuple(shapes[key]), generator))
        else:
            tensors.update(quantize_tensors({key: (torch.randn(shapes[key], generator=generator) * 0.02).to(dtype)}, scheme))
    fingerprint = hashlib.sha256(config.to_json_string().encode()).hexdigest()
    manifest = PartManifest.describe("device", config, fingerprint, spec, dtype, scheme)
    out.mkdir(parents=True)
    write_part(out, tensors, config, manifest)
    return out


def gguf_blocks_at_random(key: str, shape: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A weight as gguf-exact stores it, with random levels and fp16 steps: Q8_0 blocks for the
    embeddings and LM head, Q4_1 blocks (w = d*q + m) for the projections, as in the embedded GGUF."""
    rows, cols = shape
    d = (torch.rand(rows, cols // GROUP, generator=generator) * 0.004).half().float()
    if estimated_kind(key, EXACT) == "q8":
        return {key: torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8), key + BLOCK_SCALE: d}
    packed = torch.randint(0, 256, (rows, cols // 2), generator=generator, dtype=torch.uint8)
    return {key: packed, key + BLOCK_SCALE: d, key + BLOCK_MIN: (-7.5 * d).half().float()}


def embedded_device_part(split: tuple[int, int], precision: str, out: Path) -> Path:
    scheme = precision if precision in SCHEMES else None
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    return export_parts(None, split, out, dtype, quantize=scheme)["device"]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


class _Clock:
    """Seconds spent inside one module (the LM head), summed over its calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total, self._start = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "total", self.total + time.perf_counter() - self._start))


def measure(directory: str, tokens: int) -> dict:
    """In this (fresh) process: load the device part, then decode `tokens` positions after a prompt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lambdasplit.device.runtime import SplitRuntime

    config = AutoConfig.from_pretrained(str(Path(directory) / PART_CONFIG_NAME))  # config.json is a stub
    AutoModelForCausalLM._model_mapping[type(config)]  # the model's module, imported now
    base = _rss()  # the runtime: Python, torch, transformers, lambdasplit and the model's classes
    start = time.perf_counter()
    runtime = SplitRuntime.load(directory)
    load_s = time.perf_counter() - start
    loaded = _rss()
    lm_head = _Clock(runtime.tail.module.lm_head)
    vocab = runtime.config.vocab_size
    ids = torch.randint(vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    head_s = tail_s = 0.0
    with torch.inference_mode():
        logits = runtime.tail(runtime.head(ids), logits_to_keep=1)
        lm_head.total = 0.0
        for _ in range(tokens):
            t0 = time.perf_counter()
            hidden = runtime.head(logits[:, -1:].argmax(-1))
            t1 = time.perf_counter()
            logits = runtime.tail(hidden, logits_to_keep=1)
            head_s, tail_s = head_s + t1 - t0, tail_s + time.perf_counter() - t1
    ms = 1000 / tokens
    return {
        "rss_runtime_bytes": base, "rss_loaded_bytes": loaded, "rss_after_decode_bytes": _rss(), "rss_peak_bytes": _peak(),
        "load_s": load_s, "threads": torch.get_num_threads(),
        "ms_per_token": {"head": head_s * ms, "tail_layers": (tail_s - lm_head.total) * ms, "lm_head": lm_head.total * ms,
                         "total": (head_s + tail_s) * ms},
    }


def _in_fresh_process(directory: Path, tokens: int) -> dict:
    code = "import json, sys; from benchmarks.device import measure; print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))"
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(tokens)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"device worker failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_device(models: list[str], precisions: list[str], tokens: int, name: str) -> tuple[Path, Path | None]:
    payload: dict = {"environment": environment(), "tokens": tokens, "prompt": PROMPT, "results": []}
    for model in models:
        split = (2, 2) if MODELS[model] is None else (1, 1)
        for precision in precisions:
            work = WORK / f"{model}-{precision}"
            shutil.rmtree(work, ignore_errors=True)
            if MODELS[model] is None:
                directory = embedded_device_part(split, precision, work)
            else:
                directory = random_device_part(MODELS[model], split, precision, work)
            row = {"model": model, "split": list(split), "precision": precision,
                   "part_bytes": (directory / WEIGHTS_NAME).stat().st_size, **_in_fresh_process(directory, tokens)}
            payload["results"].append(row)
            print(table_row(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)
            write(name, payload)
    return write(name, payload), plot(payload, name)


def table_row(row: dict) -> str:
    ms = row["ms_per_token"]
    mib = 2**20
    return (f"| {row['model']} | {row['split'][0]},{row['split'][1]} | {row['precision']} | {row['part_bytes'] / mib:,.0f} | "
            f"{(row['rss_after_decode_bytes'] - row['rss_runtime_bytes']) / mib:,.0f} | {row['rss_after_decode_bytes'] / mib:,.0f} | "
            f"{row['rss_peak_bytes'] / mib:,.0f} | {row['load_s']:.2f} | {ms['head']:.2f} | {ms['tail_layers']:.2f} | "
            f"{ms['lm_head']:.2f} | {ms['total']:.2f} |")


TABLE_HEADER = ("| model | split | precision | part MiB | RSS above runtime MiB | RSS MiB | peak RSS MiB | load s | "
                "head ms | tail layers ms | LM head ms | device ms/token |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def plot(payload: dict, name: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in payload["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        rows = [r for r in payload["results"] if r["model"] == model]
        xs = [PRECISIONS.index(r["precision"]) + i * width for r in rows]
        axes[0].bar(xs, [(r["rss_after_decode_bytes"] - r["rss_runtime_bytes"]) / 2**30 for r in rows], width, label=model)
        axes[1].bar(xs, [r["ms_per_token"]["total"] for r in rows], width, label=model)
    for ax, title in zip(axes, ("resident memory above the runtime (GiB)", "device ms per token (head + tail + LM head)"), strict=True):
        ax.set_xticks([p + width * (len(models) - 1) / 2 for p in range(len(PRECISIONS))], PRECISIONS)
        ax.set_title(title)
        ax.legend()
    path = Path(__file__).parent.parent / "docs" / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

