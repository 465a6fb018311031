"""Shared pieces: environment facts, side-by-side timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).parent / "results"
# Where --quick runs write by default: ignored by git, so checking a change never rewrites a
# committed result that docs/benchmarks.md reports (pass --out benchmarks/results to refresh one).
LOCAL_RESULTS = RESULTS / "local"


def results_dir(quick: bool, out: Path | None = None) -> Path:
    return out if out is not None else LOCAL_RESULTS if quick else RESULTS


def environment(device: str = "cpu") -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Run:
    """One generation: when its first token came, its decode rate, and where the time went."""

    prefill_s: float
    decode_tok_s: float
    total_s: float
    per_token_ms: dict[str, float] = field(default_factory=dict)
    bytes_per_token: dict[str, float] = field(default_factory=dict)


def alternate(candidates: dict[str, Callable[[], Run]], reps: int) -> dict[str, list[Run]]:
    """Run every candidate `reps` times, interleaved (A B C, B C A, ...), after one warm-up each."""
    for run in candidates.values():
        run()
    names = list(candidates)
    results: dict[str, list[Run]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            results[name].append(candidates[name]())
    return results


def summarize(runs: list[Run]) -> dict:
    """Medians over repetitions (and the spread, so a reader sees the noise)."""
    rates = [r.decode_tok_s for r in runs]
    out = {
        "reps": len(runs),
        "decode_tok_s": statistics.median(rates),
        "decode_tok_s_min": min(rates),
        "decode_tok_s_max": max(rates),
        "prefill_s": statistics.median(r.prefill_s for r in runs),
        "total_s": statistics.median(r.total_s for r in runs),
    }
    for key in runs[0].per_token_ms:
        out.setdefault("per_token_ms", {})[key] = statistics.median(r.per_token_ms[key] for r in runs)
    for key in runs[0].bytes_per_token:
        out.setdefault("bytes_per_token", {})[key] = runs[0].bytes_per_token[key]
    return out


def write(name: str, payload: dict, directory: Path | None = None) -> Path:
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_default))
    return path


def _default(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
