"""The first token travels with the KV: D continues from the token P sampled.

Lifecycle of one handoff's first token:
  P samples it while computing the prompt (the client sees it at once) ->
  P's connector sends it after the prompt's last KV layer (a TOKEN frame) ->
  D's receive completes only with every layer *and* the token -> D's worker
  side records it here, keyed by transfer id -> D's first sampling step is
  constrained by `FirstTokenProcessor` to exactly that token -> decoding goes
  on from it, with the token counted as D's own first output token.

Why constrain D's sampler rather than append the token to D's prompt: with
the token as D's first *output* token, everything that depends on the output
(max_tokens, min_tokens, stop strings spanning the first two tokens,
presence/frequency penalties, a seeded generator's position) behaves exactly
as in one colocated engine. D computes the prompt's last token, as every vLLM
connector leaves it to D, and its sample there can only be P's token.

A request resubmitted without a transfer (the handoff failed after the client
saw P's token) names its token directly: `extra_args[FIRST_TOKEN_KEY]`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from pdserve.shared.protocol import FIRST_TOKEN_KEY
PROCESSOR_FQCN = "pdserve.kv_transfer.first_token:FirstTokenProcessor"
# A token whose request never reached D's sampler (aborted after landing) is forgotten after this long.
_STALE_S = 600.0


class FirstTokens:
    """transfer id -> P's first token, in the process that runs D's sampler (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[int, float]] = {}

    def put(self, transfer_id: str, token: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._tokens[transfer_id] = (int(token), now)
            stale = [t for t, (_, at) in self._tokens.items() if now - at > _STALE_S]
            for tid in stale:
                del self._tokens[tid]

    def get(self, transfer_id: str) -> int | None:
        with self._lock:
            entry = self._tokens.get(transfer_id)
        return entry[0] if entry is not None else None

    def discard(self, transfer_id: str) -> None:
        with self._lock:
            self._tokens.pop(transfer_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


FIRST_TOKENS = FirstTokens()


class _Pending:
    """One request of the batch whose first output token is fixed."""

    def __init__(self, output_tok_ids: list[int], token: int | None, transfer_id: str | None) -> None:
        self.output_tok_ids = output_tok_ids  # the runner's live list: empty until the first token
        self.token = token
        self.transfer_id = transfer_id

    def resolve(self) -> int | None:
        if self.token is None and self.transfer_id is not None:
            self.token = FIRST_TOKENS.get(self.transfer_id)
        return self.token


def _pending_for(params: Any, prompt_tok_ids: list[int] | None, output_tok_ids: list[int]) -> _Pending | None:
    extra = getattr(params, "extra_args", None) or {}
    forced = extra.get(FIRST_TOKEN_KEY)
    kv = extra.get("kv_transfer_params") or {}
    transfer_id = kv.get("transfer_id") if kv.get("pd_remote_prefill") else None
    if output_tok_ids or (forced is None and transfer_id is None):
        return None
    return _Pending(output_tok_ids, int(forced) if forced is not None else None, transfer_id)


class FirstTokenProcessor(LogitsProcessor):
    """Masks every logit but the known first token, for that one sampling step."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._pending: dict[int, _Pending] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._pending, batch_update, _pending_for)
        done = [i for i, p in self._pending.items() if p.output_tok_ids]
        for index in done:
            pending = self._pending.pop(index)
            if pending.transfer_id is not None:
                FIRST_TOKENS.discard(pending.transfer_id)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, pending in self._pending.items():
            token = pending.resolve()
            if token is None or not 0 <= token < logits.shape[-1]:
                continue  # the transfer failed: D recomputed and samples on its own
            row = logits[index]
            keep = row[token].clone()
            row.fill_(float("-inf"))
            row[token] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
        return logits
