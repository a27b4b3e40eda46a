"""Prompts with an exact token count in the target model's tokenizer.

The traces give only lengths, so prompt text is made of random words that
are one token each (" word" in BPE vocabularies). A prompt's length is
counted the way the server counts it: for /v1/completions the tokenizer with
its special tokens (e.g. BOS), for /v1/chat/completions the rendered chat
template. Every prompt is re-tokenized and adjusted until the count is exact.

Shared prefixes: a configurable fraction of requests start with one of a few
fixed word sequences, so that prefix caching and prefix-aware routing can be
measured; all other text is random per request, so prompts share nothing by
accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.loadgen.errors import TokenizerError

_MAX_FIX_ROUNDS = 8
_MAX_WORDS = 4000


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # exact length as the server will count it
    prefix_group: int | None  # which shared prefix it starts with, if any


def load_tokenizer(name: str) -> Any:
    """`transformers.AutoTokenizer` for a model name or local directory."""
    try:
        from transformers import AutoTokenizer  # heavy: imported only when a run starts
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # missing dir, offline hub, unknown model: all need --tokenizer
        raise TokenizerError(f"cannot load the tokenizer {name!r} ({type(exc).__name__}: {exc}); "
                             "pass --tokenizer with a local model directory or hub name") from exc


def single_token_words(tokenizer: Any, limit: int = _MAX_WORDS) -> list[str]:
    """Words w such that ' ' + w encodes to exactly one token, in vocabulary order."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    words = sorted({t.strip() for t in texts if t.strip().isascii() and t.strip().isalpha()})
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    good = [w for w, enc in zip(words, encoded) if len(enc) == 1]
    if len(good) < 16:
        raise TokenizerError("the tokenizer has too few single-token words to build prompts from")
    return good[:limit]


class PromptBuilder:
    """Builds prompt i of n tokens, deterministically from (seed, i)."""

    def __init__(self, tokenizer: Any, chat: bool, seed: int = 0, prefix_fraction: float = 0.0,
                 prefix_len: int = 0, prefix_groups: int = 1) -> None:
        self._tok = tokenizer
        self._chat = chat
        self._seed = seed
        self._words = single_token_words(tokenizer)
        self._prefix_fraction = prefix_fraction if prefix_len > 0 else 0.0
        rng = np.random.default_rng([seed, 1 << 30])
        self._prefixes = [self._random_words(rng, prefix_len) for _ in range(prefix_groups)]
        self.overhead = self.count("")  # tokens an empty prompt already costs (BOS, template)

    def count(self, text: str) -> int:
        """Prompt length in tokens as the server counts it."""
        if self._chat:
            rendered = self._tok.apply_chat_template(self.messages(text), add_generation_prompt=True,
                                                     tokenize=False)
            # vLLM tokenizes a rendered chat prompt without adding special tokens.
            return len(self._tok(rendered, add_special_tokens=False)["input_ids"])
        return len(self._tok(text)["input_ids"])

    @staticmethod
    def messages(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def min_tokens(self) -> int:
        return self.overhead + 1

    def _random_words(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self._words[i] for i in rng.integers(0, len(self._words), size=max(n, 0))]

    def _group(self, rng: np.random.Generator) -> int | None:
        if self._prefix_fraction > 0 and rng.random() < self._prefix_fraction:
            return int(rng.integers(0, len(self._prefixes)))
        return None

    def build(self, index: int, n_tokens: int) -> Prompt:
        rng = np.random.default_rng([self._seed, index])
        group = self._group(rng)
        target = max(n_tokens, self.min_tokens)
        body = target - self.overhead
        words = list(self._prefixes[group][:body]) if group is not None else []
        words += self._random_words(rng, body - len(words))
        for _ in range(_MAX_FIX_ROUNDS):
            text = "".join(" " + w for w in words)
            got = self.count(text)
            if got == target:
                return Prompt(text=text, tokens=got, prefix_group=group)
            # Tokens can merge or split across word boundaries in some vocabularies:
            # add or drop words at the end and re-count.
            diff = target - got
            if diff > 0:
                words += self._random_words(rng, diff)
            else:
                keep = max(len(words) + diff, 1)
                words = words[:keep]
        raise TokenizerError(f"could not build a prompt of exactly {target} tokens for request {index}")
