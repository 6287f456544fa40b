"""moto's S3 server on 127.0.0.1 in a process of its own, slowed like a real store, for the benches that read
from S3 (bench_stage_read.py, bench_tar_fetch.py). In a process of its own: in the bench's, its ~10 ms of
Python a request competed with the reads for the GIL, and measured moto.

    server = SlowS3()      # started; server.url, server.opts (s3fs storage options)
    server.delay.value = 0.02; server.rate.value = 100e6; server.served.value = 0
    ...
    server.stop()
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time


def serve(port: int, served, delay, rate, ready) -> None:
    """moto's S3 on 127.0.0.1:`port`, each request counted in `served`, answered `delay` seconds late (the
    server's threads sleep in parallel: latency, not a queue) and its body sent at `rate` bytes a second (0: as
    fast as it goes)."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    answer = DomainDispatcherApplication.__call__

    def slow(app, environ, start_response):
        with served.get_lock():
            served.value += 1
        time.sleep(delay.value)
        body = answer(app, environ, start_response)
        if rate.value <= 0:
            return body

        def paced():
            try:
                for chunk in body:
                    time.sleep(len(chunk) / rate.value)
                    yield chunk
            finally:
                getattr(body, "close", lambda: None)()

        return paced()

    DomainDispatcherApplication.__call__ = slow
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    ready.set()
    threading.Event().wait()


class SlowS3:
    """The server started on a free port: `served` (requests answered), `delay` (seconds) and `rate` (bytes a
    second, 0: unpaced) are shared values the bench reads and sets; `url` and `opts` (s3fs's storage options)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.served, self.delay, self.rate, ready = mp.Value("i", 0), mp.Value("d", 0.0), mp.Value("d", 0.0), mp.Event()
        self._process = mp.get_context("fork").Process(
            target=serve, args=(port, self.served, self.delay, self.rate, ready), daemon=True)
        self._process.start()
        ready.wait(60)
        self.url = f"http://127.0.0.1:{port}"
        self.opts = {"key": "testing", "secret": "testing",
                     "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"}}

    def stop(self) -> None:
        self._process.terminate()
