"""The uvicorn server of `osprey serve` / `osprey run`, with the slowloris guards uvicorn lacks.

uvicorn closes idle keep-alive connections, but a connection that never finishes its request line and
headers -- or its body -- stays open forever (measured: 2,000 half-open connections held 30 s and more).
`deadline_protocol` returns uvicorn's httptools protocol with two deadlines per request:
- headers: from the connection (or the first byte of the next request) to the end of the headers,
  OSPREY_HEADER_TIMEOUT_S;
- body: from the end of the headers to the end of the body, OSPREY_BODY_TIMEOUT_S.
A connection past its deadline is closed. OSPREY_MAX_CONNECTIONS bounds connections + running requests
(uvicorn's `limit_concurrency`: beyond it, requests get 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backend.settings import Settings


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request does not arrive in time."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request did not arrive in time")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineHttpToolsProtocol]:
    """The protocol class with these deadlines (uvicorn instantiates it per connection)."""
    return type("OspreyHttpProtocol", (DeadlineHttpToolsProtocol,),
                {"header_timeout_s": float(header_timeout_s), "body_timeout_s": float(body_timeout_s)})


def server_config(app: Any, settings: Settings) -> Any:
    """uvicorn.Config for `app` with the request deadlines and the connection limit of `settings`."""
    import uvicorn

    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5, timeout_keep_alive=5,
        http=deadline_protocol(settings.osprey_header_timeout_s, settings.osprey_body_timeout_s),
        limit_concurrency=int(settings.osprey_max_connections),
    )
