"""Draining an async stream into a queue, so one consumer can merge several streams.

Every item arrives as `(tag, item)`; the stream's end as `(tag, END)`; an
exception the stream raised as `(tag, exception)`, for the consumer to raise
in its own context (the request's), where it is handled and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

END = object()


async def drain(open_stream: Callable[[], AsyncIterator[Any]], queue: asyncio.Queue, tag: Any = None) -> None:
    """Put `open_stream()`'s items on `queue`; cancelling the drain closes the stream."""
    try:
        async with contextlib.aclosing(open_stream()) as stream:
            async for item in stream:
                queue.put_nowait((tag, item))
        queue.put_nowait((tag, END))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # opening the stream counts: a consumer must never wait for an END that won't come
        queue.put_nowait((tag, exc))
