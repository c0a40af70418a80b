"""The web page (`GET /`): served without the API key while the API keeps it, and used in a real headless Chromium
(driven over the DevTools protocol on a pipe: no browser-driver package) against the tiny store and extract reader.

`MEMVQ_WRITE_SCREENSHOT=1` also writes docs/web-page.png: the page answering with the embedded reader over the
demo store (runs/demo, `make demo`)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from test_serve_hardening import FakePipeline, live

from memvq.pipelines.rag import RAGPipeline
from memvq.serve.app import create_app
from memvq.serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "who got the first nobel prize in physics"
KEY = "s3cret"
CHROMIUM_NAMES = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox does not start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


def test_the_page_loads_without_the_key_while_the_api_needs_it():
    with TestClient(create_app(FakePipeline(), ServeSettings(api_key=KEY))) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="question"' in page.text and "/v1/answer" in page.text
        assert "://" not in page.text  # nothing loads from elsewhere
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
        for path in ("/index.html", "/static/index.html", "/docs", "/openapi.json", "/v1/models"):
            assert client.get(path).status_code == 401, path  # only the page's exact path is open
        assert client.post("/v1/answer", json={"question": QUESTION}).status_code == 401
        ok = client.post("/v1/answer", json={"question": QUESTION}, headers={"X-API-Key": KEY})
        assert ok.status_code == 200, ok.text


# -- a real browser ------------------------------------------------------------------------------------------------


def _above_9(fd: int) -> int:
    """The same pipe end on a descriptor >= 10 (so that moving it to 3 or 4 clobbers nothing)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands go to its fd 3,
    replies and events come from its fd 4, each a JSON message ended by a NUL byte), with one page attached."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()
        to_browser, from_browser = _above_9(to_browser), _above_9(from_browser)
        script = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", script, "bash", binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(to_browser, from_browser),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._last_id = 0
        self._session: str | None = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=1000, height=800, deviceScaleFactor=1, mobile=False)

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if not select.select([self._reader], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._reader, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def send(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        """One DevTools command (to the page once attached); its result (events on the way are skipped)."""
        self._last_id += 1
        command: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if self._session is not None:
            command["sessionId"] = self._session
        os.write(self._writer, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (reply := self._message(deadline)).get("id") != self._last_id:
            pass
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        height = self.evaluate("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": 1000, "height": height, "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        os.close(self._writer)  # Chromium quits when its pipe closes
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._reader)


@contextmanager
def browser(tmp_path: Path) -> Iterator[Browser]:
    binary = next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)
    if binary is None:
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}; Debian: apt-get install chromium)")
    opened = Browser(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield opened
    finally:
        opened.close()


def ask(page: Browser, url: str, question: str, key: str | None = None) -> None:
    """Open the page, give the key when it asks for one, type the question and submit it."""
    page.send("Page.navigate", url=f"{url}/")
    page.wait_for("document.readyState === 'complete' && document.getElementById('question') !== null")
    if key is not None:
        page.wait_for("!document.getElementById('key-field').hidden")  # the server said 401
        page.type_into("#key", key)
    page.type_into("#question", question)
    page.evaluate("document.getElementById('ask').click()")


SHOWN = """(() => {
  const text = (selector) => Array.from(document.querySelectorAll(selector), (node) => node.textContent);
  if (document.getElementById('result').hidden) return null;
  return {answer: text('#answer')[0], titles: text('#passages li strong'), marked: text('#passages mark'),
          timings: text('#timings li')};
})()"""


@pytest.fixture(scope="module")
def extract_rag(tiny_store, tiny_extract_reader_path) -> RAGPipeline:
    return RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu")


def test_the_page_answers_in_a_real_browser_and_shows_the_api_errors(extract_rag, tmp_path):
    app = create_app(extract_rag, ServeSettings(api_key=KEY, max_question_chars=200))
    with live(app) as url, browser(tmp_path) as page:
        ask(page, url, QUESTION, key=KEY)
        shown = page.wait_for(SHOWN)
        expected = httpx.post(
            f"{url}/v1/answer", json={"question": QUESTION, "return_passages": True}, headers={"X-API-Key": KEY}
        ).json()
        assert shown["answer"] == expected["answer"] != ""
        assert shown["titles"] == [p["title"] for p in expected["provenance"]]
        assert shown["marked"] == [expected["answer"]]  # the answer span, marked in its passage
        assert [t.split()[0] for t in shown["timings"]] == list(expected["timings_ms"])

        page.evaluate("document.getElementById('question').value = ''")
        page.type_into("#question", "x" * 201)
        page.evaluate("document.getElementById('ask').click()")
        error = page.wait_for("!$('error').hidden && $('error').textContent")  # the page's own $
        refused = httpx.post(f"{url}/v1/answer", json={"question": "x" * 201}, headers={"X-API-Key": KEY})
        assert error == refused.json()["error"]["message"]
        assert page.evaluate("document.getElementById('result').hidden")


@pytest.mark.skipif(os.environ.get("MEMVQ_WRITE_SCREENSHOT") != "1", reason="set MEMVQ_WRITE_SCREENSHOT=1 to write it")
def test_write_the_screenshot_of_the_docs(tmp_path):
    store = ROOT / "runs" / "demo"
    if not (store / "manifest.json").is_file():
        pytest.skip(f"no demo store at {store} (make demo builds it)")
    with live(create_app(RAGPipeline.load(store, device="cpu"))) as url, browser(tmp_path) as page:
        ask(page, url, QUESTION)
        page.wait_for(SHOWN, timeout=60)
        page.screenshot(ROOT / "docs" / "web-page.png")
