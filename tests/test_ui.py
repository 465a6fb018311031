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

from lambdasplit.child import ChildProcess, child_env
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


class UIProcess(ChildProcess):
    """`lambdasplit ui` in a child process, ready once /api/info answers."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([*CLI, "ui", "--port", str(self.port), *args], name="lambdasplit ui", env=child_env())
        self.wait_until(self._answers, timeout)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/api/info", timeout=2)
            return True
        except OSError:
            return False


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


@pytest.fixture(scope="module")
def remote_ui(body_server):
    """The UI with its body on the module's server (the first test reads the server's totals, so it runs first)."""
    server, token = body_server
    ui = UIProcess("--server", server.url, "--token-file", str(token), "--split", "2,2", "--no-image")
    yield ui
    ui.stop()


@pytest.fixture(scope="module")
def local_ui():
    """The UI with the body and the UNet part in this process."""
    ui = UIProcess("--split", "2,2")
    yield ui
    ui.stop()


def _open(page, url: str) -> None:
    """Load the page and wait for /api/info to have filled it in (it sets the speculation switch)."""
    page.goto(url)
    page.wait_for_selector("#layers span")


def _chat(page, prompt: str, new_tokens: int = NEW_TOKENS) -> None:
    page.fill("#max-new-tokens", str(new_tokens))
    page.fill("#temperature", "0")
    page.fill("#chat-input", prompt)
    page.click("#send")


def _turn(page, prompt: str, new_tokens: int = NEW_TOKENS) -> dict:
    """Send one message and wait for its answer; the panel's numbers for that turn."""
    _chat(page, prompt, new_tokens)
    return _answered(page)


def _answered(page) -> dict:
    page.wait_for_selector("#answer[data-state=done]", timeout=180_000)
    return {"up": int(page.get_attribute("#bytes-up", "data-bytes")), "reused": int(page.get_attribute("#turn", "data-reused")),
            "sent": int(page.get_attribute("#turn", "data-sent")), "text": _stored(page)[-1]["content"],
            "round_trips": int(page.get_attribute("#round-trips", "data-round-trips")),
            "per_trip": float(page.get_attribute("#round-trips", "data-per-trip"))}


def _stored(page) -> list[dict]:
    """The conversation as the page keeps it in localStorage."""
    saved = page.evaluate("localStorage.getItem('lambdasplit.chat.v1')")
    return json.loads(saved)["messages"] if saved else []


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


def test_chat_equals_the_cli_and_counts_the_bytes_the_server_saw(browser, body_server, remote_ui, tmp_path):
    server, _ = body_server
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    _open(page, remote_ui.url)
    turn = _turn(page, PROMPT)
    down = int(page.get_attribute("#bytes-down", "data-bytes"))
    assert page.locator("#layers span.cloud").count() == 26 and page.locator("#layers span.device").count() == 4
    assert page.locator("#kept li").count() > 5
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    metrics = _metrics(server.url)
    page.close()
    cli = subprocess.run([*CLI, "generate", PROMPT, "--split", "2,2", "--json", "-n", str(NEW_TOKENS)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert turn["text"].strip() == json.loads(cli.stdout)["text"].strip()
    assert turn["up"] > 0 and down > 0 and turn["reused"] == 0
    assert metrics["lambdasplit_bytes_out_total"] == down
    # The server also counts the device's RESET/CLOSE control frames (52-byte headers) as bytes in.
    extra = metrics["lambdasplit_bytes_in_total"] - turn["up"]
    assert 0 <= extra <= 4 * 52 and extra % 52 == 0
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_a_follow_up_sends_only_its_new_positions_and_retry_and_edit_reuse_the_prefix(browser, body_server, remote_ui):
    server, _ = body_server
    page = browser.new_page()
    _open(page, remote_ui.url)
    first = _turn(page, "Name three colours.")
    before = _metrics(server.url)["lambdasplit_bytes_in_total"]
    second = _turn(page, "And three more?")
    received = _metrics(server.url)["lambdasplit_bytes_in_total"] - before
    # Turn 2 reuses turn 1's prompt and answer in the body's cache: only the new user message goes up.
    assert second["reused"] >= first["sent"] + NEW_TOKENS - 1 and second["sent"] < second["reused"]
    assert second["up"] < first["up"] and 0 <= received - second["up"] <= 2 * 52
    assert page.locator(".msg.assistant .meta").nth(1).inner_text().startswith(page.inner_text("#bytes-up"))

    page.click("#answer .actions .retry")  # regenerate: the cache is cropped back to the prompt
    retried = _answered(page)
    assert retried["reused"] == second["reused"] + second["sent"] - 1 and retried["sent"] == 1
    assert retried["text"] == second["text"] and len(_stored(page)) == 4  # greedy: the same answer, replaced

    page.locator(".msg.user").first.locator(".actions .edit").click()
    page.fill(".msg.user .editor", "Name three animals.")
    page.click(".msg.user .actions .save")
    edited = _answered(page)
    assert 0 < edited["reused"] < first["sent"]  # the template's opening is shared; the question is not
    assert [m["content"] for m in _stored(page)][0] == "Name three animals." and len(_stored(page)) == 2
    page.close()


def test_stop_cancels_the_generation_and_closes_the_body_session(browser, body_server, remote_ui):
    server, _ = body_server
    page = browser.new_page()
    _open(page, remote_ui.url)
    page.click("#clear")  # nothing left from earlier tests of this page's conversation
    idle, served_before = (_metrics(server.url)[k] for k in ("lambdasplit_sessions_active", "lambdasplit_tokens_served_total"))
    _chat(page, "Repeat the word hello 500 times.", new_tokens=2000)
    page.wait_for_function("document.querySelector('#answer .content').textContent.length > 30", timeout=180_000)
    assert _metrics(server.url)["lambdasplit_sessions_active"] == idle + 1
    page.click("#stop")
    clicked = time.monotonic()
    while (metrics := _metrics(server.url))["lambdasplit_sessions_active"] > idle and time.monotonic() - clicked < 30:
        time.sleep(0.02)  # polling
    assert metrics["lambdasplit_sessions_active"] == idle, "Stop did not close the body session"
    # The server counts a session's positions before it closes it: once closed, nothing more can run.
    served = metrics["lambdasplit_tokens_served_total"]
    assert _metrics(server.url)["lambdasplit_tokens_served_total"] == served  # nothing ran after the close
    assert served - served_before < 300  # prompt and the first tokens, far from the 2000 asked for
    assert page.get_attribute("#answer", "data-state") == "stopped" and page.is_hidden("#stop")
    assert _stored(page)[-1]["stopped"] and "hello" in _stored(page)[-1]["content"]  # the partial answer is kept

    next_turn = _turn(page, "Say OK.", new_tokens=4)  # answered right away, on a new session
    assert next_turn["reused"] == 0 and len(_stored(page)) == 4
    page.close()


XSS = ("**bold** and `code`\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
       "<img src=x onerror=\"window.__xss = 'img'\"><script>window.__xss = 'script'</script>"
       "<a href=\"javascript:window.__xss='link'\">link</a> [site](https://example.com)")


def test_markdown_is_rendered_and_model_output_cannot_run_script(browser, local_ui):
    """The answer is a fake token stream (page.route), so the payload does not depend on what the model says."""
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    requests: list[dict] = []

    def fake_chat(route) -> None:
        requests.append(route.request.post_data_json)
        tokens = [{"type": "token", "text": XSS[i:i + 7]} for i in range(0, len(XSS), 7)]
        done = {"type": "done", "text": XSS, "split": {"layers": 30, "head": [0, 2], "body": [2, 28], "tail": [28, 30]},
                "bytes_to_cloud": 1000, "bytes_from_cloud": 500, "tokens_per_second": 1.0, "tokens": 3, "round_trips": 3,
                "tokens_per_round_trip": 1.0, "speculate": None, "prompt_positions": 10, "reused_positions": 0,
                "per_token_ms": {"device": 1.0, "cloud_network": 1.0, "total": 2.0}, "saw": None, "kept_tokens": ["a"]}
        route.fulfill(status=200, content_type="text/event-stream", body=_sse(*tokens, done))

    page.route("**/api/chat", fake_chat)
    _open(page, local_ui.url)
    page.fill("#system-prompt", "Answer in markdown.")
    page.check("#speculate")
    _chat(page, "<b>not bold</b>")
    page.wait_for_selector("#answer[data-state=done]")
    for _ in range(2):  # as streamed, then re-rendered from localStorage after a reload
        answer = page.locator("#answer .content")
        assert answer.locator("strong").inner_text() == "bold"
        assert answer.locator("pre code").inner_text().strip() == "print('hi')"
        assert answer.locator("table td").count() == 2
        assert answer.locator("img, script").count() == 0
        assert answer.locator("a[href^=javascript]").count() == 0
        assert answer.locator("a[href='https://example.com']").get_attribute("rel") == "noopener noreferrer"
        assert page.evaluate("window.__xss") is None
        assert page.locator(".msg.user .content").inner_text() == "<b>not bold</b>"  # the user's text is text
        page.reload()
        page.wait_for_selector("#answer[data-state=done]")
    sent = requests[0]
    assert sent["messages"][0] == {"role": "system", "content": "Answer in markdown."}
    assert sent["messages"][1] == {"role": "user", "content": "<b>not bold</b>"} and sent["speculate"] == "prompt-lookup"
    assert page.input_value("#system-prompt") == "Answer in markdown."  # kept across the reload

    page.click("#answer pre .copy-code")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"
    page.click("#answer .actions .copy")
    assert page.evaluate("navigator.clipboard.readText()") == XSS

    _chat(page, "again")  # the second turn goes to the same conversation
    page.wait_for_selector(".msg.assistant >> nth=1")
    page.wait_for_selector("#answer[data-state=done]")
    assert requests[1]["conversation"] == sent["conversation"] and len(requests[1]["messages"]) == 4
    page.click("#clear")
    assert page.locator("#messages .msg").count() == 0 and _stored(page) == []
    _chat(page, "fresh")
    page.wait_for_selector("#answer[data-state=done]")
    assert requests[2]["conversation"] != sent["conversation"] and len(requests[2]["messages"]) == 2
    context.close()


def test_bad_settings_and_a_lost_server_get_plain_words_and_retry_recovers(browser, local_ui):
    page = browser.new_page()
    _open(page, local_ui.url)
    page.fill("#max-new-tokens", "4")
    page.fill("#temperature", "5")
    page.fill("#chat-input", "hello")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message == "temperature: input should be less than or equal to 2"
    assert page.get_attribute("#answer", "data-state") == "error" and _stored(page)[-1]["content"] == "hello"

    page.fill("#temperature", "0")
    page.click(".msg.user .actions .retry")  # the unanswered message is sent again
    page.wait_for_selector("#answer[data-state=done]", timeout=180_000)
    assert page.is_hidden("#error") and [m["role"] for m in _stored(page)] == ["user", "assistant"]

    page.route("**/api/chat", lambda route: route.abort())
    page.fill("#chat-input", "are you there?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("cannot reach the UI server")
    page.close()


def test_speculative_decoding_switch_shows_tokens_per_round_trip(browser, local_ui):
    page = browser.new_page()
    _open(page, local_ui.url)
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog."
    plain = _turn(page, prompt)
    assert plain["per_trip"] == 1.0 and "no drafting" in page.inner_text("#round-trips")
    page.click("#clear")
    page.check("#speculate")
    drafted = _turn(page, prompt)
    assert drafted["text"] == plain["text"]  # greedy: drafting changes the round trips, never the answer
    assert drafted["round_trips"] < plain["round_trips"] and drafted["per_trip"] > 1.0
    assert "prompt-lookup" in page.inner_text("#round-trips")
    page.click("#clear")
    page.select_option("#speculate-mode", "draft-head")  # the trained head shipped for the embedded model
    headed = _turn(page, prompt)
    assert headed["text"] == plain["text"] and "draft-head" in page.inner_text("#round-trips")
    page.click("#clear")
    page.select_option("#speculate-mode", "draft-tree")  # the same head's tree, verified in one round trip
    tree = _turn(page, prompt)
    assert tree["text"] == plain["text"] and "draft-tree" in page.inner_text("#round-trips")
    assert tree["round_trips"] < plain["round_trips"]
    page.close()


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


def test_image_tab_shows_the_image_forming_downloads_it_and_keeps_a_gallery(browser, local_ui, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    _open(page, local_ui.url)
    page.click("#tab-image")
    page.fill("#image-steps", "4")
    page.select_option("#image-mode", "unet-split")
    page.click("#image-go")
    page.wait_for_selector("#image-state[data-state=done]", timeout=180_000)
    first = page.get_attribute("#image-out", "src")
    assert first.startswith("data:image/png;base64,")
    assert page.get_attribute("#image-tensor", "src").startswith("data:image/png;base64,")
    assert "unet-split" in page.inner_text("#image-state")
    page.screenshot(path=str(tmp_path / "image.png"), full_page=True)
    assert Path(tmp_path / "image.png").stat().st_size > 10_000

    with page.expect_download() as download:
        page.click("#image-download")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "lambdasplit-a-lighthouse-at-dusk-oil-painting-seed0-unet-split.png"
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.fill("#image-steps", "2")
    page.fill("#image-seed", "7")
    page.click("#image-go")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 2", timeout=180_000)
    assert page.get_attribute("#image-out", "src") != first
    page.click("#gallery figure:first-child img")  # back to the first image
    assert page.get_attribute("#image-out", "src") == first
    assert page.locator("#gallery a[download]").count() == 2
    page.close()


# 180 characters with a name, an e-mail and an IBAN: the pseudonymised prompt the panel shows is one long line.
PII_PROMPT = ("Please write to Margaret Okonkwo-Villanueva at margaret.okonkwo-villanueva@example-consulting.co.uk "
              "and pay the invoice into IBAN DE89370400440532013000 before Friday, many thanks.")


def _layout(page) -> dict[str, float]:
    return page.evaluate("""() => {
        const box = (id) => document.getElementById(id).getBoundingClientRect();
        const chat = document.querySelector('#chat .conversation').getBoundingClientRect();
        return {scroll: document.documentElement.scrollWidth, viewport: window.innerWidth, chat: chat.width,
                chat_tab: box('tab-chat').right, image_tab: box('tab-image').right,
                panel: box('cloud-prompt').right};
    }""")


@pytest.mark.parametrize("width", [1366, 420])
def test_the_page_fits_the_window_with_a_long_pseudonymised_prompt(browser, local_ui, width):
    """Issue 21 item 7: the "what a curious cloud can recover" box wraps, the page never scrolls sideways,
    the chat column keeps its width and both tabs stay on screen (the answer is faked: layout only)."""
    assert len(PII_PROMPT) == 180
    page = browser.new_page(viewport={"width": width, "height": 800})

    def fake_chat(route) -> None:
        done = {"type": "done", "text": "Done.", "split": {"layers": 30, "head": [0, 2], "body": [2, 28], "tail": [28, 30]},
                "bytes_to_cloud": 1000, "bytes_from_cloud": 500, "tokens_per_second": 1.0, "tokens": 2, "round_trips": 2,
                "tokens_per_round_trip": 1.0, "speculate": None, "prompt_positions": 60, "reused_positions": 0,
                "per_token_ms": {"device": 1.0, "cloud_network": 1.0, "total": 2.0}, "saw": None,
                "kept_tokens": PII_PROMPT.split(), "cloud_prompt": PII_PROMPT.replace("Margaret", "Joanna"), "rows": 4}
        route.fulfill(status=200, content_type="text/event-stream", body=_sse({"type": "token", "text": "Done."}, done))

    page.route("**/api/chat", fake_chat)
    _open(page, local_ui.url)
    page.evaluate("localStorage.clear()")
    _chat(page, PII_PROMPT)
    page.wait_for_selector("#answer[data-state=done]")
    assert page.is_visible("#cloud-prompt") and "IBAN DE89370400440532013000" in page.inner_text("#cloud-prompt")
    layout = _layout(page)
    assert layout["viewport"] == width
    assert layout["scroll"] <= width, layout
    assert layout["chat_tab"] <= width and layout["image_tab"] <= width and layout["panel"] <= width, layout
    # Side by side at 1366 px the chat column takes what the 330 px panel leaves; stacked at 420 px, the window.
    assert layout["chat"] >= (width - 330 - 3 * 19.2 - 1 if width > 900 else width - 2 * 19.2 - 1), layout
    page.click("#tab-image")
    assert page.is_visible("#image-go") and page.evaluate("document.documentElement.scrollWidth") <= width
    page.close()


def test_the_page_and_the_audit_page_load_without_a_404(browser, local_ui):
    """/favicon.ico answered 404 (the browser asks for it on every page)."""
    page = browser.new_page()
    failed: list[str] = []
    page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    _open(page, local_ui.url)
    page.goto(local_ui.url + "/audit")
    page.wait_for_load_state("networkidle")
    page.close()
    assert failed == []
    with urllib.request.urlopen(local_ui.url + "/favicon.ico", timeout=10) as response:
        assert response.headers["Content-Type"] == "image/svg+xml" and response.read().startswith(b"<svg")


def test_a_drafting_mode_picked_in_the_page_gets_its_own_default_size_not_the_uis_draft_tokens():
    from lambdasplit.ui.app import Message, PageChat, chat_params

    messages = [Message(role="user", content="hi")]
    own = chat_params(PageChat(messages=messages, speculate=True), "draft-head", 3)
    assert (own.speculate, own.draft_tokens) == ("draft-head", 3)  # --draft-tokens was given for this mode
    tree = chat_params(PageChat(messages=messages, speculate="draft-tree"), "draft-head", 3)
    assert (tree.speculate, tree.draft_tokens) == ("draft-tree", None)  # the tree's default, not a 3-node tree
