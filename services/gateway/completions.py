"""POST /v1/completions.

Lifecycle: validated body -> prompts tokenized -> limits checked -> sampling
params -> Generation (placement, engines) -> one JSON response, or SSE chunks
(one per delta, then usage if asked, then [DONE]).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.gateway.generation import ChoiceState, Generation
from pdserve.gateway.handler import sampling_params, streaming_response, until_disconnect
from pdserve.gateway.model import ServedModel
from pdserve.gateway.sse import event, usage
from pdserve.router.controller import Router
from pdserve.shared.errors import InvalidRequestError
from pdserve.shared.metrics import Metrics
from pdserve.shared.slo import RequestSlo
from pdserve.shared.slo_metrics import SloMetrics
from pdserve.shared.protocol import TokenLogprob


def _logprobs(entries: list[TokenLogprob] | None, offset: int) -> Any:
    from vllm.entrypoints.openai.completion.protocol import CompletionLogProbs

    if entries is None:
        return None
    result = CompletionLogProbs()
    for entry in entries:
        result.text_offset.append(offset)
        result.tokens.append(entry.token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(dict(entry.top))
        offset += len(entry.token)
    return result


def prepare(body: Any, model: ServedModel) -> tuple[list[list[int]], Any, int]:
    for name in ("suffix", "prompt_embeds"):
        if getattr(body, name, None):
            raise InvalidRequestError(f"{name} is not supported", param=name)
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo together with logprobs is not supported", param="echo")
    if body.prompt is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    prompts = model.encode_prompts(body.prompt, add_special_tokens=body.add_special_tokens)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    for ids in prompts:
        model.check_fits(len(ids), max_tokens, "prompt")
    return prompts, sampling_params(body, max_tokens, model, body.logprobs), max_tokens


async def create_completion(body: Any, raw: Request, model: ServedModel, router: Router,
                            metrics: Metrics,
                            slo: RequestSlo | None = None, slo_metrics: SloMetrics | None = None) -> Response:
    prompts, params, max_tokens = prepare(body, model)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(router, metrics, request_id, prompts, params, max_tokens, slo, slo_metrics)
    echo = [model.decode(p) for p in prompts] if body.echo else None
    await until_disconnect(raw, generation.place())  # a client gone while queued leaves the queue
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming_response(generation, lambda: _chunks(generation, model.name, echo, include_usage))
    choices = await until_disconnect(raw, generation.collect())
    return JSONResponse(_response(generation, model.name, choices, echo, bool(body.return_token_ids)).model_dump())


def _response(generation: Generation, model_name: str, choices: list[ChoiceState], echo: list[str] | None,
              return_token_ids: bool) -> Any:
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice

    out = []
    for index, choice in enumerate(choices):
        prefix = echo[index // generation.n] if echo else ""
        out.append(CompletionResponseChoice(
            index=index,
            text=prefix + "".join(choice.text),
            logprobs=_logprobs(choice.logprobs, len(prefix)),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            token_ids=choice.token_ids if return_token_ids else None,
            prompt_token_ids=generation.prompts[index // generation.n] if return_token_ids else None,
        ))
    return CompletionResponse(id=generation.request_id, model=model_name, choices=out,
                              usage=usage(generation.num_prompt_tokens, generation.num_output_tokens, generation.num_cached_tokens))


async def _chunks(generation: Generation, model_name: str, echo: list[str] | None,
                  include_usage: bool) -> AsyncIterator[str]:
    from vllm.entrypoints.openai.completion.protocol import CompletionResponseStreamChoice, CompletionStreamResponse

    created = int(time.time())
    offsets: dict[int, int] = {}
    async with contextlib.aclosing(generation.deltas()) as stream:
        async for index, delta in stream:
            text = delta.text
            if echo and index not in offsets:
                text = echo[index // generation.n] + text
            choice = CompletionResponseStreamChoice(
                index=index, text=text, logprobs=_logprobs(delta.logprobs, offsets.get(index, 0)),
                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
            offsets[index] = offsets.get(index, 0) + len(text)
            yield event(CompletionStreamResponse(id=generation.request_id, object="text_completion",
                                                 created=created, model=model_name, choices=[choice]))
    if include_usage:
        yield event(CompletionStreamResponse(
            id=generation.request_id, object="text_completion", created=created, model=model_name, choices=[],
            usage=usage(generation.num_prompt_tokens, generation.num_output_tokens, generation.num_cached_tokens)))
