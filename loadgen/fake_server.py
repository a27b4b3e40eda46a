"""A fake OpenAI-compatible streaming server, for testing the load generator.

It streams `max_tokens` tokens with configurable delays, and can fail on
purpose (HTTP 503, a stream cut mid-way) every k-th request, so that the
client's timing and failure accounting are checked without an engine. It runs
in a thread on 127.0.0.1 with a port the OS picks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from typing import Any

from pydantic import BaseModel, Field


class FakeServerConfig(BaseModel):
    ttft_s: float = Field(default=0.02, ge=0, description="Delay before the first token.")
    itl_s: float = Field(default=0.005, ge=0, description="Delay between tokens.")
    fail_every: int = Field(default=0, ge=0, description="Every k-th request gets HTTP 503 (0: never).")
    drop_every: int = Field(default=0, ge=0, description="Every k-th stream is cut (0: never).")
    drop_after: int = Field(default=2, ge=0, description="Tokens sent before a stream is cut.")
    drop_mode: str = Field(default="abort", pattern="^(abort|truncate)$",
                           description="abort: break the connection; truncate: end without [DONE].")
    report_usage: bool = Field(default=True, description="Send a usage message when asked to.")
    api_key: str | None = Field(default=None, description="If set, requests need this bearer token.")
    role_chunk_first: bool = Field(default=True, description="Chat: announce the role before the TTFT delay.")


class _Cut(Exception):
    """Raised inside a streaming body to break the connection."""


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class FakeOpenAIApp:
    """A raw ASGI app; `received` keeps every request body and its headers."""

    def __init__(self, config: FakeServerConfig) -> None:
        self.config = config
        self.received: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._counter = itertools.count(1)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if scope["method"] == "GET" and scope["path"] in ("/health", "/v1/models"):
            await self._json(send, 200, {"object": "list", "data": [{"id": "fake"}]})
            return
        if scope["path"] not in ("/v1/completions", "/v1/chat/completions"):
            await self._json(send, 404, {"error": {"message": "not found"}})
            return
        payload = json.loads(body or b"{}")
        self.received.append({"path": scope["path"], "payload": payload, "headers": headers})
        n = next(self._counter)
        cfg = self.config
        if cfg.api_key and headers.get("authorization") != f"Bearer {cfg.api_key}":
            await self._json(send, 401, {"error": {"message": "bad api key"}})
        elif cfg.fail_every and n % cfg.fail_every == 0:
            await self._json(send, 503, {"error": {"message": "overloaded (fake)"}})
        else:
            cut = bool(cfg.drop_every and n % cfg.drop_every == 0)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._stream(send, payload, chat=scope["path"].endswith("chat/completions"), cut=cut)
            finally:
                self.in_flight -= 1

    async def _json(self, send, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    def _chunk(self, chat: bool, text: str, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        return {"id": "fake", "object": "chunk", "choices": [choice]}

    async def _stream(self, send, payload: dict[str, Any], chat: bool, cut: bool) -> None:
        cfg = self.config
        n_tokens = int(payload.get("max_completion_tokens") or payload.get("max_tokens") or 16)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if chat and cfg.role_chunk_first:
            await emit(_sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}))
        await asyncio.sleep(cfg.ttft_s)
        for i in range(n_tokens):
            if i:
                await asyncio.sleep(cfg.itl_s)
            if cut and i == cfg.drop_after:
                if cfg.drop_mode == "abort":
                    raise _Cut("stream cut on purpose")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await emit(_sse(self._chunk(chat, " tok", "length" if i == n_tokens - 1 else None)))
        if cfg.report_usage and (payload.get("stream_options") or {}).get("include_usage"):
            await emit(_sse({"choices": [], "usage": {"prompt_tokens": None, "completion_tokens": n_tokens}}))
        await emit(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class FakeServer:
    """Context manager: serves FakeOpenAIApp on 127.0.0.1:<free port> in a thread."""

    def __init__(self, config: FakeServerConfig | None = None) -> None:
        self.app = FakeOpenAIApp(config or FakeServerConfig())
        self._sock: socket.socket | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._sock is not None, "the server is not started"
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeServer":
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_level="critical", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None and self._sock is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
