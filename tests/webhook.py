"""A JSON webhook on 127.0.0.1 for notification tests: remembers every message posted to it, by path."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.prefect_server import free_port


@dataclass
class Webhook:
    port: int
    received: list[tuple[str, dict]] = field(default_factory=list)  # (path, JSON body), in arrival order
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        """An apprise URL posting JSON to `path` on this webhook."""
        return f"json://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def messages(self, path: str, *, wait: float = 0, count: int = 1) -> list[dict]:
        """The messages posted to `path`, waiting up to `wait` seconds for `count` of them."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                found = [body for where, body in self.received if where == "/" + path.lstrip("/")]
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)


@contextmanager
def webhook() -> Iterator[Webhook]:
    """Serve until the block ends; nothing else listens on the port it reports."""
    hook = Webhook(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with hook._lock:
                hook.received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", hook.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A JSON webhook URL where nothing listens."""
    return f"json://127.0.0.1:{free_port()}/nobody-listens"
