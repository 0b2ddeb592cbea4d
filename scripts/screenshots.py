"""Screenshots of the chat page (``docs/chat-page.png``, ``docs/chat-page-phone.png``).

Starts ``python -m server`` (the bundled default model unless ``--checkpoint``) on a free
loopback port, drives the page at ``/`` in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium; nothing is downloaded) through a short greedy
conversation (a few hundred tokens, so that the KV line has grown past the memory), and saves
the whole page at desktop width (1280) and phone width (390).

    python scripts/screenshots.py                       # writes docs/chat-page*.png
    python scripts/screenshots.py --checkpoint tiny-infini --out /tmp/shots
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.live import start_server, stop_server, wait_ready  # noqa: E402

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars"]
MESSAGES = ["Hello! My name is Ada and I like mathematics.", "What do you know about the sea?",
            "Tell me a short story.", "Who is in it?", "What happens next?",
            "How does it end?"]
WIDTHS = {"chat-page.png": (1280, 900), "chat-page-phone.png": (390, 844)}
MAX_HEIGHT = 2600


def chromium(profile: str, width: int, height: int) -> Any:
    """Headless Chromium with a fresh profile, driven by Debian's chromedriver."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must download nothing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def converse(driver: Any, url: str, messages: list[str], max_tokens: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(what: Any, message: str) -> None:
        WebDriverWait(driver, 120, poll_frequency=0.1).until(lambda _: what(), message)

    find = driver.find_element
    driver.get(url + "/")
    wait(lambda: "·" in find(By.ID, "model-line").text, "the page")
    find(By.ID, "new-session-id").send_keys("ada")
    find(By.CSS_SELECTOR, "#new-session-form button").click()
    find(By.CSS_SELECTOR, "#sampling summary").click()
    for field, value in (("max-tokens", str(max_tokens)), ("temperature", "0")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.CSS_SELECTOR, "#sampling summary").click()
    for i, message in enumerate(messages, start=1):
        find(By.ID, "prompt").send_keys(message + "\n")
        wait(lambda i=i: len(driver.find_elements(By.CSS_SELECTOR, "#chart circle.pt-mem")) == i,
             f"turn {i}")
    wait(lambda: find(By.ID, "metric-rate").get_attribute("data-value"), "the metrics")


def shoot(driver: Any, width: int, height: int, path: Path) -> None:
    """The whole page (up to MAX_HEIGHT) with a viewport ``width`` wide (phone: mobile)."""
    def viewport(h: int) -> None:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": h, "deviceScaleFactor": 1, "mobile": width < 600})

    viewport(height)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    viewport(min(max(height, full), MAX_HEIGHT))
    driver.execute_script("window.scrollTo(0, 0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--max-tokens", type=int, default=120)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="newllm-shots-") as tmp:
        server = start_server(args.checkpoint, Path(tmp), "shots")
        try:
            wait_ready(server)
            driver = chromium(str(Path(tmp) / "profile"), *WIDTHS["chat-page.png"])
            try:
                converse(driver, server.url, MESSAGES, args.max_tokens)
                for name, (width, height) in WIDTHS.items():
                    shoot(driver, width, height, args.out / name)
            finally:
                driver.quit()
        finally:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
