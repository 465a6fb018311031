"""Probe of issue 25 item 4: the embedded SmolLM2's device parts (split 2,2, float32) exported to ONNX
and run with ONNX Runtime, against the PyTorch parts. Not a feature: onnx, onnxscript and onnxruntime
are no dependency of lambdasplit (`pip install onnx onnxscript onnxruntime` first).

`python -m benchmarks.onnx_probe [--prompts 40] [--new-tokens 64] [--reps 5]`:
- export: each part as a pure function (tokens or hidden states, attention mask, positions, past
  keys/values per layer) -> (hidden states or last-position logits, present keys/values), through
  `torch.onnx.export(dynamo=True)` with dynamic batch, new and past lengths;
- agreement: greedy decode of held-out prompts through the PyTorch parts and through the ONNX ones,
  each with its own float32 body in this process: identical replies, and the largest logit difference;
- device: fresh processes, alternating, as `python -m benchmarks device` measures (16-position
  prompt, head output straight to the tail): RSS and head + tail ms per decode token.
Writes benchmarks/results/onnx-probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("LAMBDASPLIT_BENCH_DIR", "/tmp/lambdasplit-bench")) / "onnx-probe"
SPLIT = (2, 2)
PROMPT = 16


def _rss(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def export_onnx(out: Path) -> None:
    """head.onnx and tail.onnx (weights in .onnx.data files) of the embedded model's device parts."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.split.parts import cache_kwarg

    class CachedPart(nn.Module):
        def __init__(self, module: nn.Module, role: str, config) -> None:
            super().__init__()
            self.module, self.role, self.config = module, role, config

        def forward(self, x, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.config)
            for i in range(self.config.num_hidden_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            inputs = {"input_ids": x} if self.role == "head" else {"inputs_embeds": x}
            kwargs = {**inputs, "attention_mask": attention_mask, "position_ids": position_ids,
                      cache_kwarg(self.module): cache, "use_cache": True}
            y = self.module(**kwargs, logits_to_keep=1).logits if self.role == "tail" else self.module(**kwargs).last_hidden_state
            return (y, *[t for layer in cache.layers for t in (layer.keys, layer.values)])

    runtime = SplitRuntime.load(None, SPLIT)
    out.mkdir(parents=True, exist_ok=True)
    auto = torch.export.Dim.AUTO
    for role, part in (("head", runtime.head), ("tail", runtime.tail)):
        config, n = part.config, 2 * part.config.num_hidden_layers
        x = torch.randint(100, 1000, (1, 3)) if role == "head" else torch.randn(1, 3, config.hidden_size)
        past = [torch.randn(1, config.num_key_value_heads, 5, config.head_dim) for _ in range(n)]
        args = (x, torch.ones(1, 8, dtype=torch.long), torch.arange(5, 8)[None], *past)
        shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in range(n)))
        names = ["x", "attention_mask", "position_ids", *[f"past_{'kv'[i % 2]}{i // 2}" for i in range(n)]]
        outputs = ["y", *[f"present_{'kv'[i % 2]}{i // 2}" for i in range(n)]]
        with torch.no_grad():
            program = torch.onnx.export(CachedPart(part.module, role, config).eval(), args, dynamo=True, dynamic_shapes=shapes,
                                        input_names=names, output_names=outputs, external_data=True, optimize=True)
        program.save(str(out / f"{role}.onnx"), external_data=True)


class OrtPart:
    """One exported part in an onnxruntime session, keeping its past keys/values and mask (batch 1)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Spinning worker threads (onnxruntime's default) starve the other side's threads on 2 shared
        # cores: decode took 2-3x longer with them (as OMP_WAIT_POLICY=PASSIVE for torch, lambdasplit/__init__.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_shapes = [(i.name, i.shape) for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.reset()

    def reset(self) -> None:
        import numpy as np

        self.past = [np.zeros((1, shape[1], 0, shape[3]), np.float32) for _, shape in self.past_shapes]
        self.length = 0

    def __call__(self, x):
        import numpy as np

        new = x.shape[1]
        feed = {"x": x, "attention_mask": np.ones((1, self.length + new), np.int64),
                "position_ids": np.arange(self.length, self.length + new, dtype=np.int64)[None]}
        feed.update({name: value for (name, _), value in zip(self.past_shapes, self.past, strict=True)})
        y, *self.past = self.session.run(None, feed)
        self.length += new
        return y


def agreement(onnx_dir: Path, prompts: list[str], new_tokens: int) -> dict:
    """Greedy replies through PyTorch and ONNX device parts (each with its own float32 body)."""
    import numpy as np
    import torch

    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.split.load import body_runner, open_source

    runtime = SplitRuntime.load(None, SPLIT)
    threads = torch.get_num_threads()
    head, tail = OrtPart(onnx_dir / "head.onnx", threads), OrtPart(onnx_dir / "tail.onnx", threads)
    bodies = [body_runner(open_source(None, SPLIT), torch.float32) for _ in range(2)]
    identical, worst, first_diffs = 0, 0.0, []
    for prompt in prompts:
        ids, _ = runtime.encode(prompt)
        for part in (runtime.head, runtime.tail, head, tail, *bodies):
            part.reset()
        replies: tuple[list[int], list[int]] = ([], [])
        x_torch, x_onnx = ids, ids.numpy()
        for _ in range(new_tokens):
            with torch.inference_mode():
                logits_torch = runtime.tail(bodies[0](runtime.head(x_torch)), logits_to_keep=1)[:, -1].numpy()
                hidden = bodies[1](torch.from_numpy(head(x_onnx))).numpy()
            logits_onnx = tail(hidden)[:, -1]
            worst = max(worst, float(np.abs(logits_torch - logits_onnx).max()))
            token_torch, token_onnx = int(logits_torch.argmax()), int(logits_onnx.argmax())
            replies[0].append(token_torch)
            replies[1].append(token_onnx)
            if token_torch != token_onnx or token_torch in runtime.eos_ids:
                break
            x_torch, x_onnx = torch.tensor([[token_torch]]), np.array([[token_onnx]], np.int64)
        identical += replies[0] == replies[1]
        if replies[0] != replies[1]:
            first_diffs.append(len(replies[0]) - 1)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": identical, "first_differences": first_diffs,
            "max_abs_logit_difference": worst}


def measure_onnx(directory: str, tokens: int) -> dict:
    """In this (fresh, torch-free) process: load head.onnx and tail.onnx, decode `tokens` positions."""
    import numpy as np
    import onnxruntime  # noqa: F401  (part of the runtime, as torch and transformers are for the PyTorch parts)

    base = _rss()
    start = time.perf_counter()
    head, tail = (OrtPart(Path(directory) / f"{role}.onnx", int(os.environ.get("ORT_THREADS", "2"))) for role in ("head", "tail"))
    load_s = time.perf_counter() - start
    logits = tail(head(np.random.default_rng(0).integers(0, 49152, (1, PROMPT), dtype=np.int64)))
    head_s = tail_s = 0.0
    for _ in range(tokens):
        t0 = time.perf_counter()
        hidden = head(logits[:, -1:].argmax(-1).astype(np.int64))
        t1 = time.perf_counter()
        logits = tail(hidden)
        head_s, tail_s = head_s + t1 - t0, tail_s + time.perf_counter() - t1
    return {"rss_runtime_bytes": base, "rss_after_decode_bytes": _rss(), "rss_peak_bytes": _rss("VmHWM"), "load_s": load_s,
            "torch_imported": "torch" in sys.modules,
            "ms_per_token": {"head": 1000 * head_s / tokens, "tail": 1000 * tail_s / tokens, "total": 1000 * (head_s + tail_s) / tokens}}


def _fresh(runtime: str, directory: Path, tokens: int) -> dict:
    code = (f"import json, sys; from benchmarks.{'onnx_probe import measure_onnx as m' if runtime == 'onnx' else 'device import measure as m'}; "
            "print(json.dumps(m(sys.argv[1], int(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(rows: list[dict]) -> dict:
    """Medians over a runtime's fresh-process runs (the host is shared: single runs move by up to 2x)."""
    return {"runs": rows, "median_ms_per_token": statistics.median(r["ms_per_token"]["total"] for r in rows),
            "median_rss_bytes": statistics.median(r["rss_after_decode_bytes"] for r in rows),
            "median_rss_above_runtime_bytes": statistics.median(r["rss_after_decode_bytes"] - r["rss_runtime_bytes"] for r in rows),
            "median_rss_runtime_bytes": statistics.median(r["rss_runtime_bytes"] for r in rows)}


def main() -> None:
    from benchmarks.agreement import PROMPTS
    from benchmarks.common import environment, write
    from lambdasplit.split.export import export_parts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decode positions timed per device run")
    args = parser.parse_args()
    import onnx
    import onnxruntime
    import onnxscript

    start = time.perf_counter()
    export_onnx(WORK / "onnx")
    export_s = time.perf_counter() - start
    torch_dir = export_parts(None, SPLIT, WORK / "torch", "float32", force=True)["device"]
    payload = {"environment": environment(), "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                                          "onnxscript": onnxscript.__version__},
               "export_s": export_s, "onnx_bytes": sum(p.stat().st_size for p in (WORK / "onnx").iterdir()),
               "agreement": agreement(WORK / "onnx", json.loads(PROMPTS.read_text())[: args.prompts], args.new_tokens)}
    runs: dict[str, list[dict]] = {"torch": [], "onnx": []}
    for _ in range(args.reps):  # alternating, each in a fresh process
        runs["torch"].append(_fresh("torch", torch_dir, args.tokens))
        runs["onnx"].append(_fresh("onnx", WORK / "onnx", args.tokens))
    payload["device"] = {name: _summary(rows) for name, rows in runs.items()}
    print(json.dumps({k: v for k, v in payload.items() if k != "device"} | {
        name: {k: v for k, v in d.items() if k != "runs"} for name, d in payload["device"].items()}, indent=1))
    print(f"wrote {write('onnx-probe', payload)}")


if __name__ == "__main__":
    main()
