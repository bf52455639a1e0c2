"""Serve an ASGI app (the coordinator's REST API and dashboard) with uvicorn in a thread.

``ApiServer(app, host, port).start()`` returns at once; :meth:`ApiServer.wait_until_ready`
blocks until the socket listens; :meth:`ApiServer.shutdown` stops it gracefully. Port 0
picks a free port, readable from :attr:`ApiServer.port` once ready. The federation loop
runs the API in its own process this way; tests use it to serve a live coordinator.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import uvicorn


class ApiServerError(RuntimeError):
    """The API server could not start or stop (says why)."""


class ApiServer:
    """uvicorn ``Server(Config(app, host, port))`` running in a daemon thread.

    Args:
        app: the ASGI application (e.g. from :func:`coordinator.api.create_app`).
        host: address to bind; keep ``127.0.0.1`` unless a reverse proxy is in front.
        port: TCP port; 0 picks a free one.
        log_level: uvicorn's log level.
        access_log: log each request (paths only; tokens travel in headers, never logged).
        ssl_certfile: serve HTTPS with this certificate (PEM) ...
        ssl_keyfile: ... and this private key; both or neither.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        access_log: bool = False,
        ssl_certfile: str | os.PathLike[str] | None = None,
        ssl_keyfile: str | os.PathLike[str] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ApiServerError(f"port must be between 0 and 65535, got {port}")
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ApiServerError("give both ssl_certfile and ssl_keyfile for HTTPS, or neither")
        self.host = host
        self.scheme = "http" if ssl_certfile is None else "https"
        self._requested_port = port
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=None if ssl_certfile is None else str(ssl_certfile),
            ssl_keyfile=None if ssl_keyfile is None else str(ssl_keyfile),
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc

    def start(self) -> ApiServer:
        """Start serving in a background thread (returns immediately)."""
        if self._thread is not None:
            raise ApiServerError("the API server was already started")
        self._thread = threading.Thread(target=self._run, name="perspective-api", daemon=True)
        self._thread.start()
        return self

    def wait_until_ready(self, timeout: float = 30.0) -> ApiServer:
        """Block until the server listens.

        Raises:
            ApiServerError: it failed to start (e.g. port in use) or took over ``timeout``.
        """
        if self._thread is None:
            raise ApiServerError("call start() before wait_until_ready()")
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise ApiServerError(
                    f"API server on {self.host}:{self._requested_port} failed to start: "
                    f"{self._error or 'it exited (is the port already in use?)'}"
                )
            if time.monotonic() > deadline:
                raise ApiServerError(f"API server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        """The port actually bound (resolves port 0 once ready)."""
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080`` (``https`` with a certificate)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, finish the running ones and join the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> ApiServer:
        return self.start().wait_until_ready()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
