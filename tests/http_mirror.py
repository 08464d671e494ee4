"""A loopback HTTP file server for download tests: Range requests (206 / 416), a connection
dropped half way on demand, and a log of the requests.

    with serve(root, log_head=False) as (base_url, handler):
        handler.drop_first["a.bin"] = 1000   # the first GET of a.bin stops after 1000 bytes
        handler.ignore_range = True          # answer 200 with the whole file to any Range
        ... handler.log == [("a.bin", None), ("a.bin", "bytes=1000-")]
"""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from pathlib import Path


class Mirror(http.server.BaseHTTPRequestHandler):
    root: Path
    drop_first: dict = {}  # relative path -> bytes sent before the first response is cut off
    ignore_range = False  # a server that does not support Range
    log_head = True  # log HEAD requests too
    log: list = []  # (relative path, Range header)

    def log_message(self, *a):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        rel = self.path.lstrip("/")
        p = self.root / rel
        if not p.is_file():
            self.send_error(404)
            return
        data = p.read_bytes()
        rng = self.headers.get("Range")
        if self.log_head or not head:
            type(self).log.append((rel, rng))
        start = 0
        if rng and not self.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        cut = self.drop_first.pop(rel, None)
        if cut is not None:  # the connection drops half way
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve(root: str | Path, log_head: bool = True):
    """Yield (base URL, handler class) of a fresh server for the files under `root`."""
    handler = type(
        "H",
        (Mirror,),
        {"root": Path(root), "drop_first": {}, "log": [], "ignore_range": False, "log_head": log_head},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
