"""Drive the running app in headless Chromium like a user, and save screenshots for the README.

    python app.py &            # then:
    python scripts/screenshot.py --url http://127.0.0.1:7860/ --out assets/

Needs Debian's `chromium` and `pip install playwright` (no browser download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def send(page: Page, text: str, replies: int) -> None:
    ask(page, text)
    # each finished reply ends with a badge ("⚡ … prompt tokens …")
    page.get_by_text("prompt tokens").nth(replies - 1).wait_for(timeout=180_000)


def ask(page: Page, text: str) -> None:
    box = page.locator("#kvchat-message textarea")
    box.fill(text)
    box.press("Enter")


def open_on_faq(page: Page, url: str) -> None:
    page.goto(url)
    page.get_by_text("✅").first.wait_for(timeout=300_000)  # model loaded
    page.get_by_label("System prompt preset").click()
    page.get_by_role("option", name="Acme cloud support faq (long)").click()
    page.get_by_text("Generation settings").click()
    tokens = page.get_by_label("number input for Max new tokens")
    tokens.fill("40")
    tokens.press("Tab")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", default="assets")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page, other = (browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2))
        for tab in (page, other):  # two visitors on the FAQ preset
            open_on_faq(tab, args.url)
        send(page, "How much does the Team plan cost?", 1)
        page.get_by_role("button", name="New chat").click()  # a second chat, on the same preset
        page.wait_for_function("() => document.querySelectorAll('.message-row').length === 0")
        ask(page, "What happens if a card payment fails?")  # both tabs at once: served in one batch
        ask(other, "Do you refund yearly plans?")
        for tab in (page, other):
            tab.get_by_text("prompt tokens").first.wait_for(timeout=180_000)
        page.locator("#kvchat-chats label").filter(has_text="Team plan").click()  # back to the first chat
        page.locator("#kvchat-reply-status").get_by_text("This chat is warm").wait_for(timeout=30_000)
        page.screenshot(path=out / "screenshot-chat.png", full_page=True)
        send(page, "And the Business plan?", 2)  # continues warm: its badge says what it reused
        page.get_by_role("tab", name="Cache stats").click()
        page.get_by_text("Token hit rate").first.wait_for(timeout=30_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=out / "screenshot-stats.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
