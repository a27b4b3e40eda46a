"""Streaming OpenAI-compatible client: one request in, one timed record out.

Timing follows vLLM's benchmark client so that numbers compare: TTFT is the
time to the first SSE message that carries a choice, each later such message
adds one inter-token latency (ITL), and E2E latency ends at the last message
that carries a choice (the trailing usage message and [DONE] do not count).
One deliberate difference: a chat message that only announces the assistant
role, before any content, is not a token and does not stop the TTFT clock.

A request fails (with a reason kept in the record) on a non-200 status, an
error event in the stream, a stream that ends without [DONE], no token at all,
a transport error, or the per-request timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.loadgen.config import TargetConfig
from pdserve.loadgen.prompts import Prompt

_ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: Prompt
    max_tokens: int
    scheduled_s: float | None  # planned send time from the run's start; None in a closed loop


@dataclass
class RequestRecord:
    """What happened to one request. Times in seconds; start_s from the run's start."""

    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled_s: float | None
    prefix_group: int | None
    start_s: float = 0.0
    success: bool = False
    error: str = ""
    error_kind: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # from the usage message, else counted by the runner
    usage_reported: bool = False
    finish_reason: str | None = None
    generated_text: str = ""

    def fail(self, kind: str, message: str) -> None:
        self.success = False
        self.error_kind = kind
        self.error = message


def build_payload(target: TargetConfig, spec: RequestSpec) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": target.model,
        "stream": True,
        # Usage gives the server's own token counts; without it we count ourselves.
        "stream_options": {"include_usage": True},
        # Traces fix the output length, so the model must not stop early.
        "ignore_eos": True,
    }
    if target.is_chat:
        payload["messages"] = [{"role": "user", "content": spec.prompt.text}]
        payload["max_completion_tokens"] = spec.max_tokens
    else:
        payload["prompt"] = spec.prompt.text
        payload["max_tokens"] = spec.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        if getattr(target, name) is not None:
            payload[name] = getattr(target, name)
    payload.update(target.extra_body)
    return payload


def headers(target: TargetConfig) -> dict[str, str]:
    out = {"Content-Type": "application/json", **target.headers}
    if target.api_key:
        out["Authorization"] = f"Bearer {target.api_key}"
    return out


class _Stream:
    """Folds SSE data messages into a record as they arrive."""

    def __init__(self, record: RequestRecord, chat: bool, t_send: float) -> None:
        self.record = record
        self.chat = chat
        self.t_send = t_send
        self.t_last: float | None = None
        self.done = False
        self.text: list[str] = []

    def on_data(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        message = json.loads(data)
        if err := message.get("error"):
            raise _ServerError(str(err.get("message", err) if isinstance(err, dict) else err))
        if usage := message.get("usage"):
            if (n := usage.get("completion_tokens")) is not None:
                self.record.output_tokens = int(n)
                self.record.usage_reported = True
            if (n := usage.get("prompt_tokens")) is not None:
                self.record.prompt_tokens = int(n)
        choices = message.get("choices")
        if not choices:
            return
        choice = choices[0]
        if self.chat:
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if self.t_last is None and not piece and "role" in delta and not choice.get("finish_reason"):
                return  # role announcement, not a token
        else:
            piece = choice.get("text")
        if self.t_last is None:
            self.record.ttft_s = now - self.t_send
        else:
            self.record.itl_s.append(now - self.t_last)
        self.t_last = now
        self.text.append(piece or "")
        if choice.get("finish_reason"):
            self.record.finish_reason = choice["finish_reason"]

    def finish(self) -> None:
        record = self.record
        record.generated_text = "".join(self.text)
        if self.t_last is None:
            record.fail("no_tokens", "the stream carried no token")
            return
        record.latency_s = self.t_last - self.t_send
        if not self.done:
            n = len(record.itl_s) + 1
            record.fail("stream_dropped", f"the stream ended without [DONE] after {n} token messages")
            return
        record.success = True


class _ServerError(Exception):
    pass


async def _read_stream(client: httpx.AsyncClient, target: TargetConfig, spec: RequestSpec,
                       stream: _Stream) -> None:
    async with client.stream("POST", target.url, json=build_payload(target, spec),
                             headers=headers(target)) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", "replace")[:_ERROR_BODY_CHARS]
            stream.record.latency_s = time.perf_counter() - stream.t_send  # how fast a refusal answers
            stream.record.fail(f"http_{response.status_code}", f"HTTP {response.status_code}: {body}")
            return
        async for line in response.aiter_lines():
            now = time.perf_counter()
            line = line.strip()
            if line.startswith("data:"):
                stream.on_data(line[len("data:"):].strip(), now)
    stream.finish()


async def send(client: httpx.AsyncClient, target: TargetConfig, spec: RequestSpec,
               run_start: float) -> RequestRecord:
    """Send one streaming request and time it; never raises for request failures."""
    record = RequestRecord(index=spec.index, prompt_tokens=spec.prompt.tokens, max_tokens=spec.max_tokens,
                           scheduled_s=spec.scheduled_s, prefix_group=spec.prompt.prefix_group)
    t_send = time.perf_counter()
    record.start_s = t_send - run_start
    stream = _Stream(record, target.is_chat, t_send)
    try:
        async with asyncio.timeout(target.request_timeout_s):
            await _read_stream(client, target, spec, stream)
    except TimeoutError:
        record.fail("timeout", f"no complete response within {target.request_timeout_s:g} s")
    except _ServerError as exc:
        record.fail("server_error", f"error event in the stream: {exc}")
    except json.JSONDecodeError as exc:
        record.fail("bad_stream", f"a stream message is not JSON: {exc}")
    except httpx.ConnectError as exc:
        record.fail("connect", f"cannot connect to {target.url}: {exc}")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        record.fail("stream_dropped", f"the connection broke mid-response: {type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        record.fail(type(exc).__name__, f"{type(exc).__name__}: {exc}")
    return record


def make_client(target: TargetConfig, max_connections: int | None = None) -> httpx.AsyncClient:
    # No pool cap by default: the arrival process, not the client, decides concurrency.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    timeout = httpx.Timeout(target.request_timeout_s, connect=min(30.0, target.request_timeout_s))
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
