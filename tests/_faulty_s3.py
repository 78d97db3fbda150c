"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), on 127.0.0.1.

Clients point ``endpoint_url`` at the proxy; it forwards every request unchanged and, where a
rule matches, answers ``500 InternalError`` instead or delays the request first. Rules match on
the HTTP method and a substring of the path (the object key for path-style S3 requests), and
either fail the first ``times`` matching requests, or fail every one until removed, or fail a
random ``fraction`` of them. ``requests`` counts the matches of each rule.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>injected fault</Message></Error>'


@dataclass
class Rule:
    method: str
    path_contains: str
    times: int | None = None  # fail the first N matches; None: every match (until removed)
    fraction: float = 1.0
    delay: float = 0.0  # seconds to wait before forwarding (or failing)
    fail: bool = True
    matched: int = 0
    failed: int = 0


class FaultyS3:
    """The proxy; use as a context manager, ``endpoint`` is its URL."""

    def __init__(self, upstream: str, seed: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                delay, fail = proxy._decide(self.command, self.path)
                if delay:
                    time.sleep(delay)
                if fail:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_ERROR)))
                    self.end_headers()
                    self.wfile.write(_ERROR)
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                # A HEAD answer has no body but says the object's length.
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str) -> tuple[float, bool]:
        with self.lock:
            for rule in self.rules:
                if rule.method != method or rule.path_contains not in path:
                    continue
                rule.matched += 1
                fail = rule.fail and (rule.times is None or rule.failed < rule.times) and self.random.random() < rule.fraction
                rule.failed += fail
                return rule.delay, fail
        return 0.0, False

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
