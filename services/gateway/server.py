"""Runs the gateway app under uvicorn: in the foreground (serve) or a thread (tests)."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from fastapi import FastAPI


class GatewayServer:
    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from the configured one when that was 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        raise RuntimeError("the gateway is not listening")

    async def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn's handlers) or `stop()`."""
        await self.server.serve()

    def start_in_thread(self, timeout_s: float = 30.0) -> str:
        """Start serving in a background thread; returns the base URL."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return f"http://{self.config.host}:{self.bound_port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
