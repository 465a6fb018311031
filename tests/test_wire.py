"""Frames and codecs: exact round trips, honest lossy int8, and refusal of malformed input."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdasplit.errors import WireError
from lambdasplit.wire.codec import Codec, encode_tensor, encode_tensors
from lambdasplit.wire.frame import HEADER_SIZE, Frame, Limits, MsgType, parse_frame, tensor_frame


def test_header_is_small_and_fixed():
    assert HEADER_SIZE == 52
    frame = tensor_frame(MsgType.HIDDEN, torch.zeros(1, 1, 576, dtype=torch.bfloat16), Codec.BF16)
    assert len(frame.to_bytes()) == HEADER_SIZE + 576 * 2


@pytest.mark.parametrize("codec,dtype", [(Codec.FP32, torch.float32), (Codec.BF16, torch.bfloat16), (Codec.FP16, torch.float16)])
def test_lossless_codecs_round_trip_exactly(codec, dtype):
    x = torch.randn(2, 5, 64).to(dtype)
    frame = parse_frame(tensor_frame(MsgType.HIDDEN, x, codec, b"s" * 16, 7).to_bytes())
    assert frame.seq == 7 and frame.session == b"s" * 16
    assert torch.equal(frame.tensor(), x)


def test_int8_is_lossy_but_close_per_row():
    x = torch.randn(3, 4, 64) * torch.linspace(0.1, 10, 4)[None, :, None]
    y = parse_frame(tensor_frame(MsgType.HIDDEN, x, Codec.INT8).to_bytes()).tensor()
    assert Codec.INT8.lossy and not torch.equal(x, y)
    row_max = x.abs().amax(-1, keepdim=True)
    assert ((x - y).abs() <= row_max / 254 + 1e-6).all()


def test_mask_travels_raw():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    frame = parse_frame(tensor_frame(MsgType.MASK, mask, Codec.FP32).to_bytes())
    assert frame.codec == Codec.NONE and torch.equal(frame.tensor().long(), mask)


def _hidden(b=1, t=1, d=64):
    return tensor_frame(MsgType.HIDDEN, torch.zeros(b, t, d), Codec.FP32).to_bytes()


@pytest.mark.parametrize(
    "data,limits,match",
    [
        (b"LS\x01", Limits(), "shorter"),
        (b"XX" + _hidden()[2:], Limits(), "magic"),
        (_hidden()[:2] + b"\x09" + _hidden()[3:], Limits(), "version"),
        (_hidden()[:-1], Limits(), "carries"),
        (_hidden(d=32), Limits(hidden_size=64), "hidden size"),
        (_hidden(t=9), Limits(max_tokens=8), "positions"),
        (_hidden(t=64), Limits(max_payload=1000), "exceeds"),
    ],
)
def test_malformed_frames_are_refused(data, limits, match):
    with pytest.raises(WireError, match=match):
        parse_frame(data, limits)


def test_lying_shape_is_refused_before_allocating():
    good = bytearray(_hidden())
    struct.pack_into("<4I", good, 32, 1 << 30, 1 << 30, 64, 0)  # huge B and T, same small payload
    with pytest.raises(WireError, match="elements"):
        parse_frame(bytes(good))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(data):
    try:
        frame = parse_frame(data, Limits(hidden_size=64, max_tokens=16))
    except WireError:
        return
    if frame.dtype:
        frame.tensor()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_flipped_header_bytes_are_caught_or_consistent(position, value):
    data = bytearray(_hidden(t=2))
    data[position] = value
    try:
        frame = parse_frame(bytes(data), Limits(hidden_size=64, max_tokens=16))
    except WireError:
        return
    if frame.dtype:
        assert tuple(frame.tensor().shape) == frame.shape


def test_bytes_frame_round_trip():
    frame = parse_frame(Frame(MsgType.ERROR, payload=b'{"message": "x"}').to_bytes())
    assert frame.type == MsgType.ERROR and frame.payload == b'{"message": "x"}'


@pytest.mark.parametrize("codec", [Codec.FP32, Codec.BF16, Codec.FP16, Codec.INT8])
def test_tensors_encoded_together_equal_each_encoded_alone(codec):
    """The server encodes a step's replies in one conversion and host copy; the bytes must be the
    ones encode_tensor gives each reply alone (shapes of a decode step and of a prefill)."""
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(1, 1, 24, generator=gen), torch.randn(3, 5, 24, generator=gen).bfloat16(),
               torch.randn(2, 1, 24, generator=gen)]
    assert encode_tensors(tensors, codec) == [encode_tensor(t, codec) for t in tensors]
