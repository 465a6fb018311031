"""Tensor codecs for the wire: fp32, bf16 and fp16 (exact for tensors already in that dtype) and
int8 with one fp32 scale per row of D (lossy: about 0.4% of each row's max magnitude)."""

from __future__ import annotations

import itertools
import math
from enum import IntEnum

import torch

from lambdasplit.errors import WireError


class Codec(IntEnum):
    NONE = 0  # raw bytes of a non-floating tensor (masks)
    FP32 = 1
    BF16 = 2
    FP16 = 3
    INT8 = 4  # lossy: int8 values + one float32 scale per row

    @property
    def lossy(self) -> bool:
        return self == Codec.INT8

    @classmethod
    def parse(cls, name: str) -> Codec:
        try:
            return cls[name.upper()]
        except KeyError:
            choices = ", ".join(c.name.lower() for c in cls if c != cls.NONE)
            raise WireError(f"unknown codec {name!r}; choose one of {choices}") from None


_WIRE_DTYPES = {Codec.FP32: torch.float32, Codec.BF16: torch.bfloat16, Codec.FP16: torch.float16}


def payload_size(codec: Codec, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` takes in `codec`; the receiver checks this before reading."""
    elements = math.prod(shape)  # on every frame: np.prod cost 5% of the event loop thread
    if codec == Codec.NONE:
        return elements * dtype.itemsize
    if codec == Codec.INT8:
        rows = elements // shape[-1] if shape and shape[-1] else 0
        return elements + 4 * rows
    return elements * _WIRE_DTYPES[codec].itemsize


def encode_tensor(tensor: torch.Tensor, codec: Codec) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if codec == Codec.NONE:
        return tensor.numpy().tobytes()
    if codec == Codec.INT8:
        rows = tensor.float().reshape(-1, tensor.shape[-1])
        scale = rows.abs().amax(dim=1).clamp(min=1e-30) / 127.0
        q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()
    wire = tensor.to(_WIRE_DTYPES[codec])
    # numpy has no bfloat16: move the raw 16-bit words.
    return wire.view(torch.int16).numpy().tobytes() if codec == Codec.BF16 else wire.numpy().tobytes()


def encode_tensors(tensors: list[torch.Tensor], codec: Codec) -> list[bytes]:
    """`encode_tensor` of each tensor; exact codecs convert and copy to the host once for all of
    them (one device-to-host copy and sync per server step instead of one per session)."""
    if codec in (Codec.NONE, Codec.INT8) or len(tensors) < 2:
        return [encode_tensor(t, codec) for t in tensors]
    flat = _back_to_back(tensors)
    if flat is None:
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    wire = flat.to(_WIRE_DTYPES[codec]).cpu()
    data = (wire.view(torch.int16) if codec == Codec.BF16 else wire).numpy().tobytes()
    ends = list(itertools.accumulate(t.numel() * wire.element_size() for t in tensors))
    return [data[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _back_to_back(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor that `tensors` tile in order, if they lie back to back in one buffer (a
    batched step's outputs: `Step.split` views); None otherwise. Encoding that buffer once saves a
    reshape per tensor and the copy of the concatenation."""
    first = tensors[0]
    end, total = first.data_ptr(), 0
    for tensor in tensors:
        if tensor.data_ptr() != end or tensor.dtype != first.dtype or not tensor.is_contiguous():
            return None
        end += tensor.numel() * tensor.element_size()
        total += tensor.numel()
    if first.storage_offset() + total > first.untyped_storage().nbytes() // first.element_size():
        return None  # adjacent, but not in one allocation: two tensors that merely border each other
    return first.detach().as_strided((total,), (1,))


def decode_tensor(payload: bytes | bytearray, codec: Codec, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of `payload`; a `bytearray` is used in place (the tensor may share its memory),
    `bytes` are copied (torch refuses read-only buffers)."""
    if len(payload) != payload_size(codec, dtype, shape):
        raise WireError(f"payload of {len(payload)} bytes does not fit {codec.name} {shape}")
    buffer = payload if isinstance(payload, bytearray) else bytearray(payload)
    if codec == Codec.NONE:
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if payload else torch.empty(shape, dtype=dtype)
    if codec == Codec.INT8:
        rows = math.prod(shape) // shape[-1] if shape[-1] else 0
        scale = torch.frombuffer(buffer, dtype=torch.float32, count=rows) if rows else torch.empty(0)
        q = torch.frombuffer(buffer, dtype=torch.int8, offset=4 * rows) if rows else torch.empty(0)
        return (q.float().reshape(rows, -1) * scale[:, None]).reshape(shape).to(dtype)
    if not payload:
        return torch.empty(shape, dtype=dtype)
    if codec == Codec.BF16:
        return torch.frombuffer(buffer, dtype=torch.int16).view(torch.bfloat16).reshape(shape).to(dtype)
    return torch.frombuffer(buffer, dtype=_WIRE_DTYPES[codec]).reshape(shape).to(dtype)
