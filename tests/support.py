"""Helpers for integration tests: a plain HTTP view of the real Glance and real mounts (both from
lab/, shared with the benchmark and the demo), tools, and a proxy that holds back pages of
listings.

The tests talk to Glance directly (lab.glance_http, synchronously) to set up and check what the
mount shows, so that a bug in glancefs's own client cannot hide behind itself.
"""

from __future__ import annotations

import http.client
import http.server
import shutil
import subprocess
import threading
import urllib.parse
from typing import Any

from lab.glance_http import GlanceAPI
from lab.mounts import GLANCEFS, Mount

__all__ = ["GLANCEFS", "GlanceAPI", "HoldingProxy", "Mount", "require_tools", "tool"]


def tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, never raise on a non-zero exit."""
    return subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing tools {missing}: run `make deps`")


class HoldingProxy:
    """A reverse proxy in front of the real Glance that holds back the later pages of listings.

    Every request is passed on to ``upstream`` unchanged, except that GETs for a page after the
    first (their query has ``marker=``) wait until :meth:`release` or ``hold_seconds``, so a test
    can look at what the mount does while the rest of a listing is still on its way.
    """

    def __init__(self, upstream: str, hold_seconds: float = 60.0) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.released = threading.Event()
        #: Set while a request is being held.
        self.holding = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if self.command == "GET" and "marker=" in self.path:
                    proxy.holding.set()
                    proxy.released.wait(hold_seconds)
                    proxy.holding.clear()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream_connection = http.client.HTTPConnection(target.netloc, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    upstream_connection.request(self.command, self.path, body, headers)
                    response = upstream_connection.getresponse()
                    data = response.read()
                finally:
                    upstream_connection.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
