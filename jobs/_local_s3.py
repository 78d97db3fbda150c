"""A local S3 endpoint (moto's server on 127.0.0.1) for the demo, the tests, the benchmarks and the dev stack.

Needs the ``demo`` extra (``pip install -e '.[demo]'``, part of ``.[test]``); nothing the
production jobs run imports this module.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point every client (boto3, s3fs, pyarrow, Ray workers) at ``endpoint``."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int) -> list[str]:
    """The command line of moto's S3 server as a process of its own."""
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def wait_until_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no S3 server came up on 127.0.0.1:{port} within {timeout:.0f} s") from None
            time.sleep(0.2)


class LocalS3:
    """moto's S3 server on 127.0.0.1, in a thread of this process or (``process=True``) in a
    process of its own, so that it takes no CPU time from what a benchmark measures.

    Use as a context manager; ``endpoint`` is its URL once started.
    """

    def __init__(self, *, process: bool = False) -> None:
        self.process = process
        self.endpoint = ""
        self._server: Any = None  # a Popen, or moto's ThreadedMotoServer (imported when started)

    def start(self) -> str:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise RuntimeError("the local S3 server needs the demo extra: pip install -e '.[demo]'") from exc
        if self.process:
            port = free_port()
            self._server = subprocess.Popen(server_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until_listening(port)
        else:
            # One log line per request would drown every other line.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            port = self._server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    @property
    def pid(self) -> int | None:
        """The server's process id when it runs in a process of its own."""
        return self._server.pid if self.process and self._server is not None else None

    def stop(self) -> None:
        if self._server is None:
            return
        if self.process:
            self._server.terminate()
            self._server.wait()
        else:
            self._server.stop()
        self._server = None

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
