"""Open the rendered page in headless Chromium and check it: loads, every image decodes, no console errors.

Talks the Chrome DevTools protocol over `--remote-debugging-pipe` (file descriptors 3 and 4,
NUL-separated JSON), so it needs nothing beyond the standard library and a Chromium binary.

`python -m harness.report.browser reports/index.html [--expect-images N] [--screenshot out.png]`
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The window a reader's laptop gives the page (a 1440 x 900 screen): every table and figure fits its width.
READER_WIDTH = 1440
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars")
PAGE_STATS = """JSON.stringify({
  title: document.title,
  images: document.images.length,
  decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  svgs: document.querySelectorAll('svg').length,
  figures: document.querySelectorAll('figure').length,
  tables: document.querySelectorAll('table').length,
  height: document.documentElement.scrollHeight,
  width: document.documentElement.scrollWidth,
  window: document.documentElement.clientWidth,
  text: document.body ? document.body.innerText.length : 0
})"""


def find_chromium() -> str | None:
    """$HARNESS_CHROMIUM, else the first Chromium or Chrome on PATH."""
    chosen = os.environ.get("HARNESS_CHROMIUM")
    if chosen:
        return chosen if Path(chosen).exists() else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    stats: dict
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = [f"console: {m}" for m in self.console_errors] + [f"exception: {m}" for m in self.exceptions]
        if self.stats.get("decoded") != self.stats.get("images"):
            found.append(f"{self.stats.get('images', 0) - self.stats.get('decoded', 0)} image(s) did not decode")
        if self.stats.get("width", 0) > self.stats.get("window", 0):
            # A table too wide for the window puts its figures off screen: the reader scrolls sideways.
            found.append(f"the page is {self.stats['width']} px wide in a {self.stats['window']} px window")
        return found


class _Browser:
    """One headless Chromium with a DevTools pipe; one page attached."""

    def __init__(self, binary: str, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.profile = tempfile.TemporaryDirectory(prefix="harness-chromium-")
        commands_read, self._commands = os.pipe()
        self._events, events_write = os.pipe()

        def to_fds_3_and_4():  # in the child: Chromium reads commands on fd 3 and answers on fd 4
            a, b = os.dup(commands_read), os.dup(events_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=to_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(events_write)
        self._buffer = b""
        self._next_id = 0
        self.messages: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._next_id

    def wait_for(self, predicate) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self.messages.append(message)
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._events], [], [], remaining)
            if ready:
                chunk = os.read(self._events, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        message_id = self._send(method, params, session)
        answer = self.wait_for(lambda m: m.get("id") == message_id)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.call(method, params, self.session)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # already gone: nothing to close
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._events)
        self.profile.cleanup()


def _console_text(params: dict) -> str:
    args = params.get("args") or []
    return " ".join(str(a.get("value", a.get("description", ""))) for a in args)


def check_page(page: str | Path, binary: str | None = None, screenshot: str | Path | None = None,
               width: int = READER_WIDTH, height: int = 4000) -> PageCheck:
    """Load a local HTML file and report what a reader's browser would: images, console errors, exceptions."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (set HARNESS_CHROMIUM or install `chromium`)")
    browser = _Browser(binary)
    try:
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.page(domain)
        browser.page("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        browser.page("Page.navigate", {"url": Path(page).resolve().as_uri()})
        browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        result = browser.page("Runtime.evaluate", {"expression": PAGE_STATS, "returnByValue": True})
        stats = json.loads(result["result"]["value"])
        if screenshot is not None:
            shot = browser.page("Page.captureScreenshot", {"format": "png"})
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        check = PageCheck(stats)
        for message in browser.messages:
            method, params = message.get("method"), message.get("params") or {}
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                check.console_errors.append(_console_text(params))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails") or {}
                check.exceptions.append(details.get("text", "") + " " +
                                        str((details.get("exception") or {}).get("description", "")))
            elif method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
                check.console_errors.append((params.get("entry") or {}).get("text", ""))
        return check
    finally:
        browser.close()


def evaluate_in_page(page: str | Path, expression: str, binary: str | None = None, width: int = READER_WIDTH,
                     height: int = 900):
    """Load a local HTML file as a reader would and return the value of a JavaScript expression
    evaluated in it (awaited if it is a promise): how a test chooses in the page's pickers and reads
    what the page then shows."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (set HARNESS_CHROMIUM or install `chromium`)")
    browser = _Browser(binary)
    try:
        browser.page("Page.enable")
        browser.page("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        browser.page("Page.navigate", {"url": Path(page).resolve().as_uri()})
        browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        result = browser.page("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"].get("value")
    finally:
        browser.close()


EXIT_NOT_RUN = 3  # distinct from a failed check (1): nothing was checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report.browser", description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, nargs="?", default=Path("reports/index.html"))
    parser.add_argument("--expect-images", type=int, help="fail unless exactly this many images decode")
    parser.add_argument("--screenshot", type=Path, help=f"also save a PNG of the first {READER_WIDTH}x4000 pixels")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        print("browser check NOT RUN: no Chromium found (apt-get install chromium, or set HARNESS_CHROMIUM)")
        return EXIT_NOT_RUN
    check = check_page(args.page, binary, args.screenshot)
    stats = check.stats
    print(f"{args.page}: loaded in {Path(binary).name}; {stats['decoded']}/{stats['images']} images decoded, "
          f"{stats['tables']} tables, {len(check.console_errors)} console errors, {len(check.exceptions)} exceptions")
    problems = check.problems
    if args.expect_images is not None and stats["decoded"] != args.expect_images:
        problems.append(f"expected {args.expect_images} images, found {stats['decoded']}")
    for problem in problems:
        print(f"  problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
