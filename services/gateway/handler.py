"""What the completions and chat endpoints share: sampling, streaming, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from pdserve.gateway.generation import Generation
from pdserve.gateway.model import ServedModel
from pdserve.gateway.sse import DONE, error_event
from pdserve.shared.errors import EngineError, InvalidRequestError, PdserveError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def client_errors() -> tuple[type[BaseException], ...]:
    """Exceptions vLLM's request models and SamplingParams raise for bad input."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def as_invalid_request(exc: BaseException) -> InvalidRequestError:
    message = str(getattr(exc, "args", [None])[0] or exc)
    return InvalidRequestError(message, param=getattr(exc, "parameter", None))


def sampling_params(body: Any, max_tokens: int, model: ServedModel, logprobs: int | None) -> Any:
    """vLLM's SamplingParams from the request, range errors as 400s."""
    if getattr(body, "use_beam_search", False):
        raise InvalidRequestError("beam search is not supported", param="use_beam_search")
    if logprobs is not None and not 0 <= logprobs <= model.max_logprobs:
        raise InvalidRequestError(f"logprobs must be between 0 and {model.max_logprobs}, got {logprobs}",
                                  param="logprobs")
    if body.n is not None and body.n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {body.n}", param="n")
    try:
        params = body.to_sampling_params(max_tokens, model.default_sampling_params)
    except client_errors() as exc:  # vLLM's own range checks (temperature, top_p, penalties, ...)
        raise as_invalid_request(exc) from exc
    from vllm.sampling_params import RequestOutputKind

    # Deltas even for non-streaming requests: the gateway times every token
    # (TTFT, ITL) and the worker batches deltas per engine step anyway.
    params.output_kind = RequestOutputKind.DELTA
    return params


def streaming_response(generation: Generation, chunks: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
    """SSE response; an error after the first byte becomes an error event, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(chunks()) as stream:
                async for text in stream:
                    yield text
        except PdserveError as exc:
            yield error_event(exc)
        except Exception as exc:  # noqa: BLE001 - not ours: still an OpenAI error event, then [DONE]
            logger.exception("stream of %s failed", generation.request_id)
            yield error_event(EngineError(f"internal error: {type(exc).__name__}: {exc}"))
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (which aborts the engines)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
