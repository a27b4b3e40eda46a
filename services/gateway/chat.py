"""POST /v1/chat/completions.

Lifecycle: validated body -> chat template applied and tokenized -> limits
checked -> sampling params -> Generation -> one JSON response, or SSE chunks
(a role chunk per choice, content deltas, finish, usage if asked, [DONE]).
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


def _logprobs(entries: list[TokenLogprob] | None) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionLogProb,
        ChatCompletionLogProbs,
        ChatCompletionLogProbsContent,
    )

    if entries is None:
        return None
    return ChatCompletionLogProbs(content=[
        ChatCompletionLogProbsContent(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
            top_logprobs=[ChatCompletionLogProb(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
                          for t, lp in e.top])
        for e in entries
    ])


def prepare(body: Any, model: ServedModel) -> tuple[list[int], Any, int]:
    if body.tools and body.tool_choice not in (None, "none"):
        raise InvalidRequestError("tool calling is not supported by this server", param="tools")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    prompt = model.encode_chat(
        list(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template=body.chat_template,
        template_kwargs=body.chat_template_kwargs,
    )
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is not None and requested < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
    # Unset: whatever room the context leaves (as vLLM does).
    max_tokens = requested if requested is not None else max(1, model.max_model_len - len(prompt))
    model.check_fits(len(prompt), max_tokens, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return prompt, sampling_params(body, max_tokens, model, logprobs), max_tokens


async def create_chat_completion(body: Any, raw: Request, model: ServedModel, router: Router,
                                 metrics: Metrics,
                                 slo: RequestSlo | None = None, slo_metrics: SloMetrics | None = None) -> Response:
    prompt, params, max_tokens = prepare(body, model)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(router, metrics, request_id, [prompt], params, max_tokens, slo, slo_metrics)
    await until_disconnect(raw, generation.place())  # a client gone while queued leaves the queue
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming_response(generation, lambda: _chunks(generation, model.name, include_usage))
    choices = await until_disconnect(raw, generation.collect())
    return JSONResponse(_response(generation, model.name, choices, bool(body.return_token_ids)).model_dump())


def _response(generation: Generation, model_name: str, choices: list[ChoiceState], return_token_ids: bool) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )

    out = [ChatCompletionResponseChoice(
        index=index,
        message=ChatMessage(role="assistant", content="".join(choice.text)),
        logprobs=_logprobs(choice.logprobs),
        finish_reason=choice.finish_reason,
        stop_reason=choice.stop_reason,
        token_ids=choice.token_ids if return_token_ids else None,
    ) for index, choice in enumerate(choices)]
    return ChatCompletionResponse(id=generation.request_id, model=model_name, choices=out,
                                  usage=usage(generation.num_prompt_tokens, generation.num_output_tokens, generation.num_cached_tokens),
                                  prompt_token_ids=generation.prompts[0] if return_token_ids else None)


async def _chunks(generation: Generation, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse,
        DeltaMessage,
    )

    created = int(time.time())

    def chunk(choices: list, **extra: Any) -> str:
        return event(ChatCompletionStreamResponse(id=generation.request_id, object="chat.completion.chunk",
                                                  created=created, model=model_name, choices=choices, **extra))

    # OpenAI clients expect the role first, in a chunk of its own per choice.
    yield chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(generation.n)])
    async with contextlib.aclosing(generation.deltas()) as stream:
        async for index, delta in stream:
            yield chunk([ChatCompletionResponseStreamChoice(
                index=index, delta=DeltaMessage(content=delta.text), logprobs=_logprobs(delta.logprobs),
                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)])
    if include_usage:
        yield chunk([], usage=usage(generation.num_prompt_tokens, generation.num_output_tokens, generation.num_cached_tokens))
