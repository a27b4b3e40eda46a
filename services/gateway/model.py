"""What the gateway knows of the served model: name, tokenizer, limits, defaults.

The gateway tokenizes (and applies the chat template) so that the router knows
prompt lengths before placing a request, and workers receive token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.shared.errors import ContextLengthExceededError, InvalidRequestError

# Sampling defaults vLLM takes from a model's generation_config.json.
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServedModel:
    name: str
    tokenizer: Any  # a transformers tokenizer
    max_model_len: int
    default_sampling_params: dict[str, float] = field(default_factory=dict)
    # The engine refuses more logprobs than this (its `max_logprobs`); checking
    # in the gateway turns that into a 400 instead of a failure inside the engine.
    max_logprobs: int = 20

    @classmethod
    def load(cls, name: str, tokenizer_path: str, max_model_len: int, max_logprobs: int = 20) -> "ServedModel":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        return cls(name, tokenizer, max_model_len, _generation_defaults(tokenizer_path), max_logprobs)

    # -- prompts ---------------------------------------------------------------

    def encode_prompts(self, prompt: Any, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids for each prompt of a completions request (str, [str], [int] or [[int]])."""
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise InvalidRequestError("prompt must be a non-empty string, list of strings or token ids",
                                      param="prompt")
        encoded = []
        for item in prompts:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=add_special_tokens)
            elif isinstance(item, list) and all(isinstance(t, int) for t in item):
                ids = list(item)
                self._check_token_ids(ids)
            else:
                raise InvalidRequestError("each prompt must be a string or a list of token ids", param="prompt")
            if not ids:
                raise InvalidRequestError("prompt is empty", param="prompt")
            encoded.append(ids)
        return encoded

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of vocabulary (size {vocab})", param="prompt")

    def encode_chat(self, messages: list[Any], *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template: str | None, template_kwargs: dict | None) -> list[int]:
        """Apply the chat template to the conversation and tokenize it."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be true",
                                      param="continue_final_message")
        conversation = [_plain_message(m, i) for i, m in enumerate(messages)]
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # template errors are caused by the request's contents
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template writes the special tokens itself.
        ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("the conversation renders to an empty prompt", param="messages")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- limits ----------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int, prompt_param: str) -> None:
        if prompt_len >= self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input.", param=prompt_param)
        if prompt_len + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in the completion). "
                "Please reduce the length of the input or of the completion.", param="max_tokens")


def _plain_message(message: Any, index: int) -> dict[str, str]:
    """A message with text-only content; other content parts are refused."""
    if not isinstance(message, dict) or "role" not in message:
        raise InvalidRequestError(f"messages[{index}] must be an object with a role", param="messages")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(f"messages[{index}]: content of type {kind!r} is not supported "
                                          "by this model (text only)", param="messages")
            text_part = part.get("text")
            if not isinstance(text_part, str):
                raise InvalidRequestError(f"messages[{index}]: a text part needs a string 'text'", param="messages")
            parts.append(text_part)
        text = "\n".join(parts)
    else:
        raise InvalidRequestError(f"messages[{index}].content must be a string or a list of parts", param="messages")
    return {"role": str(message["role"]), "content": text}


def _generation_defaults(model_path: str) -> dict[str, float]:
    """Sampling defaults from the model's generation_config.json, as vLLM applies them."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in _GENERATION_DEFAULTS if k in config}
