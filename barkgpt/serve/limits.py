"""Limits in front of the app: body size, and how long a client may take to send its request.

A client that sends its request slowly (slowloris) would otherwise hold a connection, and with
enough of them the server, for ever: uvicorn bounds neither the wait for a new connection's first
request nor the time its headers take, and the body is read as slowly as it arrives. Headers are
bounded in the HTTP protocol (`guarded_http`, uvicorn's httptools protocol with a timer); the body,
and its size, in the ASGI layer (`RequestLimits`).
"""
from __future__ import annotations

import asyncio

from barkgpt.serve.schemas import error_response

SLOW = b"request headers not received in time"


class RequestLimits:
    """Read a POST body in full before the app sees it: over `max_body` bytes is a 413 (by
    Content-Length when sent, else while reading), not all there within `body_timeout_s` a 408.
    Plain ASGI and replayed, so streaming responses and disconnect detection pass through."""

    def __init__(self, app, max_body: int, body_timeout_s: float):
        self.app, self.max_body, self.body_timeout_s = app, max_body, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body over {self.max_body} bytes", "body_too_large")
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return await too_big(scope, receive, send)
        messages, total = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    messages.append(message)
                    total += len(message.get("body", b""))
                    if total > self.max_body:
                        return await too_big(scope, receive, send)
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
        except TimeoutError:
            slow = error_response(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                  "request_timeout", {"Connection": "close"})
            return await slow(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def guarded_http(header_timeout_s: float):
    """uvicorn's httptools protocol, closing a connection whose request line and headers are not
    complete within `header_timeout_s` (408 when a request had begun); also a new connection that
    sends nothing. Idle keep-alive connections stay uvicorn's (timeout_keep_alive)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttp(HttpToolsProtocol):
        _timer = None
        _began = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._began = False
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._began:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(SLOW), SLOW))
            self.transport.close()

    return GuardedHttp
