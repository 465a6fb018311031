"""Screenshots of both UI tabs for the README: `.venv/bin/python scripts/ui_screenshots.py`.

Starts `lambdasplit ui` (body and UNet part in process), asks one question and draws one image in
Debian's headless chromium, and writes docs/img/ui-chat.png and docs/img/ui-image.png.
"""

from __future__ import annotations

import shutil
import socket
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from lambdasplit.child import ChildProcess

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    def answers() -> bool:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2)
            return True
        except OSError:
            return False

    proc = ChildProcess([sys.executable, "-m", "lambdasplit.cli", "ui", "--port", str(port)], name="lambdasplit ui")
    try:
        proc.wait_until(answers, timeout=120)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#layers span")
            page.fill("#max-new-tokens", "48")
            # Two turns: the second sends only its new positions (the panel and the answer's line say how many).
            for question in ("Write a Python function that adds two numbers.", "Now explain it in one sentence."):
                page.fill("#chat-input", question)
                page.click("#send")
                page.wait_for_selector("#answer[data-state=done]", timeout=300_000)
            OUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT / "ui-chat.png"))
            page.click("#tab-image")
            page.select_option("#image-mode", "unet-split")
            for seed in ("1", "0"):  # two images, so the gallery shows
                page.fill("#image-seed", seed)
                page.fill("#image-steps", "12")
                page.click("#image-go")
                page.wait_for_selector("#image-state[data-state=done]", timeout=300_000)
            page.screenshot(path=str(OUT / "ui-image.png"), full_page=True)
            browser.close()
    finally:
        proc.stop()
    print(f"wrote {OUT / 'ui-chat.png'} and {OUT / 'ui-image.png'}")


if __name__ == "__main__":
    main()
