"""Open a source for one side of the split: which checkpoint, which split, which manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lambdasplit import defaults
from lambdasplit.errors import SourceError, SplitError
from lambdasplit.split.adapters import adapter_for
from lambdasplit.split.checkpoint import Checkpoint, model_fingerprint
from lambdasplit.split.manifest import PartManifest, dtype_named
from lambdasplit.split.parts import EMBED_KEY, PartRunner, build_part, part_keys, renamed
from lambdasplit.split.quantize import check_dtype, check_scheme, embedding_tensors
from lambdasplit.split.sources import resolve_source
from lambdasplit.split.spec import SplitSpec


@dataclass
class OpenedSource:
    checkpoint: Checkpoint
    spec: SplitSpec
    exported: PartManifest | None  # set when the source is an exported part directory

    @property
    def config(self):
        return self.checkpoint.config

    def manifest(self, role: str, dtype: torch.dtype, quantize: str | None = None) -> PartManifest:
        """The manifest this side presents in a handshake."""
        fingerprint = self.exported.fingerprint if self.exported else model_fingerprint(self.checkpoint)
        return PartManifest.describe(role, self.config, fingerprint, self.spec, dtype, quantize)

    def require(self, role: str) -> None:
        """Refuse to load a part from an exported directory that does not hold it."""
        if self.exported and self.exported.role != role:
            hint = "DIR/device" if role == "device" else "DIR/cloud"
            raise SourceError(
                f"{self.checkpoint.path} holds the {self.exported.role} part; the {role} side needs {hint}"
            )


def open_source(
    source: str | os.PathLike[str] | None,
    split: tuple[int, int] | None = None,
    allow_shallow: bool = False,
) -> OpenedSource:
    """Resolve `source` and the split to use with it (an exported part brings its own)."""
    checkpoint = resolve_source(source)
    exported = PartManifest.read(checkpoint.path)
    if exported is not None:
        exported.verify(checkpoint.path)  # before the config or any tensor is used
    adapter_for(checkpoint.config)
    if exported is not None:
        if split is not None and tuple(split) != (exported.spec.k, exported.spec.m):
            raise SplitError(
                f"{checkpoint.path} was exported with split {exported.spec.k},{exported.spec.m}; "
                f"--split {split[0]},{split[1]} does not apply to it"
            )
        return OpenedSource(checkpoint, exported.spec, exported)
    k, m = split if split is not None else defaults.SPLIT
    spec = SplitSpec.create(k, m, checkpoint.config.num_hidden_layers, allow_shallow=allow_shallow)
    return OpenedSource(checkpoint, spec, None)


def resolve_dtype(name: str | None, opened: OpenedSource) -> torch.dtype:
    """A named dtype, else the exported part's, else float32 (CPU-friendly and exact)."""
    return dtype_named(name, opened.exported.dtype if opened.exported else "float32")


def part_runner(
    opened: OpenedSource,
    role: str,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    shared: dict[str, torch.Tensor] | None = None,
    quantize: str | None = None,
) -> PartRunner:
    adapter = adapter_for(opened.config)
    module = build_part(opened.checkpoint, opened.spec, role, dtype, device, opened.config, shared, quantize)
    return PartRunner(module, role, adapter.sub_config(opened.config, *opened.spec.range(role)))


def device_runners(
    opened: OpenedSource, dtype: torch.dtype, device: str | torch.device = "cpu", quantize: str | None = None
) -> tuple[PartRunner, PartRunner]:
    """Head and tail; a tied embedding matrix is loaded once and shared by both. `quantize` (int8,
    int4, gguf-exact) quantizes their weights on load; a quantized export loads quantized either way."""
    opened.require("device")
    quantize = resolve_quantize(quantize, opened)
    check_dtype(quantize, dtype)
    if quantize is not None and torch.device(device).type != "cpu":
        raise SourceError(f"--quantize {quantize} runs on the CPU (PyTorch's CPU kernels); drop it or use --device cpu")
    head = part_runner(opened, "head", dtype, device, quantize=quantize)
    shared = None
    if getattr(opened.config, "tie_word_embeddings", False):
        shared = embedding_tensors(head.module.embed_tokens, EMBED_KEY)
    tail = part_runner(opened, "tail", dtype, device, shared, quantize)
    return head, tail


def resolve_quantize(name: str | None, opened: OpenedSource) -> str | None:
    """The device parts' weight precision: a quantized export's own (a different --quantize is
    refused: the full-precision weights are gone), else `name`."""
    check_scheme(name)
    stored = opened.exported.quantize if opened.exported else None
    if stored is not None and name is not None and name != stored:
        raise SourceError(f"{opened.checkpoint.path} holds {stored} weights; --quantize {name} needs an export from the full model")
    return stored or name


def body_runner(opened: OpenedSource, dtype: torch.dtype, device: str | torch.device = "cpu") -> PartRunner:
    opened.require("cloud")
    return part_runner(opened, "body", dtype, device)


def body_variants(
    opened: OpenedSource, widest: PartRunner, k_max: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> list[tuple[PartRunner, PartManifest]]:
    """Bodies starting at K+1..k_max (for randomised split points), built on `widest`'s tensors."""
    spec = opened.spec
    if not spec.k < k_max < spec.layers - spec.m:
        raise SplitError(f"a K range {spec.k}-{k_max} needs {spec.k} < {k_max} < {spec.layers - spec.m} (L - M: "
                         "K = L - M would leave the body empty)")
    params = widest.module.state_dict()
    tied = bool(getattr(opened.config, "tie_word_embeddings", False))
    variants = []
    for k in range(spec.k + 1, k_max + 1):
        view = OpenedSource(opened.checkpoint, SplitSpec(k, spec.m, spec.layers), opened.exported)
        keys = part_keys(opened.checkpoint.keys, view.spec, "body", tied)
        shared = {key: params[renamed(key, "body", spec.k)] for key in keys}
        runner = part_runner(view, "body", dtype, device, shared)
        variants.append((runner, view.manifest("cloud", dtype)))
    return variants
