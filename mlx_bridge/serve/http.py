"""Running the app: a listening socket, uvicorn with connection limits and timeouts, a test thread.

uvicorn's own settings bound what a client can hold: `limit_concurrency` (connections + requests;
past it uvicorn answers 503), `timeout_keep_alive` (an idle keep-alive connection is closed), and
h11's `max_incomplete_event_size` (largest request head). uvicorn has no timeout for a connection
that opens and never completes its request head (slowloris): `HeaderTimeoutH11` adds one. The body
has its own timeout where the app reads it (`app.read_json`).

Example:
    >>> s = bind("127.0.0.1", 0); s.getsockname()[0]
    '127.0.0.1'
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BridgeError


@dataclass(frozen=True)
class Limits:
    """What one client may hold on the server (the CLI's --max-connections, --idle-timeout, ...)."""

    max_connections: int = 1024  # uvicorn limit_concurrency: connections + running requests
    idle_timeout: int = 5  # s: keep-alive connection with no request (uvicorn timeout_keep_alive)
    header_timeout: float = 10.0  # s: from connecting (or the last response) to a complete request head
    max_header_bytes: int = 64 * 1024  # request line + headers (h11 max_incomplete_event_size)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete after
    `header_timeout` seconds (from connecting, or from the end of the previous response)."""

    header_timeout = Limits.header_timeout
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request head has arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app, limits: Limits = Limits(), log_level: str = "info"):
    """uvicorn.Config for the app with `limits` applied."""
    import uvicorn

    protocol = type("H11", (HeaderTimeoutH11,), {"header_timeout": limits.header_timeout})
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, http=protocol,
                          limit_concurrency=limits.max_connections, timeout_keep_alive=limits.idle_timeout,
                          h11_max_incomplete_event_size=limits.max_header_bytes, access_log=log_level == "debug")


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening-ready socket on host:port (IPv4 or IPv6); `BridgeError` when the address is taken.

    Example:
        >>> s = bind("127.0.0.1", 0); s.getsockname()[0]
        '127.0.0.1'
    """
    try:
        family, kind, proto_, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto_)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise BridgeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None, limits: Limits = Limits()) -> None:
    """Run the app with uvicorn until interrupted (one process, one model worker).

    Example:
        >>> serve(create_app(model), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    sock = sock or bind(host, port)
    uvicorn.Server(uvicorn_config(app, limits, log_level)).run(sockets=[sock])


class ServerThread:
    """Run the app on a free loopback port in a background thread (tests, notebooks, the demo).

    Example:
        >>> with ServerThread(create_app(model)) as srv:  # doctest: +SKIP
        ...     httpx.get(srv.url + "/health").json()["status"]
        'ok'
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: Limits = Limits()):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, limits, "warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 600.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
