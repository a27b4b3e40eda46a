"""Server-sent events and the pieces every OpenAI response shares."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from pdserve.shared.errors import PdserveError

DONE = "data: [DONE]\n\n"


def event(chunk: BaseModel) -> str:
    # exclude_unset keeps chunks as small as OpenAI's (no null fields we never set).
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error format."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_event(exc: PdserveError) -> str:
    """An error after the stream started: the status is already 200, so it goes in the stream."""
    return f"data: {json.dumps(error_body(exc.message, exc.error_type, int(exc.status), exc.param))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Any:
    """OpenAI usage; `cached_tokens`: prompt tokens no engine computed for this request (prefix cache hits)."""
    from vllm.entrypoints.serve.engine.protocol import PromptTokenUsageInfo, UsageInfo

    details = PromptTokenUsageInfo(cached_tokens=cached_tokens) if cached_tokens is not None else None
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)
