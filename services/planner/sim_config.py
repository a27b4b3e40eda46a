"""Configuration of a simulated cluster: engine limits, the engine's scheduler, serving overheads, links.

Two engine schedulers (`SimConfig.chunked_prefill`):
- False (Splitwise's simulator, the planner's default): a prefill iteration
  batches whole queued prompts up to `max_prefill_tokens` (a longer prompt
  runs alone, in one iteration); the running decode batch rides along.
- True (vLLM V1, what a live pdserve engine runs): every step has a budget of
  `max_prefill_tokens` tokens (vLLM's max_num_batched_tokens). Running
  decodes take one token each; queued prompts fill the rest, in order, a
  prompt longer than what is left being cut into chunks that run in
  consecutive steps. A step that carries prefill tokens takes
  `prefill_time(prefill tokens + decodes)`; its decodes advance one token.

`ServingOverheads` are what a live pdserve adds around the engines (gateway,
router, Ray, the P->D reservation, D's first step); all zero by default, so
the planner's Splitwise-style runs are unchanged. `calibrate.py` measures
them on a live cluster.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class LinkConfig(BaseModel):
    """The link the KV cache crosses from a prefill to a decode instance."""

    bandwidth_gbps: float = Field(200.0, description="GB/s between two machines (DGX-A100: 8 x 200 Gb/s IB = 200 GB/s).")
    latency_s: float = Field(0.0005, description="Fixed cost per handoff (handshake, first byte), seconds.")
    overlap: float = Field(0.95, ge=0.0, le=1.0,
                           description="Fraction of the transfer that layer-wise sending can hide behind the prefill.")
    shared: bool = Field(True, description="Concurrent transfers out of one machine or into one machine share its "
                                           "link; False: every transfer has the whole bandwidth.")

    def handoff_time(self, kv_bytes: float, prefill_duration: float) -> float:
        transfer = kv_bytes / (self.bandwidth_gbps * 1e9)
        return self.latency_s + max(transfer * (1.0 - self.overlap), transfer - prefill_duration)


class ServingOverheads(BaseModel):
    """Time a live pdserve spends around the engines, per request (seconds)."""

    dispatch_s: float = Field(0.0, ge=0.0, description="Arrival to the prompt entering its engine's queue, plus the "
                                                       "first token's way back to the client (gateway tokenization, "
                                                       "routing, Ray calls, streaming); added to every TTFT.")
    reservation_s: float = Field(0.0, ge=0.0, description="Disaggregated: D's reservation (its block ids) reaching P, "
                                                          "after D's next step boundary (D's scheduler allocates the "
                                                          "blocks when it next runs); P starts only then.")
    reservation_at_step: bool = Field(False, description="Disaggregated: the prompt waits for D's next step boundary "
                                                         "before the reservation goes out (vLLM's scheduler runs "
                                                         "between steps).")
    prefill_request_s: float = Field(0.0, ge=0.0, description="Engine time per prompt on the instance that "
                                                              "prefills it, beyond its tokens: the step that finishes "
                                                              "a prompt takes this much longer (per-request work the "
                                                              "engine does serially, unlike dispatch_s).")
    decode_first_step: bool = Field(False, description="Disaggregated: D computes the prompt's last token and samples "
                                                       "P's token again in its first step (pdserve's connector, like "
                                                       "vLLM's), so D runs `output` steps, not `output - 1`.")

    @property
    def any(self) -> bool:
        return bool(self.dispatch_s or self.reservation_s or self.reservation_at_step)  # delays before the queue


class SimConfig(BaseModel):
    """Engine and router limits shared by every instance of a simulated cluster."""

    block_size: int = Field(16, description="KV block size in tokens (vLLM's default).")
    max_batch_size: int = Field(512, description="Most requests in one decode batch (Splitwise's simulator: 512).")
    max_prefill_tokens: int = Field(2048, description="Prompt tokens batched into one prefill iteration; a longer "
                                                      "prompt runs alone (Splitwise's max_batch_tokens). With "
                                                      "chunked_prefill: the token budget of every step (vLLM's "
                                                      "max_num_batched_tokens).")
    chunked_prefill: bool = Field(False, description="vLLM V1's scheduler: decodes first, then prompt chunks up to "
                                                     "the step's token budget (see the module docstring).")
    kv_bytes_per_token: int = Field(327680, description="KV bytes per token, for handoff times (Llama-2-70B fp16).")
    admission_timeout_s: float = Field(60.0, description="How long a request may wait for KV room before it is "
                                                         "rejected; 0 rejects at once.")
    link: LinkConfig = Field(default_factory=LinkConfig)
    overheads: ServingOverheads = Field(default_factory=ServingOverheads)
