"""The OpenAI-compatible gateway, driven by the official `openai` client, against a real body server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.body import BodyClient, TransferStats, load_local_body
from lambdasplit.device.generation import GenerationOptions
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.errors import (
    AuthError,
    CapacityError,
    ComputeError,
    LimitError,
    MismatchError,
    ProtocolError,
    UnavailableError,
)
from lambdasplit.gateway.app import create_app
from lambdasplit.wire.codec import Codec

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy decoding keeps counting for a long time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll `predicate` until it returns a true value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


@contextlib.contextmanager
def _serving(app):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "the gateway to start", 60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def device(smollm2_dir):
    return SplitDevice.load(None, (2, 2))


@pytest.fixture(scope="module")
def stack(device):
    with ServerProcess("--split", "2,2") as body_server:
        # fp32 on the wire, so that answers equal the in-process split's exactly (bf16 may flip near-ties)
        connect = lambda: RemoteBody(body_server.url, device.manifest, Codec.FP32)  # noqa: E731
        with _serving(create_app(device, connect, "smollm2")) as url:
            yield SimpleNamespace(url=url, device=device, body_server=body_server, client=_client(url))


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.client, stack.device


def _metrics(body_server) -> dict[str, float]:
    text = urllib.request.urlopen(body_server.url.replace("ws://", "http://") + "/metrics", timeout=5).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _idle(body_server) -> dict[str, float]:
    """The server's metrics once no body session is open."""
    return _wait_for(lambda: (m := _metrics(body_server))["lambdasplit_sessions_active"] == 0 and m, "no open sessions")


_LOCAL: list = []


def _local_body():
    if not _LOCAL:
        _LOCAL.append(load_local_body(None, (2, 2)))
    return _LOCAL[0]


def _expected(device, ids, n):
    return device.generate_ids(_local_body(), ids, None, GenerationOptions(max_new_tokens=n))


def _ids(device, prompt):
    return device.tokenizer(prompt, return_tensors="pt")["input_ids"]


def test_models(gateway):
    client, _ = gateway
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_chat_completion_matches_the_split_model(gateway):
    client, device = gateway
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24)
    expected = _expected(device, device.encode_chat(MESSAGES), 24)
    assert reply.choices[0].message.content == expected.text
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == device.encode_chat(MESSAGES).shape[1]
    assert reply.usage.completion_tokens == len(expected.token_ids[0])
    assert reply.choices[0].finish_reason == expected.finish_reasons[0]


def test_streaming_chat_with_usage(gateway):
    client, device = gateway
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    expected = _expected(device, device.encode_chat(MESSAGES), 24)
    assert "".join(pieces) == expected.text and len(pieces) > 2
    assert usage is not None and usage.completion_tokens == len(expected.token_ids[0])
    assert reasons == [expected.finish_reasons[0]]


def test_completions_streaming_and_not(gateway):
    client, device = gateway
    prompt = "The three primary colors are"
    plain = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    ids, _ = device.encode(prompt, raw=True)
    assert plain.choices[0].text == _expected(device, ids, 12).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=prompt, temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_bad_request_gets_a_clear_error(gateway):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "  "}], max_tokens=4)


def _stopped_early(stack, before: dict[str, float], max_tokens: int) -> int:
    """Waits until the server has closed every session and returns how many tokens the abandoned
    request generated; asserts that the unsplit-equivalent local split would not have stopped by itself."""
    after = _idle(stack.body_server)
    prompt_len = _ids(stack.device, COUNTING).shape[1]
    generated = int(after["lambdasplit_tokens_served_total"] - before["lambdasplit_tokens_served_total"]) - prompt_len + 1
    assert 0 < generated < max_tokens
    # The model would have gone on: no EOS in the next tokens, so the generation stopped because it was cancelled.
    more = _expected(stack.device, _ids(stack.device, COUNTING), generated + 8)
    assert len(more.token_ids[0]) == generated + 8 and more.finish_reasons == ["length"]
    return generated


def test_an_abandoned_stream_is_cancelled_and_the_next_request_is_served(stack):
    before = _idle(stack.body_server)
    stream = stack.client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=1000, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 3:
            break
    assert _metrics(stack.body_server)["lambdasplit_sessions_active"] == 1
    stream.close()  # the client goes away mid-stream
    _stopped_early(stack, before, 1000)
    # The gateway is not stuck: the next completion is answered, and correctly.
    reply = stack.client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == _expected(stack.device, stack.device.encode_chat(MESSAGES), 12).text
    assert "".join(pieces) == _expected(stack.device, _ids(stack.device, COUNTING), 3).text


def test_an_abandoned_plain_request_stops_generating(stack):
    before = _idle(stack.body_server)
    port = int(stack.url.rsplit(":", 1)[1])
    payload = json.dumps({"model": "smollm2", "prompt": COUNTING, "temperature": 0, "max_tokens": 1000}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    prompt_len = _ids(stack.device, COUNTING).shape[1]
    served = lambda: _metrics(stack.body_server)["lambdasplit_tokens_served_total"] - before["lambdasplit_tokens_served_total"]  # noqa: E731
    _wait_for(lambda: served() >= prompt_len + 4, "the request to be generating")
    sock.close()  # the client gives up before the answer
    _stopped_early(stack, before, 1000)
    final = _metrics(stack.body_server)["lambdasplit_tokens_served_total"]
    reply = stack.client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=4)
    assert reply.choices[0].text == _expected(stack.device, _ids(stack.device, "The sky is"), 4).text
    # Only the new request's positions were served after the abandoned one stopped.
    assert _idle(stack.body_server)["lambdasplit_tokens_served_total"] - final == _ids(stack.device, "The sky is").shape[1] + 3


def test_concurrent_requests_overlap_and_are_all_correct(stack):
    prompts = ["The three primary colors are", "My favourite recipe for soup is", COUNTING]
    results: dict[int, tuple[float, float, str]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = stack.client.completions.create(model="smollm2", prompt=prompts[i], temperature=0, max_tokens=24, stream=True)
            times, text = [], []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.monotonic())
                    text.append(chunk.choices[0].text)
            results[i] = (times[0], times[-1], "".join(text))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 3
    # Every request got its first token before any request got its last: they ran at the same time.
    assert max(r[0] for r in results.values()) < min(r[1] for r in results.values())
    for i, prompt in enumerate(prompts):
        assert results[i][2] == _expected(stack.device, _ids(stack.device, prompt), 24).text
    _idle(stack.body_server)  # every session was closed


class _FailingBody(BodyClient):
    """A body whose every call fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error, self.codec, self.stats = error, Codec.FP32, TransferStats()
        self.closed = False

    def _exchange(self, frames):
        raise self.error

    def _reset(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def failing(device):
    """A gateway whose body is whatever `state.connect` builds."""
    state = SimpleNamespace(connect=None, bodies=[])

    def connect():
        body = state.connect()
        state.bodies.append(body)
        return body

    with _serving(create_app(device, connect, "smollm2", api_key="secret")) as url:
        state.url = url
        yield state


@pytest.mark.parametrize(
    "error, status, retry_after, type_",
    [
        (CapacityError("the body server is full", retry_after=2.5), 429, "3", "rate_limit_error"),
        (UnavailableError("cannot reach the body server"), 503, "1", "server_error"),
        (UnavailableError("body server restarting", retry_after=7), 503, "7", "server_error"),
        (ProtocolError("malformed frame"), 400, None, "invalid_request_error"),
        (LimitError("over the server's max context"), 400, None, "invalid_request_error"),
        (AuthError("the body server refused the token"), 502, None, "server_error"),
        (MismatchError("parts do not match"), 502, None, "server_error"),
        (ComputeError("out of GPU memory"), 502, None, "server_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_body_errors_map_to_openai_statuses(failing, error, status, retry_after, type_, stream):
    failing.connect = lambda: _FailingBody(error)
    response = httpx.post(
        f"{failing.url}/v1/completions", headers={"Authorization": "Bearer secret"}, timeout=60,
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "stream": stream},
    )
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.json() == {"error": {"message": str(error), "type": type_, "param": None, "code": error.code.value}}
    assert failing.bodies[-1].closed


def test_openai_client_sees_the_matching_exceptions(failing):
    client = _client(failing.url, api_key="secret")
    failing.connect = lambda: _FailingBody(CapacityError("the body server is full", retry_after=2))
    with pytest.raises(openai.RateLimitError, match="full") as caught:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    assert caught.value.response.headers["retry-after"] == "2" and caught.value.code == "capacity"
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(failing.url, api_key="wrong").models.list()
    assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=0)


def test_unreachable_body_server_is_503(failing, device):
    port = _free_port()  # nothing listens here
    failing.connect = lambda: RemoteBody(f"ws://127.0.0.1:{port}", device.manifest, reconnect_window=0, retries=0)
    response = httpx.post(
        f"{failing.url}/v1/chat/completions", headers={"Authorization": "Bearer secret"}, timeout=60,
        json={"model": "smollm2", "messages": MESSAGES, "max_tokens": 4},
    )
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert str(port) in error["message"]


class _FailsAfter(RemoteBody):
    """A real body session that fails with a compute error on its `n`-th call."""

    def __init__(self, *args, n: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.n, self.calls = n, 0

    def _exchange(self, frames):
        self.calls += 1
        if self.calls == self.n:
            raise ComputeError("the body ran out of memory")
        return super()._exchange(frames)


def test_an_error_mid_stream_is_an_sse_error_event(failing, stack):
    failing.connect = lambda: _FailsAfter(stack.body_server.url, stack.device.manifest, Codec.FP32, n=6)
    client = _client(failing.url, api_key="secret")
    stream = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=24, stream=True)
    pieces = []
    with pytest.raises(openai.APIError, match="out of memory") as caught:
        for chunk in stream:
            pieces.append(chunk.choices[0].text)
    assert caught.value.code == "compute" and caught.value.type == "server_error"
    # Five body calls succeeded: five tokens arrived before the error, and they are the right ones.
    assert "".join(pieces) == _expected(stack.device, _ids(stack.device, COUNTING), 5).text
    _idle(stack.body_server)


def test_generation_stops_at_the_step_after_cancel(device):
    cancel, pieces = threading.Event(), []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            cancel.set()

    ids = _ids(device, COUNTING)
    result = device.generate_ids(_local_body(), ids, None, GenerationOptions(max_new_tokens=50), on_text, cancel=cancel)
    assert result.finish_reasons == ["cancelled"] and 3 <= len(result.token_ids[0]) < 50
    assert result.token_ids[0] == _expected(device, ids, len(result.token_ids[0])).token_ids[0]
