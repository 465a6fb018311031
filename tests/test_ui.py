"""The web UI driven end to end in a real headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lambdasplit.cloud.process import ServerProcess

CLI = [sys.executable, "-m", "lambdasplit.cli"]
PROMPT = "Name three colours of the rainbow."
NEW_TOKENS = 24
TOKEN = "ui-test-token-0123456789abcdef"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: run ./scripts/browser.sh (the README's test command does)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UIProcess:
    """`lambdasplit ui` in a child process, ready once /api/info answers."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([*CLI, "ui", "--port", str(self.port), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lambdasplit ui exited: {self.proc.stdout.read()}")
            try:
                urllib.request.urlopen(self.url + "/api/info", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("lambdasplit ui did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def body_server(tmp_path_factory):
    token = tmp_path_factory.mktemp("ui") / "token"
    token.write_text(TOKEN)
    with ServerProcess("--split", "2,2", "--token-file", str(token)) as proc:
        yield proc, token


def _metrics(url: str) -> dict[str, float]:
    request = urllib.request.Request(url.replace("ws://", "http://") + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _chat(page, prompt: str) -> None:
    page.fill("#max-new-tokens", str(NEW_TOKENS))
    page.fill("#temperature", "0")
    page.fill("#chat-input", prompt)
    page.click("#send")


def test_chat_equals_the_cli_and_counts_the_bytes_the_server_saw(browser, body_server, tmp_path):
    server, token = body_server
    ui = UIProcess("--server", server.url, "--token-file", str(token), "--split", "2,2")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(ui.url)
        _chat(page, PROMPT)
        page.wait_for_selector("#answer[data-state=done]", timeout=180_000)
        answer = page.inner_text("#answer")
        up = int(page.get_attribute("#bytes-up", "data-bytes"))
        down = int(page.get_attribute("#bytes-down", "data-bytes"))
        assert page.locator("#layers span.cloud").count() == 26 and page.locator("#layers span.device").count() == 4
        assert page.locator("#kept li").count() > 5
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        metrics = _metrics(server.url)
    finally:
        ui.stop()
    cli = subprocess.run([*CLI, "generate", PROMPT, "--split", "2,2", "--json", "-n", str(NEW_TOKENS)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert answer.strip() == json.loads(cli.stdout)["text"].strip()
    assert up > 0 and down > 0
    assert metrics["lambdasplit_bytes_out_total"] == down
    # The server also counts the device's RESET/CLOSE control frames (52-byte headers) as bytes in.
    extra = metrics["lambdasplit_bytes_in_total"] - up
    assert 0 <= extra <= 4 * 52 and extra % 52 == 0
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_wrong_token_and_dead_server_say_why(browser, body_server, tmp_path):
    server, _ = body_server
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-right-token-0123456789")
    for args, needle in (
        (["--server", server.url, "--token-file", str(wrong)], "refused the token"),
        (["--server", f"ws://127.0.0.1:{_free_port()}"], "cannot reach the body server"),
    ):
        ui = UIProcess(*args, "--split", "2,2", "--no-image")
        try:
            page = browser.new_page()
            page.goto(ui.url)
            _chat(page, "hello")
            page.wait_for_selector("#error:not([hidden])", timeout=60_000)
            assert needle in page.inner_text("#error")
            assert page.get_attribute("#answer", "data-state") == "error"
        finally:
            ui.stop()


def test_image_tab_shows_the_image_forming(browser, tmp_path):
    ui = UIProcess("--split", "2,2")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(ui.url)
        page.click("#tab-image")
        page.fill("#image-steps", "4")
        page.select_option("#image-mode", "unet-split")
        page.click("#image-go")
        page.wait_for_selector("#image-state[data-state=done]", timeout=180_000)
        assert page.get_attribute("#image-out", "src").startswith("data:image/png;base64,")
        assert page.get_attribute("#image-tensor", "src").startswith("data:image/png;base64,")
        assert "unet-split" in page.inner_text("#image-state")
        page.screenshot(path=str(tmp_path / "image.png"), full_page=True)
    finally:
        ui.stop()
    assert Path(tmp_path / "image.png").stat().st_size > 10_000
