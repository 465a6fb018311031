"""Peak memory of loading and running the device part vs the unsplit model, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = r"""
import json, re, sys, psutil, torch, transformers
import transformers.models.llama.modeling_llama
from lambdasplit.device.runtime import SplitRuntime
kind, source, split = sys.argv[1], sys.argv[2], tuple(int(x) for x in sys.argv[3].split(","))
ids = torch.arange(1, 65)[None]
base = psutil.Process().memory_info().rss
if kind == "device":
    from lambdasplit.split.load import open_source, device_runners
    head, tail = device_runners(open_source(None if source == "default" else source, split), torch.float32)
    with torch.inference_mode():
        tail(head(ids))
else:
    from lambdasplit.split.sources import resolve_source
    path = resolve_source(None if source == "default" else source).path
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.inference_mode():
        model(ids)
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"peak_minus_baseline_bytes": peak - base}))
"""


def peak_bytes(kind: str, source: str, split: tuple[int, int]) -> int:
    """Peak RSS above the process's baseline (imports done) while loading and running one forward."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, kind, source, f"{split[0]},{split[1]}"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_minus_baseline_bytes"]


def device_vs_unsplit(source: str, split: tuple[int, int]) -> dict:
    device, full = peak_bytes("device", source, split), peak_bytes("unsplit", source, split)
    return {"device_peak_bytes": device, "unsplit_peak_bytes": full, "ratio": device / full}
