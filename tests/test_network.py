"""The body over real sockets on 127.0.0.1: exactness, security, isolation, replay, limits."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import AuthError, CapacityError, LambdaSplitError, MismatchError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import BODY_PATH, control_frame

TOKEN = "correct-horse-battery-staple-0123"
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    with ServerProcess("--model", str(llama), "--split", "2,2", "--token-file", str(token_file)) as proc:
        yield proc


@pytest.fixture(scope="module")
def runtime(llama):
    return SplitRuntime.load(llama, (2, 2))


def remote(runtime, url, **kwargs) -> RemoteBody:
    kwargs.setdefault("token", TOKEN)
    # A TLS + WebSocket handshake once took over the 10 s default on the busy 2-core CI machine.
    kwargs.setdefault("connect_timeout", 30.0)
    return RemoteBody(url, runtime.manifest, **kwargs)


def local_ids(runtime, llama, ids=IDS, codec=Codec.FP32, n=12):
    body = load_local_body(llama, (2, 2), codec=codec)
    return runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=n)).token_ids


@pytest.mark.parametrize("codec", [Codec.FP32, Codec.BF16, Codec.INT8])
def test_remote_equals_in_process(server, runtime, llama, codec):
    body = remote(runtime, server.url, codec=codec)
    result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=12))
    body.close()
    assert result.token_ids == local_ids(runtime, llama, codec=codec)
    assert result.bytes_to_cloud == result.bytes_from_cloud > 0


def test_batch_with_padding_over_the_network(server, runtime, llama):
    ids, mask = runtime.encode(["Hi", "A much longer prompt with many more tokens"])
    body = remote(runtime, server.url)
    ours = runtime.generate_ids(body, ids, mask, SamplingParams(max_new_tokens=8)).token_ids
    local = runtime.generate_ids(load_local_body(llama, (2, 2)), ids, mask, SamplingParams(max_new_tokens=8)).token_ids
    assert ours == local


@pytest.mark.parametrize("token,needle", [(None, "401"), ("wrong-token-wrong-token", "401")])
def test_missing_or_wrong_token_is_refused(server, runtime, token, needle):
    body = remote(runtime, server.url, token=token)
    with pytest.raises(AuthError, match=needle):
        runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=2))


def test_manifest_mismatch_is_refused_on_both_sides(server, llama):
    other = SplitRuntime.load(llama, (1, 1))
    body = remote(other, server.url)
    with pytest.raises(MismatchError, match="do not match"):
        other.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=2))
    assert server.printed("do not match")  # logged after the reply is sent: poll, do not race it


def _raw_session(server, runtime):
    ws = connect(server.url + BODY_PATH, additional_headers={"Authorization": f"Bearer {TOKEN}"}, compression=None)
    hello = {"protocol": 1, "manifest": runtime.manifest.as_dict(), "codec": "fp32"}
    ws.send(control_frame(MsgType.HELLO, hello).to_bytes())
    welcome = parse_frame(ws.recv(timeout=10))
    assert welcome.type == MsgType.WELCOME
    return ws, welcome.session


def _expect_error(ws) -> str:
    reply = parse_frame(ws.recv(timeout=10))
    assert reply.type == MsgType.ERROR
    return json.loads(reply.payload)["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=0, max_size=300))
def test_random_bytes_get_an_error_frame(server, runtime, garbage):
    ws, _ = _raw_session(server, runtime)
    ws.send(garbage)
    assert _expect_error(ws)
    ws.close()


@pytest.mark.parametrize("kind", ["truncated", "lying_length", "huge_shape", "wrong_d", "other_session", "text"])
def test_malformed_frames_close_only_that_session(server, runtime, kind):
    ws, session = _raw_session(server, runtime)
    good = tensor_frame(MsgType.HIDDEN, torch.zeros(1, 2, 64), Codec.FP32, session, 1).to_bytes()
    bad = {
        "truncated": good[:40],
        "lying_length": good[:48] + (10**6).to_bytes(4, "little") + good[52:],
        "huge_shape": good[:32] + (1 << 30).to_bytes(4, "little") + good[36:],
        "wrong_d": tensor_frame(MsgType.HIDDEN, torch.zeros(1, 2, 32), Codec.FP32, session, 1).to_bytes(),
        "other_session": tensor_frame(MsgType.HIDDEN, torch.zeros(1, 2, 64), Codec.FP32, b"x" * 16, 1).to_bytes(),
        "text": "hello",
    }[kind]
    ws.send(bad)
    assert _expect_error(ws)
    ws.close()
    with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=5) as response:
        assert response.read() == b"ok\n"


def test_eight_concurrent_sessions_match_their_solo_runs(server, runtime, llama):
    prompts = [torch.tensor([[1, 100 + i, 200 + 3 * i, 300, 400 + i]]) for i in range(8)]
    solo = [local_ids(runtime, llama, p, n=10) for p in prompts]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            dev = SplitRuntime.load(llama, (2, 2))  # each device has its own head/tail caches
            body = remote(dev, server.url)
            results[i] = dev.generate_ids(body, prompts[i], None, SamplingParams(max_new_tokens=10)).token_ids
            body.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def vandal() -> None:
        for _ in range(5):
            ws, session = _raw_session(server, runtime)
            ws.send(tensor_frame(MsgType.HIDDEN, torch.zeros(1, 2, 32), Codec.FP32, session, 1).to_bytes())
            _expect_error(ws)
            ws.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)] + [threading.Thread(target=vandal)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [results[i] for i in range(8)] == solo


def test_kill_and_restart_replays_to_identical_output(llama, tmp_path, runtime):
    expected = local_ids(runtime, llama, n=16)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ("--model", str(llama), "--split", "2,2", "--token-file", str(token_file))
    first = ServerProcess(*args)
    body = remote(runtime, first.url, reconnect_window=120, backoff=0.2)
    restarted: list[ServerProcess] = []
    tokens: list[int] = []

    def on_tokens(step: list[list[int]]) -> None:
        tokens.extend(step[0])
        if len(tokens) == 7:
            first.kill()
            restarted.append(ServerProcess(*args, port=first.port))

    try:
        runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=16), on_tokens=on_tokens)
    finally:
        body.close()
        first.stop()
        for proc in restarted:
            proc.stop()
    assert body.reconnects == 1
    assert [tokens] == expected


def test_idle_session_expires_and_the_device_recovers(llama, runtime):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--session-ttl", "1") as proc:
        body = remote(runtime, proc.url, token=None)
        tokens: list[int] = []

        def on_tokens(step: list[list[int]]) -> None:
            tokens.extend(step[0])
            if len(tokens) == 1:  # idle after the first token until the server expires the session
                assert proc.printed("expired"), "the server never expired the idle session"

        runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=8), on_tokens=on_tokens)
        body.close()
        assert any("expired" in line for line in proc.output)
    assert body.reconnects == 1
    assert [tokens] == local_ids(runtime, llama, n=8)


def test_max_sessions_refuses_with_a_clear_error(llama, runtime):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--max-sessions", "1") as proc:
        first = remote(runtime, proc.url, token=None)
        runtime.generate_ids(first, IDS, None, SamplingParams(max_new_tokens=2))
        second = remote(runtime, proc.url, token=None, reconnect_window=1.0)
        with pytest.raises(CapacityError, match="limit of 1 sessions"):
            SplitRuntime.load(runtime.opened.checkpoint.path, (2, 2)).generate_ids(
                second, IDS, None, SamplingParams(max_new_tokens=2)
            )
        first.close()


def test_tls_with_the_generated_ca(llama, runtime, tmp_path):
    from lambdasplit.security import make_certificates

    paths = make_certificates(tmp_path, ["localhost", "127.0.0.1"])
    args = ("--model", str(llama), "--split", "2,2", "--tls-cert", str(paths["cert"]), "--tls-key", str(paths["key"]))
    with ServerProcess(*args) as proc:
        assert proc.url.startswith("wss://")
        body = remote(runtime, proc.url, token=None, tls_ca=paths["ca"])
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=6))
        body.close()
        assert result.token_ids == local_ids(runtime, llama, n=6)
        untrusted = remote(runtime, proc.url, token=None)
        with pytest.raises(LambdaSplitError, match="TLS"):
            runtime.generate_ids(untrusted, IDS, None, SamplingParams(max_new_tokens=2))


def test_metrics_count_what_crossed(llama, runtime):
    with ServerProcess("--model", str(llama), "--split", "2,2") as proc:
        body = remote(runtime, proc.url, token=None)
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=5))
        body.close()
        url = proc.url.replace("ws://", "http://") + "/metrics"
        deadline = time.monotonic() + 30
        while "lambdasplit_sessions_active 0.0" not in (text := urllib.request.urlopen(url, timeout=5).read().decode()):
            assert time.monotonic() < deadline, "the session was never closed"
            time.sleep(0.05)  # polling until the server has closed the session
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["lambdasplit_tokens_served_total"] == IDS.shape[1] + 4
    assert values["lambdasplit_bytes_out_total"] == result.bytes_from_cloud
    assert values["lambdasplit_sessions_total"] == 1
    assert 'lambdasplit_step_seconds_quantile{quantile="0.5"}' in text


@pytest.mark.parametrize("loop", ["--uvloop", "--no-uvloop"])
def test_ctrl_c_stops_the_server_with_a_session_open(llama, runtime, loop):
    """SIGINT ends `serve` on either event loop, also while a device holds a session."""
    with ServerProcess("--model", str(llama), "--split", "2,2", loop) as proc:
        body = remote(runtime, proc.url, token=None)
        assert runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=2)).token_ids == local_ids(runtime, llama, n=2)
        assert proc.stop(grace=30) == 130  # SIGINT first; 130 is the CLI's exit status for an interrupt
        body.close()


def test_non_loopback_bind_needs_a_token(llama):
    with pytest.raises(LambdaSplitError, match="without authentication"):
        ServerProcess("--model", str(llama), "--split", "2,2", "--host", "0.0.0.0")


def test_exported_parts_on_both_sides(llama, tmp_path):
    from lambdasplit.split.export import export_parts

    parts = export_parts(llama, (2, 2), tmp_path)
    runtime = SplitRuntime.load(parts["device"])
    with ServerProcess("--part", str(parts["cloud"])) as proc:
        body = remote(runtime, proc.url, token=None)
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=10))
        body.close()
    assert result.token_ids == local_ids(SplitRuntime.load(llama, (2, 2)), llama, n=10)


def test_randomised_split_server_hosts_every_k_in_its_range(llama):
    """`--split 1-3,2`: one server, three bodies on shared weights; each device's K gets its own."""
    from tests.conftest import oracle

    want = oracle(llama).generate(IDS, max_new_tokens=8, do_sample=False)[0, IDS.shape[1]:].tolist()
    with ServerProcess("--model", str(llama), "--split", "1-3,2") as proc:
        assert "or from 3 per session" in "".join(proc.output)
        for k in (1, 2, 3):
            runtime = SplitRuntime.load(llama, (k, 2))
            body = remote(runtime, proc.url, token=None)
            result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=8))
            body.close()
            assert result.token_ids[0] == want, k
        outside = SplitRuntime.load(llama, (4, 1))  # (4, 2) would leave no body at all
        with pytest.raises(LambdaSplitError, match="starting at layers 1, 2, 3"):
            remote(outside, proc.url, token=None).forward(outside.head(IDS))


def test_split_range_parsing():
    from lambdasplit.errors import SplitError
    from lambdasplit.split.spec import SplitChoice

    assert SplitChoice.parse("2,2") == SplitChoice(2, 2, 2) and not SplitChoice.parse("2,2").ranged
    assert SplitChoice.parse("1-4, 2") == SplitChoice(1, 4, 2)
    with pytest.raises(SplitError, match="must rise"):
        SplitChoice.parse("4-1,2")


# ---- control messages (wire/protocol.py) ----------------------------------------------------------

@pytest.mark.parametrize("code,cls", [
    ("auth", "AuthError"), ("capacity", "CapacityError"), ("protocol", "ProtocolError"), ("limit", "LimitError"),
    ("mismatch", "MismatchError"), ("expired", "ExpiredError"), ("compute", "ComputeError"), ("bogus", "ProtocolError"),
])
def test_an_error_frame_raises_the_typed_remote_error(code, cls):
    from lambdasplit import errors
    from lambdasplit.wire.protocol import error_frame, read_control

    frame = error_frame(code, "full up\nsecond line", retry_after=2.5 if code == "capacity" else None)
    with pytest.raises(errors.RemoteError) as info:
        read_control(frame, MsgType.WELCOME)
    assert type(info.value).__name__ == cls
    assert isinstance(info.value, LambdaSplitError)
    assert str(info.value) == f"the body server refused: full up second line [{code}]"
    assert info.value.retry_after == (2.5 if code == "capacity" else None)


@pytest.mark.parametrize("payload,needle", [
    (b"[" * 1000 + b"]" * 1000, "nested 33 deep"),
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested 33 deep"),
    (b'{"retry_after": 1e400}', "out of range"),
    (b'{"x": -1e400}', "out of range"),
    (b'{"x": NaN}', "NaN is not a JSON number"),
    (b'{"x": Infinity}', "Infinity is not a JSON number"),
    (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"x": "' + b"a" * (70 << 10) + b'"}', "control message too large"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
])
@pytest.mark.parametrize("type_", [MsgType.WELCOME, MsgType.ERROR])
def test_hostile_control_json_is_a_wire_error(payload, needle, type_):
    from lambdasplit.errors import WireError
    from lambdasplit.wire.frame import Frame
    from lambdasplit.wire.protocol import read_control

    with pytest.raises(WireError, match=needle):
        read_control(Frame(type_, payload=payload), MsgType.WELCOME)


def test_nesting_inside_strings_is_not_counted_and_odd_error_fields_are_tamed():
    from lambdasplit.errors import CapacityError, ProtocolError
    from lambdasplit.wire.frame import Frame
    from lambdasplit.wire.protocol import read_control

    brackets = '{"text": "' + "[{" * 100 + '\\" ]"}'
    assert read_control(Frame(MsgType.WELCOME, payload=brackets.encode()), MsgType.WELCOME)["text"].startswith("[{[{")
    odd = json.dumps({"code": ["capacity"], "message": {"m": 1}, "retry_after": "soon"}).encode()
    with pytest.raises(ProtocolError, match=r"refused: \{'m': 1\} \[protocol\]") as info:
        read_control(Frame(MsgType.ERROR, payload=odd), MsgType.WELCOME)
    assert info.value.retry_after is None
    huge = json.dumps({"code": "capacity", "message": "x" * 10_000, "retry_after": 10**400}).encode()
    with pytest.raises(CapacityError) as info:
        read_control(Frame(MsgType.ERROR, payload=huge), MsgType.WELCOME)
    assert info.value.retry_after == 3600.0 and len(str(info.value)) < 600
