"""Fuzz a body server with hostile frames on several connections while a victim device generates.

Each hostile connection opens a session (or spoils its own handshake), sends a burst of one to a
few hostile frames (bad dimensions, dtypes, sizes, sequence numbers and types, truncated frames,
huge shapes, NaNs, MASK/CROP/RESET abuse, text and garbage), then a probe: a sound HIDDEN frame.
Every burst must end, within the timeout, in the probe's reply or in the server closing the
connection cleanly (an ERROR frame and a close frame, or a close frame alone); a burst with
neither counts as no reply, a connection dropped without a close frame as unclean. Meanwhile a
victim device generates greedily on its own session, again and again: its tokens must equal the
in-process split's, without a single error or reconnect. The server must log no traceback.

    .venv/bin/python scripts/fuzz_server.py --seconds 300 --connections 4

starts `lambdasplit serve` (the embedded model unless --model) and exits non-zero on any failure;
tests/test_fuzz_server.py runs `fuzz` for ~20 s against a server in the test process.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import HEADER, MAGIC, VERSION, DType, Frame, Limits, MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, error_frame

PROBE_SEQ = 1 << 62  # probes count up from here; hostile frames use other sequence numbers
HOSTILE_CODECS = (Codec.FP32, Codec.BF16, Codec.FP16, Codec.INT8)
ANY_FRAME = Limits(max_payload=1 << 31, max_elements=1 << 31)  # what the fuzzer accepts from the server


@dataclass(frozen=True)
class Target:
    """The server under test and what a device says to it."""

    url: str
    token: str | None
    manifest: dict  # the device's part manifest, for HELLO
    hidden_size: int


@dataclass
class Session:
    """What a hostile connection knows about its session, to build frames that get far."""

    id: bytes
    limits: dict
    rng: random.Random
    rows: int | None = None  # B of the last sound HIDDEN frame (None: none since the last RESET)
    positions: int = 0
    probes: int = 0

    def seq(self) -> int:
        return self.rng.choice((0, 1, 7, (1 << 64) - 1, self.rng.randrange(1 << 32)))

    def cap(self, name: str, default: int) -> int:
        value = self.limits.get(name)
        return value if isinstance(value, int) and value > 0 else default


@dataclass
class FuzzReport:
    bursts: int = 0
    frames: int = 0
    replied: int = 0  # bursts whose probe was answered
    closed: int = 0  # bursts that ended in a clean close
    vanished: int = 0  # connections the fuzzer itself dropped mid-session
    no_reply: list[str] = field(default_factory=list)  # the bursts that got neither, by frame kinds
    unclean: list[str] = field(default_factory=list)  # connections dropped without a close frame
    failures: list[str] = field(default_factory=list)  # anything else that went wrong on the fuzzer's side
    kinds: Counter = field(default_factory=Counter)
    victim_runs: int = 0
    victim_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.no_reply or self.unclean or self.failures or self.victim_errors)

    def summary(self) -> str:
        return (f"{self.frames} hostile frames in {self.bursts} bursts: {self.replied} probes answered, "
                f"{self.closed} clean closes, {len(self.no_reply)} without a reply, {len(self.unclean)} unclean; "
                f"{self.vanished} connections dropped on purpose; victim: {self.victim_runs} generations, "
                f"{len(self.victim_errors)} errors")


# ---- frames ---------------------------------------------------------------------------------------


def raw(type_: int, s: Session, codec: int = Codec.NONE, dtype: int = DType.BYTES, shape: tuple[int, ...] = (),
        payload: bytes = b"", *, rank: int | None = None, length: int | None = None, slot: int = 0,
        magic: bytes = MAGIC, version: int = VERSION, session: bytes | None = None, seq: int | None = None) -> bytes:
    """A frame's bytes with any header field forced (what a hostile client can send)."""
    dims = (tuple(shape) + (0,) * 4)[:4]
    header = HEADER.pack(magic, version, type_, codec, dtype, len(shape) if rank is None else rank, slot,
                         s.id if session is None else session, s.seq() if seq is None else seq, *dims,
                         len(payload) if length is None else length)
    return header + payload


def hidden(s: Session, rows: int, length: int, width: int, codec: Codec = Codec.FP32, scale: float = 1.0,
           seq: int | None = None) -> bytes:
    states = torch.randn(rows, length, width, generator=torch.Generator().manual_seed(s.rng.randrange(1 << 31)))
    return tensor_frame(MsgType.HIDDEN, states * scale, codec, s.id, s.seq() if seq is None else seq).to_bytes()


def sound(s: Session, d: int, length: int | None = None, rows: int | None = None) -> bytes:
    """A HIDDEN frame the session can take (unless the context is full), in a random codec."""
    rows = rows or s.rows or s.rng.randint(1, min(3, s.cap("max_batch", 4)))
    most = max(1, min(16, s.cap("max_frame_positions", 64) // rows))
    length = length or s.rng.randint(1, most)
    s.rows, s.positions = rows, s.positions + length
    return hidden(s, rows, length, d, s.rng.choice(HOSTILE_CODECS))


def _json(s: Session, type_: MsgType, text: str | bytes) -> bytes:
    return raw(type_, s, payload=text.encode() if isinstance(text, str) else text)


def _hidden_attacks(s: Session, d: int) -> dict[str, Callable[[], bytes | str]]:
    r, rows = s.rng, s.rows or 1
    big = s.cap("max_batch", 4) + 1
    return {
        "hidden-sound": lambda: sound(s, d),
        "hidden-without-dims": lambda: _json(s, MsgType.HIDDEN, r.choice(['{"x": 1}', "", "[]", "\x00"])),
        "hidden-rank": lambda: (lambda shape: raw(MsgType.HIDDEN, s, Codec.FP32, DType.FLOAT32, shape,
                                                  bytes(4 * _count(shape))))(r.choice([(d,), (1, d), (1, 1, 1, d)])),
        "hidden-width": lambda: hidden(s, rows, 1, r.choice([1, d - 1, d + 1, 2 * d])),
        "hidden-uint8": lambda: raw(MsgType.HIDDEN, s, Codec.NONE, DType.UINT8, (rows, 1, d), bytes(rows * d)),
        "hidden-nonfinite": lambda: _nonfinite(s, rows, d),
        "hidden-huge-values": lambda: hidden(s, rows, 1, d, r.choice(HOSTILE_CODECS), scale=r.choice([1e4, 6e4, 1e30])),
        "hidden-truncated": lambda: hidden(s, rows, 2, d)[:-r.randint(1, 8)],
        "hidden-length-lie": lambda: (lambda f: f[:48] + struct.pack("<L", r.randrange(1 << 32)) + f[52:])(hidden(s, rows, 1, d)),
        "hidden-huge-shape": lambda: raw(MsgType.HIDDEN, s, Codec.FP32, DType.FLOAT32,
                                         (r.choice([1, 65535, 1 << 31]), r.choice([1 << 20, (1 << 32) - 1]), d), bytes(64)),
        "hidden-zero-dim": lambda: raw(MsgType.HIDDEN, s, Codec.FP32, DType.FLOAT32, r.choice([(0, 1, d), (1, 0, d)])),
        "hidden-too-many-rows": lambda: hidden(s, big, 1, d),
        "hidden-too-many-positions": lambda: hidden(s, 1, s.cap("max_frame_positions", 64) + 1, d),
        "hidden-rows-change": lambda: hidden(s, rows + 1 if rows < big - 1 else 1, 1, d),
        "hidden-int8-garbage": lambda: raw(MsgType.HIDDEN, s, Codec.INT8, DType.FLOAT32, (1, 1, d),
                                           r.randbytes(d + 4)),
        "hidden-seq-extreme": lambda: hidden(s, rows, 1, d, seq=r.choice([0, (1 << 64) - 1])),
    }


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _nonfinite(s: Session, rows: int, d: int) -> bytes:
    states = torch.randn(rows, 2, d)
    states.view(-1)[s.rng.randrange(states.numel())] = s.rng.choice([float("nan"), float("inf"), float("-inf")])
    return tensor_frame(MsgType.HIDDEN, states, s.rng.choice((Codec.FP32, Codec.BF16, Codec.FP16)), s.id, s.seq()).to_bytes()


def _reset(s: Session) -> bytes:
    s.rows, s.positions = None, 0
    return raw(MsgType.RESET, s)


def _mask(s: Session, values: torch.Tensor) -> bytes:
    return tensor_frame(MsgType.MASK, values.to(torch.uint8), Codec.NONE, s.id).to_bytes()


def _control_attacks(s: Session) -> dict[str, Callable[[], bytes | str]]:
    r, rows = s.rng, s.rows or 1
    crop = r.choice([-1, s.positions + 1, 1 << 70, "3", True, 1.5, None, [1], {"a": 1}])
    return {
        "mask-sound": lambda: _mask(s, torch.randint(0, 2, (rows, r.randint(1, 4)))),
        "mask-all-padding": lambda: _mask(s, torch.zeros(rows, r.randint(1, 3))),
        "mask-values": lambda: _mask(s, torch.full((rows, 1), r.randint(2, 255))),
        "mask-shape": lambda: raw(MsgType.MASK, s, Codec.NONE, DType.UINT8, r.choice([(3,), (1, 1, 1)]), b"\x01" * 3),
        "mask-float": lambda: tensor_frame(MsgType.MASK, torch.ones(rows, 1), Codec.FP32, s.id).to_bytes(),
        "mask-bytes": lambda: _json(s, MsgType.MASK, "{}"),
        "reset": lambda: _reset(s),
        "reset-payload": lambda: raw(MsgType.RESET, s, Codec.FP32, DType.FLOAT32, (1,), bytes(4)),
        "crop-sound": lambda: control_frame(MsgType.CROP, {"length": r.randint(0, s.positions)}, s.id).to_bytes(),
        "crop-bad-length": lambda: control_frame(MsgType.CROP, {"length": crop}, s.id).to_bytes(),
        "crop-missing": lambda: control_frame(MsgType.CROP, {}, s.id).to_bytes(),
        "crop-bad-json": lambda: _json(s, MsgType.CROP, r.choice(["{", "[1]", "NaN", '{"length": 1e400}', "\"x\""])),
        "crop-deep-json": lambda: _json(s, MsgType.CROP, "[" * 5000 + "]" * 5000),
        "crop-not-utf8": lambda: _json(s, MsgType.CROP, b"\xff\xfe{}"),
        "crop-tensor": lambda: raw(MsgType.CROP, s, Codec.NONE, DType.UINT8, (1,), b"\x01"),
        "tensor-to-text": lambda: tensor_frame(MsgType.TENSOR, torch.zeros(1, 4), Codec.FP32, s.id,
                                               slot=r.randint(1, 9)).to_bytes(),
        "hello-mid-session": lambda: control_frame(MsgType.HELLO, {"protocol": PROTOCOL}, s.id).to_bytes(),
        "welcome-mid-session": lambda: control_frame(MsgType.WELCOME, {"session": s.id.hex()}, s.id).to_bytes(),
        "error-mid-session": lambda: error_frame("capacity", "go away\n\x1b[2J", s.id, retry_after=1e9).to_bytes(),
        "another-session": lambda: raw(MsgType.RESET, s, session=r.randbytes(16)),
        "bad-magic": lambda: raw(MsgType.RESET, s, magic=b"XX"),
        "bad-version": lambda: raw(MsgType.RESET, s, version=r.choice([0, 2, 255])),
        "unknown-type": lambda: raw(r.choice([0, 10, 99, 255]), s),
        "unknown-codec": lambda: raw(MsgType.HIDDEN, s, r.choice([5, 200]), DType.FLOAT32, (1, 1, 8), bytes(32)),
        "unknown-dtype": lambda: raw(MsgType.HIDDEN, s, Codec.FP32, r.choice([5, 9, 255]), (1, 1, 8), bytes(32)),
        "rank-over-four": lambda: raw(MsgType.HIDDEN, s, Codec.FP32, DType.FLOAT32, (1, 1, 8), bytes(32), rank=5),
        "slot-on-hidden": lambda: raw(MsgType.RESET, s, slot=r.randint(1, 255)),
        "short": lambda: r.randbytes(r.randint(0, 51)),
        "text": lambda: r.choice(["hello", "", "\x00" * 60, json.dumps({"type": "HIDDEN"})]),
        "garbage": lambda: r.randbytes(r.randint(52, 600)),
        "close": lambda: raw(MsgType.CLOSE, s),
        # Past the server's message size (only where it is small enough to send often).
        **({"oversize": lambda: r.randbytes(s.cap("max_frame_bytes", 0) + 53)}
           if 0 < s.cap("max_frame_bytes", 0) <= 4 << 20 else {}),
    }


def attacks(s: Session, d: int) -> dict[str, Callable[[], bytes | str]]:
    """Every kind of hostile frame, by name (a fresh set per burst: they read the session's state)."""
    return {**_hidden_attacks(s, d), **_control_attacks(s)}


HANDSHAKE_ATTACKS: dict[str, Callable[[random.Random, dict], bytes | str]] = {
    "hello-protocol": lambda r, m: control_frame(MsgType.HELLO, {"protocol": r.choice([0, 2, "1", None]), "manifest": m}).to_bytes(),
    "hello-manifest": lambda r, m: control_frame(MsgType.HELLO, {"protocol": PROTOCOL, "manifest": {
        **m, r.choice(list(m)): r.choice([None, -1, "x" * 300, [], {"a": 1}])}}).to_bytes(),
    "hello-codec": lambda r, m: control_frame(MsgType.HELLO, {"protocol": PROTOCOL, "manifest": m,
                                                              "codec": r.choice(["fp64", "", 7])}).to_bytes(),
    "hello-not-json": lambda r, m: Frame(MsgType.HELLO, payload=r.randbytes(40)).to_bytes(),
    "hidden-first": lambda r, m: tensor_frame(MsgType.HIDDEN, torch.zeros(1, 1, 8), Codec.FP32).to_bytes(),
    "error-first": lambda r, m: error_frame("auth", "I am the server").to_bytes(),
    "text-first": lambda r, m: "HELLO",
    "garbage-first": lambda r, m: r.randbytes(r.randint(0, 200)),
}


# ---- connections ----------------------------------------------------------------------------------


def _open(target: Target) -> ClientConnection:
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else None
    return connect(target.url.rstrip("/") + BODY_PATH, additional_headers=headers, compression=None,
                   open_timeout=30, max_size=None, proxy=None)


def _hello(target: Target) -> bytes:
    return control_frame(MsgType.HELLO, {"protocol": PROTOCOL, "manifest": target.manifest, "codec": "fp32"}).to_bytes()


def outcome(ws: ClientConnection, probe_seq: int | None, timeout: float) -> str:
    """"replied" (the probe's reply came), "closed" (the server closed with a close frame), "unclean"
    (the connection dropped without one) or "no-reply" (nothing within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "no-reply"
        try:
            message = ws.recv(timeout=left)
        except TimeoutError:
            return "no-reply"
        except ConnectionClosed as closed:
            return "closed" if closed.rcvd is not None else "unclean"
        if isinstance(message, str):
            continue
        frame = parse_frame(message, ANY_FRAME)
        if probe_seq is not None and frame.type == MsgType.HIDDEN and frame.seq == probe_seq:
            return "replied"


def _send_all(ws: ClientConnection, messages: list[bytes | str]) -> None:
    for message in messages:
        try:
            ws.send(message)
        except ConnectionClosed:
            return  # the server closed on an earlier message: `outcome` reads how


def _vanish(ws: ClientConnection) -> None:
    try:
        ws.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    ws.socket.close()


def hostile(target: Target, rng: random.Random, deadline: float, timeout: float, report: FuzzReport) -> None:
    """One hostile connection after another until `deadline`."""
    while time.monotonic() < deadline:
        try:
            with _open(target) as ws:
                _connection(ws, target, rng, deadline, timeout, report)
        except Exception as exc:  # noqa: BLE001 - a fuzzer that stops early must say why
            report.failures.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}")
            return


def _connection(ws: ClientConnection, target: Target, rng: random.Random, deadline: float, timeout: float,
                report: FuzzReport) -> None:
    """A spoilt handshake, or a session and its bursts."""
    if rng.random() < 0.1:
        name, attack = rng.choice(list(HANDSHAKE_ATTACKS.items()))
        _send_all(ws, [attack(rng, target.manifest)])
        _record(report, [name], outcome(ws, None, timeout), ws)
        return
    ws.send(_hello(target))
    welcome = parse_frame(ws.recv(timeout=timeout), ANY_FRAME)
    if welcome.type != MsgType.WELCOME:
        raise AssertionError(f"a sound HELLO got {welcome.type.name}: {welcome.payload[:300]!r}")
    limits = json.loads(welcome.payload).get("limits") or {}
    _session(ws, Session(welcome.session, limits, rng), target, deadline, timeout, report)


def _session(ws: ClientConnection, s: Session, target: Target, deadline: float, timeout: float,
             report: FuzzReport) -> None:
    """Bursts on one session until the server closes it (or the fuzzer drops it)."""
    d = target.hidden_size
    while time.monotonic() < deadline:
        if s.rng.random() < 0.02:
            _vanish(ws)
            with report.lock:
                report.vanished += 1
            return
        kinds = attacks(s, d)
        # A third sound frames, so sessions live long enough for the attacks that need history.
        names = [s.rng.choice(list(kinds)) if s.rng.random() > 0.3 else "hidden-sound"
                 for _ in range(s.rng.choice((1, 1, 1, 2, 3, 5)))]
        messages = [kinds[name]() for name in names]
        s.probes += 1
        probe = PROBE_SEQ + s.probes
        messages.append(hidden(s, s.rows or 1, 1, d, seq=probe))
        _send_all(ws, messages)
        result = outcome(ws, probe, timeout)
        _record(report, names, result, ws)
        if result != "replied":
            return


def _record(report: FuzzReport, names: list[str], result: str, ws: ClientConnection) -> None:
    with report.lock:
        report.bursts += 1
        report.frames += len(names)
        report.kinds.update(names)
        if result == "replied":
            report.replied += 1
        elif result == "closed":
            report.closed += 1
        elif result == "unclean":
            report.unclean.append("+".join(names))
        else:
            report.no_reply.append("+".join(names))
            _vanish(ws)


def victim(generate: Callable[[int], list[int]], expected: list[list[int]], deadline: float,
           report: FuzzReport) -> None:
    """Generate the expected answers in turn until `deadline`; any error or difference is a failure."""
    run = 0
    while time.monotonic() < deadline:
        try:
            tokens = generate(run % len(expected))
        except Exception as exc:  # noqa: BLE001 - every error is what the fuzz looks for
            report.victim_errors.append(f"run {run}: {type(exc).__name__}: {exc}")
            return
        if tokens != expected[run % len(expected)]:
            report.victim_errors.append(f"run {run}: tokens {tokens} != {expected[run % len(expected)]}")
        report.victim_runs += 1
        run += 1


def fuzz(target: Target, seconds: float, connections: int, seed: int, timeout: float,
         generate: Callable[[int], list[int]] | None = None, expected: list[list[int]] | None = None) -> FuzzReport:
    """Run `connections` hostile connections (and the victim, if given) for `seconds`."""
    report = FuzzReport()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=hostile, args=(target, random.Random(seed * 1000 + i), deadline, timeout, report),
                                name=f"hostile-{i}", daemon=True) for i in range(connections)]
    if generate is not None and expected is not None:
        threads.append(threading.Thread(target=victim, args=(generate, expected, deadline, report), name="victim",
                                        daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 4 * timeout + 60)
        if thread.is_alive():
            report.no_reply.append(f"{thread.name} still running after the fuzz")
    return report


# ---- the script -----------------------------------------------------------------------------------


PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "Write a haiku about the sea."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2)")
    parser.add_argument("--split", default="2,2", help="K,M")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--connections", type=int, default=4, help="hostile connections at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a burst may take to be answered")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per victim generation")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra option for `lambdasplit serve` (repeat it), e.g. --serve-arg=--engine-process")
    args = parser.parse_args()

    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.device.remote import RemoteBody
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.engine.local import load_local_body

    split = tuple(int(x) for x in args.split.split(","))
    runtime = SplitRuntime.load(args.model, split)
    options = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = [runtime.encode(p, raw=True)[0] for p in PROMPTS]
    local = load_local_body(args.model, split)
    expected = [runtime.generate_ids(local, ids, None, options).token_ids[0] for ids in prompts]
    local.scheduler.shutdown()
    problems: list[str] = []

    def watch(line: str) -> None:
        if re.search(r"Traceback|failed a step|compute thread stopped", line):
            problems.append(line.rstrip())

    serve_args = ["--split", args.split, *(["--model", args.model] if args.model else []), *args.serve_arg]
    with ServerProcess(*serve_args, on_line=watch) as server:
        body = RemoteBody(server.url, runtime.manifest, Codec.FP32, reconnect_window=0)
        target = Target(server.url, None, runtime.manifest.as_dict(), runtime.manifest.hidden_size)
        report = fuzz(target, args.seconds, args.connections, args.seed, args.timeout,
                      lambda i: runtime.generate_ids(body, prompts[i], None, options).token_ids[0], expected)
        body.close()
        if body.reconnects:
            report.victim_errors.append(f"the victim reconnected {body.reconnects} times")
    print(report.summary())
    for name, count in sorted(report.kinds.items()):
        print(f"  {name:28s} {count}")
    for line in report.no_reply + report.unclean + report.failures + report.victim_errors + problems:
        print("FAIL", line)
    return 0 if report.ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
