"""One body forward over the next position of many sessions: decode steps batched across devices.

Each session keeps its own `DynamicCache` and mask history. For a batched step the sessions' caches
are left-padded to the longest one and stacked, the padding is masked out (so every row attends to
exactly its own positions, at its own position ids), the body runs once, and each session's cache
gets back only its new position. Nothing is recomputed; the price is one copy of the batch's KV per
step, which on the CPU costs far less than the B - 1 extra weight passes it saves. A KV pool that
the attention reads in place (transformers' paged cache) removes that copy and is the GPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lambdasplit.split.parts import PartRunner, cache_kwarg


def batchable(runner: PartRunner) -> bool:
    """Whether this runner's next single-position step can join a batch (a started sequence whose
    layers all keep full-length caches: sliding-window layers would need their own padding rule)."""
    return (
        runner.layers > 0
        and runner.seq_len > 0
        and runner.cache is not None
        and all(type(layer) is DynamicLayer for layer in runner.cache.layers)
    )


@torch.inference_mode()
def decode_batched(runners: list[PartRunner], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run one position (hidden[i]: (b_i, 1, D)) for every runner through their shared module."""
    first = runners[0]
    longest = max(r.seq_len for r in runners)
    device = hidden[0].device
    history = torch.cat([F.pad(r.mask, (longest - r.seq_len, 0)) for r in runners])
    mask = torch.cat([history, torch.ones(history.shape[0], 1, dtype=history.dtype, device=device)], dim=1)
    positions = (mask.cumsum(-1) - 1)[:, -1:]
    merged = DynamicCache(config=first.config)
    for index in range(first.layers):
        keys = torch.cat([F.pad(r.cache.layers[index].keys, (0, 0, longest - r.seq_len, 0)) for r in runners])
        values = torch.cat([F.pad(r.cache.layers[index].values, (0, 0, longest - r.seq_len, 0)) for r in runners])
        merged.update(keys, values, index)
    out = first.module(
        inputs_embeds=torch.cat(hidden), attention_mask=mask, position_ids=positions,
        **{cache_kwarg(first.module): merged}, use_cache=True,
    ).last_hidden_state
    results, row = [], 0
    for runner, h in zip(runners, hidden, strict=True):
        rows = slice(row, row + h.shape[0])
        for index in range(first.layers):
            layer = merged.layers[index]
            runner.cache.update(layer.keys[rows, :, -1:], layer.values[rows, :, -1:], index)
        runner.mask = torch.cat([runner.mask, mask[rows, -1:]], dim=1)
        results.append(out[rows])
        row += h.shape[0]
    return results
