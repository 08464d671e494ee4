"""Check the HTML report in headless Chromium (Debian's `chromium`) over the DevTools protocol
(websocket client: aiohttp, already a dependency through dvc): the page loads with no console
errors, no failed requests, every image decodes, every link resolves (files exist, #anchors
exist, nothing points outside the report), and a screenshot is saved.

`check_report(index_html, screenshot=...)` loads the page from file:// and, with `serve=True`,
again from a local HTTP server (the "any web server" case).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp

from smallbig.errors import RunError

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


class BrowserError(RunError):
    """Chromium is missing or did not start / answer."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError("no chromium found on PATH (Debian: apt-get install chromium; or `make system-deps`)")


class _Chromium:
    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 1000):
        self.binary = binary or find_chromium()
        self.tmp = tempfile.mkdtemp(prefix="smallbig-chromium-")
        self.proc = subprocess.Popen(
            [
                self.binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.tmp}",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port_file = Path(self.tmp) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise BrowserError(f"{self.binary} exited with {self.proc.returncode}: {err}")
            if port_file.is_file() and len(port_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        else:
            self.close()
            raise BrowserError(f"{self.binary} did not open its DevTools port within 60 s")
        self.port = int(port_file.read_text().splitlines()[0])

    def page_ws(self) -> str:
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
                targets = json.load(r)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise BrowserError("chromium has no page target")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


_PAGE_FACTS_JS = r"""
(async () => {
  await Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));
  return {
  title: document.title,
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src,
           ok: i.complete && i.naturalWidth > 0, natural: i.naturalWidth,
           shown: i.getBoundingClientRect().width,
           minFont: parseFloat(i.dataset.minFontPx || "0")})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  external: Array.from(document.querySelectorAll('link[href],script[src]'))
           .map(e => e.href || e.src).filter(u => /^https?:/.test(u)),
  text: document.body ? document.body.innerText.slice(0, 200000) : ""
}})()
"""


_RECT_JS = """
(() => { const e = document.getElementById(%s); if (!e) return null;
  const r = e.getBoundingClientRect();
  return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}; })()
"""


async def _inspect(
    ws_url: str, url: str, screenshot: Path | None, timeout: float, sections: dict[str, Path] | None = None
) -> dict:
    errors: list[str] = []
    failed: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = 0
        pending: dict[int, asyncio.Future] = {}
        loaded = asyncio.Event()

        async def reader():
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                    continue
                method, params = data.get("method"), data.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append(
                        "console: "
                        + " ".join(
                            str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
                        )
                    )
                elif method == "Runtime.exceptionThrown":
                    d = params.get("exceptionDetails", {})
                    errors.append(
                        "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
                    )
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    e = params["entry"]
                    errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
                elif method == "Network.loadingFailed" and not params.get("canceled"):
                    failed.append(f"{params.get('errorText')} (request {params.get('requestId')})")
                elif method == "Network.responseReceived":
                    resp = params.get("response", {})
                    if int(resp.get("status", 200) or 200) >= 400:
                        failed.append(f"HTTP {resp.get('status')}: {resp.get('url')}")
                elif method == "Page.loadEventFired":
                    loaded.set()

        async def send(method: str, **params) -> dict:
            nonlocal counter
            counter += 1
            fut = asyncio.get_running_loop().create_future()
            pending[counter] = fut
            await ws.send_str(json.dumps({"id": counter, "method": method, "params": params}))
            res = await asyncio.wait_for(fut, timeout)
            if "error" in res:
                raise BrowserError(f"{method}: {res['error']}")
            return res.get("result", {})

        task = asyncio.create_task(reader())
        try:
            for m in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
                await send(m)
            await send("Page.navigate", url=url)
            await asyncio.wait_for(loaded.wait(), timeout)
            await asyncio.sleep(0.5)  # late console messages / image decodes
            res = await send(
                "Runtime.evaluate", expression=_PAGE_FACTS_JS, returnByValue=True, awaitPromise=True
            )
            facts = res["result"]["value"]
            if screenshot is not None:
                shot = await send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            missing_sections = []
            for element_id, path in (sections or {}).items():
                res = await send(
                    "Runtime.evaluate", expression=_RECT_JS % json.dumps(element_id), returnByValue=True
                )
                rect = res["result"].get("value")
                if not rect or rect["width"] < 1 or rect["height"] < 1:
                    missing_sections.append(element_id)
                    continue
                clip = {**rect, "height": min(rect["height"], 16000), "scale": 1}
                shot = await send(
                    "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(base64.b64decode(shot["data"]))
            facts["missing_sections"] = missing_sections
        finally:
            task.cancel()
    facts["console_errors"] = errors
    facts["failed_requests"] = failed
    return facts


def _check_links(facts: dict, base_url: str, root: Path) -> list[str]:
    """Problems with the page's links: missing files, missing anchors, links leaving the report."""
    bad = []
    ids = set(facts["ids"])
    root = root.resolve()
    for href in facts["links"] + facts.get("external", []):
        u = urllib.parse.urlsplit(href)
        if u.scheme in ("http", "https") and not href.startswith(base_url.rsplit("/", 1)[0]):
            bad.append(f"{href}: points outside the report")
            continue
        if u.scheme == "file":
            path = Path(urllib.parse.unquote(u.path))
        elif u.scheme in ("http", "https"):
            rel = urllib.parse.unquote(u.path)[
                len(urllib.parse.urlsplit(base_url).path.rsplit("/", 1)[0]) + 1 :
            ]
            path = root / rel
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(
                        urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, "", "")), method="HEAD"
                    ),
                    timeout=10,
                ) as r:
                    if r.status >= 400:
                        bad.append(f"{href}: HTTP {r.status}")
            except Exception as e:  # noqa: BLE001
                bad.append(f"{href}: {e}")
                continue
        elif u.scheme in ("data", "mailto"):
            continue
        else:
            bad.append(f"{href}: unexpected link scheme")
            continue
        if not path.exists():
            bad.append(f"{href}: no such file {path}")
        elif path.resolve() == (root / "index.html").resolve() and u.fragment and u.fragment not in ids:
            bad.append(f"{href}: no element with id '{u.fragment}'")
        elif root not in path.resolve().parents and path.resolve() != root:
            bad.append(f"{href}: outside the report directory {root}")
    return bad


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401
        pass


# Figures: the smallest text of each figure (figures.json `min_font_px`, the page's
# data-min-font-px) at the size the page shows the image must be at least this tall.
MIN_FONT_PX = 9.0


def small_text(images: list[dict], min_px: float = MIN_FONT_PX) -> list[str]:
    """Figures whose smallest text the page shows below `min_px` pixels."""
    bad = []
    for im in images:
        if im.get("minFont") and im.get("natural") and im.get("shown"):
            px = im["minFont"] * im["shown"] / im["natural"]
            if px < min_px:
                bad.append(
                    f"figure too small to read: {im['src']}: its smallest text shows at {px:.1f} px "
                    f"(< {min_px:g} px; image {im['natural']} px wide, shown {im['shown']:.0f} px)"
                )
    return bad


def check_report(
    index_html: str | Path,
    screenshot: str | Path | None = None,
    serve: bool = True,
    timeout: float = 60.0,
    binary: str | None = None,
    sections: dict[str, str | Path] | None = None,
) -> dict:
    """Load the report in headless Chromium (file://, then http:// when `serve`); returns
    {"ok", "problems": [...], "images", "links", "screenshot", "title", "text", "fonts_px"}.
    Problems: console errors, failed requests, images that do not decode, broken links, figures
    whose smallest text is shown below MIN_FONT_PX. `sections`: element id -> PNG path, a
    screenshot of that element at the size the page shows it (e.g. {"figures": ...})."""
    index = Path(index_html).resolve()
    if not index.is_file():
        raise FileNotFoundError(f"{index}: report not found")
    root = index.parent
    browser = _Chromium(binary)
    problems: list[str] = []
    out: dict = {}
    try:
        modes = [("file", index.as_uri())]
        server = None
        if serve:
            handler = functools.partial(_QuietHandler, directory=str(root))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            modes.append(("http", f"http://127.0.0.1:{server.server_address[1]}/{index.name}"))
        try:
            for i, (mode, url) in enumerate(modes):
                shot = Path(screenshot) if (screenshot and i == 0) else None
                shots = {k: Path(v) for k, v in (sections or {}).items()} if i == 0 else None
                facts = asyncio.run(_inspect(browser.page_ws(), url, shot, timeout, shots))
                problems += [
                    f"[{mode}] no element with id '{e}' to screenshot" for e in facts["missing_sections"]
                ]
                problems += [f"[{mode}] {b}" for b in small_text(facts["images"])]
                problems += [f"[{mode}] {e}" for e in facts["console_errors"]]
                problems += [f"[{mode}] failed request: {e}" for e in facts["failed_requests"]]
                problems += [
                    f"[{mode}] image did not load: {im['src']}" for im in facts["images"] if not im["ok"]
                ]
                problems += [f"[{mode}] link: {b}" for b in _check_links(facts, url, root)]
                if i == 0:
                    out.update(
                        title=facts["title"],
                        images=len(facts["images"]),
                        links=len(facts["links"]),
                        text=facts["text"],
                        fonts_px={
                            im["src"].rsplit("/figures/", 1)[-1]: round(
                                im["minFont"] * im["shown"] / im["natural"], 1
                            )
                            for im in facts["images"]
                            if im.get("minFont") and im.get("natural")
                        },
                    )
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
    finally:
        browser.close()
    out.update(ok=not problems, problems=problems, screenshot=str(screenshot) if screenshot else None)
    return out
