"""The one binary frame both ends speak: a fixed 52-byte header followed by raw tensor bytes.

Header (little-endian):
    magic "LS" | version u8 | type u8 | codec u8 | dtype u8 | rank u8 | slot u8 |
    session id 16 bytes | sequence number u64 | shape 4 x u32 | payload length u32

Nothing is unpickled: a payload is either UTF-8 JSON (control messages) or the bytes of one tensor
in the stated codec, and every field is checked against limits before anything is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import torch

from lambdasplit.errors import LimitError, WireError
from lambdasplit.wire.codec import Codec, decode_tensor, encode_tensor, payload_size

MAGIC = b"LS"
VERSION = 1
MAX_RANK = 4
HEADER = struct.Struct("<2sBBBBBB16sQ4IL")
HEADER_SIZE = HEADER.size  # 52
SESSION_ID_BYTES = 16
NO_SESSION = bytes(SESSION_ID_BYTES)


class MsgType(IntEnum):
    HELLO = 1  # device -> cloud: JSON manifest, auth and wanted codec
    WELCOME = 2  # cloud -> device: JSON manifest and session id
    HIDDEN = 3  # hidden states (B, T, D), either direction
    MASK = 4  # attention-mask columns (B, T) for the next HIDDEN frame (prefill with padding)
    RESET = 5  # start a new sequence in this session
    ERROR = 6  # JSON {"code", "message"}
    CLOSE = 7
    TENSOR = 8  # a named tensor of a diffusion step (rank 1-4); the header's slot byte names it
    CROP = 9  # device -> cloud: JSON {"length": n}: keep only the first n positions of the body's KV
    TREE = 10  # device -> cloud: JSON {"parents": [...]}: the next HIDDEN frame (1, P, D) is a draft tree


class DType(IntEnum):
    """The logical dtype of a tensor frame (what the receiver rebuilds); BYTES marks JSON payloads."""

    BYTES = 0
    FLOAT32 = 1
    BFLOAT16 = 2
    FLOAT16 = 3
    UINT8 = 4


TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
    DType.UINT8: torch.uint8,
}
DTYPE_OF = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked against the header before a payload is touched."""

    max_payload: int = 64 << 20
    max_elements: int = 16 << 20
    hidden_size: int | None = None  # D, from the manifest
    max_tokens: int | None = None  # bound on T


@dataclass(frozen=True)
class Frame:
    type: MsgType
    session: bytes = NO_SESSION
    seq: int = 0
    codec: Codec = Codec.NONE
    dtype: DType = DType.BYTES
    shape: tuple[int, ...] = ()
    payload: bytes = b""
    slot: int = 0  # which tensor a TENSOR frame carries (lambdasplit.diffusion.protocol.Slot); 0 otherwise

    @property
    def size(self) -> int:
        """Bytes this frame takes on the wire."""
        return HEADER_SIZE + len(self.payload)

    def to_bytes(self) -> bytes:
        dims = tuple(self.shape) + (0,) * (MAX_RANK - len(self.shape))
        header = HEADER.pack(
            MAGIC, VERSION, self.type, self.codec, self.dtype, len(self.shape), self.slot,
            self.session, self.seq, *dims, len(self.payload),
        )
        return header + self.payload

    def tensor(self) -> torch.Tensor:
        """The tensor this frame carries, rebuilt in its logical dtype."""
        if self.dtype == DType.BYTES:
            raise WireError(f"{self.type.name} frame carries no tensor")
        return decode_tensor(self.payload, self.codec, TORCH_DTYPES[self.dtype], self.shape)


def tensor_frame(
    type_: MsgType, tensor: torch.Tensor, codec: Codec, session: bytes = NO_SESSION, seq: int = 0, slot: int = 0
) -> Frame:
    """Encode a tensor; floating tensors go through `codec`, others (masks) travel as raw uint8."""
    if tensor.dim() > MAX_RANK:
        raise WireError(f"tensor of rank {tensor.dim()} exceeds the frame's maximum rank {MAX_RANK}")
    if not tensor.is_floating_point():
        tensor, codec = tensor.to(torch.uint8), Codec.NONE
    if tensor.dtype not in DTYPE_OF:
        raise WireError(f"dtype {tensor.dtype} cannot be sent")
    payload = encode_tensor(tensor, codec)
    return Frame(type_, session, seq, codec, DTYPE_OF[tensor.dtype], tuple(tensor.shape), payload, slot)


def parse_frame(data: bytes, limits: Limits = Limits()) -> Frame:
    """Validate and parse one frame; any inconsistency raises WireError and nothing is allocated."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, type_, codec, dtype, rank, slot, session, seq, *rest = HEADER.unpack_from(data)
    dims, length = rest[:MAX_RANK], rest[MAX_RANK]
    if magic != MAGIC:
        raise WireError("bad magic: not a lambdasplit frame")
    if version != VERSION:
        raise WireError(f"protocol version {version} is not supported (this end speaks {VERSION})")
    try:
        type_, codec, dtype = MsgType(type_), Codec(codec), DType(dtype)
    except ValueError as exc:
        raise WireError(f"unknown header field: {exc}") from None
    if rank > MAX_RANK or any(dims[rank:]):
        raise WireError(f"bad rank {rank} for shape {dims}")
    if (slot != 0) != (type_ == MsgType.TENSOR):
        raise WireError("only TENSOR frames carry a slot, and they must name one")
    if type_ == MsgType.TENSOR and dtype == DType.BYTES:
        raise WireError("a TENSOR frame must carry a tensor")
    shape = tuple(dims[:rank])
    if length > limits.max_payload:
        raise WireError(f"payload of {length} bytes exceeds the limit of {limits.max_payload}")
    if len(data) != HEADER_SIZE + length:
        raise WireError(f"frame says {length} payload bytes but carries {len(data) - HEADER_SIZE}")
    if dtype != DType.BYTES:
        _check_tensor_header(type_, codec, dtype, shape, length, limits)
    elif codec != Codec.NONE or rank:
        raise WireError("a bytes frame must have codec none and rank 0")
    return Frame(type_, session, seq, codec, dtype, shape, bytes(data[HEADER_SIZE:]), slot)


def _check_tensor_header(
    type_: MsgType, codec: Codec, dtype: DType, shape: tuple[int, ...], length: int, limits: Limits
) -> None:
    if 0 in shape:
        # An empty tensor has nothing to compute on (and would fail deep inside the model): refuse it here.
        raise WireError(f"{type_.name} frame of shape {shape} has a zero dimension; every dimension must be at least 1")
    elements = 1
    for dim in shape:
        elements *= dim
    if elements > limits.max_elements:
        raise WireError(f"shape {shape} has {elements} elements, over the limit of {limits.max_elements}")
    if dtype == DType.UINT8 and codec != Codec.NONE:
        raise WireError("uint8 tensors travel uncoded")
    if dtype != DType.UINT8 and codec == Codec.NONE:
        raise WireError("floating tensors need a codec")
    if type_ == MsgType.HIDDEN:
        if dtype == DType.UINT8:
            raise WireError("hidden states must be floating point (fp32, bf16 or fp16)")
        if len(shape) != 3:
            raise WireError(f"hidden states must be (B, T, D), got shape {shape}")
        if limits.hidden_size is not None and shape[2] != limits.hidden_size:
            raise WireError(f"hidden size {shape[2]} does not match the model's D = {limits.hidden_size}")
        if limits.max_tokens is not None and shape[1] > limits.max_tokens:
            raise LimitError(
                f"{shape[1]} positions in one frame exceed the server's --max-context {limits.max_tokens}"
            )
    if type_ == MsgType.TENSOR and not shape:
        raise WireError("a TENSOR frame needs rank 1 to 4")
    if type_ == MsgType.MASK and (len(shape) != 2 or dtype != DType.UINT8):
        raise WireError(f"an attention mask must be uint8 (B, T), got {dtype.name} {shape}")
    expected = payload_size(codec, TORCH_DTYPES[dtype], shape)
    if length != expected:
        raise WireError(f"payload of {length} bytes does not match {codec.name} {shape} ({expected} bytes)")
