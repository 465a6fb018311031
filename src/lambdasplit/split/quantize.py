"""Weight-only int8 / int4 / gguf-exact device parts: the head's and tail's projections, the LM head and the embeddings.

What runs: PyTorch's own CPU kernels for weight-only quantized matmuls, `aten._weight_int8pack_mm`
(int8, one scale per output channel) and `aten._weight_int4pack_mm_for_cpu` (4-bit, asymmetric, one
scale and zero per group of 128/64/32 inputs), with bf16 activations; norms, attention and
everything else keep the part's dtype. Measured on this 2-core AVX-512 x86 host, one 4096 x 11008
projection at batch 1 (docs/benchmarks.md, `python -m benchmarks device`): fp32 9.9 ms, bf16 15.8 ms,
int8 5.9 ms, int4 7.5 ms. torchao 0.18 (the maintained library around these kernels) was measured
and not taken: its int8 weight-only tensor runs a dequantising fallback on CPU (67 ms, 6.7x
slower than fp32), and its CPU int4 packing format is gone from 0.18; `torch.ao` dynamic
quantisation is deprecated and quantises activations too. The same kernels with fp32 activations
are 3-6x slower, hence bf16 inside the projection only.

On disk a quantized part is plain safetensors (no pickle, no kernel layout): `X.weight` holds the
int8 values or two 4-bit values per uint8 (low nibble first), `X.weight_scale` and, for int4,
`X.weight_zero` the bf16 scales (w = (q - 8) * scale + zero, the kernel's convention). The int4
kernel layout is made at load (`QuantizedLinear.prepare`), so a part stays portable across CPUs.

`gguf-exact` keeps a GGUF source's own grids instead of choosing new ones: blocks of 32 weights
with w = d*q + m, q in 0..15 (Q4_1; Q4_0 is m = -8d) or w = d*q, q in -127..127 (Q8_0). It recovers
d, m and q from the dequantized float32 weights, checks that they give back every weight bit for bit
(else the source is refused), and stores `X.weight` (4-bit values in GGUF's own nibble order, or
int8) with float32 `X.weight_block_scale` (d) and, for 4 bits, `X.weight_block_min` (m): other names
than int4/int8's, so no loader can read one as the other. Activations stay float32 (bf16 ones, or
bf16 scales, change SmolLM2's greedy tokens: docs/benchmarks.md). Each matmul dequantizes its matrix
a block of rows at a time (2 MiB of float32) and runs a float32 matmul on it: the source's weights
bit for bit, so the float32 split's tokens. The int4 kernel with float32 activations was measured
and not taken: about 3x slower than these blocks at one token, 24-28x at 16 (prefill)
(`python -m benchmarks.exact_matmul`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable

import torch
from torch import nn

from lambdasplit.errors import SourceError

EXACT = "gguf-exact"
SCHEMES = ("int8", "int4", EXACT)
SCALE, ZERO = "_scale", "_zero"
BLOCK_SCALE, BLOCK_MIN = "_block_scale", "_block_min"  # gguf-exact's d and m (distinct from int4/int8's names)
COMPANIONS = (SCALE, ZERO, BLOCK_SCALE, BLOCK_MIN)
GROUP = 32
_DEQUANT_BYTES = 1 << 21  # float32 rows dequantized at once by a gguf-exact 8-bit matrix (measured: docs/benchmarks.md)
_TABLES = ("embed_tokens.weight", "lm_head.weight")  # module and checkpoint keys both end so
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # int4 ranges tried per group (the smallest squared error wins)
_KERNEL_DTYPE = torch.bfloat16  # the CPU kernels' fast activation dtype (fp32 activations: 3-6x slower)


def check_scheme(name: str | None) -> str | None:
    """`name` if it is a quantization scheme (or None); a clear error otherwise."""
    if name is not None and name not in SCHEMES:
        raise SourceError(f"unknown --quantize {name!r}; choose one of {', '.join(SCHEMES)}")
    return name


def check_dtype(scheme: str | None, dtype: torch.dtype) -> None:
    """gguf-exact is exact only in float32 (its activations and scales); other dtypes are refused."""
    if scheme == EXACT and dtype != torch.float32:
        raise SourceError(f"--quantize {EXACT} computes in float32 (bf16 activations change the tokens); "
                          f"this run's dtype is {str(dtype).removeprefix('torch.')}: drop --dtype, or load a float32 "
                          f"or {EXACT} export (an exported part brings its own dtype)")


def split_companion(key: str) -> tuple[str, str]:
    """('X.weight', '_scale') for 'X.weight_scale'; (key, '') for any other key."""
    for suffix in COMPANIONS:
        if key.endswith(".weight" + suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def group_size(in_features: int) -> int:
    """int4 scales and zeros cover groups of 32 inputs: on SmolLM2 groups of 64 (128 where they divide)
    agreed with the float32 top-1 token on 80% of positions, groups of 32 on 99% (its projections have
    outlier inputs that a wider group's range spends its 16 levels on)."""
    if in_features % GROUP:
        raise SourceError(f"int4 needs input sizes divisible by {GROUP}; this part has a projection of {in_features}")
    return GROUP


def is_quantizable(key: str, tensor: torch.Tensor) -> bool:
    """The tensors a quantized part stores quantized: every 2-D floating `.weight` (projections, LM head,
    embeddings); norms and biases are 1-D and keep the part's dtype."""
    return key.endswith(".weight") and tensor.dim() == 2 and tensor.is_floating_point()


def scheme_for(key: str, scheme: str) -> str:
    """int4 parts keep the embeddings and the LM head in int8, as llama.cpp's Q4_K_M keeps its output
    matrix at 6 bits: the logits' error is what flips greedy tokens (docs/benchmarks.md)."""
    return "int8" if scheme == "int4" and key.endswith(_TABLES) else scheme


def quantize_weight(weight: torch.Tensor, scheme: str, key: str = "weight") -> dict[str, torch.Tensor]:
    """{'': values, '_scale': scales[, '_zero': zeros]} for a (out, in) weight (suffixes of its key);
    gguf-exact gives {'': values, '_block_scale': d[, '_block_min': m]} or refuses `key`."""
    w = weight.detach().float()
    if scheme == EXACT:
        return gguf_blocks(w, key)
    if scheme == "int8":
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(_KERNEL_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"": q, SCALE: scale}
    rows, cols = w.shape
    if rows % 16:
        raise SourceError(f"int4 needs output sizes divisible by 16; this part has a projection of {rows}")
    groups = w.reshape(rows, cols // group_size(cols), -1)
    q, scale, zero = _int4_grid(groups, _CLIP_RATIOS[0])
    error = _int4_error(groups, q, scale, zero)
    for ratio in _CLIP_RATIOS[1:]:  # a narrower range rounds most weights finer and clips a few outliers
        candidate = _int4_grid(groups, ratio)
        candidate_error = _int4_error(groups, *candidate)
        better = candidate_error < error
        error = torch.where(better, candidate_error, error)
        q = torch.where(better[..., None], candidate[0], q)
        scale, zero = torch.where(better, candidate[1], scale), torch.where(better, candidate[2], zero)
    q = q.reshape(rows, cols)
    return {"": q[:, 0::2] | (q[:, 1::2] << 4), SCALE: scale, ZERO: zero}


def _int4_error(groups: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Squared error per group of a 4-bit grid."""
    return ((groups - ((q.float() - 8) * scale.float()[..., None] + zero.float()[..., None])) ** 2).sum(-1)


def _int4_grid(groups: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit values, bf16 scales and zeros of (rows, groups, size) weights over [ratio*min, ratio*max]."""
    low, high = groups.amin(-1) * ratio, groups.amax(-1) * ratio
    scale = ((high - low) / 15).clamp(min=1e-12).to(_KERNEL_DTYPE)
    zero = (low + 8 * scale.float()).to(_KERNEL_DTYPE)  # the kernel dequantizes (q - 8) * scale + zero
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return q, scale, zero


def gguf_blocks(w: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """The GGUF block grid (4-bit, else 8-bit) that gives back every float32 weight of `w` exactly; a
    clear error when none does (not a GGUF source, or one in other types: Q4_K, Q5_0, Q6_K, F16 ...)."""
    rows, cols = w.shape
    if cols % GROUP:
        raise SourceError(f"{key}: --quantize {EXACT} needs input sizes divisible by {GROUP} (GGUF blocks); it has {cols}")
    groups = w.reshape(rows, cols // GROUP, GROUP)
    q4, d4, m4, exact4 = _four_bit_blocks(groups)
    if exact4.all():
        packed = q4[..., : GROUP // 2] | (q4[..., GROUP // 2:] << 4)  # GGUF's order: byte j holds weights j, j + 16
        return {"": packed.reshape(rows, cols // 2), BLOCK_SCALE: d4, BLOCK_MIN: m4}
    q8, d8 = _eight_bit_blocks(groups)
    exact8 = (d8[..., None] * q8.float() == groups).all(-1)
    if not exact8.all():
        off = int((~exact4 & ~exact8).sum())
        what = f"{off} of {exact8.numel()} blocks are on none" if off else "its blocks mix 4-bit and 8-bit grids"
        raise SourceError(
            f"{key} {tuple(w.shape)} is not on one GGUF block grid of {GROUP} (Q4_0, Q4_1, Q8_0): {what}. "
            f"--quantize {EXACT} needs a GGUF source stored in those types; int8 and int4 round any source")
    return {"": q8.reshape(rows, cols), BLOCK_SCALE: d8}


def _four_bit_blocks(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q 0..15 uint8, d, m, exact) with d*q + m == each weight of the `exact` blocks: Q4_1's grid (m
    the block's minimum, d its range / 15 rounded to the GGUF's fp16) or Q4_0's (m the weight of
    largest magnitude, at q = 0, and d = -m/8)."""
    low = groups.amin(-1)
    q1, d1 = _levels(groups, ((groups.amax(-1) - low) / 15).half().float(), low)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    q0, d0 = _levels(groups, -extreme / 8, extreme)
    exact1 = (d1[..., None] * q1 + low[..., None] == groups).all(-1)  # two roundings, as gguf's d * q + m
    exact0 = (d0[..., None] * q0 + extreme[..., None] == groups).all(-1)
    q = torch.where(exact1[..., None], q1, q0).to(torch.uint8)
    return q, torch.where(exact1, d1, d0), torch.where(exact1, low, extreme), exact1 | exact0


def _levels(groups: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest 4-bit levels (as float) of w = d*q + m, q in 0..15 (q = 0 where d = 0), and d."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((groups - m[..., None]) / safe[..., None]).clamp(0, 15)
    return torch.where(d[..., None] == 0, torch.zeros_like(q), q), d


def _eight_bit_blocks(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0's grid: d = the block's largest magnitude / 127, q = round(w / d) in -127..127 (int8)."""
    d = groups.abs().amax(-1) / 127
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.round(groups / safe[..., None]).clamp(-127, 127).to(torch.int8), d


def dequantize_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Float32 rows of gguf-exact values: d*q (8-bit) or d*q + m (packed 4-bit), as gguf computes them."""
    cols = q.shape[-1] * (2 if m is not None else 1)
    out = torch.empty(*q.shape[:-1], cols)
    return _dequantize_into(out.view(-1, cols), q.reshape(-1, q.shape[-1]), d.reshape(-1, d.shape[-1]),
                            None if m is None else m.reshape(-1, m.shape[-1])).view(out.shape)


def _dequantize_into(out: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Fill (rows, cols) float32 `out` with d*q [+ m] (two roundings, as gguf's d * q + m) and return it."""
    rows, groups = d.shape
    if m is None:
        out.copy_(q)
    else:  # a block's byte j holds its weights j (low nibble) and j + 16: two contiguous halves
        packed = q.view(rows, groups, GROUP // 2)
        out.view(rows, groups, 2, GROUP // 2).copy_(torch.stack([packed & 15, packed >> 4], dim=2))
    blocks = out.view(rows, groups, GROUP).mul_(d[..., None])
    if m is not None:
        blocks.add_(m[..., None])
    return out


def quantize_tensors(tensors: dict[str, torch.Tensor], scheme: str | None) -> dict[str, torch.Tensor]:
    """`tensors` with every quantizable weight replaced by its quantized entries (keys + suffixes)."""
    if scheme is None:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_quantizable(key, tensor):
            stored = quantize_weight(tensor, scheme_for(key, scheme), key)
            out.update({key + suffix: value for suffix, value in stored.items()})
        else:
            out[key] = tensor
    return out


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., in/2) uint8 -> (..., in) int32 values 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float values of quantized rows (int8 with per-row scales, or packed int4 with group scales/zeros)."""
    if zero is None:
        return q.float() * scale.float()[..., None]
    values = _unpack_int4(q).float()
    groups = values.unflatten(-1, (scale.shape[-1], -1))
    return ((groups - 8) * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)


def _kind_of(state: dict[str, torch.Tensor], key: str) -> str:
    """How one stored weight is quantized: int8, int4, or gguf-exact's q8 / q4 blocks."""
    if key + BLOCK_SCALE in state:
        return "q4" if key + BLOCK_MIN in state else "q8"
    return "int4" if key + ZERO in state else "int8"


def _register_weight(module: nn.Module, rows: int, cols: int, kind: str) -> None:
    """Empty (meta) buffers of a quantized (rows, cols) weight, filled by `load_state_dict(assign=True)`."""
    packed = kind in ("int4", "q4")
    module.register_buffer("weight", torch.empty(rows, cols // 2 if packed else cols,
                                                 dtype=torch.uint8 if packed else torch.int8, device="meta"))
    if kind == "int8":
        module.register_buffer("weight_scale", torch.empty(rows, device="meta"))
        return
    groups = cols // group_size(cols)
    names = ("weight_scale", "weight_zero") if kind == "int4" else ("weight_block_scale", "weight_block_min")
    for name in names[: 1 if kind == "q8" else 2]:
        module.register_buffer(name, torch.empty(rows, groups, device="meta"))


class QuantizedLinear(nn.Module):
    """A bias-free or biased Linear whose weight is int8, int4, or gguf-exact's q4 / q8 blocks (see the
    module docstring)."""

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        _register_weight(self, self.out_features, self.in_features, kind)
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None

    def prepare(self) -> None:
        """The kernel's forms: bf16 scales, and for int4 the CPU tile layout (made here, not stored,
        because it depends on the CPU's instruction set); the plain int4 values are then dropped.
        gguf-exact blocks need none: `forward` dequantizes them."""
        if self.kind == "int8":
            self._packed, self._scales = self.weight.contiguous(), self.weight_scale.to(_KERNEL_DTYPE).contiguous()
            self.weight = self.weight_scale = None
        elif self.kind == "int4":
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_int4(self.weight).contiguous(), 1)
            self._scales = torch.stack([self.weight_scale.t(), self.weight_zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
            self.weight = self.weight_scale = self.weight_zero = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("q4", "q8"):
            out = self._blockwise(x.reshape(-1, self.in_features).float())
        else:
            flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
            if self.kind == "int8":
                out = torch.ops.aten._weight_int8pack_mm(flat, self._packed, self._scales)
            else:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._packed, self.in_features // self._scales.shape[0], self._scales)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def _blockwise(self, flat: torch.Tensor) -> torch.Tensor:
        """flat @ W.T for gguf-exact blocks, W dequantized a block of rows at a time into one small
        buffer: the source's float32 weights bit for bit, without holding the float32 matrix. Faster
        than the int4 kernel with float32 activations (docs/benchmarks.md)."""
        rows = max(16, _DEQUANT_BYTES // (4 * self.in_features))
        buffer = flat.new_empty(min(rows, self.out_features), self.in_features)
        out = flat.new_empty(self.out_features, flat.shape[0])  # row blocks of W.x are contiguous here
        low = getattr(self, "weight_block_min", None)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            block = _dequantize_into(buffer[: stop - start], self.weight[start:stop], self.weight_block_scale[start:stop],
                                     None if low is None else low[start:stop])
            torch.mm(block, flat.t(), out=out[start:stop])
        return out.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class QuantizedEmbedding(nn.Module):
    """An embedding table stored quantized (int8, int4, q8 or q4 blocks); a lookup dequantizes only the
    rows it reads. Keeps a scaled embedding's factor (Gemma 3 multiplies by sqrt(D))."""

    def __init__(self, embedding: nn.Embedding, kind: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.kind = dtype, kind
        self.factor: float | None = getattr(embedding, "scalar_embed_scale", None)
        _register_weight(self, embedding.num_embeddings, embedding.embedding_dim, kind)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind in ("q4", "q8"):
            low = self.weight_block_min[ids] if self.kind == "q4" else None
            out = dequantize_blocks(self.weight[ids], self.weight_block_scale[ids], low).to(self.dtype)
        else:
            zero = self.weight_zero[ids] if self.kind == "int4" else None
            out = dequantize(self.weight[ids], self.weight_scale[ids], zero).to(self.dtype)
        return out if self.factor is None else out * torch.tensor(self.factor, dtype=self.dtype)


def prepare_quantized(module: nn.Module, state: dict[str, torch.Tensor], scheme: str | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Before `load_state_dict`: quantize the float weights of `state` if `scheme` is given, and swap
    every Linear/Embedding whose weight arrives quantized for its quantized module. Returns the state."""
    state = quantize_tensors(state, scheme)
    names = {name: child for name, child in module.named_modules()}
    scales = [(k, SCALE) for k in state if k.endswith(".weight" + SCALE)] + [
        (k, BLOCK_SCALE) for k in state if k.endswith(".weight" + BLOCK_SCALE)]
    for key, suffix in scales:
        name = key[: -len(".weight" + suffix)]
        found = names.get(name)
        kind = _kind_of(state, key[: -len(suffix)])
        if isinstance(found, nn.Linear):
            replacement: nn.Module = QuantizedLinear(found, kind)
        elif isinstance(found, nn.Embedding):
            replacement = QuantizedEmbedding(found, kind, dtype)
        else:
            raise SourceError(f"quantized tensor {key} belongs to no Linear or Embedding of this part")
        parent, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attribute, replacement)
    for key in [k for k in state if split_companion(k)[1]]:
        if not state[key].is_floating_point():
            raise SourceError(f"quantized tensor {key} must hold floating-point scales")
    return state


def finish_quantized(module: nn.Module, shared: Iterable[torch.Tensor] = ()) -> None:
    """After `load_state_dict`: make the kernels' forms of every quantized projection, and give a
    quantized part's tensors (except `shared` ones, already owned by another part) memory of their
    own. safetensors maps the whole file, and every page that packing read stays resident while any
    tensor still points into the mapping: without the copies a 7B-shaped int4 device part kept
    ~250 MiB of plain int4 pages besides their packed form (`python -m benchmarks device`)."""
    if not any(isinstance(child, (QuantizedLinear, QuantizedEmbedding)) for child in module.modules()):
        return
    kept = {tensor.data_ptr() for tensor in shared}

    def own(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.data_ptr() in kept else tensor.clone()

    for child in module.modules():
        if isinstance(child, QuantizedLinear):
            child.prepare()
            if child.kind == "int8":  # the kernel reads the stored values as they are
                child._packed, child._scales = own(child._packed), own(child._scales)
        for name, buffer in child._buffers.items():
            if buffer is not None:
                child._buffers[name] = own(buffer)
        for param in child._parameters.values():
            if param is not None:
                param.data = own(param.data)
    _trim_heap()


def _trim_heap() -> None:
    """Hand the int4 unpacking's freed scratch back to the OS (glibc keeps it in per-thread arenas:
    the same 7B-shaped int4 load left 509 to 590 MiB resident from run to run, 509 after a trim)."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def embedding_tensors(embedding: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """The tensors of the head's embedding under checkpoint key `key` (+ scale/zero when quantized),
    so that a tied LM head reuses them instead of reading them again."""
    tensors = {key: embedding.weight}
    for suffix in COMPANIONS:
        value = getattr(embedding, "weight" + suffix, None)
        if value is not None:
            tensors[key + suffix] = value
    return tensors


def estimated_kind(key: str, scheme: str) -> str:
    """The kind a weight gets under `scheme` before it is read: gguf-exact's is known only from the
    values, so it is estimated as the embedded GGUF's (4-bit projections, 8-bit embeddings/LM head)."""
    if scheme == EXACT:
        return "q8" if key.endswith(_TABLES) else "q4"
    return scheme_for(key, scheme)


def stored_bytes(shape: tuple[int, ...], kind: str | None, itemsize: int) -> int:
    """Bytes a tensor of `shape` takes in a part: quantized as `kind` (int8, int4, q8, q4) when it is 2-D."""
    numel = 1
    for dim in shape:
        numel *= dim
    if kind is None or len(shape) != 2:
        return numel * itemsize
    rows, cols = shape
    if kind == "int8":
        return numel + rows * 2
    groups = rows * (cols // group_size(cols))
    return {"int4": numel // 2 + groups * 4, "q4": numel // 2 + groups * 8, "q8": numel + groups * 4}[kind]
