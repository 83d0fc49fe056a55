"""The curator report in a real browser: headless Chromium opens reports/index.html from disk
(file://), every image must have loaded, the console must stay free of errors, and nothing may be
requested from a network. A full-page screenshot is saved under the test's temp dir.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4
out, NUL-separated JSON): no WebDriver, no extra package, no TCP port to race for, and the
protocol reports console messages, failed loads and requests as events, which `--dump-dom` or
log scraping would only approximate.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from megapairs_ops.cli import main
from megapairs_ops.config import load_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.report import build_report
from tests.fixtures.paths import REPO

DEMO = REPO / "configs" / "demo.yaml"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,1000", "--remote-debugging-pipe",
]


def chromium_binary() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path, stderr: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire_fds() -> None:
            # Chromium reads commands on fd 3 and writes replies on fd 4. Moving both ends out of
            # the low range first keeps one dup2 from clobbering the other's source.
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._stderr = open(stderr, "wb")
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire_fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self._stderr.close()


def render(url: str, tmp: Path, screenshot: Path) -> dict[str, Any]:
    """Open `url` in a fresh headless Chromium; return images, console errors, requested URLs."""
    binary = chromium_binary()
    assert binary, "chromium is not installed; `make test` installs it (Debian packages chromium, chromium-driver)"
    browser = DevTools(binary, tmp / "profile", tmp / "chromium.stderr")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        images = browser.call("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images).map("
                          "i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth})))",
            "returnByValue": True}, session=session)["result"]["value"]
        body = browser.call("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                            session=session)["result"]["value"]
        sections = browser.call("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.querySelectorAll('main section'))"
                          ".map(s => [s.id, s.innerText.length]))", "returnByValue": True},
            session=session)["result"]["value"]
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        # Anything still in flight (late console messages) arrives before this reply.
        browser.call("Runtime.evaluate", {"expression": "1"}, session=session)
    finally:
        browser.close()
    errors = [e["params"] for e in browser.events
              if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert")]
    errors += [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"]["entry"] for e in browser.events
               if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"]
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    return {"images": json.loads(images), "errors": errors, "requests": requests, "text": body,
            "sections": dict(json.loads(sections))}


@pytest.fixture(scope="module")
def small_run(sample_corpus, tmp_path_factory):
    """A run whose report has something in every section: a curator rejected a pair and an image
    after a first run, and the re-published run is compared with that first one."""
    root = tmp_path_factory.mktemp("browser_runs")
    first = root / "first"
    assert main(["run", "--config", str(DEMO), "--corpus", str(sample_corpus), "--out", str(first)]) == 0
    shutil.copytree(first, root / "second")
    layout = RunLayout(root / "second")
    row = pq.read_table(layout.triplets_dir).slice(0, 1).to_pylist()[0]
    rejects = root / "rejects.csv"
    rejects.write_text(f"kind,id,reason\npair,{row['pair_id']},off-topic\nimage,{row['t_id']},watermark\n")
    config = root / "curated.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(DEMO.read_text()),
                                      "curation": {"rejects_file": str(rejects)}}))
    args = ["--config", str(config), "--corpus", str(sample_corpus), "--out", str(layout.root)]
    assert main(["stage", "publish", "--force", *args]) == 0
    build_report(load_config(config), layout)
    return layout


@pytest.mark.slow
def test_report_renders_from_disk_with_every_image_and_no_console_error(small_run, tmp_path):
    index = small_run.reports_dir / "index.html"
    screenshot = tmp_path / "report.png"
    page = render(index.as_uri(), tmp_path, screenshot)

    assert len(page["images"]) >= 10
    broken = [i["src"] for i in page["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == []
    assert page["errors"] == []
    assert all(url.startswith(("file://", "data:")) for url in page["requests"]), page["requests"]
    for section in ("overview", "gates", "funnel", "similarity", "overlap", "instructions", "gallery",
                    "curation", "comparison"):
        assert page["sections"].get(section, 0) > 40, section
    assert "rejected_pair" in page["text"] and str(small_run.root.parent / "first") in page["text"]
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_browser_check_catches_a_missing_image_and_a_console_error(small_run, tmp_path):
    # The check itself must be able to fail: a copy of the report with one thumbnail gone and a
    # script that logs an error.
    copy = tmp_path / "reports"
    shutil.copytree(small_run.reports_dir, copy, ignore=shutil.ignore_patterns("data_docs"))
    victim = sorted((copy / "thumbs").glob("*.jpg"))[0]
    victim.unlink()
    index = copy / "index.html"
    index.write_text(index.read_text()
                     .replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                     .replace("</body>", "<script>console.error('report broke')</script></body>"))
    page = render(index.as_uri(), tmp_path, tmp_path / "broken.png")
    assert {i["src"] for i in page["images"] if i["width"] == 0} == {victim.as_uri()}
    assert any("report broke" in json.dumps(e) for e in page["errors"])
