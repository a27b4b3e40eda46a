"""An in-process fake engine with fault injection, for tests without vLLM engines.

It implements `EngineClient` the way a real instance behaves at the seams:
deltas per choice, `n` choices, `max_tokens`, EOS unless `ignore_eos`,
aborts, and stats. Tokens are a deterministic function of the prompt, so
tests can predict them. Faults (`FaultPlan`) make the failure paths run in CI:
an engine error mid-stream, an instance that dies, slow tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from pdserve.shared.errors import EngineDeadError, EngineError
from pdserve.shared.protocol import FIRST_TOKEN_KEY, EngineInfo, EngineRequest, EngineStats, OutputDelta, TokenLogprob
from pdserve.shared.roles import InstanceState, Role
from pdserve.worker.client import EngineClient


@dataclass
class FaultPlan:
    """What should go wrong, and when (counted in generated tokens)."""

    fail_after_tokens: int | None = None  # the engine errors this request
    die_after_tokens: int | None = None  # the whole instance dies
    token_interval_s: float = 0.0  # delay between tokens (to test disconnects)
    # The first token differs from the deterministic one unless the request forces it
    # (a decode instance whose KV handoff failed and that sampled on its own).
    diverge_first_token: bool = False
    frozen: bool = False  # the instance accepts requests and never answers (a hung engine)
    restart_fails: bool = False  # bringing a new engine up fails (the controller backs off and retries)


@dataclass
class FakeEngineClient(EngineClient):
    info: EngineInfo
    eos_token_id: int = 2
    vocab_size: int = 4096
    detokenize: Callable[[list[int]], str] = lambda ids: "".join(f" w{t}" for t in ids)
    faults: FaultPlan = field(default_factory=FaultPlan)
    eos_after: int | None = None  # emit EOS as this token number (1-based), unless ignore_eos
    in_flight: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    submitted: list[EngineRequest] = field(default_factory=list)
    dead: bool = False
    # Shared by a fake P and D: transfer id -> set once P produced its token (its "KV landed"),
    # so a fake D with a remote prefill waits for it as a real one waits for its KV.
    kv_fabric: dict[str, asyncio.Event] | None = None
    restarts: int = 0

    @classmethod
    def make(cls, instance_id: str = "fake-0", role: Role = Role.MIXED, max_model_len: int = 512,
             **kwargs) -> "FakeEngineClient":
        info = EngineInfo(instance_id, role, model="fake", max_model_len=max_model_len,
                          block_size=16, kv_blocks_total=max_model_len // 16 * 8)
        return cls(info=info, **kwargs)

    def token_at(self, prompt: list[int], choice: int, position: int) -> int:
        """The deterministic `position`-th token (0-based) of choice `choice`."""
        if self.eos_after is not None and position + 1 == self.eos_after:
            return self.eos_token_id
        return 10 + (sum(prompt) + 7 * choice + position) % (self.vocab_size - 10)

    async def generate(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        if self.dead:
            raise EngineDeadError(f"instance {self.instance_id} is dead")
        params = request.sampling_params
        self.submitted.append(request)
        self.in_flight.add(request.request_id)
        finished = False
        kv = (params.extra_args or {}).get("kv_transfer_params") or {}
        try:
            if self.faults.frozen:
                await asyncio.Event().wait()
            if kv.get("pd_remote_prefill") and self.kv_fabric is not None:
                landed = self.kv_fabric.setdefault(kv["transfer_id"], asyncio.Event())
                # Not landed in time: a real D recomputes, so does this one.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(landed.wait(), kv.get("timeout_s") or 30.0)
            n = params.n or 1
            done = [False] * n
            produced = 0
            position = 0
            while not all(done):
                for choice in range(n):
                    if done[choice]:
                        continue
                    delta = self._step(request, choice, position)
                    produced += 1
                    self._inject(produced)
                    done[choice] = delta.finish_reason is not None
                    delta.request_finished = all(done)
                    finished = delta.request_finished
                    if kv.get("pd_remote_decode") and self.kv_fabric is not None:
                        self.kv_fabric.setdefault(kv["transfer_id"], asyncio.Event()).set()
                    yield delta
                position += 1
                if self.faults.token_interval_s:
                    await asyncio.sleep(self.faults.token_interval_s)
                else:
                    await asyncio.sleep(0)
        finally:
            if not finished and request.request_id in self.in_flight:
                self.aborted.append(request.request_id)
            self.in_flight.discard(request.request_id)

    def _step(self, request: EngineRequest, choice: int, position: int) -> OutputDelta:
        params = request.sampling_params
        token = self.token_at(request.prompt_token_ids, choice, position)
        forced = (params.extra_args or {}).get(FIRST_TOKEN_KEY)
        if position == 0 and forced is not None:
            token = int(forced)
        elif position == 0 and self.faults.diverge_first_token:
            token = 10 + (token + 1 - 10) % (self.vocab_size - 10)
        finish = None
        if token == self.eos_token_id and not params.ignore_eos:
            finish = "stop"
        elif position + 1 >= params.max_tokens:
            finish = "length"
        text = "" if finish == "stop" else self.detokenize([token])
        logprobs = None
        if params.logprobs is not None:
            top = [(self.detokenize([token]), -0.5)] + [(f" alt{k}", -2.0 - k) for k in range(params.logprobs)]
            logprobs = [TokenLogprob(token, self.detokenize([token]), -0.5, top[: max(params.logprobs, 1)])]
        return OutputDelta(request.request_id, choice, [token], text, logprobs=logprobs, finish_reason=finish,
                           num_prompt_tokens=len(request.prompt_token_ids))

    def _inject(self, produced: int) -> None:
        if self.faults.die_after_tokens is not None and produced > self.faults.die_after_tokens:
            self.dead = True
            raise EngineDeadError(f"instance {self.instance_id} died (injected)")
        if self.faults.fail_after_tokens is not None and produced > self.faults.fail_after_tokens:
            raise EngineError("injected engine failure")

    async def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self.in_flight:
                self.aborted.append(rid)
                self.in_flight.discard(rid)

    async def stats(self) -> EngineStats:
        return EngineStats(self.instance_id, self.info.role, num_running=len(self.in_flight),
                           kv_blocks_total=self.info.kv_blocks_total, in_flight=len(self.in_flight),
                           healthy=not self.dead, state=InstanceState.DEAD if self.dead else InstanceState.READY)

    async def close(self) -> None:
        self.dead = True

    async def inject_fault(self, fault: str) -> list[int]:
        if fault != "kill":
            raise ValueError(f"the fake engine only knows the fault 'kill', not {fault!r}")
        self.dead = True
        return []

    async def restart(self) -> EngineInfo:
        if self.faults.restart_fails:
            raise EngineError(f"instance {self.instance_id} did not come back (injected)")
        self.dead = False
        self.restarts += 1
        return self.info
