"""report.html in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol
on a pipe with the standard library only: the page loads with no console error and no network
request, every table and figure is there, a click on a header sorts its table, and a screenshot is
not blank."""

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from stabench.html import Section, render, sort_value

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_cells_sort_by_their_first_number():
    assert sort_value("0.97 [0.96, 0.98]") == 0.97
    assert sort_value("1e-06†") == 1e-06
    assert sort_value("never") == float("inf")
    assert np.isnan(sort_value("-"))
    assert sort_value("clip_norm(max_norm=1.0)") is None


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; messages
    end with a NUL byte)."""

    def __init__(self, profile: Path):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--window-size=1280,900", "about:blank"]
        # the shell moves the pipe's ends to the fds 3 and 4 chromium reads and writes
        move = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", move, "bash", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_browser, from_browser))
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.events = b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._read)
        os.close(self._write)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of two tasks (one where a run diverged, one where none did) written by the
    report command from hand-made records."""
    from test_report import fake_record, table_metrics

    from stabench.reports import write_report
    from stabench.store import Store

    root = tmp_path_factory.mktemp("records")
    store = Store(root)
    for steps in (30, 40):  # two task variants
        for method in ("none", "clip_norm"):
            metrics = table_metrics(method) if steps == 30 else None
            fake_record(store, method, metrics_fn=metrics, steps=steps)
    out = tmp_path_factory.mktemp("report")
    write_report(root, out, warn=lambda _: None)
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install "
                                             "chromium); .ci/run installs it")
def test_report_html_in_headless_chromium(report):
    page = report / "report.html"
    text = page.read_text()
    pngs = sorted((report / "plots").glob("*.png"))
    assert pngs and text.count("data:image/png;base64,") == len(pngs)
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(Path(profile))
        try:
            target = browser.call("Target.createTarget", url="about:blank")["targetId"]
            session = browser.call("Target.attachToTarget", targetId=target,
                                   flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.call(f"{domain}.enable", session)
            browser.call("Page.navigate", session, url=page.as_uri())
            browser.wait_for("Page.loadEventFired")

            def js(expression):
                result = browser.call("Runtime.evaluate", session, expression=expression,
                                      returnByValue=True)
                assert "exceptionDetails" not in result, result
                return result["result"].get("value")

            assert js("document.documentElement.getAttribute('data-ready')") == "1"
            # every table (the baseline checks, the main table, the overall and each task's) and
            # figure, each image decoded
            assert js("document.querySelectorAll('table.sortable').length") == 5
            assert js("document.querySelectorAll('figure img').length") == len(pngs)
            assert js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert js("document.body.innerText.includes('No run diverged on this task')")
            assert js("document.body.innerText.includes('Provenance')")
            # a click on a numeric header sorts the rows by it, again reverses them
            overall = "document.querySelectorAll('table.sortable')[2]"
            column = js(f"""Array.from({overall}.tHead.rows[0].cells).findIndex(
                th => th.textContent.startsWith('stability'))""")
            assert column > 0
            read = f"""Array.from({overall}.tBodies[0].rows)
                .map(r => parseFloat(r.cells[{column}].getAttribute('data-v')))"""
            click = f"{overall}.tHead.rows[0].cells[{column}].querySelector('button').click()"
            js(click)
            up = js(read)
            assert up == sorted(up)
            js(click)
            assert js(read) == sorted(up, reverse=True)
            shot = base64.b64decode(browser.call("Page.captureScreenshot", session,
                                                 format="png")["data"])
            (report / "screenshot.png").write_bytes(shot)
        finally:
            browser.close()
    methods = [e.get("method") for e in browser.events]
    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled"
                  and e["params"]["type"] in ("error", "warning", "assert"))
              or (e.get("method") == "Log.entryAdded"
                  and e["params"]["entry"]["level"] in ("error", "warning"))]
    assert not errors, errors
    requests = [e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent"]
    # nothing but the page itself and its inline images: it works offline
    assert [u for u in requests if not u.startswith("data:")] == [page.as_uri()], requests
    assert "Page.loadEventFired" in methods
    # the screenshot is not blank: decode it and look for more than one colour
    from matplotlib.image import imread
    pixels = imread(report / "screenshot.png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].reshape(-1, 3).std(axis=0).max() > 0.05


def png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the IHDR chunk's width


def test_report_html_holds_the_main_table_the_definitions_and_screen_sized_figures(report):
    text = (report / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings[:3] == ["Baseline checks", "Main table", "Overall"]
    assert headings[-2:] == ["Definitions", "Provenance"]
    # the tables' definitions beside the figures'
    assert "<strong>Stability score</strong>" in text and "Wilson band" in text
    # the figures' files keep 200 dpi; the page embeds them at half that, a quarter of the pixels
    embedded = [base64.b64decode(d) for d in re.findall(r"base64,([^\"]+)", text)]
    on_disk = sorted((report / "plots").glob("*.png"))
    assert len(embedded) == len(on_disk)
    assert sum(map(len, embedded)) < 0.5 * sum(p.stat().st_size for p in on_disk)
    assert sorted(map(png_width, embedded)) == pytest.approx(
        sorted(png_width(p.read_bytes()) / 2 for p in on_disk), abs=4)


def test_render_escapes_text_and_marks_the_best(tmp_path):
    import pandas as pd

    class Table:
        frame = pd.DataFrame({"method": ["<b>x</b>", "y"], "score": ["0.5", "-"]})
        bold = pd.DataFrame({"method": [False, False], "score": [True, False]})
        caption = "a `code` caption"

    page = render("t", ["summary"], [Section("S", [Table()], ["a note"], [])], ["def"], ["- p"])
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in page
    assert '<td data-v="0.5" class="best">0.5</td>' in page
    assert '<td data-v="nan">-</td>' in page
    assert "<code>code</code>" in page and "a note" in page
    assert "Content-Security-Policy" in page and "http" not in page.split("<body>")[1]
